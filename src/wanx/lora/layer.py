"""The live LoRA layer: adapters attached to a Linear (or FP8Linear) as a submodule, added to
its output by a forward hook, so the base layer, its weights and its name stay as they are
(streaming, FP8 and compile see the same module)."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .formats import LoraModule


class LoraAdapter(nn.Module):
    """One LoRA on one layer: `(x @ down.T) @ up.T * scale * strength` for a low-rank LoRA,
    `x @ delta.T * strength` for a LoHa/LoKr/full difference (both when a LoRA carries a
    `diff` beside its factors); plus `strength * diff_b`."""

    def __init__(self, module: LoraModule, strength: float, *, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.scale = module.scale
        # The strength twice: a float for eager code (exact arithmetic, the strength-0 early
        # exit) and float32 tensor data for compiled code, `factors` = [strength, scale *
        # strength], so that a new strength (or another layer's scale) is new data in the same
        # graph: a float attribute is a guarded constant, and every change would recompile.
        # Written in place (CUDA graphs keep its address); made outside inference mode so that
        # it can be written at any time; not persistent (no state_dict key).
        with torch.inference_mode(False):
            self.register_buffer("factors", torch.zeros(2, device=device), persistent=False)
        self.strength = strength
        parts = module.parts
        if module.kind == "lora":  # the factors as they are; a `diff` beside them as a full delta
            self.down = nn.Parameter(parts["down"].to(device, dtype).flatten(1), requires_grad=False)
            self.up = nn.Parameter(parts["up"].to(device, dtype).flatten(1), requires_grad=False)
            delta = parts.get("diff")
        else:
            self.down = self.up = None
            delta = module.delta()
        self.delta = None if delta is None else nn.Parameter(delta.to(device, dtype), requires_grad=False)
        diff_b = parts.get("diff_b")
        self.diff_b = None if diff_b is None else nn.Parameter(diff_b.to(device, dtype), requires_grad=False)

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = float(value)
        values = [self._strength, self.scale * self._strength]
        if self.factors.is_inference() and not torch.is_inference_mode_enabled():
            # moved by `.to()` under inference mode: such a tensor cannot be written out of it
            with torch.inference_mode(False):
                self.factors = torch.tensor(values, device=self.factors.device)
        else:
            with torch.no_grad():
                self.factors.copy_(torch.tensor(values), non_blocking=True)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # A cast of the model (`.to(bfloat16)`) must not round the strength: keep it float32.
        if self.factors.dtype != torch.float32:
            with torch.inference_mode(False):
                self.factors = torch.tensor([self._strength, self.scale * self._strength], device=self.factors.device)
        return self

    def forward(self, x: Tensor) -> Tensor | None:
        """The adapter's addition to the layer's output for input x, or None."""
        if torch.compiler.is_compiling():
            # No early exit at strength 0 here (that would guard on the value): the addition is
            # then exactly zero, and the output equals the base layer's all the same.
            strength, scaled = self.factors.unbind()
        elif self._strength == 0:
            return None
        else:
            strength, scaled = self._strength, self.scale * self._strength
        out = None
        if self.down is not None:
            out = (x.to(self.down.dtype) @ self.down.t()) @ self.up.t() * scaled
        if self.delta is not None:
            full = x.to(self.delta.dtype) @ self.delta.t() * strength
            out = full if out is None else out + full
        if self.diff_b is not None:
            out = self.diff_b * strength if out is None else out + self.diff_b * strength
        return out


def adapter_key(name: str) -> str:
    """The ModuleDict key of a LoRA name: keys may not contain dots nor shadow Module
    attributes (a LoRA called "train" or "style.v2"). Each other character is written as its
    code (`a/lora` -> `lora_a_2f_lora`, `a_lora` -> `lora_a_5f_lora`), so that two names never
    share a key."""
    return "lora_" + re.sub(r"[^0-9A-Za-z]", lambda m: f"_{ord(m.group()):x}_", name)


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
