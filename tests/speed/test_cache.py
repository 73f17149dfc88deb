"""Step caching (TeaCache, MagCache) on the tiny model: threshold 0 changes nothing, a real
threshold skips block passes (counted with a hook, not the cache's own stats) at a bounded
distance from the plain run, and the cond and uncond branches keep their own state."""

import numpy as np
import pytest
import torch

from wanx.cli import main
from wanx.models.transformer import DiTState
from wanx.speed.cache import MAGCACHE_RATIOS, StepCache, resample_ratios
from wanx.video import read_video

REQUEST = dict(prompt="a cat walks on the grass", width=64, height=48, num_frames=5, num_inference_steps=30,
               output_type="latents", seed=3, progress=False)


@pytest.fixture(scope="module")
def pipe():
    from wanx.pipeline import WanPipeline

    return WanPipeline.from_pretrained("tiny")


@pytest.fixture(scope="module")
def calibration(pipe, tmp_path_factory):
    """The tiny model's own calibration (the published ones are for real model sizes)."""
    import json

    from wanx.speed.cache import calibrate

    result = calibrate(pipe, ["a cat walks on the grass", "a red car on a road"], num_inference_steps=20,
                       width=64, height=48, num_frames=5, seed=0, progress=False)
    path = tmp_path_factory.mktemp("calibration") / "tiny.json"
    path.write_text(json.dumps(result), encoding="utf-8")
    assert len(result["teacache"]) == 5 and len(result["magcache"]) == 40 and result["magcache"][:2] == [1.0, 1.0]
    return path


def block_passes(pipe, **request):
    calls = []
    hook = pipe.dit.blocks[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        out = pipe(**{**REQUEST, **request})
    finally:
        hook.remove()
    return out, sum(calls)  # batch rows through the first block: one per branch and step computed


def test_threshold_zero_is_the_plain_run(pipe, tmp_path):
    pipe.disable_cache()
    base, plain_passes = block_passes(pipe)
    assert plain_passes == 2 * 30  # cond + uncond, 30 steps
    for kind in ("teacache", "magcache"):
        pipe.enable_cache(kind, 0.0)
        out, passes = block_passes(pipe)
        assert passes == plain_passes and torch.equal(out, base), kind
    pipe.disable_cache()
    # the CLI: the same frames as the plain run
    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "64x48", "--frames", "5", "--steps", "6",
              "--seed", "1", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*common, "--teacache", "0", "-o", str(tmp_path / "tea.mp4")]) == 0
    assert main([*common, "--magcache", "0", "-o", str(tmp_path / "mag.mp4")]) == 0
    plain = read_video(tmp_path / "plain.mp4").frames
    assert np.array_equal(read_video(tmp_path / "tea.mp4").frames, plain)
    assert np.array_equal(read_video(tmp_path / "mag.mp4").frames, plain)
    import json

    import av

    with av.open(str(tmp_path / "tea.mp4")) as container:  # the settings travel with the video
        assert json.loads(container.metadata["cache"]) == {"kind": "teacache", "threshold": 0.0, "computed": 12,
                                                           "skipped": 0}


@pytest.mark.parametrize("kind, threshold", [("teacache", 0.2), ("magcache", 0.12)])
def test_a_threshold_skips_block_passes_within_a_bound(pipe, calibration, kind, threshold):
    pipe.disable_cache()
    base, plain = block_passes(pipe)
    cache = pipe.enable_cache(kind, threshold, calibration=calibration)
    out, passes = block_passes(pipe)
    pipe.disable_cache()
    assert passes < 0.75 * plain, (passes, plain)  # measured: teacache 0.2 26/60, magcache 0.12 22/60
    assert passes == cache.stats.total_computed
    distance = float((out - base).norm() / base.norm())
    assert 0 < distance < 0.05, distance  # measured 3e-3 .. 1.4e-2 relative (latents)


def test_batched_and_separate_guidance_agree_under_a_cache(pipe, calibration):
    """The same decisions and residuals per branch whether cond and uncond share a batch."""
    results = []
    for batched in (True, False):
        pipe.batch_cfg = batched
        cache = pipe.enable_cache("teacache", 0.2, calibration=calibration)
        results.append((pipe(**REQUEST), cache.stats))
    pipe.batch_cfg = True
    pipe.disable_cache()
    (a, stats_a), (b, stats_b) = results
    assert stats_a == stats_b and stats_a.total_skipped > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def loop_state(x, e, e0, context) -> DiTState:
    """What the block loop gets (no image context, no RoPE tables: these blocks use neither)."""
    return DiTState(x, e, e0, context, None, None, (1, 1, 1))


