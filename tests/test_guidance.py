"""Guidance variants and schedules (wanx.guidance): each against diffusers' guider as a test-only
oracle where one exists (else the paper's formula restated here), the DiT forwards each step
runs (counted with a forward pre-hook), and the refusals of bad settings."""

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance

from wanx import guidance as g
from wanx.cli import main
from wanx.pipeline import RequestError, WanPipeline
from wanx.request import parse_job, pipeline_kwargs

FAST = dict(num_inference_steps=4, num_frames=5, height=32, width=32, seed=3, output_type="latents", progress=False)


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny", device="cpu", dtype=torch.float32)


def predictions(seed=0, shape=(1, 16, 2, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def fixed_branch(cond, uncond):
    """A model function whose cond and uncond predictions are given: the context says which."""
    def branch(x, t, context, names):
        return torch.cat([cond if c.item() > 0 else uncond for c in context[:, 0, 0]])
    return branch


def run(strategy, cond, uncond, scale, index, total, passes=g.Guidance()):
    x = torch.zeros_like(cond)
    return strategy.bind(passes)(fixed_branch(cond, uncond), x, torch.tensor([500.0]), torch.ones(1, 1, 1),
                                 -torch.ones(1, 1, 1), scale, g.Step(index, total))


def test_cfg_zero_star_matches_diffusers():
    oracle = ClassifierFreeZeroStarGuidance(guidance_scale=5.0)  # zero_init_steps=1: its default, ours too
    ours = g.CFGZeroStar()
    for step in range(3):
        cond, uncond = predictions(step)
        oracle.set_state(step, 3, torch.tensor(500))
        want = oracle.forward(cond, uncond).pred
        torch.testing.assert_close(run(ours, cond, uncond, 5.0, step, 3), want)
    assert ours.zero_init_steps == ClassifierFreeZeroStarGuidance().zero_init_steps


@pytest.mark.parametrize("momentum", [None, -0.5])
def test_apg_matches_diffusers_with_momentum_per_request(momentum):
    strategy = g.APG(momentum=momentum, norm_threshold=2.0, eta=0.3)
    for _ in range(2):  # the same object twice: its momentum starts afresh each request
        oracle = AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=momentum,
                                           adaptive_projected_guidance_rescale=2.0, eta=0.3)
        bound = strategy.bind(g.TwoPass())
        bound.start(3)
        for step in range(3):
            cond, uncond = predictions(step)
            oracle.set_state(step, 3, torch.tensor(500))
            oracle.prepare_inputs({})  # step 0 makes its momentum buffer
            want = oracle.forward(cond, uncond).pred
            got = bound(fixed_branch(cond, uncond), torch.zeros_like(cond), torch.tensor([500.0]),
                        torch.ones(1, 1, 1), -torch.ones(1, 1, 1), 4.0, g.Step(step, 3))
            torch.testing.assert_close(got, want)
    defaults = AdaptiveProjectedGuidance()
    assert (g.APG().eta, g.APG().norm_threshold, g.APG().momentum) == (
        defaults.eta, defaults.adaptive_projected_guidance_rescale, defaults.adaptive_projected_guidance_momentum)


def test_cfg_schedule_and_scales():
    cond, uncond = predictions()
    oracle = ClassifierFreeGuidance(guidance_scale=5.0)
    strategy = g.CFG(cfg_steps=2)
    torch.testing.assert_close(run(strategy, cond, uncond, 5.0, 1, 4), oracle.forward(cond, uncond).pred)
    assert torch.equal(run(strategy, cond, uncond, 5.0, 2, 4), cond)  # after cfg_steps: the cond prediction
    per_step = g.CFG(scales=[3.0, 1.0])
    torch.testing.assert_close(run(per_step, cond, uncond, 5.0, 0, 2), ClassifierFreeGuidance(3.0).forward(cond, uncond).pred)
    assert torch.equal(run(per_step, cond, uncond, 5.0, 1, 2), cond)


def test_nag_transform_is_the_papers_formula():
    """NAG (arXiv 2505.21179, Algorithm 1 as its reference code writes it), restated."""
    torch.manual_seed(0)
    positive, negative = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    negative[0, :3] = positive[0, :3] + 0.01  # some tokens under the cap, some over
    nag = g.NAG(11.0, tau=2.5, alpha=0.25)
    guided = positive * 11.0 - negative * 10.0
    norm_p = torch.norm(positive, p=1, dim=-1, keepdim=True).expand(*positive.shape)
    norm_g = torch.norm(guided, p=1, dim=-1, keepdim=True).expand(*guided.shape)
    ratio = torch.nan_to_num(norm_g / norm_p, 10)
    over = ratio > 2.5
    assert over.any() and (~over).any()
    guided[over] = guided[over] / (norm_g[over] + 1e-7) * norm_p[over] * 2.5
    want = guided * 0.25 + positive * 0.75
    torch.testing.assert_close(nag.transform(positive, negative), want)


def test_nag_acts_through_the_cross_attention_seam(pipe):
    dit = pipe.dit
    torch.manual_seed(1)
    x, context, negative = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 6, 32), torch.randn(1, 5, 32)
    t = torch.tensor([700.0])
    with torch.no_grad():
        plain = dit(x, t, context)
        with g.NagAttention(dit, negative, g.NAG(1.0)):  # scale 1: the positive attention back
            same = dit(x, t, context)
        with g.NagAttention(dit, negative, g.NAG(11.0)):
            guided = dit(x, t, context)
        after = dit(x, t, context)
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(guided, plain, atol=1e-4)
    assert torch.equal(after, plain)  # the seam is taken off: the model as it was
    assert all("attention_fn" not in vars(b.cross_attn) for b in dit.blocks)


