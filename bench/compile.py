"""Regional compile (`wanx.speed.compile_blocks`) against eager: per-step time of the DiT,
the first compiled call (the warm-up: dynamo + inductor compile of the one block graph) apart,
and the recompile count after new timesteps and a second video size.

    .venv/bin/python bench/compile.py             # CPU, fp32: ~2 minutes on 2 cores
    python bench/compile.py --device cuda --dtype bfloat16

A warm-up found in inductor's on-disk cache is faster than a cold one: pass --cold to compile
into a fresh cache directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from wanx.configs import DiTConfig, dit_config  # noqa: E402
from wanx.models.transformer import WanDiT  # noqa: E402
from wanx.speed import compile_blocks  # noqa: E402

CONFIGS = {
    "tiny": (dit_config("tiny"), (2, 8, 8)),  # head dim 16, 32 tokens
    "hd128": (DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=32), (4, 32, 32)),  # 1024 tokens
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(dit, inputs, steps, device):
    times = []
    for i in range(steps):
        x, context = inputs
        t = torch.tensor([1000.0 - 50 * i], device=device)
        sync(device)
        start = time.perf_counter()
        dit(x, t, context)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine: OpenMP "
                        "threads competing for cores slow small eager ops many times over)")
    parser.add_argument("--cold", action="store_true", help="a fresh inductor cache (a first-ever warm-up)")
    parser.add_argument("--config", choices=list(CONFIGS), action="append")
    args = parser.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="wanx-inductor-")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    print(f"{'model':7} {'tokens':>6} {'eager s/step':>12} {'compiled':>9} {'speed-up':>8} {'warm-up s':>9} "
          f"{'graphs':>6} {'after resize':>12}")
    for name in args.config or list(CONFIGS):
        cfg, (f, h, w) = CONFIGS[name]
        torch.manual_seed(0)
        dit = WanDiT(cfg).to(device, dtype).eval()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, f, h, w, generator=gen).to(device)
        context = torch.randn(1, 16, cfg.text_dim, generator=gen).to(device)
        tokens = f * (h // 2) * (w // 2)
        with torch.no_grad():
            step_times(dit, (x, context), 1, device)  # eager warm-up (allocator, RoPE cache)
            eager = step_times(dit, (x, context), args.steps, device)
            torch._dynamo.reset()
            counters.clear()
            handle = compile_blocks(dit)
            warmup = handle.warm_up(x, torch.tensor([999.0], device=device), context)
            compiled = step_times(dit, (x, context), args.steps, device)
            graphs = counters["stats"]["unique_graphs"]
            dit(torch.randn(1, 16, f, h + 2, w + 4, generator=gen).to(device), torch.tensor([10.0], device=device),
                context)
            resized = counters["stats"]["unique_graphs"]
            handle.remove()
        print(f"{name:7} {tokens:6d} {eager:12.4f} {compiled:9.4f} {eager / compiled:7.2f}x {warmup:9.1f} "
              f"{graphs:6d} {resized:12d}")


if __name__ == "__main__":
    main()
