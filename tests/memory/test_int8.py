"""INT8 weight-only layers: error per layer and on a tiny DiT stated and bounded, half the
bytes of bf16; --int8 and lightx2v int8 files through `wanx generate`, streaming, LoRA, training."""

import copy

import numpy as np
import pytest
import torch

import wanx
from tests.loading.test_load_model import dit_inputs
from tests.memory.test_fp8 import to_bf16
from tests.memory.test_offload_cli import ARGS, frames  # noqa: F401 (the fixture)
from tests.oracles import tiny_dit
from wanx.cli import main
from wanx.memory.int8 import Int8Linear, int8_layer_names, quantize_int8, quantize_weight
from wanx.memory.streaming import BlockStreamer
from wanx.pipeline import WanPipeline
from wanx.runtime import Runtime


def test_quantize_weight_error_per_row():
    """Stated bound: every value within half a step, 1/254 of its row's largest magnitude."""
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,) and q.abs().max() == 127
    error = (q.float() * scale[:, None] - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert error.max() <= 0.5 / 127 * (1 + 1e-5)


def test_int8_layer_matches_linear():
    """Stated bound: a layer's output within 1% of its scale from the float Linear (fp32 compute)."""
    linear = torch.nn.Linear(48, 32)
    layer = Int8Linear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(7, 48)
    with torch.no_grad():
        reference, out = linear(x), layer(x)
    assert (out - reference).abs().max() <= 0.01 * reference.abs().max()


def test_int8_dit_error_and_bytes():
    """Stated bound: the tiny DiT's output moves by at most 3% of its scale from bf16 (measured
    1.1%, FP8 2.7%: int8 keeps more bits per row than e4m3; bf16 itself is 0.4% from fp32)."""
    model = tiny_dit()
    x, t, context, _ = dit_inputs(model.config)
    bf16 = to_bf16(model)
    int8 = quantize_int8(to_bf16(model), compute_dtype=torch.bfloat16)
    names = int8_layer_names(int8)
    assert names and all(isinstance(int8.get_submodule(n), Int8Linear) for n in names)
    assert int8.blocks[0].modulation.dtype == torch.float32 and int8.head.head.weight.dtype == torch.float32
    with torch.no_grad():
        reference, out = bf16(x, t, context), int8(x, t, context)
    assert (out - reference).abs().max() <= 0.03 * reference.abs().max()
    weights = sum(int8.get_submodule(n).weight.numel() for n in names)
    assert sum(int8.get_submodule(n).weight.nbytes for n in names) * 2 == \
        sum(bf16.get_submodule(n).weight.nbytes for n in names) == 2 * weights


def test_generate_int8_writes_close_frames(frames):
    """`wanx generate --int8` (fixture from test_offload_cli: the tiny model, 3 steps). Stated
    bound: mean frame difference from the float run at most 4 of 255 levels (measured 2.3; --fp8
    3.1, bound 8)."""
    difference = np.abs(frames("--int8") - frames())
    assert 0 < difference.mean() <= 4


def test_int8_streamed_blocks_write_the_same_frames_and_move_half_the_bytes(frames):
    """--int8 with --offload blocks: the same frames as --int8 resident (the int8 bytes are
    copied, not recomputed); the streamer moves int8 weights (plus scales), not bf16 ones."""
    assert np.array_equal(frames("--int8", "--offload", "blocks", "--vram-budget", "0"), frames("--int8"))
    model = tiny_dit()
    bf16_streamer = BlockStreamer(to_bf16(model), "cpu", 0)
    int8 = quantize_int8(to_bf16(model))
    int8_streamer = BlockStreamer(int8, "cpu", 0)
    layers = [int8.get_submodule(n) for n in int8_layer_names(int8)]
    saved = sum(m.weight.numel() for m in layers) - sum(m.scale.nbytes for m in layers)  # 2 bytes -> 1, plus scales
    assert bf16_streamer.stats.streamed - int8_streamer.stats.streamed >= saved > 0
    bf16_streamer.remove()
    int8_streamer.remove()


def test_int8_pipeline_latents_close_to_float(tmp_path, monkeypatch):
    """The runtime choice end to end: the DiT's block layers are Int8Linear, and the final latents
    (fp32 compute on the CPU) stay within 1% of their scale from the float run (measured 0.06%)."""
    monkeypatch.setenv("WANX_HOME", str(tmp_path))
    call = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, seed=1,
                output_type="latents", progress=False)
    reference = WanPipeline.from_pretrained("tiny")(**call)
    pipe = WanPipeline.from_pretrained("tiny", quantize="int8")
    assert isinstance(pipe.dit.blocks[0].ffn[0], Int8Linear)
    latents = pipe(**call)
    assert 0 < (latents - reference).abs().max() <= 0.01 * reference.abs().max()


