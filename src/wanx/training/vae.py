"""Training a (small) Wan VAE from scratch, for models wanx builds itself (the demo model).

The objective of a VAE: L1 reconstruction of the clip through a latent sampled from the
encoder's posterior, plus a small KL term towards N(0, 1) so the latent space stays smooth
and centred for the DiT. Convolutions do not care where they are, so the VAE trains on random
crops (e.g. 32x32 pixels, 9 frames), far cheaper per step than whole 96x96x17 clips on a CPU;
it sees both the image path (frame 0) and the temporal path (the causal chunks). Pixels away
from the background weigh more (`foreground_weight`).
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..configs import frames_ok
from ..video import to_unit


@dataclass
class VAETrainConfig:
    data: Path  # a dataset folder (metadata.csv or captions; the captions are not used)
    output: Path
    steps: int = 2000
    batch_size: int = 4
    crop: int = 32  # pixels, a multiple of 8
    frames: int = 17  # 4k+1: as long as the videos it will decode. The causal decoder does not
    # generalise past its training length: trained on 5 (9) frames, its L1 on 17-frame clips
    # went from 0.02 on the first 5 (9) frames to 0.3-0.4 on the rest.
    lr: float = 1e-3  # peak, after warmup; cosine decay to 0 at the last step
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    kl_weight: float = 1e-4
    # Pixels far from their frame's background colour (the per-channel median) weigh this much
    # more in the L1. Without it a VAE trained on clips of a small object over a plain ground
    # (the demo's shapes: ~5% of the pixels) settled on decoding the background alone: the L1
    # is minimised by the median, and the object was too few pixels to pull it away.
    foreground_weight: float = 10.0
    from_scratch: bool = False  # re-initialise the weights for training first (`init_for_training`)
    # This share of the crops is centred on the foreground: a random 32-pixel crop of a 96-pixel
    # frame missed a 20-pixel shape about two times in three.
    on_foreground: float = 0.5
    still_weight: float = 0.0  # weight of `still_drift`: a still clip's latent frames stay alike
    seed: int = 0


def load_clips(data: Path, frames: int, *, captions: bool = False) -> list:
    """Every usable video of the dataset, decoded once: uint8 `[F, H, W, 3]` (with captions:
    `(frames, caption)` pairs)."""
    from ..video import read_video
    from .data import find_items

    clips = []
    for item in find_items(data, captions=captions):
        if item.kind != "video":
            continue
        video = read_video(item.path).frames
        if len(video) >= frames:
            clips.append((video, item.caption) if captions else video)
    if not clips:
        raise ValueError(f"{data}: no video with at least {frames} frames to train the VAE on")
    return clips


FOREGROUND_LEVELS = 24  # of 255: how far from the background colour a pixel is foreground


INITIAL_LOG_VAR = -10.0


@torch.no_grad()
def init_for_training(vae: nn.Module) -> None:
    """Weights a VAE can be trained from. With PyTorch's default initialisation the network
    passed almost nothing of its input (latent means differing by 0.03 between clips whose
    pixels differ by 0.5; the decoder as flat) and training sat at one flat output for
    hundreds of steps, then learnt the background alone. So: He-normal convolutions with zero
    biases; the last convolution of every residual block and the attention output at zero,
    so each block starts as its shortcut (the official code zeroes the attention output too);
    and the posterior's log-variance at INITIAL_LOG_VAR, since sampled noise of std 1 drowned
    the latent (the KL term widens it as far as reconstruction allows)."""
    from ..models.vae import AttentionBlock, ResidualBlock

    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            nn.init.zeros_(module.residual[-1].weight)
        elif isinstance(module, AttentionBlock):
            nn.init.zeros_(module.proj.weight)
    vae.conv1.bias[vae.config.z_dim:] = INITIAL_LOG_VAR  # conv1's second half of outputs: log-variance


def random_crops(clips: list[np.ndarray], count: int, crop: int, frames: int, generator: torch.Generator,
                 on_foreground: float = 0.0) -> tuple[Tensor, Tensor]:
    """(`[count, 3, frames, crop, crop]` in [-1, 1], foreground mask `[count, 1, frames, crop,
    crop]`) from random clips, times and places; a share `on_foreground` of the crops is
    centred on a random foreground pixel of its first frame. Foreground: a pixel more than
    FOREGROUND_LEVELS from its frame's per-channel median colour."""
    videos, masks = [], []
    for _ in range(count):
        clip = clips[int(torch.randint(len(clips), (), generator=generator))]
        t = int(torch.randint(len(clip) - frames + 1, (), generator=generator))
        span = clip[t:t + frames]
        background = np.median(span.reshape(frames, -1, 3), axis=1)[:, None, None]  # [F, 1, 1, 3]
        far = np.abs(span.astype(np.int16) - background).max(-1) > FOREGROUND_LEVELS  # [F, H, W]
        y = int(torch.randint(clip.shape[1] - crop + 1, (), generator=generator))
        x = int(torch.randint(clip.shape[2] - crop + 1, (), generator=generator))
        if float(torch.rand((), generator=generator)) < on_foreground and far[0].any():
            ys, xs = np.nonzero(far[0])
            k = int(torch.randint(len(ys), (), generator=generator))
            y = min(max(int(ys[k]) - crop // 2, 0), clip.shape[1] - crop)
            x = min(max(int(xs[k]) - crop // 2, 0), clip.shape[2] - crop)
        videos.append(span[:, y:y + crop, x:x + crop])
        masks.append(torch.from_numpy(far[:, y:y + crop, x:x + crop]))
    return torch.stack([to_unit(v) for v in videos]), torch.stack(masks)[:, None].float()


def vae_loss(vae: nn.Module, video: Tensor, kl_weight: float, generator: torch.Generator,
             weight: Tensor | None = None, still_weight: float = 0.0) -> tuple[Tensor, float, float]:
    """(loss, L1, KL) of one batch: reconstruction through a posterior sample. `weight`
    (broadcast to the video) makes the reconstruction term a weighted mean; the L1 reported
    is the plain mean. `still_weight`: see `still_drift`."""
    mu, log_var = vae.posterior(video)
    log_var = log_var.clamp(-30, 20)
    noise = torch.randn(mu.shape, generator=generator).to(mu.device)
    z = mu + noise * (0.5 * log_var).exp()
    # The loss sees the clamped video inference gives, but the gradient passes the clamp
    # (straight through): with a plain clamp, a decoder pushed out of range everywhere got no
    # gradient back (L1 stuck at 0.5); without any clamp it was punished for overshooting
    # black and white and sat at a flat output for hundreds of steps.
    raw = vae.decode(vae.normalize(z), clamp=False)
    recon = raw + (raw.clamp(-1, 1) - raw).detach()
    error = (recon - video).abs()
    l1 = error.mean()
    if weight is not None:
        weight = weight.expand_as(error)
        reconstruction = (error * weight).sum() / weight.sum()
    else:
        reconstruction = l1
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).mean()
    loss = reconstruction + kl_weight * kl
    if still_weight and video.shape[2] > 1:
        loss = loss + still_weight * still_drift(vae, video[:, :, :1].expand_as(video), mu.detach().var())
    return loss, float(l1.detach()), float(kl.detach())


def still_drift(vae: nn.Module, still: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """How far the latent frames of a still clip move away from its first latent frame (mean
    square, over `scale`). Reconstruction alone leaves it free: a VAE trained on the demo's
    clips coded a plain black clip with latent frames 0.6 apart in turn (unit-variance units)
    and rims growing with time. The DiT has no absolute positions (RoPE only), so latents that
    depend on the frame index itself are what it draws worst: garbled first frames, drifting
    backgrounds, and motion set by the noise instead of the prompt."""
    mu, _ = vae.posterior(still)
    return (mu[:, :, 1:] - mu[:, :, :1]).pow(2).mean() / scale


def train_vae(vae: nn.Module, config: VAETrainConfig, *, progress: bool = True) -> Path:
    """Train `vae` on crops of the dataset's clips; writes `output/vae.safetensors` (official
    key names) and `output/vae-log.csv`; returns the weights' path."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if config.crop % 8 or config.crop < 8 or not frames_ok(config.frames):
        raise ValueError(f"crop must be a multiple of 8 and frames 4k+1, got {config.crop} and {config.frames}")
    clips = load_clips(Path(config.data), config.frames)
    if min(min(c.shape[1:3]) for c in clips) < config.crop:
        raise ValueError(f"the clips are smaller than the {config.crop}-pixel crop")
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(vae.parameters()).device
    if config.from_scratch:
        init_for_training(vae)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    # Linear warmup, then cosine decay to zero (a constant rate leaves the late L1 swinging
    # tenfold between batches); gradients clipped.
    def rate(i: int) -> float:
        if i < config.warmup_steps:
            return (i + 1) / config.warmup_steps
        done = (i - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    with open(output / "vae-log.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss", "l1", "kl", "seconds"])
        bar = tqdm(range(1, config.steps + 1), desc="training the VAE", unit="step", disable=not progress)
        for step in bar:
            start = time.perf_counter()
            batch, foreground = random_crops(clips, config.batch_size, config.crop, config.frames, generator,
                                             config.on_foreground)
            weight = 1 + config.foreground_weight * foreground
            loss, l1, kl = vae_loss(vae, batch.to(device), config.kl_weight, generator, weight.to(device),
                                   config.still_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            writer.writerow([step, f"{float(loss.detach()):.6f}", f"{l1:.6f}", f"{kl:.6f}", f"{time.perf_counter() - start:.3f}"])
            if step % 50 == 0:
                fh.flush()  # the log can be watched while it trains
            bar.set_postfix(l1=f"{l1:.4f}")
    vae.eval()
    path = output / "vae.safetensors"
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(tmp),
              metadata={"format": "wanx-vae", "dim": str(vae.config.dim), "z_dim": str(vae.config.z_dim),
                        "steps": str(config.steps)})
    os.replace(tmp, path)
    return path


@torch.no_grad()
def standardize_latents(vae: nn.Module, videos: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Make the normalised latents `encode` returns unit-variance, zero-mean per channel on
    `videos` (each `[1, 3, T, H, W]` in [-1, 1]), without changing what `decode(encode(x))`
    gives: the per-channel affine map is folded into the 1x1 convolutions on either side of
    the latent (conv1's mean half and conv2's input), so the official normalisation constants
    in `WanVAE` stay as they are. A VAE trained here has latents of its own scale; the DiT
    trains best on unit variance. Returns the raw latents' (mean, std) that were folded in."""
    mus = torch.cat([vae.posterior(v)[0].transpose(0, 1).flatten(1) for v in videos], dim=1)  # [z, N]
    data_mean, data_std = mus.mean(1), mus.std(1).clamp_min(1e-6)
    official_mean, inv_std = vae._stats(mus)
    official_mean, official_std = official_mean.flatten(), 1 / inv_std.flatten()
    z = vae.config.z_dim
    # new mu = m + s (mu - dm) / ds  = a * mu + b, per channel
    a = official_std / data_std
    b = official_mean - a * data_mean
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # [2z, 2z, 1, 1, 1]: output rows 0..z-1 are mu
    w1[:z] *= a.view(z, 1, 1, 1, 1).to(w1.dtype)
    b1[:z] = (a * b1[:z].float() + b).to(b1.dtype)
    b1[z:] += (2 * torch.log(a)).to(b1.dtype)  # the posterior's spread scales with its mean
    # the decoder must see the old mu again: old = (new - b) / a, folded into conv2's input side
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # [z, z, 1, 1, 1]
    shift = (w2.float().flatten(1) @ (b / a)).to(b2.dtype)  # W (new - b) / a = (W / a) new - W b / a
    w2 /= a.view(1, z, 1, 1, 1).to(w2.dtype)
    b2 -= shift
    return data_mean, data_std
