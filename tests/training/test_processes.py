"""Training and preparing in several processes, and a training process killed outright.

Two processes are started the way users start them, `accelerate launch` (gloo on CPU: its
`--multi_gpu` launcher; `--cpu --num_processes 2` would start one process without MPI), and
must match one process that accumulates the same global batch. A run killed with SIGKILL,
possibly while writing a checkpoint, resumes from the last complete one and ends where a
straight run ends."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_determinism import torch_threads
from tests.training.test_prepare import moving_square
from wanx.cli import main

COLORS = [(255, 64, 32), (32, 200, 64), (40, 40, 250), (200, 200, 30)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i, color in enumerate(COLORS):
        moving_square(12, color=color, seed=i).save(folder / f"clip{i}.mp4")
    (folder / "short.mp4").write_bytes(b"")  # unreadable: listed once in the report, not once per process
    rows = [f"clip{i}.mp4,square number {i}" for i in range(len(COLORS))] + ["short.mp4,broken"]
    (folder / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return folder


def launch(*args, processes=2):
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "wanx.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_prepare_and_train_as_one(dataset, tmp_path):
    one, two = tmp_path / "cache-one", tmp_path / "cache-two"
    assert main(["prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet",
                 "--cache", str(one)]) == 0
    out = launch("prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet",
                 "--cache", str(two)).stdout
    # the main process reports for all, and the items were shared (each process alone would encode all 4)
    assert out.count("encoded") == 1 and out.startswith("4 encoded by 2 processes,")
    report = (two / "prepare-report.txt").read_text(encoding="utf-8").splitlines()
    assert len(report) == 1 and report[0].startswith(str(dataset / "short.mp4"))
    files = sorted(p.name for p in one.glob("*.safetensors"))  # 4 items and the empty prompt
    assert files == sorted(p.name for p in two.glob("*.safetensors")) and len(files) == 5
    for name in files:  # each item encoded by one process or the other, the same way
        a, b = load_file(str(one / name)), load_file(str(two / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)

    flags = ["--model", "tiny", "--steps", "4", "--lora-rank", "4", "--lr", "1e-2", "--quiet"]
    with torch_threads(1):  # as the launched processes (OMP_NUM_THREADS=1): the losses are compared exactly
        assert main(["train", "--data", str(one), "--output", str(tmp_path / "single"), "--grad-accum", "2",
                     *flags]) == 0
    launch("train", "--data", str(one), "--output", str(tmp_path / "pair"), *flags)
    a = load_file(str(tmp_path / "single" / "single.safetensors"))
    b = load_file(str(tmp_path / "pair" / "pair.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the same micro-batches and noise; only the gradient sum's order differs (measured: equal)
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    logs = [(tmp_path / run / "log.csv").read_text(encoding="utf-8").splitlines() for run in ("single", "pair")]
    assert [row.split(",")[1] for row in logs[0]] == [row.split(",")[1] for row in logs[1]]  # the losses


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(dataset, tmp_path):
    """--full makes checkpoints of every weight and the optimizer state: their writing takes
    long enough that the kill often lands inside it (a `.step-N.partial` is then left)."""
    cache = tmp_path / "cache"
    assert main(["prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet",
                 "--cache", str(cache)]) == 0
    flags = ["--data", str(cache), "--model", "tiny", "--full", "--steps", "8", "--lr", "1e-3", "--quiet"]
    assert main(["train", *flags, "--output", str(tmp_path / "straight")]) == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "wanx.cli", "train", *flags, "--output", str(killed),
                                "--save-every", "1", "--keep", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))  # as this process
    checkpoints = killed / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        complete = [p for p in checkpoints.glob("step-*")] if checkpoints.is_dir() else []
        if complete and any(checkpoints.glob(".step-*.partial")):  # mid-write, after one complete
            break
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.safetensors").exists()
    assert main(["train", *flags, "--output", str(killed), "--save-every", "1", "--keep", "3", "--resume"]) == 0
    assert not list(checkpoints.glob(".step-*.partial"))
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    rows = (killed / "log.csv").read_text(encoding="utf-8").splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 9)]  # no step logged twice
