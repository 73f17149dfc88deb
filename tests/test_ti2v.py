"""Wan2.2 TI2V-5B in the one pipeline, on `tiny-ti2v`: text-to-video, and image-to-video with
the image as latent frame 0 (re-imposed after every step, its tokens at timestep 0), checked
against the official loop restated here from the DiT, the VAE and the schedule."""

import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from wanx.cli import main
from wanx.hub import tiny_model_dir
from wanx.pipeline import WanPipeline, best_output_size
from wanx.tasks import NEGATIVE_PROMPT
from wanx.sampling import schedule
from wanx.video import read_video, to_unit


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny-ti2v", device="cpu", dtype=torch.float32)


def official_loop(pipe, context, context_null, image, height, width, frames, steps, shift, guidance, seed):
    """wan/textimage2video.py (t2v and i2v) restated with the flow Euler step: mask2 zero on
    latent frame 0 in I2V (all ones in T2V); latent = (1 - mask2) z + mask2 noise; per step the
    per-token timestep = channel 0 of mask2 subsampled by the 2x2 patch, times t; cond and
    uncond with the same latent and timesteps; then latent = (1 - mask2) z + mask2 latent."""
    dit, vae = pipe.dit, pipe.vae
    shape = (48, (frames - 1) // 4 + 1, height // 16, width // 16)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    mask2 = torch.ones(shape)
    z = torch.zeros(48, 1, *shape[2:])
    if image is not None:
        mask2[:, 0] = 0
        z = vae.encode(image[:, None][None])[0].float()
    latent = (1 - mask2) * z + mask2 * noise
    sigmas, timesteps = schedule("euler", steps, shift)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            temp_ts = (mask2[0][:, ::2, ::2] * t).flatten()[None]
            cond = dit(latent[None], temp_ts, context)[0]
            uncond = dit(latent[None], temp_ts, context_null)[0]
            latent = latent + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (cond - uncond))
            latent = (1 - mask2) * z + mask2 * latent
    return latent[None], z


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_pipeline_equals_the_official_loop(pipe, mode):
    gen = torch.Generator().manual_seed(3)
    context, context_null = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    image = None
    if mode == "i2v":  # an image already at the output size: the resize and crop keep it as it is
        pixels = (torch.rand(64, 96, 3, generator=gen) * 255).to(torch.uint8).numpy()
        image = to_unit(pixels)
    ours = pipe(prompt_embeds=context, negative_prompt_embeds=context_null, image=image, height=64, width=96,
                num_frames=9, steps=3, shift=5.0, guidance=5.0, seed=11, sampler="euler", output_type="latents",
                progress=False)
    want, z = official_loop(pipe, context, context_null, image, 64, 96, 9, 3, 5.0, 5.0, 11)
    assert ours.shape == (1, 48, 3, 4, 6)
    assert (ours - want).abs().max() < 1e-5
    if mode == "i2v":
        assert torch.equal(ours[0, :, :1], z)  # frame 0 is exactly the encoded image


