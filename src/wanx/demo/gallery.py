"""A GIF of demo-model videos side by side, for docs/demo-model.md:

    python -m wanx.demo.gallery docs/demo.gif

Each prompt is generated with the model's own defaults and a fixed seed, scaled up 2x
(nearest pixel, so nothing is smoothed away), and the detector's reading is printed next to
its caption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROMPTS = (  # two held-out combinations (never in the training data) and two in Chinese
    "a red circle moving left on a black background",
    "灰色背景上一个蓝色的方形向上移动",
    "a blue triangle moving right on a black background",
    "黑色背景上一个白色的三角形向下移动",
)


def gallery(out: Path, prompts=PROMPTS, *, model: str = "demo", seed: int = 20_000, scale: int = 2,
            gap: int = 4) -> list[dict]:
    from PIL import Image

    from ..pipeline import WanPipeline
    from .shapes import score

    pipe = WanPipeline.from_pretrained(model, device="cpu")
    clips, scores = [], []
    for k, prompt in enumerate(prompts):
        frames = pipe(prompt, seed=seed + k, progress=False).frames  # [F, H, W, 3] uint8
        scores.append(score(frames, prompt))
        clips.append(frames.repeat(scale, axis=1).repeat(scale, axis=2))
    f, h, w, _ = clips[0].shape
    sheet = np.full((f, h, len(clips) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for k, clip in enumerate(clips):
        sheet[:, :, k * (w + gap): k * (w + gap) + w] = clip
    images = [Image.fromarray(frame) for frame in sheet]
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out, save_all=True, append_images=images[1:], duration=1000 // 16, loop=0, optimize=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanx.demo.gallery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the GIF to write")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args(argv)
    for prompt, s in zip(PROMPTS, gallery(args.out, model=args.model)):
        print(f"{prompt}: " + ", ".join(f"{name} {'ok' if hit else 'MISSED'}" for name, hit in s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
