"""Training the Wan2.1 DiT on a prepared dataset (`wanx prepare`), top to bottom:
data (cached latents + text, batched per bucket) -> model (frozen DiT) + trainable LoRA, or
the whole DiT -> flow-matching loss -> loop (AdamW, gradient accumulation, LR schedule, one
process or many through `accelerate`) -> checkpoints (atomic, resumable bit for bit) -> the
LoRA file in the official/ComfyUI key format, which `wanx --lora`, diffusers and ComfyUI load.

The objective is Wan's: x_t = (1 - s) x0 + s eps, the DiT predicts eps - x0, s from the
shifted schedule s = shift t / (1 + (shift - 1) t) with t uniform (DiffSynth samples the same
grid) or logit-normal, timestep = 1000 s.

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
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..lora.formats import LoraModule
from ..lora.layer import LoraAdapter, attach
from ..memory.fp8 import FP8Linear
from ..memory.streaming import compute_device
from .prepare import writing

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


# -- data --------------------------------------------------------------------------------


def cached_items(data: Path) -> list[Path]:
    """The prepared items: `data/.wanx-cache/*.safetensors`, or `data/*.safetensors`."""
    from .prepare import EMPTY_TEXT_FILE

    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data}: no such dataset or cache folder")
    for folder in (data / ".wanx-cache", data):
        files = sorted(p for p in folder.glob("*.safetensors") if p.name != EMPTY_TEXT_FILE)
        if files:
            return files
    raise ValueError(f"{data}: no prepared items; run `wanx prepare {data} --model ...` first")


# a write that failed mid-run (a full disk, a file-size limit): the checkpoints kept are whole
RESUME_AFTER_WRITE_FAILURE = "make room and add --resume to continue from the last checkpoint"


class CachedDataset:
    """The prepared items, grouped by latent shape (their bucket): a micro-batch is stacked
    from one group. Every epoch is a fresh permutation from the seed; no item is dropped (a
    group's last batch may be smaller)."""

    def __init__(self, files: list[Path], batch_size: int = 1, repeats: int = 1, seed: int = 0,
                 empty_text: bool = False):
        from safetensors import safe_open
        from safetensors.torch import load_file

        from .prepare import EMPTY_TEXT_FILE, check_item

        self.files, self.batch_size, self.repeats, self.seed = files, batch_size, repeats, seed
        self.empty_text = None  # [L, text_dim]: the empty prompt, for caption dropout
        if empty_text:
            path = files[0].parent / EMPTY_TEXT_FILE
            if not path.is_file():
                raise ValueError(f"{path.parent}: no {EMPTY_TEXT_FILE} (caches made before wanx cached the empty "
                                 "prompt); run `wanx prepare` again, which adds it and keeps the items")
            self.empty_text = load_file(str(path))["context"]
        self.shapes, self.settings = [], set()
        for path in files:
            check_item(path)
            with safe_open(str(path), framework="pt") as fh:
                self.shapes.append(tuple(fh.get_slice("latents").get_shape()))
                self.settings.add((fh.metadata() or {}).get("settings", ""))
        counts: dict[tuple, int] = {}
        for shape in self.shapes:
            counts[shape] = counts.get(shape, 0) + repeats
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in counts.values())
        self._epoch, self._order = -1, []

    def batch(self, index: int) -> list[int]:
        """The items of global micro-batch `index` (epochs follow each other)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_batches(epoch)
        return self._order[position]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        indices = [i for i in range(len(self.files)) for _ in range(self.repeats)]
        batches, open_ = [], {}
        for k in torch.randperm(len(indices), generator=generator).tolist():
            shape = self.shapes[indices[k]]
            open_.setdefault(shape, []).append(indices[k])
            if len(open_[shape]) == self.batch_size:
                batches.append(open_.pop(shape))
        batches.extend(open_.values())  # the remainders, in the order their groups opened
        return batches

    def load(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        """x0 `[B, 16, F', h, w]`, context `[B, L, text_dim]` (zero-padded to the longest, as
        the DiT pads anyway), for caption dropout `empty_text` `[1, L, text_dim]` padded the
        same, and for I2V items clip_features and y."""
        from safetensors.torch import load_file

        states = [load_file(str(self.files[i])) for i in indices]
        texts = [s["context"] for s in states] + ([self.empty_text] if self.empty_text is not None else [])
        longest = max(t.shape[0] for t in texts)
        texts = [nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in texts]
        batch = {"x0": torch.stack([s["latents"] for s in states]), "context": torch.stack(texts[: len(states)])}
        if self.empty_text is not None:
            batch["empty_text"] = texts[-1][None].to(batch["context"].dtype)
        for key in ("clip_features", "y"):
            if key in states[0]:
                batch[key] = torch.stack([s[key] for s in states])
        return {k: v.to(device) for k, v in batch.items()}


# -- model + LoRA ------------------------------------------------------------------------


def add_trainable_lora(dit: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...],
                       generator: torch.Generator) -> dict[str, LoraAdapter]:
    """A trainable LoRA on every block Linear whose name ends in one of `targets`: down
    Kaiming-uniform, up zero (the model starts unchanged), scale alpha / rank. The adapters
    live where the DiT computes, resident even when its frozen blocks are streamed."""
    device = compute_device(dit)
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    check_targets(dit, targets)
    adapters = {}
    for name, layer in dit.named_modules():
        if isinstance(layer, (nn.Linear, FP8Linear)) and name.startswith("blocks.") \
                and name.endswith(tuple(f".{t}" for t in targets)):
            bound = 1 / math.sqrt(layer.in_features)
            down = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
            module = LoraModule(name, {"down": down, "up": torch.zeros(layer.out_features, rank),
                                       "alpha": torch.tensor(float(alpha if alpha is not None else rank))})
            adapter = LoraAdapter(module, 1.0, device=device, dtype=torch.float32)  # fp32 on any base
            adapter.down.requires_grad_(True)
            adapter.up.requires_grad_(True)
            attach(layer, "train", adapter)
            adapters[name] = adapter
    return adapters


def check_targets(dit: nn.Module, targets: tuple[str, ...]) -> None:
    """Each of `targets` must name block Linear layers of `dit` (a meta-device DiT will do):
    a misspelt one would otherwise train nothing where it was meant to."""
    paths = list(dict.fromkeys(name.split(".", 2)[2] for name, layer in dit.named_modules()
                               if isinstance(layer, (nn.Linear, FP8Linear)) and name.startswith("blocks.")))
    if not targets:  # paths: e.g. self_attn.q, in module order
        raise ValueError("--targets is empty; give block Linear layers such as q,k,v,o,ffn.0,ffn.2")
    for target in targets:
        if not any(f".{path}".endswith(f".{target}") for path in paths):
            short = dict.fromkeys(p.split(".", 1)[1] if p.startswith(("self_attn.", "cross_attn.")) else p for p in paths)
            raise ValueError(f"--targets: {target!r} matches no Linear layer of the DiT's blocks; valid: "
                             f"{', '.join(short)} (or self_attn.X / cross_attn.X for one attention)")


# official block module -> diffusers (the inverse of the loader's diffusers table for the
# layers LoRAs train; `read_lora` maps these names back, which the tests check)
_TO_DIFFUSERS = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0",
                 "k_img": "add_k_proj", "v_img": "add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def lora_state(adapters: dict[str, LoraAdapter], fmt: str = "official") -> dict[str, Tensor]:
    """The LoRA in the official/ComfyUI key format (`diffusion_model.…lora_A/lora_B/alpha`),
    or diffusers/PEFT (`transformer.blocks.N.attn1.to_q.lora_A.weight`, alpha/rank folded into B)."""
    state = {}
    for name, adapter in adapters.items():
        down = adapter.down.detach().float().cpu().contiguous()
        up = adapter.up.detach().float().cpu().contiguous()
        if fmt == "diffusers":
            block, rest = name.split(".", 2)[1], name.split(".", 2)[2]
            parts = rest.split(".", 1) if rest.startswith(("self_attn", "cross_attn")) else [rest]
            key = "transformer.blocks." + block + "." + ".".join(_TO_DIFFUSERS[p] for p in parts)
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, (up * adapter.scale).contiguous()
            continue
        key = f"diffusion_model.{name}"
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(adapter.scale * adapter.down.shape[0])
    return state


class Trainable:
    """What is trained: a LoRA (its adapters) or the whole DiT; saved and restored in one
    format, the official key names."""

    def __init__(self, dit: nn.Module, config: TrainConfig):
        self.dit, self.config = dit, config
        dit.requires_grad_(False)
        if config.full:
            if any(isinstance(m, FP8Linear) for m in dit.modules()):
                raise ValueError("--full trains every weight: load the DiT in bf16/fp32, not --fp8")
            if config.from_scratch:
                init_weights(dit, torch.Generator().manual_seed(config.seed))
            dit.requires_grad_(True)
            self.adapters = {}
            self.params = list(dit.parameters())
        else:
            init = torch.Generator().manual_seed(config.seed)
            self.adapters = add_trainable_lora(dit, config.lora_rank, config.lora_alpha, config.targets, init)
            self.params = [p for a in self.adapters.values() for p in (a.down, a.up)]

    def state(self, fmt: str = "official") -> dict[str, Tensor]:
        if self.config.full:
            return {k: v.detach().cpu().contiguous() for k, v in self.dit.state_dict().items()}
        return lora_state(self.adapters, fmt)

    def load(self, state: dict[str, Tensor]) -> None:
        if self.config.full:
            pairs = [(state.get(name), tensor) for name, tensor in self.dit.state_dict().items()]
        else:
            pairs = [(state.get(f"diffusion_model.{name}.lora_{ab}.weight"), tensor)
                     for name, adapter in self.adapters.items() for ab, tensor in (("A", adapter.down), ("B", adapter.up))]
        if any(saved is None or saved.shape != tensor.shape for saved, tensor in pairs):  # a checkpoint from before
            raise ValueError("--resume: the checkpoint was trained with other settings (another --model, --lora-rank, "
                             "--targets or --full); resume with the ones it was made with")
        with torch.no_grad():
            for saved, tensor in pairs:
                tensor.copy_(saved)

    @property
    def file_name(self) -> str:
        """The weights' name inside a checkpoint (the final file is `final_file`)."""
        return "model.safetensors" if self.config.full else "lora.safetensors"


