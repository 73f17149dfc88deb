"""The Wan2.2-S2V DiT: parity with DiffSynth-Studio's `WanS2VModel` (an independent implementation,
whose RoPE position and FramePack code restate the official `rope_precompute` and
`FramePackMotioner`) on random weights, every weight random (the zero-initialised padding token
and the constant layer mix too), with every conditioning input present and each optional one
absent; loading and bad input on it (the runtime transforms on it:
tests/models/test_transforms_on_models.py).

Where DiffSynth departs from the official `WanModel_S2V`, the call below takes the official
path: the text is zero-padded to text_len before the embedding (DiffSynth embeds it unpadded),
its layer mix is sized for 25 wav2vec2 hidden states (hard-coded: replaced by the config's), its
`forward` always drops the motion frames (`inject_motion`'s default: the official first clip
only; bound to False for the other clips, as DiffSynth's pipeline passes it), and it takes one
sample (the batch is checked against per-sample runs)."""

import copy
import functools

import pytest
import torch

from tests.oracles import diffsynth_module, official_state, randomize
from wanx.configs import DIT_PRESETS, dit_config, infer_dit_config
from wanx.models import keeps_fp32
from wanx.models.s2v import S2VWanDiT, audio_tokens, s2v_positions
from wanx.models.transformer import WanDiT

TINY = dit_config("tiny-s2v")  # 3 blocks, audio after blocks 0 and 2; head dim 24
TOLERANCE = 1e-5  # relative to the output's largest magnitude, float32 (measured ~3e-7)


def tiny_s2v(cfg=TINY, seed=0) -> S2VWanDiT:
    model = randomize(WanDiT(cfg), seed)
    with torch.no_grad():  # the layer mix is divided by its SiLU sum: kept away from zero
        model.casual_audio_encoder.weights.uniform_(0.2, 1.0)
    return model


