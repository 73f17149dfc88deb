"""Test helpers: randomised tiny models, diffusers oracles with converted weights, and
checkpoint files written in the official, diffusers and ComfyUI layouts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanx.configs import DiTConfig, dit_config, official_config_json, vae_config
from wanx.models.transformer import WanDiT
from wanx.models.vae import LATENT_MEAN, LATENT_STD, WanVAE
from wanx.models.vae22 import WanVAE22


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random, including those initialised to zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_gain = name.endswith(("gamma", "norm_q.weight", "norm_k.weight", "norm_k_img.weight")) or (
                p.ndim == 1 and "norm" in name and name.endswith("weight")
            )
            p.copy_(1.0 + noise if is_gain else noise)
    return module.eval()


def tiny_dit(name: str = "tiny", seed: int = 0) -> WanDiT:
    return randomize(WanDiT(dit_config(name)), seed)


def tiny_vae(seed: int = 0) -> WanVAE:
    return randomize(WanVAE(vae_config("tiny")), seed, std=0.15)


def tiny_vae22(seed: int = 0) -> WanVAE22:
    """Wan2.2 VAE, encoder 8 and decoder 12 wide, 48 latent channels (the released statistics)."""
    return randomize(WanVAE22(vae_config("tiny-wan2.2")), seed, std=0.15)


def official_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# -- comparing loaded copies --------------------------------------------------------------


def assert_same_tensors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str = "") -> None:
    """A loaded state dict is bit-identical to its source: same keys, dtypes and values.

    Loading copies, renames, splits or fuses tensors but never computes them, so this is
    exact on every machine. Check the weights here; compare outputs with `assert_same_outputs`."""
    assert set(actual) == set(expected), (where, sorted(set(actual) ^ set(expected)))
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), (where, key)


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    """Outputs of two different tensor copies of the same weights (a loaded model and its
    source, or one model on two inputs of different shapes) agree to fp32 rounding.

    They need not be bit-identical: a memory-mapped copy sits at another alignment, and a
    different shape or alignment lets BLAS/oneDNN pick other kernels or summation orders
    (up to 4.4e-7 of the output scale here). The stated bound, 1e-6 relative to the output's
    scale (8 to 16 float32 ulps of its largest value), still catches wrong wiring: a swapped
    or bf16-rounded tensor, or one bias off by 1e-4, moves tiny-DiT outputs by 2e-6 to 0.3 of
    their scale. The weights themselves are checked bit for bit by `assert_same_tensors`.
    Use torch.equal on outputs only where the very same tensors run the very same ops."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item(),
                               msg=lambda m: f"{where}: {m}" if where else m)


# -- DiffSynth-Studio oracles -------------------------------------------------------------


def diffsynth_module(name: str):
    """A module of DiffSynth-Studio (`diffsynth==2.1.12`, installed without its dependencies) with
    its packages' `__init__`s skipped: they import every model and pipeline (and torchvision,
    transformers, ...). Empty package modules stand in for `diffsynth`, `diffsynth.core` and
    `diffsynth.models`, so `name` loads only itself and what it imports."""
    import importlib
    import importlib.util
    import sys
    import types

    if "diffsynth" not in sys.modules:
        spec = importlib.util.find_spec("diffsynth")
        if spec is None:
            import pytest

            pytest.skip("diffsynth (test-only oracle) is not installed: pip install --no-deps diffsynth==2.1.12")
        package = types.ModuleType("diffsynth")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["diffsynth"] = package
    root = Path(sys.modules["diffsynth"].__path__[0])
    for package, folder in (("diffsynth.core", root / "core"), ("diffsynth.models", root / "models")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(folder)]
            sys.modules[package] = module
    return importlib.import_module(name)


# -- diffusers oracles ----------------------------------------------------------------


def diffusers_dit_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(dict(official))
    # The package converter lacks the FLF2V entry that the repository's script has.
    if "img_emb.emb_pos" in converted:
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    return converted