def test_each_branch_adds_its_own_residual():
    """A block stack that adds +1 to cond rows and -1 to uncond rows: on a skipped step each row
    must get its own branch's residual back (mixed state would swap or average them)."""
    class Config:
        model_type, dim, num_layers = "t2v", 1536, 30

    def run(state):
        x, context = state.x, state.context
        return x + context[:, :1, :1]  # the context carries each row's offset

    cache = StepCache("magcache", 10.0, magcache_k=5, retention=0.0, quiet=True)
    cache.start(4, Config, 480, 832)
    x = torch.zeros(2, 3, 1)
    context = torch.tensor([1.0, -1.0]).view(2, 1, 1)
    e = e0 = torch.zeros(1, 6, 1)
    cache.at(0, ("cond", "uncond"))
    first = cache(run, loop_state(x, e, e0, context))
    cache.at(1, ("cond", "uncond"))
    skipped = cache(run, loop_state(x + 5, e, e0, torch.zeros_like(context)))  # a skip ignores the new context
    assert cache.stats.skipped == {"cond": 1, "uncond": 1}
    assert torch.equal(first[:, 0, 0], torch.tensor([1.0, -1.0]))
    assert torch.equal(skipped[:, 0, 0], torch.tensor([6.0, 4.0]))
    # separate calls (unbatched guidance), uncond first: still each branch's own residual
    cache.at(2, ("uncond",))
    assert float(cache(run, loop_state(x[:1], e, e0, torch.zeros(1, 1, 1)))[0, 0, 0]) == -1.0
    cache.at(2, ("cond",))
    out = cache(run, loop_state(x[:1], e, e0, torch.zeros(1, 1, 1)))
    assert float(out[0, 0, 0]) == 1.0  # cond skipped again: its residual (+1), not uncond's


def test_only_the_rows_that_run_go_through_the_blocks():
    class Config:
        model_type, dim, num_layers = "t2v", 1536, 30

    rows = []

    def run(state):
        x, context = state.x, state.context
        rows.append(x.shape[0])
        return x + context[:, :1, :1]

    cache = StepCache("magcache", 10.0, magcache_k=5, retention=0.0, quiet=True)
    cache.start(3, Config, 480, 832)
    context = torch.tensor([1.0, -1.0]).view(2, 1, 1)
    cache.at(0, ("cond",))  # only cond has a residual yet
    cache(run, loop_state(torch.zeros(1, 3, 1), None, torch.zeros(1, 6, 1), context[:1]))
    cache.at(1, ("cond", "uncond"))
    out = cache(run, loop_state(torch.zeros(2, 3, 1), None, torch.zeros(1, 6, 1), context))
    assert rows == [1, 1]  # the second call ran the uncond row alone
    assert torch.equal(out[:, 0, 0], torch.tensor([1.0, -1.0]))


def test_published_tables_resample_and_uncalibrated_models_say_so(pipe, capsys, monkeypatch):
    import wanx.speed.cache as cache_module

    monkeypatch.setattr(cache_module, "_NOTICED", set())  # said once per process: start afresh
    table = MAGCACHE_RATIOS["t2v-1.3B"]
    assert len(table) == 100
    assert resample_ratios(table, 50) == table
    short = resample_ratios(table, 30)
    assert len(short) == 60 and short[:2] == [1.0, 1.0] and short[-2:] == table[-2:]
    pipe.enable_cache("magcache")
    pipe(**{**REQUEST, "num_inference_steps": 3})
    pipe(**{**REQUEST, "num_inference_steps": 3})
    pipe.enable_cache("magcache")  # a new cache, the same process: not said again
    pipe(**{**REQUEST, "num_inference_steps": 3})
    pipe.disable_cache()
    err = capsys.readouterr().err
    assert err.count("no published calibration for this model; using Wan2.1 t2v-1.3B's") == 1


