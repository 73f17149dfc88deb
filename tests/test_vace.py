"""VACE as a task: the conditioning against the official preprocessing restated here, a whole
tiny run against diffusers' `WanVACEPipeline`, the CLI end to end on tiny-vace, and the
one-line refusals."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.oracles import diffusers_vace_dit, diffusers_vae, official_state, randomize, tiny_vae
from wanx.configs import dit_config
from wanx.models.vace import VaceWanDiT
from wanx.pipeline import WanPipeline
from wanx.pipeline.conditioning import Run
from wanx.pipeline.conditioning.vace import Vace

# -- the official preprocessing (Wan-Video/Wan2.1 wan/vace.py), restated -----------------------


class ListVAE:
    """The official WanVAE's call shape (a list of `[3, F, H, W]` -> a list of latents) on ours."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, videos):
        return [self.vae.encode(v[None])[0].float() for v in videos]


def official_encode_frames(vae, frames, ref_images, masks):
    masks = [torch.where(m > 0.5, 1.0, 0.0) for m in masks]
    inactive = vae.encode([i * (1 - m) + 0 * m for i, m in zip(frames, masks)])
    reactive = vae.encode([i * m + 0 * (1 - m) for i, m in zip(frames, masks)])
    latents = [torch.cat((u, c), dim=0) for u, c in zip(inactive, reactive)]
    out = []
    for latent, refs in zip(latents, ref_images):
        if refs is not None:
            ref_latent = [torch.cat((u, torch.zeros_like(u)), dim=0) for u in vae.encode(refs)]
            latent = torch.cat([*ref_latent, latent], dim=1)
        out.append(latent)
    return out


