"""Every runtime transform (block streaming, FP8, INT8, the step cache, compiled blocks, LoRA) on
each model family with modules or inputs of its own (VACE, Animate, Animate-2, S2V): one table
of families, one test per transform, parametrized over the families the transform applies to.

A family's row says how to build its tiny random model and its inputs, how a forward pass is
called (Animate-2 runs a segment: the reference pass, then a denoising pass on its cache), and
for each transform the modules it must reach (the family's own blocks and projections: a
transform that only knew the base DiT's blocks would leave them out)."""

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from tests.models.test_animate import TINY as TINY_ANIMATE
from tests.models.test_animate import animate_inputs, tiny_animate
from tests.models.test_animate2 import TINY as TINY_ANIMATE2
from tests.models.test_animate2 import run_ours, segment_inputs, tiny_animate2
from tests.models.test_s2v import TINY as TINY_S2V
from tests.models.test_s2v import s2v_inputs, tiny_s2v
from tests.models.test_vace import TWO_BLOCKS, tiny_vace, vace_inputs
from wanx.models import keeps_fp32


def relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def call(model, inputs):
    return model(**inputs)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]  # batch -> the inputs `run` takes
    batch: int = 1  # of the streaming, FP8 and INT8 runs
    run: Callable[[torch.nn.Module, dict], torch.Tensor] = call
    stream_change: dict = field(default_factory=dict)  # merged into the streaming run's inputs
    streamed: frozenset = frozenset()  # block units the streamer must find
    stream_counts: bool = False  # two runs, each moving every weight in and leaving none on the device
    fp8_names: frozenset = frozenset()  # among fp8_layer_names
    fp8_layers: tuple = ()  # FP8Linear after quantize_fp8
    int8_layers: tuple | None = None  # Int8Linear after quantize_int8; None: not tested on this family
    step_cache: bool = False
    compile_cases: Callable[[dict], list[dict]] = lambda inputs: [inputs]  # from the batch-1 inputs
    # LoRA: module name -> {key format: the module's key in that format}
    lora: dict = field(default_factory=dict)


def _vace_inputs(batch):
    x, t, context, vace = vace_inputs(TWO_BLOCKS, batch=batch)
    return dict(x=x, timestep=t, context=context, vace_context=vace)


def _vace_compile_cases(inputs):
    # A second size (2 frames) at another scale reuses the compiled graphs.
    shorter = dict(inputs, x=inputs["x"][:, :, :2], vace_context=inputs["vace_context"][:, :, :2],
                   vace_context_scale=0.7)
    return [inputs, shorter]


def _animate2_segment(model, inputs):
    return run_ours(model, inputs, torch.tensor([600.0]))[1]


def _animate2_inputs(batch):
    assert batch == 1, "an Animate-2 segment is one sample"
    return segment_inputs(TINY_ANIMATE2)


