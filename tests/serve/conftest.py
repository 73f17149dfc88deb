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