def diffusers_dit(cfg: DiTConfig, official: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel

    extra = {}
    if cfg.has_image_input:
        extra = dict(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    if cfg.model_type == "flf2v":
        extra["pos_embed_seq_len"] = cfg.image_tokens
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps, **extra,
    )
    model.load_state_dict(diffusers_dit_state(official), strict=True)
    return model.eval()


def diffusers_vace_dit(cfg, official: dict[str, torch.Tensor], meta: bool = False):
    """diffusers' `WanVACETransformer3DModel` with the official VACE weights (`before_proj`/`after_proj`
    become `proj_in`/`proj_out` in the package converter's table); `meta`: built without
    initialisation, every tensor assigned (the released widths)."""
    import contextlib

    from diffusers import WanVACETransformer3DModel

    with torch.device("meta") if meta else contextlib.nullcontext():
        model = WanVACETransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
            vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim,
        )
    model.load_state_dict(diffusers_dit_state(official), strict=True, assign=meta)
    if meta:  # the RoPE tables are computed buffers, not weights: made for real
        rope = model.rope
        model.rope = type(rope)(cfg.head_dim, cfg.patch_size, rope.max_seq_len)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


def run_diffusers_dit(model, cfg: DiTConfig, x, t, context, clip_features=None, y=None, vace_context=None,
                      vace_context_scale=1.0):
    """The diffusers call equivalent to `WanDiT(x, t, context, clip_features, y)` (a VACE model:
    with `vace_context=`, `vace_context_scale=`)."""
    context = torch.nn.functional.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
    kwargs = {}
    if y is not None:
        x = torch.cat([x, y], dim=1)
    if clip_features is not None:
        # diffusers takes FLF2V's two images as two batch rows of 257 tokens.
        kwargs["encoder_hidden_states_image"] = clip_features.reshape(-1, 257, clip_features.shape[-1])
    if vace_context is not None:  # diffusers' names: the VACE context and one scale per VACE layer
        kwargs["control_hidden_states"] = vace_context
        kwargs["control_hidden_states_scale"] = torch.full((len(cfg.vace_layers),), float(vace_context_scale))
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]


def diffusers_moe_pipeline(high: WanDiT, low: WanDiT, boundary: float, shift: float):
    """diffusers' `WanPipeline` with `transformer` (high noise), `transformer_2` and
    `boundary_ratio`, on the official UniPC grid (diffusers' own starts at sigma 1; see
    tests/test_sampling.py), without text encoder or VAE: call it with prompt embeddings padded
    to text_len, latents and output_type="latent"."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: set_timesteps(
        sigmas=np.linspace(0.999, 0, steps + 1)[:-1].copy(), device=device)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                       transformer=diffusers_dit(high.config, official_state(high)),
                       transformer_2=diffusers_dit(low.config, official_state(low)), boundary_ratio=boundary)


def diffusers_vae(official: dict[str, torch.Tensor], base_dim: int = 8):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16, latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD))
    model.load_state_dict(convert_wan_vae_to_diffusers(dict(official)), strict=True)
    return model.eval()


def latent_stats(vae_type: type[WanVAE] = WanVAE):
    shape = (1, len(vae_type.latent_mean), 1, 1, 1)
    return torch.tensor(vae_type.latent_mean).view(shape), torch.tensor(vae_type.latent_std).view(shape)


_VAE22_RESNET = {".residual.0.gamma": ".norm1.gamma", ".residual.2.": ".conv1.", ".residual.3.gamma": ".norm2.gamma",
                 ".residual.6.": ".conv2.", ".shortcut.": ".conv_shortcut."}


def diffusers_vae22_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan2.2 VAE -> diffusers `AutoencoderKLWan(is_residual=True)` names, by the renames
    of diffusers' `scripts/convert_wan_to_diffusers.py::convert_vae_22` (the script is not in the
    package), written apart from wanx's own table so that parity tests check that table."""
    out = {}
    for key, value in official.items():
        new = key
        if key.split(".")[0] in ("conv1", "conv2"):
            new = {"conv1": "quant_conv", "conv2": "post_quant_conv"}[key.split(".")[0]] + key[5:]
        elif key.startswith(("encoder.conv1.", "decoder.conv1.")):
            new = key.replace(".conv1.", ".conv_in.")
        elif ".head.0." in key or ".head.2." in key:
            new = key.replace(".head.0.", ".norm_out.").replace(".head.2.", ".conv_out.")
        elif ".middle.1." in key:
            new = key.replace(".middle.1.", ".mid_block.attentions.0.")
        elif ".middle." in key:
            new = key.replace(".middle.0.", ".mid_block.resnets.0.").replace(".middle.2.", ".mid_block.resnets.1.")
            for old, replacement in _VAE22_RESNET.items():
                new = new.replace(old, replacement)
        else:  # {en,de}coder.{down,up}samples.i.{down,up}samples.j.<leaf>
            part, _, stage, inner, j, *rest = key.split(".")
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            if rest[0] in ("resample", "time_conv"):
                new = ".".join([part, blocks, stage, "downsampler" if part == "encoder" else "upsampler", *rest])
            else:
                new = ".".join([part, blocks, stage, "resnets", j, *rest])
                for old, replacement in _VAE22_RESNET.items():
                    new = new.replace(old, replacement)
        out[new] = value
    return out


