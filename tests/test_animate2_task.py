"""Wan-Animate-2 as a task: the segment loop against diffusers' modular pipeline
(modular_pipelines/wan_animate_2: its preprocessing called as it is, its segment loop restated
on the tiny-animate2 networks), sizing and padding, and the one-line refusals."""

import numpy as np
import pytest
import torch
from diffusers.modular_pipelines.wan_animate_2.encoders import get_frame_indices, get_i2v_mask
from diffusers.modular_pipelines.wan_animate_2.video_processor import WanAnimate2VideoProcessor
from PIL import Image

from wanx.pipeline import WanPipeline
from wanx.pipeline.conditioning.animate2 import (PROMPT_REF, Animate2, frame_indices, letterbox, output_size,
                                                 to_unit)
from wanx.pipeline.pipeline import _pad_text
from wanx.sampling import SAMPLERS, schedule


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny-animate2", device="cpu", dtype=torch.float32)


def frames(length, height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (length, height, width, 3), dtype=np.uint8)


def processors():
    """diffusers' image and video processors as the modular pipeline's ComponentSpecs make them."""
    return (WanAnimate2VideoProcessor(vae_scale_factor=8, spatial_patch_size=(2, 2), resample="bicubic"),
            WanAnimate2VideoProcessor(vae_scale_factor=8, spatial_patch_size=(2, 2), resample="bilinear"))


def diffusers_size(image, area):
    """WanAnimate2ImagePreprocessStep's size: the image's rounded size, its aspect within area."""
    import math

    image_processor, _ = processors()
    image_height, image_width = image_processor.get_default_height_width(Image.fromarray(image))
    aspect = image_height / image_width
    return int(math.sqrt(area * aspect)) // 16 * 16, int(math.sqrt(area / aspect)) // 16 * 16


def test_size_letterbox_and_resampling_as_diffusers():
    image_processor, video_processor = processors()
    for shape, area in (((50, 40), 64 * 48), ((40, 90), 800 * 640), ((720, 1280), 800 * 640), ((33, 33), 64 * 64)):
        image = frames(1, *shape, 1)[0]
        height, width = diffusers_size(image, area)
        assert output_size(*shape, area, 16) == (height, width)
        for processor, resample in ((image_processor, "bicubic"), (video_processor, "bilinear")):
            expected = processor.preprocess(Image.fromarray(image), height=height, width=width, resize_mode="fill")
            got = to_unit(letterbox(image, height, width, resample)[None])[:, 0]
            torch.testing.assert_close(got, expected[0].float(), atol=1e-6, rtol=0)
    for count, source, fps in ((100, 30, 24), (50, 24, 24), (7, 12, 24), (61, 29.97, 24)):
        assert frame_indices(count, source, fps) == get_frame_indices(count, source, fps)


