"""Runtime choices, kept apart from architecture: where and in what precision the networks run.

One frozen object, built once from CLI flags or API keywords. It grows with the memory and
speed options (offload, budget, fp8, step caching, compile) so that no signature has to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # DiT and encoders; time embedding, modulation, norms and head stay fp32
    vae_dtype: torch.dtype = torch.float32

    @classmethod
    def create(cls, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               vae_dtype: torch.dtype | str = torch.float32) -> "Runtime":
        """Resolve the defaults (CUDA when present; bf16 on a GPU, fp32 on a CPU) and check
        that the device exists, before anything is loaded."""
        dev = resolve_device(device)
        return cls(dev, resolve_dtype(dtype, dev), resolve_dtype(vae_dtype, dev))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 on an accelerator, fp32 on a CPU (where bf16 matmuls are slow and
    inexact); 'bf16', 'fp16', 'fp32' or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch.device, or a one-line ValueError saying why not and what to use."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of PyTorch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type not in ("cpu", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available here; use cpu or cuda")
    return dev
