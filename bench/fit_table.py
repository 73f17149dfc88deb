"""Which `wanx generate` memory flags fit which GPU, computed with wanx's own estimator
(`wanx.memory.estimate`: weights, DiT activations with batched guidance, VAE decode with tiles
when needed, the video) plus a 1 GiB margin. Not measured: no GPU was at hand. Prints the
table in docs/memory.md. A DiT kept quantized (INT8, a GGUF file's Q8_0 or Q4_K) counts at its
packed size by wanx's own accounting (`memory.estimate.kept_bytes`: the block Linear weights
in the format, the rest bf16), as `wanx generate` plans with it.

    .venv/bin/python bench/fit_table.py
"""

from __future__ import annotations

import functools

import torch

from wanx.configs import dit_config
from wanx.memory.estimate import GiB, decode_bytes, decode_tiles, estimate, kept_bytes
from wanx.memory.fp8 import block_linear_names
from wanx.memory.placement import MARGIN
from wanx.models.transformer import WanDiT

T5_PARAMS, VAE_PARAMS = 5_680_910_336, 126_892_531
DIT_PARAMS = {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584}
SIZES = {"480P": (480, 832), "720P": (720, 1280)}
GPUS = (8, 12, 16, 24, 80)
# How the DiT is held -> the kind its block Linear weights are stored as (None: bf16, the
# --fp8 choice open); the flag that gives it from a bf16 file, if any.
FORMS = {"bf16": (None, ""), "INT8": ("int8", "--int8 "), "GGUF Q8_0": ("Q8_0", ""), "GGUF Q4_K": ("Q4_K", "")}


@functools.lru_cache(maxsize=None)
def block_linear_params(preset: str) -> int:
    """Weights of the block Linear layers a quantized DiT holds packed (counted on a meta model)."""
    with torch.device("meta"):
        model = WanDiT(preset)
    return sum(model.get_submodule(n).weight.numel() for n in block_linear_names(model))


def dit_bytes(preset: str, form: str, fp8: bool = False) -> int:
    kind = FORMS[form][0]
    if kind is None:
        return DIT_PARAMS[preset] * (1 if fp8 else 2)
    linear = block_linear_params(preset)
    return kept_bytes({kind: linear, "bfloat16": DIT_PARAMS[preset] - linear}, torch.bfloat16)


def peak(preset: str, size: str, *, t5_on_gpu: bool, offload: str, fp8: bool, budget: float = 0, batch: int = 2,
         form: str = "bf16") -> float:
    """GiB on the GPU at the worst moment of one 81-frame T2V generation; batch 2: guidance
    as one batch of two, 1: two passes (what wanx falls back to when memory is short)."""
    cfg = dit_config(preset)
    h, w = SIZES[size]
    need = estimate(cfg, h, w, 81, dtype=torch.bfloat16, batch=batch)
    dit = dit_bytes(preset, form, fp8)
    t5, vae = T5_PARAMS * 2 if t5_on_gpu else 0, VAE_PARAMS * 4
    block = dit / cfg.num_layers
    if offload == "none":
        resident = dit + t5 + vae
        return (resident + max(need.denoise, need.decode) + need.video + MARGIN) / GiB
    if offload == "model":  # one network at a time
        return (max(t5, dit + need.denoise, vae + need.decode + need.video) + MARGIN) / GiB
    streamed_dit = min(dit, budget * GiB) + 2 * block  # resident part + the block computing + the one prefetched
    return (max(t5 / cfg.num_layers * 2, streamed_dit + vae + need.denoise, vae + need.decode + need.video) + MARGIN) / GiB


def best(preset: str, size: str, gpu: int, form: str = "bf16") -> str:
    for batch in (2, 1):
        found = _best(preset, size, gpu, batch, form)
        if found:
            return found + ("" if batch == 2 else ", two-pass guidance")
    return "does not fit"


def _best(preset: str, size: str, gpu: int, batch: int, form: str = "bf16") -> str | None:
    quantized = FORMS[form][0] is not None  # held quantized already: no --fp8 on top
    flag = FORMS[form][1]
    choices = [
        (f"{flag}(defaults: all resident)" if flag else "(defaults: all resident)",
         dict(t5_on_gpu=True, offload="none", fp8=False)),
        (f"{flag}--t5-device cpu", dict(t5_on_gpu=False, offload="none", fp8=False)),
        *([] if quantized else [("--fp8 --t5-device cpu", dict(t5_on_gpu=False, offload="none", fp8=True))]),
        (f"{flag}--offload model", dict(t5_on_gpu=True, offload="model", fp8=False)),
    ]
    for flags, kwargs in choices:
        kwargs.update(batch=batch, form=form)
        if peak(preset, size, **kwargs) <= gpu:
            return f"{flags}: {peak(preset, size, **kwargs):.1f} GiB"
    for fp8 in (False,) if quantized else (False, True):
        zero = peak(preset, size, t5_on_gpu=False, offload="blocks", fp8=fp8, budget=0, batch=batch, form=form)
        if zero <= gpu:
            budget = int(gpu - zero)
            flags = f"{flag}--offload blocks --vram-budget {budget}GB --t5-device cpu" + (" --fp8" if fp8 else "")
            used = peak(preset, size, t5_on_gpu=False, offload="blocks", fp8=fp8, budget=budget, batch=batch,
                        form=form)
            return f"{flags}: {used:.1f} GiB"
    return None


def main() -> None:
    print("| model | size | DiT held as | " + " | ".join(f"{g} GiB GPU" for g in GPUS) + " |")
    print("|---|---|---|" + "---|" * len(GPUS))
    for preset in DIT_PARAMS:
        for size in SIZES:
            for form in FORMS:
                held = f"{form} ({dit_bytes(preset, form) / GiB:.1f} GiB)"
                print(f"| {preset} | {size} | {held} | " + " | ".join(best(preset, size, g, form) for g in GPUS) + " |")
    h, w = SIZES["720P"]
    tiles = decode_tiles(h, w, torch.float32, 6 * GiB)
    print(f"\nVAE decode at 720P: {decode_bytes(h, w) / GiB:.1f} GiB whole frames; with {tiles[0]} tiles "
          f"{decode_bytes(*tiles[0]) / GiB:.1f} GiB (chosen automatically when whole frames do not fit)")


if __name__ == "__main__":
    main()
