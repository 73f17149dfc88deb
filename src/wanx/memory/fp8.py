"""FP8 weights: Linear layers stored as float8_e4m3fn with one float32 scale per output
channel, half the bytes of bf16. A module swap applied to a built model from outside.

Compute dequantises the weight to the compute dtype per layer (exact: w8 * scale, one
rounding), so it runs everywhere; with `fast=True` on a GPU that has FP8 tensor cores
(compute capability >= 8.9) it uses `torch._scaled_mm` with per-token activation scales.
Norms, embeddings, modulation and head are not touched: only Linear layers inside the model's
blocks are swapped, and never one the model keeps in fp32 (`keep_in_fp32`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import keeps_fp32

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_weight(weight: Tensor, rows: int = 256) -> tuple[Tensor, Tensor]:
    """`[out, in]` -> (float8_e4m3fn `[out, in]`, float32 scale `[out]`), per output channel:
    each row's largest magnitude maps to 448. Done `rows` rows at a time into the fp8 output, so
    the float32 temporaries stay small (a 14B FFN weight in one piece would need three 280 MB
    copies, which the allocator then keeps)."""
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX
    out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start:start + rows].float() / scale[start:start + rows, None]
        out[start:start + rows] = chunk.clamp_(-FP8_MAX, FP8_MAX)
    return out, scale


class ScaledLinear(nn.Module):
    """A Linear whose weight is stored in `storage` (8 bits) `[out, in]` with one float32 `scale`
    per output channel, dequantised to `compute_dtype` per call: what FP8Linear and
    `int8.Int8Linear` share. A subclass sets `storage` and `set_weight` (how a weight is quantized)."""

    storage: torch.dtype

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=self.storage, device=device),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        layer.set_weight(linear.weight.data, linear.bias.data if linear.bias is not None else None)
        return layer

    def _store(self, q: Tensor, s: Tensor, bias: Tensor | None) -> None:
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(s.to(q.device).contiguous(), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(self.compute_dtype), requires_grad=False)

    def dequantized(self) -> Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(self.compute_dtype)


class FP8Linear(ScaledLinear):
    """A Linear whose weight is float8_e4m3fn `[out, in]` with float32 `scale` `[out]`."""

    storage = FP8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, fast: bool = False, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device)
        self.fast = fast

    def set_weight(self, weight: Tensor, bias: Tensor | None = None, *, scale: Tensor | None = None) -> None:
        """From a float weight (quantized here), or an fp8 weight with its `scale` (a scalar,
        as ComfyUI's `scale_weight`, or per channel): stored as is, no float copy."""
        if weight.dtype == FP8:
            q = weight
            s = torch.ones(self.out_features) if scale is None else scale.float().reshape(-1).expand(self.out_features)
        elif scale is None:  # a float weight
            q, s = quantize_weight(weight)
        else:  # float8_e5m2 with its scale: dequantised first (its range differs)
            q, s = quantize_weight(weight.float() * scale.float().reshape(-1, 1))
        self._store(q, s, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and x.is_cuda and _scaled_mm_supported(x.device):
            return _fp8_matmul(x, self.weight, self.scale, self.bias, self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3fn, " \
               f"compute={str(self.compute_dtype).removeprefix('torch.')}{', fast' if self.fast else ''}"


def _scaled_mm_supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_matmul(x: Tensor, w8: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """x @ (w8 * w_scale).T with per-token activation scales on FP8 tensor cores."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [T, 1]
    x8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale[None, :].float(), bias=bias,
                           out_dtype=out_dtype)
    return out.reshape(*shape[:-1], -1)


def block_linear_names(model: nn.Module, quantized: tuple[type, ...] = ()) -> list[str]:
    """The Linear layers weight quantization (FP8, INT8) applies to: inside the model's blocks
    (`stream_blocks`), not kept in fp32; `quantized`: layer classes already in the place of one."""
    lists = tuple(getattr(model, "stream_blocks", ()))
    keep = getattr(model, "keep_in_fp32", ())
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, *quantized)) and name.startswith(tuple(f"{p}." for p in lists))
            and not keeps_fp32(name + ".weight", keep)]


def fp8_layer_names(model: nn.Module) -> list[str]:
    """The Linear layers FP8 applies to: inside the model's blocks (`stream_blocks`), not kept in fp32."""
    return block_linear_names(model, (FP8Linear,))


def swap_block_linears(model: nn.Module, make, quantized: tuple[type, ...]) -> nn.Module:
    """Replace each float block Linear of `block_linear_names` by `make(linear)` in place, one
    by one (so no second float copy of the model exists). Returns the model."""
    for name in block_linear_names(model, quantized):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        if isinstance(layer, nn.Linear):
            setattr(parent, attr, make(layer))
    return model


def quantize_fp8(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16, fast: bool = False) -> nn.Module:
    """Swap the model's block Linear layers for FP8Linear in place (their weights quantized
    one by one, so no second float copy of the model exists). Returns the model."""
    return swap_block_linears(model, lambda linear: FP8Linear.from_linear(linear, compute_dtype=compute_dtype,
                                                                          fast=fast), (FP8Linear,))