@torch.no_grad()
def init_weights(dit: nn.Module, generator: torch.Generator) -> None:
    """Wan's start for training a DiT from nothing, every parameter drawn from `generator`
    (none kept from what was loaded): Xavier-uniform Linear weights and patch embedding, zero
    Linear biases, N(0, 0.02) text and time embeddings, a zero output layer (the untrained model
    predicts zero velocity instead of large random vectors), norms at 1 and 0, modulation
    N(0, 1/dim), and the patch embedding's bias as PyTorch draws a convolution's."""
    def uniform(tensor: Tensor, bound: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (2 * bound) - bound)

    def xavier(weight: Tensor) -> None:
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        uniform(weight, math.sqrt(6 / (fan_in + fan_out)))

    small = {id(m) for e in (dit.text_embedding, dit.time_embedding) for m in e.modules()}
    for module in dit.modules():
        own = dict(module.named_parameters(recurse=False))
        unknown = set(own) - {"weight", "bias"} if isinstance(module, (nn.Linear, nn.Conv3d)) else set()
        if unknown:  # e.g. a layer a transform swapped in: its extra state has no rule here
            raise ValueError(f"init_weights: no rule for {type(module).__name__}.{', '.join(sorted(unknown))}")
        if isinstance(module, nn.Linear):
            if id(module) in small:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
            else:
                xavier(module.weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv3d):
            xavier(module.weight)
            if module.bias is not None:
                uniform(module.bias, 1 / math.sqrt(module.weight[0].numel()))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__:
            for name, param in own.items():
                param.fill_(1.0 if name == "weight" else 0.0)
        else:
            for name, param in own.items():
                if name == "modulation":
                    param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
                elif name == "emb_pos":
                    param.zero_()
                else:
                    raise ValueError(f"init_weights: no rule for {type(module).__name__}.{name}")
    dit.head.head.weight.zero_()


