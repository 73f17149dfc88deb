"""The live LoRA layer: adapters attached to a Linear (or FP8Linear) as a submodule, added to
its output by a forward hook, so the base layer, its weights and its name stay as they are
(streaming, FP8 and compile see the same module)."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .formats import LoraModule


class LoraAdapter(nn.Module):
    """One LoRA on one layer: `(x @ down.T) @ up.T * scale * strength` for a low-rank LoRA, or
    `x @ delta.T * strength` for a LoHa/LoKr/full difference; plus `strength * diff_b`."""

    def __init__(self, module: LoraModule, strength: float, *, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.strength, self.scale = float(strength), module.scale
        parts = module.parts
        if module.kind == "lora":
            self.down = nn.Parameter(parts["down"].to(device, dtype).flatten(1), requires_grad=False)
            self.up = nn.Parameter(parts["up"].to(device, dtype).flatten(1), requires_grad=False)
            self.delta = None
        else:
            self.down = self.up = None
            delta = module.delta()
            self.delta = None if delta is None else nn.Parameter(delta.to(device, dtype), requires_grad=False)
        diff_b = parts.get("diff_b")
        self.diff_b = None if diff_b is None else nn.Parameter(diff_b.to(device, dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor | None:
        """The adapter's addition to the layer's output for input x, or None."""
        if self.strength == 0:
            return None
        out = None
        if self.down is not None:
            out = (x.to(self.down.dtype) @ self.down.t()) @ self.up.t() * (self.scale * self.strength)
        elif self.delta is not None:
            out = x.to(self.delta.dtype) @ self.delta.t() * self.strength
        if self.diff_b is not None:
            out = self.diff_b * self.strength if out is None else out + self.diff_b * self.strength
        return out


def adapter_key(name: str) -> str:
    """The ModuleDict key of a LoRA name: keys may not contain dots nor shadow Module
    attributes (a LoRA called "train" or "style.v2")."""
    return "lora_" + re.sub(r"\W", "_", name)


def adapter_of(layer: nn.Module, name: str) -> LoraAdapter | None:
    adapters = getattr(layer, "lora_adapters", None)
    key = adapter_key(name)
    return adapters[key] if adapters is not None and key in adapters else None


def attach(layer: nn.Module, name: str, adapter: LoraAdapter) -> None:
    """Add `adapter` under `name` to `layer` (in `layer.lora_adapters`), hooking the layer once."""
    if not hasattr(layer, "lora_adapters"):
        layer.lora_adapters = nn.ModuleDict()
        layer._lora_hook = layer.register_forward_hook(_add_adapters)
    layer.lora_adapters[adapter_key(name)] = adapter


def detach(layer: nn.Module, name: str) -> None:
    adapters = getattr(layer, "lora_adapters", None)
    if adapters is None or adapter_key(name) not in adapters:
        return
    del adapters[adapter_key(name)]
    if not len(adapters):
        layer._lora_hook.remove()
        del layer.lora_adapters, layer._lora_hook


def _add_adapters(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
    x = args[0]
    for adapter in layer.lora_adapters.values():
        extra = adapter(x)
        if extra is not None:
            output = output + extra.to(output.dtype)
    return output
