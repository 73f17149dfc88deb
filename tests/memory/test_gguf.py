"""GGUF dequantization in torch against the `gguf` package's NumPy reference, bit for bit."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from wanx.memory.gguf import QUANTIZED, TYPES, GGUFLinear, dequantize, qtype_id  # noqa: E402

SIMPLE = ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"]
K_QUANTS = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
# where each K-quant block keeps its fp16 scales (d, and dmin where it has one)
FP16_FIELDS = {"Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,), "Q2_K": (80, 82)}


def _random_k_blocks(name: str, n: int, rng) -> np.ndarray:
    """Valid K-quant blocks: random bytes, with the fp16 scale fields set to finite values."""
    _, _, size = TYPES[qtype_id(name)]
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for offset in FP16_FIELDS[name]:
        scale = rng.standard_normal(n).astype(np.float16) * np.float16(0.01)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("name", SIMPLE)
def test_simple_types_match_numpy_bit_for_bit(name):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3.0, (8, 1))).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[name]
    packed = gguf.quants.quantize(rows, qtype)
    want = gguf.quants.dequantize(packed, qtype)
    got = dequantize(torch.from_numpy(packed), name, rows.shape)
    assert got.dtype == torch.float32 and got.shape == rows.shape
    assert torch.equal(got.view(torch.int32), torch.from_numpy(want).view(torch.int32))


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_match_numpy_bit_for_bit(name):
    rng = np.random.default_rng(1)
    blocks = _random_k_blocks(name, 12, rng)  # 12 blocks of 256: a [6, 512] tensor
    qtype = gguf.GGMLQuantizationType[name]
    want = gguf.quants.dequantize(blocks.reshape(6, -1), qtype)
    got = dequantize(torch.from_numpy(blocks), name, (6, 512))
    assert torch.equal(got.view(torch.int32), torch.from_numpy(np.ascontiguousarray(want)).view(torch.int32))


def test_every_quantized_type_is_tested():
    assert sorted(QUANTIZED) == sorted(SIMPLE + K_QUANTS)


def test_unsupported_type_is_named_with_the_supported_list():
    with pytest.raises(ValueError, match=r"IQ2_XXS is not supported; supported: .*Q4_0.*Q6_K"):
        qtype_id(gguf.GGMLQuantizationType.IQ2_XXS)


def test_wrong_byte_count_is_refused():
    with pytest.raises(ValueError, match="does not hold a tensor of shape"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))


def test_gguf_linear_equals_linear_on_the_dequantized_weight():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0)
    layer = GGUFLinear(64, 16, "Q4_0", compute_dtype=torch.float32)
    bias = torch.randn(16)
    layer.set_weight(torch.from_numpy(packed), bias)
    x = torch.randn(3, 64)
    w = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_0))
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, bias), rtol=0, atol=0)
    assert layer.qweight.numel() == 16 * 64 // 32 * 18  # packed: 4.5 bits per weight
    half = GGUFLinear(64, 16, "Q4_0", compute_dtype=torch.bfloat16)
    half.set_weight(torch.from_numpy(packed), bias)
    assert half(x).dtype == torch.bfloat16
