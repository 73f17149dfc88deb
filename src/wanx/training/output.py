"""The output folder of a run. One folder holds one run: its result, log.csv,
checkpoints/step-N/, validation/step-N/ and tensorboard/. A new run never writes over
another's files (its log and result would not match the checkpoints left behind); it
continues one (--resume) or clears it (--overwrite)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..paths import check_folder
from .checkpoint import list_checkpoints

LOG_HEADER = "step,loss,lr,seconds,samples_per_s"


def final_file(output: Path, full: bool = False) -> Path:
    """The run's result: the LoRA named after its folder (`runs/cat` -> `runs/cat/cat.safetensors`),
    so LoRAs of several runs keep apart names when stacked; `model.safetensors` with --full (a
    model folder's DiT, beside its config.json)."""
    output = Path(output)
    return output / ("model.safetensors" if full else f"{output.resolve().name or 'lora'}.safetensors")


def _written_by_wanx_train(path: Path) -> bool:
    """Whether a .safetensors file is the result of a `wanx train` run (its metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") in ("wanx-lora", "wanx-full")
    except Exception:  # not a safetensors file at all
        return False


def _is_wanx_training_log(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.readline().strip() == LOG_HEADER


def previous_run(output: Path, full: bool = False) -> list[Path]:
    """The files a `wanx train` run left in `output`. Raises where a file this run (`full` or
    not) would write is there but was not written by wanx: a user's own file is never replaced."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = []
    mine = final_file(output, full)
    for name in sorted({final_file(output).name, "lora.safetensors", "model.safetensors"}):  # lora.safetensors:
        path = output / name  # the name of every LoRA before they were named after their folder
        if path.is_file() and _written_by_wanx_train(path):
            found.append(path)
        elif path.exists() and path == mine:
            raise ValueError(f"--output {output}: {path} is not a file wanx train wrote, and this run would write "
                             "over it; move it or choose another --output")
    if full and (output / "config.json").exists() and output / "model.safetensors" not in found:
        raise ValueError(f"--output {output}: a --full run writes config.json beside model.safetensors, and "
                         f"{output / 'config.json'} is another's; move it or choose another --output")
    log = output / "log.csv"
    if log.is_file() and not _is_wanx_training_log(log):
        raise ValueError(f"--output {output}: {log} is not a wanx training log, and this run would write over it; "
                         "move it or choose another --output")
    found += [output / name for name in ("log.csv", "checkpoints", "validation", "tensorboard")
              if (output / name).exists()]
    return found


def check_output(output: Path, *, resume: bool = False, overwrite: bool = False, full: bool = False) -> None:
    """Refuse an --output that cannot be a run folder, or that holds a previous run unless it is
    continued (--resume) or replaced (--overwrite); before any weight is loaded."""
    output = Path(output)
    if output.suffix == ".safetensors":
        raise ValueError(f"--output {output}: give a folder; the LoRA goes inside it as "
                         f"{final_file(output.with_suffix('')).name} (named after the folder)")
    check_folder(output, "--output")
    if resume and overwrite:
        raise ValueError("give --resume (continue the run in --output) or --overwrite (start it again), not both")
    checkpoints = list_checkpoints(output) if output.is_dir() else []
    if resume:
        if not checkpoints:
            raise ValueError(f"--resume: {output} holds no checkpoint to resume from (checkpoints/step-N/, "
                             "written with --save-every N and at the end); drop --resume to start")
        return
    previous = previous_run(output, full)
    if previous and not overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in previous)
        again = (f"add --resume to continue it from step {checkpoints[-1].name.split('-')[1]}, or --overwrite to start again"
                 if checkpoints else "it has no checkpoint to resume from; add --overwrite to start again")
        raise ValueError(f"--output {output} holds a previous run ({names}): {again}, or choose a new folder")


def clear_run(output: Path, full: bool = False) -> None:
    """Remove the previous run's files from `output` (what `previous_run` finds), nothing else:
    files of other names stay, and so do the folders holding them."""
    import re

    output = Path(output)
    for path in previous_run(output, full):
        if path.is_file():
            if path.name == "model.safetensors":
                (output / "config.json").unlink(missing_ok=True)  # written beside it by a --full run
            path.unlink()
    # step-N/ and their .partial leftovers whole: a checkpoint left half-removed could be
    # resumed from later
    patterns = {"checkpoints": (r"\.?step-\d+(\.partial)?", True), "validation": (r"step-\d+", False),
                "tensorboard": (r"events\.out\.tfevents\..*", False)}
    for folder, (pattern, whole) in patterns.items():
        root = output / folder
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if not re.fullmatch(pattern, path.name):
                continue
            if path.is_dir() and whole:
                shutil.rmtree(path)
            elif path.is_dir():  # validation/step-N/: its videos K.mp4
                for video in path.iterdir():
                    if re.fullmatch(r"\d+\.mp4", video.name):
                        video.unlink()
                _remove_if_empty(path)
            else:
                path.unlink()
        _remove_if_empty(root)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def drop_later_validation(output: Path, step: int) -> None:
    """Validation videos of steps after the checkpoint a run resumes from came from the part it
    does again: removed with the log rows of those steps."""
    import re

    root = output / "validation"
    for folder in root.glob("step-*") if root.is_dir() else ():
        if folder.is_dir() and re.fullmatch(r"step-\d+", folder.name) and int(folder.name[5:]) > step:
            for video in folder.iterdir():
                if re.fullmatch(r"\d+\.mp4", video.name):
                    video.unlink()
            _remove_if_empty(folder)


def kept_after_interrupt(output: Path) -> str | None:
    """What a stopped run left in `output` and how to go on, in words (None: nothing)."""
    output = Path(output)
    log, checkpoints = output / "log.csv", list_checkpoints(output) if output.is_dir() else []
    rows = 0
    if log.is_file():
        with open(log, encoding="utf-8") as fh:
            rows = max(0, sum(1 for line in fh if line.strip()) - 1)
    if not rows and not checkpoints:
        return None
    kept = [f"log.csv ({rows} step{'s' if rows != 1 else ''})"] if rows else []
    if checkpoints:
        kept.append(f"the checkpoint of step {checkpoints[-1].name.split('-')[1]} ({checkpoints[-1]})")
        then = "continue with the same command and --resume"
    else:
        then = "no checkpoint to continue from (--save-every N writes them); start again with --overwrite"
    return f"kept {' and '.join(kept)} in {output}; {then}"
