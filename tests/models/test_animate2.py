"""Wan-Animate-2 DiT against diffusers' `WanAnimate2Transformer3DModel` (the installed oracle,
given our weights through its own converter) with every weight random: the reference pass,
then denoising passes against its cache (conditional and unconditional), a pass smaller than
the segment's buffer, and a config without CLIP and with other reference RoPE offsets/stride
(the runtime transforms on it: tests/models/test_transforms_on_models.py)."""

import math

import pytest
import torch

from tests.oracles import official_state, randomize
from wanx.configs import Animate2Config, dit_config
from wanx.models.animate2 import Animate2WanDiT
from wanx.models.transformer import WanDiT, sinusoidal_embedding

TINY = dit_config("tiny-animate2")  # 10 blocks: the unconditional pass skips block 9
# No CLIP branch (use_img_emb False), the reference at frame 0, height 1, width w, frames 2 apart.
VARIANT = Animate2Config(**{k: getattr(TINY, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim")},
                         clip=False, refer_offset_t=0, refer_offset_h=1, refer_stride=2)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_animate2(cfg=TINY, seed: int = 0) -> Animate2WanDiT:
    return randomize(WanDiT(cfg), seed)


def diffusers_animate2(cfg: Animate2Config, official: dict[str, torch.Tensor]):
    """The oracle with the official weights renamed by the package converter. Its time sinusoid
    is computed in float64 as the official code does (diffusers' `Timesteps` rounds the angles
    to float32: 1.3e-5 of the output apart at t = 700 on this tiny model)."""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_animate_2_transformer_to_diffusers
    from diffusers.models.transformers.transformer_wan_animate_2 import MLPProj

    model = WanAnimate2Transformer3DModel(
        patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, eps=cfg.eps, use_img_emb=cfg.clip, refer_offset_t=cfg.refer_offset_t,
        refer_offset_h=cfg.refer_offset_h, refer_offset_w=cfg.refer_offset_w, refer_stride=cfg.refer_stride)
    if cfg.clip:
        model.img_emb = MLPProj(cfg.image_dim, cfg.dim)  # the class hard-codes CLIP ViT-H's 1280
    model.load_state_dict(convert_wan_animate_2_transformer_to_diffusers(dict(official)), strict=True)
    model.timesteps_proj = _Float64Sinusoid(cfg.freq_dim)
    return model.eval()


class _Float64Sinusoid(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(self.dim, t).float()


def segment_inputs(cfg, frames: int = 2, h: int = 4, w: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        ref=torch.randn(1, 16, frames, h, w, generator=g), ref_y=torch.randn(1, 20, frames, h, w, generator=g),
        noisy=torch.randn(1, 16, frames + 1, h, w, generator=g), y=torch.randn(1, 20, frames + 1, h, w, generator=g),
        context=torch.randn(1, 7, cfg.text_dim, generator=g),
        clip=torch.randn(1, 257, cfg.image_dim, generator=g) if cfg.clip else None,
    )


def run_diffusers(oracle, inputs, t, *, origin=None, uncond=False):
    """The reference pass, then one denoising pass, as the modular pipeline calls them;
    origin (latent frames, tokens per frame) as the pipeline's (origin_len, origin_area)."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    ref, noisy = inputs["ref"][0], inputs["noisy"][0]
    ref_grid = torch.tensor([[ref.shape[1], ref.shape[2] // 2, ref.shape[3] // 2]])
    frames, tokens = origin or (ref.shape[1], ref.shape[2] * ref.shape[3] // 4)
    cache = WanAnimate2KVCache(oracle.config.num_layers)
    common = dict(encoder_hidden_states_image=inputs["clip"], return_dict=False)
    extracted = oracle([ref], t, [inputs["context"][0]], [inputs["ref_y"][0]], cache, "extract",
                       seq_len=ref[0].numel() // 4, offset_grid_sizes=ref_grid, **common)[0][0]
    # origin_area [H, W] in pixels: tokens = H * W // 256 (8x VAE, 2x2 patches); W = 16 * tokens, H = 16.
    denoised = oracle([noisy], t, [inputs["context"][0]], [inputs["y"][0]], cache, "cached",
                      seq_len=noisy[0].numel() // 4, reference_grid_sizes=ref_grid, origin_len=(frames - 1) * 4 + 1,
                      origin_area=[16, 16 * tokens], is_uncondtion=uncond, **common)[0][0]
    return extracted, denoised


def run_ours(model, inputs, t, *, origin=None, uncond=False):
    cache = model.new_cache()
    extracted = model(inputs["ref"], t, inputs["context"], inputs["clip"], inputs["ref_y"], cache=cache, mode="extract")
    denoised = model(inputs["noisy"], t, inputs["context"], inputs["clip"], inputs["y"], cache=cache, mode="cached",
                     origin=origin, uncond=uncond)
    return extracted[0], denoised[0]


@pytest.mark.parametrize("case", ["full", "uncond", "smaller-than-segment", "no-clip-offsets-stride"])
def test_matches_diffusers(case):
    cfg = VARIANT if case == "no-clip-offsets-stride" else TINY
    model = tiny_animate2(cfg)
    oracle = diffusers_animate2(cfg, official_state(model))
    inputs = segment_inputs(cfg, frames=3 if cfg is VARIANT else 2)
    # The segment's buffer: one latent frame and 2 tokens per frame more than this pass holds.
    origin = (3, 8) if case == "smaller-than-segment" else None
    t = torch.tensor([700.0])
    with torch.no_grad():
        expected = run_diffusers(oracle, inputs, t, origin=origin, uncond=case == "uncond")
        actual = run_ours(model, inputs, t, origin=origin, uncond=case == "uncond")
    for name, a, e in zip(("reference pass", "denoising pass"), actual, expected):
        assert a.shape == e.shape, name
        assert relative(a, e) < 2e-6, (name, relative(a, e))  # measured 3e-7 to 5e-7


def test_each_part_of_the_reference_attention_acts():
    """The denoising pass depends on the cache (a different reference changes it), on the
    unconditional skip, and on the zero slots of a larger segment buffer: none is a no-op."""
    model = tiny_animate2()
    inputs = segment_inputs(TINY)
    other = dict(inputs, ref=torch.randn_like(inputs["ref"]))
    t = torch.tensor([500.0])
    with torch.no_grad():
        base = run_ours(model, inputs, t)[1]
        assert relative(run_ours(model, other, t)[1], base) > 1e-3
        assert relative(run_ours(model, inputs, t, uncond=True)[1], base) > 1e-3
        assert relative(run_ours(model, inputs, t, origin=(3, 8))[1], base) > 1e-3


def test_bad_calls_stop_in_one_line():
    model = tiny_animate2()
    inputs = segment_inputs(TINY)
    t = torch.tensor([500.0])
    cache = model.new_cache()
    with torch.no_grad():
        with pytest.raises(ValueError, match="reference cache is empty"):
            model(inputs["noisy"], t, inputs["context"], inputs["clip"], inputs["y"], cache=cache, mode="cached")
        with pytest.raises(ValueError, match="mode must be one of"):
            model(inputs["noisy"], t, inputs["context"], inputs["clip"], inputs["y"], cache=cache, mode="denoise")
        model(inputs["ref"], t, inputs["context"], inputs["clip"], inputs["ref_y"], cache=cache, mode="extract")
        with pytest.raises(ValueError, match="origin .* is smaller"):
            model(inputs["noisy"], t, inputs["context"], inputs["clip"], inputs["y"], cache=cache, mode="cached",
                  origin=(1, 6))
        small = tiny_animate2(Animate2Config(**{**{k: getattr(TINY, k) for k in ("dim", "ffn_dim", "num_heads",
                                                                                 "text_dim", "image_dim")}},
                                             num_layers=2))
        small_cache = small.new_cache()
        small(inputs["ref"], t, inputs["context"], inputs["clip"], inputs["ref_y"], cache=small_cache, mode="extract")
        with pytest.raises(ValueError, match="skips block 9"):
            small(inputs["noisy"], t, inputs["context"], inputs["clip"], inputs["y"], cache=small_cache,
                  mode="cached", uncond=True)
        with pytest.raises(ValueError, match="make it with new_cache"):
            small(inputs["ref"], t, inputs["context"], inputs["clip"], inputs["ref_y"], cache=cache, mode="extract")


def test_release_preset_and_names():
    cfg = dit_config("animate2-14B")
    assert (cfg.dim, cfg.num_layers, cfg.in_dim, cfg.clip) == (5120, 40, 36, True)
    assert (cfg.refer_offset_t, cfg.refer_offset_h, cfg.refer_offset_w, cfg.refer_stride) == (1, 0, -1, 1)
    with torch.device("meta"):
        model = WanDiT(cfg)
    assert type(model) is Animate2WanDiT
    names = set(model.state_dict())
    assert "blocks.0.block.self_attn.q.weight" in names and "blocks.39.block.cross_attn.k_img.weight" in names
    assert "img_emb.proj.1.weight" in names and not any(".block." not in k for k in names if k.startswith("blocks."))
    assert math.isclose(sum(p.numel() for p in model.parameters()) / 1e9, 16.4, abs_tol=0.1)


def test_sequence_parallel_refuses_animate2():
    from wanx.distributed.sequence import SequenceParallel

    with pytest.raises(ValueError, match="Wan-Animate-2.*without --sp"):
        SequenceParallel(tiny_animate2(), group=None)
