"""Operations: /healthz, /readyz, /metrics on the real app over the tiny model, and `wanx jobs`."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from .conftest import FAST, wait_for

TOKEN = "s3cret-token"


def _app(server, **options):
    from wanx.serve.app import create_app

    return create_app(server, ui=False, **options)


def test_healthz_public_readyz_and_metrics_behind_the_token(make_server):
    server = make_server(token=TOKEN)
    with TestClient(_app(server), base_url="http://localhost") as client:
        assert client.get("/healthz").status_code == 200  # a probe has no token
        assert client.get("/readyz").status_code == 401
        assert client.get("/metrics").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/readyz", headers=auth).json() == {"status": "ready"}
        assert client.get("/metrics", headers=auth).status_code == 200


def test_readyz_503_with_the_reason(make_server):
    server = make_server()
    # no worker thread: closing the connections under a thread that uses one would crash SQLite
    with TestClient(_app(server, worker=False), base_url="http://localhost") as client:
        assert client.get("/readyz").status_code == 200
        server.queue._queue.close()
        server.queue._queue._db.path.unlink()  # the database's file gone and its folder with it: no answer
        server.queue._queue._db.path = server.outputs / "gone" / "jobs.sqlite"
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.json()["detail"].startswith("the queue does not answer")
        assert client.get("/healthz").status_code == 200  # alive all the same


def test_readyz_503_when_the_worker_is_not_running(make_server):
    server = make_server()
    with TestClient(_app(server), base_url="http://localhost") as client:
        server.queue.stop()
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.json()["detail"] == "this server's worker is not running"
    # an API-only app (no worker in this process) is ready without one
    with TestClient(_app(make_server(), worker=False), base_url="http://localhost") as client:
        assert client.get("/readyz").status_code == 200


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_after_jobs_ran_on_the_tiny_model(make_server):
    server = make_server()
    with TestClient(_app(server), base_url="http://localhost") as client:
        ids = [client.post("/v1/videos", json={"prompt": "a cat", "seed": i, **FAST}).json()["id"] for i in range(2)]
        ids.append(client.post("/v1/videos", json={"prompt": "a dog", **FAST}).json()["id"])
        for job_id in ids:
            assert wait_for(client, job_id)["status"] == "done"
        samples = _samples(client.get("/metrics").text)
    assert samples[("wanx_queue_jobs", (("model", "tiny"), ("status", "done")))] == 3
    assert samples[("wanx_workers", (("model", "tiny"),))] == 1
    done = (("model", "tiny"), ("status", "done"), ("worker", server.queue.worker_id))
    assert samples[("wanx_job_seconds_count", done)] == 3
    assert 0 < samples[("wanx_job_seconds_sum", done)] < 600
    buckets = {dict(labels)["le"]: n for (name, labels), n in samples.items()
               if name == "wanx_job_seconds_bucket" and dict(labels)["status"] == "done"}
    assert buckets[max(buckets, key=float)] == 3 and float(max(buckets, key=float)) == float("inf")
    assert samples[("wanx_job_failures_total", (("model", "tiny"), ("worker", server.queue.worker_id)))] == 0
    # CPU: no GPU memory, of this process or of a worker
    assert not any(name.startswith(("wanx_gpu", "wanx_worker_gpu")) for name, _ in samples)


def _fail_when_asked(server, app, error: str) -> None:
    """The server's runner, failing with RuntimeError(error) a job whose prompt is "fail"."""
    original = server.queue.runner.unwrapped

    def failing(job, on_step):
        if job["request"]["prompt"] == "fail":
            raise RuntimeError(error)
        return original(job, on_step)

    server.queue.runner = app.state.metrics.timed(failing)


def test_metrics_count_a_failed_job(make_server):
    server = make_server()
    app = _app(server)
    _fail_when_asked(server, app, "out of memory")
    with TestClient(app, base_url="http://localhost") as client:
        bad = client.post("/v1/videos", json={"prompt": "fail", **FAST}).json()["id"]
        assert wait_for(client, bad)["status"] == "failed"
        samples = _samples(client.get("/metrics").text)
    worker = ("worker", server.queue.worker_id)
    assert samples[("wanx_job_failures_total", (("model", "tiny"), worker))] == 1
    assert samples[("wanx_job_seconds_count", (("model", "tiny"), ("status", "failed"), worker))] == 1
    assert samples[("wanx_queue_jobs", (("model", "tiny"), ("status", "failed")))] == 1


def test_two_apps_over_one_server_count_each_job_once(make_server):
    server = make_server()
    _app(server, worker=False)  # its own registry; its wrapper replaced, not wrapped again
    with TestClient(_app(server), base_url="http://localhost") as client:
        job_id = client.post("/v1/videos", json={"prompt": "a cat", **FAST}).json()["id"]
        assert wait_for(client, job_id)["status"] == "done"
        samples = _samples(client.get("/metrics").text)
    done = (("model", "tiny"), ("status", "done"), ("worker", server.queue.worker_id))
    assert samples[("wanx_job_seconds_count", done)] == 1


# -- wanx jobs: the queue from a shell --------------------------------------------------------


