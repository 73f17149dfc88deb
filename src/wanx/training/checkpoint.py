"""A run's checkpoints, OUTPUT/checkpoints/step-N/: the trained weights, the optimizer and
scheduler state and the run's settings, each written whole (a temporary folder renamed) and
the last `keep` kept; resuming from the newest intact one, after comparing its settings with
this run's; and the run's result file beside them.

A resumed run matches a straight one bit for bit on the same CPU with the same torch and the
same number of torch threads (see `recipe`): each checkpoint records the thread count and
torch version (`cpu_setup`), and a resume with others says so.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..memory.streaming import compute_device
from .prepare import writing

if TYPE_CHECKING:
    from .recipe import TrainConfig
    from .trainable import Trainable

# a write that failed mid-run (a full disk, a file-size limit): the checkpoints kept are whole
RESUME_AFTER_WRITE_FAILURE = "make room and add --resume to continue from the last checkpoint"
SETTINGS_FILE = "settings.json"  # in each checkpoint: what --resume must match


def list_checkpoints(output: Path) -> list[Path]:
    root = output / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output: Path, step: int, trained: Trainable, optimizer, scheduler, keep: int,
                     settings: dict | None = None) -> None:
    """checkpoints/step-N/, written in a temporary folder and renamed: a crash never leaves a
    half-written checkpoint. Keeps the last `keep`. `settings` (`run_settings`) go beside the
    weights as settings.json, so --resume compares them before it loads anything."""
    import json

    from safetensors.torch import save_file

    root = output / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(final, RESUME_AFTER_WRITE_FAILURE, tmp):
        tmp.mkdir(parents=True)
        save_file(trained.state(), str(tmp / trained.file_name))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "cpu_setup": cpu_setup(trained.dit)}, tmp / "state.pt")
        if settings:
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume(output: Path, trained: Trainable, optimizer, scheduler, clear: bool = True) -> int:
    """Load the newest intact checkpoint into `trained`, `optimizer` and `scheduler`; returns its
    step. `clear`: the main process, which removes what a killed run left and speaks for all."""
    from safetensors.torch import load_file

    for partial in (output / "checkpoints").glob(".step-*.partial") if clear else ():  # left by a killed run
        shutil.rmtree(partial, ignore_errors=True)
    done = list_checkpoints(output)
    if not done:
        raise ValueError(f"{output}: no checkpoint to resume from (checkpoints/step-N/); drop --resume to start")
    if not (done[-1] / trained.file_name).is_file():
        raise ValueError(f"{done[-1]}: no {trained.file_name}; it was written by a {'LoRA' if trained.config.full else '--full'} run")
    latest, state, damage = None, None, None
    for candidate in reversed(done):  # a checkpoint cut short (full disk, killed copy): the newest intact one
        state, problem = _intact(candidate, trained.file_name)
        if state is not None:
            latest = candidate
            break
        damage = damage or f"{candidate.relative_to(output)} is damaged ({problem})"
    if latest is None:
        raise ValueError(f"--resume: {damage}, and no earlier checkpoint in {output / 'checkpoints'} is intact; "
                         "drop --resume and add --overwrite to start again")
    if damage and clear:
        print(f"{damage}; resuming from {latest.name}", file=sys.stderr)
    trained.load(load_file(str(latest / trained.file_name)))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if clear:  # the main process speaks for all
        print(f"resuming from {latest} (step {state['step']})", file=sys.stderr)
        then, now = state.get("cpu_setup"), cpu_setup(trained.dit)
        if then and now and then != now:
            print(f"warning: resuming with {_describe(now)}; {latest.name} was trained with {_describe(then)}: the "
                  "result will not be bit-identical to an uninterrupted run "
                  f"(OMP_NUM_THREADS={then['threads']} sets the threads)", file=sys.stderr)
    return int(state["step"])


def _intact(checkpoint: Path, file_name: str) -> tuple[dict | None, str]:
    """(its state.pt, "") when the checkpoint's weights and state read whole, else (None, what is wrong)."""
    from ..loading.files import read_safetensors_header

    try:
        read_safetensors_header(checkpoint / file_name)  # header and data spans against the file size
        return torch.load(checkpoint / "state.pt", weights_only=True), ""  # never unpickle code
    except Exception as e:  # noqa: BLE001 -- any unreadable part makes the checkpoint unusable
        return None, " ".join(str(e).split())[:200] or type(e).__name__


