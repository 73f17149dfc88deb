"""Continuation (`extend=`, `wanx generate --extend`): a video's last frames as known latent
frames at the start of a new run, from the side file wanx writes next to its mp4s (no VAE
encode) or encoded once; per family: T2V re-noised to each step's level, TI2V-5B clean at
timestep 0, I2V/FLF2V in y's mask. Tiny models, 32x32, one or two steps."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from wanx.cli import main
from wanx.pipeline import WanPipeline, plan_request
from wanx.pipeline import extend as ext
from wanx.pipeline.conditioning import conditioning_for
from wanx.video import Video, read_video, to_unit

SMALL = dict(height=32, width=32, num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def t2v():
    return WanPipeline.from_pretrained("tiny", device="cpu", dtype=torch.float32)


def saved(pipe, path, seed=1, **kwargs):
    """A 9-frame video made by `pipe`, saved with its side file as `wanx generate` does."""
    video = pipe("a cat", num_frames=9, seed=seed, **{**SMALL, **kwargs})
    video.save(path)
    ext.write_side_file(path, video, pipe.vae.config)
    return video


class EncodeCount:
    """Counts the VAE's encode calls (the real encode runs)."""

    def __init__(self, vae, monkeypatch):
        self.calls, encode = 0, vae.encode

        def counted(*args, **kwargs):
            self.calls += 1
            return encode(*args, **kwargs)

        monkeypatch.setattr(vae, "encode", counted)


def test_a_wanx_video_continues_from_its_stored_latents_and_any_other_is_encoded_once(t2v, tmp_path, monkeypatch):
    path = tmp_path / "old.mp4"
    old = saved(t2v, path)
    count = EncodeCount(t2v.vae, monkeypatch)
    new = t2v("a cat", extend=path, num_frames=4, seed=2, **SMALL)
    assert count.calls == 0  # the side file's latents: no VAE round trip
    as_read = read_video(path).frames
    assert len(new) == 9 + 4 and np.array_equal(new.frames[:9], as_read)  # the old video, then the new frames
    assert new.fps == old.fps and new.size == (32, 32)
    assert new.metadata["extends"] == "old.mp4" and new.metadata["overlap_frames"] == 9

    # one frame of overlap: a stored latent frame holds four, the first of a clip one: encoded instead
    assert t2v.plan("a cat", extend=path, extend_frames=1, num_frames=4).extend.stored is None
    assert t2v.plan("a cat", extend=path, extend_frames=5, num_frames=4).extend.stored.shape[1] == 2

    in_memory = t2v("a cat", extend=old, num_frames=4, seed=2, output_type="latents", **SMALL)  # a Video: its latents
    assert count.calls == 0 and torch.equal(in_memory[0, :, :3], old.latents[:, -3:])

    Video(as_read, fps=old.fps).save(path, quality=30)  # the video edited: its side file's sha256 no longer matches
    t2v("a cat", extend=path, num_frames=4, seed=2, output_type="latents", **SMALL)
    assert count.calls == 1  # its last frames encoded, once

    ext.side_file(path).unlink()  # a video wanx did not make (or lost its side file): encoded once
    t2v("a cat", extend=path, num_frames=4, seed=2, output_type="latents", **SMALL)
    assert count.calls == 2


def test_t2v_known_frames_follow_the_noise_level_and_end_as_the_stored_latents(t2v, tmp_path):
    path = tmp_path / "old.mp4"
    saved(t2v, path)
    known = ext.stored_latents(path, 32, 32, (16, 4, 8), 3)
    distances = []
    latents = t2v("a cat", extend=path, num_frames=4, seed=2, output_type="latents", sampler="euler",
                  callback=lambda i, n, x: distances.append(float((x[0, :, :3] - known).abs().mean())), **SMALL)
    assert distances[0] > 0.1 and distances[-1] == 0  # re-noised to each step's sigma, clean at the end
    assert torch.equal(latents[0, :, :3], known)


