import pytest
import torch

from wanx.pipeline import WanPipeline, plan_request
from wanx.pipeline.conditioning import Run, conditioning_for
from wanx.pipeline.conditioning.base import size_for_image
from wanx.tasks import TASKS


@pytest.fixture(scope="module")
def pipes():
    return {name: WanPipeline.from_pretrained(name, device="cpu", dtype=torch.float32) for name in ("tiny", "tiny-flf2v")}


SMALL = dict(height=32, width=48, num_frames=9, steps=3, progress=False)


def test_seed_draws_the_official_noise(pipes):
    pipe = pipes["tiny"]
    noise = torch.randn(16, 3, 4, 6, generator=torch.Generator("cpu").manual_seed(11))
    by_seed = pipe("a cat", seed=11, output_type="latents", **SMALL)
    by_latents = pipe("a cat", latents=noise, output_type="latents", **SMALL)
    # Bit-equal on purpose: the same pipeline object (same weight tensors) runs the same ops
    # on bit-identical noise, so nothing may differ; any mismatch means other noise was drawn.
    assert torch.equal(by_seed, by_latents)


@pytest.mark.parametrize("sampler", ["unipc", "dpm++", "euler", "lcm"])
def test_step_callback_sees_every_step_and_can_stop_the_call(pipes, sampler):
    pipe = pipes["tiny"]
    calls = []
    final = pipe("a cat", seed=3, sampler=sampler, output_type="latents",
                 callback=lambda step, total, x: calls.append((step, total, x.clone())), **SMALL)
    assert [(step, total) for step, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert calls[0][2].shape == final.shape and torch.equal(calls[-1][2], final)  # the sampler's own state

    class Stop(Exception):
        pass

    def stop_at_two(step, total, x):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        pipe("a cat", seed=3, sampler=sampler, callback=stop_at_two, **SMALL)
    assert torch.equal(pipe("a cat", seed=3, sampler=sampler, output_type="latents", **SMALL), final)  # no state left


def test_request_errors_name_the_argument():
    from wanx.pipeline import RequestError

    with pytest.raises(RequestError, match="num_frames 6 must be 4k\\+1") as err:
        plan_request("t2v", "x", num_frames=6)
    assert err.value.field == "num_frames" and isinstance(err.value, ValueError)
    with pytest.raises(RequestError) as err:
        plan_request("t2v", "x", width=100, height=48)
    assert err.value.field == "width"
    with pytest.raises(RequestError) as err:
        plan_request("i2v", "x")
    assert err.value.field == "image"


def test_batched_and_two_pass_guidance_agree(pipes):
    pipe = pipes["tiny"]
    batched = pipe("a cat", seed=1, output_type="latents", **SMALL)
    pipe.batch_cfg = False
    try:
        two_pass = pipe("a cat", seed=1, output_type="latents", **SMALL)
    finally:
        pipe.batch_cfg = True
    assert torch.allclose(batched, two_pass, atol=1e-5)


def test_prompt_embeds_replace_the_text_encoder(pipes):
    pipe = pipes["tiny"]
    emb, _ = pipe.text_encoder.encode(["a cat", TASKS["t2v"].negative_prompt])
    direct = pipe(prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], seed=2, output_type="latents", **SMALL)
    assert torch.allclose(direct, pipe("a cat", seed=2, output_type="latents", **SMALL), atol=1e-6)


def test_flf2v_mask_and_conditioning(pipes, monkeypatch):
    pipe = pipes["tiny-flf2v"]
    monkeypatch.setattr(pipe, "defaults", {})  # the official ones, not the tiny set's own (4 steps)
    first, last = torch.rand(3, 40, 60) * 2 - 1, torch.rand(3, 50, 50) * 2 - 1
    plan = pipe.plan("x", image=first, last_image=last, height=32, width=48, num_frames=13)
    assert (plan.steps, plan.shift, plan.guidance) == (50, 16.0, 5.5)  # official FLF2V defaults
    assert plan.negative_prompt.startswith("镜头切换，镜头晃动，")
    cond = conditioning_for(plan.spec)(plan).inputs(Run(pipe, False))
    mask = cond["y"][0, :4]  # [4, F'=4, h, w]
    assert cond["y"].shape[1] == 20 and cond["clip_features"].shape == (1, 514, 160)
    assert mask[:, 0].eq(1).all() and mask[:, 1:3].eq(0).all()
    assert mask[3, -1].eq(1).all() and mask[:3, -1].eq(0).all()  # last pixel frame = channel 3 of the last latent