def _jobs(capsys, *argv) -> tuple[int, str, str]:
    from wanx.cli import main

    code = main(["jobs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def url(tmp_path):
    from wanx.serve.queue import open_queue

    url = f"sqlite:///{tmp_path}/jobs.sqlite"
    queue = open_queue(url)
    queue.close()
    return url


def test_jobs_list_cancel_retry(capsys, url):
    from wanx.serve.queue import open_queue

    queue = open_queue(url)
    waiting, failed, running = (queue.submit({"prompt": str(i)}, model="tiny") for i in range(3))
    queue.cancel(waiting)
    job = queue.claim("w", ["tiny"], 60)
    queue.finish(job["id"], "w", "failed", error="RuntimeError: out of memory")
    queue.claim("w", ["tiny"], 60)
    code, out, _ = _jobs(capsys, "--queue", url, "list")
    lines = out.splitlines()
    assert code == 0 and [line.split()[:3] for line in lines] == [
        [running, "running", "tiny"], [failed, "failed", "tiny"], [waiting, "cancelled", "tiny"]]
    assert lines[1].endswith("attempts 1  RuntimeError: out of memory")
    code, out, _ = _jobs(capsys, "--queue", url, "list", "--status", "failed")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [failed]
    assert _jobs(capsys, "--queue", url, "cancel", running)[1] == f"{running}  cancelling (stops at its next step)\n"
    assert queue.get(running)["cancel"]
    assert _jobs(capsys, "--queue", url, "retry", failed)[1] == f"{failed}  queued\n"
    assert queue.get(failed)["status"] == "queued" and queue.get(failed)["attempts"] == 0
    queue.close()


@pytest.mark.parametrize("argv, words", [
    (["retry", "feedface"], "no job 'feedface' in sqlite:///"),
    (["cancel", "feedface"], "no job 'feedface' in sqlite:///"),
    (["list", "--limit", "0"], "--limit must be >= 1, got 0"),
])
def test_jobs_errors_are_one_line(capsys, url, argv, words):
    code, _, err = _jobs(capsys, "--queue", url, *argv)
    assert code == 2 and err.startswith(f"wanx: error: {words}") and err.count("\n") == 1, err


def test_jobs_refuses_ended_jobs_and_missing_queues(capsys, url, tmp_path):
    from wanx.serve.queue import open_queue

    queue = open_queue(url)
    done, uploaded = queue.submit({}, model="m"), queue.submit({}, inputs={"image": "x-image.png"}, model="m")
    for _ in range(2):
        job = queue.claim("w", ["m"], 60)
        queue.finish(job["id"], "w", "done" if job["id"] == done else "failed")
    queue.close()
    for argv, words in ((["retry", done], f"job {done} is done: only a failed, cancelled or interrupted job"),
                        (["cancel", done], f"job {done} is done: nothing to cancel"),
                        (["retry", uploaded], f"job {uploaded} had uploaded files (image), deleted when it ended"),
                        (["--queue", f"sqlite:///{tmp_path}/none.sqlite", "list"], "--queue sqlite:///"),
                        (["--queue", "postgresql://wanx@127.0.0.1:1/none", "list"],
                         "queue postgresql://wanx@127.0.0.1:1/none: cannot connect")):
        code, _, err = _jobs(capsys, *(argv if argv[0] == "--queue" else ["--queue", url, *argv]))
        assert code == 2 and err.startswith(f"wanx: error: {words}") and err.count("\n") == 1, err
    assert not (tmp_path / "none.sqlite").exists()  # a wrong path made no empty queue


def test_jobs_loads_no_torch(url):
    import subprocess
    import sys

    code = f"import sys; from wanx.cli import main; main(['jobs', '--queue', {url!r}, 'list']); " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_each_job_logs_a_start_and_an_end_line_with_its_id(make_server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="wanx.serve")
    server = make_server()
    app = _app(server)
    _fail_when_asked(server, app, 'out of "memory"\nat step 1')
    with TestClient(app, base_url="http://localhost") as client:
        good = client.post("/v1/videos", json={"prompt": "a cat", **FAST}).json()["id"]
        bad = client.post("/v1/videos", json={"prompt": "fail", **FAST}).json()["id"]
        assert wait_for(client, good)["status"] == "done" and wait_for(client, bad)["status"] == "failed"
    lines = [r.getMessage() for r in caplog.records if r.name == "wanx.serve"]
    assert lines[0] == f"job={good} model=tiny event=start attempt=1"
    assert lines[1].startswith(f"job={good} model=tiny event=end status=done seconds=")
    assert lines[2] == f"job={bad} model=tiny event=start attempt=1"
    assert lines[3].startswith(f"job={bad} model=tiny event=end status=failed seconds=")
    assert lines[3].endswith(r' error="RuntimeError: out of \"memory\" at step 1"') and len(lines) == 4


def test_wanx_serve_logs_its_jobs_and_answers_the_probes(serve_process):
    process = serve_process(None, "--no-ui", token=TOKEN)
    assert httpx.get(f"{process.url}/healthz").status_code == 200  # no token
    assert process.client.get("/readyz").status_code == 200
    job_id = process.client.post("/v1/videos", json={"prompt": "a cat", **FAST}).json()["id"]
    assert wait_for(process.client, job_id)["status"] == "done"
    assert "wanx_queue_jobs{" in process.client.get("/metrics").text
    for _ in range(50):  # the end line is written as the job ends, the status a moment later
        if f"job={job_id} model=tiny event=end status=done" in process.output():
            break
        time.sleep(0.1)
    assert f"job={job_id} model=tiny event=start attempt=1" in process.output()
    assert f"job={job_id} model=tiny event=end status=done" in process.output()
