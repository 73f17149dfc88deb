"""K-quant encoders for writing test GGUF files: the `gguf` package (0.19) dequantizes the
K-quants but cannot quantize to them. Plain round-to-nearest per sub-block (llama.cpp searches
each sub-block's scale and min, so released files are somewhat closer to their floats); every
call checks its packing against `gguf.quants.dequantize`."""

import gguf
import numpy as np

QK_K = 256
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
_E = np.arange(QK_K)
# where element e of a block keeps its bits: (byte, shift) per layout, read off the dequantizers
TWO_BITS = ((_E // 128) * 32 + _E % 32, 2 * ((_E % 128) // 32))  # Q2_K/Q3_K values, Q6_K high bits
ONE_BIT = (_E % 32, _E // 32)  # Q3_K/Q5_K high bits
NIBBLES_32 = ((_E // 64) * 32 + _E % 32, 4 * ((_E % 64) // 32))  # Q4_K/Q5_K low bits
NIBBLES_64 = ((_E // 128) * 64 + _E % 64, 4 * ((_E % 128) // 64))  # Q6_K low bits


def _pack(values: np.ndarray, layout, nbytes: int) -> np.ndarray:
    """`[n, k]` small unsigned ints -> `[n, nbytes]` bytes, value i at bits shift[i] of byte[i]."""
    byte, shift = layout
    out = np.zeros((values.shape[0], nbytes), np.int64)
    for i in range(values.shape[1]):
        out[:, byte[i]] |= values[:, i].astype(np.int64) << int(shift[i])
    return out.astype(np.uint8)


def _f16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A per-block fp16 scale: its 2 bytes per block, and its value in float32."""
    half = values.astype(np.float16)
    return half.view(np.uint8).reshape(-1, 2), half.astype(np.float32)


def _div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, 0, x / d)


def _signed_scales(sub: np.ndarray, qmin: int) -> np.ndarray:
    """Symmetric types: the scale mapping each sub-block's largest-magnitude value to `qmin`."""
    at = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    return at / qmin


def _asymmetric(sub: np.ndarray, levels: int, scale_max: int):
    """Types with a min: 0..levels codes over [min(x, 0), max(x, 0)] per sub-block; the scales
    and mins as `scale_max`-step fractions of the block's fp16 d and dmin."""
    lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)
    d_bytes, d = _f16((hi - lo).max(-1) / levels / scale_max)
    m_bytes, dmin = _f16((-lo).max(-1) / scale_max)
    sc = np.clip(np.round(_div((hi - lo) / levels, d[:, None])), 0, scale_max)
    mn = np.clip(np.round(_div(-lo, dmin[:, None])), 0, scale_max)
    dl, ml = (d[:, None] * sc)[..., None], (dmin[:, None] * mn)[..., None]
    q = np.clip(np.round(_div(sub + ml, dl)), 0, levels)
    return d_bytes, m_bytes, sc.astype(np.int64), mn.astype(np.int64), q.astype(np.int64), dl * q - ml


def _symmetric(sub: np.ndarray, qmin: int, qmax: int, scale_max: int):
    s = _signed_scales(sub, qmin)
    d_bytes, d = _f16(np.abs(s).max(-1) / scale_max)
    sc = np.clip(np.round(_div(s, d[:, None])), -scale_max - 1, scale_max)
    dl = (d[:, None] * sc)[..., None]
    q = np.clip(np.round(_div(sub, dl)), qmin, qmax)
    return d_bytes, sc.astype(np.int64), q.astype(np.int64), dl * q


def _scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in 12 bytes (Q4_K/Q5_K): the first four of each in the low 6
    bits of bytes 0-3 and 4-7, the last four's low nibbles in bytes 8-11, their top 2 bits in the
    top bits of bytes 0-7."""
    first = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6)], axis=1)
    return np.concatenate([first, (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)


def quantize_k(data: np.ndarray, name: str) -> np.ndarray:
    """A float `[rows, cols]` array (cols a multiple of 256) -> its K-quant bytes `[rows, bytes]`."""
    rows = data.shape[0]
    x = data.astype(np.float32).reshape(-1, QK_K)
    n = x.shape[0]
    if name == "Q2_K":
        d, dmin, sc, mn, q, recon = _asymmetric(x.reshape(n, 16, 16), 3, 15)
        blocks = [(sc | (mn << 4)).astype(np.uint8), _pack(q.reshape(n, -1), TWO_BITS, 64), d, dmin]
    elif name == "Q3_K":
        d, sc, q, recon = _symmetric(x.reshape(n, 16, 16), -4, 3, 31)
        u, s = (q + 4).reshape(n, -1), sc + 32
        scales = _pack(s & 0x0F, (np.arange(16) % 8, 4 * (np.arange(16) // 8)), 12) | \
            _pack(s >> 4, (8 + np.arange(16) % 4, 2 * (np.arange(16) // 4)), 12)
        blocks = [_pack(u >> 2, ONE_BIT, 32), _pack(u & 3, TWO_BITS, 64), scales, d]
    elif name in ("Q4_K", "Q5_K"):
        levels = 15 if name == "Q4_K" else 31
        d, dmin, sc, mn, q, recon = _asymmetric(x.reshape(n, 8, 32), levels, 63)
        q = q.reshape(n, -1)
        high = [_pack(q >> 4, ONE_BIT, 32)] if name == "Q5_K" else []
        blocks = [d, dmin, _scales_k4(sc, mn), *high, _pack(q & 0x0F, NIBBLES_32, 128)]
    elif name == "Q6_K":
        d, sc, q, recon = _symmetric(x.reshape(n, 16, 16), -32, 31, 127)
        u = (q + 32).reshape(n, -1)
        blocks = [_pack(u & 0x0F, NIBBLES_64, 128), _pack(u >> 4, TWO_BITS, 64), sc.astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(name)
    packed = np.concatenate(blocks, axis=1)
    got = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name])
    np.testing.assert_allclose(got.reshape(n, -1), recon.reshape(n, -1), rtol=1e-6, atol=1e-6 * np.abs(recon).max())
    return packed.reshape(rows, -1)
