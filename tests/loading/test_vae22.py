"""Telling the Wan2.1 and Wan2.2 VAEs apart in every layout, and loading the Wan2.2 one."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import wanx
from tests.oracles import (
    assert_same_outputs, assert_same_tensors, diffusers_vae22, diffusers_vae22_state, official_state, tiny_vae,
    tiny_vae22, write_comfy_vae, write_diffusers_vae, write_official_vae,
)
from wanx.cli import main
from wanx.configs import VAE22Config, infer_vae_config, vae_config
from wanx.loading import CheckpointError, inspect_checkpoint
from wanx.loading.layouts import DIFFUSERS_VAE22, detect, rename
from wanx.models.vae22 import WanVAE22


def write_all_layouts(folder, model) -> dict:
    name = "Wan2.2_VAE" if isinstance(model, WanVAE22) else "Wan2.1_VAE"
    return {
        "official": write_official_vae(folder / f"{name}.pth", model),
        "diffusers": write_diffusers_vae(folder / "vae", model),
        # ComfyUI's repackaged wan2.2_vae.safetensors: the official names, no prefix, so "official" layout
        "comfyui-file": write_comfy_vae(folder / f"{name.lower()}.safetensors", model),
    }


def test_every_diffusers_vae22_key_maps():
    """diffusers' names (from convert_vae_22's renames) map onto exactly the official key set,
    each onto the same tensor; detection picks the Wan2.2 table."""
    official = official_state(tiny_vae22())
    foreign = diffusers_vae22(official, vae_config("tiny-wan2.2")).state_dict()
    assert set(foreign) == set(diffusers_vae22_state(official))  # the renames fit diffusers' module exactly
    found = detect(foreign)
    assert (found.network, found.layout, found.rules) == ("vae", "diffusers", DIFFUSERS_VAE22)
    mapped = {rename(k, DIFFUSERS_VAE22): k for k in foreign}
    assert set(mapped) == set(official)
    for k, v in official.items():
        assert torch.equal(foreign[mapped[k]], v), k


def test_released_vae22_key_set_maps_and_config_is_inferred():
    """The full-size Wan2.2 VAE: diffusers' `vae22_diffusers_config` keys map onto the official
    196, and the official shapes give back the `wan2.2` preset."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        official = WanVAE22().state_dict()
        foreign = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                                   out_channels=12, patch_size=2).state_dict()
    assert {rename(k, DIFFUSERS_VAE22) for k in foreign} == set(official)
    assert infer_vae_config({k: v.shape for k, v in official.items()}) == vae_config("wan2.2") == VAE22Config()


def test_vae22_layouts_load_to_identical_outputs(tmp_path):
    model = tiny_vae22()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model.decode(model.encode(video))
        for layout, path in write_all_layouts(tmp_path, model).items():
            info = inspect_checkpoint(path)
            stored = "diffusers" if layout == "diffusers" else "official"
            assert (info.network, info.layout, info.name, info.config) == ("vae", stored, "Wan2.2 VAE", model.config)
            loaded = wanx.load_model(path)
            assert type(loaded) is WanVAE22 and not any(p.is_meta for p in loaded.parameters())
            assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)
            assert_same_outputs(loaded.decode(loaded.encode(video)), expected, layout)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_prefixed_single_file(tmp_path, prefix):
    state = {prefix + k: v for k, v in official_state(tiny_vae22()).items()}
    save_file(state, str(tmp_path / "vae.safetensors"))
    assert type(wanx.load_model(tmp_path / "vae.safetensors")) is WanVAE22


def test_each_generation_is_told_apart_in_every_layout(tmp_path, capsys):
    paths = {}
    for model in (tiny_vae(), tiny_vae22()):
        folder = tmp_path / type(model).__name__
        for layout, path in write_all_layouts(folder, model).items():
            info = inspect_checkpoint(path)
            assert type(info.config) is type(model.config), (type(model).__name__, layout)
            assert type(wanx.load_model(path)) is type(model), (type(model).__name__, layout)
            paths[type(model).__name__, layout] = path
    assert main(["info", str(paths["WanVAE22", "official"]), str(paths["WanVAE", "official"])]) == 0
    out = capsys.readouterr().out
    assert "network:    Wan2.2 VAE" in out and "preset:     tiny-wan2.2" in out
    assert "network:    Wan2.1 VAE" in out and "preset:     tiny\n" in out