def test_t2v_renoise_and_clean_are_both_held(t2v, tmp_path):
    """The measured alternative (clean prefix at timestep 0) is a working mixin too."""
    path = tmp_path / "old.mp4"
    saved(t2v, path)
    known = ext.stored_latents(path, 32, 32, (16, 4, 8), 3)
    plan = t2v.plan("a cat", extend=path, num_frames=4, height=32, width=32)
    assert ext.extended(conditioning_for(plan.spec), "clean").__mro__[1] is ext.CleanPrefix
    cond = ext.extended(conditioning_for(plan.spec), "clean")(plan)
    cond._known = known[None]
    t = cond.timesteps(torch.tensor([900.0]), (1, 16, 4, 4, 4), (1, 2, 2))
    assert t.shape == (1, 16) and t[0, :12].eq(0).all() and t[0, 12:].eq(900).all()


def test_ti2v_holds_the_known_latents_bit_for_bit_at_timestep_0(tmp_path, monkeypatch):
    pipe = WanPipeline.from_pretrained("tiny-ti2v", device="cpu", dtype=torch.float32)
    path = tmp_path / "old.mp4"
    old = saved(pipe, path, num_inference_steps=1)
    seen = []
    forward = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda x, t, *a, **k: seen.append(t) or forward(x, t, *a, **k))
    latents = pipe("a cat", extend=path, num_frames=4, seed=2, output_type="latents", **SMALL)
    assert torch.equal(latents[0, :, :3], old.latents[:, -3:])  # the stored latents, exactly
    (t,) = {tuple(x.shape) for x in seen}
    tokens = latents.shape[3] * latents.shape[4] // 4  # per latent frame: the 2x2 patch
    assert all(x[0, :3 * tokens].eq(0).all() and x[0, 3 * tokens:].gt(0).all() for x in seen)


@pytest.mark.parametrize("name", ["tiny-i2v", "tiny-flf2v"])
def test_i2v_mask_covers_the_known_frames(name, tmp_path, monkeypatch):
    pipe = WanPipeline.from_pretrained(name, device="cpu", dtype=torch.float32)
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    last = {"last_image": image} if name == "tiny-flf2v" else {}
    path = tmp_path / "old.mp4"
    old = saved(pipe, path, image=image, num_inference_steps=1, **last)
    seen = {}
    forward = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda x, t, c, **k: seen.setdefault("in", k) and forward(x, t, c, **k))
    pipe("a cat", extend=path, num_frames=4, seed=2, output_type="latents", **{**SMALL, "num_inference_steps": 1},
         **last)
    y = seen["in"]["y"][0]  # [4 + 16, F', h, w]
    assert y[:4, :3].eq(1).all()  # the overlap: 9 frames, 3 latent frames
    assert y[:4, 3:-1].eq(0).all() and y[:3, -1].eq(0).all()
    assert y[3, -1].eq(1 if last else 0).all()  # FLF2V: its last frame, the last of latent frame -1's four
    assert torch.equal(y[4:, :3], old.latents[:, -3:])  # the stored latents in place
    clip = pipe.image_encoder(to_unit(read_video(path).frames[-1])[None])  # CLIP sees the last old frame
    assert torch.allclose(seen["in"]["clip_features"][:1, :clip.shape[1]], clip)


# -- bad input: one line each, before any model work -------------------------------------


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    Video((np.random.default_rng(0).random((9, 32, 32, 3)) * 255).astype(np.uint8)).save(path)
    return path


def plan(model_type="t2v", **request):
    return plan_request(model_type, "x", height=request.pop("height", None), width=request.pop("width", None),
                        **request)


def test_bad_extend_inputs_are_one_line_each(clip, tmp_path):
    image = tmp_path / "frame.png"
    image.write_bytes(b"not really")
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    cases = [
        (dict(extend=image), "not a video"),
        (dict(extend=fake), "not a readable video"),
        (dict(extend=tmp_path / "missing.mp4"), "no such video file"),
        (dict(extend=clip, height=48, width=48), "is 32x32: the new frames take its size; give 32x32"),
        (dict(extend=clip, extend_frames=13), "has 9 frames, fewer than the 13-frame overlap"),
        (dict(extend=clip, extend_frames=4), r"must be 4k\+1"),
        (dict(extend=clip, num_frames=9), "counts the new frames: a multiple of 4"),
        (dict(extend=clip, video=clip), "not both"),
        (dict(extend=clip, image=image), "not both"),
        (dict(extend_frames=5), "give that too"),
    ]
    for request, words in cases:
        with pytest.raises(ValueError, match=words) as err:
            plan(**request)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not both"):  # TI2V-5B: the old frames are the start, not an image
        plan("ti2v", extend=clip, image=image)


