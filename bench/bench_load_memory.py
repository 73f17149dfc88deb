"""Peak RAM to load a real-size umT5-XXL encoder (5.68 B params, bf16, ~11.4 GB) saved in the
official layout (`models_t5_umt5-xxl-enc-bf16.pth`), with random weights.

    python bench/bench_load_memory.py --dir /tmp/wanx-umt5     # writes the file once, then measures

Compared: wanx.load_model (meta build + assign, mmap) and the official recipe (build the model
in memory, torch.load the file, load_state_dict). Memory is sampled every 5 ms in the loading
process: anonymous memory (what the process really needs) and file-backed pages (the
memory-mapped checkpoint, reclaimable page cache), as multiples of the file size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import ResidentPeak  # noqa: E402


def write_checkpoint(path: Path) -> None:
    from wanx.models.t5 import UMT5Encoder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UMT5Encoder("umt5-xxl").state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def child(method: str, path: str) -> None:
    start = time.perf_counter()
    with ResidentPeak(interval=0.005) as sampler:
        if method == "wanx":
            import wanx

            model = wanx.load_model(path)
        else:  # the official recipe: a materialised model, then the whole file read into memory
            from wanx.models.t5 import UMT5Encoder

            # (The official code builds in fp32 and casts, 22.7 GB on the way; building in
            # bf16 directly is kinder to it and is what fits this 24 GB machine.)
            torch.set_default_dtype(torch.bfloat16)
            model = UMT5Encoder("umt5-xxl")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        loaded = time.perf_counter() - start
        # Read every weight once, as moving the model to a GPU or running it would.
        total = sum(float(p.detach().float().sum()) for p in model.parameters())
    print(json.dumps(dict(peak=sampler.peak, seconds=loaded, checksum=total)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/wanx-umt5")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    path = Path(args.dir) / "models_t5_umt5-xxl-enc-bf16.pth"
    if not path.exists():
        print(f"writing {path} (random weights) ...", flush=True)
        write_checkpoint(path)
    size = path.stat().st_size
    print(f"file: {size / 2**30:.2f} GiB")
    results = {}
    for method in ("wanx", "official"):
        out = subprocess.run([sys.executable, __file__, "--child", method, str(path)], capture_output=True, text=True)
        if out.returncode:
            print(f"{method}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})")
            continue
        results[method] = r = json.loads(out.stdout.strip().splitlines()[-1])
        p = r["peak"]
        print(f"{method:>8}: load {r['seconds']:.1f} s; peak anonymous {p['RssAnon'] / size:.2f}x, file-backed "
              f"{p['RssFile'] / size:.2f}x, total resident {p['total'] / size:.2f}x the file size")
    if len(results) == 2 and results["wanx"]["checksum"] != results["official"]["checksum"]:
        print("warning: the two loads read different weights")


if __name__ == "__main__":
    main()
