"""`wanx train` and its output folder: one run per folder (a finished run is continued or
replaced, never half written over), the LoRA named after the folder, settings refused in one
line before the model loads (targets, steps, resume settings, validation), and what Ctrl-C keeps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.training.test_train import losses, prepared, train  # noqa: F401 (prepared: a fixture)
from tests.training.test_train_options import error_of
from wanx.cli import main


def steps_of(path):
    with safe_open(str(path), framework="pt") as fh:
        return int(fh.metadata()["steps"])


def argv(data, output, *extra, model="tiny"):
    return ["train", "--data", str(data), "--model", model, "--output", str(output), "--lora-rank", "8", "--quiet",
            *extra]


# -- one run per folder -------------------------------------------------------------------


def test_a_previous_run_is_continued_or_replaced_never_written_over(prepared, tmp_path, capsys):
    out = tmp_path / "cat"
    train(prepared, out, "--steps", "2", "--save-every", "1", "--keep", "5")
    lora = out / "cat.safetensors"
    assert steps_of(lora) == 2 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    (out / "notes.txt").write_text("mine", encoding="utf-8")  # the user's own files stay whatever happens
    (out / "validation" / "step-2").mkdir(parents=True)
    (out / "validation" / "step-2" / "0.mp4").write_bytes(b"a video of the old run")
    (out / "validation" / "picked.txt").write_text("mine", encoding="utf-8")

    # refused before the model is even looked up (this model does not exist)
    err = error_of(capsys, argv(prepared, out, "--steps", "1", model=str(tmp_path / "no-model")))
    assert "holds a previous run" in err and "--resume" in err and "from step 2" in err and "--overwrite" in err
    assert steps_of(lora) == 2 and len(losses(out)) == 2  # untouched
    assert "not both" in error_of(capsys, argv(prepared, out, "--resume", "--overwrite"))

    train(prepared, out, "--steps", "1", "--overwrite")
    assert steps_of(lora) == 1 and len(losses(out)) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # none of the old run's
    assert not (out / "validation" / "step-2").exists()
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine" and (out / "validation" / "picked.txt").exists()

    # a resumed run cuts the log back to its checkpoint and drops the later validation videos
    train(prepared, out, "--steps", "3", "--save-every", "1", "--keep", "5", "--resume")
    shutil.rmtree(out / "checkpoints" / "step-3")
    (out / "validation" / "step-3").mkdir()
    (out / "validation" / "step-3" / "0.mp4").write_bytes(b"from step 3")
    assert len(losses(out)) == 3
    train(prepared, out, "--steps", "2", "--resume")
    assert len(losses(out)) == 2 and steps_of(lora) == 2 and not (out / "validation" / "step-3").exists()


def test_files_of_others_are_never_replaced(prepared, tmp_path, capsys):
    out = tmp_path / "dog"
    out.mkdir()
    (out / "dog.safetensors").write_bytes(b"someone else's file")
    err = error_of(capsys, argv(prepared, out, "--steps", "1", "--overwrite"))
    assert "is not a file wanx train wrote" in err
    (out / "dog.safetensors").unlink()
    (out / "log.csv").write_text("date,weight\n", encoding="utf-8")
    assert "not a wanx training log" in error_of(capsys, argv(prepared, out, "--steps", "1", "--overwrite"))
    (out / "log.csv").unlink()
    (out / "train.toml").write_text("steps = 1\n", encoding="utf-8")  # a folder with other files is not a run
    train(prepared, out, "--steps", "1")
    assert (out / "dog.safetensors").is_file() and (out / "train.toml").is_file()
    assert "no checkpoint to resume from" in error_of(capsys, argv(prepared, tmp_path / "new", "--resume"))
    assert not (tmp_path / "new").exists()


def test_loras_of_two_runs_stack_at_generation(prepared, tmp_path):
    from wanx.pipeline import WanPipeline

    train(prepared, tmp_path / "runs" / "cat", "--steps", "1")
    train(prepared, tmp_path / "runs" / "dog", "--steps", "1")
    pipe = WanPipeline.from_pretrained("tiny")
    for name in ("cat", "dog"):
        assert pipe.load_lora(tmp_path / "runs" / name / f"{name}.safetensors").matched == 20


# -- settings refused before the model loads ------------------------------------------------


def test_settings_that_would_train_something_else(prepared, tmp_path, capsys):
    out = tmp_path / "o"
    err = error_of(capsys, argv(prepared, out, "--targets", "q,foo"))
    assert "'foo'" in err and "q, k, v, o" in err and "ffn.0" in err
    assert "--steps" in error_of(capsys, argv(prepared, out, "--steps", "0"))
    assert "not both" in error_of(capsys, argv(prepared, out, "--epochs", "2", "--steps", "5"))
    assert "--epochs" in error_of(capsys, argv(prepared, out, "--epochs", "0"))
    assert "--save-every" in error_of(capsys, argv(prepared, out, "--save-every", "0"))
    assert not out.exists()
    train(prepared, out, "--epochs", "2")  # --steps' default does not count as given
    assert len(losses(out)) == 2


def test_output_folders_that_cannot_be(prepared, tmp_path, capsys):
    (tmp_path / "README.md").write_text("a file", encoding="utf-8")
    err = error_of(capsys, argv(prepared, tmp_path / "README.md" / "lora"))
    assert f"--output {tmp_path / 'README.md' / 'lora'}" in err and "is a file, not a folder" in err
    assert "give a folder" in error_of(capsys, argv(prepared, tmp_path / "cat.safetensors"))
    if Path("/proc/self").is_dir():  # a folder no one can make a folder in
        err = error_of(capsys, argv(prepared, "/proc/lora", "--steps", "1"))
        assert "--output /proc/lora: cannot write there" in err


def other_model(folder):
    """The tiny model set with a deeper DiT: the same encoders, so its cache is the same."""
    import dataclasses

    from wanx.configs import official_config_json
    from wanx.models.transformer import WanDiT
    from wanx.tiny import tiny_model_dir

    shutil.copytree(tiny_model_dir("tiny"), folder)
    config = WanDiT("tiny").config
    deeper = WanDiT(dataclasses.replace(config, num_layers=config.num_layers + 1))
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(official_config_json(deeper.config)), encoding="utf-8")
    return folder


def test_resume_with_other_settings_names_the_flag(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    train(prepared, out, "--steps", "2", "--save-every", "1", "--targets", "q,k")
    more = ["--steps", "3", "--resume", "--targets", "q,k"]
    err = error_of(capsys, argv(prepared, out, *more[:-2], "--lora-rank", "4"))  # the later --lora-rank wins
    assert "--lora-rank 8" in err and "--lora-rank 4" in err and "step-2" in err
    assert "--targets q,k" in error_of(capsys, argv(prepared, out, *more[:-1], "q"))
    assert "--full" in error_of(capsys, argv(prepared, out, *more, "--full"))
    err = error_of(capsys, argv(prepared, out, *more, model=str(other_model(tmp_path / "deeper"))))
    assert "--model" in err and "trained on tiny" in err and "2 layers" in err and "3 layers" in err
    (out / "checkpoints" / "step-2" / "settings.json").unlink()  # a checkpoint from before they were stored
    assert "other settings" in error_of(capsys, argv(prepared, out, *more[:-2], "--lora-rank", "4"))
    train(prepared, out, *more)
    assert len(losses(out)) == 3


# -- validation videos ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_demo(tmp_path_factory):
    from tests.training.test_prepare import moving_square

    folder = tmp_path_factory.mktemp("demo-data")
    moving_square(12).save(folder / "clip.mp4")
    (folder / "metadata.csv").write_text("file_name,text\nclip.mp4,a red square\n", encoding="utf-8")
    assert main(["prepare", str(folder), "--model", "demo", "--size", "48x48", "--frames", "5", "--quiet"]) == 0
    return folder


def test_validation_takes_the_models_own_settings(prepared_demo, tmp_path, capsys):
    """The demo model reads 32 tokens: the official negative prompt (35) is too long for it, and
    its wanx-defaults.json says "" (and 96x96, 17 frames, 20 steps)."""
    from wanx.hub import find_components, resolve_model
    from wanx.training.validation import plan_validation
    from wanx.video import read_video

    settings = plan_validation(find_components(resolve_model("demo")), ["a red circle"])
    assert (settings.negative_prompt, settings.width, settings.height, settings.num_frames,
            settings.num_inference_steps) == ("", 96, 96, 17, 20)
    out = tmp_path / "run"
    flags = ["--validation-prompts", "a red circle", "--validate-every", "1", "--steps", "1"]
    # the defaults but frames and steps (fewer, to be quick): the size is the model's
    assert main(argv(prepared_demo, out, *flags, "--validation-frames", "5", "--validation-steps", "1",
                     model="demo")) == 0
    video = read_video(out / "validation" / "step-1" / "0.mp4")
    assert len(video.frames) == 5 and video.frames.shape[1:3] == (96, 96)

    long = " ".join(["a red circle"] * 12)
    err = error_of(capsys, argv(prepared_demo, tmp_path / "a", *flags[:-2], "--validation-negative-prompt", long,
                                model="demo"))
    assert "--validation-negative-prompt has" in err and "at most 32" in err
    err = error_of(capsys, argv(prepared_demo, tmp_path / "b", *flags[2:], "--validation-prompts", f"ok|{long}",
                                model="demo"))
    assert "--validation-prompts" in err and "at most 32" in err
    assert "--validation-size width 100" in error_of(capsys, argv(prepared_demo, tmp_path / "c", *flags,
                                                                  "--validation-size", "100x96", model="demo"))
    assert "--validation-frames 6" in error_of(capsys, argv(prepared_demo, tmp_path / "d", *flags,
                                                            "--validation-frames", "6", model="demo"))
    assert not any((tmp_path / name).exists() for name in "abcd")


# -- Ctrl-C --------------------------------------------------------------------------------


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(prepared, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "wanx", *argv(prepared, out, "--steps", "100000", "--save-every", "2")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 180
    def saved():  # a checkpoint of step 4 or later (--keep 2: step-4 itself is gone again within milliseconds)
        return any(int(p.name[5:]) >= 4 for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())

    while time.monotonic() < deadline and process.poll() is None and not saved():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    latest = max(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    rows = len(losses(out))
    assert "Traceback" not in err and "nothing written" not in last, err
    # the first Ctrl-C stops at the end of the step in progress, never inside it (a checkpoint
    # being pickled then came out as "could not determine the shape of ... UntypedStorage")
    assert "wanx: stopping after this step (Ctrl-C again to stop at once)" in err, err
    assert last == (f"wanx: interrupted; kept log.csv ({rows} steps) and the checkpoint of step {latest} "
                    f"({out / 'checkpoints' / f'step-{latest}'}) in {out}; continue with the same command and --resume")
    assert main(argv(prepared, out, "--steps", str(latest + 1), "--resume")) == 0
    assert len(losses(out)) == latest + 1


def test_after_an_interrupt_nothing_or_the_log_only(tmp_path):
    from wanx.training.output import kept_after_interrupt

    assert kept_after_interrupt(tmp_path / "never-made") is None
    (tmp_path / "log.csv").write_text("step,loss,lr,seconds,samples_per_s\n1,0.5,0.0001,1.0,1.0\n", encoding="utf-8")
    kept = kept_after_interrupt(tmp_path)
    assert kept.startswith("kept log.csv (1 step) in") and "--overwrite" in kept


def test_a_damaged_prepared_item_is_named_with_the_way_out(prepared, tmp_path, capsys):
    """A cache item cut short (a killed copy, a full disk) is one line naming the file and
    `wanx prepare`, not the SafetensorError traceback `train` gave (issue 25, item 11)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared / ".wanx-cache", data)
    item = next(p for p in sorted(data.glob("*.safetensors")) if p.name != "empty-text.safetensors")
    item.write_bytes(item.read_bytes()[:-100])
    err = error_of(capsys, argv(data, tmp_path / "run", "--steps", "1"))
    assert f"the prepared item {item} is damaged" in err and "run `wanx prepare` again" in err, err


def test_a_vram_budget_without_streaming_is_refused_not_ignored(prepared, tmp_path, capsys):  # noqa: F811
    """--vram-budget keeps blocks resident only when they are streamed (--offload blocks); with
    the default --offload none it was read and ignored. Now the runtime's table of choices that
    cannot go together refuses it, before anything is made."""
    err = error_of(capsys, ["train", "--data", str(prepared), "--model", "tiny", "--output", str(tmp_path / "run"),
                            "--vram-budget", "1GB", "--steps", "1"])
    assert "VRAM budget" in err and "offload 'none'" in err
    assert not (tmp_path / "run").exists()