def test_i2v_defaults_and_size():
    image = torch.zeros(3, 720, 1280)
    plan = plan_request("i2v", "x", image=image, height=480, width=832)
    assert (plan.steps, plan.shift, plan.guidance) == (40, 3.0, 5.0)  # 480P I2V shift 3
    assert (plan.height, plan.width) == (464, 832) == size_for_image(image, 480 * 832)
    assert plan_request("i2v", "x", image=image, height=720, width=1280).shift == 5.0


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_diffusers_layout_folder_gives_the_same_video(pipes, tmp_path, name):
    """The same weights as a diffusers repository (transformer/, vae/, text_encoder/,
    tokenizer/, image_encoder/) are found by content and give identical latents."""
    import shutil

    from tests.models.test_clip import transformers_oracle as clip_oracle
    from tests.models.test_t5 import transformers_oracle as t5_oracle
    from tests.oracles import write_diffusers_dit, write_diffusers_vae
    from wanx.tiny import tiny_model_dir

    official = WanPipeline.from_pretrained(name, device="cpu", dtype=torch.float32)
    root = tmp_path / "Wan2.1-tiny-Diffusers"
    write_diffusers_dit(root / "transformer", official.dit)
    write_diffusers_vae(root / "vae", official.vae)
    t5_oracle(official.text_encoder.model).save_pretrained(root / "text_encoder")
    shutil.copytree(tiny_model_dir(name) / "google" / "umt5-xxl", root / "tokenizer")
    kwargs = {}
    if official.image_encoder is not None:
        clip_oracle(official.image_encoder).save_pretrained(root / "image_encoder")
        # Its own generator: from_pretrained above may have just made the tiny model set
        # (which seeds torch's global RNG) or found it made by an earlier test.
        kwargs["image"] = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    converted = WanPipeline.from_pretrained(root, device="cpu", dtype=torch.float32)
    a = official("a cat", seed=4, output_type="latents", **SMALL, **kwargs)
    b = converted("a cat", seed=4, output_type="latents", **SMALL, **kwargs)
    assert torch.allclose(a, b, atol=1e-5)


def test_model_ids_are_downloaded_with_huggingface_hub(monkeypatch, tmp_path):
    """No network here: check the call wanx makes (the real download is huggingface_hub's)."""
    import huggingface_hub

    from wanx.hub import resolve_model

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, local_dir=None: calls.append(repo) or str(tmp_path))
    assert resolve_model("Wan-AI/Wan2.1-T2V-1.3B") == tmp_path and calls == ["Wan-AI/Wan2.1-T2V-1.3B"]
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        resolve_model("./not/a/folder/or/id")


