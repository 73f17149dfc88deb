"""Continuation's seam on the demo model (T2V): a video is made, saved with its side file and
continued; the seam metric is the mean |frame difference| between the last old frame and the
first new one over the mean difference between the other neighbouring frames of the output
(1.0: the seam is as smooth as the motion). Both ways of holding the known frames on a T2V
model are measured (`wanx.pipeline.extend`: "renoise", the chosen one, and "clean"), from the
stored latents and from the frames encoded again, beside an unconditioned second video
(what the seam would be with nothing carried over).

    python bench/extend_seam.py [--prompts 3] [--steps 20]     # CPU, 5-25 minutes

Measured (3 prompts, 20 steps, 9-frame overlap, 8 new frames; seam / inside, 1.0 = smooth):
    renoise  stored   0.84 (0.83, 1.01, 0.67)    <- the default for T2V
    renoise  encoded  2.00 (1.55, 2.41, 2.05)
    clean    stored   0.93 (1.01, 1.01, 0.77)
    clean    encoded  2.05 (1.68, 2.45, 2.02)
    independent       2.41 (2.82, 2.95, 1.46)
From the frames encoded again the seam is the demo VAE's round trip: its mean |x - D(E(x))|
is about 20 of 255 on these clips (the overlap's last decoded frame is 25 from the old one),
three times the motion between frames; stored latents skip that round trip.

By overlap (`--overlaps 1,5,9,13`; renoise, stored latents, 8 new frames):
     1 frame   1.40 (1.25, 1.58, 1.37)  the one frame encoded; its stored latent frame: 6.55
     5 frames  0.91 (0.76, 1.61, 0.36)
     9 frames  0.84 (0.83, 1.01, 0.67)  <- the default
    13 frames  0.81 (0.82, 0.89, 0.73)
Tried and left: latent frame 0 encoded from its one frame and the rest stored (the first
latent frame of a clip holds one frame, a stored one four): 1.06 at 5 frames, 1.03 at 9.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wanx.demo.gallery import PROMPTS
from wanx.pipeline import WanPipeline
from wanx.pipeline import extend as ext
from wanx.video import read_video


def seam_ratio(frames: np.ndarray, seam: int) -> tuple[float, float]:
    """(diff at the seam between frames seam-1 and seam, mean diff of the other neighbours)."""
    diffs = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # [F-1]
    inside = np.delete(diffs, seam - 1).mean()
    return float(diffs[seam - 1]), float(inside)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default the demo model's 20")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--overlaps", default="", help="e.g. 5,9,13: the chosen way, from stored latents, at each "
                                                        "overlap (video frames) instead of the table of ways")
    args = parser.parse_args()
    if args.overlaps:
        return by_overlap(args, [int(v) for v in args.overlaps.split(",")])
    pipe = WanPipeline.from_pretrained("demo", device="cpu", dtype=torch.float32)
    rows: dict[str, list[float]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, prompt in enumerate(PROMPTS[:args.prompts]):
            seed = args.seed + k
            old = pipe(prompt, seed=seed, num_inference_steps=args.steps, progress=False)
            path = Path(tmp) / f"old{k}.mp4"
            old.save(path)
            ext.write_side_file(path, old, pipe.vae.config)
            n = len(read_video(path))
            for method in ("renoise", "clean"):
                ext.T2V_METHOD = method
                for source in ("stored", "encoded"):
                    if source == "encoded":
                        ext.side_file(path).rename(Path(tmp) / "aside")
                    new = pipe(prompt, seed=seed + 100, num_inference_steps=args.steps, extend=path, progress=False)
                    if source == "encoded":
                        (Path(tmp) / "aside").rename(ext.side_file(path))
                    seam, inside = seam_ratio(new.frames, n)
                    rows.setdefault(f"{method:8s} {source}", []).append(seam / inside)
            ext.T2V_METHOD = "renoise"
            fresh = pipe(prompt, seed=seed + 100, num_inference_steps=args.steps, progress=False)
            joined = np.concatenate([read_video(path).frames, fresh.frames])
            seam, inside = seam_ratio(joined, n)
            rows.setdefault("independent (no carry-over)", []).append(seam / inside)
            print(f"{prompt}: " + ", ".join(f"{name.strip()} {values[-1]:.2f}" for name, values in rows.items()),
                  file=sys.stderr)
    print(f"seam / inside, mean over {args.prompts} prompts (demo model, 9-frame overlap, 8 new frames; "
          f"{time.perf_counter() - start:.0f} s):")
    for name, values in rows.items():
        print(f"  {name:30s} {np.mean(values):.2f}  (each: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


def by_overlap(args, overlaps: list[int]) -> int:
    pipe = WanPipeline.from_pretrained("demo", device="cpu", dtype=torch.float32)
    rows: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, prompt in enumerate(PROMPTS[:args.prompts]):
            seed = args.seed + k
            old = pipe(prompt, seed=seed, num_inference_steps=args.steps, progress=False)
            path = Path(tmp) / f"old{k}.mp4"
            old.save(path)
            ext.write_side_file(path, old, pipe.vae.config)
            for overlap in overlaps:
                new = pipe(prompt, seed=seed + 100, num_inference_steps=args.steps, extend=path, extend_frames=overlap,
                           num_frames=8, progress=False)
                seam, inside = seam_ratio(new.frames, len(old))
                rows.setdefault(overlap, []).append(seam / inside)
                print(f"{prompt}: overlap {overlap}: {seam / inside:.2f}", file=sys.stderr)
    print(f"seam / inside by overlap ({ext.T2V_METHOD}, stored latents, 8 new frames, {args.prompts} prompts):")
    for overlap, values in rows.items():
        print(f"  {overlap:3d} frames  {np.mean(values):.2f}  (each: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
