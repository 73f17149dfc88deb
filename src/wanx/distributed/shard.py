"""Sharded weights: FSDP2 (`fully_shard`), one unit per block and one for the rest, for the
DiT and the umT5 encoder, so no rank keeps a whole copy; each block's weights are gathered for
its forward and freed after (by FSDP's own hooks on each block, and on a model with a block seam
also by a block wrapper, so that a block called without its hooks, as the compiled block is,
still computes with its whole weights)."""

from __future__ import annotations

import torch
from torch import nn


def shard_blocks(model: nn.Module, ranks: int, device: torch.device) -> nn.Module:
    """fully_shard each of `model.blocks`, then the model (its other weights); on a model with
    `block_wrappers` (the DiT), a wrapper at the front gathers each block's weights around it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..memory.fp8 import FP8Linear

    if any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("--fsdp shards bf16/fp32 weights; FP8 layers cannot be sharded yet: drop --fp8 or --fsdp")
    mesh = init_device_mesh(device.type, (ranks,))
    for name in getattr(model, "stream_blocks", ("blocks",)):  # the DiT's blocks and a VACE model's vace_blocks
        for block in model.get_submodule(name):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if hasattr(model, "block_wrappers"):
        model.block_wrappers.insert(0, gathered)
    return model


def gathered(inner, block: nn.Module, *inputs):
    """The block wrapper: the block's shards gathered for its call and freed after (what FSDP's
    hooks do in `block(...)`, where these calls find the work done)."""
    block.unshard()
    out = inner(block, *inputs)
    block.reshard()
    return out
