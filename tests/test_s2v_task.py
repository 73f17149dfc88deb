"""Wan2.2-S2V as a task: the clip-after-clip loop against the official `WanS2V.generate`
restated here (its tensor plumbing, on our DiT/VAE modules), the CLI end to end, and the
refusals, on the tiny-s2v set (64x64, 8 frames a clip)."""

from __future__ import annotations


import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wanx.audio import encode_audio, read_audio
from wanx.pipeline import WanPipeline
from wanx.pipeline.conditioning import s2v as s2v_mod
from wanx.sampling import schedule

RATE = 16_000


def _write_wav(path, seconds: float, rate: int = RATE):
    t = np.arange(round(seconds * rate)) / rate
    samples = (0.5 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((samples[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _write_video(path, frames: int, fps: int, height: int, width: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"crf": "0"}
        for _ in range(frames):
            image = (rng.rand(height, width, 3) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny-s2v", device="cpu")  # the official loop below is restated on the CPU


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s2v-inputs")
    ref = folder / "ref.png"
    # 96 high, 80 wide: resized to 76x64 and cut to 64x64 (rows 6..70)
    Image.fromarray((np.random.RandomState(1).rand(96, 80, 3) * 255).astype(np.uint8)).save(ref)
    return {"ref": ref, "audio": _write_wav(folder / "a.wav", 0.9),  # 0.9 s: 2 clips of 8 frames
            # 32 fps, 10 frames: 5 at 16 fps, fewer than 2 clips' 16 (padded); 48x80: upscaled, cut
            "pose": _write_video(folder / "pose.mp4", 10, 32, 48, 80)}


# ---------------------------------------------------------------------------------------
# The official loop, restated (wan/speech2video.py: generate, load_pose_cond, read_last_n_frames)


def _official_ref_pixels(path, height, width):
    image = Image.open(path).convert("RGB")
    w, h = image.size
    short = min(height, width)  # transforms.Resize(min(HEIGHT, WIDTH)), then CenterCrop((HEIGHT, WIDTH))
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(size, Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    top, left = int(round((x.shape[1] - height) / 2.0)), int(round((x.shape[2] - width) / 2.0))
    assert top >= 0 and left >= 0  # the test image needs no padding
    return x[:, top:top + height, left:left + width][None, :, None] * 2 - 1.0


def _official_pose(path, n_frames, height, width, num_repeat, target_fps=16):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        original_fps = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    interval = max(1, round(original_fps / target_fps))
    indices = [i * interval for i in range(n_frames) if i * interval < len(frames)]
    cond = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2) / 255.0 * 2 - 1.0
    h, w = cond.shape[-2:]
    short = min(height, width)
    new = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    cond = F.interpolate(cond.float(), size=new, mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((new[0] - height) / 2.0)), int(round((new[1] - width) / 2.0))
    cond = cond[..., top:top + height, left:left + width].permute(1, 0, 2, 3).unsqueeze(0)
    padding = n_frames - cond.shape[2]
    cond = torch.cat([cond, -torch.ones([1, 3, padding, height, width])], dim=2)
    return torch.chunk(cond, num_repeat, dim=2)


def _official_generate(pipe, ref, audio, ctx, ctx_null, *, seed, steps, shift, guide_scale, infer_frames,
                       pose_video=None, init_first_frame=False, num_repeat=None):
    vae, dit = pipe.vae, pipe.dit
    motion_frames = dit.config.motion_frames
    plan = pipe.plan(prompt_embeds=ctx, image=str(ref), audio=str(audio))
    HEIGHT, WIDTH = plan.height, plan.width
    motion_latents = torch.zeros([1, 3, motion_frames, HEIGHT, WIDTH])
    audio_emb, nr = encode_audio(pipe.audio_encoder, read_audio(audio), fps=16, infer_frames=infer_frames)
    if num_repeat is None or num_repeat > nr:
        num_repeat = nr
    lat_motion_frames = (motion_frames + 3) // 4
    ref_pixel_values = _official_ref_pixels(ref, HEIGHT, WIDTH)
    ref_latents = vae.encode(ref_pixel_values)
    videos_last_frames = motion_latents.detach()
    drop_first_motion = True
    if init_first_frame:
        drop_first_motion = False
        motion_latents[:, :, -6:] = ref_pixel_values
    motion_latents = vae.encode(motion_latents)
    if pose_video is not None:
        cond_tensors = _official_pose(pose_video, infer_frames * num_repeat, HEIGHT, WIDTH, num_repeat)
    else:
        cond_tensors = [-torch.ones([1, 3, infer_frames, HEIGHT, WIDTH])]
    COND = [vae.encode(torch.cat([c[:, :, 0:1], c], dim=2))[:, :, 1:] for c in cond_tensors]
    out = []
    for r in range(num_repeat):
        seed_g = torch.Generator().manual_seed(seed + r)
        lat_target_frames = (infer_frames + 3 + motion_frames) // 4 - lat_motion_frames
        latents = torch.randn(16, lat_target_frames, HEIGHT // 8, WIDTH // 8, generator=seed_g)[None]
        sigmas, timesteps = schedule("euler", steps, shift)
        cond_latents = COND[r] if pose_video else COND[0] * 0
        audio_input = audio_emb[..., r * infer_frames:r * infer_frames + infer_frames]
        common = dict(cond_states=cond_latents, motion_latents=motion_latents.clone(), ref_latents=ref_latents,
                      motion_frames=[motion_frames, lat_motion_frames], drop_motion_frames=drop_first_motion and r == 0)
        for i, t in enumerate(timesteps):
            t = t.reshape(1).float()
            c = dit(latents, t, ctx, audio_input=audio_input, **common)
            u = dit(latents, t, ctx_null, audio_input=0.0 * audio_input, **common)
            latents = latents + (sigmas[i + 1] - sigmas[i]) * (u + guide_scale * (c - u))
        if not (drop_first_motion and r == 0):
            decode_latents = torch.cat([motion_latents, latents], dim=2)
        else:
            decode_latents = torch.cat([ref_latents, latents], dim=2)
        image = vae.decode(decode_latents)[:, :, -infer_frames:]
        if drop_first_motion and r == 0:
            image = image[:, :, 3:]
        overlap = min(motion_frames, image.shape[2])
        videos_last_frames = torch.cat([videos_last_frames[:, :, overlap:], image[:, :, -overlap:]], dim=2)
        motion_latents = vae.encode(videos_last_frames)
        out.append(image)
    return torch.cat(out, dim=2)[0]


def _ours(pipe, monkeypatch, **request):
    clips = []
    finish = s2v_mod.SpeechToVideo.finish_clip

    def keep(self, run, index, latents):  # what each clip adds, in floats
        frames = finish(self, run, index, latents)
        clips.append(frames.cpu())
        return frames

    monkeypatch.setattr(s2v_mod.SpeechToVideo, "finish_clip", keep)
    video = pipe(progress=False, **request)
    return torch.cat(clips, dim=1), video


# every conditioning input once: no pose video (zeros) with the first clip dropping its motion,
# then a (short, padded) pose video with the reference as the first frames (no drop)
@pytest.mark.parametrize("pose, start_from_ref", [(False, False), (True, True)])
def test_two_clips_equal_the_official_loop(pipe, inputs, monkeypatch, pose, start_from_ref):
    g = torch.Generator().manual_seed(5)
    ctx, ctx_null = torch.randn(1, 6, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    steps, shift, guidance, seed = 2, 3.0, 4.5, 11
    pose_video = inputs["pose"] if pose else None
    ours, video = _ours(pipe, monkeypatch, prompt_embeds=ctx, negative_prompt_embeds=ctx_null, image=str(inputs["ref"]),
                        audio=str(inputs["audio"]), pose_video=None if pose_video is None else str(pose_video),
                        start_from_ref=start_from_ref, seed=seed, sampler="euler", num_inference_steps=steps,
                        guidance_scale=guidance)
    with torch.no_grad():
        official = _official_generate(pipe, inputs["ref"], inputs["audio"], ctx, ctx_null, seed=seed, steps=steps,
                                      shift=shift, guide_scale=guidance, infer_frames=8, pose_video=pose_video,
                                      init_first_frame=start_from_ref)
    frames = 8 + 8 if start_from_ref else 5 + 8  # the first clip drops 3 frames when it drops the motion
    assert official.shape == (3, frames, 64, 64) and ours.shape == official.shape and len(video) == frames
    assert torch.allclose(ours, official, atol=1e-5, rtol=0), (ours - official).abs().max()
    assert video.metadata["clips"] == 2 and video.metadata["video_frames"] == frames  # "frames" is a clip's


def test_size_is_the_official_get_size_less_than_area():
    # the official numbers: 1280x720's area for a 1024x1024 image, a 720p one, a small one (padding only)
    size = s2v_mod.get_size_less_than_area
    assert size(1024, 1024, 1280 * 720) == (960, 960)
    assert size(720, 1280, 1280 * 720) == (704, 1280)
    assert size(100, 150, 1280 * 720) == (128, 192)


def test_the_uncond_branch_hears_nothing(pipe, inputs):
    plan = pipe.plan(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]))
    cond = s2v_mod.SpeechToVideo(plan)
    audio = torch.ones(1, 3, 32, 8)
    out = cond.batch({"audio_input": audio, "motion_frames": [73, 19]}, ("cond", "uncond"))
    assert torch.equal(out["audio_input"][0], audio[0]) and not out["audio_input"][1].any()
    assert out["motion_frames"] == [73, 19]


def test_clips_and_pose_padding(pipe, inputs, tmp_path):
    plan = pipe.plan(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]), num_clips=1)
    assert plan.s2v.clips == 1 and plan.num_frames == 8  # at most what the audio gives, fewer when asked
    assert pipe.plan(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]), num_clips=9).s2v.clips == 2
    # a longer pose video is cut to the clips' frames; a shorter one is padded with -1 frames
    long = _write_video(tmp_path / "long.mp4", 60, 16, 64, 64)
    plan = pipe.plan(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]), pose_video=str(long))
    assert len(plan.s2v.pose) == 16
    plan = pipe.plan(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]), pose_video=str(inputs["pose"]))
    assert len(plan.s2v.pose) == 5
    pixels = s2v_mod.pose_pixels(plan.s2v.pose, 0, 8, 64, 64)
    assert (pixels[:, 5:] == -1).all() and not (pixels[:, :5] == -1).all()


