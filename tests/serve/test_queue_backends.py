"""wanx.serve.queue: the same tests on SQLite and on a real PostgreSQL server (tests/serve/conftest.py
starts one per session; these cases skip, saying why, when none can start)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import wanx
from wanx.serve.queue import QueueError, open_queue

from tests.test_cli_errors import error_of, no_loading  # noqa: F401 (a fixture)

from .conftest import free_port


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.sqlite"
    return request.getfixturevalue("postgres_server")()


@pytest.fixture
def queue(queue_url):
    q = open_queue(queue_url, max_attempts=2)
    yield q
    q.close()


def test_claims_follow_priority_then_submission(queue):
    low1 = queue.submit({"prompt": "a"}, model="m")
    high1 = queue.submit({"prompt": "b"}, model="m", priority=5)
    low2 = queue.submit({"prompt": "c"}, model="m")
    high2 = queue.submit({"prompt": "d"}, model="m", priority=5)
    order = [queue.claim("w", ["m"], 60)["id"] for _ in range(4)]
    assert order == [high1, high2, low1, low2]
    assert queue.claim("w", ["m"], 60) is None
    job = queue.get(high1)
    assert job["status"] == "running" and job["worker_id"] == "w" and job["attempts"] == 1
    assert job["request"] == {"prompt": "b"}


def test_concurrent_claimers_never_share_a_job(queue):
    ids = {queue.submit({"n": i}, model="m") for i in range(40)}
    claimed: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def claimer(k: int) -> None:
        start.wait()
        while (job := queue.claim(f"w{k}", ["m"], 60)) is not None:  # each thread: its own connection
            claimed[k].append(job["id"])
            assert queue.finish(job["id"], f"w{k}", "done", result={"by": k})

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [job_id for ids_k in claimed for job_id in ids_k]
    assert sorted(every) == sorted(ids)  # each job claimed exactly once
    for k, ids_k in enumerate(claimed):
        for job_id in ids_k:
            assert queue.get(job_id)["result"] == {"by": k}
    assert queue.counts()["status"] == {"done": 40}


CLAIMER = """
import json, sys
from wanx.serve.queue import open_queue
queue, name, got = open_queue(sys.argv[1]), sys.argv[2], []
while (job := queue.claim(name, ["m"], 60)) is not None:
    got.append(job["id"])
    assert queue.finish(job["id"], name, "done", result={"by": name})
