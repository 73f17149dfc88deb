"""Speed options, measured side by side in one run on the same random weights:

1. One guided denoising step (cond + uncond) of a DiT with the real head dim (128): wanx with
   batched guidance (one forward of batch 2), wanx with two forwards, and diffusers'
   `WanTransformer3DModel` (two forwards, as its pipeline runs guidance), same weights.
2. Step caching over a full sampling run (UniPC, default 30 steps): for each setting, the block
   passes computed out of all, the wall time against the uncached run, and the distance of the
   final latents from the uncached ones (relative L2 and PSNR over the latents' range). The
   model has no published calibration (its size is not a released one), so it first fits its
   own (`wanx calibrate-cache` does the same), as a user would for a fine-tune; the run with
   the nearest published calibration is shown as well.

    .venv/bin/python bench/speed.py                  # CPU, 2 threads: a few minutes
    python bench/speed.py --device cuda --preset t2v-1.3B --size 832x480 --frames 81

Absolute times on shared CPUs are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.oracles: the diffusers model from our weights

from tests.oracles import diffusers_dit, randomize, run_diffusers_dit  # noqa: E402
from wanx.configs import DiTConfig, dit_config  # noqa: E402
from wanx.models.transformer import WanDiT  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def guided_step_times(dit: WanDiT, cfg: DiTConfig, device, dtype, frames: int, height: int, width: int,
                      repeat: int) -> dict[str, float]:
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, *lat, generator=g).to(device, dtype)
    context = torch.randn(1, 100, cfg.text_dim, generator=g).to(device, dtype)
    null = torch.randn(1, 100, cfg.text_dim, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    both, xx = torch.cat([context, null]), torch.cat([x, x])
    official = {k: v.detach().to("cpu", torch.float32) for k, v in dit.state_dict().items()}
    theirs = diffusers_dit(cfg, official).to(device, dtype)
    results = {}
    with torch.no_grad():
        results["wanx batched"] = median_time(lambda: dit(xx, t, both), device, repeat)
        results["wanx two passes"] = median_time(lambda: (dit(x, t, context), dit(x, t, null)), device, repeat)
        results["diffusers two passes"] = median_time(
            lambda: (run_diffusers_dit(theirs, cfg, x, t, context), run_diffusers_dit(theirs, cfg, x, t, null)),
            device, repeat)
        ours = dit(x, t, context)
        ref = run_diffusers_dit(theirs, cfg, x, t, context)
        results["max |wanx - diffusers| / max|diffusers|"] = float((ours - ref).abs().max() / ref.abs().max())
    del theirs
    return results


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    span = float(b.max() - b.min())
    mse = float((a - b).float().pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(span * span / mse)


def cache_runs(pipe, request: dict, settings: list[tuple[str, float | None, str]], calibration) -> list[tuple]:
    pipe.disable_cache()
    start = time.perf_counter()
    base = pipe(**request)
    plain_seconds = time.perf_counter() - start
    rows = [("none", "-", "-", f"{2 * request['num_inference_steps']}/{2 * request['num_inference_steps']}",
             1.0, 0.0, float("inf"))]
    for kind, threshold, which in settings:
        cache = pipe.enable_cache(kind, threshold, calibration=calibration if which == "own" else None)
        start = time.perf_counter()
        out = pipe(**request)
        seconds = time.perf_counter() - start
        stats = cache.stats
        rel = float((out - base).norm() / base.norm())
        rows.append((kind, f"{cache.active_threshold:g}", which,
                     f"{stats.total_computed}/{stats.total_computed + stats.total_skipped}",
                     plain_seconds / seconds, rel, psnr(out, base)))
    pipe.disable_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--preset", default=None, help="a real preset (t2v-1.3B) instead of the CPU-sized config")
    parser.add_argument("--size", default="320x192", help="WIDTHxHEIGHT (default 320x192)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=30, help="sampling steps of the cache runs (default 30)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(min(2, torch.get_num_threads())) if device.type == "cpu" else None
    width, height = (int(v) for v in args.size.split("x"))
    if args.preset:
        cfg = dit_config(args.preset)
    else:  # head dim 128 like the released models, 4 blocks, the tiny umT5's text width
        cfg = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=32)
    tokens = ((args.frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    print(f"device {device}, {dtype}, torch {torch.__version__}, DiT dim {cfg.dim} heads {cfg.num_heads} "
          f"layers {cfg.num_layers}, {width}x{height}x{args.frames} = {tokens} tokens")

    dit = randomize(WanDiT(cfg), seed=0, std=0.05).to(device, dtype).eval()
    times = guided_step_times(dit, cfg, device, dtype, args.frames, height, width, args.repeat)
    print("\n1. one guided step (cond + uncond), median of", args.repeat)
    base = times["diffusers two passes"]
    for name in ("wanx batched", "wanx two passes", "diffusers two passes"):
        print(f"  {name:22s} {times[name]:8.3f} s   diffusers / this = {base / times[name]:.2f}x")
    print(f"  output agreement: {times['max |wanx - diffusers| / max|diffusers|']:.1e} of the output scale")

    if args.preset is None:  # the tiny VAE and umT5 with this DiT: a whole pipeline
        from wanx.loading import load_model
        from wanx.pipeline import WanPipeline
        from wanx.speed.cache import calibrate
        from wanx.text import TextEncoder, Tokenizer
        from wanx.tiny import tiny_model_dir

        folder = tiny_model_dir("tiny")
        vae = load_model(folder / "Wan2.1_VAE.pth").to(device)
        t5 = load_model(folder / "models_t5_umt5-xxl-enc-bf16.pth").to(device)
        pipe = WanPipeline(dit, vae, TextEncoder(t5, Tokenizer(folder / "google" / "umt5-xxl"), device=device))
        request = dict(prompt="A cat walks on the grass, realistic style.", width=width, height=height,
                       num_frames=args.frames, num_inference_steps=args.steps, seed=1, output_type="latents",
                       progress=False)
        start = time.perf_counter()
        own = calibrate(pipe, ["A red sports car drives along a coastal road.", "Two people talk in a cafe."],
                        num_inference_steps=args.steps, width=width, height=height, num_frames=args.frames,
                        seed=0, progress=False)
        print(f"\n2. step caching, {args.steps} UniPC steps, guidance 5 (own calibration fitted from 2 prompts "
              f"in {time.perf_counter() - start:.0f} s; the test prompt is another one)")
        settings = [("teacache", 0.1, "own"), ("teacache", 0.3, "own"), ("teacache", 1.0, "own"),
                    ("magcache", 0.12, "own"), ("magcache", 0.24, "own"), ("teacache", 0.1, "published 1.3B"),
                    ("magcache", 0.12, "published 1.3B")]
        rows = cache_runs(pipe, request, settings, own)
        print(f"  {'cache':9s} {'thresh':>6s}  {'calibration':15s} {'passes':>7s} {'speed-up':>8s} "
              f"{'rel L2':>8s} {'PSNR dB':>8s}")
        for kind, thr, which, passes, speed, rel, p in rows:
            print(f"  {kind:9s} {thr:>6s}  {which:15s} {passes:>7s} {speed:7.2f}x {rel:8.1e} {p:8.1f}")


if __name__ == "__main__":
    main()
