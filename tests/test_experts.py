"""Wan2.2 A14B: two experts in the one pipeline, each step routed by its timestep, with the
active expert's guidance; their files in the official, diffusers and ComfyUI layouts; only the
active expert on the device when offloading."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.oracles import (
    assert_same_outputs, assert_same_tensors, diffusers_moe_pipeline, tiny_dit, tiny_vae, write_comfy_dit,
    write_diffusers_dit, write_official_dit,
)
from wanx.pipeline import RequestError, WanPipeline, high_noise_steps, plan_request
from wanx.pipeline.conditioning import Run, conditioning_for
from wanx.tasks import NEGATIVE_PROMPT, TASKS
from wanx.sampling import schedule

# -- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["unipc", "dpm++"])
@pytest.mark.parametrize("task, shift, high, last_high, first_low", [
    ("t2v", 12.0, 26, 877, 865),  # reference §3: the official solvers' counts at the defaults
    ("i2v", 5.0, 15, 902, 892),
])
def test_the_official_split_at_the_defaults(sampler, task, shift, high, last_high, first_low):
    row = TASKS[f"{task}-A14B"]
    assert (row.steps, row.shift) == (40, shift)
    _, timesteps = schedule(sampler, 40, shift)
    assert high_noise_steps(timesteps, row.boundary) == high
    if sampler == "unipc":
        assert (timesteps[high - 1], timesteps[high]) == (last_high, first_low)


def test_the_split_moves_with_the_shift():
    """I2V-A14B at the 480p shift hint 3.0: 10 steps (DPM++: 11), not the 15 of shift 5."""
    assert high_noise_steps(schedule("unipc", 40, 3.0)[1], 0.9) == 10
    assert high_noise_steps(schedule("dpm++", 40, 3.0)[1], 0.9) == 11


def test_a14b_defaults_and_guidance_per_expert():
    plan = plan_request("t2v", "x", experts=2, seed=1)
    assert (plan.steps, plan.shift, plan.guidance, plan.guidance_low, plan.boundary) == (40, 12.0, 4.0, 3.0, 0.875)
    assert plan.negative_prompt == NEGATIVE_PROMPT
    image = torch.zeros(3, 720, 1280)
    plan = plan_request("i2v", "x", image=image, height=480, width=832, experts=2, clip=False, seed=1)
    # no 480P shift of 3 and no camera-shake prefix in Wan2.2 (reference §2)
    assert (plan.steps, plan.shift, plan.guidance, plan.guidance_low, plan.boundary) == (40, 5.0, 3.5, 3.5, 0.9)
    assert plan.negative_prompt == NEGATIVE_PROMPT and (plan.height, plan.width) == (464, 832)
    # one guidance scale applies to both experts (the official --sample_guide_scale); two are (high, low)
    assert plan_request("t2v", "x", experts=2, guidance_scale=5.0).guidance_low == 5.0
    both = plan_request("t2v", "x", experts=2, guidance_scale=2.0, guidance_scale_low=1.0, boundary=0.5)
    assert (both.guidance, both.guidance_low, both.boundary) == (2.0, 1.0, 0.5)
    with pytest.raises(RequestError, match="two experts") as err:
        plan_request("t2v", "x", boundary=0.9)
    assert err.value.field == "boundary"
    with pytest.raises(RequestError, match=r"in \[0, 1\]"):
        plan_request("t2v", "x", experts=2, boundary=875)


# -- routing, against diffusers' WanPipeline with transformer_2 and boundary_ratio ------------


@pytest.fixture(scope="module")
def experts():
    return tiny_dit("tiny", seed=1), tiny_dit("tiny", seed=2)


def record_timesteps(module, seen: list):
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float((args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])),
        with_kwargs=True)


@pytest.mark.parametrize("steps, shift, boundary", [
    (40, 12.0, None),  # T2V-A14B defaults: 26 high, 14 low
    (12, 3.0, None),  # fewer steps, lower shift: the split follows t, not 26/40 of the steps
    (10, 12.0, 0.5),  # --boundary
])
def test_routing_matches_diffusers(experts, steps, shift, boundary):
    high, low = experts
    gen = torch.Generator().manual_seed(0)
    context, negative = torch.randn(1, 5, 32, generator=gen), torch.randn(1, 3, 32, generator=gen)
    noise = torch.randn(1, 16, 1, 2, 2, generator=gen)

    pipe = WanPipeline(high, tiny_vae(), dit_low=low)
    ours = {"high": [], "low": []}
    hooks = [record_timesteps(high, ours["high"]), record_timesteps(low, ours["low"])]
    try:
        x = pipe(prompt_embeds=context, negative_prompt_embeds=negative, latents=noise, height=16, width=16,
                 num_frames=1, num_inference_steps=steps, shift=shift, boundary=boundary, output_type="latents",
                 progress=False)
    finally:
        for hook in hooks:
            hook.remove()

    oracle = diffusers_moe_pipeline(high, low, boundary or 0.875, shift)
    theirs = {"high": [], "low": []}
    for name, module in (("high", oracle.transformer), ("low", oracle.transformer_2)):
        record_timesteps(module, theirs[name])
    pad = lambda c: F.pad(c, (0, 0, 0, 512 - c.shape[1]))  # noqa: E731  (wanx pads inside the DiT)
    reference = oracle(prompt_embeds=pad(context), negative_prompt_embeds=pad(negative), latents=noise.clone(),
                       height=16, width=16, num_frames=1, num_inference_steps=steps, guidance_scale=4.0,
                       guidance_scale_2=3.0, output_type="latent", return_dict=False)[0]

    # diffusers runs cond and uncond as two calls, wanx as one batch: every second of theirs
    assert ours["high"] == theirs["high"][::2] and ours["low"] == theirs["low"][::2]
    split = len(ours["high"])
    assert pipe.last_experts == {"boundary": boundary or 0.875, "high_noise_steps": split,
                                 "low_noise_steps": steps - split}
    if (steps, shift) == (40, 12.0):
        assert split == 26
    if (steps, shift) == (12, 3.0):
        assert split != round(steps * 26 / 40)  # a step-index rule would have split elsewhere
    # the same latents: both experts, their guidance, and UniPC's history carried across the switch
    assert (x - reference).abs().max() <= 1e-4 * reference.abs().max()


# -- tiny-moe end to end, and offloading ------------------------------------------------------


def test_generate_with_tiny_moe(tmp_path, capsys):
    import av

    from wanx.cli import main

    out = tmp_path / "moe.mp4"
    assert main(["generate", "--model", "tiny-moe", "--prompt", "a cat walks", "--size", "32x32", "--frames", "5",
                 "--steps", "6", "--seed", "1", "--guidance", "4.5,2", "--boundary", "0.9", "--output", str(out)]) == 0
    high = high_noise_steps(schedule("unipc", 6, 12.0)[1], 0.9)
    err = capsys.readouterr().err
    assert f"experts: high noise {high} steps" in err and f"low noise {6 - high} steps" in err
    with av.open(str(out)) as container:
        meta = container.metadata
    assert json.loads(meta["experts"]) == {"boundary": 0.9, "high_noise_steps": high, "low_noise_steps": 6 - high}
    assert (meta["guidance"], meta["guidance_low"], meta["shift"], meta["task"]) == ("4.5", "2.0", "12.0", "t2v")


SMALL = dict(height=32, width=32, num_frames=1, num_inference_steps=6, seed=1, output_type="latents", progress=False)


@pytest.fixture(scope="module")
def resident_latents():
    return WanPipeline.from_pretrained("tiny-moe", device="cpu", offload="none")("a cat", **SMALL)


@pytest.mark.parametrize("offload, budget", [("model", None), ("blocks", "1GB")])
def test_one_expert_on_the_device_at_a_time(resident_latents, offload, budget):
    pipe = WanPipeline.from_pretrained("tiny-moe", device="cpu", offload=offload, vram_budget=budget)
    place = pipe.placement
    seen = []
    x = pipe("a cat", callback=lambda i, n, x: seen.append((place.device_bytes("dit"), place.device_bytes("dit_low"))),
             **SMALL)
    expert = sum(p.numel() * p.element_size() for p in pipe.dit.parameters())  # budget 1GB: all of it
    high = pipe.last_experts["high_noise_steps"]
    assert 0 < high < 6
    assert seen == [(expert, 0)] * high + [(0, expert)] * (6 - high)
    assert_same_outputs(x, resident_latents)  # the weights moved, not changed


# -- files --------------------------------------------------------------------------------------


def _components(root):
    """VAE, umT5 and tokenizer beside the experts (from the tiny set)."""
    from wanx.tiny import tiny_model_dir

    base = tiny_model_dir("tiny")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        shutil.copy(base / name, root / name)
    shutil.copytree(base / "google", root / "google")


@pytest.mark.parametrize("layout", ["official", "diffusers", "comfyui"])
def test_expert_files_in_every_layout(experts, tmp_path, layout, capsys):
    import wanx
    from wanx.cli import main
    from wanx.hub import find_components

    high, low = experts
    root = tmp_path / layout
    _components(root)
    if layout == "official":  # each expert sharded, with its index and config.json
        write_official_dit(root / "high_noise_model", high, shards=2)
        write_official_dit(root / "low_noise_model", low, shards=2)
    elif layout == "diffusers":
        write_diffusers_dit(root / "transformer", high)
        write_diffusers_dit(root / "transformer_2", low)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.9,
                                                           "expand_timesteps": False}), encoding="utf-8")
    else:
        write_comfy_dit(root, low, name="wan2.2_t2v_low_noise_14B_fp16.safetensors")
        write_comfy_dit(root, high, name="wan2.2_t2v_high_noise_14B_fp16.safetensors")
    files = find_components(root)
    assert files.moe and files.model_type == "t2v"
    assert_same_tensors(wanx.load_model(files.dit).state_dict(), high.state_dict(), layout)
    assert_same_tensors(wanx.load_model(files.dit_low).state_dict(), low.state_dict(), layout)
    assert files.defaults.get("boundary") == (0.9 if layout == "diffusers" else None)
    assert [files.infos[n].expert for n in ("dit", "dit_low")] == ["high", "low"]
    assert files.infos["dit"].name == "Wan2.2 DiT"  # the loading bar's label

    assert main(["info", str(root if layout != "comfyui" else files.dit)]) == 0
    out = capsys.readouterr().out
    assert "high-noise expert" in out and ("low-noise expert" in out) == (layout != "comfyui")
    assert "network:    Wan2.2 DiT t2v" in out


def test_expert_files_named_on_the_command_line(experts, tmp_path):
    """Expert files under names that do not say which is which: --model HIGH --model-low LOW
    (or --dit HIGH); without them the folder's two DiTs are refused, naming the flags."""
    import wanx
    from wanx.hub import find_model

    high, low = experts
    _components(tmp_path)
    a = write_comfy_dit(tmp_path, high, name="a.safetensors")
    b = write_comfy_dit(tmp_path, low, name="b.safetensors")
    for files in (find_model(a, dit_low=b), find_model(tmp_path, dit=a, dit_low=b), find_model(tmp_path, dit_low=b)):
        assert (files.dit, files.dit_low) == (a, b)
    with pytest.raises(ValueError, match="--model-low"):
        find_model(tmp_path)
    assert find_model(a).dit_low is None  # one file alone: a one-DiT model

    # experts stored in fp32 (as released) are cast as they are read; the fp32 islands stay
    model = wanx.load_model(find_model(a, dit_low=b).dit_low, dtype=torch.bfloat16)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16 and model.blocks[0].modulation.dtype == torch.float32


