"""`wanx demo`: the whole load-and-run path on tiny random-weight models, offline, in seconds.

Writes a tiny T2V model set in the official folder layout (`wanx.tiny`), loads its DiT and VAE
back through `wanx.load_model`, runs one DiT forward and a VAE encode/decode round trip, and
prints what happened. Real videos need the real weights.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def run_demo(workdir: str | None = None) -> None:
    from ..loading import inspect_checkpoint, load_model
    from ..tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="wanx-demo-") as tmp:
        folder = make_tiny_model(Path(workdir or tmp) / "wanx-tiny", "t2v")
        dit_dir, vae_path = folder, folder / "Wan2.1_VAE.pth"
        print(f"wrote tiny random-weight checkpoints to {folder}\n")
        for path in (dit_dir, vae_path):
            print(inspect_checkpoint(path).summary(), end="\n\n")

        dit = load_model(dit_dir)
        vae = load_model(vae_path)
        generator = torch.Generator().manual_seed(0)
        video = torch.rand(1, 3, 17, 64, 96, generator=generator) * 2 - 1  # [B, 3, T=4k+1, H, W]
        with torch.no_grad():
            start = time.perf_counter()
            latents = vae.encode(video)
            t_enc = time.perf_counter() - start
            context = torch.randn(1, 12, dit.config.text_dim, generator=generator)
            start = time.perf_counter()
            velocity = dit(latents, torch.tensor([999.0]), context)
            t_dit = time.perf_counter() - start
            start = time.perf_counter()
            decoded = vae.decode(latents)
            t_dec = time.perf_counter() - start
        print(f"VAE encode  {tuple(video.shape)} -> latents {tuple(latents.shape)}  ({t_enc * 1e3:.0f} ms)")
        print(f"DiT forward {tuple(latents.shape)} + text {tuple(context.shape)} -> velocity {tuple(velocity.shape)}  ({t_dit * 1e3:.0f} ms)")
        print(f"VAE decode  {tuple(latents.shape)} -> video {tuple(decoded.shape)}  ({t_dec * 1e3:.0f} ms)")
        print("\nThese are random weights: real videos need the real Wan2.1 checkpoints.")