def test_slg_uncond_skips_blocks(pipe):
    """The Wan way (WanVideoWrapper, Wan2GP): within its steps the uncond pass skips the blocks;
    guidance is then CFG (diffusers' guider) on cond and that uncond. Batched or two passes alike."""
    dit = pipe.dit
    torch.manual_seed(2)
    x, context, context_null = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    t = torch.tensor([700.0])

    def by_hand(ctx, skip):
        state = dit.embed(x, t, ctx)
        h = state.x
        for i, block in enumerate(dit.blocks):
            if i not in skip:
                h = block(h, state.e0, state.context, state.context_img, state.rope)
        return dit.run_head(state, h)

    def branch(x, t, context, names):
        return dit(x, t, context)

    slg = g.SLG([1], start=0.1, end=0.9)
    with torch.no_grad():
        cond, uncond_skip, uncond = by_hand(context, []), by_hand(context_null, [1]), by_hand(context_null, [])
        want = ClassifierFreeGuidance(guidance_scale=5.0).forward(cond, uncond_skip).pred
        for passes in (g.Guidance(), g.TwoPass()):
            got = slg.bind(passes)(branch, x, t, context, context_null, 5.0, g.Step(1, 10, dit))
            torch.testing.assert_close(got, want)
            outside = slg.bind(passes)(branch, x, t, context, context_null, 5.0, g.Step(9, 10, dit))
            torch.testing.assert_close(outside, ClassifierFreeGuidance(guidance_scale=5.0).forward(cond, uncond).pred)
    assert not dit.block_wrappers


def count_forwards(pipe, **kwargs):
    batches = []
    handle = pipe.dit.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        out = pipe("a cat", **FAST, **kwargs)
    finally:
        handle.remove()
    return batches, out


def test_one_forward_per_step_without_cfg(pipe):
    assert count_forwards(pipe, guidance_scale=1.0)[0] == [1] * 4
    assert count_forwards(pipe, guidance_scale=5.0, guidance=g.CFG(cfg_steps=2))[0] == [2, 2, 1, 1]
    assert count_forwards(pipe, guidance_scale=5.0, guidance=g.SLG([0], end=1.0, cfg_steps=1))[0] == [2, 1, 1, 1]
    assert count_forwards(pipe, guidance_scale=1.0, negative_prompt="dull", guidance=g.NAG(11.0))[0] == [1] * 4
    assert count_forwards(pipe, guidance_scale=1.0, guidance=g.CFGZeroStar())[0] == [1] * 3  # zero-init: no pass
    pipe.batch_cfg = False
    try:
        assert count_forwards(pipe, guidance_scale=5.0, guidance=g.APG(cfg_steps=3))[0] == [1] * 6 + [1]
    finally:
        pipe.batch_cfg = True


def test_defaults_and_schedules_agree_bit_for_bit(pipe):
    plain = pipe("a cat", **FAST, guidance_scale=5.0)
    assert torch.equal(pipe("a cat", **FAST, guidance_scale=5.0, guidance=g.CFG()), plain)
    a = pipe("a cat", **FAST, guidance_scale=[5.0, 5.0, 1.0, 1.0])
    assert torch.equal(a, pipe("a cat", **FAST, guidance_scale=5.0, guidance=g.CFG(cfg_steps=2)))
    assert pipe("a cat", **FAST, guidance=5.0).equal(plain)  # a number: guidance_scale's alias, as before


