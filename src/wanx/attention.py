"""One attention function for every network, with optional fast kernels.

`attention(q, k, v, *, k_lens=None)` takes `[B, L, H, D]` tensors (the layout the
projections produce, and the one FlashAttention uses) and returns `[B, Lq, H, D]`.

Backends: PyTorch SDPA (always available, the default off CUDA), FlashAttention 3,
FlashAttention 2 and SageAttention. A backend is used only where it supports the call
(CUDA, fp16/bf16, head dim, no key mask for the kernels without varlen support); any
other call falls back to SDPA. Choose with `set_attention_backend(name)` or the
`WANX_ATTENTION` environment variable: `auto` (default: FA3 > FA2 > SDPA; SageAttention
is approximate, so it is used only when asked for), `sdpa`, `flash3`, `flash2`, `sage`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash3", "flash2", "sage")
_backend: str | None = None  # None: read WANX_ATTENTION on first use


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    global _backend
    _backend = name


def get_attention_backend() -> str:
    global _backend
    if _backend is None:
        set_attention_backend(os.environ.get("WANX_ATTENTION", "auto").strip().lower() or "auto")
    return _backend  # type: ignore[return-value]


@functools.cache
def _kernel(name: str):
    """The kernel function of an optional backend, or None when it is not installed."""
    module, fn = {
        "flash3": ("flash_attn_interface", "flash_attn_func"),
        "flash2": ("flash_attn", "flash_attn_func"),
        "sage": ("sageattention", "sageattn"),
    }[name]
    try:
        return getattr(importlib.import_module(module), fn)
    except Exception:  # ImportError, or a broken CUDA extension raising at import
        return None


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def installed(name: str) -> bool:
    """Whether an optional kernel ("flash3", "flash2", "sage") is installed and imports."""
    return name == "sdpa" or _kernel(name) is not None


def backend_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel the DiT's attention will use on this device, dtype and head dim (said once
    by the pipeline, outside any compiled region)."""
    return _pick(torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype), masked=False)


def _usable(name: str, q: Tensor, masked: bool) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return False
    if masked:  # these entry points take no key lengths, bias or custom scale
        return False
    return _kernel(name) is not None


def _pick(q: Tensor, masked: bool) -> str:
    choice = get_attention_backend()
    if choice == "sdpa":
        return "sdpa"
    if choice == "auto":
        return next((b for b in ("flash3", "flash2") if _usable(b, q, masked)), "sdpa")
    if _usable(choice, q, masked):
        return choice
    if _kernel(choice) is None:
        _warn_once(f"attention backend {choice!r} is not installed; using PyTorch SDPA")
    return "sdpa"


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, k_lens: Tensor | None = None, bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention. q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` -> `[B, Lq, H, D]`.

    k_lens `[B]`: keys at positions >= k_lens[b] are ignored for sample b.
    bias `[B|1, H|1, Lq, Lk]`: added to the scores (T5's position bias); SDPA only.
    scale: score scale, default 1/sqrt(D) (T5 uses 1).
    """
    masked = (k_lens is not None and bool((k_lens < k.shape[1]).any())) or bias is not None or scale is not None
    backend = _pick(q, masked)
    if backend == "flash3":
        out = _kernel("flash3")(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if backend == "flash2":
        return _kernel("flash2")(q, k, v)
    if backend == "sage":
        return _kernel("sage")(q, k, v, tensor_layout="NHD")

    mask = bias
    if k_lens is not None and bool((k_lens < k.shape[1]).any()):
        positions = torch.arange(k.shape[1], device=k.device)
        keep = (positions[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
        mask = keep if bias is None else bias.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)
