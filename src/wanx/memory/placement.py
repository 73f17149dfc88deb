"""Where each network of a pipeline keeps its weights during a generation, from a Runtime:

- offload "none": every network resident on the device;
- "model": each network on the device only for its phase (text encoding, image conditioning,
  denoising, decoding), as one unit; the host copy is never written back;
- "blocks": the DiT streamed block by block under a byte budget (`streaming.BlockStreamer`),
  the text and image encoders streamed with budget 0 (they run once per prompt), the VAE
  resident;
- "auto": "none" when the weights and the request's work fit the device, otherwise "blocks"
  with a budget of what is free minus the request's work (said in one line).

umT5 may run on another device (`t5_device="cpu"`, the official `--t5_cpu`), then it takes
no part in offloading.

Wan2.2 A14B has two DiTs, "dit" (high noise) and "dit_low", of which one runs at a time:
with offloading only the active expert is on the device ("model": as one unit; "blocks":
its resident part under the budget), the other keeps only its host copy until the pipeline
`activate`s it at the boundary. Without offloading both are resident.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .estimate import GiB, available_memory
from .streaming import BlockStreamer, StreamStats, Unit

# Kept free for the allocator's fragmentation and kernels' workspaces.
MARGIN = GiB
EXPERTS = ("dit", "dit_low")  # Wan2.2 A14B: the high- and the low-noise DiT


def resolve_offload(offload: str, device: torch.device, weights: int, work: int, available: int) -> str:
    """'auto' -> 'none' or 'blocks' (with one line on stderr); other choices as given."""
    if offload != "auto":
        return offload
    if device.type != "cuda" or weights + work + MARGIN <= available:
        return "none"
    print(f"wanx: the weights ({weights / GiB:.1f} GiB) and this request's work ({work / GiB:.1f} GiB) do not fit "
          f"the {available / GiB:.1f} GiB free on {device}: streaming the DiT blocks with an automatic budget "
          "(--offload none keeps everything resident)", file=sys.stderr)
    return "blocks"


def device_weight_bytes(offload: str, device: torch.device, weights: dict[str, int]) -> int:
    """Weight bytes a request needs on the device at once: all of them on a CPU (host and
    device are one memory) or without offloading; the largest network with "model"; none with
    "blocks"/"auto", whose budget adapts to what the request leaves (two blocks at least)."""
    if device.type == "cpu" or offload == "none":
        return sum(weights.values())
    if offload == "model":
        return max(weights.values(), default=0)
    return 0


def auto_budget(available: int, work: int) -> int:
    """DiT bytes that can stay resident: what is free, less the request's work and a margin."""
    return max(0, available - work - MARGIN)


def load_devices(offload: str, device: torch.device, text_device: torch.device) -> dict[str, torch.device]:
    """Where each network is loaded: on the device when resident, else on the CPU (memory-
    mapped, moved by the placement)."""
    cpu = torch.device("cpu")
    stays = {"none": {"dit", "dit_low", "vae", "t5", "clip"}, "model": set(), "blocks": {"vae"}}[offload]
    where = {name: device if name in stays else cpu for name in ("dit", "dit_low", "vae", "t5", "clip")}
    if text_device != device:
        where["t5"] = text_device
    return where


class Placement:
    """Moves weights for one pipeline. `phase(name)` wraps each network's use."""

    def __init__(self, offload: str, device: torch.device, networks: dict[str, nn.Module | None], *,
                 budget: int = 0, text_device: torch.device | None = None):
        self.offload, self.device = offload, device
        self.budget = budget  # of the active DiT's resident blocks ("blocks")
        self.active = "dit"  # the expert that runs (Wan2.2 A14B); the other has only its host copy
        self.streamers: dict[str, BlockStreamer] = {}
        self.units: dict[str, Unit] = {}
        for name, net in networks.items():
            if net is None or (name == "t5" and text_device is not None and text_device != device):
                continue
            if offload == "blocks" and name != "vae":
                self.streamers[name] = BlockStreamer(net, device, budget if name == "dit" else 0)
            elif offload == "model":
                self.units[name] = Unit(name, net)

    @contextlib.contextmanager
    def phase(self, name: str):
        """A network's use; "dit" is the denoising phase, which runs the active expert (and
        may `activate` the other one on the way)."""
        names = [n for n in EXPERTS if n in self.units] if name == "dit" else [name] if name in self.units else []
        if not names:
            yield
            return
        self.units[self.active if name == "dit" else name].load(self.device)
        try:
            yield
        finally:
            for n in names:
                self.units[n].release()

    def activate(self, name: str) -> None:
        """Make expert `name` ("dit" or "dit_low") the one on the device: the other's device
        copies are dropped first (its host copy is all there is of it), then this one takes the
        budget ("blocks") or, inside the denoising phase, comes in as a unit ("model")."""
        if name == self.active:
            return
        idle, self.active = self.active, name
        if idle in self.streamers:
            self.streamers[idle].set_budget(0)
        if name in self.streamers:
            self.streamers[name].set_budget(self.budget)
        if idle in self.units and self.units[idle].on_device:
            self.units[idle].release()
            self.units[name].load(self.device)

    def set_dit_budget(self, budget: int) -> None:
        self.budget = budget
        if self.active in self.streamers:
            self.streamers[self.active].set_budget(budget)

    @property
    def dit_stats(self) -> StreamStats | None:
        streamer = self.streamers.get("dit")
        return streamer.stats if streamer else None

    def device_bytes(self, name: str) -> int:
        """Weight bytes of network `name` on the device now, when this placement moves it."""
        if name in self.streamers:
            return self.streamers[name].stats.device_bytes
        unit = self.units.get(name)
        return unit.bytes if unit is not None and unit.on_device else 0

    def free_for_dit(self) -> int:
        """What the active DiT's resident part could use now: free memory plus what it holds."""
        held = self.streamers[self.active].stats.device_bytes if self.active in self.streamers else 0
        return available_memory(self.device) + held
