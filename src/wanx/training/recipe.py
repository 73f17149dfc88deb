"""Training the Wan2.1 DiT on a prepared dataset (`wanx prepare`), top to bottom:
data (cached latents + text, batched per bucket) -> model (frozen DiT) + trainable LoRA, or
the whole DiT -> flow-matching loss -> loop (AdamW, gradient accumulation, LR schedule, one
process or many through `accelerate`) -> checkpoints (atomic, resumable bit for bit) -> the
LoRA file in the official/ComfyUI key format, which `wanx --lora`, diffusers and ComfyUI load.
This file holds the loop; each stage has its module: `batches` (the prepared items),
`trainable` (LoRA injection, initialisation), `loss`, `checkpoint` (saving, resuming) and
`output` (the run folder).

The objective is Wan's flow matching (`loss`): the DiT predicts eps - x0 from
x_t = (1 - s) x0 + s eps at timestep 1000 s.

Everything random in a step (timesteps, noise) comes from a generator seeded by the seed and
the global batch number, and the data order from the seed and the epoch. So a step is the same
whichever process runs it and whenever: a resumed run needs no RNG state to match a straight
one, and N processes match one process that accumulates N times as many micro-batches.

Bit for bit, that holds for the same prepared cache on the same CPU with the same torch and the
same number of torch threads: CPU kernels (oneDNN convolutions, BLAS, reductions) split their
sums by thread count, so another count rounds differently (the tiny model: 1e-7 in the first
step, a logged loss apart by step 8). Checkpoints record the thread count and torch version,
and a resume with others says so.
"""

from __future__ import annotations

import csv
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..memory.streaming import compute_device
from .batches import CachedDataset, cached_items
from .checkpoint import (RESUME_AFTER_WRITE_FAILURE, check_resume, resume, run_settings, save_checkpoint,
                         save_final)
from .loss import flow_matching_loss
from .output import check_output, clear_run, drop_later_validation, final_file
from .prepare import writing
from .trainable import Trainable, checkpointed, checkpointed_offloaded

TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


@dataclass
class TrainConfig:
    data: Path  # the dataset folder (its .wanx-cache) or a cache folder
    output: Path
    full: bool = False  # train every DiT weight instead of a LoRA
    from_scratch: bool = False  # with full: start from Wan's random initialisation, not the loaded weights
    lora_rank: int = 32
    lora_alpha: float | None = None  # default: the rank (scale 1)
    targets: tuple[str, ...] = TARGETS
    lora_blocks: str = "main"  # a VACE model's: "main", "vace" (its VACE blocks) or "both" (trainable.LORA_BLOCKS)
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # or "cosine" (to 0 at the last step); both after warmup
    warmup_steps: int = 0
    steps: int | None = 100
    epochs: float | None = None  # instead of steps: passes over the dataset (x repeats)
    batch_size: int = 1  # items per micro-batch, all from one bucket
    grad_accum: int = 1
    repeats: int = 1  # times each item is seen per epoch
    shift: float = 5.0
    seed: int = 0
    timesteps: str = "uniform"  # or "logit-normal" (t = sigmoid(N(0, 1)), then shifted)
    weighting: str = "none"  # or "gaussian": DiffSynth's loss weight, highest mid-schedule
    caption_dropout: float = 0.0  # share of items trained with the empty prompt's embedding (for guidance)
    lora_format: str = "official"  # or "diffusers"
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    offload_activations: bool = False  # with checkpointing: the kept block inputs wait in host memory
    mixed_precision: str = "no"  # or "bf16"/"fp16": autocast of the forward pass
    save_every: int | None = None
    keep: int = 2
    resume: bool = False
    overwrite: bool = False  # clear a previous run's files in `output` first (see `clear_run`)
    validate_every: int | None = None
    # Wan2.2 A14B: one expert trained on its own timesteps, [low, high) of 0..1000, split at the
    # boundary ("high" or "low", recorded in the file; None: one DiT, every timestep)
    expert: str | None = None
    timestep_range: tuple[float, float] = (0.0, 1000.0)



# -- loop --------------------------------------------------------------------------------


def lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler == "cosine":
            span = max(1, total - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))
        return 1.0
    return factor


def total_steps(config: TrainConfig, dataset: CachedDataset, processes: int) -> int:
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * dataset.batches_per_epoch / (config.grad_accum * processes)))
    return int(config.steps)


