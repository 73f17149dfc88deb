"""FP8 weights: error against bf16 stated and bounded, half the bytes, fp8 files loaded as
fp8 with no float copy, and FP8 combined with streaming."""

import copy
import json
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import wanx
from tests.loading.test_load_model import dit_inputs
from tests.oracles import official_state, tiny_dit, write_official_dit
from wanx.memory.fp8 import FP8Linear, fp8_layer_names, quantize_fp8, quantize_weight
from wanx.memory.streaming import BlockStreamer
from wanx.models import keeps_fp32


def to_bf16(model):
    """The model as loaded with dtype=bf16: fp32 islands kept."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        if not keeps_fp32(name, model.keep_in_fp32):
            p.data = p.data.bfloat16()
    return model


def linear_bytes(model):
    return sum(m.weight.numel() * m.weight.element_size() + (m.scale.numel() * 4 if isinstance(m, FP8Linear) else 0)
               for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, FP8Linear)) and name in fp8_layer_names(model))


def test_quantize_weight_round_trip():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    # e4m3 keeps 3 mantissa bits: every value within 2**-4 of itself, relative to its row's max.
    error = (q.float() * scale[:, None] - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert error.max() <= 2**-4


def test_fp8_dit_error_and_bytes():
    """Stated bound: the tiny DiT's output moves by at most 6% of its scale from bf16 (measured
    2.7%; bf16 itself is 0.4% from fp32). Random tiny weights are a worst case: every layer's
    rounding lands on a width-32 residual stream."""
    model = tiny_dit()
    x, t, context, _ = dit_inputs(model.config)
    bf16 = to_bf16(model)
    fp8 = quantize_fp8(to_bf16(model), compute_dtype=torch.bfloat16)
    assert all(isinstance(fp8.get_submodule(n), FP8Linear) for n in fp8_layer_names(fp8))
    assert fp8.blocks[0].modulation.dtype == torch.float32 and fp8.head.head.weight.dtype == torch.float32
    with torch.no_grad():
        reference, out = bf16(x, t, context), fp8(x, t, context)
    assert (out - reference).abs().max() <= 0.06 * reference.abs().max()
    weights = sum(fp8.get_submodule(n).weight.numel() for n in fp8_layer_names(fp8))
    assert sum(fp8.get_submodule(n).weight.nbytes for n in fp8_layer_names(fp8)) * 2 == \
        sum(bf16.get_submodule(n).weight.nbytes for n in fp8_layer_names(bf16)) == 2 * weights


def test_fp8_and_streaming_move_half_the_bytes():
    model = tiny_dit()
    x, t, context, _ = dit_inputs(model.config)
    plain = quantize_fp8(to_bf16(model))
    with torch.no_grad():
        reference = plain(x, t, context)
    bf16_streamer = BlockStreamer(to_bf16(model), "cpu", 0)
    fp8_streamer = BlockStreamer(plain, "cpu", 0)
    with torch.no_grad():
        out = plain(x, t, context)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())
    moved = fp8_streamer.stats.moved_bytes
    assert moved == fp8_streamer.stats.streamed
    layers = [plain.get_submodule(n) for n in fp8_layer_names(plain)]
    saved = sum(m.weight.numel() for m in layers) - sum(m.scale.nbytes for m in layers)  # 2 bytes -> 1, plus scales
    assert bf16_streamer.stats.streamed - moved >= saved
    fp8_streamer.remove()


def comfy_fp8_file(tmp_path, model):
    """A ComfyUI fp8_scaled checkpoint: block Linear weights e4m3 with a per-tensor scale_weight, the rest bf16."""
    state = {f"model.diffusion_model.{k}": v for k, v in official_state(model).items()}
    for layer in fp8_layer_names(model):
        key = f"model.diffusion_model.{layer}.weight"
        scale = state[key].abs().max() / 448.0
        state[key] = (state[key] / scale).to(torch.float8_e4m3fn)
        state[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    for key, value in state.items():
        if value.dtype == torch.float32 and not key.endswith("scale_weight"):
            state[key] = value.bfloat16()
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(state, str(tmp_path / "wan2.1_t2v_fp8_scaled.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}), encoding="utf-8")
    return tmp_path / "wan2.1_t2v_fp8_scaled.safetensors", state


class MadeTensors(TorchDispatchMode):
    """Tensors that ops allocate (views and meta tensors aside): (dtype, shape) of each, those
    made from an fp8 input (dequantised copies), and the peak of their live bytes."""

    def __init__(self):
        super().__init__()
        self.made, self.from_fp8, self.live, self.peak = [], [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        fp8_input = any(t.dtype == torch.float8_e4m3fn for t in inputs)
        for t in tree_flatten(out)[0]:
            # A view shares its input's storage (`_is_view` is not set yet at this dispatch level).
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in storages:
                self.made.append((t.dtype, tuple(t.shape)))
                if fp8_input and t.dtype.is_floating_point and t.dtype.itemsize > 1:
                    self.from_fp8.append((func, t.dtype, tuple(t.shape)))
                self.live += t.nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, t.nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def test_comfy_fp8_scaled_loads_into_fp8_layers_without_a_float_copy(tmp_path):
    model = tiny_dit()
    path, state = comfy_fp8_file(tmp_path, model)
    with MadeTensors() as seen:
        loaded = wanx.load_model(path)
    assert not seen.from_fp8, seen.from_fp8[:3]  # no fp8 weight was ever dequantised into a float copy
    layer = loaded.blocks[0].ffn[0]
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    stored = state["model.diffusion_model.blocks.0.ffn.0.weight"]
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))  # the file's bytes, as stored
    assert torch.equal(layer.scale, state["model.diffusion_model.blocks.0.ffn.0.scale_weight"].expand(layer.out_features))
    assert loaded.blocks[0].modulation.dtype == torch.float32 and loaded.patch_embedding.weight.dtype == torch.bfloat16
    # Dequantised on demand it is the ComfyUI weight exactly.
    assert torch.equal(layer.dequantized().float(), (stored.float() * layer.scale[0]).bfloat16().float())
    plain = wanx.load_model(path, quantize="none")
    assert type(plain.blocks[0].ffn[0]) is torch.nn.Linear and plain.blocks[0].ffn[0].weight.dtype == torch.bfloat16


def test_bf16_checkpoint_quantized_while_loading(tmp_path):
    """One layer's float copy at a time, never the model's: besides the parameters that stay
    in float (cast from the file), the tensors alive at once while loading hold at most a few
    times one fp32 Linear weight."""
    model = tiny_dit()
    path = write_official_dit(tmp_path, model)
    with MadeTensors() as seen:
        loaded = wanx.load_model(path, dtype=torch.bfloat16, quantize="fp8")
    fp8_layers = [loaded.get_submodule(n) for n in fp8_layer_names(loaded)]
    assert fp8_layers and all(isinstance(m, FP8Linear) for m in fp8_layers)
    kept_float = sum(p.nbytes for p in loaded.parameters() if p.dtype != torch.float8_e4m3fn)
    fp8_bytes = sum(m.weight.nbytes + m.scale.nbytes for m in fp8_layers)
    largest_fp32 = 4 * max(m.weight.numel() for m in fp8_layers)
    assert seen.peak <= kept_float + fp8_bytes + 4 * largest_fp32
    assert 4 * largest_fp32 < sum(2 * m.weight.numel() for m in fp8_layers)  # less than a bf16 copy of them
    x, t, context, _ = dit_inputs(model.config)
    with torch.no_grad():
        reference = to_bf16(model)(x, t, context)
        assert (loaded(x, t, context) - reference).abs().max() <= 0.06 * reference.abs().max()


def test_bad_quantize_value(tmp_path):
    with pytest.raises(ValueError, match="quantize must be"):
        wanx.load_model(write_official_dit(tmp_path, tiny_dit()), quantize="int4")
