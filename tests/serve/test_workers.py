"""`wanx worker` processes on the shared queue beside `wanx serve --workers 0`: routing by live
workers (503), results written once, and a worker killed mid-job (its job runs on another)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from wanx.serve.jobs import JobQueue
from wanx.serve.queue import open_queue
from wanx.video import Video

from tests.test_cli_errors import error_of, no_loading  # noqa: F401 (no_loading: a fixture)

from .conftest import FAST, ServeProcess, wait_for


def test_api_without_workers_refuses_a_model_no_live_worker_holds(make_server):
    from wanx.serve.app import create_app

    server = make_server(needs_workers=True)
    with TestClient(create_app(server, ui=False, worker=False), base_url="http://localhost") as client:
        answer = client.post("/v1/videos", json={"prompt": "a cat", **FAST})
        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        assert "no live worker holds model 'tiny'" in detail and "wanx worker" in detail and "\n" not in detail
        assert server.queue.counts() == {}  # nothing queued
        server.queue._queue.register_worker("elsewhere", ["tiny"], host="gpu-host")
        answer = client.post("/v1/videos", json={"prompt": "a cat", **FAST})
        assert answer.status_code == 202, answer.text
        time.sleep(0.6)  # no worker in this process: it waits for one
        assert client.get(f"/v1/videos/{answer.json()['id']}").json()["status"] == "queued"


def test_a_late_finisher_writes_no_files(tmp_path, monkeypatch):
    """Worker a stalls past its lease, b runs the job and writes it; a's result, when it comes,
    must not replace b's files (nor leave its own behind)."""
    monkeypatch.setenv("WANX_LEASE_S", "2")

    def video(tag):
        return Video(np.full((3, 16, 16, 3), 10 if tag == "a" else 200, np.uint8), 16, {"by": tag})

    def late(job, on_step):
        time.sleep(2.2)  # no step, no heartbeat: the lease runs out
        b_job = b._claim()
        assert b_job["id"] == job["id"]
        b._run(b_job)
        return video("a")

    a = JobQueue(tmp_path, late, worker_id="a")
    b = JobQueue(tmp_path, lambda job, on_step: video("b"), worker_id="b")
    try:
        job_id = a.submit({"prompt": "x"})
        a._run(a._claim())
        job = a.get(job_id)
        assert job["status"] == "done" and job["events"] == ["queued", "running", "queued", "running", "done"]
        assert json.loads((tmp_path / f"{job_id}.json").read_text())["by"] == "b"
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith("jobs.sqlite")) \
            == [f"{job_id}.json", f"{job_id}.mp4"]
    finally:
        a.stop()
        b.stop()


def _start_worker(outputs: Path, url: str, env: dict) -> subprocess.Popen:
    log = open(outputs.parent / f"worker-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "wanx", "worker", "--queue", url, "--model", "tiny",
                             "--outputs", str(outputs), "--device", "cpu", "--quiet"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not after {timeout} s")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_each_job_once_and_a_killed_workers_job_runs_on_the_other(tiny, tmp_path, backend, request):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    url = f"sqlite:///{outputs / 'jobs.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_server")()
    env = {**os.environ, "WANX_LEASE_S": "3", "GRADIO_ANALYTICS_ENABLED": "False"}
    api = ServeProcess(outputs, "--workers", "0", "--no-ui", "--queue", url, env=env)
    workers: list[subprocess.Popen] = []
    queue = open_queue(url)
    try:
        refused = api.client.post("/v1/videos", json={"prompt": "a cat", **FAST})
        assert refused.status_code == 503 and "no live worker" in refused.json()["detail"]
        workers = [_start_worker(outputs, url, env) for _ in range(2)]
        _wait(lambda: len(queue.workers(max_age=3)) == 2 or any(w.poll() is not None for w in workers), 240,
              "two workers registered")
        assert all(w.poll() is None for w in workers), "a worker exited"
        ids = [api.client.post("/v1/videos", json={"prompt": f"job {i}", "seed": i, **{**FAST, "steps": 3}})
               .json()["id"] for i in range(6)]
        # kill the worker that first holds a job, while it runs it
        held = _wait(lambda: next((j for j in queue.list(status="running") if j["worker_id"]), None), 60, "a job runs")
        pid = int(held["worker_id"].split(":")[2])
        victim = next(w for w in workers if w.pid == pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        survivor = next(w for w in workers if w is not victim)
        jobs = [wait_for(api.client, job_id, timeout=120) for job_id in ids]
        assert [job["status"] for job in jobs] == ["done"] * 6, jobs
        for job in jobs:  # each done once; the killed one run twice, its first lease expired
            assert job["events"].count("done") == 1
            assert job["attempts"] == (2 if job["id"] == held["id"] else 1), job
        assert open_queue(url).get(held["id"])["worker_id"] != held["worker_id"]
        assert sorted(p.stem for p in outputs.glob("*.mp4")) == sorted(ids)
        assert all(json.loads((outputs / f"{i}.json").read_text())["id"] == i for i in ids)
        # SIGTERM: the survivor stops, leaves the registry, and the API refuses again
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(30) == 0
        assert [w["worker_id"] for w in queue.workers()] == [held["worker_id"]]  # only the killed one, gone stale
        _wait(lambda: api.client.post("/v1/videos", json={"prompt": "a cat", **FAST}).status_code == 503, 10,
              "refused once no worker is live")
    finally:
        queue.close()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
        api.close()


def test_a_bad_lease_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WANX_LEASE_S", "0.5")
    with pytest.raises(ValueError, match="WANX_LEASE_S=0.5: give the lease in seconds, at least 2"):
        JobQueue(tmp_path, lambda job, on_step: None)


def test_sigterm_gives_the_running_job_back(tmp_path):
    """`wanx worker`'s loop (run_forever): SIGTERM mid-job stops it at the next step, the job is
    queued again with the attempt not counted, and the worker leaves the registry."""
    steps = []

    def runner(job, on_step):
        for step in range(1, 4):
            steps.append(step)
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            on_step(step, 3, None)
        return Video(np.zeros((3, 16, 16, 3), np.uint8), 16, {})

    worker = JobQueue(tmp_path, runner, worker_id="w1", model="tiny")
    job_id = worker.submit({"prompt": "x"})
    worker.run_forever()  # returns once the signal has stopped it
    assert steps == [1]  # the signal stops it at the step it came in
    other = JobQueue(tmp_path, runner, model="tiny")
    try:
        job = other.get(job_id)
        assert job["status"] == "queued" and job["attempts"] == 0 and job["events"] == ["queued", "running", "queued"]
        assert other._queue.workers() == [] and not (tmp_path / f"{job_id}.mp4").exists()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are the ones from before
    finally:
        other.stop()


@pytest.mark.parametrize("flags, env, words", [
    (["--outputs", "{tmp}/nowhere"], {}, "--outputs {tmp}/nowhere: no such folder"),
    ([], {"WANX_LEASE_S": "soon"}, "WANX_LEASE_S=soon: give the lease in seconds"),
    (["--queue", "sqlite:///{tmp}/no/jobs.sqlite"], {}, "folder {tmp}/no does not exist"),
])
def test_worker_refuses_bad_input_in_one_line_before_loading(tiny, tmp_path, capsys, monkeypatch, no_loading,
                                                             flags, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["worker", "--model", "tiny", "--device", "cpu", "--queue", f"sqlite:///{tmp_path}/jobs.sqlite",
            "--outputs", str(tmp_path)] + [flag.format(tmp=tmp_path) for flag in flags]
    assert words.format(tmp=tmp_path) in error_of(capsys, argv)