def test_inferred_widths(tmp_path):
    """Encoder and decoder widths, latent channels and patch size all come from the shapes."""
    cfg = VAE22Config(dim=4, dec_dim=6, z_dim=8)
    path = write_official_vae(tmp_path / "Wan2.2_VAE.pth", WanVAE22(cfg))
    info = inspect_checkpoint(path)
    assert info.config == cfg and "preset:     (custom)" in info.summary()
    vae = wanx.load_model(path)
    with torch.no_grad():
        assert vae.decode(vae.encode(torch.zeros(1, 3, 5, 16, 16))).shape == (1, 3, 5, 16, 16)
    assert vae.encode(torch.zeros(1, 3, 1, 16, 16)).shape == (1, 8, 1, 1, 1)  # no released stats: mean 0, std 1


# -- clear one-line errors --------------------------------------------------------------


def one_line_error(path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        wanx.load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_tensor_is_named(tmp_path):
    state = official_state(tiny_vae22())
    del state["decoder.upsamples.1.upsamples.3.time_conv.weight"]
    torch.save(state, tmp_path / "Wan2.2_VAE.pth")
    missing = r"official layout Wan2\.2 VAE .* 1 missing \(decoder\.upsamples\.1\.upsamples\.3\.time_conv"
    message = one_line_error(tmp_path / "Wan2.2_VAE.pth", missing)
    assert "Wan2.1" not in message


def test_mis_shaped_tensor_is_named(tmp_path):
    """A decoder head for 3 colours without the 2x2 patch (12 channels expected)."""
    state = official_state(tiny_vae22())
    state["decoder.head.2.weight"] = state["decoder.head.2.weight"][:3].clone()
    state["decoder.head.2.bias"] = state["decoder.head.2.bias"][:3].clone()
    save_file(state, str(tmp_path / "wan2.2_vae.safetensors"))
    one_line_error(tmp_path / "wan2.2_vae.safetensors", r"mis-shaped \(decoder\.head\.2\.weight \[3, 12, 3, 3, 3\] "
                                                        r"\(model \[12, 12, 3, 3, 3\]\)")


def test_generations_mixed_in_one_file(tmp_path):
    """Wan2.1 stages pasted into a Wan2.2 file: the stray tensors are reported, not loaded."""
    state = {**official_state(tiny_vae()), **official_state(tiny_vae22())}
    torch.save(state, tmp_path / "mixed.pth")
    one_line_error(tmp_path / "mixed.pth", r"Wan2\.2 VAE does not match the inferred config: .*unexpected \(encoder\."
                                           r"downsamples\.0\.residual")


def test_unknown_diffusers_vae_name(tmp_path):
    state = diffusers_vae22_state(official_state(tiny_vae22()))
    state["decoder.up_blocks.0.upsampler.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    one_line_error(tmp_path / "diffusion_pytorch_model.safetensors",
                   r"diffusers Wan VAE: 1 tensor\(s\) with unknown names: decoder\.up_blocks\.0\.upsampler\.extra")



# -- the tiny Wan2.2 VAE for model sets -------------------------------------------------

# The tiny Wan2.2 VAE's weights (seed 0) on any machine; a change of the recipe changes this
# digest (bump wanx.tiny.TINY_VERSION then, so model sets holding it are remade).
TINY_VAE22_WEIGHTS_SHA256 = "5494c4e4bebceb8056ca9a7b097ccb781168a2db3a32b21ab0d4a7a9e797deae"


def _weights_digest(path) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(torch.load(path, weights_only=True).items()):
        digest.update(f"{key}/{tensor.dtype}/{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_tiny_vae22_file(tmp_path):
    from wanx.tiny import make_tiny_vae22

    (tmp_path / "a").mkdir()
    first = make_tiny_vae22(tmp_path / "Wan2.2_VAE.pth")
    again = make_tiny_vae22(tmp_path / "a" / "Wan2.2_VAE.pth")
    assert first.read_bytes() == again.read_bytes()
    digest = _weights_digest(first)
    assert digest == _weights_digest(make_tiny_vae22(tmp_path / "renamed.pth")) == TINY_VAE22_WEIGHTS_SHA256
    assert _weights_digest(make_tiny_vae22(tmp_path / "seed1.pth", seed=1)) != digest
    info = inspect_checkpoint(first)
    assert (info.name, info.layout, info.config) == ("Wan2.2 VAE", "official", vae_config("tiny-wan2.2"))
    vae = wanx.load_model(first)
    with torch.no_grad():
        video = vae.decode(vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1))
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()
