"""Servers for the serve tests: the tiny random-weight model (a 64x48, 5-frame, 2-step video
takes well under a second), in-process apps and real `wanx serve` processes on free loopback
ports, always torn down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

FAST = {"size": "64x48", "frames": 5, "steps": 2}


@pytest.fixture(scope="session")
def tiny():
    """The tiny T2V model loaded once: (pipe, files, runtime)."""
    from wanx.hub import find_components, resolve_model
    from wanx.pipeline import WanPipeline
    from wanx.runtime import Runtime

    files = find_components(resolve_model("tiny"))
    runtime = Runtime.create("cpu")
    return WanPipeline.from_files(files, runtime=runtime), files, runtime


@pytest.fixture
def make_server(tiny, tmp_path):
    """make_server(**options) -> a Server over the tiny model in its own outputs folder;
    closed at the end of the test."""
    from wanx.serve.app import Server

    made = []

    def make(outputs: Path | None = None, **options):
        pipe, files, runtime = tiny
        server = Server(pipe, files, runtime, outputs or tmp_path / f"out{len(made)}", model_name="tiny", **options)
        made.append(server)
        return server

    yield make
    for server in made:
        try:
            server.queue.stop(timeout=10)
        except Exception:  # already stopped by the test
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(client: httpx.Client, job_id: str, statuses=("done", "failed", "cancelled"), timeout: float = 180) -> dict:
    """Poll a job until it reaches one of `statuses` (generous: a shared machine can be slow)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


class ServeProcess:
    """`wanx serve --model tiny` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, outputs: Path, *extra: str, token: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(outputs.parent / f"serve-{self.port}.log", "wb")
        args = [sys.executable, "-m", "wanx", "serve", "--model", "tiny", "--port", str(self.port),
                "--outputs", str(outputs), "--device", "cpu", *extra] + (["--token", token] if token else [])
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        end = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"wanx serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if self.client.get("/v1/model").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                self.close()
                raise AssertionError(f"wanx serve did not start: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the machine or the OOM killer stops it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def serve_process(tiny, tmp_path):
    """serve_process(outputs, *flags) -> a started ServeProcess; all are stopped at the end.
    (Depends on `tiny` so the tiny model files exist before the processes look for them.)"""
    started = []

    def start(outputs: Path | None = None, *extra: str, token: str | None = None) -> ServeProcess:
        process = ServeProcess(outputs or tmp_path / "outputs", *extra, token=token)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def _postgres_bin() -> Path | None:
    """The folder of Debian's (or any PATH's) PostgreSQL server binaries, newest version first."""
    import glob
    import shutil

    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole session (about a second to start): trust auth,
    listening on a free loopback port, no fsync. initdb refuses root, so as root the server runs
    as `nobody` in a temp folder it owns. Yields a function new_database() -> URL of a fresh,
    empty database (each test gets its own). Skips, saying why, if no server can start."""
    import shutil
    import tempfile

    try:
        import psycopg
    except ImportError:
        pytest.skip("PostgreSQL queue tests: psycopg is not installed (pip install 'psycopg[binary]')")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL queue tests: no initdb/pg_ctl found (apt-get install postgresql; .ci/run does)")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        pytest.skip("PostgreSQL queue tests: running as root and no runuser to start the server as nobody")
    root = Path(tempfile.mkdtemp(prefix="wanx-pg-", dir="/tmp"))
    if as_user:
        shutil.chown(root, "nobody")
    data, port = root / "data", free_port()
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-s",
                        "-o", f"-F -k {root} -p {port} -h 127.0.0.1", "start"],
                       check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as err:
        log = (root / "log").read_text(errors="replace")[-500:] if (root / "log").exists() else ""
        detail = getattr(err, "stderr", "") or ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL queue tests: the server did not start: {err} {detail.strip()} {log.strip()}")
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    count = [0]

    def new_database() -> str:
        count[0] += 1
        name = f"wanx_test_{count[0]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    new_database.admin_url = admin
    try:
        yield new_database
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-s", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
