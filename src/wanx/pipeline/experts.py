"""Wan2.2 A14B's two DiTs as one model function: each step goes to the high-noise expert
(`dit`) while t >= boundary * 1000, then to the low-noise one (`dit_low`), each with its own
guidance scale. The split follows the timesteps, never the step index, as in the official
`_prepare_model_for_timestep`; with one DiT every step is its. The sampler is one solver
throughout, so its multistep history carries across the switch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..sampling import NUM_TRAIN_TIMESTEPS


def high_noise_steps(timesteps: Tensor, boundary: float) -> int:
    """How many steps of a schedule run Wan2.2's high-noise expert: those with t >= boundary *
    1000 (official `_prepare_model_for_timestep`). Timesteps fall, so these come first."""
    return int((timesteps.double() >= boundary * NUM_TRAIN_TIMESTEPS).sum())


@dataclass
class Experts:
    """The DiT(s) of a pipeline and how a step picks one. `placement.activate(name)` makes the
    chosen one the expert on the device when weights are offloaded."""

    dit: object
    dit_low: object | None = None
    boundary: float | None = None  # share of the 1000 training timesteps; None with one DiT
    guidance: float = 5.0
    guidance_low: float | None = None
    placement: object | None = None

    def pick(self, t: Tensor) -> tuple[object, float]:
        """The expert for timestep t, on the device, and its guidance scale."""
        high = self.dit_low is None or float(t) >= self.boundary * NUM_TRAIN_TIMESTEPS
        if self.placement is not None:
            self.placement.activate("dit" if high else "dit_low")  # the other expert leaves the device
        return (self.dit, self.guidance) if high else (self.dit_low, self.guidance_low)

    def split(self, timesteps: Tensor) -> dict:
        """With two experts: the boundary and how many steps each runs ({} with one DiT)."""
        if self.dit_low is None:
            return {}
        high = high_noise_steps(timesteps, self.boundary)
        return {"boundary": self.boundary, "high_noise_steps": high, "low_noise_steps": len(timesteps) - high}

    def describe(self, timesteps: Tensor) -> str:
        """The split in one line: steps, timesteps and guidance of each expert."""
        ts = [int(t) for t in timesteps]
        high = self.split(timesteps)["high_noise_steps"]

        def part(name: str, steps: list[int], guidance: float) -> str:
            span = f" (t {steps[0]}..{steps[-1]})" if steps else ""
            return f"{name} {len(steps)} step{'s' * (len(steps) != 1)}{span}, guidance {guidance:g}"

        return (f"experts: {part('high noise', ts[:high], self.guidance)}; "
                f"{part('low noise', ts[high:], self.guidance_low)}; "
                f"boundary t = {self.boundary * NUM_TRAIN_TIMESTEPS:g}")
