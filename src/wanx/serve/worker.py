"""`wanx worker`: one model loaded once, running that model's jobs from a shared queue.

The API (`wanx serve --workers 0`) and any number of workers, on this host or others, share the
queue URL and the outputs folder: a job's uploads are read from OUTPUTS/inputs and its video is
written as OUTPUTS/<id>.mp4, as `wanx serve` does with its own worker. The loop is JobQueue's.

`--gpu K`: this worker on GPU K. `--gpus 0,1,...`: one worker made of a sequence-parallel group of
ranks, one per GPU (with --device cpu, that many CPU ranks on gloo): rank 0 claims, heartbeats and
finishes the jobs and writes the files; every claimed job is broadcast to the other ranks, all of
them make the same pipeline call under the parallel plan, and at each step rank 0 tells the others
whether to go on (a cancel, a lost lease or a stop seen by rank 0 stops them all at that step)."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

WAIT = timedelta(days=365)  # how long a rank of an idle group waits for the next job

def run_worker(args, main, flags: dict | None = None) -> int:
    """Check everything, load the model, then run jobs until SIGTERM or Ctrl-C (the running job goes
    back to the queue). main: the CLI's entry point, which a group's ranks run (`wanx.cli.main`,
    given by the face: serve does not import it); flags: how it spells each runtime choice."""
    from .jobs import lease_seconds

    lease_seconds()  # a bad $WANX_LEASE_S is named before anything loads
    gpus = list(args.gpus or ())
    if len(gpus) == 1:  # a group of one is a worker on that GPU
        args.gpu, gpus = gpus[0], []
    where = None
    if args.gpu is not None:  # before anything initialises CUDA (see pick_gpus)
        where = "gpu" + pick_gpus([args.gpu], args.device, "--gpu")[0]
    if gpus and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # start the group's ranks here, then wait for them
        return _start_group(args, gpus, main, flags)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        return _run_rank(args, flags, world_size)
    setup = _prepare(args, flags)
    host = socket.gethostname()
    where = where or str(setup["runtime"].device).replace(":", "")
    worker_id = f"worker:{host}:{os.getpid()}:{secrets.token_hex(3)}:{where}"
    server = _load(args, setup, worker_id)
    print(f"wanx worker {worker_id}: model {args.model}, queue {_shown(args.queue)}, outputs {setup['outputs']}",
          file=sys.stderr, flush=True)
    server.queue.run_forever(host=host)
    print(f"wanx worker {worker_id}: stopped", file=sys.stderr, flush=True)
    return 0


def pick_gpus(wanted: list[int], device: str | None, flag: str) -> list[str]:
    """Make GPUs `wanted` (indices among those this process sees, as cuda:K would count) the only
    ones this process and its children see, through CUDA_VISIBLE_DEVICES; returns their ids as
    CUDA_VISIBLE_DEVICES names them. CUDA_VISIBLE_DEVICES rather than cuda:K: with cuda:K, whatever
    uses the current device (pinned host memory for block streaming, some attention kernels) still
    makes a context on GPU 0, memory every worker would take from the one there; and a rank's
    cuda:LOCAL_RANK then lands on the listed GPU. It applies only before CUDA is initialised:
    torch counts GPUs through NVML, which does not initialise it, and this is checked below."""
    shown = ",".join(map(str, wanted))
    if device is not None and not device.startswith("cuda"):
        raise ValueError(f"{flag} {shown} picks GPUs, but --device {device} does not run on one; leave out {flag} "
                         "(or, for a group of CPU ranks, give --device cpu --gpus 0,1)")
    if device != "cuda" and device is not None:
        raise ValueError(f"{flag} {shown} and --device {device} both pick the GPU; give only {flag}")
    if any(k < 0 for k in wanted):
        raise ValueError(f"{flag} {shown}: GPU indices are 0 or more")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"{flag} {shown}: a GPU is listed twice; list each once")
    import torch

    count = torch.cuda.device_count()
    missing = [k for k in wanted if k >= count]
    if missing:
        have = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
        raise ValueError(f"{flag} {shown}: no GPU {missing[0]} here (this process sees {have}); "
                         f"{'choose from those' if count else 'run on a GPU host, or use --device cpu'}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [part.strip() for part in visible.split(",")] if visible is not None else [str(k) for k in range(count)]
    chosen = [ids[k] for k in wanted]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    if torch.cuda.device_count() != len(chosen):  # CUDA was initialised already: the choice would not apply
        os.environ["CUDA_VISIBLE_DEVICES"] = visible if visible is not None else ""
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        raise ValueError(f"{flag} {shown}: CUDA was initialised before the GPUs could be chosen; start the worker "
                         f"with CUDA_VISIBLE_DEVICES={','.join(chosen)} instead")
    return chosen


def _prepare(args, flags: dict | None, world: int = 1) -> dict:
    """What is checked before any weight loads: inputs, runtime, model files, plan, the queue."""
    from ..hub import find_components, resolve_model
    from ..runtime import Runtime
    from .jobs import check_outputs

    if args.loras and not Path(args.loras).is_dir():
        raise FileNotFoundError(f"--loras {args.loras}: no such folder")
    outputs = Path(args.outputs)
    if not outputs.is_dir():  # the folder the API made and shares: a typo must not start an idle worker
        raise ValueError(f"--outputs {outputs}: no such folder; give the folder `wanx serve --outputs` uses "
                         "(shared with this host)")
    # the queue reachable, its tables there, the folder its own, the model one an API on it takes
    check_outputs(args.queue, outputs, worker_model=args.model)
    runtime = Runtime.from_flags(args)
    files = find_components(resolve_model(args.model, source=args.source), dit=args.dit)
    runtime.check(experts=2 if files.moe else 1, world=world, sp=args.sp, cfg_parallel=args.cfg_parallel, names=flags)
    if world > 1:
        from ..distributed import check_plan

        check_plan(world, files.dit_config.num_heads, args.sp, args.cfg_parallel)
    return dict(outputs=outputs, runtime=runtime, files=files)


def _load(args, setup: dict, worker_id: str, parallel: dict | None = None, speak: bool = True):
    """The model loaded (under the parallel plan, on a rank of a group) and its Server."""
    from ..pipeline import WanPipeline
    from .app import Server

    start = time.perf_counter()
    runtime, files = setup["runtime"], setup["files"]
    pipe = WanPipeline.from_files(files, runtime=runtime, progress=speak and not args.quiet, parallel=parallel)
    pipe.name = args.model
    server = Server(pipe, files, runtime, setup["outputs"], loras=args.loras, model_name=args.model,
                    queue_url=args.queue, worker_id=worker_id)
    if speak and not args.quiet:
        print(f"loading: {time.perf_counter() - start:.1f} s ({files.model_type} on {runtime.device})", file=sys.stderr)
        if pipe.parallel is not None:
            print(f"parallel: {pipe.parallel.describe()}", file=sys.stderr)
    return server


# -- a group of ranks ------------------------------------------------------------------------
def _start_group(args, gpus: list[int], main, flags: dict | None) -> int:
    """Check what can be checked here, then start one rank per GPU (this same command without
    --gpus) and wait for them. SIGTERM or Ctrl-C here reach rank 0, which gives its job back and
    tells the others to stop; a rank that fails ends the group (torch's start_processes)."""
    from ..distributed.launch import spawn, without_gpus

    world = len(gpus)
    if args.device == "cpu":
        if len(set(gpus)) != world:
            raise ValueError(f"--gpus {','.join(map(str, gpus))}: a rank is listed twice; list each once")
    else:
        pick_gpus(gpus, args.device, "--gpus")  # the ranks see only these; rank r takes cuda:r
    _prepare(args, flags, world)
    # each rank: this command, as one of `world` (WORLD_SIZE); rank 0 hears SIGTERM and Ctrl-C
    return spawn(world, main, without_gpus(args.argv), stop_via_rank0=True, name="wanx worker")


class _GroupStop(Exception):
    """On a rank other than 0: rank 0 stopped the job at this step (cancel, stop, lease lost)."""


def _run_rank(args, flags: dict | None, world_size: int) -> int:
    """One rank of a group (started by _start_group, or by torchrun on several hosts)."""
    import torch.distributed as dist

    from ..distributed import broadcast_object, init
    from ..distributed.launch import rank_device
    from .jobs import _one_line

    rank = int(os.environ.get("RANK", "0"))
    if rank:  # Ctrl-C in a terminal reaches every rank: rank 0 alone decides, and tells the others
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    args.device = rank_device(args.device)
    setup = _prepare(args, flags, world_size)
    init(setup["runtime"].device)
    # Rank 0's word to the others (each job, and at each step whether to go on) on a gloo group of
    # its own: on the CPU, where a rank waiting for the next job sleeps in a socket (NCCL would spin
    # on a GPU stream), and with a timeout an idle hour does not reach (the default's is 30 min)
    control = dist.new_group(backend="gloo", timeout=WAIT)
    tell = functools.partial(broadcast_object, group=control)

    host = socket.gethostname()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = (f"gpu{'+'.join(visible.split(','))}" if setup["runtime"].device.type == "cuda" and visible
             else f"{setup['runtime'].device.type}x{world_size}")
    group_id = tell(f"worker:{host}:{os.getpid()}:{secrets.token_hex(3)}:{where}")
    parallel = dict(sp=args.sp, cfg_parallel=args.cfg_parallel, fsdp=False)
    server = _load(args, setup, group_id if rank == 0 else f"{group_id}/rank{rank}", parallel, speak=rank == 0)
    if rank:
        while True:  # the jobs rank 0 claims, until it says stop
            kind, job = tell(None)
            if kind == "stop":
                break

            def follow(step, total, latents):
                if tell(None):
                    raise _GroupStop

            try:
                server.run(job, follow)
            except _GroupStop:
                pass
            except Exception as err:  # the same call fails on rank 0, which records it
                print(f"wanx worker rank {rank}: job {job['id']}: {_one_line(err)}", file=sys.stderr, flush=True)
        server.queue.stop(timeout=0)
        return 0

    def run(job: dict, on_step):
        tell(("job", job))  # the request and its input files (in the shared outputs folder)

        def lead(step, total, latents):
            try:
                on_step(step, total, latents)
            except BaseException:
                tell(True)
                raise
            tell(False)

        return server.run(job, lead)

    server.queue.runner = run
    print(f"wanx worker {group_id}: model {args.model}, {world_size} ranks, queue {_shown(args.queue)}, "
          f"outputs {setup['outputs']}", file=sys.stderr, flush=True)
    try:
        server.queue.run_forever(host=host)
    finally:
        with contextlib.suppress(Exception):  # not where a rank is gone: its error is the one to see
            tell(("stop", None))
    print(f"wanx worker {group_id}: stopped", file=sys.stderr, flush=True)
    return 0


def _shown(url: str) -> str:
    from .queue import redact

    return redact(url)
