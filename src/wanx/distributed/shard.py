"""Sharded weights: FSDP2 (`fully_shard`), one unit per block and one for the rest, for the
DiT and the umT5 encoder, so no rank keeps a whole copy; each block's weights are gathered for
its forward and freed after."""

from __future__ import annotations

import torch
from torch import nn


def shard_blocks(model: nn.Module, ranks: int, device: torch.device) -> nn.Module:
    """fully_shard each of `model.blocks`, then the model (its other weights)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..memory.fp8 import FP8Linear

    if any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("--fsdp shards bf16/fp32 weights; FP8 layers cannot be sharded yet: drop --fp8 or --fsdp")
    mesh = init_device_mesh(device.type, (ranks,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
