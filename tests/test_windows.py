"""Context windows (wanx.pipeline.windows): where the windows sit, how they blend, and that
windowing is exact where it should be: one window is the plain run, windows that do not
overlap are independent runs."""

import pytest
import torch

from wanx.pipeline import ContextWindows, WanPipeline, Windows
from wanx.pipeline.plan import RequestError


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny", device="cpu", dtype=torch.float32)


SMALL = dict(height=32, width=48, steps=3, progress=False, output_type="latents")


@pytest.mark.parametrize("schedule", ["static", "uniform", "looped"])
@pytest.mark.parametrize("total,size,overlap", [(21, 9, 2), (6, 3, 0), (30, 21, 4), (5, 3, 1)])
def test_every_frame_is_covered_at_every_step(schedule, total, size, overlap):
    windows = Windows(size, overlap, total, schedule)
    for step in range(6):
        placed = windows.at(step)
        assert all(len(w) == size and len(set(w)) == size for w in placed)
        assert set().union(*placed) == set(range(total))
        if schedule != "looped":
            assert all(0 <= f < total and w == sorted(w) for w in placed for f in w)


def test_uniform_moves_the_seams_from_step_to_step():
    windows = Windows(9, 2, 21, "uniform")
    starts = [[w[0] for w in windows.at(step)] for step in range(3)]
    assert starts[0] != starts[1] != starts[2]  # the grid slides half a stride (3 of 7 frames) each step
    assert [s % 7 for s in starts[1][1:-1]] == [3, 3] and [s % 7 for s in starts[2][1:-1]] == [6]
    assert starts[0] == [w[0] for w in Windows(9, 2, 21, "static").at(0)]


def test_linear_blend_ramps_only_where_windows_meet():
    windows = Windows(5, 2, 8, "static")
    first, last = windows.at(0)
    assert first == [0, 1, 2, 3, 4] and last == [3, 4, 5, 6, 7]
    assert windows.weight(first).tolist() == pytest.approx([1, 1, 1, 2 / 3, 1 / 3])
    assert windows.weight(last).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    # across the overlap the two ramps sum to 1: the blend is a convex mix, no frame brightens
    assert (windows.weight(first)[3:] + windows.weight(last)[:2]).tolist() == pytest.approx([1, 1])
    assert Windows(5, 2, 8, "static", "pyramid").weight(first).tolist() == [1, 2, 3, 2, 1]


def test_blending_is_a_weighted_mean_of_the_windows():
    windows = Windows(5, 2, 8, "static")
    x = torch.randn(1, 2, 8, 3, 3)
    out = windows.run(0, x, lambda part, frames: torch.full_like(part, float(frames[0])))  # window 0 says 0, window 3 says 3
    per_frame = out[0, 0, :, 0, 0]
    assert per_frame[:3].tolist() == [0, 0, 0] and per_frame[5:].tolist() == [3, 3, 3]
    assert per_frame[3].item() == pytest.approx(3 * (1 / 3) / (2 / 3 + 1 / 3))
    assert per_frame[4].item() == pytest.approx(3 * (2 / 3) / (1 / 3 + 2 / 3))


def test_one_window_over_the_whole_video_is_the_prediction_itself():
    x = torch.randn(1, 4, 6, 3, 5)
    windows = Windows(6, 0, 6, "static")

    def predict(part, frames):
        return part * 1.37 + 0.1

    assert torch.equal(windows.run(0, x, predict), predict(x, list(range(6))))


def test_a_window_as_long_as_the_video_is_the_plain_run(pipe):
    plain = pipe("a cat", seed=5, num_frames=17, **SMALL)
    windowed = pipe("a cat", seed=5, num_frames=17, context_windows=ContextWindows(17, 8), **SMALL)
    assert torch.equal(plain, windowed)


def test_windows_that_do_not_overlap_are_independent_runs(pipe):
    # 21 frames = 6 latent frames: two windows of 9 frames (3 latent frames) side by side; the
    # DiT never sees both at once, and every other op of a step is per element
    noise = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(3))
    windowed = pipe("a cat", latents=noise, num_frames=21, context_windows=ContextWindows(9, 0), **SMALL)
    halves = [pipe("a cat", latents=noise[:, :, i:i + 3].contiguous(), num_frames=9, **SMALL) for i in (0, 3)]
    torch.testing.assert_close(windowed, torch.cat(halves, dim=2), rtol=0, atol=1e-6)


