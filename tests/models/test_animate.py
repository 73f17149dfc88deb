"""The Wan2.2-Animate DiT: parity with diffusers' `WanAnimateTransformer3DModel` on random weights
(every weight random, the zero-initialised biases and padding token too), with the pose and the
face input present, and the runtime transforms on it."""

import copy

import pytest
import torch

from tests.oracles import diffusers_animate_dit, official_state, randomize
from wanx.configs import DIT_PRESETS, AnimateConfig, dit_config
from wanx.models import keeps_fp32
from wanx.models.animate import AnimateWanDiT, face_frames
from wanx.models.transformer import WanDiT

TINY = dit_config("tiny-animate")  # 2 blocks, a face block after block 0 only
# 4 blocks, a face block after every one; narrower motion encoder at 512.
FOUR_BLOCKS = AnimateConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=4, text_dim=32, image_dim=16,
                            motion_encoder_channels=(4, 4, 8, 8, 8, 8, 8, 8), motion_style_dim=16, motion_dim=3,
                            motion_encoder_dim=24, face_encoder_hidden_dim=16, face_encoder_num_heads=3,
                            inject_face_latents_blocks=1)


def tiny_animate(cfg=TINY, seed=0) -> AnimateWanDiT:
    model = randomize(WanDiT(cfg), seed)
    with torch.no_grad():  # the equalised-lr layers scale at run time: their weights are N(0, 1), as initialised
        for name, p in model.motion_encoder.named_parameters():
            if name.endswith("weight") and "direction" not in name:
                p.mul_(5.0)
    return model


def animate_inputs(cfg, batch=2, latent_frames=2, height=4, width=6, text=7, seed=1):
    """Latents of `latent_frames` (the reference one first), y, CLIP features, pose latents of one
    frame fewer and 4(F-2)+1 face frames (each 512x512 through the motion encoder: the cost of
    these tests, so one by default)."""
    gen = torch.Generator().manual_seed(seed)
    f = latent_frames
    x = torch.randn(batch, cfg.out_dim, f, height, width, generator=gen)
    y = torch.randn(batch, cfg.in_dim - cfg.out_dim, f, height, width, generator=gen)
    context = torch.randn(batch, text, cfg.text_dim, generator=gen)
    clip = torch.randn(batch, 257, cfg.image_dim, generator=gen)
    pose = torch.randn(batch, cfg.out_dim, f - 1, height, width, generator=gen)
    size = cfg.motion_encoder_size
    # Smooth faces (8x8 upsampled): per-pixel noise would average out in the conv stack, every
    # frame giving the same motion vector.
    small = torch.rand(batch * (4 * (f - 2) + 1), 3, 8, 8, generator=gen) * 2 - 1
    faces = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    faces = faces.unflatten(0, (batch, -1)).transpose(1, 2)
    return dict(x=x, timestep=torch.tensor([999.0, 437.5])[:batch], context=context, clip_features=clip, y=y,
                pose_latents=pose, face_pixel_values=faces)


def run_diffusers(oracle, cfg, inputs):
    context = torch.nn.functional.pad(inputs["context"], (0, 0, 0, cfg.text_len - inputs["context"].shape[1]))
    with torch.no_grad():
        return oracle(hidden_states=torch.cat([inputs["x"], inputs["y"]], dim=1), timestep=inputs["timestep"],
                      encoder_hidden_states=context, encoder_hidden_states_image=inputs["clip_features"],
                      pose_hidden_states=inputs["pose_latents"], face_pixel_values=inputs["face_pixel_values"],
                      return_dict=False)[0]


def relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_presets_and_dispatch():
    cfg = DIT_PRESETS["animate-14B"]
    assert (cfg.dim, cfg.num_layers, cfg.in_dim, cfg.image_dim) == (5120, 40, 36, 1280)
    assert cfg.face_layers == (0, 5, 10, 15, 20, 25, 30, 35)
    assert cfg.motion_encoder_channels == (32, 64, 128, 256, 512, 512, 512, 512)
    with torch.device("meta"):
        model = WanDiT("animate-14B")
    assert type(model) is AnimateWanDiT and len(model.face_adapter.fuser_blocks) == 8
    # The released file's 1441 tensors, less the 14 constant blur kernels (not weights).
    assert len(model.state_dict()) == 1427
    assert model.state_dict()["face_adapter.fuser_blocks.7.linear1_kv.weight"].shape == (10240, 5120)
    assert model.state_dict()["motion_encoder.enc.net_app.convs.7.skip.1.weight"].shape == (512, 512, 1, 1)
    assert model.state_dict()["motion_encoder.enc.net_app.convs.0.1.bias"].shape == (1, 32, 1, 1)
    assert model.state_dict()["face_encoder.conv1_local.conv.weight"].shape == (4096, 512, 3)
    assert face_frames(77) == 20  # a 77-frame clip: 20 latent frames after the reference
    with pytest.raises(ValueError, match="inject_face_latents_blocks"):
        AnimateConfig(num_layers=4, inject_face_latents_blocks=3)


