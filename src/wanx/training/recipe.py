"""LoRA training of the Wan2.1 DiT on a prepared dataset (`wanx prepare`), top to bottom:
data (cached latents + text) -> model (frozen DiT) + trainable LoRA -> flow-matching loss ->
loop (AdamW, gradient accumulation) -> checkpoints (atomic, resumable bit for bit) -> the
LoRA file in the official/ComfyUI key format, which `wanx --lora`, diffusers and ComfyUI load.

The objective is Wan's: x_t = (1 - s) x0 + s eps, the DiT predicts eps - x0, s from the
shifted schedule s = shift t / (1 + (shift - 1) t) with t uniform (DiffSynth samples the same
grid), timestep = 1000 s.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..lora.formats import LoraModule
from ..memory.fp8 import FP8Linear
from ..lora.layer import LoraAdapter, attach

TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


@dataclass
class TrainConfig:
    data: Path  # the dataset folder (its .wanx-cache) or a cache folder
    output: Path
    lora_rank: int = 32
    lora_alpha: float | None = None  # default: the rank (scale 1)
    targets: tuple[str, ...] = TARGETS
    lr: float = 1e-4
    steps: int = 100
    grad_accum: int = 1
    shift: float = 5.0
    seed: int = 0
    timesteps: str = "uniform"  # or "logit-normal" (t = sigmoid(N(0, 1)), then shifted)
    lora_format: str = "official"  # or "diffusers"
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    save_every: int | None = None
    keep: int = 2
    resume: bool = False


# -- data --------------------------------------------------------------------------------


def cached_items(data: Path) -> list[Path]:
    """The prepared items: `data/.wanx-cache/*.safetensors`, or `data/*.safetensors`."""
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data}: no such dataset or cache folder")
    for folder in (data / ".wanx-cache", data):
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files
    raise ValueError(f"{data}: no prepared items; run `wanx prepare {data} --model ...` first")


def load_cached(path: Path) -> tuple[Tensor, Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(path))
    return state["latents"], state["context"]


# -- model + LoRA ------------------------------------------------------------------------


def add_trainable_lora(dit: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...],
                       generator: torch.Generator) -> dict[str, LoraAdapter]:
    """A trainable LoRA on every block Linear whose name ends in one of `targets`: down
    Kaiming-uniform, up zero (the model starts unchanged), scale alpha / rank."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    adapters = {}
    for name, layer in dit.named_modules():
        if isinstance(layer, (nn.Linear, FP8Linear)) and name.startswith("blocks.") \
                and name.endswith(tuple(f".{t}" for t in targets)):
            bound = 1 / math.sqrt(layer.in_features)
            down = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
            module = LoraModule(name, {"down": down, "up": torch.zeros(layer.out_features, rank),
                                       "alpha": torch.tensor(float(alpha if alpha is not None else rank))})
            adapter = LoraAdapter(module, 1.0, device=layer.weight.device, dtype=torch.float32)  # fp32 on any base
            adapter.down.requires_grad_(True)
            adapter.up.requires_grad_(True)
            attach(layer, "train", adapter)
            adapters[name] = adapter
    if not adapters:
        raise ValueError(f"--targets {','.join(targets)} match no Linear layer of the DiT's blocks "
                         "(names such as q, k, v, o, ffn.0, ffn.2, k_img)")
    return adapters


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


