import json
import pytest
import torch
from safetensors.torch import save_file

import wanx
from tests.oracles import (
    assert_same_outputs, assert_same_tensors, official_state, tiny_dit, tiny_vae, write_comfy_dit, write_comfy_vae,
    write_diffusers_dit, write_diffusers_vae, write_official_dit, write_official_vae,
)
from wanx.loading import CheckpointError, inspect_checkpoint


def dit_inputs(cfg):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, cfg.out_dim, 2, 4, 6, generator=gen)
    extra = {}
    if cfg.has_y:
        extra["y"] = torch.randn(1, cfg.in_dim - cfg.out_dim, 2, 4, 6, generator=gen)
    if cfg.has_image_input:
        extra["clip_features"] = torch.randn(1, cfg.image_tokens, cfg.image_dim, generator=gen)
    return x, torch.tensor([700.0]), torch.randn(1, 5, cfg.text_dim, generator=gen), extra


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "tiny-flf2v", "tiny-i2v-A14B", "tiny-ti2v"])
def test_dit_layouts_load_to_identical_outputs(tmp_path, name):
    model = tiny_dit(name)
    paths = {
        "official": write_official_dit(tmp_path / "official", model),
        "official-sharded": write_official_dit(tmp_path / "sharded", model, shards=3),
        "diffusers": write_diffusers_dit(tmp_path / "diffusers", model),
        "comfyui": write_comfy_dit(tmp_path / "comfy", model),
    }
    x, t, context, extra = dit_inputs(model.config)
    with torch.no_grad():
        expected = model(x, t, context, **extra)
        for layout, path in paths.items():
            loaded = wanx.load_model(path)
            assert loaded.config == model.config, layout
            assert not any(p.is_meta for p in loaded.parameters())
            assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)  # the weights: bit-identical
            assert_same_outputs(loaded(x, t, context, **extra), expected, layout)  # another copy: fp32 rounding
            assert inspect_checkpoint(path).layout == layout.split("-")[0]


def test_one_shard_stands_for_the_set(tmp_path):
    folder = write_official_dit(tmp_path, tiny_dit(), shards=2)
    info = inspect_checkpoint(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    assert len(info.files) == 2 and info.network == "dit"


def test_vae_layouts_load_to_identical_outputs(tmp_path):
    model = tiny_vae()
    paths = {
        "official": write_official_vae(tmp_path / "Wan2.1_VAE.pth", model),
        "diffusers": write_diffusers_vae(tmp_path / "vae", model),
        "comfyui-file": write_comfy_vae(tmp_path / "wan_2.1_vae.safetensors", model),
    }
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = model.decode(model.encode(video))
        for layout, path in paths.items():
            loaded = wanx.load_model(path)
            assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)
            assert_same_outputs(loaded.decode(loaded.encode(video)), expected, layout)
    assert inspect_checkpoint(paths["diffusers"]).layout == "diffusers"


def test_dtype_cast_keeps_fp32_islands(tmp_path):
    path = write_official_dit(tmp_path, tiny_dit())
    model = wanx.load_model(path, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_embedding[0].weight.dtype == torch.float32
    assert model.head.head.weight.dtype == torch.float32


def test_bf16_file_computes_in_bf16(tmp_path):
    path = write_comfy_dit(tmp_path, tiny_dit(), dtype=torch.bfloat16)
    info = inspect_checkpoint(path)
    assert info.compute_dtype == torch.bfloat16 and "bfloat16" in info.dtypes
    model = wanx.load_model(path)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32


def test_comfy_fp8_scaled_is_dequantised(tmp_path):
    model = tiny_dit()
    state = {f"model.diffusion_model.{k}": v for k, v in official_state(model).items()}
    key = "model.diffusion_model.blocks.0.ffn.0.weight"
    scale = state[key].abs().max() / 448.0
    state[key] = (state[key] / scale).to(torch.float8_e4m3fn)
    state[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(state, str(tmp_path / "fp8.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}), encoding="utf-8")
    assert inspect_checkpoint(tmp_path / "fp8.safetensors").fp8_scaled
    loaded = wanx.load_model(tmp_path / "fp8.safetensors")
    original = model.blocks[0].ffn[0].weight
    assert (loaded.blocks[0].ffn[0].weight - original).abs().max() <= 0.07 * original.abs().max()


def test_head_count_defaults_to_released_head_dim(tmp_path):
    from wanx.configs import DiTConfig
    from wanx.models.transformer import WanDiT

    cfg = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=1, text_dim=32)
    save_file(official_state(WanDiT(cfg)), str(tmp_path / "model.safetensors"))
    assert inspect_checkpoint(tmp_path / "model.safetensors").config == cfg  # 256 / 128 = 2 heads


# -- clear errors -----------------------------------------------------------------------


def test_not_a_wan_file(tmp_path):
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan2.1 checkpoint"):
        wanx.load_model(tmp_path / "clip.safetensors")


def test_truncated_file(tmp_path):
    path = write_comfy_vae(tmp_path / "vae.safetensors", tiny_vae())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        wanx.load_model(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="vae.safetensors"):
        wanx.load_model(path)


def test_truncated_pth(tmp_path):
    path = write_official_vae(tmp_path / "Wan2.1_VAE.pth", tiny_vae())
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        wanx.load_model(path)


def test_missing_block(tmp_path):
    model = tiny_dit()
    state = {k: v for k, v in official_state(model).items() if not k.startswith("blocks.0.")}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"missing \(blocks\.0\.") as err:
        wanx.load_model(tmp_path / "model.safetensors")
    assert "official layout" in str(err.value) and "model.safetensors" in str(err.value)
    # The last block gone: config.json's num_layers says it should be there.
    state = {k: v for k, v in official_state(model).items() if not k.startswith("blocks.1.")}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2, "num_layers": 2}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"missing \(blocks\.1\."):
        wanx.load_model(tmp_path / "model.safetensors")


def test_mis_shaped_and_unexpected_tensors(tmp_path):
    state = official_state(tiny_dit())
    state["blocks.1.ffn.2.bias"] = torch.zeros(31)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"mis-shaped \(blocks\.1\.ffn\.2\.bias \[31\]"):
        wanx.load_model(tmp_path / "model.safetensors")
    state = official_state(tiny_dit())
    state["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected"):
        wanx.load_model(tmp_path / "model.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    state = official_state(tiny_vae())
    state["payload"] = Payload()
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        wanx.load_model(path)
    assert "must never run" not in capsys.readouterr().out


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        wanx.load_model(tmp_path / "nope.safetensors")
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(CheckpointError, match="no DiT weights found"):
        wanx.load_model(tmp_path)
