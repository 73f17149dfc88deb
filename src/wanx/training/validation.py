"""Validation videos during training: the DiT being trained (its LoRA live) generates the
given prompts every N steps into OUTPUT/validation/step-N/, so a run can be judged by eye
while it goes. The VAE and text encoder are loaded at the first validation, not before."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class Validator:
    def __init__(self, dit, files, runtime, prompts: list[str], *, output: Path, size: tuple[int, int] = (832, 480),
                 frames: int = 33, steps: int = 30, seed: int = 0, progress: bool = True):
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"--validation-frames {frames} must be 4k+1 (e.g. 17, 33, 81)")
        if files.model_type != "t2v":
            raise ValueError("validation videos are made for T2V models; I2V validation needs an image per prompt "
                             "(not supported yet): drop --validation-prompts")
        self.dit, self.files, self.runtime, self.prompts = dit, files, runtime, prompts
        self.output, self.size, self.frames, self.steps, self.seed = Path(output), size, frames, steps, seed
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
        folder = self.output / "validation" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        wrapper, self.dit.block_wrapper = self.dit.block_wrapper, None  # nothing to recompute without gradients
        written = []
        try:
            with torch.no_grad():
                for k, prompt in enumerate(self.prompts):
                    video = self._pipe(prompt, width=self.size[0], height=self.size[1], num_frames=self.frames,
                                       num_inference_steps=self.steps, seed=self.seed)
                    path = folder / f"{k}.mp4"
                    video.save(path)
                    written.append(path)
        finally:
            self.dit.block_wrapper = wrapper
        if self.progress:
            print(f"\nvalidation: {len(written)} video(s) in {folder}", file=sys.stderr)
        return written
