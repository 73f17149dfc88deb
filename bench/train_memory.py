"""Peak memory and step time of `wanx train` on a real-size DiT, with no video decoding:
the cached items `wanx prepare` would write (latents `[16, F', H/8, W/8]`, umT5 context
`[tokens, 4096]`) are written directly with random values, beside a model folder holding a
random-weight DiT of the preset (bf16) and the tiny VAE/umT5 (only their file names and sizes
are read, for the cache check). Then `wanx train` runs in this process, once per setting.

    python bench/train_memory.py                         # CUDA: T2V-1.3B, 832x480, 81 frames
    .venv/bin/python bench/train_memory.py --scaled       # CPU: a small DiT, a small size

The brief's reference: DiffSynth-Studio says 1.3B LoRA training at 480P x 81 needs 16 GB;
the target here is <= 12 GB.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def model_folder(root: Path, cfg, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    from wanx.configs import official_config_json
    from wanx.models.transformer import WanDiT
    from wanx.tiny import tiny_model_dir

    folder = root / "model"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    (folder / "wanx-tiny.json").unlink()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds for 1.3B
        dit = WanDiT(cfg).to(dtype)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in dit.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(official_config_json(cfg)), encoding="utf-8")
    del dit
    return folder


def cached_items(root: Path, folder: Path, cfg, width: int, height: int, frames: int, count: int) -> Path:
    """Items as `wanx prepare` writes them, with the settings that match `folder`'s encoders."""
    from safetensors.torch import save_file

    from wanx.hub import find_components
    from wanx.training.prepare import CACHE_VERSION, _fingerprint

    cache = root / "cache"
    cache.mkdir()
    settings = json.dumps({"version": CACHE_VERSION, "model": _fingerprint(find_components(folder)), "height": height,
                           "width": width, "frames": frames, "fps": 16}, sort_keys=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        latents = torch.randn(16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g)
        context = torch.randn(120, cfg.text_dim, generator=g) * 0.1
        save_file({"latents": latents, "context": context}, str(cache / f"item{i}.safetensors"),
                  metadata={"settings": settings, "caption": f"item {i}"})
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaled", action="store_true", help="a small DiT and size (CPU)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--preset", default="t2v-1.3B", choices=["t2v-1.3B", "t2v-14B"])
    parser.add_argument("--only", help="run only the settings whose name contains this text")
    args = parser.parse_args()

    from wanx.cli import main as wanx
    from wanx.configs import DiTConfig, dit_config

    cuda = torch.cuda.is_available() and not args.scaled
    if cuda:
        cfg, (width, height, frames), dtype = dit_config(args.preset), (832, 480, 81), torch.bfloat16
    else:
        cfg = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=4096)
        (width, height, frames), dtype = (256, 160, 9), torch.float32
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    print(f"{'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; DiT dim {cfg.dim} x "
          f"{cfg.num_layers} blocks; {width}x{height}x{frames} = {tokens} tokens; LoRA rank 32 on q,k,v,o,ffn.0,ffn.2")
    settings = {"LoRA, checkpointing": ["--gradient-checkpointing"],
                "LoRA, checkpointing, FP8 base": ["--gradient-checkpointing", "--fp8"],
                "LoRA, ckpt + offloaded activations": ["--gradient-checkpointing", "--offload-activations"],
                "LoRA, ckpt + offload act. + FP8": ["--gradient-checkpointing", "--offload-activations", "--fp8"],
                "LoRA, ckpt + offload act. + FP8 + streamed 6GB": ["--gradient-checkpointing", "--offload-activations",
                                                                   "--fp8", "--offload", "blocks", "--vram-budget", "6GB"]}
    if args.only:
        settings = {k: v for k, v in settings.items() if args.only in k}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        folder = model_folder(root, cfg, dtype)
        cache = cached_items(root, folder, cfg, width, height, frames, count=2)
        print(f"model and cache written in {time.perf_counter() - start:.0f} s")
        for name, extra in settings.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out = root / name.replace(" ", "_").replace(",", "")
            argv = ["train", "--data", str(cache), "--model", str(folder), "--output", str(out), "--lora-rank", "32",
                    "--steps", str(args.steps), "--quiet", "--dtype", "bf16" if cuda else "fp32", *extra]
            try:
                code = wanx(argv)
            except torch.cuda.OutOfMemoryError if cuda else MemoryError:
                rows.append((name, "out of memory", "", ""))
                continue
            if code != 0:
                rows.append((name, f"exit {code}", "", ""))
                continue
            with open(out / "log.csv", encoding="utf-8") as fh:
                seconds = [float(r["seconds"]) for r in csv.DictReader(fh)][1:]  # after the first step
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((name, f"{statistics.median(seconds):.2f}", f"{peak:.2f}", ""))
    print(f"\n{'setting':48s} {'s/step':>8s} {'peak GiB':>9s}")
    for name, step, peak, _ in rows:
        print(f"{name:48s} {step:>8s} {peak:>9s}")
    if cuda:
        best = min((float(p) for _, s, p, _ in rows if p and p != "nan"), default=float("inf"))
        target = 12 if args.preset == "t2v-1.3B" else 24
        print(f"\n{'PASS' if best <= target else 'MISS'}  {args.preset} LoRA at 480P x 81 in <= {target} GB: "
              f"lowest peak {best:.2f} GiB")


if __name__ == "__main__":
    main()