def train(dit: nn.Module, config: TrainConfig, *, progress: bool = True, base_model: str = "",
          accelerator=None, validate: Callable[[int], None] | None = None) -> Path:
    """Train on `dit` and write the LoRA `output/<output's name>.safetensors`
    (`model.safetensors` with `full`); returns its path. `accelerator`: an
    `accelerate.Accelerator` (default: one made here, which is one process unless started by
    `accelerate launch`/`torchrun`). `validate(step)` is called on the main process every
    `validate_every` steps."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    device = compute_device(dit)
    if accelerator is None:
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=config.mixed_precision)
    processes, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    output = Path(config.output)
    check_output(output, resume=config.resume, overwrite=config.overwrite, full=config.full)
    settings = run_settings(config, dit.config, base_model) if hasattr(dit, "config") else {}
    if config.resume:
        check_resume(output, settings)
    dataset = CachedDataset(cached_items(config.data), config.batch_size, config.repeats, config.seed,
                            empty_text=config.caption_dropout > 0)
    steps = total_steps(config, dataset, processes)
    accelerator.wait_for_everyone()  # every process has looked at the folder before it changes
    if main:
        if config.overwrite:
            clear_run(output, config.full)
        output.mkdir(parents=True, exist_ok=True)
    if config.gradient_checkpointing:
        dit.block_wrappers.insert(0, checkpointed_offloaded if config.offload_activations else checkpointed)
    trained = Trainable(dit, config)
    optimizer = torch.optim.AdamW(trained.params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps))
    accelerator.wait_for_everyone()
    step = resume(output, trained, optimizer, scheduler, clear=main) if config.resume else 0
    if config.resume and main:  # validation videos of the steps done again go with their log rows
        drop_later_validation(output, step)
    log = _Log(output, step, enabled=main)
    bar = tqdm(total=steps, initial=step, desc="training", unit="step", disable=not progress or not main)
    per_step = config.grad_accum * processes
    interrupt = _StepBoundaryInterrupt(enabled=processes == 1)
    try:
        while step < steps:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            total, samples = torch.zeros((), device=device), 0
            for micro in range(config.grad_accum):
                index = step * per_step + micro * processes + rank  # the global micro-batch
                items = dataset.batch(index)
                batch = dataset.load(items, device)
                generator = torch.Generator().manual_seed(config.seed * 2**32 + index)
                with accelerator.autocast():
                    loss = flow_matching_loss(dit, batch, config, generator) / config.grad_accum
                loss.backward()
                total += loss.detach()
                samples += len(items)
            if processes > 1:  # the mean gradient over processes, as one process would have summed
                for p in trained.params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                total = accelerator.reduce(total, reduction="mean")
                samples = int(accelerator.reduce(torch.tensor(samples, device=device), reduction="sum"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - start
            log.write(step, float(total), lr, seconds, samples / seconds)
            bar.set_postfix(loss=f"{float(total):.4f}")
            bar.update(1)
            if config.save_every and step % config.save_every == 0 and step < steps and main:
                save_checkpoint(output, step, trained, optimizer, scheduler, config.keep, settings)
            if validate is not None and config.validate_every and step % config.validate_every == 0 and main:
                validate(step)
            interrupt.check()
            accelerator.wait_for_everyone()
    finally:
        interrupt.restore()
        bar.close()
        log.close()
    path = final_file(output, config.full)
    if main:
        save_final(path, trained, config, step, len(dataset.files), base_model)
        save_checkpoint(output, step, trained, optimizer, scheduler, config.keep, settings)
    accelerator.wait_for_everyone()
    return path


class _StepBoundaryInterrupt:
    """Ctrl-C stops a one-process run after the step in progress (its checkpoint written
    whole), not inside it: a KeyboardInterrupt raised inside torch's C++ (while a checkpoint is
    pickled, say) can come out as another error, or leave a file half-written. A second Ctrl-C
    stops at once. Several processes keep the default: each would stop at a step of its own
    and leave the others waiting in a collective."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.previous = None
        if enabled and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nwanx: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class _Log:
    """log.csv (rows past a resumed step, left by a killed run, are dropped) and TensorBoard
    (`OUTPUT/tensorboard`) when it is installed."""

    COLUMNS = ["step", "loss", "lr", "seconds", "samples_per_s"]

    def __init__(self, output: Path, step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        path = output / "log.csv"
        rows = []
        if step and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.reader(fh)][1:]
            rows = [r for r in rows if r and int(r[0]) <= step]
        self.fh = open(path, "w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.fh)
        self.writer.writerows([self.COLUMNS, *rows])
        self.board = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(output / "tensorboard"), purge_step=step + 1 if step else None)
        except ImportError:  # tensorboard is optional
            pass

    def write(self, step: int, loss: float, lr: float, seconds: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        with writing(Path(self.fh.name), RESUME_AFTER_WRITE_FAILURE):
            self.writer.writerow([step, f"{loss:.6f}", f"{lr:.6g}", f"{seconds:.3f}", f"{samples_per_s:.3f}"])
            self.fh.flush()
        if self.board is not None:
            self.board.add_scalar("loss", loss, step)
            self.board.add_scalar("lr", lr, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.board is not None:
                self.board.close()