def test_overlapping_windows_are_seen_in_the_metadata_and_blend(pipe):
    video = pipe("a cat", seed=2, num_frames=33, height=32, width=48, steps=2, progress=False,
                 context_windows=ContextWindows(17, 8, "uniform", "pyramid"))
    assert video.frames.shape[0] == 33
    assert video.metadata["context_windows"] == {"frames": 17, "overlap": 8, "schedule": "uniform",
                                                 "blend": "pyramid"}


@pytest.mark.parametrize("task", ["tiny-i2v", "tiny-ti2v"])
def test_image_conditioning_sits_in_the_first_window(task, tmp_path):
    from PIL import Image

    image = tmp_path / "first.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(image)
    pipe = WanPipeline.from_pretrained(task, device="cpu", dtype=torch.float32)
    size = dict(height=32, width=32) if task == "tiny-i2v" else dict(height=64, width=64)
    out = pipe("a cat", image=str(image), seed=1, num_frames=25, steps=2, progress=False, output_type="latents",
               context_windows=ContextWindows(9, 4), **size)
    assert out.shape[2] == 7 and torch.isfinite(out).all()
    if task == "tiny-ti2v":  # the image's latent frame is held in the first window, not in later ones
        first = pipe.vae.encode(pipe.plan("a cat", image=str(image), **size).image[:, None][None]).float()
        torch.testing.assert_close(out[:, :, :1], first)


@pytest.mark.parametrize("request_, field", [
    (ContextWindows(17, 20), "context_overlap"),   # overlap >= window
    (ContextWindows(17, 6), "context_overlap"),    # not whole latent frames
    (ContextWindows(18, 8), "context_frames"),     # not 4k+1
    (ContextWindows(41, 8), "context_frames"),     # longer than the video
    (ContextWindows(17, 8, "sliding"), "context_schedule"),
    (ContextWindows(17, 8, blend="cosine"), "context_blend"),
])
def test_bad_windows_are_refused_before_any_work(pipe, request_, field):
    with pytest.raises(RequestError) as err:
        pipe.plan("a cat", num_frames=33, context_windows=request_)
    assert err.value.field == field and "\n" not in str(err.value)


def test_a_step_cache_keeps_each_windows_state_apart(pipe):
    cache = pipe.enable_cache("magcache", threshold=10.0, retention=0.2)  # skips whatever it may
    try:
        out = pipe("a cat", seed=4, num_frames=33, steps=6, height=32, width=48, progress=False,
                   output_type="latents", context_windows=ContextWindows(17, 8))
    finally:
        pipe.disable_cache()
    assert torch.isfinite(out).all()
    windows = {name.split("@")[1] for name in cache.stats.computed}
    assert windows == {"0", "3", "4"}  # 9 latent frames, windows of 5, stride 3: 0, 3 and the last flush at 4
    for start in windows:  # each window computes its first step and may skip later ones on its own
        names = {n for n in (*cache.stats.computed, *cache.stats.skipped) if n.endswith(f"@{start}")}
        assert names == {f"cond@{start}", f"uncond@{start}"}
        assert sum(cache.stats.computed.get(n, 0) + cache.stats.skipped.get(n, 0) for n in names) == 2 * 6
    assert cache.stats.total_skipped > 0


def test_generate_with_context_windows(tmp_path, capsys):
    from wanx.cli import main
    from wanx.video import read_video

    out = tmp_path / "long.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "--size", "48x32", "--frames", "33",
                 "--steps", "2", "--context-frames", "17", "--context-overlap", "8", "-o", str(out)]) == 0
    assert "context windows: 3 of 5 latent frames (17 frames) over 9 (33 frames)" in capsys.readouterr().err
    import json

    import av

    assert len(read_video(out)) == 33
    with av.open(str(out)) as container:
        assert json.loads(container.metadata["context_windows"])["frames"] == 17