def test_i2v_a14b_runs_without_clip(tmp_path):
    """An I2V-A14B pair (in_dim 36, no CLIP keys) needs no image encoder: y alone carries the image."""
    from wanx.hub import find_components

    _components(tmp_path)
    high, low = tiny_dit("tiny-i2v-A14B", seed=1), tiny_dit("tiny-i2v-A14B", seed=2)
    write_official_dit(tmp_path / "high_noise_model", high)
    write_official_dit(tmp_path / "low_noise_model", low)
    files = find_components(tmp_path)
    assert files.moe and files.model_type == "i2v" and files.image_encoder is None
    pipe = WanPipeline.from_files(files)
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plan = pipe.plan("x", image=image, height=32, width=32, num_frames=5)
    assert (plan.guidance, plan.guidance_low, plan.boundary, plan.shift) == (3.5, 3.5, 0.9, 5.0)
    assert set(conditioning_for(plan.spec)(plan).inputs(Run(pipe, False))) == {"y"}
    x = pipe("x", image=image, height=32, width=32, num_frames=5, num_inference_steps=4, seed=1,
             output_type="latents", progress=False)
    assert x.shape == (1, 16, 2, 4, 4) and pipe.last_experts["high_noise_steps"] == 2


# -- one expert's LoRA: trained on its timesteps, applied to it alone ----------------------------


