"""What an API process shows of jobs that `wanx worker` processes run: progress (step, total,
ETA) and the latent preview while a job runs, and the workers' job seconds, failures and GPU
memory in /metrics, all through the shared queue and outputs folder. And the queue tables of an
older wanx gaining the columns these need."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from wanx.serve.queue import open_queue

from .conftest import FAST, ServeProcess, wait_for
from .test_ops import _samples
from .test_workers import _start_worker, _wait

STEPS = 1000  # the most a server takes, at a size where a step takes 10-100 ms on the tiny model: heartbeats
# (one a second) while it samples, cancelled once seen. At 64x48 x 5 frames it raced: 200 steps ended
# in 0.6 s, before the first heartbeat, and 1000 steps once ended before the cancel reached them.
LONG = {"size": "256x256", "frames": 17, "steps": STEPS}


def test_a_workers_progress_preview_and_metrics_reach_the_api(tiny, tmp_path):
    from wanx.video import Video

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    url = f"sqlite:///{outputs / 'jobs.sqlite'}"
    env = {**os.environ, "WANX_LEASE_S": "5", "GRADIO_ANALYTICS_ENABLED": "False"}
    api = ServeProcess(outputs, "--workers", "0", "--no-ui", "--queue", url, env=env)
    queue = open_queue(url)
    worker = _start_worker(outputs, url, env)
    try:
        _wait(lambda: queue.workers(max_age=3) or worker.poll() is not None, 240, "the worker registered")
        assert worker.poll() is None, "the worker exited"
        long = api.client.post("/v1/videos", json={"prompt": "a cat", **LONG}).json()["id"]
        # a job that fails as it runs: its upload is gone by the time the worker, busy with the
        # first job, starts it
        clip = tmp_path / "clip.mp4"
        Video(np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), np.uint8)).save(clip)
        body = {"prompt": "it goes on", "steps": 2, "frames": 4, "extend_frames": 5}
        bad = api.client.post("/v1/videos", data={"request": json.dumps(body)},
                              files={"extend": ("clip.mp4", clip.read_bytes(), "video/mp4")})
        assert bad.status_code == 202, bad.text
        bad = bad.json()["id"]
        for path in (outputs / "inputs").glob(f"{bad}-*"):
            path.unlink()
        short = api.client.post("/v1/videos", json={"prompt": "a dog", **FAST}).json()["id"]

        progress, preview, end = None, None, time.monotonic() + 120
        while (progress is None or preview is None) and time.monotonic() < end:
            job = api.client.get(f"/v1/videos/{long}").json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if job["status"] == "running" and (job["progress"] or {}).get("eta_s") is not None:
                progress = job["progress"]
            answer = api.client.get(f"/v1/videos/{long}/preview")
            if answer.status_code == 200:
                preview = answer
            time.sleep(0.05)
        assert progress is not None, f"no progress with an ETA while the job ran: {job}"
        assert progress["total"] == STEPS and 0 < progress["step"] <= STEPS and progress["eta_s"] >= 0
        assert preview is not None, "no preview while the job ran"
        assert preview.headers["content-type"] == "image/png"
        strip = Image.open(io.BytesIO(preview.content))
        assert strip.mode == "RGB" and strip.width > strip.height > 0  # the frames side by side

        assert api.client.delete(f"/v1/videos/{long}").status_code == 202  # seen: no need to sample it all
        job = wait_for(api.client, long)
        assert job["status"] == "cancelled" and job["progress"] is None
        assert api.client.get(f"/v1/videos/{long}/preview").status_code == 404
        assert not (outputs / "previews" / f"{long}.png").exists()  # removed as the job ended
        assert wait_for(api.client, bad)["status"] == "failed"
        job = wait_for(api.client, short)
        assert job["status"] == "done" and job["progress"] == {"step": 2, "total": 2, "eta_s": 0.0}
        assert not list((outputs / "previews").iterdir())

        samples = _samples(api.client.get("/metrics").text)
        name = queue.workers()[0]["worker_id"]
        assert name.startswith("worker:")
        done = (("model", "tiny"), ("status", "done"), ("worker", name))
        failed = (("model", "tiny"), ("status", "failed"), ("worker", name))
        cancelled = (("model", "tiny"), ("status", "cancelled"), ("worker", name))
        assert [samples[("wanx_job_seconds_count", labels)] for labels in (done, failed, cancelled)] == [1, 1, 1]
        assert 0 < samples[("wanx_job_seconds_sum", done)] < 600
        assert samples[("wanx_job_seconds_bucket", (("le", "+Inf"), *done))] == 1
        assert samples[("wanx_job_failures_total", (("model", "tiny"), ("worker", name)))] == 1
        assert not any(key.startswith("wanx_worker_gpu") for key, _ in samples)  # a CPU worker: no GPU memory
    finally:
        queue.close()
        if worker.poll() is None:
            worker.terminate()
            worker.wait(30)
        api.close()


def test_a_workers_gpu_memory_is_shown_per_worker_and_model(make_server):
    """The heartbeat's GPU memory (CUDA only, so given here by hand) in the worker's row, in /metrics."""
    from fastapi.testclient import TestClient

    from wanx.serve.app import create_app

    server = make_server()
    queue = server.queue._queue
    with TestClient(create_app(server, ui=False, worker=False), base_url="http://localhost") as client:
        queue.register_worker("gpu-worker", ["tiny"], host="h")
        job_id = queue.submit({"prompt": "x"}, model="tiny")
        assert queue.claim("gpu-worker", ["tiny"], 60)["id"] == job_id
        assert queue.heartbeat(job_id, "gpu-worker", 60, gpu_memory=123_456_789) == "running"
        assert queue.heartbeat(job_id, "gpu-worker", 60) == "running"  # no reading: the last one kept
        samples = _samples(client.get("/metrics").text)
    assert samples[("wanx_worker_gpu_max_memory_bytes", (("model", "tiny"), ("worker", "gpu-worker")))] == 123_456_789


# the tables as the first release of the shared queue made them (before progress, stats, gpu_memory)
_OLD_SCHEMA = """
CREATE TABLE wanx_jobs (seq {serial}, id TEXT NOT NULL UNIQUE, model TEXT NOT NULL, priority INTEGER NOT NULL,
    status TEXT NOT NULL, request TEXT NOT NULL, inputs TEXT NOT NULL, result TEXT, settings TEXT, error TEXT,
    worker_id TEXT, expires_at {real}, attempts INTEGER NOT NULL, cancel INTEGER NOT NULL, events TEXT NOT NULL,
    created {real} NOT NULL, started {real}, finished {real});
