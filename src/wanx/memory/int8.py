"""INT8 weights: Linear layers stored as int8 with one float32 scale per output channel
(symmetric, weight-only), half the bytes of bf16. A module swap applied to a built model from
outside, as `memory.fp8` does; the layer also holds lightx2v's `*_int8` checkpoints as stored.

Compute dequantises the weight to the compute dtype per layer (w8 * scale, one rounding) and
runs F.linear, so it runs everywhere. Int8 keeps 8 significant bits per row where e4m3 keeps
4: its error is an even 1/254 of the row's largest magnitude (FP8's is relative to each value).
Norms, embeddings, modulation and head are not touched: the same layers as FP8 are swapped
(inside the model's blocks, never one kept in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fp8 import ScaledLinear, block_linear_names, swap_block_linears

INT8_MAX = 127  # symmetric: -128 is never used, so negation stays exact


def quantize_weight(weight: Tensor, rows: int = 256) -> tuple[Tensor, Tensor]:
    """`[out, in]` -> (int8 `[out, in]`, float32 scale `[out]`), per output channel: each row's
    largest magnitude maps to 127, values rounded to the nearest step. Done `rows` rows at a
    time, so the float32 temporaries stay small (as `fp8.quantize_weight`)."""
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / INT8_MAX
    out = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start:start + rows].float() / scale[start:start + rows, None]
        out[start:start + rows] = chunk.round_().clamp_(-INT8_MAX, INT8_MAX)
    return out, scale


class Int8Linear(ScaledLinear):
    """A Linear whose weight is int8 `[out, in]` with float32 `scale` `[out]`."""

    storage = torch.int8

    def set_weight(self, weight: Tensor, bias: Tensor | None = None, *, scale: Tensor | None = None) -> None:
        """From a float weight (quantized here), or an int8 weight with its per-channel `scale`
        (`[out]` or `[out, 1]`, as lightx2v stores it): stored as is, no float copy."""
        if weight.dtype == torch.int8:
            if scale is None or scale.numel() != self.out_features:
                raise ValueError(f"an int8 weight [{self.out_features}, {self.in_features}] needs a per-channel scale "
                                 f"of {self.out_features} values, got {None if scale is None else list(scale.shape)}")
            q, s = weight, scale.float().reshape(-1)
        else:  # a float weight, or another format's (fp8) with its scale: quantized here
            if scale is not None or weight.element_size() == 1:
                weight = weight.float() * (1 if scale is None else scale.float().reshape(-1, 1))
            q, s = quantize_weight(weight)
        self._store(q, s, bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype), self.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, " \
               f"compute={str(self.compute_dtype).removeprefix('torch.')}"


def int8_layer_names(model: nn.Module) -> list[str]:
    """The Linear layers INT8 applies to, the same as FP8's: inside the model's blocks
    (`stream_blocks`), not kept in fp32."""
    return block_linear_names(model, (Int8Linear,))


def quantize_int8(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap the model's block Linear layers for Int8Linear in place (their weights quantized
    one by one, so no second float copy of the model exists). Returns the model."""
    return swap_block_linears(model, lambda linear: Int8Linear.from_linear(linear, compute_dtype=compute_dtype),
                              (Int8Linear,))