def test_expert_training_draws_only_its_timesteps():
    from wanx.training.loss import sample_sigma

    gen = torch.Generator().manual_seed(0)
    low = [float(sample_sigma(gen, 12.0, "uniform", (0.0, 0.875))) for _ in range(200)]
    high = [float(sample_sigma(gen, 12.0, "logit-normal", (0.875, 1.0))) for _ in range(200)]
    assert max(low) < 0.875 <= min(high)
    # the whole range: one draw, the sigmas of every run before experts existed
    t = torch.rand((), generator=torch.Generator().manual_seed(1))
    assert sample_sigma(torch.Generator().manual_seed(1), 5.0) == 5 * t / (1 + 4 * t)


def test_a_low_expert_lora_changes_only_the_low_noise_steps(tmp_path):
    from safetensors import safe_open

    from tests.training.test_prepare import moving_square
    from wanx.cli import main

    data = tmp_path / "data"
    data.mkdir()
    moving_square(12).save(data / "clip.mp4")
    (data / "metadata.csv").write_text("file_name,text\nclip.mp4,a red square moves right\n", encoding="utf-8")
    assert main(["prepare", str(data), "--model", "tiny-moe", "--size", "32x32", "--frames", "5", "--quiet"]) == 0
    assert main(["train", "--data", str(data), "--model", "tiny-moe", "--output", str(tmp_path / "run"), "--expert",
                 "low", "--lora-rank", "4", "--steps", "3", "--lr", "1e-2", "--quiet"]) == 0
    lora = tmp_path / "run" / "run.safetensors"
    with safe_open(str(lora), "pt") as fh:
        assert fh.metadata()["expert"] == "low" and fh.metadata()["timesteps"] == "0-875"
    assert main(["train", "--data", str(data), "--model", "tiny-moe", "--output", str(tmp_path / "x")]) == 2

    pipe = WanPipeline.from_pretrained("tiny-moe", device="cpu")

    def steps():
        seen = []
        pipe("a red square moves right", callback=lambda i, n, x: seen.append(x.clone()), **SMALL)
        return seen

    plain = steps()
    pipe.load_lora(lora, expert="low")
    with_lora = steps()
    high = pipe.last_experts["high_noise_steps"]
    # the same weights and ops on the high-noise steps: bit-identical; then the LoRA acts
    assert all(torch.equal(a, b) for a, b in zip(plain[:high], with_lora[:high]))
    assert all(not torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[high:], with_lora[high:]))
    pipe.unload_lora()
    assert all(torch.equal(a, b) for a, b in zip(plain, steps()))
    with pytest.raises(ValueError, match="two experts"):
        WanPipeline(tiny_dit("tiny"), tiny_vae()).load_lora(lora, expert="low")

    import av

    out = tmp_path / "lora.mp4"
    args = ["generate", "--prompt", "a red square", "--size", "32x32", "--frames", "1", "--steps", "3", "--quiet"]
    assert main([*args, "--model", "tiny-moe", "--lora-low", f"{lora}:0.5", "-o", str(out)]) == 0
    with av.open(str(out)) as container:
        [entry] = json.loads(container.metadata["loras"])
    assert (entry["experts"], entry["strength"]) == (["low"], 0.5)
    assert main([*args, "--model", "tiny", "--lora-low", str(lora), "-o", str(tmp_path / "no.mp4")]) == 2