FAMILIES = [
    Family("vace", tiny_vace, _vace_inputs, batch=2,
           stream_change=dict(vace_context_scale=0.7),
           streamed=frozenset({"vace_blocks.0", "vace_blocks.1", "blocks.0", "blocks.1"}), stream_counts=True,
           fp8_names=frozenset({"vace_blocks.0.before_proj", "vace_blocks.1.after_proj", "vace_blocks.1.self_attn.q"}),
           fp8_layers=("vace_blocks.0.before_proj",),
           int8_layers=("vace_blocks.0.before_proj", "vace_blocks.1.ffn.0"),
           step_cache=True, compile_cases=_vace_compile_cases,
           lora={"vace_blocks.1.self_attn.q": {"official": "diffusion_model.vace_blocks.1.self_attn.q",
                                               "kohya": "lora_unet_vace_blocks_1_self_attn_q",
                                               "diffusers": "transformer.vace_blocks.1.attn1.to_q"},
                 "vace_blocks.0.after_proj": {"official": "diffusion_model.vace_blocks.0.after_proj",
                                              "kohya": "lora_unet_vace_blocks_0_after_proj",
                                              "diffusers": "transformer.vace_blocks.0.proj_out"}}),
    Family("animate", tiny_animate, lambda batch: animate_inputs(TINY_ANIMATE, batch=batch),
           streamed=frozenset({"face_adapter.fuser_blocks.0", "blocks.0", "blocks.1"}), stream_counts=True,
           fp8_names=frozenset({"face_adapter.fuser_blocks.0.linear1_kv", "face_adapter.fuser_blocks.0.linear2",
                                "blocks.1.self_attn.q"}),
           fp8_layers=("face_adapter.fuser_blocks.0.linear1_q",),
           int8_layers=("face_adapter.fuser_blocks.0.linear1_kv",),
           step_cache=True,
           lora={"face_adapter.fuser_blocks.0.linear1_q": {
                     "official": "diffusion_model.face_adapter.fuser_blocks.0.linear1_q",
                     "diffusers": "transformer.face_adapter.0.to_q"},
                 "face_adapter.fuser_blocks.0.linear2": {
                     "official": "diffusion_model.face_adapter.fuser_blocks.0.linear2",
                     "diffusers": "transformer.face_adapter.0.to_out"}}),
    Family("animate2", tiny_animate2, _animate2_inputs, run=_animate2_segment,
           streamed=frozenset({"blocks.0", "blocks.9"}),
           fp8_layers=("blocks.1.block.self_attn.q",),
           lora={"blocks.3.block.self_attn.q": {"official": "diffusion_model.blocks.3.block.self_attn.q"}}),
    Family("s2v", tiny_s2v, lambda batch: s2v_inputs(TINY_S2V, batch=batch),
           streamed=frozenset({"audio_injector.injector.0", "audio_injector.injector.1", "blocks.0", "blocks.2"}),
           fp8_layers=("audio_injector.injector.0.q", "blocks.1.self_attn.q"),
           step_cache=True,
           lora={"audio_injector.injector.1.q": {"official": "diffusion_model.audio_injector.injector.1.q"},
                 "blocks.2.self_attn.o": {"official": "diffusion_model.blocks.2.self_attn.o"}}),
]


def families(where=lambda family: True):
    return [pytest.param(f, id=f.name) for f in FAMILIES if where(f)]


def rows(inputs, sl):
    return {k: (v[sl] if torch.is_tensor(v) else v) for k, v in inputs.items()}