def s2v_inputs(cfg, batch=1, latent_frames=2, height=8, width=8, motion=19, text=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    f, c = latent_frames, cfg.out_dim
    return dict(x=torch.randn(batch, c, f, height, width, generator=gen),
                timestep=torch.tensor([637.0, 250.0])[:batch],
                context=torch.randn(batch, text, cfg.text_dim, generator=gen),
                ref_latents=torch.randn(batch, c, 1, height, width, generator=gen),
                motion_latents=torch.randn(batch, c, motion, height, width, generator=gen),
                cond_states=torch.randn(batch, cfg.cond_dim, f, height, width, generator=gen),
                audio_input=torch.randn(batch, cfg.audio_encoder_layers, cfg.audio_dim, 4 * f, generator=gen))


def diffsynth_s2v(model: S2VWanDiT):
    cfg = model.config
    module = diffsynth_module("diffsynth.models.wan_video_dit_s2v")
    oracle = module.WanS2VModel(
        dim=cfg.dim, in_dim=cfg.in_dim, ffn_dim=cfg.ffn_dim, out_dim=cfg.out_dim, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, eps=cfg.eps, patch_size=cfg.patch_size, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, cond_dim=cfg.cond_dim, audio_dim=cfg.audio_dim, num_audio_token=cfg.num_audio_token,
        audio_inject_layers=list(cfg.audio_inject_layers))
    oracle.casual_audio_encoder.weights = torch.nn.Parameter(torch.empty(1, cfg.audio_encoder_layers, 1, 1))
    oracle.load_state_dict(official_state(model), strict=True)  # the official names, as they are
    return oracle.eval()


def run_diffsynth(oracle, cfg, inputs, drop_motion_frames=False):
    """DiffSynth's forward on the official inputs: the reference latent in front of the noise,
    the text padded to text_len, its output's reference frame cut off."""
    if not drop_motion_frames:
        oracle.inject_motion = functools.partial(type(oracle).inject_motion, oracle, drop_motion_frames=False)
    context = torch.nn.functional.pad(inputs["context"], (0, 0, 0, cfg.text_len - inputs["context"].shape[1]))
    try:
        with torch.no_grad():
            out = oracle(torch.cat([inputs["ref_latents"], inputs["x"]], dim=2), inputs["timestep"], context,
                         inputs["audio_input"], inputs["motion_latents"], inputs["cond_states"])
    finally:
        oracle.__dict__.pop("inject_motion", None)
    return out[:, :, 1:]


def relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_presets_and_dispatch():
    cfg = DIT_PRESETS["s2v-14B"]
    assert (cfg.dim, cfg.num_layers, cfg.in_dim, cfg.cond_dim, cfg.audio_dim, cfg.num_audio_token) == (5120, 40, 16, 16, 1024, 4)
    assert cfg.audio_inject_layers == (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39) and cfg.lat_motion_frames == 19
    with torch.device("meta"):
        model = WanDiT("s2v-14B")
    assert type(model) is S2VWanDiT and len(model.audio_injector.injector) == 12
    state = model.state_dict()
    assert state["casual_audio_encoder.weights"].shape == (1, 25, 1, 1)
    assert state["casual_audio_encoder.encoder.conv1_local.conv.weight"].shape == (5120, 1024, 3)
    assert state["casual_audio_encoder.encoder.conv1_global.conv.weight"].shape == (1280, 1024, 3)
    assert state["audio_injector.injector_adain_layers.11.linear.weight"].shape == (10240, 5120)
    assert state["frame_packer.proj_4x.weight"].shape == (5120, 16, 4, 8, 8)
    assert state["trainable_cond_mask.weight"].shape == (3, 5120)
    assert not any(k.startswith(("img_emb", "motioner")) for k in state)
    # The config back from the shapes (as a file without config.json is read).
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert infer_dit_config(shapes) == cfg
    tiny = {k: tuple(v.shape) for k, v in WanDiT(TINY).state_dict().items()}
    assert infer_dit_config(tiny, num_heads=2, audio_inject_layers=[0, 2]) == TINY
    with pytest.raises(ValueError, match="audio_inject_layers"):
        infer_dit_config(tiny, num_heads=2)  # 3 blocks, 2 injectors: which ones only config.json says


@pytest.mark.parametrize("drop_motion_frames", [False, True])
@pytest.mark.parametrize("absent", [None, "pose", "short motion"])
def test_matches_diffsynth(drop_motion_frames, absent):
    """Every input present; no pose video (zeros, as the official loop passes); a motion memory
    shorter than the 19 frames (zero-padded in front); the motion frames dropped (first clip)."""
    model = tiny_s2v()
    oracle = diffsynth_s2v(model)
    inputs = s2v_inputs(TINY, motion=5 if absent == "short motion" else 19)
    if absent == "pose":
        inputs["cond_states"] = torch.zeros_like(inputs["cond_states"])
    with torch.no_grad():
        ours = model(**inputs, drop_motion_frames=drop_motion_frames)
    theirs = run_diffsynth(oracle, TINY, inputs, drop_motion_frames)
    assert ours.shape == inputs["x"].shape
    assert relative(ours, theirs) <= TOLERANCE


def test_each_input_acts():
    """The parity above would hold for a path both sides ignore: each input changes the output."""
    model = tiny_s2v()
    inputs = s2v_inputs(TINY)
    with torch.no_grad():
        out = model(**inputs)
        for name in ("ref_latents", "motion_latents", "cond_states", "audio_input"):
            other = model(**dict(inputs, **{name: inputs[name].flip(-1)}))
            assert relative(other, out) > 1e-3, name
        assert relative(model(**inputs, drop_motion_frames=True), out) > 1e-3


def test_batch_rows_equal_single_runs():
    model = tiny_s2v()
    inputs = s2v_inputs(TINY, batch=2)
    with torch.no_grad():
        both = model(**inputs)
        for i in range(2):
            one = model(**{k: v[i:i + 1] for k, v in inputs.items()})
            assert relative(both[i:i + 1], one) <= 1e-6


def test_rope_positions_as_the_official_rope_precompute():
    """Hand-computed from `rope_precompute` and `FramePackMotioner` for a 2x4x4 token grid: the
    reference at frame 30; the newest motion frame at -1, the 2x bucket at -3 (heights 0 and 3
    of 0..3: linspace(0, 3, 2)), the 4x bucket at -19, -14, -9, -4 (linspace(19, 4, 4)), height 0."""
    blocks = s2v_positions((2, 4, 4), motion=True)
    assert blocks[0] == ([0, 1], [0, 1, 2, 3], [0, 1, 2, 3])
    assert blocks[1] == ([30], [0, 1, 2, 3], [0, 1, 2, 3])
    assert blocks[2] == ([-1], [0, 1, 2, 3], [0, 1, 2, 3])
    assert blocks[3] == ([-3], [0, 3], [0, 3])
    assert blocks[4] == ([-19, -14, -9, -4], [0], [0])
    assert len(s2v_positions((2, 4, 4), motion=False)) == 2
    # 80 audio frames -> 20 latent frames of audio tokens (speech2video's infer_frames and motion frames).
    assert audio_tokens(80, 73, 19) == 20


def test_bf16_stays_close():
    model = tiny_s2v()
    inputs = s2v_inputs(TINY)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, p in bf16.named_parameters():  # the model's fp32 islands, as load_model keeps them
        if keeps_fp32(name, model.keep_in_fp32):
            p.data = p.data.float()
    assert bf16.casual_audio_encoder.encoder.conv3.conv.weight.dtype == torch.float32
    with torch.no_grad():
        ref, out = model(**inputs), bf16(**inputs)
    assert relative(out, ref) <= 0.05


@pytest.mark.parametrize("change, message", [
    (dict(ref_latents=None), "needs ref_latents"),
    (dict(audio_input=None, cond_states=None), "needs cond_states, audio_input"),
    (dict(audio_input=torch.zeros(1, 3, 32, 12)), "12 frames give 3 latent frames"),
    (dict(audio_input=torch.zeros(1, 25, 32, 8)), r"audio_input must be \[1, 3, 32, T\]"),
    (dict(cond_states=torch.zeros(1, 16, 1, 8, 8)), r"cond_states must be \[1, 16, 2, 8, 8\]"),
    (dict(motion_latents=torch.zeros(1, 16, 19, 8, 16)), "motion_latents must be"),
    (dict(x=torch.zeros(1, 16, 2, 4, 4)), "multiples of 8"),
    (dict(timestep=torch.arange(32.0)[None]), "one timestep per sample"),
])
def test_bad_s2v_inputs(change, message):
    model = tiny_s2v()
    inputs = dict(s2v_inputs(TINY), **change)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


# -- sequence parallel on an S2V model (the other runtime transforms: tests/models/test_transforms_on_models.py)


def test_sequence_parallel_refuses_an_s2v_model():
    from wanx.distributed.sequence import SequenceParallel

    with pytest.raises(ValueError, match="S2V"):
        SequenceParallel(tiny_s2v(), None)


# -- loading -----------------------------------------------------------------------------------


def test_tiny_s2v_set_loads_as_an_s2v_model_named_by_info():
    import wanx
    from wanx.hub import resolve_model
    from wanx.loading import inspect_checkpoint, model_name

    folder = resolve_model("tiny-s2v")
    info = inspect_checkpoint(folder / "diffusion_pytorch_model.safetensors")
    assert info.config == TINY and info.name == "Wan2.2 DiT"
    assert "model:      Wan2.2 S2V DiT of another size (tiny-s2v)" in info.summary()  # as `wanx info` shows it
    assert model_name(DIT_PRESETS["s2v-14B"]) == "Wan2.2 S2V-14B"
    model = wanx.load_model(folder / "diffusion_pytorch_model.safetensors")
    assert type(model) is S2VWanDiT and model.config == TINY
    inputs = s2v_inputs(TINY)
    with torch.no_grad():
        out = model(**inputs)
        other_audio = model(**dict(inputs, audio_input=inputs["audio_input"].flip(-1)))
    assert torch.isfinite(out).all() and relative(other_audio, out) > 1e-4


def test_comfyui_prefixed_file_loads(tmp_path):
    """ComfyUI's repackaged S2V file is the official names under `model.diffusion_model.`."""
    import wanx
    from safetensors.torch import save_file

    model = tiny_s2v()
    state = {f"model.diffusion_model.{k}": v for k, v in official_state(model).items()}
    save_file(state, str(tmp_path / "wan2.2_s2v_tiny.safetensors"))
    (tmp_path / "config.json").write_text('{"num_heads": 2, "audio_inject_layers": [0, 2]}')
    loaded = wanx.load_model(tmp_path / "wan2.2_s2v_tiny.safetensors")
    assert type(loaded) is S2VWanDiT and loaded.config == TINY
    inputs = s2v_inputs(TINY)
    with torch.no_grad():
        assert relative(loaded(**inputs), model(**inputs)) == 0.0


@pytest.mark.parametrize("tensor, message", [
    ("frame_packer.proj.weight", "missing tensor 'frame_packer.proj.weight'"),  # needed to infer the config
    ("audio_injector.injector.1.o.weight", r"1 missing \(audio_injector.injector.1.o.weight\)"),
])
def test_missing_s2v_tensor_is_one_line(tmp_path, tensor, message):
    import wanx
    from safetensors.torch import save_file
    from wanx.loading import CheckpointError

    state = official_state(tiny_s2v())
    del state[tensor]
    save_file(state, str(tmp_path / "s2v.safetensors"))
    (tmp_path / "config.json").write_text('{"num_heads": 2, "audio_inject_layers": [0, 2]}')
    with pytest.raises(CheckpointError, match=message) as err:
        wanx.load_model(tmp_path / "s2v.safetensors")
    assert "\n" not in str(err.value)


def test_an_s2v_dit_given_for_a_text_to_video_run_is_one_line(capsys, tmp_path):
    """An S2V DiT file put in a T2V model's place: refused in one line naming the model type
    (S2V's inputs come with its task), before any weights load."""
    from wanx.cli import main
    from wanx.hub import resolve_model

    s2v = resolve_model("tiny-s2v") / "diffusion_pytorch_model.safetensors"
    code = main(["generate", "--model", str(resolve_model("tiny")), "--dit", str(s2v), "--prompt", "a cat",
                 "--quiet", "--output", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "s2v" in err and "\n" not in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_bf16_load_keeps_the_audio_encoder_in_float32():
    import wanx
    from wanx.hub import resolve_model

    model = wanx.load_model(resolve_model("tiny-s2v") / "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16)
    assert model.casual_audio_encoder.encoder.conv1_local.conv.weight.dtype == torch.float32
    assert model.audio_injector.injector[0].q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
