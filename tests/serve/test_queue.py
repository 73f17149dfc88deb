"""The queue under load and across a SIGKILL, on real `wanx serve` servers on loopback."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn

from wanx.video import read_video

from .conftest import free_port, wait_for

TINY_JOB = {"size": "32x32", "frames": 1, "steps": 1}  # the smallest real job: the queue is what is tested


def test_load_from_ten_clients_loses_and_duplicates_nothing(make_server):
    """30 jobs from 10 client threads against uvicorn on loopback: every job is accepted once,
    runs once, and its video and settings are its own."""
    from wanx.serve.app import create_app

    server = make_server()
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server, ui=False), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        while not web.started:
            time.sleep(0.05)

        def client_run(client_number: int) -> list[tuple[int, str]]:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                ids = []
                for i in range(3):
                    seed = client_number * 100 + i
                    answer = client.post("/v1/videos", json={"prompt": f"job {seed}", "seed": seed, **TINY_JOB})
                    assert answer.status_code == 202, answer.text
                    ids.append((seed, answer.json()["id"]))
                return ids

        with ThreadPoolExecutor(10) as pool:
            submitted = [pair for ids in pool.map(client_run, range(10)) for pair in ids]
        assert len(submitted) == 30 and len({job_id for _, job_id in submitted}) == 30
        assert server.queue.wait_idle(600), server.queue.counts()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            listed = client.get("/v1/videos").json()
        assert listed["counts"] == {"done": 30}
        assert sorted(job["id"] for job in listed["videos"]) == sorted(job_id for _, job_id in submitted)
        for seed, job_id in submitted:
            job = server.queue.get(job_id)
            assert job["attempts"] == 1 and job["events"] == ["queued", "running", "done"]
            assert job["settings"]["seed"] == seed and job["settings"]["prompt"] == f"job {seed}"
            assert json.loads((server.outputs / f"{job_id}.json").read_text())["seed"] == seed
        assert len(list(server.outputs.glob("*.mp4"))) == 30
        # the queue ran them one at a time, in the order they were accepted
        order = sorted(server.queue.list(limit=100), key=lambda job: job["started"])
        assert [job["id"] for job in order] == [job["id"] for job in reversed(listed["videos"])]
        assert all(a["finished"] <= b["started"] for a, b in zip(order, order[1:]))
    finally:
        web.should_exit = True
        thread.join(15)


def test_sigkill_mid_queue_then_restart_finishes_every_job(serve_process, tmp_path):
    """A server killed while a job runs: on restart that job is marked interrupted and run once
    more, the queued ones run, and every video is whole."""
    outputs = tmp_path / "outputs"
    first = serve_process(outputs, "--no-ui")
    slow = first.client.post("/v1/videos", json={"prompt": "slow", "seed": 1, "size": "32x32", "frames": 5,
                                                 "steps": 50}).json()["id"]
    queued = [first.client.post("/v1/videos", json={"prompt": f"q{i}", "seed": 10 + i, "size": "32x32", "frames": 5,
                                                    "steps": 1}).json()["id"] for i in range(3)]
    end = time.monotonic() + 120
    while time.monotonic() < end:
        job = first.client.get(f"/v1/videos/{slow}").json()
        if job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 1:
            break
        time.sleep(0.01)
    assert job["status"] == "running" and job["progress"]["step"] < 50, job
    first.kill()

    second = serve_process(outputs, "--no-ui")
    for job_id in [slow, *queued]:
        assert wait_for(second.client, job_id, timeout=300)["status"] == "done"
    job = second.client.get(f"/v1/videos/{slow}").json()
    assert job["events"] == ["queued", "running", "interrupted", "running", "done"] and job["attempts"] == 2
    assert job["error"] is None
    for job_id in queued:
        job = second.client.get(f"/v1/videos/{job_id}").json()
        assert job["events"] == ["queued", "running", "done"] and job["attempts"] == 1
    for job_id in [slow, *queued]:
        video = read_video(outputs / f"{job_id}.mp4")
        assert len(video) == 5 and video.size == (32, 32)
    assert not list(outputs.glob(".*.partial"))  # nothing half-written is left
