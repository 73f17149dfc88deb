"""Block streaming: the weights that fit a budget stay on the compute device; every other
block lives in (pinned) host memory and is copied in just before it runs, the next one
prefetched on a side CUDA stream while the current one computes.

Applied to a built model from outside: around each unit, `param.data` swapped
between the host tensor and its device copy, so the model's math, its Parameter objects (and
whatever holds them: LoRA layers, optimizers) are untouched. Frozen weights are never copied
back: releasing a block just drops its device copy.

A unit is one element of each block list the model declares (`stream_blocks`, e.g. DiT
`blocks.N`) or one of the other modules that hold weights (embeddings, head). A model with a
block seam (`block_wrappers`, the DiT) has its blocks streamed by a block wrapper, so that
what runs a block without `block(...)` (a compiled block) and what runs it again (activation
checkpointing) are inside or outside the load as their place in that list says; every other
unit is streamed by forward hooks. Parameters held
directly by a container on the way to a block list (CLIP's class and position embeddings) stay
on the device.

On a CPU the same code runs and really copies, so tests see the same swaps and accounting;
there is no side stream there, so nothing is prefetched and one block is in flight at a time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def parse_bytes(value: int | float | str) -> int:
    """`6e9`, `"6GB"`, `"6GiB"`, `"512MB"`, `"0"` -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(value, (int, float)):
        return int(value)
    text = value.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
             "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, scale = text, 1
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"memory size {value!r} is not a number of bytes such as 6GB, 512MB or 0") from None
    if amount < 0:
        raise ValueError(f"memory size {value!r} must not be negative")
    return int(amount * scale)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Unit:
    """A module whose weights move together, with their host tensors."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        # (owner, attribute, is_parameter) for every tensor of the module, and its host copy
        self.slots: list[tuple[nn.Module, str, bool]] = []
        self.host: list[Tensor] = []
        for owner in module.modules():
            for attr, p in owner._parameters.items():
                if p is not None:
                    self.slots.append((owner, attr, True))
                    self.host.append(p.data)
            for attr, b in owner._buffers.items():
                if b is not None:
                    self.slots.append((owner, attr, False))
                    self.host.append(b)
        self.bytes = tensor_bytes(self.host)
        self.on_device = False

    def _set(self, tensors: list[Tensor]) -> None:
        for (owner, attr, is_param), tensor in zip(self.slots, tensors):
            if is_param:
                owner._parameters[attr].data = tensor
            else:
                owner._buffers[attr] = tensor

    def load(self, device: torch.device, stream=None) -> None:
        """Copy to the device (on `stream` when given, to overlap with compute)."""
        if self.on_device:
            return
        if stream is None:
            self._set([t.to(device, copy=True) for t in self.host])
        else:
            with torch.cuda.stream(stream):
                self._set([t.to(device, non_blocking=True) for t in self.host])
        self.on_device = True

    def release(self) -> None:
        """Drop the device copies; the host tensors were never changed (frozen weights)."""
        if self.on_device:
            self._set(self.host)
            self.on_device = False

    def pin(self) -> None:
        """Host tensors in page-locked memory, once, so copies can run asynchronously."""
        self.host = [t if t.is_pinned() else t.pin_memory() for t in self.host]
        if not self.on_device:
            self._set(self.host)


def stream_units(model: nn.Module) -> tuple[list[Unit], list[Unit]]:
    """(units, pinned): the elements of the model's block lists and the other weight-holding
    modules, in registration order; `pinned` are the direct parameters of containers on the
    way to a block list, which have no forward of their own to hook."""
    lists = tuple(getattr(model, "stream_blocks", ()))
    units, pinned = [], []

    def leads_to_a_list(prefix: str) -> bool:
        return any(not prefix or path == prefix or path.startswith(f"{prefix}.") for path in lists)

    def visit(prefix: str, module: nn.Module) -> None:
        if prefix in lists:
            for name, child in module.named_children():
                units.append(Unit(f"{prefix}.{name}", child))
        elif not leads_to_a_list(prefix):
            if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
                units.append(Unit(prefix or "(model)", module))
        else:
            if module._parameters or module._buffers:  # a container's own tensors: no forward to hook
                holder = nn.Module()
                holder._parameters, holder._buffers = module._parameters, module._buffers
                pinned.append(Unit(prefix or "(model)", holder))
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return units, pinned


@dataclass
class StreamStats:
    """Weight bytes on the compute device (checked by tests, shown by benchmarks)."""

    budget: int
    resident: int = 0  # kept on the device between forwards
    streamed: int = 0  # copied in for each forward
    largest_unit: int = 0  # the most one streamed unit adds while it runs
    device_bytes: int = 0  # now
    peak_device_bytes: int = 0  # since the last reset
    moved_bytes: int = 0  # host -> device since the last reset
    resident_units: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.peak_device_bytes, self.moved_bytes = self.device_bytes, 0


class BlockStreamer:
    """Keeps `model`'s weights within `budget` bytes on `device`: a block wrapper and hooks (see
    module doc); `remove()` undoes it."""

    def __init__(self, model: nn.Module, device: torch.device | str, budget: int, *, prefetch: bool | None = None):
        self.model, self.device = model, torch.device(device)
        self.units, self.pinned = stream_units(model)
        cuda = self.device.type == "cuda"
        self.prefetch = cuda if prefetch is None else prefetch
        self._stream = torch.cuda.Stream(self.device) if cuda and self.prefetch else None
        self._events: dict[Unit, object] = {}
        self._order: list[Unit] = []  # execution order, recorded on the first forward
        self._recording = True
        self.stats = StreamStats(budget=0)
        for unit in self.pinned:
            unit.load(self.device)
        self._hooks = []
        wrapped = hasattr(model, "block_wrappers")
        blocks = set(_block_units(model, self.units)) if wrapped else set()
        self._block_unit = {id(u.module): u for u in blocks}
        for unit in self.units:
            if unit in blocks:
                continue
            self._hooks.append(unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._enter(u)))
            self._hooks.append(unit.module.register_forward_hook(lambda m, a, o, u=unit: self._exit(u)))
        if wrapped:
            model.block_wrappers.append(self)
        _STREAMERS[model] = self
        self.set_budget(budget)

    def __call__(self, inner, block: nn.Module, *inputs):
        """The block wrapper: the block's weights on the device for its call."""
        unit = self._block_unit[id(block)]
        self._enter(unit)
        out = inner(block, *inputs)
        self._exit(unit)
        return out

    def set_budget(self, budget: int) -> StreamStats:
        """Choose the resident set: the always-resident tensors, then the non-block units (used
        once per forward), then blocks in order, while the total fits `budget`."""
        budget = int(budget)
        blocks = set(_block_units(self.model, self.units))
        order = [u for u in self.units if u not in blocks] + [u for u in self.units if u in blocks]
        used = sum(u.bytes for u in self.pinned)
        self._resident = set()
        for unit in order:
            if used + unit.bytes <= budget:
                self._resident.add(unit)
                used += unit.bytes
        for unit in self.units:
            if unit in self._resident:
                if not unit.on_device:
                    unit.load(self.device)
            else:
                unit.release()
        streamed = [u for u in self.units if u not in self._resident]
        if self.device.type == "cuda":
            for unit in streamed:
                unit.pin()
        self.stats = StreamStats(
            budget=budget, resident=used, streamed=sum(u.bytes for u in streamed),
            largest_unit=max((u.bytes for u in streamed), default=0),
            resident_units=[u.name for u in self.units if u in self._resident])
        self._account()
        self.stats.reset()
        return self.stats

    def replace(self, param: nn.Parameter, tensor: Tensor) -> bool:
        """New values for a streamed parameter (a LoRA's fused norm or modulation difference):
        its host tensor is replaced, not written (it may be the checkpoint's memory map), and
        its device copy with it when the unit is there. False when `param` is not streamed."""
        for unit in self.units:
            for j, (owner, attr, is_param) in enumerate(unit.slots):
                if is_param and owner._parameters[attr] is param:
                    host = tensor.to(unit.host[j].device, unit.host[j].dtype, copy=True)
                    unit.host[j] = host.pin_memory() if unit.host[j].is_pinned() else host
                    param.data = unit.host[j].to(self.device, copy=True) if unit.on_device else unit.host[j]
                    return True
        return False

    def remove(self) -> None:
        """Take the hooks off and put every weight on the device (the plain model again)."""
        for hook in self._hooks:
            hook.remove()
        if hasattr(self.model, "block_wrappers"):
            self.model.block_wrappers[:] = [w for w in self.model.block_wrappers if w is not self]
        for unit in self.units:
            unit.load(self.device)
        if _STREAMERS.get(self.model) is self:
            del _STREAMERS[self.model]

    # -- hooks -----------------------------------------------------------------------------
    def _enter(self, unit: Unit) -> None:
        if self._recording and unit not in self._order:
            self._order.append(unit)
        elif self._recording:
            self._recording = False  # a unit seen twice: one forward is recorded
        if unit not in self._resident:
            event = self._events.pop(unit, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            elif not unit.on_device:
                unit.load(self.device)
                self.stats.moved_bytes += unit.bytes
            self._account()
            if self._stream is not None and not self._recording:
                self._prefetch_after(unit)

    def _exit(self, unit: Unit) -> None:
        if unit in self._resident:
            return
        if self._stream is not None:  # the compute stream used memory allocated on the copy stream
            current = torch.cuda.current_stream(self.device)
            for owner, attr, is_param in unit.slots:
                tensor = owner._parameters[attr] if is_param else owner._buffers[attr]
                tensor.record_stream(current)
        unit.release()
        self._account()

    def _prefetch_after(self, unit: Unit) -> None:
        order = [u for u in self._order if u not in self._resident]
        if unit not in order or len(order) < 2:
            return
        following = order[(order.index(unit) + 1) % len(order)]
        if following.on_device:
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        following.load(self.device, stream=self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        self._events[following] = event
        self.stats.moved_bytes += following.bytes
        self._account()

    def _account(self) -> None:
        now = sum(u.bytes for u in self.pinned) + sum(u.bytes for u in self.units if u.on_device)
        self.stats.device_bytes = now
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, now)


def _block_units(model: nn.Module, units: list[Unit]) -> list[Unit]:
    lists = tuple(getattr(model, "stream_blocks", ()))
    return [u for u in units if u.name.rsplit(".", 1)[0] in lists]


# model -> its BlockStreamer while streamed: the streamer's own record, read through
# `streamer_of` and `compute_device` (weak, so a dropped model is not kept alive).
_STREAMERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    """The BlockStreamer that streams `model`, or None."""
    return _STREAMERS.get(model)


def compute_device(model: nn.Module) -> torch.device:
    """Where `model` computes: its weights' device, or the block streamer's target when its
    weights live in host memory and visit the device block by block. What is made for it
    later (a live LoRA, a trainable adapter, a batch) belongs there."""
    streamer = streamer_of(model)
    return streamer.device if streamer is not None else next(model.parameters()).device