def official_encode_masks(masks, ref_images, vae_stride=(4, 8, 8)):
    result = []
    for mask, refs in zip(masks, ref_images):
        c, depth, height, width = mask.shape
        new_depth = int((depth + 3) // vae_stride[0])
        height = 2 * (int(height) // (vae_stride[1] * 2))
        width = 2 * (int(width) // (vae_stride[2] * 2))
        mask = mask[0].view(depth, height, vae_stride[1], width, vae_stride[1]).permute(2, 4, 0, 1, 3)
        mask = mask.reshape(vae_stride[1] * vae_stride[2], depth, height, width)
        mask = F.interpolate(mask.unsqueeze(0), size=(new_depth, height, width), mode="nearest-exact").squeeze(0)
        if refs is not None:
            mask = torch.cat((torch.zeros_like(mask[:, :len(refs)]), mask), dim=1)
        result.append(mask)
    return result


def official_prepare_source(src_video, src_mask, src_ref_images, num_frames, image_size):
    """`prepare_source` past its video reader (the inputs already at the output size): the
    default frames and masks, the mask's first channel to [0, 1], the references on a white canvas."""
    height, width = image_size
    if src_video is None:
        src_video, src_mask = torch.zeros(3, num_frames, height, width), torch.ones(3, num_frames, height, width)
    elif src_mask is None:
        src_mask = torch.ones_like(src_video)
    else:
        src_mask = torch.clamp((src_mask[:1] + 1) / 2, min=0, max=1)
    refs = None
    if src_ref_images is not None:
        refs = []
        for ref_img in src_ref_images:
            ref_img = ref_img.unsqueeze(1)
            if ref_img.shape[-2:] != (height, width):
                canvas = torch.ones(3, 1, height, width)
                scale = min(height / ref_img.shape[-2], width / ref_img.shape[-1])
                new_h, new_w = int(ref_img.shape[-2] * scale), int(ref_img.shape[-1] * scale)
                resized = F.interpolate(ref_img.squeeze(1).unsqueeze(0), size=(new_h, new_w), mode="bilinear",
                                        align_corners=False).squeeze(0).unsqueeze(1)
                top, left = (height - new_h) // 2, (width - new_w) // 2
                canvas[:, :, top:top + new_h, left:left + new_w] = resized
                ref_img = canvas
            refs.append(ref_img)
    return src_video, src_mask, refs


@pytest.fixture(scope="module")
def vace_pipe():
    torch.manual_seed(0)
    dit = randomize(VaceWanDiT(dit_config("tiny-vace")), seed=0)
    return WanPipeline(dit, tiny_vae())


CASES = {  # control video, mask, reference image sizes
    "inpaint+refs": (True, True, [(24, 40), (48, 32)]),
    "control": (True, False, [(32, 48)]),
    "text": (False, False, []),
    "text+ref": (False, False, [(20, 20)]),
}


@pytest.mark.parametrize("case", CASES)
def test_conditioning_equals_the_official_preprocessing(vace_pipe, case):
    with_video, with_mask, ref_sizes = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    frames, (h, w) = 9, (32, 48)
    video = torch.rand(3, frames, h, w, generator=gen) * 2 - 1 if with_video else None
    mask = None
    if with_mask:  # a video in [-1, 1]: blocks white, the rest black, some grey
        mask = torch.rand(1, frames, h // 4, w // 4, generator=gen).repeat_interleave(4, 2).repeat_interleave(4, 3)
        mask = (mask * 3).floor() - 1  # -1, 0 or 1
        mask = mask.expand(3, -1, -1, -1).clone()
    refs = [torch.rand(3, *size, generator=gen) * 2 - 1 for size in ref_sizes]
    plan = vace_pipe.plan(prompt_embeds=torch.zeros(1, 4, 32), video=video, mask=mask, reference_images=refs or None,
                          height=h, width=w, num_frames=frames)
    assert (plan.height, plan.width, plan.lead_frames) == (h, w, len(refs))
    with torch.no_grad():
        ours = Vace(plan).inputs(Run(vace_pipe, False))["vace_context"]
        src_video, src_mask, src_refs = official_prepare_source(video, mask, refs or None, frames, (h, w))
        vae = ListVAE(vace_pipe.vae)
        z0 = official_encode_frames(vae, [src_video], [src_refs], [src_mask])
        m0 = official_encode_masks([src_mask], [src_refs])
        theirs = torch.cat([z0[0], m0[0]], dim=0)[None]
    assert ours.shape == (1, 96, len(refs) + 3, h // 8, w // 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * theirs.abs().max().item())
    if with_mask:  # the grey pixels are in the folded mask as grey, and made (> 0.5) nowhere else
        assert ((ours[0, 32:] > 0) & (ours[0, 32:] < 1)).any()


# -- a whole run against diffusers' WanVACEPipeline ---------------------------------------------


def diffusers_vace_pipeline(dit, vae, shift):
    """diffusers' `WanVACEPipeline` on the same weights, UniPC on the official grid (diffusers'
    own starts at sigma 1; see tests/test_sampling.py), without text encoder."""
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: set_timesteps(
        sigmas=np.linspace(0.999, 0, steps + 1)[:-1].copy(), device=device)
    return WanVACEPipeline(tokenizer=None, text_encoder=None, scheduler=scheduler,
                           vae=diffusers_vae(official_state(vae), vae.config.dim),
                           transformer=diffusers_vace_dit(dit.config, official_state(dit)))


def test_whole_run_equals_diffusers_wan_vace_pipeline(vace_pipe):
    """Inpainting with a reference image and a control scale: the same latents as diffusers
    (the reference's latent frame in front, then dropped) and the same decoded frames."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frames, h, w, steps, shift = 9, 32, 48, 3, 16.0
    video = (rng.random((frames, h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((frames, h, w, 3), np.uint8)
    mask[:, 8:24, 16:40] = 255
    ref = Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8))
    gen = torch.Generator().manual_seed(1)
    context, negative = torch.randn(1, 5, 32, generator=gen), torch.randn(1, 3, 32, generator=gen)
    noise = torch.randn(1, 16, 1 + 3, h // 8, w // 8, generator=gen)

    ours = vace_pipe(prompt_embeds=context, negative_prompt_embeds=negative, video=video, mask=mask,
                     reference_images=[ref], conditioning_scale=0.7, latents=noise, height=h, width=w,
                     num_frames=frames, num_inference_steps=steps, shift=shift, progress=False)

    oracle = diffusers_vace_pipeline(vace_pipe.dit, vace_pipe.vae, shift)
    last = {}

    def keep(pipe, i, t, tensors):
        last["latents"] = tensors["latents"]
        return tensors

    pad = lambda c: F.pad(c, (0, 0, 0, 512 - c.shape[1]))  # noqa: E731  (wanx pads inside the DiT)
    theirs = oracle(prompt_embeds=pad(context), negative_prompt_embeds=pad(negative),
                    video=[Image.fromarray(f) for f in video], mask=[Image.fromarray(m) for m in mask],
                    reference_images=[ref], conditioning_scale=0.7, latents=noise.clone(), height=h, width=w,
                    num_frames=frames, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                    callback_on_step_end=keep, return_dict=False)[0][0]
    reference = last["latents"][:, :, 1:]  # diffusers keeps the reference frame until it decodes
    assert ours.latents.shape == reference.shape[1:]
    assert (ours.latents - reference[0]).abs().max() <= 1e-4 * reference.abs().max()  # the pipeline bound
    assert ours.frames.shape == (frames, h, w, 3)
    assert np.abs(ours.frames.astype(float) - np.round(theirs * 255)).max() <= 1  # uint8 rounding


# -- the CLI end to end on tiny-vace --------------------------------------------------------------


def _meta(path):
    import av

    with av.open(str(path)) as container:
        return dict(container.metadata)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    from wanx.video import Video

    folder = tmp_path_factory.mktemp("vace-inputs")
    rng = np.random.default_rng(0)
    Video((rng.random((13, 48, 64, 3)) * 255).astype(np.uint8), fps=16).save(folder / "control.mp4")
    mask = np.zeros((13, 48, 64, 3), np.uint8)
    mask[:, 8:40, 16:48] = 255
    Video(mask, fps=16).save(folder / "mask.mp4")
    Image.fromarray(mask[0]).save(folder / "mask.png")
    for name, size in (("ref1.png", (30, 40)), ("ref2.png", (64, 20)), ("first.png", (48, 64))):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def test_cli_inpaint_with_reference_images(inputs, tmp_path):
    """Control video + mask video + two reference images: the frames asked, at the control
    video's size, none of them a reference frame."""
    from wanx.cli import main
    from wanx.video import read_video

    out = tmp_path / "inpaint.mp4"
    assert main(["generate", "--model", "tiny-vace", "--prompt", "a cat", "--control-video",
                 str(inputs / "control.mp4"), "--mask", str(inputs / "mask.mp4"), "--reference-image",
                 str(inputs / "ref1.png"), "--reference-image", str(inputs / "ref2.png"), "--frames", "9",
                 "--control-scale", "0.5", "--seed", "3", "-o", str(out), "--quiet"]) == 0
    assert read_video(out).frames.shape == (9, 48, 64, 3)
    meta = _meta(out)
    assert (meta["task"], meta["vace"], meta["reference_images"], meta["control_scale"], meta["shift"]) == \
        ("vace", "masked", "2", "0.5", "16.0")


def test_cli_outpaint_control_first_frame_and_references(inputs, tmp_path):
    """A --prompts batch with the request keys: outpaint (the canvas's aspect ratio), a control
    video alone (its length, up to the folder's 5 frames), first and last frame, references alone."""
    import json

    from wanx.cli import main
    from wanx.video import read_video

    lines = [dict(prompt="wider", control_video="control.mp4", outpaint="0.25,0.25,0,0", output="outpaint.mp4"),
             dict(prompt="pose", control_video="control.mp4", output="control.mp4"),
             dict(prompt="a cat", control_video="control.mp4", mask="mask.png", frames=13, output="masked.mp4"),
             dict(prompt="between", image="first.png", last_image="first.png", frames=9, output="firstlast.mp4"),
             dict(prompt="a subject", reference_images=["ref1.png", "ref2.png"], frames=9, size="32x48",
                  output="refs.mp4")]
    prompts = inputs / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(["generate", "--model", "tiny-vace", "--prompts", str(prompts), "-o", str(tmp_path), "--steps", "2",
                 "--quiet"]) == 0
    shapes = {name: read_video(tmp_path / name).frames.shape for name in
              ("outpaint.mp4", "control.mp4", "masked.mp4", "firstlast.mp4", "refs.mp4")}
    # 96x48 within 64x64's area keeps 2:1: 80x32 (16-multiples)
    assert shapes == {"outpaint.mp4": (5, 32, 80, 3), "control.mp4": (5, 48, 64, 3), "masked.mp4": (13, 48, 64, 3),
                      "firstlast.mp4": (9, 48, 64, 3), "refs.mp4": (9, 48, 32, 3)}
    assert _meta(tmp_path / "outpaint.mp4")["vace"] == "masked"
    assert _meta(tmp_path / "control.mp4")["vace"] == "control"
    assert _meta(tmp_path / "refs.mp4")["reference_images"] == "2"


# -- bad input: one line each, before any weight is read -------------------------------------------

BAD = [  # (model, flags, what the line says)
    ("tiny", ["--mask", "{inputs}/mask.png"], "--mask needs a VACE model (e.g. Wan-AI/Wan2.1-VACE-1.3B); this is a "
                                              "T2V model"),
    ("tiny", ["--reference-image", "{inputs}/ref1.png"], "--reference-image needs a VACE model"),
    ("tiny-i2v", ["--image", "{inputs}/first.png", "--control-scale", "0.5"], "--control-scale needs a VACE model"),
    ("tiny", ["--control-video", "{inputs}/control.mp4"], "--control-video needs a VACE model"),
    ("tiny", ["--outpaint", "8,8,0,0"], "--outpaint needs a VACE model"),
    ("tiny-vace", ["--control-video", "{inputs}/control.mp4", "--mask", "{inputs}/ref1.png"],
     "the mask is 40x30; it needs the control video's size, 64x48"),
    ("tiny-vace", ["--control-video", "{inputs}/control.mp4", "--mask", "{inputs}/short.mp4", "--frames", "9"],
     "the mask video has 5 frames; it needs 9 (the frames made), or give one image"),
    ("tiny-vace", ["--control-video", "{inputs}/control.mp4", "--frames", "17"],
     "the control video has 13 frames at 16 fps; --frames is 17: lower it to 13 or give a longer video"),
    ("tiny-vace", ["--mask", "{inputs}/mask.png"], "--mask marks what to generate in --control-video: give that too"),
    ("tiny-vace", ["--control-video", "{inputs}/control.mp4", "--image", "{inputs}/first.png"],
     "give --control-video or --image (a first frame), not both"),
    ("tiny-vace", ["--control-video", "{inputs}/control.mp4", "--video", "{inputs}/control.mp4"],
     "give --control-video or --video, not both"),
    ("tiny-vace", ["--outpaint", "8,8"], "--outpaint widens a picture: give --control-video or --image"),
    ("tiny-vace", ["--image", "{inputs}/first.png", "--outpaint", "8,8,x,0"], "outpaint is left,right,top,bottom"),
    ("tiny-vace", ["--reference-image", "{inputs}/ref1.png", "--frames", "13", "--context-frames", "9"],
     "--reference-image are latent frames in front of the video, which context windows do not carry"),
    ("tiny-vace", ["--reference-image", "{inputs}/missing.png"], "missing.png: no such image file"),
]


@pytest.mark.parametrize("model, flags, message", BAD, ids=[f"{m}:{f[0]}:{i}" for i, (m, f, _) in enumerate(BAD)])
def test_bad_input_one_line_before_loading(inputs, capsys, monkeypatch, tmp_path, model, flags, message):
    from wanx.cli import main
    from wanx.video import Video

    if not (inputs / "short.mp4").exists():
        Video(np.zeros((5, 48, 64, 3), np.uint8), fps=16).save(inputs / "short.mp4")

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was refused")

    monkeypatch.setattr(WanPipeline, "from_files", refuse)
    out = tmp_path / "out.mp4"
    code = main(["generate", "--model", model, "--prompt", "a cat", "--steps", "2", "-o", str(out), "--quiet",
                 *[flag.format(inputs=inputs) for flag in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("wanx: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_python_api_refusals(vace_pipe):
    """The Python face names diffusers' keywords; a mask image is taken for every frame."""
    embeds = dict(prompt_embeds=torch.zeros(1, 4, 32), height=32, width=48, num_frames=5)
    video = torch.zeros(3, 5, 32, 48)
    with pytest.raises(ValueError, match="^reference_images is an empty list"):
        vace_pipe.plan(**embeds, reference_images=[])
    with pytest.raises(ValueError, match="^conditioning_scale must be a number"):
        vace_pipe.plan(**embeds, conditioning_scale="strong")
    with pytest.raises(ValueError, match=r"^mask tensor must be \[1 or 3, F, H, W\]"):
        vace_pipe.plan(**embeds, video=video, mask=torch.zeros(2, 5, 32, 48))
    plan = vace_pipe.plan(**embeds, video=video, mask=np.full((32, 48, 3), 255, np.uint8))
    assert plan.mask.shape == (1, 5, 32, 48) and plan.mask.all()  # one mask image for every frame


def test_outpaint_keeps_the_picture_and_makes_the_border(vace_pipe):
    embeds = dict(prompt_embeds=torch.zeros(1, 4, 32), height=32, width=64, num_frames=5)
    video = torch.rand(3, 5, 32, 32) * 2 - 1
    plan = vace_pipe.plan(**embeds, video=video, outpaint="16,16,0,0")  # 64x32: the size asked, no resize
    assert (plan.width, plan.height) == (64, 32)
    assert torch.equal(plan.video[:, :, :, 16:48], video) and not plan.video[:, :, :, :16].any()
    assert not plan.mask[..., 16:48].any() and plan.mask[..., :16].all() and plan.mask[..., 48:].all()
    fractions = vace_pipe.plan(**embeds, video=video, outpaint=(0.5, 0.5, 0, 0))  # half the width each side
    assert torch.equal(fractions.mask, plan.mask)


# -- the server: VACE inputs come as uploads ------------------------------------------------------


def test_server_takes_vace_uploads_and_a_t2v_server_refuses_them(inputs, tmp_path):
    """A control video, a mask image and two reference images (two parts of one name) upload
    under server-made names and make the video asked; a T2V model's server refuses a reference
    image in one line, naming the field, with nothing left behind; no path is taken from a body."""
    import json

    from fastapi.testclient import TestClient

    from tests.serve.conftest import wait_for
    from wanx.hub import find_components, resolve_model
    from wanx.runtime import Runtime
    from wanx.serve.app import Server, create_app
    from wanx.video import read_video

    runtime = Runtime.create("cpu")
    for model in ("tiny-vace", "tiny"):
        files = find_components(resolve_model(model))
        pipe = WanPipeline.from_files(files, runtime=runtime) if model == "tiny-vace" else None
        server = Server(pipe, files, runtime, tmp_path / model, model_name=model)
        body = {"prompt": "a cat", "frames": 9, "steps": 2, "seed": 1}
        parts = [("reference_images", (name, (inputs / name).read_bytes(), "image/png")) for name in ("ref1.png", "ref2.png")]
        if model == "tiny-vace":
            parts += [("control_video", ("c.mp4", (inputs / "control.mp4").read_bytes(), "video/mp4")),
                      ("mask", ("m.png", (inputs / "mask.png").read_bytes(), "image/png"))]
        with TestClient(create_app(server, ui=False, worker=model == "tiny-vace"), base_url="http://localhost") as client:
            answer = client.post("/v1/videos", data={"request": json.dumps(body)}, files=parts)
            if model == "tiny":
                assert answer.status_code == 422 and answer.json()["field"] == "reference_images", answer.text
                assert "reference_images needs a VACE model" in answer.json()["detail"]
                assert list((server.outputs / "inputs").iterdir()) == []
                path_body = {**body, "control_video": str(inputs / "control.mp4")}
                answer = client.post("/v1/videos", json=path_body)
                assert answer.status_code == 422 and answer.json()["field"] == "control_video", answer.text
                continue
            assert answer.status_code == 202, answer.text
            job = wait_for(client, answer.json()["id"])
            assert job["status"] == "done", job
            assert job["inputs"] == ["control_video", "mask", "reference_images"]
            got = tmp_path / "got.mp4"
            got.write_bytes(client.get(f"/v1/videos/{job['id']}/content").content)
            assert read_video(got).frames.shape == (9, 48, 64, 3)
            assert job["settings"]["reference_images"] == 2 and job["settings"]["vace"] == "masked"
        server.queue.stop(timeout=10)


def test_the_ui_has_a_vace_tab_with_its_uploads(tmp_path):
    """A VACE model's page: control video, mask and a reference image as uploads (not the
    video-to-video input and its strength), the official shift 16 as the placeholder."""
    from wanx.hub import find_components, resolve_model
    from wanx.runtime import Runtime
    from wanx.serve.app import Server
    from wanx.serve.ui import build_ui, placeholders

    server = Server(None, find_components(resolve_model("tiny-vace")), Runtime.create("cpu"), tmp_path / "ui",
                    model_name="tiny-vace")
    try:
        ids = {getattr(block, "elem_id", None) for block in build_ui(server).blocks.values()}
    finally:
        server.queue.stop(timeout=10)
    assert {"control_video", "mask", "reference_images", "image", "last_image"} <= ids
    assert "input_video" not in ids
    assert placeholders({}, "vace")["shift"] == "16"


def test_context_windows_cut_the_vace_context_with_the_latents(vace_pipe):
    """Without reference frames the VACE context is laid out over the latent frames: each
    window's DiT pass gets its frames of it (two windows over 4 latent frames here)."""
    from wanx.pipeline import ContextWindows

    seen = []
    hook = vace_pipe.dit.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[2], kwargs["vace_context"].shape[2])),
        with_kwargs=True)
    try:
        video = vace_pipe(prompt_embeds=torch.zeros(1, 4, 32), guidance_scale=1.0,
                          video=torch.rand(3, 13, 32, 48) * 2 - 1, height=32,
                          width=48, num_frames=13, num_inference_steps=1, seed=0, progress=False,
                          context_windows=ContextWindows(frames=9, overlap=4))
    finally:
        hook.remove()
    assert video.frames.shape == (13, 32, 48, 3)
    assert seen == [(3, 3), (3, 3)]  # each window: 3 of the 4 latent frames, and their 3 context frames


def test_two_vace_experts_run_as_wan22_vace_fun(vace_pipe):
    """Wan2.2 VACE-Fun A14B: two VACE DiTs, the high-noise one first, T2V-A14B's sampling."""
    import copy

    low = randomize(copy.deepcopy(vace_pipe.dit), seed=1)
    pipe = WanPipeline(vace_pipe.dit, vace_pipe.vae, dit_low=low)
    embeds = dict(prompt_embeds=torch.zeros(1, 4, 32), negative_prompt_embeds=torch.zeros(1, 4, 32))
    plan = pipe.plan(**embeds, height=32, width=48, num_frames=5)
    assert (plan.spec.name, plan.shift, plan.guidance, plan.guidance_low, plan.boundary) == \
        ("vace-A14B", 12.0, 4.0, 3.0, 0.875)
    video = torch.rand(3, 5, 32, 48) * 2 - 1
    out = pipe(**embeds, video=video, height=32, width=48, num_frames=5, num_inference_steps=6, progress=False,
               output_type="latents", seed=2)
    assert pipe.last_experts["high_noise_steps"] > 0 and pipe.last_experts["low_noise_steps"] > 0
    one = WanPipeline(vace_pipe.dit, vace_pipe.vae)(**embeds, video=video, height=32, width=48, num_frames=5,
                                                  num_inference_steps=6, progress=False, output_type="latents",
                                                  seed=2, shift=12.0, guidance_scale=4.0)
    assert torch.isfinite(out).all() and not torch.allclose(out, one)  # the low-noise expert took its steps
