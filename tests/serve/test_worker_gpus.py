"""`wanx worker --gpu K | --gpus 0,1` and `wanx serve --gpus N`: workers on chosen GPUs, a worker
made of a sequence-parallel group of ranks (on CPU: gloo ranks), and a server that starts its
local workers itself. On CPU, as every multi-rank test here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wanx.serve.queue import open_queue
from wanx.video import read_video

from tests.test_cli_errors import error_of, no_loading  # noqa: F401 (no_loading: a fixture)

from .conftest import ServeProcess, wait_for
from .test_workers import _wait

SMALL = {"size": "32x32", "frames": 5, "steps": 2}


def _session(leader: int) -> list[str]:
    """The command lines of the processes left in the session `leader` started."""
    pids = subprocess.run(["pgrep", "-s", str(leader)], capture_output=True, text=True).stdout.split()
    return [Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ") for pid in pids
            if Path(f"/proc/{pid}/cmdline").exists()]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def test_a_group_worker_runs_jobs_as_one_process_does_and_stops_on_sigterm(make_server, tmp_path):
    """2 gloo ranks (Ulysses over the tiny model's heads): rank 0 claims and writes; the videos are
    the ones a 1-process worker makes for the same requests; one file per job; SIGTERM: exit 0."""
    outputs = tmp_path / "outputs"
    url = f"sqlite:///{outputs / 'jobs.sqlite'}"
    api = make_server(outputs, queue_url=url, needs_workers=True)  # the API's side, in this process
    log = open(tmp_path / "group.log", "wb")
    group = subprocess.Popen([sys.executable, "-m", "wanx", "worker", "--queue", url, "--model", "tiny",
                              "--outputs", str(outputs), "--device", "cpu", "--gpus", "0,1", "--sp", "ulysses"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    queue = open_queue(url)
    try:
        _wait(lambda: queue.workers() or group.poll() is not None, 240, "the group registered")
        assert group.poll() is None, (tmp_path / "group.log").read_text()
        [worker] = queue.workers()
        assert worker["worker_id"].endswith(":cpux2"), worker  # the id says where it runs
        requests = [{"prompt": f"job {i}", "seed": i, **SMALL} for i in range(2)]
        ids = [api.submit(body) for body in requests]
        _wait(lambda: all(api.queue.get(i)["status"] in ("done", "failed") for i in ids), 120, "the jobs ran")
        jobs = [api.queue.get(i) for i in ids]
        assert [job["status"] for job in jobs] == ["done", "done"], (jobs, (tmp_path / "group.log").read_text())
        assert {queue.get(i)["worker_id"] for i in ids} == {worker["worker_id"]}
        files = sorted(p.name for p in outputs.iterdir() if p.is_file() and not p.name.startswith("jobs.sqlite"))
        assert files == sorted([f"{i}.mp4" for i in ids] + [f"{i}.json" for i in ids])
        assert "parallel: 2 ranks, sequence parallel ulysses over 2" in (tmp_path / "group.log").read_text()

        # the same requests through one process
        single = make_server(tmp_path / "single")
        single.queue.start()
        alone = [single.submit(body) for body in requests]
        assert single.queue.wait_idle(120)
        for job_id, other in zip(ids, alone):
            assert single.queue.get(other)["status"] == "done"
            a = np.asarray(read_video(outputs / f"{job_id}.mp4").frames, np.int16)
            b = np.asarray(read_video(single.queue.output_path(other)).frames, np.int16)
            # the frames differ by float order (a level of 255 here and there), which H.264 grows to
            # a few levels in some blocks (PSNR ~45 dB); another seed or a broken split is ~10 dB
            assert a.shape == b.shape and _psnr(a, b) > 35, _psnr(a, b)

        # a cancel seen by rank 0 stops every rank at that step, and the group goes on
        # the most steps a server takes, at a size where they last many seconds: a cancel is heard within a
        # second, and the job must still be running when it comes (and when SIGTERM comes)
        long = {**SMALL, "size": "128x128", "frames": 9, "steps": 1000}
        cancelled = api.submit({"prompt": "stop me", "seed": 7, **long})
        _wait(lambda: queue.get(cancelled)["status"] == "running", 60, "the long job runs")
        api.queue.cancel(cancelled)
        _wait(lambda: queue.get(cancelled)["status"] == "cancelled", 30, "the cancel reached the group")
        # SIGTERM mid-job: the job goes back to the queue (the attempt not counted) and all ranks exit
        given_back = api.submit({"prompt": "give me back", "seed": 8, **long})
        _wait(lambda: queue.get(given_back)["status"] == "running", 60, "the next job runs")
        group.send_signal(signal.SIGTERM)
        assert group.wait(60) == 0, (tmp_path / "group.log").read_text()
        job = queue.get(given_back)
        assert job["status"] == "queued" and job["attempts"] == 0, job
        assert queue.workers() == []
        assert not list(outputs.glob(f"*{cancelled}*")) and not list(outputs.glob(f"*{given_back}*"))
        _wait(lambda: not _session(group.pid), 10, f"the ranks gone ({_session(group.pid)} left)")
    finally:
        queue.close()
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait(10)
        log.close()


@pytest.mark.parametrize("flags, words", [
    (["--gpu", "0", "--device", "cpu"], "--gpu 0 picks GPUs, but --device cpu does not run on one; leave out --gpu"),
    (["--gpu", "0", "--device", "cuda:1"], "--gpu 0 and --device cuda:1 both pick the GPU; give only --gpu"),
    (["--gpu", "-1"], "--gpu -1: GPU indices are 0 or more"),
    (["--gpus", "0,1"], "--gpus 0,1: no GPU 0 here (this process sees no CUDA GPU); run on a GPU host, or use "
                        "--device cpu"),
    (["--gpus", "0,0", "--device", "cpu"], "--gpus 0,0: a rank is listed twice; list each once"),
    (["--gpus", "0,1,2", "--device", "cpu", "--cfg-parallel"], "--cfg-parallel splits the ranks into a cond and an "
                                                                 "uncond half: 3 rank(s) is odd"),
    (["--gpus", "0,1,2", "--device", "cpu", "--sp", "ulysses"], "--sp ulysses splits the model's 2 heads across 3 "
                                                                "ranks, which does not divide"),
])
def test_worker_gpu_choices_are_refused_in_one_line_before_loading(tiny, tmp_path, capsys, no_loading, monkeypatch,
                                                                   flags, words):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on this CPU host, wherever the test runs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    argv = ["worker", "--model", "tiny", "--queue", f"sqlite:///{tmp_path}/jobs.sqlite", "--outputs", str(tmp_path),
            *flags]
    assert words in error_of(capsys, argv)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.parametrize("flags, words", [
    (["--gpu", "x"], "argument --gpu: invalid int value: 'x'"),
    (["--gpus", "0,a"], "argument --gpus: give GPU indices separated by commas, e.g. 0,1 (got '0,a')"),
    (["--gpu", "0", "--gpus", "0,1"], "argument --gpus: not allowed with argument --gpu"),
])
def test_worker_gpu_flags_that_do_not_parse_are_one_line(tmp_path, capsys, flags, words):
    from wanx.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["worker", "--model", "tiny", "--queue", f"sqlite:///{tmp_path}/jobs.sqlite", *flags])
    assert exit.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]


def test_gpu_k_is_the_kth_gpu_this_process_sees(monkeypatch):
    """--gpu K counts as cuda:K does (among CUDA_VISIBLE_DEVICES when set) and leaves that GPU the
    only one visible. The GPU count is NVML's, which honours CUDA_VISIBLE_DEVICES: simulated here."""
    import torch

    from wanx.serve.worker import pick_gpus

    host = ["0", "1", "2", "3", "4", "5", "6", "7"]

    def nvml_count():
        given = os.environ.get("CUDA_VISIBLE_DEVICES")
        return len(host) if given is None else len([g for g in given.split(",") if g in host])

    monkeypatch.setattr(torch.cuda, "device_count", nvml_count)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert pick_gpus([1], None, "--gpu") == ["5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pick_gpus([3, 1], "cuda", "--gpus") == ["3", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "3,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    with pytest.raises(ValueError, match=r"--gpu 3: no GPU 3 here \(this process sees GPUs 0..2\)"):
        pick_gpus([3], None, "--gpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"  # unchanged by a refusal
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # CUDA initialised already: the choice cannot apply
    with pytest.raises(ValueError, match="CUDA was initialised before the GPUs could be chosen; start the worker "
                                         "with CUDA_VISIBLE_DEVICES=5 instead"):
        pick_gpus([1], None, "--gpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_serve_gpus_starts_local_workers_and_stops_them(tiny, tmp_path):
    """`wanx serve --device cpu --gpus 2`: two CPU worker children on the server's queue; a child
    that dies is named in one line and the other goes on; SIGTERM on the server stops the rest."""
    outputs = tmp_path / "outputs"
    url = f"sqlite:///{outputs / 'jobs.sqlite'}"
    api = ServeProcess(outputs, "--gpus", "2", "--no-ui", "--quiet")
    queue = None
    try:
        _wait(lambda: (outputs / "jobs.sqlite").exists(), 30, "the queue")
        queue = open_queue(url)
        _wait(lambda: len(queue.workers()) == 2 or api.proc.poll() is not None, 240, "two workers registered")
        workers = [w["worker_id"] for w in queue.workers()]
        assert len(workers) == 2 and all(w.endswith(":cpu") for w in workers), (workers, api.output())
        # a longer job first: while one worker runs it, the other (polling twice a second) takes the next ones
        ids = [api.client.post("/v1/videos", json={"prompt": "long", "seed": 0, **SMALL, "steps": 400}).json()["id"]]
        _wait(lambda: queue.get(ids[0])["status"] != "queued", 60, "the long job taken")
        ids += [api.client.post("/v1/videos", json={"prompt": f"job {i}", "seed": i, **SMALL}).json()["id"]
                for i in range(1, 4)]
        jobs = [wait_for(api.client, job_id, timeout=120) for job_id in ids]
        assert [job["status"] for job in jobs] == ["done"] * 4, jobs
        ran = {queue.get(job_id)["worker_id"] for job_id in ids}
        assert ran == set(workers), ran
        pids = [int(w.split(":")[2]) for w in workers]
        assert all(_alive(pid) for pid in pids)

        os.kill(pids[0], signal.SIGKILL)  # one worker dies: said in one line, the other goes on
        _wait(lambda: "exited with code -9; 1 worker(s) left" in api.output(), 30, "the early exit named")
        again = api.client.post("/v1/videos", json={"prompt": "after", "seed": 9, **SMALL}).json()["id"]
        assert wait_for(api.client, again, timeout=60)["status"] == "done"
        assert queue.get(again)["worker_id"] == workers[1]

        api.proc.send_signal(signal.SIGTERM)
        assert api.proc.wait(60) == 0, api.output()
        assert not any(_alive(pid) for pid in pids), api.output()
        assert [w["worker_id"] for w in queue.workers()] == [workers[0]]  # the killed one's row, gone stale
    finally:
        if queue is not None:
            queue.close()
        api.close()


@pytest.mark.parametrize("flags, words", [
    (["--gpus", "0"], "--gpus 0: give how many GPUs get a worker (1 or more)"),
    (["--gpus", "2", "--workers", "0"], "--gpus 2 starts the workers itself and this process runs none; leave out "
                                        "--workers"),
    (["--gpus", "2", "--device", "cuda"], "--gpus 2: this host has no GPUs (or no CUDA); give at most 0, or --device "
                                          "cpu for CPU workers"),
    (["--gpus", "2", "--device", "cuda:1"], "--gpus 2 gives each worker its GPU; --device cuda:1 picks one"),
    (["--gpus", "3", "--device", "cpu", "--cfg-parallel"], "--cfg-parallel splits the ranks into a cond and an "
                                                             "uncond half: 3 rank(s) is odd"),
    (["--sp", "ulysses", "--device", "cpu"], "--sp makes the workers --gpus N starts one group; add --gpus N"),
    (["--gpus", "3", "--device", "cpu", "--sp", "ulysses"], "--sp ulysses splits the model's 2 heads across 3 ranks, "
                                                            "which does not divide; use --sp ring or auto"),
])
def test_serve_gpus_refuses_bad_input_in_one_line_before_loading(tiny, tmp_path, capsys, no_loading, monkeypatch, flags,
                                                                  words):
    import torch

    from .conftest import free_port

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on this CPU host, wherever the test runs
    err = error_of(capsys, ["serve", "--model", "tiny", "--no-ui", "--port", str(free_port()),
                            "--outputs", str(tmp_path / "out"), *flags])
    assert words in err
    assert not (tmp_path / "out").exists()  # refused before anything was made


LOCAL = """
import sys, time
from wanx.serve.local import LocalWorkers

py = sys.executable
local = LocalWorkers(COMMANDS, [f"worker {i}" for i in range(len(COMMANDS))])
try:
    local.start()
    time.sleep(30)  # as uvicorn.run, until a signal
finally:
    local.stop(timeout=1)
"""


@pytest.mark.parametrize("commands, code, words", [
    # the last worker ends on its own: named with its last words, and the server stops (exit 1)
    ('[[py, "-c", "print(1)"], [py, "-c", "import sys, time; time.sleep(0.5); sys.exit(\'wanx: error: no disk\')"]]',
     1, ["wanx serve: worker 0 exited with code 0; 1 worker(s) left",
         "[worker 1] wanx: error: no disk", "wanx serve: worker 1 exited with code 1: wanx: error: no disk; no worker "
                                           "left, stopping"]),
    # progress bars (carriage returns, cleared with spaces) come through as the line they end on
    ('[[py, "-c", "import sys; r = chr(13); "'
     '"sys.stderr.write(r.join([\'loading 10%\', \'loading 100%\', 12 * \' \', \'loading: 1.0 s\']) + chr(10))"]]',
     1, ["[worker 0] loading: 1.0 s"]),
])
def test_local_workers_stop_the_server_when_none_is_left(tmp_path, commands, code, words):
    script = LOCAL.replace("COMMANDS", commands)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert all(line in lines for line in words), lines


def test_a_worker_that_ignores_sigterm_is_killed_with_what_it_started(tmp_path):
    pids = tmp_path / "pids"
    child = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "grand = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{grand.pid}}'); time.sleep(60)")
    script = LOCAL.replace("COMMANDS", repr([[sys.executable, "-c", child]])).replace("time.sleep(30)", "time.sleep(2)")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert done.returncode == 0 and time.monotonic() - start < 15, done.stderr
    assert "did not stop in 1 s; killed" in done.stderr
    assert not any(_alive(int(pid)) for pid in pids.read_text().split())


def test_serve_gpus_gives_its_workers_the_servers_flags(tmp_path):
    """Each child's command line: the server's queue (default: the outputs' SQLite file), outputs,
    model and memory/speed flags, re-given (abbreviations such as --out resolved), and its GPU(s)."""
    import argparse

    from wanx.cli import _local_workers, _subparser, build_parser

    def children(*flags):
        args = build_parser().parse_args(["serve", "--model", "tiny", "--out", str(tmp_path / "o"), "--port", "7000",
                                          "--token", "abcdefgh", "--no-ui", *flags])
        args.argv = []
        return _local_workers(args).commands

    with pytest.MonkeyPatch.context() as patch:
        import torch

        patch.setattr(torch.cuda, "device_count", lambda: 4)
        commands = children("--gpus", "2", "--fp8", "--offload", "model", "--teacache", "--vram-budget", "6GB",
                            "--quiet", "--dtype", "bf16")
    assert len(commands) == 2
    for i, command in enumerate(commands):
        assert command[1:4] == ["-m", "wanx", "worker"]
        parsed = _subparser("worker").parse_args(command[4:])
        assert isinstance(parsed, argparse.Namespace)
        assert (parsed.queue, parsed.outputs, parsed.model) == (f"sqlite:///{tmp_path / 'o' / 'jobs.sqlite'}",
                                                                str(tmp_path / "o"), "tiny")
        assert (parsed.gpu, parsed.gpus, parsed.fp8, parsed.offload, parsed.teacache, parsed.vram_budget,
                parsed.quiet, parsed.dtype) == (i, None, True, "model", "auto", "6GB", True, "bf16")
    [group] = children("--gpus", "3", "--device", "cpu", "--sp", "ring", "--queue", "sqlite:///elsewhere.sqlite")
    parsed = _subparser("worker").parse_args(group[4:])
    assert (parsed.gpus, parsed.sp, parsed.device, parsed.queue) == ([0, 1, 2], "ring", "cpu", "sqlite:///elsewhere.sqlite")
    assert not any(word.startswith(("--port", "--token", "--no-ui", "--host")) for word in group)
