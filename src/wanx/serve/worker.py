"""`wanx worker`: one model loaded once, running that model's jobs from a shared queue.

The API (`wanx serve --workers 0`) and any number of workers, on this host or others, share the
queue URL and the outputs folder: a job's uploads are read from OUTPUTS/inputs and its video is
written as OUTPUTS/<id>.mp4, as `wanx serve` does with its own worker. The loop is JobQueue's."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from pathlib import Path


def run_worker(args, flags: dict | None = None) -> int:
    """Check everything, load the model, then run jobs until SIGTERM or Ctrl-C (the running job goes
    back to the queue). flags: how the command line spells each runtime choice."""
    from ..hub import find_components, resolve_model
    from ..pipeline import WanPipeline
    from ..runtime import Runtime
    from .app import Server
    from .jobs import lease_seconds
    from .queue import open_queue

    lease_seconds()  # a bad $WANX_LEASE_S is named before anything loads
    if args.loras and not Path(args.loras).is_dir():
        raise FileNotFoundError(f"--loras {args.loras}: no such folder")
    outputs = Path(args.outputs)
    if not outputs.is_dir():  # the folder the API made and shares: a typo must not start an idle worker
        raise ValueError(f"--outputs {outputs}: no such folder; give the folder `wanx serve --outputs` uses "
                         "(shared with this host)")
    runtime = Runtime.from_flags(args)
    files = find_components(resolve_model(args.model, source=args.source), dit=args.dit)
    runtime.check(experts=2 if files.moe else 1, names=flags)
    open_queue(args.queue).close()  # reachable, and its tables there, before the model loads
    host = socket.gethostname()
    worker_id = f"worker:{host}:{os.getpid()}:{secrets.token_hex(3)}"
    start = time.perf_counter()
    pipe = WanPipeline.from_files(files, runtime=runtime, progress=not args.quiet)
    pipe.name = args.model
    server = Server(pipe, files, runtime, outputs, loras=args.loras, model_name=args.model,
                    queue_url=args.queue, worker_id=worker_id)
    if not args.quiet:
        print(f"loading: {time.perf_counter() - start:.1f} s ({files.model_type} on {runtime.device})", file=sys.stderr)
    print(f"wanx worker {worker_id}: model {args.model}, queue {_shown(args.queue)}, outputs {outputs}",
          file=sys.stderr, flush=True)
    server.queue.run_forever(host=host)
    print(f"wanx worker {worker_id}: stopped", file=sys.stderr, flush=True)
    return 0


def _shown(url: str) -> str:
    from .queue import redact

    return redact(url)