def checkpointed(block: nn.Module, *inputs):
    """Run a block without keeping its activations; they are recomputed for the backward
    pass (one block's activations alive at a time instead of all of them)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(block, *inputs, use_reentrant=False)


# -- loss --------------------------------------------------------------------------------


def flow_matching_loss(dit: nn.Module, x0: Tensor, context: Tensor, shift: float, generator: torch.Generator,
                       timesteps: str = "uniform") -> Tensor:
    if timesteps == "logit-normal":
        t = torch.sigmoid(torch.randn((), generator=generator))
    else:
        t = torch.rand((), generator=generator)
    sigma = shift * t / (1 + (shift - 1) * t)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = (1 - sigma) * x0 + sigma * noise
    prediction = dit(x_t, (sigma * 1000).reshape(1), context)
    return torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())


# -- loop --------------------------------------------------------------------------------


def train(dit: nn.Module, config: TrainConfig, *, progress: bool = True, base_model: str = "") -> Path:
    """Train a LoRA on `dit` (frozen) and write `output/lora.safetensors`; returns its path."""
    from tqdm.auto import tqdm

    items = cached_items(config.data)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    dit.requires_grad_(False)
    if config.gradient_checkpointing:
        dit.block_wrapper = checkpointed
    init = torch.Generator().manual_seed(config.seed)
    adapters = add_trainable_lora(dit, config.lora_rank, config.lora_alpha, config.targets, init)
    params = [p for a in adapters.values() for p in (a.down, a.up)]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    rng = torch.Generator().manual_seed(config.seed + 1)  # timesteps and noise
    step = 0
    if config.resume:
        step = _resume(output, adapters, optimizer, rng)
    log = open(output / "log.csv", "a", newline="", encoding="utf-8")
    writer = csv.writer(log)
    if step == 0:
        writer.writerow(["step", "loss", "lr", "seconds"])
    bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", disable=not progress)
    try:
        while step < config.steps:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.grad_accum):
                x0, context = load_cached(items[_item_index(step * config.grad_accum + micro, len(items), config.seed)])
                loss = flow_matching_loss(dit, x0[None], context[None], config.shift, rng,
                                          config.timesteps) / config.grad_accum
                loss.backward()
                total += loss.item()
            optimizer.step()
            step += 1
            writer.writerow([step, f"{total:.6f}", config.lr, f"{time.perf_counter() - start:.3f}"])
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update(1)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                _save_checkpoint(output, step, adapters, optimizer, rng, config.keep)
    finally:
        bar.close()
        log.close()
    path = output / "lora.safetensors"
    _save_lora(path, adapters, config, step, len(items), base_model)
    _save_checkpoint(output, step, adapters, optimizer, rng, config.keep)
    return path


def _item_index(sample: int, count: int, seed: int) -> int:
    """The dataset order: a fresh permutation per epoch from the seed, so it needs no state."""
    epoch, position = divmod(sample, count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return int(order[position])


def _save_lora(path: Path, adapters, config: TrainConfig, step: int, items: int, base_model: str) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "wanx-lora", "base_model": base_model, "rank": str(config.lora_rank),
                "alpha": str(config.lora_alpha if config.lora_alpha is not None else config.lora_rank),
                "targets": ",".join(config.targets), "steps": str(step), "dataset_items": str(items)}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(lora_state(adapters, config.lora_format), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _save_checkpoint(output: Path, step: int, adapters, optimizer, rng: torch.Generator, keep: int) -> None:
    """checkpoints/step-N/, written in a temporary folder and renamed: a crash never leaves a
    half-written checkpoint. Keeps the last `keep`."""
    from safetensors.torch import save_file

    root = output / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lora_state(adapters), str(tmp / "lora.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng.get_state(), "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(output: Path, adapters, optimizer, rng: torch.Generator) -> int:
    from safetensors.torch import load_file

    root = output / "checkpoints"
    for partial in root.glob(".step-*.partial"):  # left by a run killed while writing: never complete
        shutil.rmtree(partial, ignore_errors=True)
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    if not done:
        raise ValueError(f"{output}: no checkpoint to resume from (checkpoints/step-N/)")
    latest = done[-1]
    lora = load_file(str(latest / "lora.safetensors"))
    with torch.no_grad():
        for name, adapter in adapters.items():
            adapter.down.copy_(lora[f"diffusion_model.{name}.lora_A.weight"])
            adapter.up.copy_(lora[f"diffusion_model.{name}.lora_B.weight"])
    state = torch.load(latest / "state.pt", weights_only=True)  # never unpickle code
    optimizer.load_state_dict(state["optimizer"])
    rng.set_state(state["rng"])
    print(f"resuming from {latest} (step {state['step']})", file=sys.stderr)
    return int(state["step"])

