"""Wan's flow-matching objective: x_t = (1 - s) x0 + s eps, the DiT predicts eps - x0, s from
the shifted schedule s = shift t / (1 + (shift - 1) t) with t uniform (DiffSynth samples the
same grid) or logit-normal, timestep = 1000 s.

On a VACE model the reference images' latent frames go in front of the clip's, noised with
them, as at generation (where they are noise in front, dropped after the last step) and as
DiffSynth-Studio trains; the loss is the clip's frames' alone: the references are inputs, and
a LoRA should not learn to repaint them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .recipe import TrainConfig


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
    extra = {k: batch[k] for k in ("clip_features", "y", "vace_context") if k in batch}
    lead = 0  # VACE reference latent frames in front: the context's first channels there
    if "vace_context" in batch:
        lead = batch["vace_context"].shape[2] - x0.shape[2]
        x0 = torch.cat([batch["vace_context"][:, : x0.shape[1], :lead].to(x0.dtype), x0], dim=2)
    if config.caption_dropout > 0:  # drawn only when asked, so other runs keep their random stream
        keep = (torch.rand(x0.shape[0], generator=generator) >= config.caption_dropout).to(context.device)
        context = torch.where(keep.view(-1, 1, 1), context, batch["empty_text"])
    sigma_range = tuple(t / 1000 for t in config.timestep_range)
    sigma = torch.stack([sample_sigma(generator, config.shift, config.timesteps, sigma_range)
                         for _ in range(x0.shape[0])])
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.to(x0.device).view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    prediction = dit(x_t, (sigma * 1000).to(x0.device), context, **extra)
    per_item = (prediction.float() - (noise - x0).float())[:, :, lead:].pow(2).flatten(1).mean(1)
    if config.weighting == "gaussian":
        per_item = per_item * gaussian_weight(sigma, config.shift).to(per_item.device)
    return per_item.mean()

