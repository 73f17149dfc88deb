"""Serving throughput and queue overhead (issue 33): jobs per minute against the number of
`wanx worker` processes on the tiny model, and the queue's own cost per job on SQLite and on a
real PostgreSQL server.

    python bench/serve_load.py                    # workers 1, 2, 3; 12 jobs each; both backends
    python bench/serve_load.py --workers 1 2 --jobs 6 --overhead-jobs 100

Throughput: `wanx serve --model tiny --workers 0` and N `wanx worker` subprocesses on one SQLite
queue (the setup of docs/serve.md), jobs submitted over HTTP and timed from the first submit
until every job is done. Each worker is a whole process with its own model copy: on a machine
with C cores, more than C workers only share the cores.

Overhead: submit + claim + heartbeat + finish of empty jobs straight on `wanx.serve.queue`
(no model, no HTTP), in milliseconds per job. PostgreSQL is Debian's, started for the run in a
temporary folder (as `nobody` when run as root, since initdb refuses root); it is skipped,
saying why, where it cannot start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = {"size": "64x48", "frames": 5, "steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(workers: int, jobs: int, root: Path) -> float:
    """Jobs per minute with `workers` worker processes."""
    import httpx

    outputs = root / f"out-{workers}"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = open(root / f"serve-{workers}.log", "wb")
    procs = [subprocess.Popen([sys.executable, "-m", "wanx", "serve", "--model", "tiny", "--workers", "0", "--no-ui",
                               "--port", str(port), "--outputs", str(outputs), "--device", "cpu", "--quiet"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 120
        while True:  # the API answers
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"wanx serve did not start: see {log.name}")
            time.sleep(0.2)
        url = f"sqlite:///{outputs / 'jobs.sqlite'}"
        for _ in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "wanx", "worker", "--queue", url, "--model", "tiny",
                                           "--outputs", str(outputs), "--device", "cpu", "--quiet"],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        from wanx.serve.queue import open_queue

        queue = open_queue(url)
        while len([w for w in queue.workers() if "tiny" in w["models"]]) < workers:  # every worker loaded
            if time.monotonic() > deadline + 120:
                raise SystemExit(f"the workers did not start: see {log.name}")
            time.sleep(0.2)
        start = time.perf_counter()
        ids = []
        for i in range(jobs):
            answer = client.post("/v1/videos", json={"prompt": f"job {i}", "seed": i, **FAST})
            answer.raise_for_status()
            ids.append(answer.json()["id"])
        while True:
            states = [client.get(f"/v1/videos/{job_id}").json()["status"] for job_id in ids]
            if all(s in ("done", "failed", "cancelled") for s in states):
                break
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        if states.count("done") != jobs:
            raise SystemExit(f"{jobs - states.count('done')} jobs did not finish: see {log.name}")
        return jobs / seconds * 60
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        client.close()
        log.close()


def overhead_ms(url: str, jobs: int) -> float:
    """Milliseconds per job of submit + claim + heartbeat + finish, one worker, no work."""
    from wanx.serve.queue import open_queue

    queue = open_queue(url)
    queue.register_worker("bench", ["tiny"], host="bench")
    start = time.perf_counter()
    for i in range(jobs):
        queue.submit({"prompt": f"job {i}"}, model="tiny")
        job = queue.claim("bench", ["tiny"], 60)
        queue.heartbeat(job["id"], "bench", 60)
        queue.finish(job["id"], "bench", "done", result=f"{job['id']}.mp4")
    return (time.perf_counter() - start) / jobs * 1000


class Postgres:
    """Debian's PostgreSQL in a temporary folder for the run, or `reason` why not."""

    def __init__(self):
        self.url, self.reason, self.root = None, "", None
        bindir = next((p.parent for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
        if bindir is None and shutil.which("initdb"):
            bindir = Path(shutil.which("initdb")).parent
        if bindir is None:
            self.reason = "no initdb (apt-get install postgresql)"
            return
        import importlib.util

        if importlib.util.find_spec("psycopg") is None:
            self.reason = "psycopg is not installed (pip install 'wanx[serve]')"
            return
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        self.bindir, self.root = bindir, Path(tempfile.mkdtemp(prefix="wanx-pg-bench-", dir="/tmp"))
        if self.as_user:
            shutil.chown(self.root, "nobody")
        port = free_port()
        try:
            subprocess.run([*self.as_user, str(bindir / "initdb"), "-D", str(self.root / "data"), "-A", "trust", "-U",
                            "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
            # fsync left on: the overhead is a real server's, durable commits included
            subprocess.run([*self.as_user, str(bindir / "pg_ctl"), "-D", str(self.root / "data"), "-l",
                            str(self.root / "log"), "-w", "-s", "-o", f"-k {self.root} -p {port} -h 127.0.0.1",
                            "start"], check=True, capture_output=True, timeout=120)
        except (subprocess.SubprocessError, OSError) as err:
            self.reason = f"the server did not start ({err})"
            return
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def stop(self):
        if self.root is None:
            return
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-s",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=12, help="jobs per throughput run")
    parser.add_argument("--overhead-jobs", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("WANX_HOME", tempfile.mkdtemp(prefix="wanx-bench-home-"))  # the tiny set made here
    root = Path(tempfile.mkdtemp(prefix="wanx-serve-load-"))
    print(f"{os.cpu_count()} CPU cores; tiny model, {FAST['size']}, {FAST['frames']} frames, {FAST['steps']} steps")
    print("| workers | jobs | jobs/minute | vs 1 worker |\n|---|---|---|---|")
    first = None
    for n in args.workers:
        rate = throughput(n, args.jobs, root)
        first = first or rate
        print(f"| {n} | {args.jobs} | {rate:.1f} | {rate / first:.2f}x |", flush=True)
    print("\n| queue | overhead per job (submit, claim, heartbeat, finish) |\n|---|---|")
    sqlite_url = f"sqlite:///{root / 'overhead.sqlite'}"
    print(f"| SQLite (WAL) | {overhead_ms(sqlite_url, args.overhead_jobs):.2f} ms |", flush=True)
    pg = Postgres()
    try:
        if pg.url:
            print(f"| PostgreSQL (a local server over TCP, fsync on) | {overhead_ms(pg.url, args.overhead_jobs):.2f} ms |")
        else:
            print(f"| PostgreSQL | not measured: {pg.reason} |")
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
