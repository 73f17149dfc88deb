"""Wan2.2-Animate as a task: the clip-after-clip loop against the official `WanAnimate.generate`
(wan/animate.py) restated here on the tiny-animate networks, the CLI end to end on the tiny
set in both modes, the relighting LoRA's official key format, and the one-line refusals."""

import json
from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from wanx.pipeline import WanPipeline
from wanx.pipeline.conditioning.animate import Animate, padding_resize, ping_pong, valid_length
from wanx.pipeline.pipeline import _pad_text
from wanx.sampling import SAMPLERS, schedule

H, W = 32, 48  # the pose video's size: the output's
FACE = 512  # tiny-animate's motion encoder reads the official 512x512 face crops


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny-animate", device="cpu", dtype=torch.float32)


def frames(length, height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (length, height, width, 3), dtype=np.uint8)


# -- the official loop (wan/animate.py `WanAnimate.generate`), restated on our networks ---------


def official_inputs_padding(array, target_len):
    idx, flip, target_array = 0, False, []
    while len(target_array) < target_len:
        target_array.append(deepcopy(array[idx]))
        idx = idx - 1 if flip else idx + 1
        if idx == 0 or idx == len(array) - 1:
            flip = not flip
    return target_array[:target_len]


def official_get_valid_len(real_len, clip_len=81, overlap=1):
    real_clip_len = clip_len - overlap
    last_clip_num = (real_len - overlap) % real_clip_len
    extra = 0 if last_clip_num == 0 else real_clip_len - last_clip_num
    return real_len + extra


def official_get_i2v_mask(lat_t, lat_h, lat_w, mask_len=1, mask_pixel_values=None):
    msk = torch.zeros(1, (lat_t - 1) * 4 + 1, lat_h, lat_w) if mask_pixel_values is None else mask_pixel_values.clone()
    msk[:, :mask_len] = 1
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def official_padding_resize(img_ori, height, width):
    """cv2.resize(INTER_LINEAR) restated as torch bilinear (no cv2 here), the padding as official."""
    ori_height, ori_width = img_ori.shape[:2]
    img_pad = np.zeros((height, width, 3))

    def resize(img, w, h):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()

    if ori_height / ori_width > height / width:
        new_width = int(height / ori_height * ori_width)
        padding = int((width - new_width) / 2)
        img_pad[:, padding: padding + new_width, :] = resize(img_ori, new_width, height)
    else:
        new_height = int(width / ori_width * ori_height)
        padding = int((height - new_height) / 2)
        img_pad[padding: padding + new_height, :, :] = resize(img_ori, width, new_height)
    return np.uint8(img_pad)


