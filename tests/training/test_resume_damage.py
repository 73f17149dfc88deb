"""Damaged files under `wanx train`: a checkpoint cut short is skipped for the newest intact
one; `prepare` removes the half-written items of a killed run."""

import shutil

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