@pytest.mark.parametrize("cfg", [TINY, FOUR_BLOCKS], ids=["tiny-animate", "4-blocks"])
def test_matches_diffusers(cfg):
    """Same random weights (renamed by diffusers' converter), same numbers; the pose and the face
    inputs each change the output."""
    model = tiny_animate(cfg)
    assert model.face_encoder.padding_tokens.abs().sum() > 0  # zero-initialised, randomised here
    oracle = diffusers_animate_dit(cfg, official_state(model))
    inputs = animate_inputs(cfg, latent_frames=3)  # 5 face frames: the face encoder's strides act
    theirs = run_diffusers(oracle, cfg, inputs)
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        ours = model(**inputs)
        no_pose = model(**dict(one, pose_latents=torch.zeros_like(one["pose_latents"])))
        other_face = model(**dict(one, face_pixel_values=one["face_pixel_values"].flip(2)))
    assert ours.shape == inputs["x"].shape and ours.dtype == torch.float32
    assert relative(ours, theirs) <= 1e-4, relative(ours, theirs)  # seen 1.1e-5 and 9.4e-6
    assert relative(no_pose, theirs[:1]) > 1e-2 and relative(other_face, theirs[:1]) > 1e-3


@pytest.mark.parametrize("change, message", [
    (dict(pose_latents=None), "needs pose_latents"),
    (dict(face_pixel_values=None), "needs pose_latents"),
    (dict(pose_latents=torch.zeros(2, 16, 2, 4, 6)), "latents' frames less the reference"),
    (dict(face_pixel_values=torch.zeros(2, 3, 5, 64, 64)), r"face_pixel_values must be \[2, 3, T, 512, 512\]"),
    (dict(face_pixel_values=torch.zeros(2, 3, 5, 512, 512)), r"give 4\*0\+1 = 1 face frames"),
])
def test_bad_animate_inputs(change, message):
    model = tiny_animate()
    inputs = animate_inputs(model.config)
    with pytest.raises(ValueError, match=message):
        model(**dict(inputs, **change))


def test_bf16_stays_close():
    model = tiny_animate()
    inputs = animate_inputs(model.config, batch=1)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, p in bf16.named_parameters():  # the model's fp32 islands, as load_model keeps them
        if keeps_fp32(name, model.keep_in_fp32):
            p.data = p.data.float()
    with torch.no_grad():
        ref, out = model(**inputs), bf16(**inputs)
    assert relative(out, ref) <= 0.05


# -- runtime transforms on an Animate model ------------------------------------------------


def test_streaming_streams_the_face_blocks_and_equals_the_resident_run():
    from tests.oracles import assert_same_outputs
    from wanx.memory.streaming import BlockStreamer

    model = tiny_animate()
    inputs = animate_inputs(model.config, batch=1)
    with torch.no_grad():
        reference = model(**inputs)
    streamer = BlockStreamer(model, "cpu", 0)
    try:
        names = {u.name for u in streamer.units if id(u.module) in streamer._block_unit}
        assert {"face_adapter.fuser_blocks.0", "blocks.0", "blocks.1"} <= names  # by the block wrapper
        with torch.no_grad():
            for _ in range(2):
                streamer.stats.reset()
                out = model(**inputs)
                assert_same_outputs(out, reference)
        total = sum(p.numel() * p.element_size() for p in model.parameters())  # every weight came in
        assert streamer.stats.resident == 0 and streamer.stats.moved_bytes == total
        assert streamer.stats.device_bytes == 0
    finally:
        streamer.remove()


def test_fp8_quantizes_the_face_blocks_and_stays_close():
    from wanx.memory.fp8 import FP8Linear, fp8_layer_names, quantize_fp8

    model = tiny_animate()
    inputs = animate_inputs(model.config, batch=1)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, p in bf16.named_parameters():
        if keeps_fp32(name, model.keep_in_fp32):
            p.data = p.data.float()
    names = set(fp8_layer_names(bf16))
    assert {"face_adapter.fuser_blocks.0.linear1_kv", "face_adapter.fuser_blocks.0.linear2", "blocks.1.self_attn.q"} <= names
    reference = copy.deepcopy(bf16)
    fp8 = quantize_fp8(bf16, compute_dtype=torch.bfloat16)
    assert isinstance(fp8.face_adapter.fuser_blocks[0].linear1_q, FP8Linear)
    with torch.no_grad():
        ref, out = reference(**inputs), fp8(**inputs)
    assert relative(out, ref) <= 0.06  # the base DiT's stated FP8 bound


