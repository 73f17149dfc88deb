"""lightx2v's quantized DiT files (`*_int8.safetensors`, `*_fp8.safetensors`): each quantized
block Linear's `weight` in int8 or float8_e4m3fn beside `weight_scale`, one float per output
channel as `[out, 1]` (their converter's `quantize_tensor`: symmetric, amax / 127 or / 448), the
other tensors bf16. Built here from a tiny DiT in that key layout, loaded kept quantized, and
compared with the float model."""

import json

import pytest
import torch
from safetensors.torch import save_file

import wanx
from tests.loading.test_load_model import dit_inputs
from tests.memory.test_fp8 import to_bf16
from tests.oracles import official_state, tiny_dit
from wanx.loading import CheckpointError
from wanx.memory.fp8 import FP8Linear, fp8_layer_names
from wanx.memory.int8 import Int8Linear

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def lightx2v_file(tmp_path, model, dtype, name, config=True):
    """The model as lightx2v's converter writes it: block Linear weights quantized per output
    channel with `<layer>.weight_scale` [out, 1] in the source dtype (bf16), the rest bf16."""
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in official_state(model).items()}
    for layer in fp8_layer_names(model):
        w = state[f"{layer}.weight"].float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / QMAX[dtype]
        q = (w / scale).round().clamp(-128, 127) if dtype == torch.int8 else (w / scale).clamp(-448, 448)
        state[f"{layer}.weight"] = q.to(dtype)
        state[f"{layer}.weight_scale"] = scale.bfloat16()
    path = tmp_path / name
    save_file(state, str(path))
    if config:
        (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}), encoding="utf-8")
    return path, state


@pytest.mark.parametrize("dtype, layer_type, bound", [(torch.int8, Int8Linear, 0.03), (torch.float8_e4m3fn, FP8Linear, 0.06)])
def test_lightx2v_file_loads_kept_quantized_and_close(tmp_path, dtype, layer_type, bound):
    """Stated bounds: the tiny DiT's output within 3% (int8; measured 1.1%) and 6% (fp8; as
    --fp8's bound) of its scale from the bf16 model."""
    model = tiny_dit()
    path, state = lightx2v_file(tmp_path, model, dtype, f"wan2.1_t2v_{'int8' if dtype == torch.int8 else 'fp8'}.safetensors")
    info = wanx.inspect_checkpoint(path)
    assert info.channel_scaled and "per-channel weight_scale" in info.summary()
    assert info.compute_dtype == torch.bfloat16
    loaded = wanx.load_model(path)
    for layer in fp8_layer_names(model):
        module = loaded.get_submodule(layer)
        assert type(module) is layer_type and module.weight.dtype == dtype
        assert torch.equal(module.weight.view(torch.uint8), state[f"{layer}.weight"].view(torch.uint8))  # as stored
        assert torch.equal(module.scale, state[f"{layer}.weight_scale"].float().reshape(-1))
    assert loaded.blocks[0].modulation.dtype == torch.float32 and loaded.patch_embedding.weight.dtype == torch.bfloat16
    x, t, context, _ = dit_inputs(model.config)
    with torch.no_grad():
        reference, out = to_bf16(model)(x, t, context), loaded(x, t, context)
    assert (out - reference).abs().max() <= bound * reference.abs().max()
    # Dequantised on request: the same weights in float layers.
    plain = wanx.load_model(path, quantize="none")
    ffn = plain.blocks[0].ffn[0]
    assert type(ffn) is torch.nn.Linear and ffn.weight.dtype == torch.bfloat16
    stored = state["blocks.0.ffn.0.weight"].float() * state["blocks.0.ffn.0.weight_scale"].float()
    assert torch.equal(ffn.weight, stored.bfloat16())


def test_lightx2v_int8_into_fp8_layers(tmp_path):
    """--fp8 on an int8 file: requantized to FP8 layers (one rounding more), still close."""
    model = tiny_dit()
    path, _ = lightx2v_file(tmp_path, model, torch.int8, "model_int8.safetensors")
    loaded = wanx.load_model(path, quantize="fp8")
    assert isinstance(loaded.blocks[0].ffn[0], FP8Linear)
    x, t, context, _ = dit_inputs(model.config)
    with torch.no_grad():
        reference, out = to_bf16(model)(x, t, context), loaded(x, t, context)
    assert (out - reference).abs().max() <= 0.06 * reference.abs().max()


@pytest.mark.parametrize("change", ["float weight", "block-wise fp8 scale", "int8 block-wise scale", "int8 per-tensor scale",
                                    "int8 without scale"])
def test_unknown_scale_layouts_are_refused_in_one_line(tmp_path, change):
    model = tiny_dit()
    dtype = torch.float8_e4m3fn if "fp8" in change else torch.int8
    path, state = lightx2v_file(tmp_path, model, dtype, "model_quantized.safetensors")
    key = "blocks.0.ffn.0.weight"
    if change == "float weight":  # a scale beside a float weight: not lightx2v's layout
        state[key] = model.blocks[0].ffn[0].weight.detach().bfloat16()
        expected = r"1 unexpected \(blocks\.0\.ffn\.0\.weight_scale\)"
    elif "block-wise" in change:  # [out/128, in/128] (lightx2v's 128x128-block layout): not per channel
        state[f"{key}_scale"] = torch.ones(1, 1)
        expected = rf"blocks\.0\.ffn\.0\.weight is stored as {'float8_e4m3fn' if 'fp8' in change else 'int8'} without " \
                   r"a per-channel scale \(blocks\.0\.ffn\.0\.weight_scale is \[1, 1\]: block-wise scales\); wanx " \
                   r"reads int8/fp8 weights with one float scale per output channel \(\[64\] or \[64, 1\]"
    elif change == "int8 per-tensor scale":
        state[f"{key}_scale"] = torch.ones(1)
        expected = r"weight_scale is \[1\]: per-tensor scales\)"
    else:
        del state[f"{key}_scale"]
        expected = r"blocks\.0\.ffn\.0\.weight is stored as int8 without a per-channel scale \(no blocks"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=expected) as err:
        wanx.load_model(path)
    assert "\n" not in str(err.value)
