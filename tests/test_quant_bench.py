"""bench/quant.py (issue #29): its byte accounting is exact (the packed GGUF sizes, as wanx
holds and loads them), its formats are the ones wanx.memory.gguf supports, and its timing and
load paths run."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from wanx.configs import dit_config
from wanx.memory import gguf as wgguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quant():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_quant", ROOT / "bench" / "quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formats_are_every_supported_gguf_type_by_size(quant):
    assert set(quant.gguf_types()) == set(wgguf.QUANTIZED)
    assert quant.formats()[:3] == ["bf16", "fp8", "int8"]
    bits = [quant.bits_per_weight(f) for f in quant.gguf_types()]
    assert bits == sorted(bits, reverse=True)


def test_packed_bytes_per_weight_are_the_block_sizes(quant):
    layer = quant.quant_layer("Q4_0", 8960, 1536)
    assert layer.qweight.numel() * 32 == 8960 * 1536 * 18  # 18 bytes per block of 32
    layer = quant.quant_layer("Q4_K", 5120, 13824)
    assert layer.qweight.numel() * 256 == 5120 * 13824 * 144  # 144 bytes per block of 256


def test_dit_bytes_are_exact_and_ordered(quant):
    bf16, q4 = quant.dit_bytes("t2v-1.3B", "bf16"), quant.dit_bytes("t2v-1.3B", "Q4_0")
    n = q4["linear_weights"]
    assert n == bf16["linear_weights"] == 30 * (8 * 1536 * 1536 + 2 * 8960 * 1536)
    # only the block Linear weights change: 2 bytes a weight -> 18/32
    assert bf16["held"] - q4["held"] == n * 2 - n * 18 // 32
    held = {f: quant.dit_bytes("t2v-1.3B", f)["held"] for f in ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K")}
    assert held["Q8_0"] > held["Q6_K"] > held["Q5_K"] > held["Q4_K"] > held["Q3_K"]
    # wanx's estimate (kept_bytes) counts the float32-kept parameters (time_projection, the
    # modulations: 17M of 1.4B) at 2 bytes, and no per-channel scales: up to 4% under at 1.3B Q4_0
    for fmt in ("bf16", "int8", "Q4_0"):
        found = quant.dit_bytes("t2v-1.3B", fmt)
        assert 0.95 * found["held"] < found["estimate"] < found["held"]


def test_random_packed_weights_dequantize_finite_and_time(quant):
    for fmt in quant.gguf_types():
        layer = quant.filled_layer(fmt, 16, 256, torch.device("cpu"))
        w = layer.dequantized().float()
        assert torch.isfinite(w).all() and w.abs().max() > 0, fmt
    rows, _ = quant.layer_rows(["bf16", "int8", "Q4_0"], [("tiny", 64, 256)], 8, torch.device("cpu"), 1,
                               with_torchao=False)
    assert [r["format"] for r in rows] == ["fp32", "bf16", "int8", "Q4_0"]
    assert all(r["s"] > 0 and math.isfinite(r["x_bf16"]) for r in rows)
    assert next(r for r in rows if r["format"] == "bf16")["x_bf16"] == 1.0


def test_a_written_gguf_loads_with_the_counted_bytes(quant):
    """One block of T2V-1.3B shape in Q4_0, loaded by wanx in a child process: the model holds
    exactly the bytes the accounting says."""
    found = quant.load_row("t2v-1.3B", "Q4_0", 1)
    one_block = dataclasses.replace(dit_config("t2v-1.3B"), num_layers=1)
    assert found["held"] == quant.dit_bytes(one_block, "Q4_0")["held"]
    assert found["anon"] >= 0 and found["file_bytes"] > found["held"] // 2


def test_fit_table_counts_quantized_dits_packed_and_is_the_docs_table(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_fit_table", ROOT / "bench" / "fit_table.py")
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    linear = fit.block_linear_params("t2v-14B")
    assert linear == 40 * (8 * 5120 * 5120 + 2 * 13824 * 5120)
    rest = fit.DIT_PARAMS["t2v-14B"] - linear
    assert fit.dit_bytes("t2v-14B", "GGUF Q4_K") == linear * 144 // 256 + rest * 2
    assert fit.dit_bytes("t2v-14B", "INT8") == linear + rest * 2
    # 14B at 480P on 24 GiB: resident only once the DiT is packed to Q4_K (bf16 needs --fp8 there)
    assert fit.best("t2v-14B", "480P", 24, "GGUF Q4_K").startswith("--t5-device cpu:")
    assert fit.best("t2v-14B", "480P", 24, "INT8").startswith("--int8 ")
    fit.main()
    printed = capsys.readouterr().out
    docs = (ROOT / "docs" / "memory.md").read_text(encoding="utf-8")
    for line in printed.splitlines():
        assert line in docs, line  # docs/memory.md shows what bench/fit_table.py prints