def test_sequence_parallel_refuses_an_animate_model():
    from wanx.distributed.sequence import SequenceParallel

    with pytest.raises(ValueError, match="Animate"):
        SequenceParallel(tiny_animate(), None)


def test_tiny_animate_set_is_an_animate_model_whose_face_and_pose_act():
    import wanx
    from wanx.hub import resolve_model

    model = wanx.load_model(resolve_model("tiny-animate"))
    assert type(model) is AnimateWanDiT and model.config == DIT_PRESETS["tiny-animate"]
    assert model.config.face_layers == (0,)  # a face block after block 0, none after block 1
    inputs = animate_inputs(model.config, batch=1)
    with torch.no_grad():
        out = model(**inputs)
        other_face = model(**dict(inputs, face_pixel_values=inputs["face_pixel_values"].flip(-1)))
        no_pose = model(**dict(inputs, pose_latents=torch.zeros_like(inputs["pose_latents"])))
    assert relative(other_face, out) > 1e-4 and relative(no_pose, out) > 1e-3


def test_int8_quantizes_the_face_blocks_and_stays_close():
    from wanx.memory.int8 import Int8Linear, quantize_int8

    model = tiny_animate()
    inputs = animate_inputs(model.config, batch=1)
    int8 = quantize_int8(copy.deepcopy(model), compute_dtype=torch.float32)
    assert isinstance(int8.face_adapter.fuser_blocks[0].linear1_kv, Int8Linear)
    with torch.no_grad():
        ref, out = model(**inputs), int8(**inputs)
    assert 0 < relative(out, ref) <= 0.03  # the base DiT's stated INT8 bound


def test_step_cache_takes_the_face_rows_of_the_branches_it_runs():
    """With guidance batched, a step where only one branch runs passes only that row of the face
    tokens to the face blocks; the row equals the branch computed alone."""
    from wanx.speed.cache import StepCache

    model = tiny_animate()
    inputs = animate_inputs(model.config)
    rows = lambda sl: {k: (v[sl] if torch.is_tensor(v) else v) for k, v in inputs.items()}  # noqa: E731
    cache = StepCache("magcache", 10.0, magcache_k=5, retention=0.0, quiet=True).add_to(model)
    cache.start(3, model.config, 480, 832)
    with torch.no_grad():
        cache.at(0, ("cond",))  # only cond has a residual after this
        model(**rows(slice(0, 1)))
        cache.at(1, ("cond", "uncond"))
        out = model(**inputs)  # cond skipped, uncond (row 1) computed alone
        cache.remove()
        alone = model(**rows(slice(1, 2)))
    assert cache.stats.skipped == {"cond": 1} and cache.stats.computed == {"cond": 1, "uncond": 1}
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-6 * alone.abs().max().item())


def test_compiled_blocks_equal_eager():
    from tests.speed.test_compile import _cannot_compile
    from wanx.speed import compile_blocks

    if reason := _cannot_compile():
        pytest.skip(reason)
    torch._dynamo.reset()
    model = tiny_animate()
    reference = copy.deepcopy(model)
    handle = compile_blocks(model)
    try:
        inputs = animate_inputs(model.config, batch=1)
        with torch.no_grad():
            assert relative(model(**inputs), reference(**inputs)) <= 1e-5
    finally:
        handle.remove()


@pytest.mark.parametrize("fmt", ["official", "diffusers"])
def test_lora_on_face_adapter_keys(fmt):
    """A LoRA on a face block's query and output projections changes those weights by its
    product, in the official and the diffusers key format."""
    from wanx.lora import apply_lora

    model = tiny_animate()
    gen = torch.Generator().manual_seed(3)
    targets = {"face_adapter.fuser_blocks.0.linear1_q": "face_adapter.0.to_q",
               "face_adapter.fuser_blocks.0.linear2": "face_adapter.0.to_out"}
    state, expected = {}, {}
    for name, diffusers_name in targets.items():
        down, up = torch.randn(4, 32, generator=gen) * 0.2, torch.randn(32, 4, generator=gen) * 0.2
        expected[name] = model.get_submodule(name).weight.detach() + up @ down
        key = f"diffusion_model.{name}" if fmt == "official" else f"transformer.{diffusers_name}"
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
    apply_lora(model, state, 1.0, name="f", fuse=True)
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, weight, rtol=1e-6, atol=1e-6)