def checkpointed(inner, block: nn.Module, *inputs):
    """A block wrapper (the first of `WanDiT.block_wrappers`): run a block without keeping its
    activations; they are recomputed for the backward pass (one block's activations alive at a
    time instead of all of them), through the wrappers inside (a streamed block loads again)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(inner, block, *inputs, use_reentrant=False)


def checkpointed_offloaded(inner, block: nn.Module, *inputs):
    """As `checkpointed`, and the block inputs it keeps wait in (pinned) host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpointed(inner, block, *inputs)


# -- loss --------------------------------------------------------------------------------


def sample_sigma(generator: torch.Generator, shift: float, timesteps: str = "uniform",
                 sigma_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """A shifted sigma; within `sigma_range` [lo, hi) (one Wan2.2 expert's share) drawn again
    until inside, so it follows the same distribution conditioned on the range (with the
    uniform draw: DiffSynth's timestep boundaries). The full range takes one draw, as always."""
    lo, hi = sigma_range
    while True:
        t = torch.sigmoid(torch.randn((), generator=generator)) if timesteps == "logit-normal" \
            else torch.rand((), generator=generator)
        sigma = shift * t / (1 + (shift - 1) * t)
        if (lo <= 0 and hi >= 1) or lo <= sigma < hi:
            return sigma


def gaussian_weight(sigma: Tensor, shift: float) -> Tensor:
    """DiffSynth's timestep weight: exp(-2 ((1000 s - 500) / 1000)^2) minus its minimum over
    the 1000-step shifted grid, scaled to mean 1 on that grid."""
    t = torch.linspace(1, 0, 1001)[:-1]
    grid = 1000 * shift * t / (1 + (shift - 1) * t)
    curve = lambda x: torch.exp(-2 * ((x - 500) / 1000) ** 2)  # noqa: E731
    low = curve(grid).min()
    return (curve(1000 * sigma) - low) * (1000 / (curve(grid) - low).sum())


def flow_matching_loss(dit: nn.Module, batch: dict[str, Tensor], config: TrainConfig,
                       generator: torch.Generator) -> Tensor:
    """The loss of one micro-batch; one timestep per item, noise from `generator` (CPU)."""
    x0 = batch["x0"]
    context = batch["context"]
    if config.caption_dropout > 0:  # drawn only when asked, so other runs keep their random stream
        keep = (torch.rand(x0.shape[0], generator=generator) >= config.caption_dropout).to(context.device)
        context = torch.where(keep.view(-1, 1, 1), context, batch["empty_text"])
    sigma_range = tuple(t / 1000 for t in config.timestep_range)
    sigma = torch.stack([sample_sigma(generator, config.shift, config.timesteps, sigma_range)
                         for _ in range(x0.shape[0])])
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.to(x0.device).view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    extra = {k: batch[k] for k in ("clip_features", "y") if k in batch}
    prediction = dit(x_t, (sigma * 1000).to(x0.device), context, **extra)
    per_item = (prediction.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
    if config.weighting == "gaussian":
        per_item = per_item * gaussian_weight(sigma, config.shift).to(per_item.device)
    return per_item.mean()


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
    step = _resume(output, trained, optimizer, scheduler, clear=main) if config.resume else 0
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
                _save_checkpoint(output, step, trained, optimizer, scheduler, config.keep, settings)
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
        _save_final(path, trained, config, step, len(dataset.files), base_model)
        _save_checkpoint(output, step, trained, optimizer, scheduler, config.keep, settings)
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


def _save_final(path: Path, trained: Trainable, config: TrainConfig, step: int, items: int, base_model: str) -> None:
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


def _checkpoints(output: Path) -> list[Path]:
    root = output / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(output: Path, step: int, trained: Trainable, optimizer, scheduler, keep: int,
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
                    "cpu_setup": _cpu_setup(trained.dit)}, tmp / "state.pt")
        if settings:
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    for old in _checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(output: Path, trained: Trainable, optimizer, scheduler, clear: bool = True) -> int:
    from safetensors.torch import load_file

    for partial in (output / "checkpoints").glob(".step-*.partial") if clear else ():  # left by a killed run
        shutil.rmtree(partial, ignore_errors=True)
    done = _checkpoints(output)
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
        _drop_later_validation(output, int(state["step"]))
        print(f"resuming from {latest} (step {state['step']})", file=sys.stderr)
        then, now = state.get("cpu_setup"), _cpu_setup(trained.dit)
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


def _cpu_setup(dit: nn.Module) -> dict | None:
    """What a CPU run's rounding depends on besides the data and the seed: the torch threads
    (kernels split their sums by it) and torch's version (None on a GPU: not tracked there)."""
    if compute_device(dit).type != "cpu":
        return None
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def _describe(setup: dict) -> str:
    return f"{setup['threads']} CPU thread(s) and torch {setup['torch']}"


# -- the output folder -------------------------------------------------------------------
# One folder holds one run: its result, log.csv, checkpoints/step-N/, validation/step-N/ and
# tensorboard/. A new run never writes over another's files (its log and result would not
# match the checkpoints left behind); it continues one (--resume) or clears it (--overwrite).

SETTINGS_FILE = "settings.json"  # in each checkpoint: what --resume must match
_LOG_HEADER = "step,loss,lr,seconds,samples_per_s"


def final_file(output: Path, full: bool = False) -> Path:
    """The run's result: the LoRA named after its folder (`runs/cat` -> `runs/cat/cat.safetensors`),
    so LoRAs of several runs keep apart names when stacked; `model.safetensors` with --full (a
    model folder's DiT, beside its config.json)."""
    output = Path(output)
    return output / ("model.safetensors" if full else f"{output.resolve().name or 'lora'}.safetensors")


def _wanx_file(path: Path) -> bool:
    """Whether a .safetensors file is the result of a `wanx train` run (its metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") in ("wanx-lora", "wanx-full")
    except Exception:  # not a safetensors file at all
        return False


def _wanx_log(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.readline().strip() == _LOG_HEADER


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
        if path.is_file() and _wanx_file(path):
            found.append(path)
        elif path.exists() and path == mine:
            raise ValueError(f"--output {output}: {path} is not a file wanx train wrote, and this run would write "
                             "over it; move it or choose another --output")
    if full and (output / "config.json").exists() and output / "model.safetensors" not in found:
        raise ValueError(f"--output {output}: a --full run writes config.json beside model.safetensors, and "
                         f"{output / 'config.json'} is another's; move it or choose another --output")
    log = output / "log.csv"
    if log.is_file() and not _wanx_log(log):
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
    for parent in (output, *output.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--output {output}: {parent} is a file, not a folder; choose another --output")
            break
    if resume and overwrite:
        raise ValueError("give --resume (continue the run in --output) or --overwrite (start it again), not both")
    checkpoints = _checkpoints(output) if output.is_dir() else []
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


def _drop_later_validation(output: Path, step: int) -> None:
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


def run_settings(config: TrainConfig, dit_config, base_model: str = "") -> dict:
    """What a checkpoint's weights depend on: a resumed run must have the same."""
    import dataclasses
    import json

    lora = not config.full
    return {"full": config.full, "expert": config.expert, "base_model": base_model,
            "lora_rank": config.lora_rank if lora else None,
            "lora_alpha": float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank) if lora else None,
            "targets": list(config.targets) if lora else None,
            "dit": json.loads(json.dumps(dataclasses.asdict(dit_config)))}  # tuples as JSON lists, as read back


def check_resume(output: Path, settings: dict) -> None:
    """Compare this run's `run_settings` with those of the checkpoint --resume continues, naming
    the flag that differs (before any weight is loaded). Checkpoints written before wanx stored
    them are checked by shape as they load."""
    import json

    checkpoints = _checkpoints(Path(output))
    if not checkpoints or not (checkpoints[-1] / SETTINGS_FILE).is_file():
        return
    latest = checkpoints[-1]
    saved = json.loads((latest / SETTINGS_FILE).read_text(encoding="utf-8"))

    def describe(dit: dict) -> str:
        return f"{dit.get('model_type')} DiT, dim {dit.get('dim')}, {dit.get('num_layers')} layers"

    flags = {"full": "--full", "expert": "--expert", "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha",
             "targets": "--targets", "dit": "--model"}
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


def kept_after_interrupt(output: Path) -> str | None:
    """What a stopped run left in `output` and how to go on, in words (None: nothing)."""
    output = Path(output)
    log, checkpoints = output / "log.csv", _checkpoints(output) if output.is_dir() else []
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
