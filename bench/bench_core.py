"""wanx vs diffusers on the same weights, in one run: DiT forward time, VAE encode+decode
time, and VAE decode peak memory against video length.

    python bench/bench_core.py                    # CPU, scaled-down sizes (minutes on 2 cores)
    python bench/bench_core.py --device cuda --full   # real 1.3B DiT, 480P VAE frames

Absolute times on shared machines mean little; read the ratios (diffusers / wanx: > 1 means
wanx is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.oracles: weight conversion helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import peak_of, run_child  # noqa: E402

from tests.oracles import diffusers_dit, diffusers_vae, latent_stats, official_state, run_diffusers_dit  # noqa: E402
from wanx.configs import DiTConfig  # noqa: E402
from wanx.models.transformer import WanDiT  # noqa: E402
from wanx.models.vae import WanVAE  # noqa: E402


def timed_pair(fn_a, fn_b, device: str, repeat: int) -> tuple[float, float]:
    """Median seconds of `repeat` calls of each, after a warm-up, alternating a and b so
    that drift on a shared machine hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    fn_a(), fn_b()
    for _ in range(repeat):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def compare_pair(run_ours, run_theirs, device: str, repeat: int) -> dict:
    """wanx vs diffusers on the same inputs: the largest difference of their outputs, then each
    one's median time and the ratio (diffusers / wanx: > 1 means wanx is faster)."""
    with torch.no_grad():
        diff = (run_ours().float() - run_theirs().float()).abs().max()
        t_ours, t_theirs = timed_pair(run_ours, run_theirs, device, repeat)
    return dict(wanx_s=t_ours, diffusers_s=t_theirs, ratio=t_theirs / t_ours, max_abs_diff=float(diff))


def bench_dit(args) -> dict:
    layers = 30 if args.full else 2
    cfg = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers)  # T2V-1.3B widths, head dim 128
    frames, height, width = (21, 60, 104) if args.full else (5, 48, 52)  # latent grid: 32,760 / 3,120 tokens
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = WanDiT(cfg).eval()
    theirs = diffusers_dit(cfg, official_state(ours))
    ours.to(args.device, dtype)
    theirs.to(args.device, dtype)
    x = torch.randn(1, 16, frames, height, width, device=args.device)
    t = torch.tensor([999.0], device=args.device)
    context = torch.randn(1, 512, cfg.text_dim, device=args.device)
    result = compare_pair(lambda: ours(x, t, context),
                          lambda: run_diffusers_dit(theirs, cfg, x.to(dtype), t, context.to(dtype)), args.device, args.repeat)
    return dict(layers=layers, tokens=frames * height * width // 4, **result)


def bench_vae(args) -> dict:
    frames, height, width = (17, 480, 832) if args.full else (9, 64, 64)
    torch.manual_seed(0)
    ours = WanVAE().eval()
    theirs = diffusers_vae(official_state(ours), base_dim=96)
    ours.to(args.device)
    theirs.to(args.device)
    mean, std = (s.to(args.device) for s in latent_stats())
    video = torch.rand(1, 3, frames, height, width, device=args.device) * 2 - 1

    def run_ours():
        return ours.decode(ours.encode(video))

    def run_theirs():
        z = (theirs.encode(video).latent_dist.mode() - mean) / std
        return theirs.decode(z * std + mean).sample

    return dict(video=[frames, height, width], **compare_pair(run_ours, run_theirs, args.device, args.repeat))


def decode_memory_child(impl: str, latent_frames: int, height: int, width: int, device: str) -> None:
    """Child process: peak memory of one decode, beyond what was held before it."""
    torch.manual_seed(0)
    ours = WanVAE().eval()
    model = ours if impl == "wanx" else diffusers_vae(official_state(ours), base_dim=96)
    del ours
    model.to(device)
    z = torch.randn(1, 16, latent_frames, height // 8, width // 8, device=device)
    mean, std = (s.to(device) for s in latent_stats())
    peak, out = peak_of(lambda: model.decode(z) if impl == "wanx" else model.decode(z * std + mean).sample, device)
    print(json.dumps(dict(peak=peak, output=out.numel() * out.element_size())))


def bench_decode_memory(args) -> list[dict]:
    height, width = (480, 832) if args.full else (64, 96)
    rows = []
    for frames in (17, 33, 65, 129):
        row = dict(frames=frames)
        for impl in ("wanx", "diffusers"):
            cmd = [sys.executable, __file__, "--child", impl, str((frames - 1) // 4 + 1), str(height), str(width),
                   "--device", args.device]
            result = run_child(cmd)
            row[f"{impl}_peak_MiB"] = result["peak"] / 2**20
            row[f"{impl}_beyond_output_MiB"] = (result["peak"] - result["output"]) / 2**20
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="real sizes (GPU): 30-layer 1.3B DiT at 480P, 480P VAE")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["dit", "vae", "memory"], default=None)
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "LATENT_FRAMES", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, frames, h, w = args.child
        decode_memory_child(impl, int(frames), int(h), int(w), args.device)
        return

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    if args.only in (None, "dit"):
        r = bench_dit(args)
        print(f"DiT forward ({r['layers']} layers, dim 1536, head dim 128, {r['tokens']} tokens + 512 text): "
              f"wanx {r['wanx_s'] * 1e3:.0f} ms, diffusers {r['diffusers_s'] * 1e3:.0f} ms, "
              f"diffusers/wanx = {r['ratio']:.2f}x  (max |diff| {r['max_abs_diff']:.1e})")
    if args.only in (None, "vae"):
        r = bench_vae(args)
        print(f"VAE encode+decode {r['video']} (real 127M VAE): wanx {r['wanx_s']:.2f} s, diffusers "
              f"{r['diffusers_s']:.2f} s, diffusers/wanx = {r['ratio']:.2f}x  (max |diff| {r['max_abs_diff']:.1e})")
    if args.only in (None, "memory"):
        print("VAE decode peak memory (MiB; 'beyond' = peak minus the output video itself):")
        print(f"{'frames':>7} {'wanx peak':>10} {'wanx beyond':>12} {'diffusers peak':>15} {'diffusers beyond':>17}")
        for r in bench_decode_memory(args):
            print(f"{r['frames']:>7} {r['wanx_peak_MiB']:>10.0f} {r['wanx_beyond_output_MiB']:>12.0f} "
                  f"{r['diffusers_peak_MiB']:>15.0f} {r['diffusers_beyond_output_MiB']:>17.0f}")


if __name__ == "__main__":
    main()