def test_frame_zero_is_the_image_with_unipc(pipe):
    image = torch.rand(3, 40, 50) * 2 - 1
    plan = pipe.plan("a cat", image=image, height=64, width=64)
    latents = pipe("a cat", image=image, height=64, width=64, num_frames=5, steps=3, seed=2, output_type="latents",
                   progress=False)
    z = pipe.vae.encode(plan.image[:, None][None]).float()
    assert latents.shape[2:] == (2, plan.height // 16, plan.width // 16)
    assert torch.equal(latents[:, :, :1], z)


def test_size_rule_worked_examples():
    """Reference §4: best_output_size(iw, ih, 32, 32, 704 * 1280)."""
    area = 704 * 1280
    assert best_output_size(1280, 720, 32, 32, area) == (1248, 704)
    assert best_output_size(1024, 1024, 32, 32, area) == (960, 928)
    assert best_output_size(1280, 704, 32, 32, area) == (1280, 704)
    assert best_output_size(30, 400, 32, 32, 32 * 32) == (32, 96)  # a side of at least 32, not a division by zero


def test_defaults_from_the_plan(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "defaults", {})  # the official ones, not the tiny set's own (64x64, 5 frames)
    plan = pipe.plan("a cat", seed=1)
    assert (plan.task, plan.width, plan.height, plan.num_frames, plan.fps) == ("ti2v", 1280, 704, 121, 24)
    assert (plan.steps, plan.shift, plan.guidance, plan.sampler) == (50, 5.0, 5.0, "unipc")
    assert plan.negative_prompt == NEGATIVE_PROMPT and plan.latent_shape() == (48, 31, 44, 80)
    # I2V: the default area, the image's aspect ratio, multiples of 32 (the official 1248x704 for 16:9)
    plan = pipe.plan("a cat", image=torch.zeros(3, 720, 1280), seed=1)
    assert (plan.width, plan.height, plan.num_frames) == (1248, 704, 121)
    assert tuple(plan.image.shape) == (3, 704, 1248)
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.plan("a cat", height=48, width=64)
    with pytest.raises(ValueError, match="FLF2V"):
        pipe.plan("a cat", image=torch.zeros(3, 64, 64), last_image=torch.zeros(3, 64, 64))


def test_mismatched_vae_is_named_before_loading(tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir("tiny-ti2v"), folder)
    (folder / "Wan2.2_VAE.pth").unlink()
    shutil.copy(tiny_model_dir("tiny") / "Wan2.1_VAE.pth", folder)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors.*needs Wan2.2_VAE.pth.*Wan2.1_VAE.pth"):
        WanPipeline.from_pretrained(folder, device="cpu")
    folder = tmp_path / "mixed21"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    (folder / "Wan2.1_VAE.pth").unlink()
    shutil.copy(tiny_model_dir("tiny-ti2v") / "Wan2.2_VAE.pth", folder)
    with pytest.raises(ValueError, match="needs Wan2.1_VAE.pth"):
        WanPipeline.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_cli_end_to_end(tmp_path, mode):
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", "tiny-ti2v", "--prompt", "a cat walks", "--size", "96x64", "--frames", "5",
            "--steps", "2", "--seed", "4", "--quiet", "--output", str(out)]
    if mode == "i2v":
        image = tmp_path / "first.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8)).save(image)
        args += ["--image", str(image)]
    assert main(args) == 0
    video = read_video(out)
    # I2V: the area 96x64 at the image's 5:3 -> best_output_size gives 96x64 as well
    assert video.frames.shape == (5, 64, 96, 3) and video.fps == 24
    with av.open(str(out)) as container:
        meta = container.metadata
    assert meta.get("task") == "ti2v" and meta.get("mode") == mode and meta.get("model") == "tiny-ti2v"


def test_info_names_the_wan22_parts(capsys):
    folder = tiny_model_dir("tiny-ti2v")
    assert main(["info", str(folder / "diffusion_pytorch_model.safetensors"), str(folder / "Wan2.2_VAE.pth")]) == 0
    text = capsys.readouterr().out
    assert "Wan2.2 TI2V DiT" in text and "Wan2.2 VAE" in text


