"""A training run as one library call, what `wanx train` does after reading its flags and what
`python -m wanx.demo.build` calls for each DiT phase: resolve the model (and with Wan2.2 A14B
the expert and its timesteps), check the prepared cache, the LoRA targets, a resumed run's
settings and the validation plan, all before any weight is loaded; then make the output
folder, load the DiT as the runtime says (precision, FP8, blocks streamed under a budget) and
`recipe.train` it.

Errors name what was given by the names in `names` (parameter names by default; the CLI passes
its flags). The checks inside the recipe (`output.check_output`, `checkpoint.check_resume`,
`trainable.check_targets`) still speak of `wanx train`'s flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .recipe import TrainConfig

# How errors spell each parameter of `run` (the CLI passes `wanx train`'s flags instead).
PARAMETERS = {"model": "model", "expert": "config.expert", "output": "config.output",
              "validation": "validation", "offload": "runtime.offload"}


@dataclass(frozen=True)
class ValidationRequest:
    """Validation videos asked for, before `validation.plan_validation` checks them against the
    model (None: the model's wanx-defaults.json, then `validation.VALIDATION_DEFAULTS`)."""

    prompts: list[str]
    negative_prompt: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    frames: int | None = None
    steps: int | None = None


def run(config: TrainConfig, runtime: Runtime, *, model: str | Path, source: str = "huggingface",
        validation: ValidationRequest | None = None, progress: bool = True,
        names: Mapping[str, str] | None = None) -> Path:
    """Train `model`'s DiT (a folder, a model id, `tiny`, `demo`) on `config.data` and return the
    result's path (`output.final_file`). `runtime`: device and dtype of the frozen weights,
    `quantize` ("fp8": frozen block weights in FP8), `offload` ("blocks": the DiT stays in host
    memory and its blocks visit the device within `vram_budget`, "auto" for one from the free
    memory; "none"/"auto": resident). `config.expert` ("high"/"low") chooses a Wan2.2 A14B
    expert, trained on its own timesteps (`config.timestep_range` is set from the model's
    boundary). `validation` with `config.validate_every`: videos every N steps (T2V models)."""
    from accelerate import Accelerator

    from ..hub import find_components, resolve_model
    from ..loading import load_model
    from ..paths import make_folder, remove_empty
    from ..runtime import apply
    from .batches import cached_items
    from .checkpoint import check_resume, run_settings
    from .output import check_output
    from .prepare import check_cache
    from .recipe import train

    names = {**PARAMETERS, **(names or {})}
    runtime.check(names=names)  # the table of choices that cannot go together, as for a generation
    if runtime.offload == "model":
        raise ValueError(f"{names['offload']} 'model' moves whole networks between phases of a generation; "
                         "training keeps the DiT resident ('none') or streams its blocks ('blocks')")
    if validation is not None and not config.validate_every:
        raise ValueError(f"{names['validation']} needs validate_every (the steps between validation videos)")
    check_output(config.output, resume=config.resume, overwrite=config.overwrite, full=config.full)
    items = cached_items(config.data)  # no prepared cache: say so before loading the model
    files = find_components(resolve_model(model, source=source))
    config, dit_file = _choose_expert(config, files, model, validation, names)
    check_cache(items, files)
    if not config.full:  # on a DiT of no memory (meta): its layer names
        _check_targets(files, config.targets, config.lora_blocks)
    if config.resume:
        check_resume(config.output, run_settings(config, files.dit_config, str(model)))
    plan = None
    if validation is not None:
        from .validation import plan_validation

        plan = plan_validation(files, validation.prompts, negative_prompt=validation.negative_prompt,
                               size=validation.size, frames=validation.frames, steps=validation.steps)

    accelerator = Accelerator(cpu=runtime.device.type == "cpu", mixed_precision=config.mixed_precision)
    created = make_folder(config.output, names["output"])
    try:
        device = accelerator.device if runtime.device.type != "cpu" else runtime.device  # one GPU per process
        streamed = runtime.offload == "blocks"
        dit = load_model(dit_file, dtype=runtime.dtype, device="cpu" if streamed else device,
                         quantize=runtime.quantize, progress=progress and accelerator.is_main_process)
        budget = runtime.vram_budget  # with "blocks": frozen blocks live in host memory and visit the device
        if streamed and budget == "auto":
            budget = training_budget(dit, device, config, items)
        # the same transforms, in the same order, as a generation (here: placement only)
        apply(dataclasses.replace(runtime, device=device), {"dit": dit}, offload="blocks" if streamed else "none",
              budget=budget if streamed else 0)
        validate = None
        if plan is not None:
            from .validation import Validator

            validate = Validator(dit, files, runtime, plan, output=config.output, progress=progress)
        result = train(dit, config, progress=progress, base_model=str(model), accelerator=accelerator,
                       validate=validate)
        # Several processes: the process group ends here, in order, rather than in the interpreter's
        # exit, where gloo's threads could still be running ("terminate called without an active
        # exception", seen under load in tests/training/test_processes.py).
        accelerator.end_training()
        return result
    finally:
        remove_empty(created)  # folders made here and left empty (a failed or stopped start)


def _choose_expert(config: TrainConfig, files, model, validation, names: Mapping[str, str]):
    """(config, the DiT file to train): with Wan2.2 A14B one expert, on the timesteps it runs at
    generation (the split is the model's boundary)."""
    if files.moe != bool(config.expert):
        raise ValueError(f"{model} has two experts (Wan2.2 A14B): choose the one to train with {names['expert']} "
                         "high|low" if files.moe else
                         f"{names['expert']} is for a model with two experts (Wan2.2 A14B); {model} has one DiT")
    if not config.expert:
        return config, files.dit
    if config.expert not in ("high", "low"):
        raise ValueError(f"{names['expert']} is 'high' or 'low', got {config.expert!r}")
    from ..tasks import default_task

    if validation is not None:
        raise ValueError(f"validation videos need both experts: drop {names['validation']} with {names['expert']}")
    boundary = 1000 * files.defaults.get("boundary", default_task(files.model_type, 2).boundary)
    high = config.expert == "high"
    config = dataclasses.replace(config, timestep_range=(boundary, 1000.0) if high else (0.0, boundary))
    return config, files.dit if high else files.dit_low


def _check_targets(files, targets: tuple[str, ...], lora_blocks: str = "main") -> None:
    import torch

    from ..models.transformer import WanDiT
    from .trainable import LORA_BLOCKS, check_targets

    if lora_blocks not in LORA_BLOCKS:
        raise ValueError(f"--lora-blocks is one of {', '.join(LORA_BLOCKS)}, got {lora_blocks!r}")
    with torch.device("meta"):
        check_targets(WanDiT(files.dit_config), targets, LORA_BLOCKS[lora_blocks])


def training_budget(dit, device, config: TrainConfig, items: list[Path]) -> int:
    """The automatic `vram_budget` of a streamed DiT: the device's free memory (the DiT is in
    host memory still) less a training step's work (`training_work`) and the placement margin.
    On a CPU host and device are one memory, so streaming a block "in" copies it within the
    same memory and saves nothing: every block stays resident (the DiT's own size), and only an
    explicit budget streams there."""
    from ..memory.estimate import available_memory
    from ..memory.placement import auto_budget

    if device.type == "cpu":
        return sum(t.numel() * t.element_size() for t in (*dit.parameters(), *dit.buffers()))
    return auto_budget(available_memory(device), training_work(dit.config, config, items))


def training_work(dit_config, config: TrainConfig, items: list[Path]) -> int:
    """Bytes a training step needs on the device besides the frozen weights, for the largest
    prepared item: the activations autograd keeps for the backward pass and the trained weights'
    gradients and AdamW moments. A rough upper estimate, not a measurement: each block keeps
    about what `memory.estimate` counts as one block's live forward bytes per token, and the
    backward pass of a block needs as much again; with gradient checkpointing only the fp32
    block inputs are kept (none on the device with offload_activations) and one block is
    recomputed (its forward and backward) at a time."""
    from safetensors import safe_open

    shapes = []
    for path in items:  # headers only
        with safe_open(str(path), framework="pt") as fh:
            shapes.append(tuple(fh.get_slice("latents").get_shape()))  # [C, F', h, w]
    frames, height, width = max(shapes, key=lambda s: s[1] * s[2] * s[3])[1:]
    pt, ph, pw = dit_config.patch_size
    tokens = config.batch_size * ((frames // pt) * (height // ph) * (width // pw) + dit_config.text_len)
    per_token = 4 * 2 * dit_config.dim + 4 * (dit_config.dim + 2 * dit_config.ffn_dim)  # fp32: the upper bound
    if not config.gradient_checkpointing:
        kept = (dit_config.num_layers + 1) * per_token
    else:
        kept = 2 * per_token + (0 if config.offload_activations else dit_config.num_layers * 4 * dit_config.dim)
    trained = 0
    if config.full:  # fp32 gradient and the two AdamW moments of every weight
        trained = 3 * 4 * _parameter_count(dit_config)
    return tokens * kept + trained


def _parameter_count(dit_config) -> int:
    import torch

    from ..models.transformer import WanDiT

    with torch.device("meta"):
        return sum(p.numel() for p in WanDiT(dit_config).parameters())