def test_window_settings_without_a_window_are_refused(tmp_path, capsys):
    from wanx.cli import main

    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "--frames", "33", "--context-overlap", "8",
                 "-o", str(tmp_path / "x.mp4")]) == 2
    assert "--context-overlap is a setting of --context-frames" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_color_matching_holds_later_frames_to_the_first_window():
    from wanx.pipeline.windows import match_colors

    x = torch.randn(1, 4, 12, 5, 5, generator=torch.Generator().manual_seed(0))
    drifting = x + torch.linspace(0, 3, 12).view(1, 1, -1, 1, 1)  # brightness creeping up frame by frame
    matched = match_colors(drifting, 3)
    assert torch.equal(matched[:, :, :3], drifting[:, :, :3])  # the reference window as it was
    late = matched[:, :, 6:].mean(dim=(0, 2, 3, 4))
    first = drifting[:, :, :3].mean(dim=(0, 2, 3, 4))
    assert (late - first).abs().max() < 0.3 < (drifting[:, :, 6:].mean(dim=(0, 2, 3, 4)) - first).abs().min()
    assert torch.equal(match_colors(drifting, 12), drifting)  # one window: nothing to hold


def test_seam_and_drift_measures():
    import numpy as np

    from wanx.pipeline.windows import color_drift, seam_frames, seam_ratio

    assert seam_frames(Windows(5, 2, 8, "static"), 4) == [8, 16]  # window 2 starts at latent 3, window 1 ends after 4
    frames = np.zeros((21, 4, 4, 3), dtype=np.uint8)
    frames[9:] = 40  # one jump, between frames 8 and 9
    seam, inside, ratio = seam_ratio(frames, [8])
    assert seam == 40 and inside == 0 and ratio > 1e6
    assert seam_ratio(frames, [3])[2] == 0
    drift = color_drift(frames, 5)
    assert drift["mean"] == 40 and drift["runs"] == 4


def test_generate_with_color_matching_says_so(pipe):
    video = pipe("a cat", seed=2, num_frames=33, height=32, width=48, steps=2, progress=False,
                 context_windows=ContextWindows(17, 8, color_match=True))
    assert video.metadata["context_windows"]["color_match"] is True


def test_prompts_over_time_each_window_reads_its_own(pipe):
    seen = []
    real = pipe.dit.forward

    def spy(x, t, context, **kw):
        seen.append(context[0, :2, :3].clone())
        return real(x, t, context, **kw)

    pipe.dit.forward = spy
    try:
        out = pipe(["a cat", "a dog"], seed=2, num_frames=33, steps=1, height=32, width=48, progress=False,
                   output_type="latents", guidance_scale=1.0, context_windows=ContextWindows(17, 8))
        texts = pipe.text_encoder.encode(["a cat", "a dog"])[0][:, :2, :3]
    finally:
        del pipe.dit.forward
    assert torch.isfinite(out).all() and len(seen) == 3  # windows at latent 0, 3, 4 of 9: middles 2, 5, 6
    assert torch.equal(seen[0], texts[0]) and torch.equal(seen[1], texts[1]) and torch.equal(seen[2], texts[1])


def test_a_list_of_prompts_needs_windows(pipe):
    with pytest.raises(RequestError, match="needs context windows"):
        pipe.plan(["a cat", "a dog"], num_frames=33)
    with pytest.raises(RequestError, match="non-empty strings"):
        pipe.plan(["a cat", ""], num_frames=33, context_windows=ContextWindows(17, 8))


def test_windows_on_two_experts_and_on_streamed_blocks():
    moe = WanPipeline.from_pretrained("tiny-moe", device="cpu", dtype=torch.float32)
    request = dict(seed=3, num_frames=33, height=32, width=48, steps=4, progress=False, output_type="latents",
                   context_windows=ContextWindows(17, 8, "uniform"))
    resident = moe("a cat", **request)
    assert moe.last_experts["high_noise_steps"] > 0 and moe.last_experts["low_noise_steps"] > 0
    streamed = WanPipeline.from_pretrained("tiny-moe", device="cpu", dtype=torch.float32, offload="blocks",
                                           vram_budget=0)
    # on a CPU a streamed block computes on copies of the same weights (other memory may take
    # other BLAS kernels): the same latents to float32 rounding
    torch.testing.assert_close(streamed("a cat", **request), resident, rtol=1e-5, atol=1e-5)
