"""Sharded weights: FSDP2 (`fully_shard`), one unit per DiT block and one for the rest, so no
rank keeps a whole copy; each block's weights are gathered for its forward and freed after."""

from __future__ import annotations

import torch
from torch import nn


def shard_dit(dit: nn.Module, ranks: int, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..memory.fp8 import FP8Linear

    if any(isinstance(m, FP8Linear) for m in dit.modules()):
        raise ValueError("--fsdp shards bf16/fp32 weights; FP8 layers cannot be sharded yet: drop --fp8 or --fsdp")
    if getattr(dit, "_wanx_streamer", None) is not None:
        raise ValueError("--fsdp and --offload blocks both manage where DiT weights live: choose one")
    mesh = init_device_mesh(device.type, (ranks,))
    for block in dit.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(dit, mesh=mesh)
    return dit