def test_slg_keeps_its_own_branch_in_the_step_cache(pipe):
    cache = pipe.enable_cache("teacache", 0.0)  # every step computed; the branches it saw are counted
    try:
        pipe("a cat", **FAST, guidance_scale=5.0, guidance=g.SLG([0], start=0.25, end=0.75))
        assert cache.stats.computed == {"cond": 4, "uncond": 2, "uncond-skip": 2}  # steps 1, 2
    finally:
        pipe.disable_cache()


def test_apg_object_reused_gives_the_same_video(pipe):
    apg = g.APG(momentum=-0.5)
    assert torch.equal(pipe("a cat", **FAST, guidance=apg), pipe("a cat", **FAST, guidance=apg))


@pytest.mark.parametrize("kwargs, words", [
    (dict(guidance=g.CFG(cfg_steps=5)), "cfg_steps must be between 0 and the 4 steps"),
    (dict(guidance=g.SLG([2])), "slg_layers 2 is not a block of this DiT: blocks are 0..1"),
    (dict(guidance=g.SLG([0], start=0.5, end=0.2)), "slg_end"),
    (dict(guidance=g.NAG(11.0)), "nag_scale guides away from a negative prompt: give negative_prompt"),
    (dict(guidance=g.NAG(0.5), negative_prompt="x"), "nag_scale must be >= 1"),
    (dict(guidance=g.APG(momentum=1.5)), "apg_momentum must be in (-1, 1)"),
    (dict(guidance_scale=[5.0, 1.0]), "guidance_scale has 2 values, one per step: give 4"),
    (dict(guidance_scale=[5.0, 50.0, 1.0, 1.0]), "guidance_scale must be in [1, 30]"),
])
def test_bad_settings_refused_in_one_line(pipe, kwargs, words):
    with pytest.raises(ValueError) as err:
        pipe.plan("a cat", **{k: v for k, v in FAST.items() if k != "progress"}, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_request_keys_make_strategies():
    job = parse_job({"prompt": "p", "cfg_zero_star": True, "cfg_steps": 2})
    strategy = pipeline_kwargs(job)["guidance"]
    assert isinstance(strategy, g.CFGZeroStar) and strategy.cfg_steps == 2
    slg = pipeline_kwargs(parse_job({"prompt": "p", "slg_layers": [9, 10], "slg_start": 0.2}))["guidance"]
    assert (slg.layers, slg.start_at, slg.end_at) == ((9, 10), 0.2, 0.9)
    assert pipeline_kwargs(parse_job({"prompt": "p"}))["guidance"] is None
    with pytest.raises(RequestError, match="apg must be true or false"):
        parse_job({"prompt": "p", "apg": 1})
    with pytest.raises(RequestError, match="apg and nag_scale are two guidance variants"):
        pipeline_kwargs(parse_job({"prompt": "p", "apg": True, "nag_scale": 11}))
    with pytest.raises(RequestError, match="nag_tau is a setting of nag_scale"):
        pipeline_kwargs(parse_job({"prompt": "p", "nag_tau": 2.0}))


@pytest.mark.parametrize("argv, words", [
    (["--cfg-steps", "3"], "--cfg-steps must be between 0 and the 2 steps, got 3"),
    (["--slg-layers", "7"], "--slg-layers 7 is not a block of this DiT"),
    (["--nag-scale", "11"], "--nag-scale guides away from a negative prompt: give --negative-prompt"),
    (["--apg", "--cfg-zero-star"], "--cfg-zero-star and --apg are two guidance variants: choose one"),
])
def test_cli_refuses_before_loading(capsys, monkeypatch, argv, words):
    monkeypatch.setattr(WanPipeline, "from_files", lambda *a, **k: pytest.fail("weights loaded"))
    code = main(["generate", "--model", "tiny", "--prompt", "a cat", "--frames", "5", "--steps", "2", "--size",
                 "32x32", "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and words in err, err


def test_cli_runs_a_variant_and_the_metadata_names_it(pipe, tmp_path, capsys):
    code = main(["generate", "--model", "tiny", "--prompt", "a cat", "--frames", "5", "--steps", "2", "--size",
                 "32x32", "--quiet", "--negative-prompt", "dull", "--guidance", "1", "--nag-scale", "11",
                 "-o", str(tmp_path / "v.mp4")])
    assert code == 0, capsys.readouterr().err
    video = pipe("a cat", negative_prompt="dull", guidance_scale=1.0, guidance=g.NAG(11.0),
                 **{**FAST, "output_type": "video"})
    assert video.metadata["guidance_variant"] == {"name": "nag", "scale": 11.0, "tau": 2.5, "alpha": 0.25}
