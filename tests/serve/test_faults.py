"""Faults of the shared queue: a worker that dies between its accepted result and the renames,
an outputs folder of another queue, a worker's dropped database connection, a worker for a
model no API serves, and 3 workers + an API restarted under load (every job done once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import pytest
from fastapi.testclient import TestClient

from wanx.serve.jobs import JobQueue
from wanx.serve.queue import open_queue

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