def test_i2v_folder_without_clip_is_refused_before_loading(pipes, tmp_path):
    import shutil

    from wanx.hub import find_components
    from wanx.tiny import tiny_model_dir

    folder = tmp_path / "i2v"
    shutil.copytree(tiny_model_dir("tiny-i2v"), folder)
    (folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").unlink()
    with pytest.raises(FileNotFoundError, match="i2v model needs the CLIP image encoder"):
        find_components(folder)
    assert find_components(tiny_model_dir("tiny-i2v")).model_type == "i2v"


def test_a_model_folder_carries_its_own_generation_defaults(tmp_path):
    """`wanx-defaults.json` fills what a request leaves unset, before the official defaults;
    what the request gives wins; "" is a negative prompt (the empty text), not "unset"."""
    import json
    import shutil

    from wanx.cli import main
    from wanx.tiny import tiny_model_dir

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    own = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 2.5,
           "shift": 2.0, "sampler": "euler", "negative_prompt": ""}
    (folder / "wanx-defaults.json").write_text(json.dumps(own), encoding="utf-8")
    pipe = WanPipeline.from_pretrained(folder)
    plan = pipe.plan("x", seed=1)
    assert (plan.width, plan.height, plan.num_frames, plan.steps, plan.guidance, plan.shift, plan.sampler,
            plan.negative_prompt) == (48, 32, 9, 3, 2.5, 2.0, "euler", "")
    plan = pipe.plan("x", "blur", width=64, height=64, num_frames=5, num_inference_steps=4, guidance_scale=1.5,
                     shift=7.0, sampler="unipc", seed=1)
    assert (plan.width, plan.height, plan.num_frames, plan.steps, plan.guidance, plan.shift, plan.sampler,
            plan.negative_prompt) == (64, 64, 5, 4, 1.5, 7.0, "unipc", "blur")
    official = plan_request("t2v", "x", "", seed=1)  # no folder settings: "" still means the empty text
    assert official.negative_prompt == "" and (official.width, official.num_frames, official.steps) == (832, 81, 50)
    assert plan_request("t2v", "x", seed=1).negative_prompt == TASKS["t2v"].negative_prompt
    video = pipe("x", seed=1, progress=False)
    assert video.frames.shape == (9, 32, 48, 3)

    (folder / "wanx-defaults.json").write_text(json.dumps({"frames": 9}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown setting 'frames'; known: width, height, num_frames"):
        WanPipeline.from_pretrained(folder)
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--output", str(tmp_path / "x.mp4")]) == 2
    assert not (tmp_path / "x.mp4").exists()


def dit_timesteps(pipe, monkeypatch) -> list:
    """The timestep the DiT receives at each call, recorded on the way in."""
    seen, forward = [], pipe.dit.forward

    def spy(x, t, *args, **kwargs):
        seen.append(float(t.flatten()[0]))
        return forward(x, t, *args, **kwargs)

    monkeypatch.setattr(pipe.dit, "forward", spy)
    return seen


@pytest.mark.parametrize("sampler", ["euler", "lcm"])
def test_timesteps_are_the_step_list_the_releases_run(pipes, sampler, monkeypatch):
    pipe = pipes["tiny"]
    small = dict(SMALL, steps=None, guidance_scale=1.0, seed=5, sampler=sampler, output_type="latents")
    # lightx2v's 4-step list is the 4-step Euler/LCM grid: the same run, bit for bit
    listed = pipe("a cat", timesteps=[1000, 750, 500, 250], shift=5.0, **small)
    assert torch.equal(listed, pipe("a cat", num_inference_steps=4, shift=5.0, **small))
    # any list: sigma = t / 1000, shifted; the DiT gets sigma x 1000, one call per step (no CFG)
    seen = dit_timesteps(pipe, monkeypatch)
    pipe("a cat", timesteps=[1000, 900, 600, 200], shift=3.0, **small)
    s = torch.tensor([1000, 900, 600, 200], dtype=torch.float64) / 1000
    assert seen == pytest.approx((3 * s / (1 + 2 * s) * 1000).tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="num_inference_steps 3 disagrees with the 4 timesteps"):
        pipe("a cat", timesteps=[1000, 750, 500, 250], num_inference_steps=3, **small)


def test_lcm_noise_comes_from_the_seed(pipes):
    pipe = pipes["tiny"]
    small = dict(SMALL, guidance_scale=1.0, sampler="lcm", output_type="latents")
    a, b = pipe("a cat", seed=5, **small), pipe("a cat", seed=5, **small)
    assert torch.equal(a, b)  # fresh noise at each step, all of it from the seed
    # given latents: the step noise still follows the seed
    noise = torch.randn(16, 3, 4, 6, generator=torch.Generator("cpu").manual_seed(9))
    c, d = (pipe("a cat", seed=seed, latents=noise, **small) for seed in (5, 6))
    assert not torch.equal(c, d)
    assert not torch.equal(a, pipe("a cat", seed=5, **dict(small, sampler="euler")))


def test_timesteps_with_video_to_video_strength(pipes, monkeypatch):
    pipe = pipes["tiny"]
    video = torch.rand(3, 9, 32, 48) * 2 - 1
    seen = dit_timesteps(pipe, monkeypatch)
    steps = []
    pipe("a cat", video=video, strength=0.5, timesteps=[1000, 750, 500, 250], shift=5.0, guidance_scale=1.0,
         sampler="lcm", seed=1, progress=False, output_type="latents", callback=lambda i, n, x: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]  # the last half of the list
    assert seen == pytest.approx([5 * 0.5 / 3 * 1000, 5 * 0.25 / 2 * 1000], abs=1e-3)


def test_timesteps_replace_the_folder_s_step_count():
    from wanx.pipeline import RequestError

    plan = plan_request("t2v", "x", timesteps=[1000, 500], model_defaults={"num_inference_steps": 30})
    assert plan.steps == 2 and plan.timesteps == (1000.0, 500.0)
    assert plan_request("t2v", "x", timesteps=[1000, 500], num_inference_steps=2).steps == 2
    for bad, field in (([500, 1000], "timesteps"), ([], "timesteps"), ([1000, 0], "timesteps")):
        with pytest.raises(RequestError) as err:
            plan_request("t2v", "x", timesteps=bad)
        assert err.value.field == field
    assert plan_request("t2v", "x").timesteps is None