def test_a_good_request_is_planned_at_the_video_size_and_rate(clip):
    planned = plan(extend=clip, num_frames=8)
    assert (planned.width, planned.height, planned.num_frames, planned.fps) == (32, 32, 9 + 8, 16)
    assert planned.extend.stored is None and planned.extend.latent_frames == 3
    assert plan(extend=clip, extend_frames=5, num_frames=4).num_frames == 9
    assert plan("i2v", extend=clip).task == "i2v"  # the last old frame is the I2V image


# -- wanx generate -----------------------------------------------------------------------


def test_generate_writes_the_side_file_and_extends_from_it(tmp_path, capsys):
    out = tmp_path / "a.mp4"
    fast = ["--model", "tiny", "--prompt", "x", "--steps", "1", "--size", "32x32", "--quiet"]
    assert main(["generate", *fast, "--frames", "5", "--seed", "1", "-o", str(out)]) == 0
    side = tmp_path / "a.latents.safetensors"
    with safe_open(str(side), "pt") as fh:
        meta, latents = fh.metadata(), fh.get_tensor("latents")
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (meta["frames"], meta["width"], meta["height"], meta["z_dim"]) == ("5", "32", "32", "16")
    assert latents.shape == (16, 2, 4, 4)  # all latent frames of a 5-frame video (at most 8 kept)
    assert not list(tmp_path.glob(".*partial"))
    assert side.stat().st_mode == out.stat().st_mode  # shared as the video is

    second = tmp_path / "b.mp4"
    assert main(["generate", *fast, "--extend", str(out), "--extend-frames", "5", "--frames", "4", "-o",
                 str(second)]) == 0
    video = read_video(second)
    assert len(video) == 5 + 4
    import av

    with av.open(str(second)) as container:
        assert json.loads(container.metadata["comment"])["extends"] == "a.mp4"


def test_a_prompts_line_extends_a_video_beside_the_prompts_file(tmp_path):
    from wanx.cli import _jobs, build_parser
    from wanx.request import pipeline_kwargs

    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text('{"prompt": "on", "extend": "clip.mp4", "extend_frames": 5, "frames": 8}\n', encoding="utf-8")
    (job,) = _jobs(build_parser().parse_args(["generate", "--model", "tiny", "--prompts", str(prompts)]))
    request = pipeline_kwargs(job)
    assert (request["extend"], request["extend_frames"], request["num_frames"]) == (str(tmp_path / "clip.mp4"), 5, 8)


def test_demo_model_continues_without_a_jump_at_the_seam(tmp_path):
    """The seam metric on the trained demo model (T2V, the chosen re-noised prefix, from the
    stored latents): the mean |frame difference| between the last old frame and the first new
    one is within 1.5x the mean difference of the other neighbouring frames
    (bench/extend_seam.py, 3 prompts at 20 steps: 0.84 on average, 0.67-1.01; an unconditioned
    second video: 2.41; without the prefix held this test's seam is 2.6x)."""
    pipe = WanPipeline.from_pretrained("demo", device="cpu", dtype=torch.float32)
    prompt, path = "a red circle moving left on a black background", tmp_path / "old.mp4"
    old = pipe(prompt, seed=7, num_inference_steps=6, progress=False)
    old.save(path)
    ext.write_side_file(path, old, pipe.vae.config)
    new = pipe(prompt, seed=107, num_inference_steps=6, extend=path, progress=False)
    diffs = np.abs(np.diff(new.frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    seam, inside = diffs[len(old) - 1], np.delete(diffs, len(old) - 1).mean()
    assert seam <= 1.5 * inside, (seam, inside)
