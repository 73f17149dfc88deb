"""Several GPUs (or CPU processes) on one generation, on torch.distributed: sequence parallel
(Ulysses or Ring), CFG parallel, FSDP-sharded DiT weights. Applied to a built pipeline from
outside; the same code under `torchrun --nnodes ...` or `wanx generate --gpus N`."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .cfg import BRANCHES, CfgParallel
from .launch import World, init, spawn, world_from_env
from .sequence import MODES, SequenceParallel


@dataclass
class ParallelPlan:
    world: int
    sequence: SequenceParallel | None = None
    cfg: CfgParallel | None = None
    sharded: bool = False

    def describe(self) -> str:
        parts = [f"{self.world} ranks"]
        if self.cfg:
            parts.append("CFG parallel (cond | uncond halves)")
        if self.sequence:
            parts.append(f"sequence parallel {self.sequence.mode} over {self.sequence.size}")
        if self.sharded:
            parts.append("FSDP-sharded DiT and umT5")
        return ", ".join(parts)


def check_plan(world: int, num_heads: int | None, sp: str = "auto", cfg_parallel: bool = False) -> None:
    """Refuse, before anything loads, a world size that cannot serve the request (num_heads
    None: before the model is known, the head count is not checked)."""
    if sp not in (*MODES, "none"):
        raise ValueError(f"--sp must be one of {', '.join((*MODES, 'none'))}, got {sp!r}")
    if cfg_parallel and world % 2:
        raise ValueError(f"--cfg-parallel splits the ranks into a cond and an uncond half: {world} rank(s) is odd; "
                         "use an even number")
    group = world // 2 if cfg_parallel else world
    if sp == "ulysses" and group > 1 and num_heads is not None and num_heads % group:
        raise ValueError(f"--sp ulysses splits the model's {num_heads} heads across {group} ranks, which does not "
                         "divide; use --sp ring or auto")


def parallelize(pipe, *, sp: str = "auto", cfg_parallel: bool = False, fsdp: bool = False) -> ParallelPlan:
    """Apply the plan to a built pipeline on every rank of the initialised process group (every
    rank must call this, in the same order: it creates process groups). `wanx.runtime.apply`
    makes the same plan at its place in the transform order when the pipeline is built."""
    text = pipe.text_encoder
    plan = plan_parallel(list(pipe.experts.values()), pipe.device, sp=sp, cfg_parallel=cfg_parallel, fsdp=fsdp,
                         text_model=getattr(text, "model", None) if text is not None and text.device == pipe.device
                         else None)  # not umT5 running on the CPU aside
    pipe.parallel = plan
    return plan


def plan_parallel(experts: list, device, *, sp: str = "auto", cfg_parallel: bool = False, fsdp: bool = False,
                  text_model=None) -> ParallelPlan:
    """The plan on the DiT(s) (Wan2.2 A14B: both experts, each step runs one of them) and, with
    fsdp, umT5 (`text_model`; None: not sharded)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_plan(world, experts[0].config.num_heads, sp, cfg_parallel)
    plan = ParallelPlan(world)
    sp_ranks = list(range(world))
    if cfg_parallel:
        half = world // 2
        halves = [list(range(half)), list(range(half, world))]
        pairs = [[i, i + half] for i in range(half)]
        sp_groups = [dist.new_group(ranks) for ranks in halves]  # every rank creates every group
        pair_groups = [dist.new_group(ranks) for ranks in pairs]
        mine = 0 if rank < half else 1
        plan.cfg = CfgParallel(pair_groups[rank % half], BRANCHES[mine])
        sp_group, sp_ranks = sp_groups[mine], halves[mine]
    else:
        sp_group = None  # the whole world
    if sp != "none" and len(sp_ranks) > 1:
        applied = [SequenceParallel(dit, sp_group, sp) for dit in experts]  # each expert's own attention seams
        plan.sequence = applied[0]  # the experts are alike: the first describes the plan
    if fsdp:
        from .shard import shard_blocks

        for dit in experts:
            shard_blocks(dit, world, device)
        if text_model is not None:
            shard_blocks(text_model, world, device)
        plan.sharded = True
    return plan


__all__ = ["ParallelPlan", "SequenceParallel", "CfgParallel", "World", "check_plan", "init", "parallelize", "plan_parallel", "spawn",
           "world_from_env"]


def broadcast_object(value, group=None):
    """Rank 0's `value` on every rank of `group` (default: all; seeds drawn at random must agree)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


__all__.append("broadcast_object")
