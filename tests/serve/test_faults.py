"""Faults of the shared queue: a worker that dies between its accepted result and the renames,
an outputs folder of another queue, a worker's dropped database connection, a worker for a
model no API serves, and 3 workers + an API restarted under load (every job done once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import av
import pytest
from fastapi.testclient import TestClient

from wanx.serve.jobs import JobQueue, check_outputs
from wanx.serve.queue import open_queue

from tests.test_cli_errors import error_of, no_loading  # noqa: F401 (no_loading: a fixture)

# A worker that makes one job's video and dies (os._exit: no `finally`, as SIGKILL) at the
# first rename to a final name (<id>.json), which comes after its `finish` was accepted.
CRASH_AFTER_FINISH = textwrap.dedent("""
    import os, sys
    import numpy as np
    from wanx.serve import jobs
    from wanx.video import Video

    replace = os.replace

    def rename_or_die(src, dst):
        if not os.path.basename(dst).startswith("."):  # temporary and attempt names start with a dot
            os._exit(9)
        replace(src, dst)

    os.replace = rename_or_die
    queue = jobs.JobQueue(sys.argv[1], lambda job, on_step: Video(np.full((3, 16, 16, 3), 90, np.uint8), 16, {}),
                          url=sys.argv[2], model="tiny", worker_id="crasher")
    job = queue._claim()
    queue._run(job)
    """)


def _crash_after_finish(folder: Path, url: str) -> None:
    done = subprocess.run([sys.executable, "-c", CRASH_AFTER_FINISH, str(folder), url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_a_result_accepted_but_not_renamed_is_served_and_completed(make_server, tmp_path):
    from wanx.serve.app import create_app

    folder = tmp_path / "out"
    server = make_server(folder)
    url = f"sqlite:///{folder / 'jobs.sqlite'}"
    job_id = server.queue.submit({"prompt": "x"})
    _crash_after_finish(folder, url)
    assert open_queue(url).get(job_id)["status"] == "done"
    assert not (folder / f"{job_id}.mp4").exists()  # the crash came before the renames
    with TestClient(create_app(server, ui=False, worker=False), base_url="http://localhost") as client:
        answer = client.get(f"/v1/videos/{job_id}/content")
        assert answer.status_code == 200, answer.text
    assert _frames(folder / f"{job_id}.mp4") == 3 and (folder / f"{job_id}.json").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no attempt's file left

    # the same crash again; this time a worker starting on the folder completes it
    second = server.queue.submit({"prompt": "y"})
    _crash_after_finish(folder, url)
    assert not (folder / f"{second}.mp4").exists()
    JobQueue(folder, lambda job, on_step: None, url=url, model="tiny", worker_id="next").stop()
    assert _frames(folder / f"{second}.mp4") == 3 and (folder / f"{second}.json").is_file()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_queue(request, tmp_path):
    """new_queue() -> the URL of a fresh queue, kept outside any outputs folder (as a shared one is)."""
    made = []

    def new() -> str:
        made.append(None)
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path}/queue{len(made)}.sqlite"
        return request.getfixturevalue("postgres_server")()

    return new


def _runner(job, on_step):
    raise AssertionError("no job runs in these tests")


def test_an_outputs_folder_belongs_to_one_queue(new_queue, tmp_path):
    first, other = new_queue(), new_queue()
    a, b = tmp_path / "a", tmp_path / "b"
    JobQueue(a, _runner, url=first, model="tiny").stop()  # the first on the queue: a is its folder now
    queue_id = open_queue(first).queue_id
    assert (a / "wanx-queue").read_text().strip() == queue_id
    JobQueue(a, _runner, url=first, model="tiny", worker_id="w2").stop()  # the same folder again: fine
    with pytest.raises(ValueError, match=rf"--outputs {b} has no wanx-queue file but queue .* is in use "
                                         rf"\(its results go to .*:{a}\); give every wanx serve and wanx worker"):
        JobQueue(b, _runner, url=first, model="tiny")
    with pytest.raises(ValueError, match=rf"--outputs {a} holds the results of queue {queue_id} \(its wanx-queue "
                                         rf"file\), not of --queue .* \({open_queue(other).queue_id}\)"):
        JobQueue(a, _runner, url=other, model="tiny")
    assert not (b / "wanx-queue").exists()


def test_a_queue_with_jobs_from_before_needs_its_folder_named(new_queue, tmp_path):
    url = new_queue()
    open_queue(url).submit({"prompt": "x"}, model="tiny")  # a queue in use before the markers
    with pytest.raises(ValueError, match="it has jobs from before its outputs were recorded") as refused:
        JobQueue(tmp_path / "c", _runner, url=url, model="tiny")
    fix = str(refused.value).split("write the queue's id in it: ")[1]
    subprocess.run(fix, shell=True, check=True)  # echo <id> > c/wanx-queue, as the message says
    JobQueue(tmp_path / "c", _runner, url=url, model="tiny").stop()


def test_the_folders_own_queue_needs_no_marker_but_refuses_a_foreign_one(new_queue, tmp_path):
    url = new_queue()
    JobQueue(tmp_path / "a", _runner, url=url, model="tiny").stop()
    queue = JobQueue(tmp_path / "own", _runner, model="tiny")  # the default: the folder's jobs.sqlite
    queue.submit({"prompt": "x"})
    queue.stop()
    JobQueue(tmp_path / "own", _runner, model="tiny").stop()  # its jobs, its folder: no marker needed
    assert not (tmp_path / "own" / "wanx-queue").exists()
    (tmp_path / "own" / "wanx-queue").write_text((tmp_path / "a" / "wanx-queue").read_text())
    with pytest.raises(ValueError, match="holds the results of queue"):
        JobQueue(tmp_path / "own", _runner, model="tiny")


def test_serve_and_worker_refuse_another_queues_folder_in_one_line(tiny, new_queue, tmp_path, capsys, no_loading):
    from .conftest import free_port

    first, other = new_queue(), new_queue()
    (tmp_path / "a").mkdir()
    check_outputs(first, tmp_path / "a", api_models=["tiny"])  # `wanx serve --queue first --outputs a` did this
    (tmp_path / "b").mkdir()
    worker = ["worker", "--model", "tiny", "--device", "cpu", "--queue", first, "--outputs", str(tmp_path / "b")]
    assert f"--outputs {tmp_path / 'b'} has no wanx-queue file" in error_of(capsys, worker)
    serve = ["serve", "--model", "tiny", "--device", "cpu", "--port", str(free_port()), "--queue", other,
             "--outputs", str(tmp_path / "a")]
    assert f"--outputs {tmp_path / 'a'} holds the results of queue" in error_of(capsys, serve)


def test_a_worker_for_a_model_no_api_accepts_is_refused(tiny, new_queue, tmp_path, capsys, no_loading):
    url = new_queue()
    outputs = tmp_path / "out"
    outputs.mkdir()
    check_outputs(url, outputs, worker_model="tiny")  # no API yet: allowed (the worker's loop says so, below)
    worker = JobQueue(outputs, _runner, url=url, model="tiny", worker_id="early")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    worker.run_forever()  # until the signal
    assert "wanx worker: no wanx serve has registered on queue" in capsys.readouterr().err
    check_outputs(url, outputs, api_models=["tiny-i2v"])  # `wanx serve --model tiny-i2v` on this queue
    worker = ["worker", "--model", "tiny", "--device", "cpu", "--queue", url, "--outputs", str(outputs)]
    assert "--model tiny: the API on queue" in error_of(capsys, worker)
    assert "accepts jobs only for tiny-i2v; start this worker with one of those" in error_of(capsys, worker)


def test_a_stopped_api_takes_its_models_off_the_queue(tiny, tmp_path):
    """A worker is held to the models of the APIs that run, not of one that has stopped (before:
    its entry stayed until another API on the same host and folder replaced it)."""
    from .conftest import ServeProcess

    outputs = tmp_path / "out"
    outputs.mkdir()
    url = f"sqlite:///{outputs / 'jobs.sqlite'}"
    api = ServeProcess(outputs, "--workers", "0", "--no-ui", "--queue", url)
    queue = open_queue(url)
    try:
        assert queue.api_models() == {"tiny"}
    finally:
        api.close()
    try:
        assert api.proc.returncode == 0  # SIGTERM is a clean stop (before: -15, killed by uvicorn's re-raise)
        assert queue.api_models() == set()
    finally:
        queue.close()


def test_a_dropped_connection_mid_job_costs_the_job_nothing(postgres_server, tmp_path):
    """pg_terminate_backend on the worker's connections (found by its application_name) between
    two steps: the next heartbeat meets the dead connection, opens a new one, and the job goes
    on to done, once; as do a drop just before its finish and one while it waits for work."""
    import numpy as np
    import psycopg

    from wanx.video import Video

    url = postgres_server()

    def drop() -> int:
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
            return len(admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE application_name = 'dropped-worker'").fetchall())

    def runner(job, on_step):
        for step in (1, 2, 3):
            time.sleep(1.05)  # each step's on_step renews the lease (at most once a second)
            if step == 2:
                assert drop() == 1  # the one connection this worker's thread has
            on_step(step, 3, None)
        assert drop() == 1  # the finish meets a dead connection too
        return Video(np.full((3, 16, 16, 3), 50, np.uint8), 16, {})

    worker = JobQueue(tmp_path, runner, url=url, model="tiny", worker_id="dropped-worker")
    try:
        job_id = worker.submit({"prompt": "x"})
        worker._run(worker._claim())
        job = worker.get(job_id)
        assert job["status"] == "done" and job["attempts"] == 1, job
        assert job["events"] == ["queued", "running", "done"]
        assert _frames(tmp_path / f"{job_id}.mp4") == 3
        assert drop() == 1
        assert worker._claim() is None  # idle: the next claim reconnects too
    finally:
        worker.stop()


def test_a_drop_inside_a_heartbeat_gives_the_job_back_and_it_runs_once(postgres_server, tmp_path):
    """The drop lands while the heartbeat's UPDATE runs (held there by a row lock another session
    takes): the heartbeat fails, the job is given back (not failed), and its next run is its only result."""
    import threading

    import numpy as np
    import psycopg

    from wanx.video import Video

    url = postgres_server()
    runs = []

    def drop_while_waiting(locker) -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            end = time.monotonic() + 30
            while time.monotonic() < end:
                waiting = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'w-drop' "
                                        "AND wait_event_type = 'Lock'").fetchall()
                if waiting:
                    admin.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
                    break
                time.sleep(0.02)
        locker.rollback()

    def runner(job, on_step):
        runs.append(job["id"])
        time.sleep(1.05)
        if len(runs) == 1:
            locker = psycopg.connect(url)  # not autocommit: the lock is held until its rollback
            locker.execute("SELECT 1 FROM wanx_jobs WHERE id = %s FOR UPDATE", (job["id"],))
            dropper = threading.Thread(target=drop_while_waiting, args=(locker,))
            dropper.start()
            try:
                on_step(1, 1, None)  # the heartbeat waits on the lock, then its connection is dropped
            finally:
                dropper.join()
                locker.close()
        return Video(np.full((3, 16, 16, 3), 50, np.uint8), 16, {"run": len(runs)})

    worker = JobQueue(tmp_path, runner, url=url, model="tiny", worker_id="w-drop")
    try:
        job_id = worker.submit({"prompt": "x"})
        worker._run(worker._claim())
        job = worker.get(job_id)
        assert job["status"] == "queued" and job["attempts"] == 0, job  # given back, not failed
        worker._run(worker._claim())
        job = worker.get(job_id)
        assert job["status"] == "done" and job["events"] == ["queued", "running", "queued", "running", "done"]
        assert runs == [job_id, job_id] and job["settings"]["run"] == 2
        assert sorted(p.name for p in tmp_path.glob(f"*{job_id}*")) == [f"{job_id}.json", f"{job_id}.mp4"]
    finally:
        worker.stop()


@pytest.mark.load
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_three_workers_sixty_jobs_an_api_restart_and_a_dropped_connection(tiny, tmp_path, backend, request):
    """3 `wanx worker`s and `wanx serve --workers 0` on one queue, 60 jobs; meanwhile one worker's
    connection is dropped mid-job (PostgreSQL) and the API is restarted (SIGTERM, then again on the
    same queue and folder). Every job is done once, by one finisher, with a complete mp4; nothing
    stray is left. SQLite: a queue file outside the outputs folder, as a shared one would be."""
    import psycopg

    from .conftest import FAST, ServeProcess, wait_for
    from .test_workers import _start_worker, _wait

    outputs = tmp_path / "outputs"
    url = request.getfixturevalue("postgres_server")() if backend == "postgresql" else \
        f"sqlite:///{tmp_path / 'queue.sqlite'}"
    outputs.mkdir()
    env = {**os.environ, "WANX_LEASE_S": "30", "GRADIO_ANALYTICS_ENABLED": "False"}  # live = seen within a lease
    api = ServeProcess(outputs, "--workers", "0", "--no-ui", "--queue", url, env=env)
    workers = [_start_worker(outputs, url, env) for _ in range(3)]
    queue = open_queue(url)
    request = {**FAST, "steps": 1}  # 60 jobs on 2 shared cores: the least that makes a video

    def submit(client, n: int) -> str:
        answer = client.post("/v1/videos", json={"prompt": f"job {n}", "seed": n, **request})
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    try:
        _wait(lambda: len(queue.workers(max_age=30)) == 3 or any(w.poll() is not None for w in workers), 240,
              "three workers registered")
        assert all(w.poll() is None for w in workers), "a worker exited"
        ids = [submit(api.client, n) for n in range(30)]
        running = _wait(lambda: next((j for j in queue.list(status="running") if j["worker_id"]), None), 60,
                        "a job runs")
        if backend == "postgresql":
            with psycopg.connect(url, autocommit=True) as admin:  # that worker's connection, cut mid-job
                assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE application_name = %s", (running["worker_id"],)).fetchall()
        api.close()  # SIGTERM
        assert "Application shutdown complete" in Path(api.log.name).read_text()  # uvicorn re-raises the signal
        api = ServeProcess(outputs, "--workers", "0", "--no-ui", "--queue", url, env=env)
        ids += [submit(api.client, n) for n in range(30, 60)]
        jobs = [wait_for(api.client, job_id, timeout=240) for job_id in ids]
        assert [job["status"] for job in jobs] == ["done"] * 60
        listed = api.client.get("/v1/videos", params={"limit": 1000}).json()
        assert sorted(job["id"] for job in listed["videos"]) == sorted(ids) and listed["counts"]["done"] == 60
        assert all(w.poll() is None for w in workers), "a worker exited"
        for job_id in ids:
            row = queue.get(job_id)
            assert [status for status, _ in row["events"]].count("done") == 1 and row["attempts"] == 1, row
            assert row["result"]["files"]["video"].startswith(f".{job_id}.")
            assert json.loads((outputs / f"{job_id}.json").read_text())["id"] == job_id
            assert _frames(outputs / f"{job_id}.mp4") == request["frames"]
        made = tuple(f"{job_id}{suffix}" for job_id in ids for suffix in (".mp4", ".json"))
        folders = ("inputs", "previews")  # each job's uploads and its preview while it runs: gone once it ends
        assert sorted(p.name for p in outputs.iterdir() if p.name not in made + folders) == ["serve.lock", "wanx-queue"]
        assert [p for folder in folders if (outputs / folder).is_dir() for p in (outputs / folder).iterdir()] == []
    finally:
        queue.close()
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)
        api.close()


def test_a_worker_waits_while_the_queue_is_away_then_goes_on(postgres_server, tmp_path, capfd):
    """The database refuses connections for a while (a restart, a failover): the worker's loop
    says so once and keeps trying, instead of its thread dying; then it runs the next job."""
    import numpy as np
    import psycopg

    from wanx.video import Video

    url = postgres_server()
    name = url.rsplit("/", 1)[1]
    worker = JobQueue(tmp_path, lambda job, on_step: Video(np.zeros((3, 16, 16, 3), np.uint8), 16, {}), url=url,
                      model="tiny", worker_id="w-away")
    other = open_queue(url)
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        try:
            worker.start()
            time.sleep(0.5)
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'w-away'")
            time.sleep(3)  # claims fail: cannot connect
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            job_id = other.submit({"prompt": "x"}, model="tiny")
            end = time.monotonic() + 30
            while other.get(job_id)["status"] != "done" and time.monotonic() < end:
                time.sleep(0.1)
            assert other.get(job_id)["status"] == "done" and worker._thread.is_alive()
            assert capfd.readouterr().err.count("waits for the queue") == 1
        finally:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            other.close()
            worker.stop()


def test_completing_moves_only_an_attempts_own_file(tmp_path):
    """The row names the files to complete; a name that is not one of this job's attempts (a path,
    another job's file) is never moved, whoever wrote the row."""
    folder = tmp_path / "out"
    queue = JobQueue(folder, _runner, model="tiny", worker_id="w")
    try:
        job_id, other = queue.submit({"prompt": "x"}), queue.submit({"prompt": "y"})
        (tmp_path / "outside.mp4").write_bytes(b"not yours")
        (folder / f".{other}.abc-1.mp4").write_bytes(b"another job's")
        assert queue._queue.claim("w", ["tiny"], 60)["id"] == job_id
        assert queue._queue.finish(job_id, "w", "done", settings={}, result={"files": {
            "video": "../outside.mp4", "settings": f".{other}.abc-1.mp4"}})
        assert queue.get(job_id)["status"] == "done"
        assert (tmp_path / "outside.mp4").exists() and (folder / f".{other}.abc-1.mp4").exists()
        assert not (folder / f"{job_id}.mp4").exists() and not (folder / f"{job_id}.json").exists()
    finally:
        queue.stop()
