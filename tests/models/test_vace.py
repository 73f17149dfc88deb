"""The VACE DiT: parity with diffusers' `WanVACETransformer3DModel` on random weights (every
weight random, the zero-initialised projections too), and sequence parallel and FSDP on it (the
other runtime transforms on it: tests/models/test_transforms_on_models.py)."""

import copy

import pytest
import torch

from tests.oracles import diffusers_vace_dit, official_state, randomize, run_diffusers_dit
from wanx.configs import DIT_PRESETS, VaceConfig, dit_config
from wanx.models.transformer import WanDiT
from wanx.models.vace import VaceWanDiT

# Two blocks, both fed a hint: block 0 (before_proj) and a later one (without).
TWO_BLOCKS = VaceConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, vace_layers=(0, 1))
# Hints into some blocks only: 4 blocks, hints after 0 and 2 (the official every-other default).
FOUR_BLOCKS = VaceConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=4, text_dim=32)


def tiny_vace(cfg=TWO_BLOCKS, seed=0) -> VaceWanDiT:
    return randomize(WanDiT(cfg), seed)


def vace_inputs(cfg, batch=2, frames=3, height=8, width=12, text=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, frames, height, width, generator=gen)
    context = torch.randn(batch, text, cfg.text_dim, generator=gen)
    vace = torch.randn(batch, cfg.vace_in_dim, frames, height, width, generator=gen)
    return x, torch.tensor([999.0, 437.5])[:batch], context, vace


def relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_presets_and_dispatch():
    assert DIT_PRESETS["vace-1.3B"].vace_layers == tuple(range(0, 30, 2))
    assert DIT_PRESETS["vace-14B"].vace_layers == (0, 5, 10, 15, 20, 25, 30, 35)  # Wan2.1-VACE-14B's config
    assert DIT_PRESETS["vace-14B"].dim == 5120
    assert DIT_PRESETS["vace-1.3B"].vace_in_dim == 96
    with torch.device("meta"):
        model = WanDiT("vace-1.3B")
    assert type(model) is VaceWanDiT and len(model.vace_blocks) == 15
    assert hasattr(model.vace_blocks[0], "before_proj") and not hasattr(model.vace_blocks[1], "before_proj")
    # A fresh model: the projections are zero (official init), so the hints add nothing.
    fresh = WanDiT(TWO_BLOCKS)
    assert all(b.after_proj.weight.abs().sum() == 0 for b in fresh.vace_blocks)
    with pytest.raises(ValueError, match="vace_layers"):
        VaceConfig(num_layers=4, vace_layers=(1, 3))


@pytest.mark.parametrize("cfg", [TWO_BLOCKS, FOUR_BLOCKS], ids=["2-blocks", "4-blocks"])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_matches_diffusers(cfg, scale):
    """Same random weights (diffusers' converter renames before/after_proj to proj_in/out), same numbers."""
    model = tiny_vace(cfg)
    assert all(b.after_proj.weight.abs().sum() > 0 for b in model.vace_blocks)  # the hints count
    oracle = diffusers_vace_dit(cfg, official_state(model))
    x, t, context, vace = vace_inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, context, vace_context=vace, vace_context_scale=scale)
        plain = model(x, t, context, vace_context=vace, vace_context_scale=0.0)
    theirs = run_diffusers_dit(oracle, cfg, x, t, context, vace_context=vace, vace_context_scale=scale)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert relative(ours, theirs) <= 1e-4, relative(ours, theirs)  # the base DiT's bound (seen 1.2e-5)
    assert relative(plain, theirs) > 1e-2  # the hints change the output


def test_scale_per_layer_and_official_list_and_shorter_context():
    """One scale per VACE layer (diffusers' control_hidden_states_scale), the official list of
    per-sample contexts, and a context of fewer frames (zero-padded tokens, as both oracles)."""
    model = tiny_vace(FOUR_BLOCKS)
    cfg = model.config
    oracle = diffusers_vace_dit(cfg, official_state(model))
    x, t, context, vace = vace_inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, context, vace_context=list(vace), vace_context_scale=[0.3, 1.2])
        theirs = oracle(hidden_states=x, timestep=t, encoder_hidden_states=torch.nn.functional.pad(
            context, (0, 0, 0, cfg.text_len - context.shape[1])), control_hidden_states=vace,
            control_hidden_states_scale=torch.tensor([0.3, 1.2]), return_dict=False)[0]
        assert relative(ours, theirs) <= 1e-4
        short = vace[:, :, :2]
        ours = model(x, t, context, vace_context=short)
        theirs = run_diffusers_dit(oracle, cfg, x, t, context, vace_context=short)
        assert relative(ours, theirs) <= 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(vace_context=None), "needs vace_context"),
    (dict(vace_context=torch.zeros(2, 16, 3, 8, 12)), r"must be \[B, 96, F, H, W\]"),
    (dict(vace_context=torch.zeros(2, 96, 3, 8, 10)), "height and width"),
    (dict(vace_context_scale=[1.0, 2.0, 3.0]), "one per VACE layer"),
])
def test_bad_vace_inputs(change, message):
    model = tiny_vace()
    x, t, context, vace = vace_inputs(model.config)
    kwargs = {"vace_context": vace, **change}
    with pytest.raises(ValueError, match=message):
        model(x, t, context, **kwargs)