def bf16_with_fp32_islands(model):
    """The model in bfloat16 but for its float32 islands, as load_model keeps them."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, p in bf16.named_parameters():
        if keeps_fp32(name, model.keep_in_fp32):
            p.data = p.data.float()
    return bf16


@pytest.mark.parametrize("family", families())
def test_streaming_streams_the_family_blocks_and_equals_the_resident_run(family):
    from tests.oracles import assert_same_outputs
    from wanx.memory.streaming import BlockStreamer

    model = family.build()
    inputs = dict(family.inputs(family.batch), **family.stream_change)
    with torch.no_grad():
        reference = family.run(model, inputs)
    streamer = BlockStreamer(model, "cpu", 0)
    try:
        names = {u.name for u in streamer.units if id(u.module) in streamer._block_unit}
        assert family.streamed <= names  # by the block wrapper
        with torch.no_grad():
            for _ in range(2 if family.stream_counts else 1):
                streamer.stats.reset()
                out = family.run(model, inputs)
                assert_same_outputs(out, reference)
        if family.stream_counts:
            total = sum(p.numel() * p.element_size() for p in model.parameters())  # every weight came in
            assert streamer.stats.resident == 0 and streamer.stats.moved_bytes == total
            assert streamer.stats.device_bytes == 0
    finally:
        streamer.remove()


@pytest.mark.parametrize("family", families())
def test_fp8_quantizes_the_family_layers_and_stays_close(family):
    from wanx.memory.fp8 import FP8Linear, fp8_layer_names, quantize_fp8

    model = family.build()
    inputs = family.inputs(family.batch)
    bf16 = bf16_with_fp32_islands(model)
    assert family.fp8_names <= set(fp8_layer_names(bf16))
    reference = copy.deepcopy(bf16)
    fp8 = quantize_fp8(bf16, compute_dtype=torch.bfloat16)
    for name in family.fp8_layers:
        assert isinstance(fp8.get_submodule(name), FP8Linear), name
    with torch.no_grad():
        ref, out = family.run(reference, inputs), family.run(fp8, inputs)
    assert relative(out, ref) <= 0.06  # the base DiT's stated FP8 bound


@pytest.mark.parametrize("family", families(lambda f: f.int8_layers is not None))
def test_int8_quantizes_the_family_layers_and_stays_close(family):
    from wanx.memory.int8 import Int8Linear, quantize_int8

    model = family.build()
    inputs = family.inputs(family.batch)
    int8 = quantize_int8(copy.deepcopy(model), compute_dtype=torch.float32)
    for name in family.int8_layers:
        assert isinstance(int8.get_submodule(name), Int8Linear), name
    with torch.no_grad():
        ref, out = family.run(model, inputs), family.run(int8, inputs)
    assert 0 < relative(out, ref) <= 0.03  # the base DiT's stated INT8 bound


@pytest.mark.parametrize("family", families(lambda f: f.step_cache))
def test_step_cache_takes_the_family_rows_of_the_branches_it_runs(family):
    """With guidance batched, a step where only one branch runs passes only that row of the
    family's own inputs (VACE context, face tokens, time projections and audio tokens) to its
    blocks; the row equals the branch computed alone."""
    from wanx.speed.cache import StepCache

    model = family.build()
    inputs = family.inputs(2)
    cache = StepCache("magcache", 10.0, magcache_k=5, retention=0.0, quiet=True).add_to(model)
    cache.start(3, model.config, 480, 832)
    with torch.no_grad():
        cache.at(0, ("cond",))  # only cond has a residual after this
        family.run(model, rows(inputs, slice(0, 1)))
        cache.at(1, ("cond", "uncond"))
        out = family.run(model, inputs)  # cond skipped, uncond (row 1) computed alone
        cache.remove()
        alone = family.run(model, rows(inputs, slice(1, 2)))
    assert cache.stats.skipped == {"cond": 1} and cache.stats.computed == {"cond": 1, "uncond": 1}
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-6 * alone.abs().max().item())


@pytest.mark.parametrize("family", families())
def test_compiled_blocks_equal_eager(family):
    from tests.speed.test_compile import _cannot_compile
    from wanx.speed import compile_blocks

    if reason := _cannot_compile():
        pytest.skip(reason)
    torch._dynamo.reset()
    model = family.build()
    reference = copy.deepcopy(model)
    handle = compile_blocks(model)
    try:
        with torch.no_grad():
            for inputs in family.compile_cases(family.inputs(1)):
                assert relative(family.run(model, inputs), family.run(reference, inputs)) <= 1e-5
    finally:
        handle.remove()


LORA_CASES = [pytest.param(f, fmt, id=f"{f.name}-{fmt}") for f in FAMILIES
              for fmt in next(iter(f.lora.values()))]


@pytest.mark.parametrize("family, fmt", LORA_CASES)
def test_lora_on_the_family_keys(family, fmt):
    """A LoRA on the family's own modules changes those weights by its product, in each key
    format the family's LoRAs come in."""
    from wanx.lora import apply_lora

    model = family.build()
    gen = torch.Generator().manual_seed(3)
    low, high = ("lora_down", "lora_up") if fmt == "kohya" else ("lora_A", "lora_B")
    state, expected = {}, {}
    for name, keys in family.lora.items():
        out_features, in_features = model.get_submodule(name).weight.shape
        down = torch.randn(4, in_features, generator=gen) * 0.2
        up = torch.randn(out_features, 4, generator=gen) * 0.2
        expected[name] = model.get_submodule(name).weight.detach() + up @ down
        state[f"{keys[fmt]}.{low}.weight"], state[f"{keys[fmt]}.{high}.weight"] = down, up
    apply_lora(model, state, 1.0, name=family.name, fuse=True)
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, weight, rtol=1e-6, atol=1e-6)
