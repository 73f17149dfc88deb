"""Classifier-free guidance in one place: the formula, and the strategies that compute its two
branches (one batch of two, two passes, or the two halves of the ranks with CFG parallel).

A strategy is called once per step with `branch(x, t, context, names) -> velocity`, the
model function of one expert for a batch of branches (`names` tells a step cache which
branches the batch holds), and returns the guided velocity. Variants that change the formula
or the schedule of scales (CFG-Zero*, APG, per-step scales) belong here too, as strategies
the loop does not have to know about.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Branch = Callable[[Tensor, Tensor, Tensor, tuple[str, ...]], Tensor]


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: u + g * (c - u)."""
    return uncond + scale * (cond - uncond)


class Guidance:
    """cond and uncond as one batch of two (the default: one pass over the weights)."""

    name = "batched"

    def __call__(self, branch: Branch, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor | None,
                 scale: float) -> Tensor:
        if context_null is None or scale == 1.0:
            return branch(x, t, context, ("cond",))
        return self.guided(branch, x, t, context, context_null, scale)

    def guided(self, branch: Branch, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor, scale: float):
        cond, uncond = branch(torch.cat([x, x]), t, torch.cat([context, context_null]), ("cond", "uncond")).chunk(2)
        return cfg(cond, uncond, scale)


class TwoPass(Guidance):
    """cond and uncond one after the other: half the activations of a batch of two. The
    negative pass keeps the image conditioning, as the official code does."""

    name = "two-pass"

    def guided(self, branch, x, t, context, context_null, scale):
        uncond = branch(x, t, context_null, ("uncond",))
        return cfg(branch(x, t, context, ("cond",)), uncond, scale)


class ParallelHalves(Guidance):
    """CFG parallel: this rank's half of the world computes one branch; each pair of ranks
    swaps its results (`distributed.cfg.CfgParallel`)."""

    name = "cfg-parallel"

    def __init__(self, pair):
        self.pair = pair

    def guided(self, branch, x, t, context, context_null, scale):
        mine = self.pair.branch
        cond, uncond = self.pair.combine(branch(x, t, context if mine == "cond" else context_null, (mine,)))
        return cfg(cond, uncond, scale)
