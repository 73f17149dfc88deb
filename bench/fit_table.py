"""Which `wanx generate` memory flags fit which GPU, computed with wanx's own estimator
(`wanx.memory.estimate`: weights, DiT activations with batched guidance, VAE decode with tiles
when needed, the video) plus a 1 GiB margin. Not measured: no GPU was at hand. Prints the
table in docs/memory.md.

    .venv/bin/python bench/fit_table.py
"""

from __future__ import annotations

import torch

from wanx.configs import dit_config
from wanx.memory.estimate import GiB, decode_bytes, decode_tiles, estimate
from wanx.memory.placement import MARGIN

T5_PARAMS, VAE_PARAMS = 5_680_910_336, 126_892_531
DIT_PARAMS = {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584}
SIZES = {"480P": (480, 832), "720P": (720, 1280)}
GPUS = (8, 12, 16, 24, 80)


def peak(preset: str, size: str, *, t5_on_gpu: bool, offload: str, fp8: bool, budget: float = 0, batch: int = 2) -> float:
    """GiB on the GPU at the worst moment of one 81-frame T2V generation; batch 2: guidance
    as one batch of two, 1: two passes (what wanx falls back to when memory is short)."""
    cfg = dit_config(preset)
    h, w = SIZES[size]
    need = estimate(cfg, h, w, 81, dtype=torch.bfloat16, batch=batch)
    dit = DIT_PARAMS[preset] * (1 if fp8 else 2)
    t5, vae = T5_PARAMS * 2 if t5_on_gpu else 0, VAE_PARAMS * 4
    block = dit / cfg.num_layers
    if offload == "none":
        resident = dit + t5 + vae
        return (resident + max(need.denoise, need.decode) + need.video + MARGIN) / GiB
    if offload == "model":  # one network at a time
        return (max(t5, dit + need.denoise, vae + need.decode + need.video) + MARGIN) / GiB
    streamed_dit = min(dit, budget * GiB) + 2 * block  # resident part + the block computing + the one prefetched
    return (max(t5 / cfg.num_layers * 2, streamed_dit + vae + need.denoise, vae + need.decode + need.video) + MARGIN) / GiB


def best(preset: str, size: str, gpu: int) -> str:
    for batch in (2, 1):
        found = _best(preset, size, gpu, batch)
        if found:
            return found + ("" if batch == 2 else ", two-pass guidance")
    return "does not fit"


def _best(preset: str, size: str, gpu: int, batch: int) -> str | None:
    choices = [
        ("(defaults: all resident)", dict(t5_on_gpu=True, offload="none", fp8=False)),
        ("--t5-device cpu", dict(t5_on_gpu=False, offload="none", fp8=False)),
        ("--fp8 --t5-device cpu", dict(t5_on_gpu=False, offload="none", fp8=True)),
        ("--offload model", dict(t5_on_gpu=True, offload="model", fp8=False)),
    ]
    for flags, kwargs in choices:
        kwargs["batch"] = batch
        if peak(preset, size, **kwargs) <= gpu:
            return f"{flags}: {peak(preset, size, **kwargs):.1f} GiB"
    for fp8 in (False, True):
        zero = peak(preset, size, t5_on_gpu=False, offload="blocks", fp8=fp8, budget=0, batch=batch)
        if zero <= gpu:
            budget = int(gpu - zero)
            flags = f"--offload blocks --vram-budget {budget}GB --t5-device cpu" + (" --fp8" if fp8 else "")
            used = peak(preset, size, t5_on_gpu=False, offload="blocks", fp8=fp8, budget=budget, batch=batch)
            return f"{flags}: {used:.1f} GiB"
    return None


def main() -> None:
    print("| model | size | " + " | ".join(f"{g} GiB GPU" for g in GPUS) + " |")
    print("|---|---|" + "---|" * len(GPUS))
    for preset in DIT_PARAMS:
        for size in SIZES:
            print(f"| {preset} | {size} | " + " | ".join(best(preset, size, g) for g in GPUS) + " |")
    h, w = SIZES["720P"]
    tiles = decode_tiles(h, w, torch.float32, 6 * GiB)
    print(f"\nVAE decode at 720P: {decode_bytes(h, w) / GiB:.1f} GiB whole frames; with {tiles[0]} tiles "
          f"{decode_bytes(*tiles[0]) / GiB:.1f} GiB (chosen automatically when whole frames do not fit)")


if __name__ == "__main__":
    main()