def test_bf16_stays_close():
    model = tiny_vace()
    x, t, context, vace = vace_inputs(model.config)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, p in bf16.named_parameters():  # the model's fp32 islands, as load_model keeps them
        if any(part in model.keep_in_fp32 for part in name.split(".")) or name.startswith("head.head"):
            p.data = p.data.float()
    with torch.no_grad():
        ref, out = model(x, t, context, vace_context=vace), bf16(x, t, context, vace_context=vace)
    assert relative(out, ref) <= 0.05


# -- sequence parallel and FSDP on a VACE model (the other transforms: test_transforms_on_models.py)


def test_sequence_parallel_and_fsdp_on_two_ranks_equal_one_process(tmp_path):
    """The VACE tokens are split like the video tokens (45 of them: one padding row), the VACE
    blocks' attention goes across ranks, and FSDP shards the VACE blocks as blocks."""
    import torch.multiprocessing as mp

    from tests.distributed.workers import vace_rank
    from wanx.distributed.launch import free_port

    out = tmp_path / "vace.pt"
    mp.start_processes(vace_rank, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    model = tiny_vace(FOUR_BLOCKS)
    x, t, context, vace = vace_inputs(FOUR_BLOCKS, frames=3, height=6, width=10)
    with torch.no_grad():
        reference = model(x, t, context, vace_context=vace, vace_context_scale=0.7)
    for case, latents in torch.load(out).items():
        assert relative(latents, reference) <= 1e-5, case


def test_tiny_vace_set_is_a_vace_model_whose_hints_act():
    import wanx
    from wanx.hub import resolve_model

    model = wanx.load_model(resolve_model("tiny-vace"))
    assert type(model) is VaceWanDiT and model.config == DIT_PRESETS["tiny-vace"]
    assert model.config.vace_layers == (0, 1)  # both kinds of VACE block
    assert all(b.after_proj.weight.abs().sum() > 0 for b in model.vace_blocks)
    assert model.vace_blocks[0].before_proj.weight.abs().sum() > 0
    x, t, context, vace = vace_inputs(model.config, batch=1)
    with torch.no_grad():
        assert relative(model(x, t, context, vace_context=vace, vace_context_scale=0.0),
                        model(x, t, context, vace_context=vace)) > 1e-3


def test_memory_estimate_counts_the_hints():
    from wanx.memory.estimate import estimate

    base, vace = (estimate(dit_config(name), 480, 832, 81, dtype=torch.bfloat16)
                  for name in ("t2v-1.3B", "vace-1.3B"))
    tokens = 21 * 30 * 52
    assert vace.denoise - base.denoise == 2 * tokens * 4 * 1536 * 16  # 15 hints and the VACE stream, batch 2



def test_matches_diffusers_at_the_released_width():
    """VACE-1.3B's width, heads (head dim 128: RoPE split 44/42/42), FFN and VACE input, on 2
    blocks each fed a hint, at a few tokens (built on the meta device: no initialisation)."""
    cfg = VaceConfig(num_layers=2, vace_layers=(0, 1))
    assert (cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.vace_in_dim) == (1536, 12, 8960, 96)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = randomize(model.to_empty(device="cpu"), std=0.02)
    oracle = diffusers_vace_dit(cfg, official_state(model), meta=True)
    x, t, context, vace = vace_inputs(cfg, batch=1, frames=2, height=4, width=6, text=5)
    with torch.no_grad():
        ours = model(x, t, context, vace_context=vace, vace_context_scale=0.7)
    theirs = run_diffusers_dit(oracle, cfg, x, t, context, vace_context=vace, vace_context_scale=0.7)
    assert relative(ours, theirs) <= 1e-4, relative(ours, theirs)  # seen 2.1e-6