CREATE INDEX wanx_jobs_claim ON wanx_jobs (status, model, priority, seq);
CREATE TABLE wanx_workers (worker_id TEXT PRIMARY KEY, models TEXT NOT NULL, host TEXT NOT NULL,
    last_seen {real} NOT NULL);
INSERT INTO wanx_jobs (id, model, priority, status, request, inputs, attempts, cancel, events, created)
    VALUES ('old', 'tiny', 0, 'queued', '{{"prompt": "x"}}', '{{}}', 0, 0, '[["queued", 1.0]]', 1.0);
INSERT INTO wanx_workers (worker_id, models, host, last_seen) VALUES ('w', '["tiny"]', 'h', 1.0);
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tables_of_an_older_queue_gain_the_new_columns(tmp_path, backend, request):
    if backend == "sqlite":
        import sqlite3

        url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        with sqlite3.connect(tmp_path / "jobs.sqlite") as db:
            db.executescript(_OLD_SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"))
    else:
        import psycopg

        url = request.getfixturevalue("postgres_server")()
        with psycopg.connect(url, autocommit=True) as db:
            for statement in _OLD_SCHEMA.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION").split(";"):
                if statement.strip():
                    db.execute(statement)
    queue = open_queue(url)
    try:
        open_queue(url).close()  # a second opener finds the columns there
        assert queue.get("old")["progress"] is None
        assert queue.claim("w", ["tiny"], 60)["id"] == "old"
        assert queue.heartbeat("old", "w", 60, progress={"step": 1, "total": 2, "eta_s": 0.5}) == "running"
        assert queue.get("old")["progress"] == {"step": 1, "total": 2, "eta_s": 0.5}
        assert queue.finish("old", "w", "done")
        assert queue.get("old")["progress"] is None  # it told of the run, now over
        [worker] = queue.workers()
        assert worker["stats"]["tiny"]["done"]["count"] == 1 and worker["gpu_memory"] is None
    finally:
        queue.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_heartbeat_keeps_progress_and_gpu_memory_and_finish_counts_once(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}" if backend == "sqlite" else \
        request.getfixturevalue("postgres_server")()
    queue = open_queue(url)
    try:
        queue.register_worker("w", ["tiny"])
        job_id = queue.submit({"prompt": "x"}, model="tiny")
        queue.claim("w", ["tiny"], 60)
        assert queue.heartbeat(job_id, "w", 60, progress={"step": 3, "total": 9, "eta_s": 1.5},
                               gpu_memory=2**40 + 1) == "running"
        assert queue.heartbeat(job_id, "w", 60) == "running"  # neither given: both kept
        assert queue.get(job_id)["progress"] == {"step": 3, "total": 9, "eta_s": 1.5}
        assert queue.workers()[0]["gpu_memory"] == 2**40 + 1
        assert queue.finish(job_id, "w", "failed", error="boom")
        assert not queue.finish(job_id, "w", "failed", error="again")  # refused: not counted twice
        stats = queue.workers()[0]["stats"]
        assert stats["tiny"]["failed"]["count"] == 1 and stats["tiny"]["failed"]["buckets"][-1] == (float("inf"), 1)
        assert queue.get(job_id)["progress"] is None
    finally:
        queue.close()
