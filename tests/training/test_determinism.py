"""What `wanx train` repeats bit for bit on a CPU: the same prepared cache, seed, torch and
number of torch threads give the same LoRA file, in a fresh process or resumed from a
checkpoint; a resume with another thread count (whose kernels round differently) says so."""

import os
import subprocess
import sys
from contextlib import contextmanager

import torch
from safetensors import safe_open

from tests.training.test_train import prepared, train  # noqa: F401 (the module's dataset fixture)

STEPS = ["--steps", "8", "--lr", "1e-2"]


@contextmanager
def torch_threads(count: int):
    """This process's torch threads set to `count` for a while: to compare a run here with one
    in another process (torchrun and accelerate give their ranks OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_in_fresh_process(data, output, threads: int) -> None:
    command = [sys.executable, "-m", "wanx.cli", "train", "--data", str(data), "--model", "tiny", "--output",
               str(output), "--lora-rank", "8", "--quiet", *STEPS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    assert done.returncode == 0, done.stderr[-2000:]


def bits(path) -> tuple[dict, dict]:
    """A safetensors file's metadata and the bytes of each tensor (the header's key order is
    not: safetensors writes its metadata from a hash map, in another order in each process)."""
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}


def test_fresh_processes_and_a_resumed_run_write_the_same_file(prepared, tmp_path, capsys):  # noqa: F811
    threads = torch.get_num_threads()  # the fresh processes run with this process's count
    train_in_fresh_process(prepared, tmp_path / "a", threads)
    train_in_fresh_process(prepared, tmp_path / "b", threads)
    train(prepared, tmp_path / "split", "--steps", "4", "--lr", "1e-2", "--save-every", "4")
    train(prepared, tmp_path / "split", *STEPS, "--resume")
    assert "warning" not in capsys.readouterr().err
    lora = bits(tmp_path / "a" / "a.safetensors")
    assert bits(tmp_path / "b" / "b.safetensors") == lora
    assert bits(tmp_path / "split" / "split.safetensors") == lora


def test_a_resume_with_another_thread_count_says_it_will_not_be_identical(prepared, tmp_path, capsys):  # noqa: F811
    before = torch.get_num_threads()
    train(prepared, tmp_path / "run", "--steps", "2", "--save-every", "2")
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    assert state["cpu_setup"] == {"threads": before, "torch": torch.__version__}
    capsys.readouterr()
    with torch_threads(before + 1):
        train(prepared, tmp_path / "run", "--steps", "4", "--resume")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: resuming with {before + 1} CPU thread(s) and torch {torch.__version__}; step-2 was "
                        f"trained with {before} CPU thread(s) and torch {torch.__version__}: the result will not be "
                        f"bit-identical to an uninterrupted run (OMP_NUM_THREADS={before} sets the threads)"]