def test_fp8_and_int8_together_is_one_line(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "--fp8", "--int8"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fp8 or --int8" in err


def test_int8_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="INT8 layers cannot be sharded yet: drop quantize or fsdp"):
        Runtime.create("cpu", quantize="int8").check(world=2, fsdp=True)


def test_lora_on_an_int8_base():
    """Live by default (adapters beside the int8 weights, as on FP8); fused on request is
    dequantised, merged and requantized in int8. Both within the INT8 bound (3%) of the float
    model with the LoRA merged by hand."""
    from tests.lora.test_lora import factors, lowrank_deltas, merged, write
    from wanx.lora import apply_lora, remove_lora

    model = tiny_dit()
    x, t, context, _ = dit_inputs(model.config)
    state = write("official", factors(model))
    with torch.no_grad():
        reference = merged(model, lowrank_deltas(factors(model), 1.0))(x, t, context)
        base = quantize_int8(copy.deepcopy(model), compute_dtype=torch.float32)
        plain = base(x, t, context)
        weights = {n: base.get_submodule(n).weight.clone() for n in int8_layer_names(base)}
        report = apply_lora(base, state)
        assert not report.fused  # an INT8 base defaults to live
        assert all(torch.equal(base.get_submodule(n).weight, w) for n, w in weights.items())  # int8 kept
        assert (base(x, t, context) - reference).abs().max() <= 0.03 * reference.abs().max()
        remove_lora(base)
        assert torch.equal(base(x, t, context), plain)
        fused = quantize_int8(copy.deepcopy(model), compute_dtype=torch.float32)
        apply_lora(fused, state, fuse=True)
        assert fused.blocks[0].ffn[0].weight.dtype == torch.int8
        assert (fused(x, t, context) - reference).abs().max() <= 0.03 * reference.abs().max()
        remove_lora(fused)
        assert torch.equal(fused(x, t, context), plain)


def test_trainable_lora_on_an_int8_base():
    """A LoRA trains on a frozen INT8 DiT (e.g. a lightx2v int8 file): adapters on the Int8Linear
    layers, gradients reach them and only them; --full on it is refused."""
    from wanx.training.trainable import add_trainable_lora, check_targets

    model = quantize_int8(tiny_dit(), compute_dtype=torch.float32).requires_grad_(False)
    check_targets(model, ("q", "ffn.0"))
    adapters = add_trainable_lora(model, 4, None, ("q", "ffn.0"), torch.Generator().manual_seed(0))
    assert len(adapters) == 3 * model.config.num_layers  # self_attn.q, cross_attn.q, ffn.0
    assert all(isinstance(model.get_submodule(name), Int8Linear) for name in adapters)
    for adapter in adapters.values():  # up starts at zero: a step's gradient reaches down only through up
        adapter.up.data.normal_()
    x, t, context, _ = dit_inputs(model.config)
    model(x, t, context).square().mean().backward()
    assert all(a.down.grad is not None and a.down.grad.abs().sum() > 0 for a in adapters.values())
    trained = {id(p) for a in adapters.values() for p in a.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
    from wanx.training.recipe import TrainConfig
    from wanx.training.trainable import Trainable

    with pytest.raises(ValueError, match="--full trains every weight: load the DiT in bf16/fp32"):
        Trainable(quantize_int8(tiny_dit()), TrainConfig(data="unused", output="unused", full=True))


def test_generate_from_a_lightx2v_int8_file(frames, tmp_path):
    """`wanx generate --model FILE` with a lightx2v int8 DiT whose folder holds the other
    components: the INT8 layers as stored. Stated bound: mean frame difference from the float
    run at most 4 of 255 levels (as --int8's; measured 2.7, the file's other tensors being bf16)."""
    import shutil

    from tests.loading.test_lightx2v_quantized import lightx2v_file
    from wanx.tiny import tiny_model_dir
    from wanx.video import read_video

    reference = frames()
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    model = wanx.load_model(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    path, _ = lightx2v_file(folder, model, torch.int8, "wan2.1_t2v_int8.safetensors", config=False)
    out = tmp_path / "int8.mp4"
    args = [a if a != "tiny" else str(path) for a in ARGS]
    assert main(["generate", *args, "-o", str(out)]) == 0
    difference = np.abs(read_video(out).frames.astype(np.int16) - reference)
    assert 0 < difference.mean() <= 4


def test_the_loading_line_says_how_the_dit_is_held(tmp_path, capsys):
    """`wanx generate --int8` says the DiT's block layers are int8 on its loading line; a
    plain run says nothing of the kind."""
    from wanx.cli import main

    args = ["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--seed", "1"]
    assert main([*args, "--int8", "-o", str(tmp_path / "a.mp4")]) == 0
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("loading:"))
    assert "DiT layers int8 x " in line, line
    assert main([*args, "-o", str(tmp_path / "b.mp4")]) == 0
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("loading:"))
    assert "DiT layers" not in line, line
