"""Damaged files under `wanx train`: a checkpoint cut short is skipped for the newest intact
one; `prepare` removes the half-written items of a killed run."""

import resource
import shutil
import signal
import subprocess
import sys

from tests.training.test_train import losses, prepared, train  # noqa: F401 (prepared: a fixture)
from tests.training.test_train_errors import argv, error_of


def cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(prepared, tmp_path, capsys):
    out = tmp_path / "cat"
    train(prepared, out, "--steps", "3", "--save-every", "1", "--keep", "5")
    cut(out / "checkpoints" / "step-3" / "lora.safetensors")
    capsys.readouterr()
    train(prepared, out, "--steps", "4", "--resume")
    err = capsys.readouterr().err
    assert "checkpoints/step-3 is damaged" in err and "resuming from step-2" in err, err
    assert len(losses(out)) == 4  # the log cut back to step 2, then steps 3 and 4

    for checkpoint in (out / "checkpoints").glob("step-*"):
        cut(checkpoint / "state.pt")
    assert "no earlier checkpoint" in error_of(capsys, argv(prepared, out, "--steps", "5", "--resume"))


def test_prepare_removes_the_partial_files_of_a_killed_run(prepared, tmp_path):
    from wanx.cli import main

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    stale = data / ".wanx-cache" / ".clip-0000000000.safetensors.partial"
    stale.write_bytes(b"half an item")
    assert main(["prepare", str(data), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet"]) == 0
    assert not stale.exists()


def _file_size_limit(limit):
    """A child whose files cannot grow past `limit` bytes (as `ulimit -f`), the write failing
    with EFBIG rather than the process being killed by SIGXFSZ."""
    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def _run_limited(argv_, limit):
    return subprocess.run([sys.executable, "-m", "wanx", *argv_], capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(limit))


def test_a_failed_write_is_one_line_with_the_way_on(prepared, tmp_path):
    """A full disk or `ulimit -f` in the middle of `train` or `prepare`: one line naming the file
    and how to go on, no traceback, no half-written file (issue 25, item 11)."""
    out = tmp_path / "run"
    done = _run_limited(argv(prepared, out, "--steps", "4", "--save-every", "2"), 4096)  # log rows fit, a LoRA not
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"wanx: error: cannot write {out / 'checkpoints' / 'step-2'} (") and err.endswith(
        "nothing half-written is kept: make room and add --resume to continue from the last checkpoint"), err
    assert not list((out / "checkpoints").glob(".step-*"))  # the temporary folder went with the failure

    data = tmp_path / "data"
    shutil.copytree(prepared, data, ignore=shutil.ignore_patterns(".wanx-cache"))
    done = _run_limited(["prepare", str(data), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet"], 4096)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("wanx: error: cannot write "), err
    assert err.endswith("make room and run `wanx prepare` again (the items already written are kept)"), err
    assert not list((data / ".wanx-cache").glob(".*.partial"))
