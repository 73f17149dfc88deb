"""CFG parallelism: the cond and uncond passes of a guided step on two halves of the ranks,
their velocities exchanged once per step. Each half may run sequence parallelism inside."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

BRANCHES = ("cond", "uncond")


@dataclass
class CfgParallel:
    group: dist.ProcessGroup  # the pair (i, i + world/2): one rank of each half
    branch: str  # the branch this rank computes

    def combine(self, mine: Tensor) -> tuple[Tensor, Tensor]:
        """(cond, uncond) velocities on every rank of the pair."""
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine.contiguous(), group=self.group)
        return parts[0], parts[1]  # the pair's rank 0 is always the cond half