def test_calibration_file_is_found_in_the_model_folder_and_bad_input_stops(calibration, tmp_path, capsys):
    import shutil

    from wanx.pipeline import WanPipeline
    from wanx.speed.cache import CALIBRATION_FILE
    from wanx.tiny import tiny_model_dir

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    shutil.copy(calibration, folder / CALIBRATION_FILE)
    pipe = WanPipeline.from_pretrained(folder, cache="teacache", cache_threshold=0.2)
    assert pipe.step_cache.calibration is not None
    pipe(**{**REQUEST, "num_inference_steps": 8})
    assert "no published calibration" not in capsys.readouterr().err

    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "64x48", "--frames", "5", "--quiet",
              "-o", str(tmp_path / "x.mp4")]
    assert main([*common, "--teacache", "0.1", "--magcache", "0.1"]) == 2
    assert "choose one step cache" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    assert main([*common, "--teacache", "--cache-calibration", str(bad)]) == 2
    assert "not a cache calibration file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--teacache", "-1"])
    assert not (tmp_path / "x.mp4").exists()


def test_batched_guidance_embeds_the_time_once_and_equals_two_passes(pipe):
    """cond and uncond in one batch of two: the time embedding is computed for one row and
    broadcast, and the result equals two forwards to 1e-6 of its scale."""
    from tests.loading.test_load_model import dit_inputs

    dit = pipe.dit
    x, t, context, _ = dit_inputs(dit.config)
    x2, context2 = torch.cat([x, x * 0.5]), torch.cat([context, context.flip(1)])
    calls = []
    hook = dit.time_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with torch.no_grad():
        once = dit(x2, t.reshape(1), context2)
        per_row = dit(x2, t.reshape(1).expand(2), context2)
    hook.remove()
    assert calls == [1, 2]
    # the same numbers; a 1-row and a 2-row matmul may take different BLAS kernels
    assert float((once - per_row).abs().max()) <= 1e-6 * float(per_row.abs().max())
    pipe.disable_cache()
    results = []
    for batched in (True, False):
        pipe.batch_cfg = batched
        results.append(pipe(**REQUEST))
    pipe.batch_cfg = True
    a, b = results
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


def test_cache_composes_with_streaming_fp8_and_a_live_lora(calibration, tmp_path):
    """The cache at the loop seam, the streamer at the block hooks, FP8 layers and a live LoRA
    inside the blocks: each pair gives what the parts give alone."""
    from safetensors.torch import save_file

    from wanx.lora import apply_lora
    from wanx.memory.fp8 import quantize_fp8
    from wanx.memory.streaming import BlockStreamer
    from wanx.pipeline import WanPipeline

    def run(pipe):
        pipe.enable_cache("teacache", 0.2, calibration=calibration)
        out = pipe(**REQUEST)
        stats = pipe.step_cache.stats
        pipe.disable_cache()
        return out, stats

    plain = WanPipeline.from_pretrained("tiny")
    reference, stats = run(plain)
    assert stats.total_skipped > 0
    streamed = WanPipeline.from_pretrained("tiny")
    streamer = BlockStreamer(streamed.dit, "cpu", 0)  # every block copied in for its forward
    out, streamed_stats = run(streamed)
    streamer.remove()
    assert streamed_stats == stats
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    dim = plain.dit.config.dim
    lora = {}
    for block in range(2):
        key = f"diffusion_model.blocks.{block}.self_attn.q"
        lora[f"{key}.lora_A.weight"] = torch.randn(4, dim, generator=g) * 0.1
        lora[f"{key}.lora_B.weight"] = torch.randn(dim, 4, generator=g) * 0.1
    path = tmp_path / "style.safetensors"
    save_file(lora, str(path))
    apply_lora(plain.dit, path, 1.0, fuse=False)  # live
    with_lora, _ = run(plain)
    assert float((with_lora - reference).abs().max()) > 1e-4  # the LoRA acts under the cache
    fused = WanPipeline.from_pretrained("tiny")
    apply_lora(fused.dit, path, 1.0, fuse=True)
    fused_out, _ = run(fused)
    torch.testing.assert_close(with_lora, fused_out, rtol=1e-4, atol=1e-5)

    fp8 = WanPipeline.from_pretrained("tiny")
    quantize_fp8(fp8.dit, compute_dtype=torch.float32)
    fp8_out, fp8_stats = run(fp8)
    assert fp8_stats.total_skipped > 0
    assert float((fp8_out - reference).norm() / reference.norm()) < 0.1  # FP8's own error, not the cache's