print(json.dumps(got))
"""


def test_claimer_processes_never_share_a_job(queue, queue_url):
    """Three worker processes on one database (SQLite: the WAL file; PostgreSQL: row locks)."""
    ids = {queue.submit({"n": i}, model="m") for i in range(30)}
    env = {**os.environ, "PYTHONPATH": str(Path(wanx.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, queue_url, f"p{k}"], stdout=subprocess.PIPE,
                              text=True, env=env) for k in range(3)]
    got = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(job_id for each in got for job_id in each) == sorted(ids)
    for k, each in enumerate(got):
        assert all(queue.get(job_id)["result"] == {"by": f"p{k}"} for job_id in each)


def test_an_expired_lease_is_requeued_then_failed_after_max_attempts(queue):
    job_id = queue.submit({}, model="m")
    assert queue.claim("dead1", ["m"], 0.05)["id"] == job_id
    time.sleep(0.1)
    assert queue.heartbeat(job_id, "dead1", 0.05) == "running"  # not yet reaped: still its lease
    time.sleep(0.1)
    again = queue.claim("dead2", ["m"], 0.05)  # the claim re-queues the expired job first
    assert again["id"] == job_id and again["attempts"] == 2
    assert queue.heartbeat(job_id, "dead1", 60) == "lost"
    time.sleep(0.1)
    assert queue.claim("w3", ["m"], 60) is None  # the second loss hits max_attempts=2
    job = queue.get(job_id)
    assert job["status"] == "failed" and job["error"].startswith("worker lost 2 times")


def test_a_job_cancelled_while_its_worker_dies_stays_cancelled(queue):
    job_id = queue.submit({}, model="m")
    queue.claim("dead", ["m"], 0.05)
    queue.cancel(job_id)
    time.sleep(0.1)
    assert queue.claim("w", ["m"], 60) is None  # not re-run: it was cancelled
    assert queue.get(job_id)["status"] == "cancelled"


def test_a_late_finisher_is_refused_and_its_result_not_recorded(queue):
    job_id = queue.submit({}, model="m")
    queue.claim("slow", ["m"], 0.05)
    time.sleep(0.1)
    assert queue.claim("fast", ["m"], 60)["id"] == job_id
    assert queue.finish(job_id, "fast", "done", result={"video": "fast.mp4"}, settings={"seed": 1})
    assert not queue.finish(job_id, "slow", "done", result={"video": "slow.mp4"})
    assert not queue.finish(job_id, "fast", "failed", error="twice")  # finished once, for good
    job = queue.get(job_id)
    assert job["status"] == "done" and job["result"] == {"video": "fast.mp4"} and job["settings"] == {"seed": 1}


def test_cancel_is_seen_by_the_heartbeat_of_a_running_job(queue):
    queued, running = queue.submit({}, model="m"), queue.submit({}, model="m", priority=1)
    assert queue.claim("w", ["m"], 60)["id"] == running
    assert queue.heartbeat(running, "w", 60) == "running"
    assert queue.cancel(queued)["status"] == "cancelled"  # never started: cancelled at once
    after = queue.cancel(running)
    assert after["status"] == "running" and after["cancel"]
    assert queue.heartbeat(running, "w", 60) == "cancelled"
    assert queue.finish(running, "w", "cancelled")
    assert queue.get(running)["status"] == "cancelled"
    assert queue.claim("w", ["m"], 60) is None
    assert queue.cancel("nope") is None


def test_jobs_go_only_to_workers_holding_their_model(queue):
    a = queue.submit({}, model="a")
    b = queue.submit({}, model="b")
    queue.register_worker("wb", ["b"], host="h1")
    queue.register_worker("wac", ["a", "c"], host="h2")
    assert queue.claim("wb", ["b"], 60)["id"] == b
    assert queue.claim("wb", ["b"], 60) is None  # a's job waits for a worker holding a
    assert queue.claim("wac", ["a", "c"], 60)["id"] == a
    assert queue.live_models(max_age=30) == {"a", "b", "c"}
    assert [w["host"] for w in queue.workers()] == ["h2", "h1"]
    queue.unregister_worker("wb")
    assert queue.live_models(max_age=30) == {"a", "c"}
    assert queue.live_models(max_age=-1) == set()  # nobody seen "in the future": stale workers drop out


def test_counts_per_status_and_per_model(queue):
    for model in ("a", "a", "a", "b"):
        queue.submit({}, model=model)
    job = queue.claim("w", ["a"], 60)
    queue.finish(job["id"], "w", "done")
    queue.claim("w", ["b"], 60)
    counts = queue.counts()
    assert counts["status"] == {"queued": 2, "done": 1, "running": 1}
    assert counts["model"] == {"a": {"queued": 2, "done": 1}, "b": {"running": 1}}
    assert [j["model"] for j in queue.list(status="queued")] == ["a", "a"]
    assert len(queue.list(model="a")) == 3 and len(queue.list()) == 4


def test_two_queue_objects_share_one_database(queue_url):
    """The API and a worker in different processes open the same URL: what one writes, the other sees."""
    api, worker = open_queue(queue_url), open_queue(queue_url)
    try:
        job_id = api.submit({"prompt": "x"}, model="m")
        assert worker.claim("w", ["m"], 60)["id"] == job_id
        assert api.get(job_id)["status"] == "running"
    finally:
        api.close()
        worker.close()


def test_bad_urls_are_one_line_errors(tmp_path):
    with pytest.raises(QueueError, match=r"sqlite:///.*/missing/jobs.sqlite: folder .* does not exist"):
        open_queue(f"sqlite:///{tmp_path}/missing/jobs.sqlite")
    with pytest.raises(QueueError, match="unknown kind; give sqlite:///"):
        open_queue("redis://host/0")
    pytest.importorskip("psycopg")
    port = free_port()  # nothing listens there
    with pytest.raises(QueueError) as err:
        open_queue(f"postgresql://alice:s3cret@127.0.0.1:{port}/wanx")
    message = str(err.value)
    assert "\n" not in message and "s3cret" not in message
    assert f"postgresql://alice:***@127.0.0.1:{port}/wanx: cannot connect" in message
    assert "check the server is running" in message


def test_postgres_without_permission_to_create_tables(postgres_server):
    import psycopg

    url = postgres_server()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE ROLE limited LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # already PostgreSQL 15's default
    limited = url.replace("postgres@", "limited:pw@")
    with pytest.raises(QueueError) as err:
        open_queue(limited)
    message = str(err.value)
    assert "\n" not in message and "pw@" not in message
    assert "no permission to create the queue tables" in message
    assert "GRANT CREATE ON SCHEMA public TO limited" in message
    open_queue(url).close()  # created once by a role that may, and granted: the limited role then uses them
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO limited")
        conn.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO limited")
    queue = open_queue(limited)
    try:
        job_id = queue.submit({}, model="m")
        assert queue.claim("w", ["m"], 60)["id"] == job_id
    finally:
        queue.close()


def test_postgres_dropped_connection_is_one_line_then_reconnects(postgres_server):
    """A connection cut while idle (server restart, network, pg_terminate_backend) is replaced at
    the next call's BEGIN, unseen; one cut while a call runs gives that call one QueueError
    (nothing changed), and the next call connects again."""
    import psycopg

    url = postgres_server()
    queue = open_queue(url, name="cut-me")
    try:
        job_id = queue.submit({}, model="m")
        with psycopg.connect(url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE application_name = 'cut-me'").fetchall() == [(True,)]
        assert queue.claim("w", ["m"], 60)["id"] == job_id  # cut while idle: a new connection, unseen
        failed = []

        def cancel():
            try:
                queue.cancel(job_id)
            except QueueError as err:
                failed.append(str(err))

        with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as admin:
            locker.execute("SELECT 1 FROM wanx_jobs WHERE id = %s FOR UPDATE", (job_id,))
            thread = threading.Thread(target=cancel)
            thread.start()  # its SELECT ... FOR UPDATE waits for the locker
            while not admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                    "application_name = 'cut-me' AND wait_event_type = 'Lock'").fetchall():
                time.sleep(0.02)
            thread.join(30)
            locker.rollback()
        assert len(failed) == 1 and "\n" not in failed[0], failed
        assert re.search(r"postgresql://postgres@.*: lost the connection .*nothing was changed", failed[0])
        job = queue.get(job_id)
        assert job["status"] == "running" and not job["cancel"]  # the cut cancel changed nothing
        assert queue.cancel(job_id)["cancel"]
    finally:
        queue.close()


def statuses(job: dict) -> list[str]:
    return [status for status, _ in job["events"]]


def test_every_move_is_in_the_events(queue):
    done, cancelled = queue.submit({}, model="m"), queue.submit({}, model="m")
    queue.claim("w", ["m"], 60)
    queue.finish(done, "w", "done")
    queue.cancel(cancelled)
    assert statuses(queue.get(done)) == ["queued", "running", "done"]
    assert statuses(queue.get(cancelled)) == ["queued", "cancelled"]
    times = [t for _, t in queue.get(done)["events"]]
    assert times == sorted(times)


def test_a_released_job_runs_again_as_if_never_started(queue):
    job_id = queue.submit({}, model="m")
    queue.claim("w", ["m"], 60)
    assert not queue.release(job_id, "other")  # only the holder gives it back
    assert queue.release(job_id, "w")
    job = queue.get(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["worker_id"] is None
    assert queue.claim("w2", ["m"], 60)["attempts"] == 1


def test_a_restarted_worker_interrupts_its_jobs_which_run_again_while_attempts_last(queue):
    """max_attempts=2: run, crash (interrupted), run again, crash: left interrupted, not run a third time."""
    job_id, cancelled = queue.submit({}, model="m"), queue.submit({}, model="m")
    queue.claim("serve", ["m"], 600)
    queue.claim("serve", ["m"], 600)
    queue.cancel(cancelled)  # asked while running; the worker died before it saw it
    assert sorted(queue.interrupt("serve", "the server stopped while this job ran")) == sorted([job_id, cancelled])
    assert queue.get(cancelled)["status"] == "cancelled"
    job = queue.get(job_id)
    assert job["status"] == "interrupted" and job["error"] == "the server stopped while this job ran"
    again = queue.claim("serve", ["m"], 600)
    assert again["id"] == job_id and again["attempts"] == 2 and again["error"] is None
    queue.interrupt("serve", "again")
    assert queue.claim("serve", ["m"], 600) is None
    assert statuses(queue.get(job_id)) == ["queued", "running", "interrupted", "running", "interrupted"]
    assert queue.interrupt("nobody", "x") == []


def test_interrupted_jobs_can_be_cancelled_and_over_jobs_deleted(queue):
    job_id, running = queue.submit({}, model="m"), queue.submit({}, model="m")
    queue.claim("serve", ["m"], 600)
    queue.interrupt("serve", "stopped")
    assert queue.cancel(job_id)["status"] == "cancelled"
    queue.claim("w", ["m"], 60)
    with pytest.raises(ValueError, match=f"job {running} is running: cancel it first"):
        queue.delete(running)
    assert queue.delete(job_id) and queue.get(job_id) is None
    assert not queue.delete(job_id)


# -- wanx serve on the queue: its JobQueue is one claimer of it ------------------------------


def test_serve_runs_its_jobs_through_the_queue_at_any_url(make_server, queue_url):
    """`wanx serve --queue URL`: the job lands in that queue for the server's model and its
    in-process worker runs it there (SQLite elsewhere than the outputs, or PostgreSQL)."""
    server = make_server(queue_url=queue_url)
    server.queue.start()
    job_id = server.submit({"prompt": "a cat", "size": "32x32", "frames": 1, "steps": 1})
    assert server.queue.wait_idle(120)
    queue = open_queue(queue_url)
    try:
        job = queue.get(job_id)
        assert job["model"] == "tiny" and job["status"] == "done", job
        assert [s for s, _ in job["events"]] == ["queued", "running", "done"]
        assert job["worker_id"] == server.queue.worker_id
        assert queue.live_models(max_age=60) == {"tiny"}  # its worker is registered while it runs
    finally:
        queue.close()
    assert server.queue.output_path(job_id).exists()
    assert not (server.outputs / "jobs.sqlite").exists()  # the queue is where the URL says


def test_serve_refuses_a_bad_queue_url_before_the_model_loads(capsys, no_loading, tmp_path):
    port = free_port()
    url = f"postgresql://bob:hunter22@127.0.0.1:{free_port()}/wanx"
    err = error_of(capsys, ["serve", "--model", "tiny", "--no-ui", "--port", str(port), "--outputs",
                            str(tmp_path / "out"), "--queue", url])
    assert "cannot connect" in err and "hunter22" not in err and "postgresql://bob:***@127.0.0.1" in err
    err = error_of(capsys, ["serve", "--model", "tiny", "--no-ui", "--port", str(port), "--outputs",
                            str(tmp_path / "out"), "--queue", "mysql://x/y"])
    assert err == "wanx: error: queue 'mysql://x/y': unknown kind; give sqlite:///path/jobs.sqlite or " \
                  "postgresql://user@host/database"


OLD_TABLE = """CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
    request TEXT NOT NULL, inputs TEXT NOT NULL DEFAULT '{}', settings TEXT, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, events TEXT NOT NULL DEFAULT '[]', cancel INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, started REAL, finished REAL)"""


def test_an_outputs_folder_from_before_keeps_its_jobs(tmp_path):
    """A folder whose jobs.sqlite has the old `jobs` table: its jobs move into the queue once,
    in their order; the one that was running when that server died is interrupted and runs again."""
    import sqlite3

    from wanx.serve.jobs import JobQueue

    with sqlite3.connect(tmp_path / "jobs.sqlite") as db:
        db.execute(OLD_TABLE)
        for job_id, status, events in (("aaaa", "done", '[["queued", 1], ["running", 2], ["done", 3]]'),
                                       ("bbbb", "running", '[["queued", 4], ["running", 5]]'),
                                       ("cccc", "queued", '[["queued", 6]]')):
            db.execute("INSERT INTO jobs (id, status, request, settings, attempts, events, created) "
                       "VALUES (?, ?, '{\"prompt\": \"x\"}', ?, ?, ?, 1)",
                       (job_id, status, '{"steps": 2}' if status == "done" else None, int(status != "queued"), events))
    queue = JobQueue(tmp_path, runner=None)
    try:
        assert [job["id"] for job in queue.list()] == ["cccc", "bbbb", "aaaa"]
        done = queue.get("aaaa")
        assert done["status"] == "done" and done["settings"] == {"steps": 2} and done["request"] == {"prompt": "x"}
        assert done["events"] == ["queued", "running", "done"]
        interrupted = queue.get("bbbb")
        assert interrupted["status"] == "interrupted" and interrupted["events"] == ["queued", "running", "interrupted"]
        assert queue._claim()["id"] == "bbbb"  # run once more, before the later job
    finally:
        queue.stop()
    with sqlite3.connect(tmp_path / "jobs.sqlite") as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'jobs'").fetchone() is None


def test_a_cancel_from_another_process_stops_the_serve_worker_at_its_next_heartbeat(queue_url, tmp_path):
    """The API of another server (its own connection) cancels a job this server's worker runs:
    the worker hears it through its heartbeat and stops within about a second."""
    from wanx.serve.jobs import JobQueue

    steps = []

    def slow_runner(job, on_step):  # the JobQueue's runner seam: a 'pipeline' of 0.1 s steps
        for step in range(200):
            time.sleep(0.1)
            steps.append(step)
            on_step(step, 200, None)
        raise AssertionError("not cancelled")

    jobs = JobQueue(tmp_path / "out", slow_runner, url=queue_url, model="m")
    other = open_queue(queue_url)
    try:
        jobs.start()
        job_id = jobs.submit({"prompt": "x"})
        end = time.monotonic() + 30
        while not steps and time.monotonic() < end:
            time.sleep(0.05)
        assert other.cancel(job_id)["cancel"]
        asked = len(steps)
        assert jobs.wait_idle(30)
        job = other.get(job_id)
        assert job["status"] == "cancelled" and [s for s, _ in job["events"]] == ["queued", "running", "cancelled"]
        assert len(steps) - asked <= 25  # stopped at a heartbeat (one a second), not run to the end
    finally:
        jobs.stop(timeout=10)
        other.close()


def test_retry_queues_an_ended_job_again_as_new(queue):
    failed, cancelled, done = (queue.submit({"n": i}, model="m") for i in range(3))
    queue.cancel(cancelled)
    for _ in range(2):
        job = queue.claim("w", ["m"], 60)
        queue.finish(job["id"], "w", "failed" if job["id"] == failed else "done", error="boom")
    with pytest.raises(ValueError, match=f"job {done} is done: only a failed, cancelled or interrupted job"):
        queue.retry(done)
    assert queue.retry("nope") is None
    for job_id in (failed, cancelled):
        job = queue.retry(job_id)
        assert job["status"] == "queued" and job["attempts"] == 0 and job["error"] is None
        assert job["finished"] is None and not job["cancel"]
    assert queue.get(failed)["events"][-1][0] == "queued" and len(queue.get(failed)["events"]) == 4
    assert {queue.claim("w", ["m"], 60)["id"] for _ in range(2)} == {failed, cancelled}
    with pytest.raises(ValueError, match="is running"):
        queue.retry(failed)


def test_redact_hides_a_password_in_the_user_part_and_in_the_query():
    from wanx.serve.queue import redact

    assert redact("postgresql://wanx:secret@db:5432/wanx") == "postgresql://wanx:***@db:5432/wanx"
    assert redact("postgresql://wanx@db/wanx?password=secret&sslmode=require") == \
        "postgresql://wanx@db/wanx?password=***&sslmode=require"
    assert redact("postgresql://wanx@db/wanx?sslmode=require") == "postgresql://wanx@db/wanx?sslmode=require"
    assert redact("sqlite:///srv/wanx/jobs.sqlite") == "sqlite:///srv/wanx/jobs.sqlite"