def cpu_setup(dit: nn.Module) -> dict | None:
    """What a CPU run's rounding depends on besides the data and the seed: the torch threads
    (kernels split their sums by it) and torch's version (None on a GPU: not tracked there)."""
    if compute_device(dit).type != "cpu":
        return None
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def _describe(setup: dict) -> str:
    return f"{setup['threads']} CPU thread(s) and torch {setup['torch']}"


def save_final(path: Path, trained: Trainable, config: TrainConfig, step: int, items: int, base_model: str) -> None:
    """The run's result (`output.final_file`), its metadata saying what made it."""
    from safetensors.torch import save_file

    metadata = {"format": "wanx-full" if config.full else "wanx-lora", "base_model": base_model, "steps": str(step),
                "dataset_items": str(items)}
    if not config.full:
        metadata.update({"rank": str(config.lora_rank), "targets": ",".join(config.targets),
                         "alpha": str(config.lora_alpha if config.lora_alpha is not None else config.lora_rank)})
    if config.expert:  # which Wan2.2 expert, and the timesteps it saw
        metadata.update({"expert": config.expert, "timesteps": "{:g}-{:g}".format(*config.timestep_range)})
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with writing(path, RESUME_AFTER_WRITE_FAILURE, tmp):
            save_file(trained.state(config.lora_format), str(tmp), metadata=metadata)
            if config.full and hasattr(trained.dit, "config"):  # so the weights load on their own (head count)
                import json

                from ..configs import official_config_json

                (path.parent / "config.json").write_text(
                    json.dumps(official_config_json(trained.dit.config), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
    finally:  # stopped while writing (Ctrl-C): no half file left beside the checkpoints
        tmp.unlink(missing_ok=True)


def run_settings(config: TrainConfig, dit_config, base_model: str = "") -> dict:
    """What a checkpoint's weights depend on: a resumed run must have the same."""
    import dataclasses
    import json

    lora = not config.full
    return {"full": config.full, "expert": config.expert, "base_model": base_model,
            "lora_rank": config.lora_rank if lora else None,
            "lora_alpha": float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank) if lora else None,
            "targets": list(config.targets) if lora else None,
            "lora_blocks": config.lora_blocks if lora else None,
            "dit": json.loads(json.dumps(dataclasses.asdict(dit_config)))}  # tuples as JSON lists, as read back


def check_resume(output: Path, settings: dict) -> None:
    """Compare this run's `run_settings` with those of the checkpoint --resume continues, naming
    the flag that differs (before any weight is loaded). Checkpoints written before wanx stored
    them are checked by shape as they load."""
    import json

    checkpoints = list_checkpoints(Path(output))
    if not checkpoints or not (checkpoints[-1] / SETTINGS_FILE).is_file():
        return
    latest = checkpoints[-1]
    saved = json.loads((latest / SETTINGS_FILE).read_text(encoding="utf-8"))

    def describe(dit: dict) -> str:
        return f"{dit.get('model_type')} DiT, dim {dit.get('dim')}, {dit.get('num_layers')} layers"

    flags = {"full": "--full", "expert": "--expert", "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha",
             "targets": "--targets", "lora_blocks": "--lora-blocks", "dit": "--model"}
    for key, flag in flags.items():
        mine, theirs = settings.get(key), saved.get(key)
        if key not in saved or mine == theirs:
            continue
        if key == "dit":
            raise ValueError(f"--resume: {latest} was trained on {saved.get('base_model') or 'another model'} "
                             f"({describe(theirs)}); this --model {settings.get('base_model')} is a {describe(mine)}: "
                             "give the model it was trained on")
        if key == "full":
            raise ValueError(f"--resume: {latest} holds a {'--full' if theirs else 'LoRA'} run; "
                             f"{'add' if theirs else 'drop'} --full to continue it")
        if theirs is None:  # e.g. --expert on a run of one DiT
            raise ValueError(f"--resume: {latest} was trained without {flag}: drop it to continue the run")
        raise ValueError(f"--resume: {latest} was trained with {flag} {_shown(theirs)}; this run has {flag} "
                         f"{_shown(mine)}: give {flag} {_shown(theirs)} to continue it")


def _shown(value) -> str:
    """A setting as it is written on the command line."""
    if isinstance(value, list):
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)

