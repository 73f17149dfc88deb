"""Starting ranks: from torchrun's (or accelerate's) environment, or spawned here for
`wanx generate --gpus N`. NCCL on GPUs, gloo on CPU. A rank that fails ends all of them."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> World:
    """Join the process group the environment describes (nothing to do for one process)."""
    world = world_from_env()
    if world.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_gpus(argv: list[str]) -> list[str]:
    """The command line for each rank: without --gpus N (the ranks are started already)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--gpus":
            skip = True
        elif not word.startswith("--gpus="):
            out.append(word)
    return out


def rank_device(device: str | None) -> str | None:
    """One GPU per process when started as one of several ranks (torchrun, accelerate launch,
    --gpus): cuda:LOCAL_RANK where CUDA is asked for (or by default) and present."""
    if "LOCAL_RANK" not in os.environ or not (device or "cuda").startswith("cuda"):
        return device
    return f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else device


def spawn(processes: int, main, argv: list[str], *, stop_via_rank0: bool = False, name: str = "wanx") -> int:
    """Run `main(argv)` (the CLI's entry point, picklable by reference) in `processes` local
    ranks; returns the run's exit code (a failing rank prints its error; the others are
    stopped at once). stop_via_rank0: SIGTERM or Ctrl-C here go to rank 0 only, which decides
    how the group stops (`wanx worker --gpus`: it gives its job back, then tells the others)."""
    import signal

    import torch.multiprocessing as mp

    context = mp.start_processes(_rank_main, args=(processes, free_port(), main, argv), nprocs=processes,
                                 join=False, start_method="spawn")

    def forward(signum, frame):
        leader = context.processes[0]
        if leader.is_alive():
            os.kill(leader.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if stop_via_rank0 else {}
    try:
        while not context.join(timeout=1):
            pass
    except mp.ProcessRaisedException as err:
        print(f"{name}: a rank failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as err:
        print(f"{name}: rank {err.error_index} exited with code {err.exit_code}; the others were stopped",
              file=sys.stderr)
        return err.exit_code or 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0


def _rank_main(rank: int, processes: int, port: int, main, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(processes),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = main(argv)
    if dist.is_initialized():
        dist.destroy_process_group()
    if code:
        sys.exit(code)
