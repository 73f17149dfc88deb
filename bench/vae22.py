"""The Wan2.2 VAE (TI2V-5B's 4x16x16, 48-channel VAE): peak memory of encode and of decode
against video length, which the causal chunk cache keeps flat, and decode time of wanx vs
diffusers (`AutoencoderKLWan(is_residual=True)`) on the same random weights.

    python bench/vae22.py                             # CPU: scaled-down sizes (minutes on 2 cores)
    python bench/vae22.py --only count                # released widths at 704x1280, shapes only (seconds)
    python bench/vae22.py --device cuda --full        # real widths, 704x1280 memory, 17..121 frames

Memory is measured in a fresh process per run: on CPU the resident set sampled every
millisecond (malloc told to return freed tensors at once), on CUDA the allocator's peak.
`count` runs the released VAE on the meta device (shapes, no arithmetic) and adds up the bytes
of the tensors alive at each moment, so the real sizes need neither a GPU nor hours of CPU.
Read "beyond": the peak minus the output (the latents, the decoded video), which grows with
the clip by necessity. Absolute times on shared machines mean little; read the ratio
(diffusers / wanx: > 1 means wanx is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.oracles: the diffusers weight conversion
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import compare_pair  # noqa: E402
from memory import peak_of, run_child  # noqa: E402

from tests.oracles import diffusers_vae22, latent_stats, official_state  # noqa: E402
from wanx.configs import VAE22Config  # noqa: E402
from wanx.models.vae22 import WanVAE22  # noqa: E402

FRAMES = (17, 33, 65, 121)


def random_vae(cfg: VAE22Config, device: str) -> WanVAE22:
    """Built on the meta device and filled in place (uniform at PyTorch's default bounds, gains
    near 1): a real-width VAE's default initialisation takes minutes on a few CPU cores."""
    with torch.device("meta"):
        vae = WanVAE22(cfg)
    vae = vae.to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.9, 1.1, generator=gen)
            else:
                weight = vae.get_parameter(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else p
                bound = 1 / math.sqrt(weight[0].numel())
                p.uniform_(-bound, bound, generator=gen)
    return vae


def memory_child(step: str, cfg: VAE22Config, frames: int, height: int, width: int, device: str) -> None:
    """Child process: peak memory of one encode or decode, beyond what was held before it."""
    vae = random_vae(cfg, device)
    gen = torch.Generator(device=device).manual_seed(1)
    if step == "encode":
        x = torch.rand(1, 3, frames, height, width, device=device, generator=gen) * 2 - 1
        run = vae.encode
    else:
        x = torch.randn(1, cfg.z_dim, (frames - 1) // 4 + 1, height // 16, width // 16, device=device, generator=gen)
        run = vae.decode
    peak, out = peak_of(lambda: run(x), device)
    print(json.dumps(dict(peak=peak, output=out.numel() * out.element_size())))


def bench_memory(args, cfg: VAE22Config) -> list[dict]:
    rows = []
    for frames in FRAMES:
        row = dict(frames=frames)
        for step in ("encode", "decode"):
            cmd = [sys.executable, __file__, "--child", step, str(frames), str(args.height), str(args.width),
                   "--device", args.device, "--dims", str(cfg.dim), str(cfg.dec_dim)]
            result = run_child(cmd)
            row[f"{step}_peak_MiB"] = result["peak"] / 2**20
            row[f"{step}_beyond_MiB"] = (result["peak"] - result["output"]) / 2**20
        rows.append(row)
    return rows


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once among those the ops under it create.
    A storage counts from the first tensor seen on it until the last such tensor dies; the
    storages given in `external` (weights, the input) are never counted."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}  # storage -> tensors seen on it and still alive
        self._external = {t.untyped_storage()._cdata for t in external}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (key := t.untyped_storage()._cdata) not in self._external:
                if key not in self._refs:
                    self._refs[key] = 0
                    self.live += t.untyped_storage().nbytes()
                    self.peak = max(self.peak, self.live)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key, t.untyped_storage().nbytes())
        return out

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= nbytes


def count_live_bytes(step: str, frames: int, height: int, width: int) -> tuple[int, int]:
    """(peak live bytes, output bytes) of the released Wan2.2 VAE's encode or decode, on meta."""
    with torch.device("meta"):
        vae = WanVAE22().eval()
        x = (torch.zeros(1, 3, frames, height, width) if step == "encode" else
             torch.zeros(1, 48, (frames - 1) // 4 + 1, height // 16, width // 16))
    with torch.no_grad(), LiveBytes([x, *vae.parameters()]) as counter:
        out = vae.encode(x) if step == "encode" else vae.decode(x)
    return counter.peak, out.numel() * out.element_size()


def bench_count(args) -> list[dict]:
    rows = []
    for frames in FRAMES:
        row = dict(frames=frames)
        for step in ("encode", "decode"):
            peak, output = count_live_bytes(step, frames, 704, 1280)
            row[f"{step}_peak_MiB"] = peak / 2**20
            row[f"{step}_beyond_MiB"] = (peak - output) / 2**20
        rows.append(row)
    return rows


def print_memory_table(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'frames':>7} {'encode peak':>12} {'encode beyond':>14} {'decode peak':>12} {'decode beyond':>14}")
    for r in rows:
        print(f"{r['frames']:>7} {r['encode_peak_MiB']:>12.1f} {r['encode_beyond_MiB']:>14.1f} "
              f"{r['decode_peak_MiB']:>12.1f} {r['decode_beyond_MiB']:>14.1f}")


def bench_decode_time(args) -> dict:
    cfg = VAE22Config()  # the released widths: encoder 160, decoder 256, 48 latent channels
    frames, height, width = (121, 704, 1280) if args.full else (args.time_frames, args.time_size, args.time_size)
    ours = random_vae(cfg, "cpu")
    theirs = diffusers_vae22(official_state(ours), cfg)
    ours.to(args.device)
    theirs.to(args.device)
    mean, std = (s.to(args.device) for s in latent_stats(WanVAE22))
    gen = torch.Generator(device=args.device).manual_seed(1)
    z = torch.randn(1, 48, (frames - 1) // 4 + 1, height // 16, width // 16, device=args.device, generator=gen)

    result = compare_pair(lambda: ours.decode(z), lambda: theirs.decode(z * std + mean).sample, args.device,
                          args.repeat)
    return dict(video=[frames, height, width], **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true",
                        help="real widths and a 704x1280 frame for the memory runs, 121x704x1280 decode time (GPU)")
    parser.add_argument("--height", type=int, default=128, help="memory runs' frame height (default 128; --full 704)")
    parser.add_argument("--width", type=int, default=128, help="memory runs' frame width (default 128; --full 1280)")
    parser.add_argument("--time-frames", type=int, default=5, help="decode-time clip length (CPU)")
    # Below 128 px the 1024-wide first stages see latents of 4x4 or less, where PyTorch's own CPU
    # rule sends diffusers' convs to the naive kernel and wanx's CausalConv3d takes oneDNN (whose
    # per-call weight reorder dominates at that size): a regime no real video is decoded in.
    parser.add_argument("--time-size", type=int, default=128, help="decode-time frame side (CPU; default 128)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", choices=["memory", "count", "time"], default=None)
    parser.add_argument("--dims", nargs=2, type=int, metavar=("DIM", "DEC_DIM"),
                        help="memory runs' encoder and decoder widths (default: a quarter of the released 160 "
                             "and 256 on CPU, the released ones with --full)")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "FRAMES", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full:
        args.height, args.width = 704, 1280
    dims = args.dims or ((160, 256) if args.full else (40, 64))
    cfg = VAE22Config(dim=dims[0], dec_dim=dims[1])
    if args.child:
        step, frames, h, w = args.child
        memory_child(step, cfg, int(frames), int(h), int(w), args.device)
        return

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    if args.only in (None, "count"):
        print_memory_table("Wan2.2 VAE live tensor bytes, released widths 160/256, 704x1280 frames, fp32, meta "
                           "device (MiB; 'beyond' = peak minus the output itself):", bench_count(args))
    if args.only in (None, "memory"):
        print_memory_table(f"Wan2.2 VAE peak memory, {args.height}x{args.width} frames, encoder/decoder width "
                           f"{cfg.dim}/{cfg.dec_dim}, {args.device} (MiB; 'beyond' = peak minus the output itself):",
                           bench_memory(args, cfg))
    if args.only in (None, "time"):
        r = bench_decode_time(args)
        print(f"Wan2.2 VAE decode {r['video']} (released widths 160/256, 705M params): wanx {r['wanx_s']:.2f} s, "
              f"diffusers {r['diffusers_s']:.2f} s, diffusers/wanx = {r['ratio']:.2f}x  "
              f"(max |diff| {r['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