def diffusers_loop(pipe, driving, image, *, area, segment, steps, seed, guidance, context, context_null, shift=5.0):
    """WanAnimate2Blocks from the driving frames and reference image: the preprocess steps called
    as they are, the segment loop (vae_encoder, prev_frames, prepare, ref_extract, denoise_inner,
    decode) restated on our VAE, CLIP, T5 and DiT, fp32 on the CPU; our UniPC for the scheduler
    the release's config names. Returns the frames `[3, F, H, W]` in [-1, 1] before the crop."""
    vae, dit, clip = pipe.vae, pipe.dit, pipe.image_encoder
    image_processor, video_processor = processors()
    height, width = diffusers_size(image, area)
    image_pixels = image_processor.preprocess(Image.fromarray(image), height=height, width=width,
                                              resize_mode="fill").float()  # [1, 3, H, W]
    driving_video = video_processor.preprocess_video([Image.fromarray(f) for f in driving], height=height,
                                                     width=width, resize_mode="fill").float()  # [1, 3, T, H, W]
    prev_len = 1  # prev_segment_conditioning_frames
    real_frame_len = driving_video.shape[2]
    effective_segment = segment - prev_len
    leftover = (real_frame_len - prev_len) % effective_segment if real_frame_len > prev_len else 0
    num_padding = effective_segment - leftover if leftover > 0 else 0
    if num_padding > 0:
        driving_video = torch.cat([driving_video, driving_video[:, :, real_frame_len - num_padding:
                                                                 real_frame_len].flip(2)], dim=2)
    num_segments = (driving_video.shape[2] - prev_len + effective_segment - 1) // effective_segment

    encoded, lengths = pipe.text_encoder.encode([PROMPT_REF])
    prompt_ref = _pad_text(encoded[:, : int(lengths.max())], dit.config.text_len)
    clip_context = clip(image_pixels)  # the reference image's
    condition_clip_context = clip(driving_video[:, :, 0])  # the driving video's first frame's
    ref_latents = vae.encode(image_pixels[:, :, None])
    lat_h, lat_w = height // 8, width // 8
    reference_image_latents = torch.cat([get_i2v_mask(1, lat_h, lat_w, 1, device="cpu"), ref_latents[0]])
    generator = torch.Generator().manual_seed(seed)
    segment_frames, out_frames = [], None
    for k in range(num_segments):
        start = k * effective_segment
        driving_video_latents = vae.encode(driving_video[:, :, start: start + segment])
        mask = get_i2v_mask(driving_video_latents.shape[2], lat_h, lat_w, segment, device="cpu")
        driving_video_condition = torch.cat([mask, driving_video_latents[0]])
        mask_len = prev_len if k > 0 else 0
        if mask_len > 0:
            prev = out_frames[0, :, -mask_len:].permute(1, 0, 2, 3)
            prev = torch.nn.functional.interpolate(prev, size=(height, width), mode="bicubic").permute(1, 0, 2, 3)
            cond_pixels = torch.cat([prev, torch.zeros(3, segment - mask_len, height, width)], dim=1)
        else:
            cond_pixels = torch.zeros(3, segment, height, width)
        prev_latents = vae.encode(cond_pixels[None])[0]
        prev_mask = get_i2v_mask(prev_latents.shape[1], lat_h, lat_w, mask_len, device="cpu")
        reference_latents = torch.cat([reference_image_latents, torch.cat([prev_mask, prev_latents])], dim=1)
        latents = torch.randn(16, reference_latents.shape[1], lat_h, lat_w, generator=generator)
        cache = dit.new_cache()
        dit(driving_video_latents, torch.ones(1), prompt_ref, condition_clip_context, driving_video_condition[None],
            cache=cache, mode="extract")

        def model(x, t):
            t = t.float().reshape(1)
            cond = dit(x, t, context, clip_context, reference_latents[None], cache=cache, mode="cached")
            if guidance == 1.0:
                return cond
            uncond = dit(x, t, context_null, clip_context, reference_latents[None], cache=cache, mode="cached",
                         uncond=True)
            return uncond + guidance * (cond - uncond)

        sigmas, timesteps = schedule("unipc", steps, shift)
        latents = SAMPLERS["unipc"](model, latents[None], sigmas, timesteps, generator=generator)
        out_frames = vae.decode(latents[:, :, 1:].float())
        if k > 0:
            out_frames = out_frames[:, :, prev_len:]
        segment_frames.append(out_frames)
    return torch.cat(segment_frames, dim=2)[:, :, :real_frame_len][0]


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["cfg", "distilled"])
def test_two_segments_equal_the_diffusers_loop(pipe, monkeypatch, guidance):
    """7 driving frames, segments of 5 carrying 1: two segments, the second padded with the
    video's last frames reversed and cut; CFG's unconditional pass skips block 9 (the pipeline
    batches guidance by default: this task must not)."""
    driving, image = frames(7, 40, 56, 1), frames(1, 50, 40, 2)[0]
    embeds = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    null = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1))
    made = []
    finish = Animate2.finish_clip

    def keep(self, run, index, latents):  # the frames in float, before they become uint8
        made.append(finish(self, run, index, latents))
        return made[-1]

    monkeypatch.setattr(Animate2, "finish_clip", keep)
    assert pipe.batch_cfg
    video = pipe(prompt_embeds=embeds, negative_prompt_embeds=null, video=driving, image=image, height=64, width=48,
                 num_frames=5, num_inference_steps=2, guidance_scale=guidance, seed=7, progress=False)
    assert len(made) == 2 and len(video) == 7 and video.size == (32, 64)
    assert video.metadata["task"] == "animate2" and video.fps == 24
    assert video.metadata["animate2"] == {"segments": 2, "segment_frames": 5, "carried_frames": 1, "video_frames": 7}
    with torch.no_grad():
        expected = diffusers_loop(pipe, driving, image, area=64 * 48, segment=5, steps=2, seed=7, guidance=guidance,
                                  context=_pad_text(embeds, 512), context_null=_pad_text(null, 512))
    got = torch.cat(made, dim=1)
    assert got.shape == expected.shape == (3, 7, 64, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_python_api_refusals(pipe):
    driving, image = frames(7, 40, 56, 1), frames(1, 50, 40, 2)[0]
    cases = [
        (dict(image=image), "video"),  # no driving video
        (dict(video=driving), "image"),  # no reference image
        (dict(video=driving[:2], image=image, num_frames=9), "the driving video has 2 frame(s) at 24 fps; a segment "
                                                            "of 9 needs at least 5"),
        (dict(video=driving, image=image, output_type="latents"), "output_type='latents' is not available"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=None) as err:
            pipe("a dancer", num_inference_steps=1, progress=False, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- the CLI: --video (driving) and --image (reference), end to end --------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 7-frame driving video at 24 fps (56x40) and a 40x50 reference image; a 2-frame video."""
    from wanx.video import Video

    root = tmp_path_factory.mktemp("animate2-inputs")
    Video(frames(7, 40, 56, 1), fps=24).save(root / "driving.mp4")
    Video(frames(2, 40, 56, 1), fps=24).save(root / "short.mp4")
    Image.fromarray(frames(1, 50, 40, 2)[0]).save(root / "ref.png")
    return root


def test_cli_makes_the_driving_length_at_the_image_aspect(inputs, tmp_path):
    """Two segments of 5 frames carrying 1 make 9 frames, cut to the video's 7, at 24 fps; the
    size: the 40x50 image's aspect (rounded 32x48) within tiny-animate2's 64x64 area, 48x64."""
    import json

    import av

    from wanx.cli import main
    from wanx.video import read_video

    out = tmp_path / "out.mp4"
    assert main(["generate", "--model", "tiny-animate2", "--video", str(inputs / "driving.mp4"), "--image",
                 str(inputs / "ref.png"), "--prompt", "a dancer", "--frames", "5", "--steps", "1", "--seed", "1",
                 "-o", str(out), "--quiet"]) == 0
    assert read_video(out).frames.shape == (7, 64, 48, 3)
    with av.open(str(out)) as container:
        meta = dict(container.metadata)
        assert container.streams.video[0].average_rate == 24
    assert meta["task"] == "animate2"
    assert json.loads(meta["animate2"]) == {"segments": 2, "segment_frames": 5, "carried_frames": 1,
                                            "video_frames": 7}


BAD = [  # (model, flags, what the line says)
    ("tiny-animate2", ["--image", "{root}/ref.png"], "this is a Wan-Animate-2 model: give --image (the reference "
                                                     "image) and --video (the driving video)"),
    ("tiny-animate2", ["--video", "{root}/driving.mp4"], "give --image (the reference image) and --video"),
    ("tiny-animate2", ["--video", "{root}/short.mp4", "--image", "{root}/ref.png"],
     "the driving video has 2 frame(s) at 24 fps; a segment of 5 needs at least 3"),
    ("tiny-animate2", ["--video", "{root}/driving.mp4", "--image", "{root}/ref.png", "--teacache", "0.5"],
     "a step cache (TeaCache/MagCache) does not apply to Animate-2"),
    ("tiny-animate2", ["--video", "{root}/driving.mp4", "--image", "{root}/ref.png", "--context-frames", "5"],
     "leave --context-frames unset"),
    ("tiny-animate2", ["--video", "{root}/driving.mp4", "--image", "{root}/missing.png"], "missing.png"),
    ("tiny", ["--video", "{root}/driving.mp4", "--image", "{root}/ref.png"],
     "this is a T2V model: --image needs an I2V or FLF2V model"),
    ("tiny-animate2", ["--video", "{root}/driving.mp4", "--image", "{root}/ref.png", "--animate-inputs", "{root}"],
     "--animate-inputs needs a Wan2.2 Animate model"),
]


@pytest.mark.parametrize("model, flags, message", BAD, ids=[f"{m}:{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_input_one_line_before_loading(inputs, capsys, monkeypatch, tmp_path, model, flags, message):
    from wanx.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was refused")

    monkeypatch.setattr(WanPipeline, "from_files", refuse)
    out = tmp_path / "out.mp4"
    code = main(["generate", "--model", model, "--prompt", "a dancer", "--frames", "5", "--steps", "1", "-o",
                 str(out), "--quiet", *[flag.format(root=inputs) for flag in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("wanx: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_server_reads_the_driving_video_whole_at_its_rate(inputs, tmp_path):
    """An uploaded driving video is read as it is (every frame, resampled to 24 fps by the
    task), not fitted to 16 fps and the request's frame count as a video-to-video input is."""
    import json

    from fastapi.testclient import TestClient

    from tests.serve.conftest import wait_for
    from wanx.hub import find_components, resolve_model
    from wanx.runtime import Runtime
    from wanx.serve.app import Server, create_app
    from wanx.video import read_video

    runtime = Runtime.create("cpu")
    files = find_components(resolve_model("tiny-animate2"))
    server = Server(WanPipeline.from_files(files, runtime=runtime), files, runtime, tmp_path / "server",
                    model_name="tiny-animate2")
    body = {"prompt": "a dancer", "frames": 5, "steps": 1, "seed": 1}
    parts = [("video", ("d.mp4", (inputs / "driving.mp4").read_bytes(), "video/mp4")),
             ("image", ("r.png", (inputs / "ref.png").read_bytes(), "image/png"))]
    try:
        with TestClient(create_app(server, ui=False, worker=True), base_url="http://localhost") as client:
            answer = client.post("/v1/videos", data={"request": json.dumps(body)}, files=parts)
            assert answer.status_code == 202, answer.text
            job = wait_for(client, answer.json()["id"])
            assert job["status"] == "done", job
            got = tmp_path / "got.mp4"
            got.write_bytes(client.get(f"/v1/videos/{job['id']}/content").content)
            assert read_video(got).frames.shape == (7, 64, 48, 3)
            assert job["settings"]["animate2"]["video_frames"] == 7
            answer = client.post("/v1/videos", data={"request": json.dumps(body)}, files=parts[1:])
            assert answer.status_code == 422 and answer.json()["field"] == "video", answer.text
            assert "give image (the reference image) and video (the driving video)" in answer.json()["detail"]
    finally:
        server.queue.stop(timeout=10)
