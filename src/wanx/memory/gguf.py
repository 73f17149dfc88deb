"""GGUF quantized weights in torch: dequantization of the GGML block formats on the tensor's
own device, and a Linear that keeps its weight packed and dequantizes it per call.

Each format packs a row into blocks of 32 (legacy types) or 256 (K-quants) values, with fp16
scales inside the block. The arithmetic below follows the `gguf` package's NumPy reference
(`gguf.quants`) operation for operation in float32, so the results are bit for bit the same;
no import of `gguf` is needed here (the layouts are fixed by the format).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QK_K = 256
# GGML type id -> (name, values per block, bytes per block); the ids are the file format's.
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
}
QUANTIZED = tuple(name for name, size, _ in TYPES.values() if size > 1)
_BY_NAME = {name: qtype for qtype, (name, _, _) in TYPES.items()}


def qtype_id(qtype: int | str) -> int:
    """A GGML type as its id, from an id, a name ("Q4_0") or a `gguf.GGMLQuantizationType`."""
    key = getattr(qtype, "name", qtype)
    if isinstance(key, str) and key.upper() in _BY_NAME:
        return _BY_NAME[key.upper()]
    if isinstance(qtype, int) and int(qtype) in TYPES:
        return int(qtype)
    raise ValueError(f"GGUF tensor type {key} is not supported; supported: {', '.join(n for n, _, _ in TYPES.values())}")


def packed_bytes(qtype: int | str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` takes in `qtype` (the last dim is a whole number of blocks)."""
    _, block, size = TYPES[qtype_id(qtype)]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _f16(b: Tensor) -> Tensor:
    """`[n, 2]` uint8 -> `[n, 1]` float32 (the fp16 little-endian scale of each block)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, groups: int) -> Tensor:
    """`[n, groups*k]` bytes -> `[n, groups, 2, k]`: low nibbles of each group, then its high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, -1) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return q & 0x0F


def _bits(b: Tensor, width: int, count: int) -> Tensor:
    """`[n, ..., k]` bytes -> `[n, ..., count, k]`: bit fields of `width` at shifts 0, width, ..."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8, device=b.device).reshape(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], -1).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], -1).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(b: Tensor, offset: int) -> Tensor:
    """The 5-bit value of each of 32 elements: 4 bits from the nibbles, the 5th from a 32-bit mask
    (little-endian: element i's bit is bit i % 8 of mask byte i // 8)."""
    n = b.shape[0]
    qh = _bits(b[:, offset:offset + 4], 1, 8).transpose(-1, -2).reshape(n, 32)
    ql = _nibbles(b[:, offset + 4:], 1).reshape(n, 32)
    return ql | (qh << 4)


def _q5_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _q5(b, 4).float() + _f16(b[:, 2:4])


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block from its 12 scale bytes."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    ql = _nibbles(b[:, 48:], 4).reshape(n, -1, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), 1, 8).reshape(n, -1, 32)
    return (d * (ql | (qh << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(b[:, :128], 2).reshape(n, -1, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _nibbles(scales[:, :8], 1).reshape(n, 16)
    high = _bits(scales[:, 8:12], 2, 4).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b[:, 108:110]) * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, QK_K // 16)
    qh = _bits(hmask.reshape(n, 1, 32), 1, 8).reshape(n, 16, QK_K // 16) ^ 1  # the offset applies where the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q2_k(b: Tensor) -> Tensor:
    """16 sub-blocks of 16: a 4-bit scale (low nibble) and 4-bit min (high nibble) each, times
    the block's fp16 d and dmin; the 2-bit values sit four to a byte."""
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b[:, 80:82]) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, QK_K // 16).float()
    return (dl * q - ml).reshape(n, QK_K)


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(packed: Tensor, qtype: int | str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed GGUF bytes (uint8, any shape) -> a `dtype` tensor of `shape` on the same device.
    Computed in float32 (bit for bit as `gguf.quants.dequantize`), then cast once."""
    name, block, size = TYPES[qtype_id(qtype)]
    raw = packed.reshape(-1)
    if raw.dtype != torch.uint8:
        raise ValueError(f"packed GGUF data must be uint8, got {raw.dtype}")
    if raw.numel() != packed_bytes(name, shape):
        raise ValueError(f"{name} data of {raw.numel():,} bytes does not hold a tensor of shape {list(shape)} "
                         f"({packed_bytes(name, shape):,} bytes)")
    if name == "F32":
        out = raw.view(torch.float32)
    elif name == "F16":
        out = raw.view(torch.float16).float()
    elif name == "BF16":
        out = raw.view(torch.bfloat16).float()
    else:
        out = _DEQUANT[name](raw.reshape(-1, size))
    return out.reshape(shape).to(dtype)


class GGUFLinear(nn.Module):
    """A Linear whose weight stays packed in a GGUF quant type (`qweight`, uint8) and is
    dequantized to the compute dtype on each call; the bias is a float tensor."""

    def __init__(self, in_features: int, out_features: int, qtype: int | str, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = TYPES[qtype_id(qtype)][0]
        self.compute_dtype = compute_dtype
        n = packed_bytes(self.qtype, (out_features, in_features))
        self.qweight = nn.Parameter(torch.empty(n, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def set_weight(self, packed: Tensor, bias: Tensor | None = None) -> None:
        want = packed_bytes(self.qtype, (self.out_features, self.in_features))
        if packed.dtype != torch.uint8 or packed.numel() != want:
            raise ValueError(f"{self.qtype} weight [{self.out_features}, {self.in_features}] needs {want:,} bytes "
                             f"of uint8, got {packed.numel():,} of {packed.dtype}")
        self.qweight = nn.Parameter(packed.reshape(-1), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(self.compute_dtype), requires_grad=False)

    def dequantized(self) -> Tensor:
        return dequantize(self.qweight, self.qtype, (self.out_features, self.in_features), self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype), self.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}, " \
               f"compute={str(self.compute_dtype).removeprefix('torch.')}"
