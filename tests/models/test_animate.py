"""The Wan2.2-Animate DiT: parity with diffusers' `WanAnimateTransformer3DModel` on random weights
(every weight random, the zero-initialised biases and padding token too), with the pose and the
face input present (the runtime transforms on it: tests/models/test_transforms_on_models.py)."""

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


# -- sequence parallel on an Animate model (the other runtime transforms: tests/models/test_transforms_on_models.py)


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