def test_refusals_before_any_work(pipe, inputs):
    base = dict(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]))
    from wanx.pipeline import ContextWindows

    with pytest.raises(ValueError, match="context windows is not available for S2V-14B"):
        pipe.plan(**base, context_windows=ContextWindows(frames=5, overlap=4))
    with pytest.raises(ValueError, match="give audio"):
        pipe.plan(prompt="a", image=str(inputs["ref"]))
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe.plan(**base, num_frames=9)
    with pytest.raises(ValueError, match="clip after clip.*latents"):
        pipe(**base, output_type="latents", progress=False)


# ---------------------------------------------------------------------------------------
# The CLI


def _streams(path):
    with av.open(str(path)) as container:
        return {s.type: s for s in container.streams}, container.duration


@pytest.mark.parametrize("pose", [False, True])
def test_cli_two_clips_with_the_audio_track(inputs, tmp_path, capsys, pose):
    from wanx.cli import main

    out = tmp_path / "talk.mp4"
    extra = ["--pose-video", str(inputs["pose"])] if pose else []
    assert main(["generate", "--model", "tiny-s2v", "--prompt", "a cat", "--image", str(inputs["ref"]), "--audio",
                 str(inputs["audio"]), "--steps", "1", "--seed", "2", "-o", str(out), "--quiet", *extra]) == 0
    assert "13 frames, 64x64" in capsys.readouterr().out  # 8 - 3 + 8: the official count for 2 clips of 8
    streams, duration = _streams(out)
    assert set(streams) == {"video", "audio"} and streams["video"].frames == 13
    assert duration / 1e6 == pytest.approx(13 / 16, abs=0.05)  # the audio (0.9 s) cut at the video's end


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-s2v", "--image", "{ref}", "--audio", "{ref}"], "ref.png: has no audio stream"),
    (["--model", "tiny-s2v", "--image", "{ref}", "--audio", "{silent}"], "has no audio stream"),
    (["--model", "tiny-s2v", "--image", "{ref}"], "this is a Wan2.2 S2V model: give --audio"),
    (["--model", "tiny", "--audio", "{audio}"], "--audio needs a Wan2.2 S2V model"),
    (["--model", "tiny", "--pose-video", "{silent}"], "--pose-video needs a Wan2.2 Animate or S2V model"),
    (["--model", "tiny-s2v", "--image", "{ref}", "--audio", "{audio}", "--frames", "9"], "multiple of 4"),
    (["--model", "tiny-s2v", "--image", "{ref}", "--audio", "{audio}", "--num-clips", "0"], "--num-clips must be"),
    (["--model", "tiny-s2v", "--image", "{ref}", "--audio", "{audio}", "--context-frames", "5"],
     "--context-frames: context windows is not available for S2V-14B"),
    (["--model", "tiny-s2v", "--extend", "{silent}"], "s2v cannot continue a video"),
])
def test_cli_refusals_before_loading(inputs, tmp_path, capsys, monkeypatch, argv, message):
    from wanx.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was refused")

    monkeypatch.setattr(WanPipeline, "from_files", refuse)
    names = {"ref": inputs["ref"], "audio": inputs["audio"], "silent": inputs["pose"]}
    out = tmp_path / "out.mp4"
    code = main(["generate", "--prompt", "a cat", "--steps", "1", "-o", str(out), "--quiet",
                 *[a.format(**names) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("wanx: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# The server


def test_serve_takes_the_audio_and_pose_uploads(inputs, tmp_path):
    import json
    import time

    from fastapi.testclient import TestClient

    from wanx.hub import find_model
    from wanx.runtime import Runtime
    from wanx.serve.app import Server, create_app

    files = find_model("tiny-s2v")
    runtime = Runtime.create("cpu")
    server = Server(WanPipeline.from_files(files, runtime=runtime), files, runtime, tmp_path / "out",
                    model_name="tiny-s2v")
    try:
        with TestClient(create_app(server, ui=False), base_url="http://localhost") as client:
            bad = client.post("/v1/videos", data={"request": json.dumps({"prompt": "a cat"})},
                              files={"image": ("r.png", inputs["ref"].read_bytes(), "image/png"),
                                     "audio": ("a.wav", inputs["ref"].read_bytes(), "audio/wav")})
            assert bad.status_code == 415 and "audio: the upload is not a wav" in bad.text, bad.text
            body = {"prompt": "a cat", "seed": 1, "steps": 1, "num_clips": 2}
            answer = client.post("/v1/videos", data={"request": json.dumps(body)},
                                 files={"image": ("r.png", inputs["ref"].read_bytes(), "image/png"),
                                        "audio": ("a.wav", inputs["audio"].read_bytes(), "audio/wav"),
                                        "pose_video": ("p.mp4", inputs["pose"].read_bytes(), "video/mp4")})
            assert answer.status_code == 202, answer.text
            end = time.monotonic() + 300
            while (job := client.get(f"/v1/videos/{answer.json()['id']}").json())["status"] not in ("done", "failed"):
                assert time.monotonic() < end, job
                time.sleep(0.1)
            assert job["status"] == "done", job
            path = tmp_path / "got.mp4"
            path.write_bytes(client.get(f"/v1/videos/{job['id']}/content").content)
            streams, _ = _streams(path)
            assert set(streams) == {"video", "audio"} and streams["video"].frames == 13
    finally:
        server.queue.stop(timeout=10)


def test_audio_as_samples_and_rate(pipe, inputs):
    samples = read_audio(inputs["audio"])
    stereo = np.stack([samples, samples])  # channels averaged, as a file's
    plan = pipe.plan(prompt="a", image=str(inputs["ref"]), audio=(stereo, RATE))
    assert plan.s2v.clips == 2 and np.array_equal(plan.s2v.samples, samples)
    assert plan.soundtrack[1] == RATE
    with pytest.raises(ValueError, match="audio must be a file path or"):
        pipe.plan(prompt="a", image=str(inputs["ref"]), audio=42)


def test_a_folder_without_the_audio_encoder_is_named(tmp_path):
    import shutil

    from wanx.hub import find_components, resolve_model

    folder = tmp_path / "s2v"
    folder.mkdir()
    for item in resolve_model("tiny-s2v").iterdir():
        if item.is_dir() and item.name != "wav2vec2-large-xlsr-53-english":
            shutil.copytree(item, folder / item.name)  # the tokenizer is found by walking real folders
        elif item.is_file():
            (folder / item.name).symlink_to(item)
    with pytest.raises(FileNotFoundError, match="needs its audio encoder; expected wav2vec2-large-xlsr-53-english/"):
        find_components(folder)
    (folder / "wav2vec2-large-xlsr-53-english").symlink_to(resolve_model("tiny-s2v") / "wav2vec2-large-xlsr-53-english")
    assert find_components(folder).audio_encoder == folder / "wav2vec2-large-xlsr-53-english"


def test_each_clip_is_seeded_seed_plus_its_index(pipe, inputs):
    plan = pipe.plan(prompt="a", image=str(inputs["ref"]), audio=str(inputs["audio"]), seed=2**64 - 1)
    cond = s2v_mod.SpeechToVideo(plan)
    noise = torch.zeros(1, *plan.latent_shape())
    assert cond.clip_noise(0, noise, None) is noise  # the request's own (its seed's, or given latents)
    expected = torch.randn(plan.latent_shape(), generator=torch.Generator().manual_seed(0))  # 2**64 wraps to 0
    assert torch.equal(cond.clip_noise(1, noise, None)[0], expected)