def test_prepare_and_train_a_lora(tmp_path, capsys):
    """`wanx prepare` encodes through the Wan2.2 VAE (48 channels, 16x); `wanx train` runs a
    LoRA on the 48-channel DiT, and the LoRA loads into the TI2V pipeline."""
    from safetensors.torch import load_file

    from tests.training.test_prepare import moving_square

    data = tmp_path / "data"
    data.mkdir()
    moving_square(12).save(data / "clip.mp4")
    (data / "metadata.csv").write_text("file_name,text\nclip.mp4,a red square moves right\n", encoding="utf-8")
    assert main(["prepare", str(data), "--model", "tiny-ti2v", "--size", "64x48", "--frames", "9", "--quiet"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert main(["prepare", str(data), "--model", "tiny-ti2v", "--size", "64x64", "--frames", "9", "--quiet"]) == 0
    (item,) = [p for p in (data / ".wanx-cache").glob("clip-*.safetensors")]
    assert tuple(load_file(str(item))["latents"].shape) == (48, 3, 4, 4)
    assert main(["train", "--data", str(data), "--model", "tiny-ti2v", "--output", str(tmp_path / "run"),
                 "--lora-rank", "4", "--steps", "2", "--quiet"]) == 0
    pipe = WanPipeline.from_pretrained("tiny-ti2v", device="cpu")
    assert pipe.load_lora(tmp_path / "run" / "run.safetensors").matched == 20


def test_the_tiny_vae_is_make_tiny_vae22s(tmp_path):
    from wanx.tiny import make_tiny_vae22

    path = make_tiny_vae22(tmp_path / "Wan2.2_VAE.pth")
    assert path.read_bytes() == (tiny_model_dir("tiny-ti2v") / "Wan2.2_VAE.pth").read_bytes()


def test_served_with_and_without_an_image(pipe, tmp_path):
    """`wanx serve` on a TI2V model: one task, the image optional."""
    import io
    import json

    TestClient = pytest.importorskip("fastapi.testclient").TestClient  # the [serve] extra

    from tests.serve.conftest import wait_for
    from wanx.hub import find_components
    from wanx.runtime import Runtime
    from wanx.serve.app import Server, create_app

    files = find_components(tiny_model_dir("tiny-ti2v"))
    server = Server(pipe, files, Runtime.create("cpu"), tmp_path / "out", model_name="tiny-ti2v")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(png, "PNG")
    body = {"prompt": "a cat", "size": "96x64", "frames": 5, "steps": 2}
    try:
        with TestClient(create_app(server, ui=False), base_url="http://localhost") as client:
            assert client.get("/v1/model").json()["tasks"] == ["ti2v"]
            text = client.post("/v1/videos", json=body).json()["id"]
            image = client.post("/v1/videos", data={"request": json.dumps(body)},
                                files={"image": ("first.png", png.getvalue(), "image/png")}).json()["id"]
            for job_id in (text, image):
                job = wait_for(client, job_id)
                assert job["status"] == "done", job
    finally:
        server.queue.stop(timeout=10)


def test_unipc_with_frame_zero_reimposed_equals_diffusers_scheduler(pipe):
    """The re-imposition between UniPC steps as the official loop does it (after
    scheduler.step, whose corrector keeps its own last_sample), with diffusers' UniPC
    scheduler (test-only oracle, the official flow configuration) as the solver."""
    UniPC = pytest.importorskip("diffusers").UniPCMultistepScheduler
    gen = torch.Generator().manual_seed(5)
    context, context_null = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    image = torch.rand(3, 64, 96, generator=gen) * 2 - 1
    steps, shift, guidance, seed = 6, 5.0, 5.0, 9
    ours = pipe(prompt_embeds=context, negative_prompt_embeds=context_null, image=image, height=64, width=96,
                num_frames=9, steps=steps, shift=shift, guidance=guidance, seed=seed, sampler="unipc",
                output_type="latents", progress=False)

    prepared = pipe.plan(prompt_embeds=context, image=image, height=64, width=96).image
    shape = (48, 3, 4, 6)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    mask2 = torch.ones(shape)
    mask2[:, 0] = 0
    with torch.no_grad():
        z = pipe.vae.encode(prepared[:, None][None])[0].float()
        latent = (1 - mask2) * z + mask2 * noise
        scheduler = UniPC(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                          flow_shift=shift)
        scheduler.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1].copy())
        for t in scheduler.timesteps:
            temp_ts = (mask2[0][:, ::2, ::2] * t).flatten()[None].float()
            cond = pipe.dit(latent[None], temp_ts, context)[0]
            uncond = pipe.dit(latent[None], temp_ts, context_null)[0]
            latent = scheduler.step((uncond + guidance * (cond - uncond))[None], t, latent[None]).prev_sample[0]
            latent = (1 - mask2) * z + mask2 * latent
    assert (ours[0] - latent).abs().max() <= 1e-4 * latent.abs().max()
    assert torch.equal(ours[0, :, :1], z)


def test_calibrate_cache_fits_a_ti2v_model(tmp_path):
    """TI2V-5B's default task needs no image, so its text-to-video prompts calibrate a step
    cache for it (the task table decides; before, only model type "t2v" was let through)."""
    import json

    out = tmp_path / "calibration.json"
    assert main(["calibrate-cache", "--model", "tiny-ti2v", "--steps", "10", "--output", str(out), "--quiet"]) == 0
    fitted = json.loads(out.read_text(encoding="utf-8"))
    assert len(fitted["teacache"]) == 5 and len(fitted["magcache"]) == 2 * 10  # a ratio per step and branch
