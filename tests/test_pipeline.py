import os

import pytest
import torch

from wanx.pipeline import NEGATIVE_PROMPTS, WanPipeline, _size_for_image, plan_request


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    old = os.environ.get("WANX_HOME")
    os.environ["WANX_HOME"] = str(tmp_path_factory.mktemp("wanx-home"))
    try:
        yield {name: WanPipeline.from_pretrained(name, device="cpu", dtype=torch.float32)
               for name in ("tiny", "tiny-flf2v")}
    finally:
        if old is None:
            os.environ.pop("WANX_HOME")
        else:
            os.environ["WANX_HOME"] = old


SMALL = dict(height=32, width=48, num_frames=9, steps=3, progress=False)


def test_seed_draws_the_official_noise(pipes):
    pipe = pipes["tiny"]
    noise = torch.randn(16, 3, 4, 6, generator=torch.Generator("cpu").manual_seed(11))
    by_seed = pipe("a cat", seed=11, output_type="latents", **SMALL)
    by_latents = pipe("a cat", latents=noise, output_type="latents", **SMALL)
    assert torch.equal(by_seed, by_latents)


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
    emb, _ = pipe.text_encoder.encode(["a cat", NEGATIVE_PROMPTS["t2v"]])
    direct = pipe(prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], seed=2, output_type="latents", **SMALL)
    assert torch.allclose(direct, pipe("a cat", seed=2, output_type="latents", **SMALL), atol=1e-6)


def test_flf2v_mask_and_conditioning(pipes):
    pipe = pipes["tiny-flf2v"]
    first, last = torch.rand(3, 40, 60) * 2 - 1, torch.rand(3, 50, 50) * 2 - 1
    plan = pipe.plan("x", image=first, last_image=last, height=32, width=48, num_frames=13)
    assert (plan.steps, plan.shift, plan.guidance) == (50, 16.0, 5.5)  # official FLF2V defaults
    assert plan.negative_prompt.startswith("镜头切换，镜头晃动，")
    cond = pipe._image_conditioning(plan)
    mask = cond["y"][0, :4]  # [4, F'=4, h, w]
    assert cond["y"].shape[1] == 20 and cond["clip_features"].shape == (1, 514, 160)
    assert mask[:, 0].eq(1).all() and mask[:, 1:3].eq(0).all()
    assert mask[3, -1].eq(1).all() and mask[:3, -1].eq(0).all()  # last pixel frame = channel 3 of the last latent


def test_i2v_defaults_and_size():
    image = torch.zeros(3, 720, 1280)
    plan = plan_request("i2v", "x", image=image, height=480, width=832)
    assert (plan.steps, plan.shift, plan.guidance) == (40, 3.0, 5.0)  # 480P I2V shift 3
    assert (plan.height, plan.width) == (464, 832) == _size_for_image(image, 480 * 832)
    assert plan_request("i2v", "x", image=image, height=720, width=1280).shift == 5.0
