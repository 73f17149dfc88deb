"""Validation videos during training: the DiT being trained (its LoRA live) generates the
given prompts every N steps into OUTPUT/validation/step-N/, so a run can be judged by eye
while it goes. The settings are checked by the pipeline's own rules before training starts
(`plan_validation`); the VAE and text encoder are loaded at the first validation, not before."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# A quick look, not a final render: used where neither a flag nor the model's
# wanx-defaults.json says otherwise.
VALIDATION_DEFAULTS = {"width": 832, "height": 480, "num_frames": 33, "num_inference_steps": 30}
# How `wanx train` spells each pipeline keyword in errors.
FLAGS = {"prompt": "--validation-prompts", "negative_prompt": "--validation-negative-prompt",
         "width": "--validation-size width", "height": "--validation-size height", "num_frames": "--validation-frames",
         "num_inference_steps": "--validation-steps", "seed": "--seed"}


@dataclass
class ValidationSettings:
    """Resolved and checked: what every validation generates."""

    prompts: list[str]
    negative_prompt: str | None  # None: no guidance (the model's defaults turn it off)
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    seed: int = 0


def plan_validation(files, prompts: list[str], *, negative_prompt: str | None = None,
                    size: tuple[int, int] | None = None, frames: int | None = None, steps: int | None = None,
                    seed: int = 0) -> ValidationSettings:
    """Check the validation settings for the model `files` (hub.ModelFiles) before any weight is
    loaded: the pipeline's request rules (`plan_request`: size, frames, steps) and each prompt's
    token count, the negative prompt's included. Unset settings come from the model folder's
    wanx-defaults.json, then `VALIDATION_DEFAULTS` (the negative prompt: the official one)."""
    from ..pipeline import plan_request
    from ..text import Tokenizer

    from ..tasks import default_task

    if default_task(files.model_type, 2 if files.moe else 1).needs:  # a prompt alone cannot make the video
        raise ValueError("validation videos are made for T2V models; I2V validation needs an image per prompt "
                         "(not supported yet): drop --validation-prompts")
    own = files.defaults
    width, height = size if size is not None else (own.get("width", VALIDATION_DEFAULTS["width"]),
                                                   own.get("height", VALIDATION_DEFAULTS["height"]))
    frames = frames if frames is not None else own.get("num_frames", VALIDATION_DEFAULTS["num_frames"])
    steps = steps if steps is not None else own.get("num_inference_steps", VALIDATION_DEFAULTS["num_inference_steps"])
    plan = plan_request(files.model_type, prompts[0], negative_prompt, names=FLAGS, model_defaults=own,
                        experts=2 if files.moe else 1, clip=files.dit_config.clip, width=width, height=height,
                        num_frames=frames, num_inference_steps=steps, seed=seed)
    texts = [*prompts, *([plan.negative_prompt] if plan.negative_prompt is not None else [])]
    limit = files.dit_config.text_len
    too_long = Tokenizer(files.tokenizer).first_too_long(texts, limit)
    if too_long:
        k, count = too_long
        if k < len(prompts):
            shown = prompts[k] if len(prompts[k]) <= 40 else prompts[k][:37] + "..."
            raise ValueError(f"--validation-prompts: {shown!r} has {count} tokens; this model reads at most {limit}: "
                             "shorten it")
        where = "--validation-negative-prompt" if negative_prompt is not None else \
            "the default negative prompt (" + ("the model's wanx-defaults.json" if "negative_prompt" in own
                                               else "the official one") + ")"
        raise ValueError(f"{where} has {count} tokens; this model reads at most {limit}: give a shorter "
                         "--validation-negative-prompt (\"\" for the empty one)")
    return ValidationSettings(prompts=list(prompts), negative_prompt=plan.negative_prompt, width=plan.width,
                              height=plan.height, num_frames=plan.num_frames, num_inference_steps=plan.steps,
                              seed=plan.seed)


class Validator:
    def __init__(self, dit, files, runtime, settings: ValidationSettings, *, output: Path, progress: bool = True):
        self.dit, self.files, self.runtime, self.settings = dit, files, runtime, settings
        self.output = Path(output)
        self.progress = progress
        self._pipe = None

    def __call__(self, step: int) -> list[Path]:
        from ..pipeline import WanPipeline

        if self._pipe is None:
            from ..loading import load_model
            from ..text import TextEncoder, Tokenizer

            device = self.runtime.device
            vae = load_model(self.files.vae, dtype=self.runtime.vae_dtype, device=device)
            t5 = load_model(self.files.text_encoder, dtype=self.runtime.dtype, device=self.runtime.text_device)
            text_encoder = TextEncoder(t5, Tokenizer(self.files.tokenizer), device=self.runtime.text_device)
            self._pipe = WanPipeline(self.dit, vae, text_encoder, runtime=self.runtime, name="validation")
            self._pipe.defaults = dict(self.files.defaults)  # the model's guidance, shift and sampler
        folder = self.output / "validation" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        from .trainable import checkpointed, checkpointed_offloaded

        wrappers = list(self.dit.block_wrappers)  # checkpointing off: nothing to recompute without gradients
        self.dit.block_wrappers[:] = [w for w in wrappers if w is not checkpointed and w is not checkpointed_offloaded]
        s = self.settings
        written = []
        try:
            with torch.no_grad():
                for k, prompt in enumerate(s.prompts):
                    video = self._pipe(prompt, s.negative_prompt, width=s.width, height=s.height,
                                       num_frames=s.num_frames, num_inference_steps=s.num_inference_steps, seed=s.seed)
                    path = folder / f"{k}.mp4"
                    video.save(path)
                    written.append(path)
        finally:
            self.dit.block_wrappers[:] = wrappers
        if self.progress:
            print(f"\nvalidation: {len(written)} video(s) in {folder}", file=sys.stderr)
        return written