def official_generate(pipe, pose, face, ref, bg, mask, *, clip_len, refert_num, steps, seed, guide_scale, context,
                      context_null, shift=5.0, sample_solver="unipc"):
    """`WanAnimate.generate` from the frames the official `prepare_source(_for_replace)` reads,
    fp32 on the CPU (no bf16 casts), our scheduler for the official one."""
    vae, dit, clip = pipe.vae, pipe.dit, pipe.image_encoder
    replace_flag = bg is not None
    seed_g = torch.Generator().manual_seed(seed)
    cond_images, face_images = list(pose), list(face)
    height, width = cond_images[0].shape[:2]
    refer_images = official_padding_resize(ref, height, width)
    real_frame_len = len(cond_images)
    target_len = official_get_valid_len(real_frame_len, clip_len, overlap=refert_num)
    cond_images = official_inputs_padding(cond_images, target_len)
    face_images = official_inputs_padding(face_images, target_len)
    if replace_flag:
        bg_images = official_inputs_padding(list(bg), target_len)
        mask_images = official_inputs_padding(list(mask[:, :, :, 0] / 255), target_len)
    start, end, all_out_frames, out_frames = 0, clip_len, [], None
    while True:
        if start + refert_num >= len(cond_images):
            break
        mask_reft_len = 0 if start == 0 else refert_num
        conditioning_pixel_values = rearrange(torch.tensor(np.stack(cond_images[start:end]) / 127.5 - 1),
                                              "t h w c -> 1 c t h w").float()
        face_pixel_values = rearrange(torch.tensor(np.stack(face_images[start:end]) / 127.5 - 1),
                                      "t h w c -> 1 c t h w").float()
        ref_pixel_values = rearrange(torch.tensor(refer_images / 127.5 - 1), "h w c -> 1 c h w").float()
        refer_t_pixel_values = torch.zeros(refert_num, 3, height, width)
        if start > 0:
            refer_t_pixel_values = rearrange(out_frames[0, :, -refert_num:].clone(), "c t h w -> t c h w")
        refer_t_pixel_values = rearrange(refer_t_pixel_values, "t c h w -> 1 c t h w")
        if replace_flag:
            bg_pixel_values = rearrange(torch.tensor(np.stack(bg_images[start:end]) / 127.5 - 1),
                                        "t h w c -> 1 c t h w").float()
            mask_pixel_values = rearrange(torch.tensor(np.stack(mask_images[start:end])[:, :, :, None]),
                                          "t h w c -> 1 t c h w").float()
        T = clip_len
        lat_h, lat_w, lat_t = height // 8, width // 8, T // 4 + 1
        noise = torch.randn(16, lat_t + 1, lat_h, lat_w, dtype=torch.float32, generator=seed_g)
        pose_latents = vae.encode(conditioning_pixel_values)
        ref_pixel_values = rearrange(ref_pixel_values, "t c h w -> 1 c t h w")
        ref_latents = vae.encode(ref_pixel_values)
        mask_ref = official_get_i2v_mask(1, lat_h, lat_w, 1)
        y_ref = torch.concat([mask_ref, ref_latents[0]])
        clip_context = clip(ref_pixel_values[0, :, 0][None])
        if replace_flag:
            m = rearrange(1 - mask_pixel_values, "b t c h w -> (b t) c h w")
            m = F.interpolate(m, size=(height // 8, width // 8), mode="nearest")
            m = rearrange(m, "(b t) c h w -> b t c h w", b=1)[:, :, 0]
            if mask_reft_len > 0:
                pixels = torch.concat([refer_t_pixel_values[0, :, :mask_reft_len],
                                       bg_pixel_values[0, :, mask_reft_len:]], dim=1)
            else:
                pixels = bg_pixel_values[0]
            msk_reft = official_get_i2v_mask(lat_t, lat_h, lat_w, mask_reft_len, mask_pixel_values=m)
        else:
            if mask_reft_len > 0:
                pixels = torch.concat([F.interpolate(refer_t_pixel_values[0, :, :mask_reft_len], size=(height, width),
                                                     mode="bicubic"),
                                       torch.zeros(3, T - mask_reft_len, height, width)], dim=1)
            else:
                pixels = torch.zeros(3, T - mask_reft_len, height, width)
            msk_reft = official_get_i2v_mask(lat_t, lat_h, lat_w, mask_reft_len)
        y_reft = torch.concat([msk_reft, vae.encode(pixels[None])[0]])
        y = torch.concat([y_ref, y_reft], dim=1)[None]

        def model(x, t):
            t = t.float().reshape(1)
            cond = dit(x, t, context, clip_context, y, pose_latents=pose_latents, face_pixel_values=face_pixel_values)
            if guide_scale <= 1:
                return cond
            uncond = dit(x, t, context_null, clip_context, y, pose_latents=pose_latents,
                         face_pixel_values=face_pixel_values * 0 - 1)
            return uncond + guide_scale * (cond - uncond)

        sigmas, timesteps = schedule(sample_solver, steps, shift)
        x0 = SAMPLERS[sample_solver](model, noise[None], sigmas, timesteps, generator=seed_g)
        out_frames = vae.decode(x0[:, :, 1:].float())
        if start != 0:
            out_frames = out_frames[:, :, refert_num:]
        all_out_frames.append(out_frames)
        start += clip_len - refert_num
        end += clip_len - refert_num
    return torch.cat(all_out_frames, dim=2)[:, :, :real_frame_len][0]


def test_padding_and_clip_count_as_official():
    for length, clip_len, refert in ((7, 5, 1), (11, 9, 5), (81, 77, 1), (77, 77, 1), (200, 77, 5), (2, 77, 1)):
        target = official_get_valid_len(length, clip_len, refert)
        assert valid_length(length, clip_len, refert) == target
        assert ping_pong(length, target) == official_inputs_padding(list(range(length)), target)
    image = frames(1, 40, 30, 5)[0]
    for size in ((32, 48), (48, 32), (40, 30)):  # taller, wider, same aspect
        assert np.array_equal(padding_resize(image, *size), official_padding_resize(image, *size))


CASES = [  # (mode, length, clip_len, refert_num, guidance): two clips each, the last padded and cut
    ("replace", 7, 5, 1, 2.0),  # guidance: the unconditional branch's blank face
    ("animate", 11, 9, 5, 1.0),
]


@pytest.mark.parametrize("mode, length, clip_len, refert, guidance", CASES, ids=[c[0] for c in CASES])
def test_two_clips_equal_the_official_loop(pipe, monkeypatch, mode, length, clip_len, refert, guidance):
    pose, face, ref = frames(length, H, W, 1), frames(length, FACE, FACE, 2), frames(1, 40, 30, 3)[0]
    bg = mask = None
    if mode == "replace":
        bg = frames(length, H, W, 4)
        mask = np.zeros((length, H, W, 3), np.uint8)
        mask[:, 8:24, 16:40] = 255
        mask[:, 8:24, 16:20] = 128  # soft edge: the mask is read as a fraction, not thresholded
    embeds = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    null = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1))
    made = []
    finish = Animate.finish_clip

    def keep(self, run, index, latents):  # the frames in float, before they become uint8
        made.append(finish(self, run, index, latents))
        return made[-1]

    monkeypatch.setattr(Animate, "finish_clip", keep)
    pipe.batch_cfg = False  # cond and uncond as two passes, as the official loop
    try:
        video = pipe(prompt_embeds=embeds, negative_prompt_embeds=null, pose_video=pose, face_video=face, image=ref,
                     background_video=bg, mask_video=mask, num_frames=clip_len, refert_num=refert,
                     num_inference_steps=1, guidance_scale=guidance, seed=7, progress=False)
    finally:
        pipe.batch_cfg = True
    assert len(made) == 2 and len(video) == length and video.size == (W, H)
    assert video.metadata["animate"] == {"mode": mode, "refert_num": refert, "clips": 2, "clip_frames": clip_len,
                                         "video_frames": length}
    with torch.no_grad():
        expected = official_generate(pipe, pose, face, ref, bg, mask, clip_len=clip_len, refert_num=refert, steps=1,
                                     seed=7, guide_scale=guidance, context=_pad_text(embeds, 512),
                                     context_null=_pad_text(null, 512))
    got = torch.cat(made, dim=1)
    assert got.shape == expected.shape == (3, length, H, W)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- the CLI: the preprocessed folder, end to end -----------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The official preprocessing's folders: animation (pose, face, reference) and replacement
    (also background and mask), 7 frames at 30 fps."""
    from PIL import Image

    from wanx.video import Video

    root = tmp_path_factory.mktemp("animate-inputs")
    for name in ("animate", "replace"):
        folder = root / name
        folder.mkdir()
        Video(frames(7, H, W, 1), fps=30).save(folder / "src_pose.mp4")
        Video(frames(7, FACE, FACE, 2), fps=30).save(folder / "src_face.mp4")
        Image.fromarray(frames(1, 40, 30, 3)[0]).save(folder / "src_ref.png")
        if name == "replace":
            Video(frames(7, H, W, 4), fps=30).save(folder / "src_bg.mp4")
            mask = np.zeros((7, H, W, 3), np.uint8)
            mask[:, 8:24, 16:40] = 255
            Video(mask, fps=30).save(folder / "src_mask.mp4")
    return root


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_cli_makes_the_input_length_at_the_pose_size(folders, tmp_path, mode):
    """Two clips of 5 frames carrying 1 make 9 frames, cut to the input's 7, at the pose video's
    32x48 and the official 30 fps; no prompt: the official one. Replacement with a step cache:
    its settings in the metadata (made once the first clip ran, before the file opens)."""
    import av

    from wanx.cli import main
    from wanx.video import read_video

    out = tmp_path / f"{mode}.mp4"
    assert main(["generate", "--model", "tiny-animate", "--animate-inputs", str(folders / mode), "--frames", "5",
                 "--steps", "1", "--seed", "1", "-o", str(out), "--quiet",
                 *(["--replace", "--teacache", "0.5"] if mode == "replace" else [])]) == 0
    assert read_video(out).frames.shape == (7, H, W, 3)
    with av.open(str(out)) as container:
        meta = dict(container.metadata)
        assert container.streams.video[0].average_rate == 30
    assert meta["task"] == "animate" and meta["prompt"] == "视频中的人在做动作"
    assert json.loads(meta["animate"]) == {"mode": mode, "refert_num": 1, "clips": 2, "clip_frames": 5,
                                           "video_frames": 7}
    if mode == "replace":
        assert json.loads(meta["cache"])["kind"] == "teacache"


# -- bad input: one line each, before any weight is read -------------------------------------------

BAD = [  # (model, flags, what the line says)
    ("tiny-animate", ["--animate-inputs", "{root}/no-face"], "src_face.mp4 is missing (animation needs src_pose.mp4, "
                                                             "src_face.mp4, src_ref.png"),
    ("tiny-animate", ["--animate-inputs", "{root}/animate", "--replace"], "src_bg.mp4 is missing (replacement needs"),
    ("tiny-animate", ["--animate-inputs", "{root}/short-face"], "the preprocessed videos differ in length (the pose "
                                                                "video 7, the face video 5 frames)"),
    ("tiny-animate", ["--animate-inputs", "{root}/small-face"], "the face video is 64x64; this model reads 512x512"),
    ("tiny-animate", ["--animate-inputs", "{root}/odd-size"], "the pose video is 40x32; the output takes its size, "
                                                              "which must be a multiple of 16"),
    ("tiny-animate", ["--animate-inputs", "{root}/animate", "--refert-num", "3"], "--refert-num must be 1 or 5"),
    ("tiny-animate", ["--animate-inputs", "{root}/animate", "--size", "64x64"],
     "--size does not apply to Animate: the output takes the pose video's size, 48x32; leave it unset"),
    ("tiny-animate", ["--animate-inputs", "{root}/animate", "--context-frames", "5"], "leave --context-frames unset"),
    ("tiny-animate", ["--animate-inputs", "{root}/animate", "--relighting"], "relighting_lora.ckpt is missing"),
    ("tiny-animate", ["--animate-inputs", "{root}/missing"], "no such folder"),
    ("tiny-animate", ["--image", "{root}/animate/src_ref.png"],
     "Animate needs the preprocessed inputs: give --animate-inputs (the official preprocessing's folder)"),
    ("tiny-animate", ["--extend", "{root}/animate/src_pose.mp4", "--extend-frames", "5"],
     "animate cannot continue a video"),
    ("tiny", ["--animate-inputs", "{root}/animate"], "--animate-inputs needs a Wan2.2 Animate model"),
    ("tiny", ["--refert-num", "5"], "--refert-num needs a Wan2.2 Animate model"),
    ("tiny-animate", ["--video", "{root}/animate/src_pose.mp4"], "--video needs a T2V model"),
    ("tiny-animate", ["--control-video", "{root}/animate/src_pose.mp4"], "--control-video needs a VACE model"),
]


@pytest.mark.parametrize("model, flags, message", BAD, ids=[f"{m}:{f[0]}:{i}" for i, (m, f, _) in enumerate(BAD)])
def test_bad_input_one_line_before_loading(folders, capsys, monkeypatch, tmp_path, model, flags, message):
    import shutil

    from wanx.cli import main
    from wanx.video import Video

    bad = {"no-face": None, "short-face": frames(5, FACE, FACE, 2), "small-face": frames(7, 64, 64, 2),
           "odd-size": None}
    for name, face in bad.items():
        folder = folders / name
        if folder.exists():
            continue
        shutil.copytree(folders / "animate", folder)
        (folder / "src_face.mp4").unlink()
        if face is not None:
            Video(face, fps=30).save(folder / "src_face.mp4")
        if name == "odd-size":
            shutil.copy(folders / "animate" / "src_face.mp4", folder)
            Video(frames(7, 32, 40, 1), fps=30).save(folder / "src_pose.mp4")

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was refused")

    monkeypatch.setattr(WanPipeline, "from_files", refuse)
    out = tmp_path / "out.mp4"
    code = main(["generate", "--model", model, "--steps", "1", "-o", str(out), "--quiet",
                 *(["--prompt", "a cat"] if model == "tiny" else []),
                 *[flag.format(root=folders) for flag in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("wanx: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


# -- the server: the preprocessed files come as uploads --------------------------------------------


def test_server_takes_animate_uploads_and_a_t2v_server_refuses_them(folders, tmp_path):
    """Replacement from four video uploads and the reference image, under server-made names, at
    the pose video's size and length; a T2V model's server refuses a pose video in one line, a
    folder path is not a request key."""
    from fastapi.testclient import TestClient

    from tests.serve.conftest import wait_for
    from wanx.hub import find_components, resolve_model
    from wanx.runtime import Runtime
    from wanx.serve.app import Server, create_app
    from wanx.video import read_video

    runtime = Runtime.create("cpu")
    folder = folders / "replace"
    for model in ("tiny-animate", "tiny"):
        files = find_components(resolve_model(model))
        pipe = WanPipeline.from_files(files, runtime=runtime) if model == "tiny-animate" else None
        server = Server(pipe, files, runtime, tmp_path / model, model_name=model)
        body = {"frames": 5, "steps": 1, "seed": 1, **({"prompt": "a cat"} if model == "tiny" else {})}
        parts = [("pose_video", ("p.mp4", (folder / "src_pose.mp4").read_bytes(), "video/mp4"))]
        if model == "tiny-animate":
            parts += [(field, (f"{field}.mp4", (folder / file).read_bytes(), "video/mp4")) for field, file in
                      (("face_video", "src_face.mp4"), ("background_video", "src_bg.mp4"),
                       ("mask_video", "src_mask.mp4"))]
            parts.append(("image", ("r.png", (folder / "src_ref.png").read_bytes(), "image/png")))
        with TestClient(create_app(server, ui=False, worker=model == "tiny-animate"),
                        base_url="http://localhost") as client:
            answer = client.post("/v1/videos", data={"request": json.dumps(body)}, files=parts)
            if model == "tiny":
                assert answer.status_code == 422 and answer.json()["field"] == "pose_video", answer.text
                assert "pose_video needs a Wan2.2 Animate or S2V model" in answer.json()["detail"]
                assert list((server.outputs / "inputs").iterdir()) == []
                answer = client.post("/v1/videos", json={**body, "animate_inputs": str(folder)})
                assert answer.status_code == 422 and answer.json()["field"] == "animate_inputs", answer.text
                continue
            assert answer.status_code == 202, answer.text
            job = wait_for(client, answer.json()["id"])
            assert job["status"] == "done", job
            assert job["inputs"] == ["background_video", "face_video", "image", "mask_video", "pose_video"]
            got = tmp_path / "got.mp4"
            got.write_bytes(client.get(f"/v1/videos/{job['id']}/content").content)
            assert read_video(got).frames.shape == (7, H, W, 3)
            assert job["settings"]["animate"]["mode"] == "replace"
        server.queue.stop(timeout=10)


def test_the_ui_has_an_animate_tab_with_its_uploads(tmp_path):
    from wanx.hub import find_components, resolve_model
    from wanx.runtime import Runtime
    from wanx.serve.app import Server
    from wanx.serve.ui import build_ui, placeholders

    server = Server(None, find_components(resolve_model("tiny-animate")), Runtime.create("cpu"), tmp_path / "ui",
                    model_name="tiny-animate")
    try:
        ids = {getattr(block, "elem_id", None) for block in build_ui(server).blocks.values()}
    finally:
        server.queue.stop(timeout=10)
    assert {"pose_video", "face_video", "background_video", "mask_video", "image"} <= ids
    assert placeholders({}, "animate")["steps"] == "20" and placeholders({}, "animate")["frames"] == "77"


# -- the relighting LoRA ----------------------------------------------------------------------------

OFFICIAL_LORA_TARGETS = [f"{attn}.{proj}" for attn, projs in (("self_attn", "qkvo"), ("cross_attn", "qkvo"))
                         for proj in projs] + ["cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"]


def relighting_ckpt(path, layers, dim, rank=4):
    """What the official `_configure_model` loads: torch.load(...)["state_dict"], PEFT's keys
    (`get_peft_model_state_dict`: no adapter name) for every Linear of the main blocks
    (`get_loraconfig`: not face_adapter's, not modulation)."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for i in range(layers):
        for target in OFFICIAL_LORA_TARGETS:
            out_dim = 64 if target == "ffn.0" else dim
            in_dim = 64 if target == "ffn.2" else dim  # k_img/v_img read the projected CLIP tokens (dim)
            state[f"blocks.{i}.{target}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g) * 0.1
            state[f"blocks.{i}.{target}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
    torch.save({"state_dict": state}, path)


def test_relighting_lora_in_the_official_format_applies_whole(folders, tmp_path, capsys):
    """--relighting reads the model folder's relighting_lora.ckpt (weights_only) and applies every
    module of it, at strength 1 (rank = alpha, as the official LoraConfig(r=128, lora_alpha=128))."""
    import shutil

    import av

    from wanx.cli import main
    from wanx.hub import resolve_model
    from wanx.lora import read_lora

    model = tmp_path / "tiny-animate"
    shutil.copytree(resolve_model("tiny-animate"), model)
    relighting_ckpt(model / "relighting_lora.ckpt", layers=2, dim=32)
    lora = read_lora(model / "relighting_lora.ckpt")
    assert len(lora.modules) == 2 * len(OFFICIAL_LORA_TARGETS)
    out = tmp_path / "relit.mp4"
    assert main(["generate", "--model", str(model), "--animate-inputs", str(folders / "replace"), "--replace",
                 "--relighting", "--frames", "5", "--steps", "1", "--seed", "1", "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "LoRA relighting: official format, 24/24 modules matched, rank 4, strength 1" in err, err
    with av.open(str(out)) as container:
        assert json.loads(container.metadata["loras"])[0]["name"] == "relighting"


def test_python_api_refusals(pipe):
    """The Python face: the official refusals in its keywords, before any work."""
    given = dict(pose_video=frames(7, H, W, 1), face_video=frames(7, FACE, FACE, 2), image=frames(1, 40, 30, 3)[0])
    with pytest.raises(ValueError, match="^output_type='latents' is not available for Animate"):
        pipe(**given, output_type="latents", progress=False)
    with pytest.raises(ValueError, match="^refert_num must be 1 or 5"):
        pipe.plan(**given, refert_num=3)
    with pytest.raises(ValueError, match="^num_frames 5 is a clip's length; it must be above refert_num 5"):
        pipe.plan(**given, refert_num=5, num_frames=5)
    with pytest.raises(ValueError, match="^background_video is for replacement: drop it, or ask for replace"):
        pipe.plan(**given, background_video=frames(7, H, W, 4), mask_video=frames(7, H, W, 5), replace=False)
    with pytest.raises(ValueError, match=r"^replacement needs mask_video \(the preprocessed src_mask.mp4\)"):
        pipe.plan(**given, background_video=frames(7, H, W, 4))
    with pytest.raises(ValueError, match="^the background video is 32x48; it needs the pose video's size, 48x32"):
        pipe.plan(**given, background_video=frames(7, W, H, 4), mask_video=frames(7, H, W, 5))
    with pytest.raises(ValueError, match="^give animate_inputs .* or pose_video, not both"):
        pipe.plan(**given, animate_inputs="somewhere")
    reference = torch.from_numpy(given["image"]).permute(2, 0, 1) / 127.5 - 1  # a tensor in [-1, 1] as well
    from_tensor = pipe.plan(**{**given, "image": reference}).animate.reference
    assert np.array_equal(from_tensor, pipe.plan(**given).animate.reference)
    plan = pipe.plan(**given, background_video=frames(7, H, W, 4), mask_video=frames(7, H, W, 5))
    assert plan.animate.replace and plan.prompt == "视频中的人在做动作"
    assert (plan.steps, plan.num_frames) == (4, 5)  # the tiny folder's defaults


@pytest.mark.parametrize("prefix, adapter", [("", ""), ("base_model.model.", ""), ("", ".default")])
def test_relighting_keys_as_peft_may_store_them(tmp_path, prefix, adapter):
    """set_peft_model_state_dict takes PEFT's keys bare, under get_peft_model's `base_model.model.`
    or with the adapter's name: each reads as the same official modules."""
    from wanx.lora import read_lora

    relighting_ckpt(tmp_path / "plain.ckpt", layers=1, dim=32)
    state = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    renamed = {prefix + key.replace(".weight", f"{adapter}.weight"): value for key, value in state.items()}
    torch.save({"state_dict": renamed}, tmp_path / "relighting_lora.ckpt")
    lora = read_lora(tmp_path / "relighting_lora.ckpt")
    assert sorted(lora.modules) == sorted(f"blocks.0.{target}" for target in OFFICIAL_LORA_TARGETS)


def test_two_ranks_cfg_parallel_decode_every_clip(folders, tmp_path):
    """Every rank decodes each clip (the next one starts from its frames), rank 0 alone writes:
    two CPU ranks with CFG parallel make the frames of one process (PNG frames: lossless; a
    pixel may round the other way, the halves run as batches of one)."""
    from PIL import Image

    from wanx.cli import main

    args = ["generate", "--model", "tiny-animate", "--animate-inputs", str(folders / "animate"), "--frames", "5",
            "--steps", "1", "--seed", "1", "--guidance", "2", "--device", "cpu", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert main([*args, "--gpus", "2", "--cfg-parallel", "--sp", "none", "-o", str(tmp_path / "two")]) == 0

    def read(folder):
        return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.iterdir())])

    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert one.shape == two.shape == (7, H, W, 3)
    assert np.abs(one - two).max() <= 2