def diffusers_vae22(official: dict[str, torch.Tensor], cfg):
    """diffusers' Wan2.2 configuration (`vae22_diffusers_config`) at `cfg`'s widths."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):  # every tensor is assigned below: no initialisation (minutes at the real width)
        model = AutoencoderKLWan(
            base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, is_residual=True, in_channels=12,
            out_channels=12, patch_size=cfg.patch_size, scale_factor_temporal=4, scale_factor_spatial=16,
            latents_mean=list(WanVAE22.latent_mean), latents_std=list(WanVAE22.latent_std),
        )
    model.load_state_dict(diffusers_vae22_state(dict(official)), strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


# -- checkpoint files in each layout ----------------------------------------------------


def write_official_dit(folder: Path, model: WanDiT, shards: int = 1) -> Path:
    """Official folder: diffusion_pytorch_model.safetensors (or shards + index) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = official_state(model)
    if shards == 1:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        keys = list(state)
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state[k] for k in part}, str(folder / name))
            weight_map.update({k: name for k in part})
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(official_config_json(model.config)), encoding="utf-8")
    return folder


def write_diffusers_dit(folder: Path, model: WanDiT) -> Path:
    build = {"vace": diffusers_vace_dit, "animate": diffusers_animate_dit}.get(model.config.model_type, diffusers_dit)
    build(model.config, official_state(model)).save_pretrained(folder)
    return folder


def write_comfy_dit(folder: Path, model: WanDiT, name: str = "wan2.1_tiny_bf16.safetensors",
                    dtype: torch.dtype | None = None) -> Path:
    """ComfyUI single file: official names under `model.diffusion_model.`; a config.json
    beside it gives the tiny head count (released models need none)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"model.diffusion_model.{k}": (v.to(dtype) if dtype else v) for k, v in official_state(model).items()}
    save_file(state, str(folder / name))
    (folder / "config.json").write_text(json.dumps({"num_heads": model.config.num_heads}), encoding="utf-8")
    return folder / name


def write_official_vae(path: Path, model: WanVAE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state(model), path)
    return path


def write_diffusers_vae(folder: Path, model: WanVAE) -> Path:
    if isinstance(model, WanVAE22):
        diffusers_vae22(official_state(model), model.config).save_pretrained(folder)
        return folder / "diffusion_pytorch_model.safetensors"
    diffusers_vae(official_state(model), model.config.dim).save_pretrained(folder)
    return folder / "diffusion_pytorch_model.safetensors"


def write_comfy_vae(path: Path, model: WanVAE) -> Path:
    """ComfyUI's repackaged `wan_2.1_vae.safetensors`: official names in a safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(official_state(model), str(path))
    return path


def diffusers_animate_dit(cfg, official: dict[str, torch.Tensor]):
    """diffusers' `WanAnimateTransformer3DModel` with the official Animate weights, renamed by the
    package converter (whose table is the released motion encoder's: 512x512 faces, 7 res blocks)."""
    from diffusers import WanAnimateTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sides = [cfg.motion_encoder_size >> i for i in range(len(cfg.motion_encoder_channels))]
    model = WanAnimateTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, latent_channels=cfg.out_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
        image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim,
        motion_encoder_channel_sizes={str(s): c for s, c in zip(sides, cfg.motion_encoder_channels)},
        motion_encoder_size=cfg.motion_encoder_size, motion_style_dim=cfg.motion_style_dim, motion_dim=cfg.motion_dim,
        motion_encoder_dim=cfg.motion_encoder_dim, face_encoder_hidden_dim=cfg.face_encoder_hidden_dim,
        face_encoder_num_heads=cfg.face_encoder_num_heads, inject_face_latents_blocks=cfg.inject_face_latents_blocks,
    )
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(official)), strict=True)
    return model.eval()
