"""Regional compile: one graph for every DiT block, no recompiles across steps, video sizes or
LoRA strengths, the same output as eager (float32: within 1e-5 of the output scale), and the
block streamer's hooks still around each block."""

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

from tests.lora.test_lora import factors, write
from tests.oracles import tiny_dit
from wanx.lora import apply_lora, set_lora_strength
from wanx.memory.streaming import BlockStreamer
from wanx.speed import compile_blocks

REL = 1e-5  # float32 compiled vs eager: inductor fuses and reorders float32 sums (seen: ~3e-7)


@functools.cache
def _cannot_compile() -> str | None:
    try:
        torch._dynamo.reset()
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as e:  # no C++ compiler, or an inductor that cannot build for this CPU
        return f"torch.compile cannot build a kernel on this machine: {type(e).__name__}: {e}"
    return None


@pytest.fixture(autouse=True)
def fresh_dynamo():
    if reason := _cannot_compile():
        pytest.skip(reason)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def inputs(f=2, h=4, w=6, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, f, h, w, generator=gen), torch.randn(1, 5, 32, generator=gen)


def close(a, b):
    assert (a - b).abs().max() <= REL * b.abs().max(), ((a - b).abs().max() / b.abs().max()).item()


def graphs() -> tuple[int, int]:
    """(graphs dynamo captured, frames it compiled): one each means one compile in all."""
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


def test_one_graph_for_all_blocks_steps_sizes_and_lora_strengths():
    dit = tiny_dit()
    reference = copy.deepcopy(dit)  # never compiled: the eager oracle
    for model in (dit, reference):  # (a deep copy has the adapters, not the record of the LoRA)
        apply_lora(model, write("official", factors(dit)), 1.0, name="a", fuse=False)
    handle = compile_blocks(dit)
    x, context = inputs()
    with torch.no_grad():
        close(dit(x, torch.tensor([700.0]), context), reference(x, torch.tensor([700.0]), context))
        assert graphs() == (1, 1)  # two blocks, one graph
        for step in range(10):
            t = torch.tensor([1000.0 - 97 * step])
            close(dit(x, t, context), reference(x, t, context))
        x2, context2 = inputs(3, 8, 10, seed=6)  # 60 tokens instead of 12
        t = torch.tensor([500.0])
        close(dit(x2, t, context2), reference(x2, t, context2))
        for strength in (0.5, 0.0, -1.25):
            set_lora_strength(dit, "a", strength)
            set_lora_strength(reference, "a", strength)
            close(dit(x2, t, context2), reference(x2, t, context2))
        assert graphs() == (1, 1), dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])

        handle.remove()
        assert dit.block_wrappers == [] and all("forward" not in vars(b) for b in dit.blocks)
        assert torch.equal(dit(x, t, context), reference(x, t, context))  # eager again, bit for bit


def test_streamed_blocks_with_a_live_lora_keep_the_hooks_outside_the_graph():
    model = tiny_dit()
    x, context = inputs()
    with torch.no_grad():
        streamed = copy.deepcopy(model)
        streamer = BlockStreamer(streamed, "cpu", 0)
        apply_lora(streamed, write("official", factors(model)), 0.8, name="a")  # live: streamed
        reference = copy.deepcopy(model)
        apply_lora(reference, write("official", factors(model)), 0.8, name="a", fuse=False)
        entered = []
        enter = streamer._enter
        streamer._enter = lambda unit: entered.append(unit.module) or enter(unit)
        compile_blocks(streamed)
        for t in (300.0, 20.0):
            t = torch.tensor([t])
            close(streamed(x, t, context), reference(x, t, context))
        # The weight-swapping hooks ran in Python for every block and call (inside a graph they
        # would have run once, while tracing).
        assert [m for m in entered if m in list(streamed.blocks)] == list(streamed.blocks) * 2
        assert streamer.stats.moved_bytes > 0
        assert graphs() == (1, 1), dict(counters["stats"])
        streamer.remove()


def test_compile_twice_is_refused_and_remove_is_idempotent():
    dit = tiny_dit()
    handle = compile_blocks(dit)
    with pytest.raises(ValueError, match="compiled twice"):
        compile_blocks(dit)
    handle.remove()
    handle.remove()
    compile_blocks(dit).remove()


class _EveryQuantizedLinear(torch.nn.Module):
    """A GGUFLinear of every supported quant type and an Int8Linear side by side on one input."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return torch.stack([layer(x) for layer in self.layers])


def test_packed_layers_compile_in_one_graph_and_match_eager():
    """The dequantization (uint8 bit fields, fp16 scales viewed from bytes) traces without a
    graph break for every GGUF type and INT8, and the compiled layers give eager's output."""
    gguf = pytest.importorskip("gguf")
    from tests.loading.kquants import K_QUANTS, quantize_k
    from wanx.memory.gguf import QUANTIZED, GGUFLinear
    from wanx.memory.int8 import Int8Linear

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 256, generator=gen) * 0.05
    layers = []
    for name in QUANTIZED:
        kind = gguf.GGMLQuantizationType[name]
        packed = quantize_k(weight.numpy(), name) if name in K_QUANTS else gguf.quants.quantize(weight.numpy(), kind)
        layer = GGUFLinear(256, 16, name, compute_dtype=torch.float32)
        layer.set_weight(torch.from_numpy(packed), torch.randn(16, generator=gen))
        layers.append(layer)
    layers.append(Int8Linear.from_linear(torch.nn.Linear(256, 16), compute_dtype=torch.float32))
    model = _EveryQuantizedLinear(layers)
    x = torch.randn(3, 256, generator=gen)
    with torch.no_grad():
        close(torch.compile(model, fullgraph=True)(x), model(x))  # fullgraph: a graph break raises
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_regional_compile_of_a_gguf_and_int8_dit_is_one_graph(tmp_path):
    """A GGUF DiT (Q8_0, Q4_0 and Q5_1 layers packed, the F16 ones then made INT8) compiles its
    blocks in one graph without a break, as the float DiT does, and matches eager. (The quant
    type of each layer is part of the graph: blocks typed differently compile one graph each.)"""
    gguf = pytest.importorskip("gguf")
    import wanx
    from tests.loading.test_gguf import write_gguf
    from wanx.memory.gguf import GGUFLinear
    from wanx.memory.int8 import Int8Linear, quantize_int8

    Q = gguf.GGMLQuantizationType
    path = write_gguf(tmp_path / "mixed.gguf", tiny_dit(), [Q.Q8_0, Q.Q4_0, Q.F16, Q.Q5_1, Q.F16])  # 10 layers a block
    dit = quantize_int8(wanx.load_model(path, dtype=torch.float32), compute_dtype=torch.float32)
    kinds = {type(m) for m in dit.blocks[0].modules()}
    assert {GGUFLinear, Int8Linear} <= kinds and torch.nn.Linear not in kinds
    reference = copy.deepcopy(dit)
    compile_blocks(dit, fullgraph=True)
    x, context = inputs()
    with torch.no_grad():
        for t in (700.0, 300.0):
            t = torch.tensor([t])
            close(dit(x, t, context), reference(x, t, context))
    # (with fullgraph=True dynamo does not count the frame as "ok": the graphs are the count)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
