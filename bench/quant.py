"""Quantized DiT weights (issue #29): what each format wanx holds costs in bytes, host RAM to
load and time per layer, for T2V-1.3B- and 14B-shaped DiTs on random weights.

    .venv/bin/python bench/quant.py                  # CPU: ~2 minutes on 2 cores
    .venv/bin/python bench/quant.py --bytes-only     # the byte table alone (instant)
    python bench/quant.py                            # with CUDA: adds the device rows

Formats: bf16, fp8 (`wanx.memory.fp8`), int8 (`wanx.memory.int8`) and every GGUF quant type
`wanx.memory.gguf` supports (read from the module at run time), applied to the block Linear
layers wanx swaps (`block_linear_names`); the rest of the DiT in bf16, the parameters the model
keeps in float32 in float32.

1. bytes: the DiT as wanx holds it, counted exactly on a meta-device model with the real layer
   classes swapped in (nothing is allocated: 14B costs nothing), beside wanx's own estimate of
   a file stored that way (`memory.estimate.kept_bytes`, what `wanx generate` plans with).
2. load: peak host RAM (anonymous, sampled every ms, in a fresh child process) of
   `wanx.load_model` on a GGUF file of T2V-1.3B shape written here from random packed bytes
   (Q4_0 block Linear layers, F16/F32 for the rest, city96's layout), against the bytes held:
   10 of its 30 blocks by default (`--load-layers 0`: all of them; the file costs its disk write).
3. layer: one block Linear of each shape (1.3B: 1536x1536 attention, 8960x1536 FFN; 14B:
   5120x5120, 13824x5120) in each format, dequantizing per call as wanx does, on a token count
   (CPU default 1024; a 480P 81-frame video is 32,760) against a bf16 and a float32 nn.Linear
   of the same shape: the ratios are the figure, absolute CPU times are noisy on a shared
   machine. torchao's int8 weight-only layer is timed beside ours when torchao imports (it is
   not a wanx dependency).
4. CUDA only: the same layer times at 32,760 tokens, and the device memory the whole DiT takes
   in each format (allocated on the device, packed weights filled with valid random bytes).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wanx.configs import dit_config  # noqa: E402
from wanx.memory import gguf as wgguf  # noqa: E402
from wanx.memory.estimate import kept_bytes  # noqa: E402
from wanx.memory.fp8 import FP8, FP8Linear, block_linear_names  # noqa: E402
from wanx.memory.int8 import Int8Linear  # noqa: E402
from wanx.models import keeps_fp32  # noqa: E402
from wanx.models.transformer import WanDiT  # noqa: E402

GB = 1e9
PRESETS = ("t2v-1.3B", "t2v-14B")
# (label, out_features, in_features): the block Linear shapes of each release
CPU_SHAPES = ("1.3B attn", "1.3B ffn.0", "14B attn")  # the default on a CPU: a 14B FFN layer takes seconds a call
SHAPES = (("1.3B attn", 1536, 1536), ("1.3B ffn.0", 8960, 1536), ("14B attn", 5120, 5120), ("14B ffn.0", 13824, 5120))
VIDEO_TOKENS = 32760  # 480P (832x480), 81 frames: 21 x 30 x 52 patches
# The kind each format's block Linear weights are stored as (`kept_bytes`'s names)
STORED_KIND = {"bf16": "bfloat16", "fp8": "float8_e4m3fn", "int8": "int8"}


def gguf_types() -> list[str]:
    """Every quantized GGUF type wanx.memory.gguf supports, most bytes per weight first."""
    bpw = {name: size / block for name, block, size in wgguf.TYPES.values() if name in wgguf.QUANTIZED}
    return sorted(bpw, key=lambda name: -bpw[name])


def formats() -> list[str]:
    return ["bf16", "fp8", "int8", *gguf_types()]


def bits_per_weight(fmt: str) -> float:
    if fmt in STORED_KIND:
        return 16.0 if fmt == "bf16" else 8.0
    _, block, size = wgguf.TYPES[wgguf.qtype_id(fmt)]
    return 8 * size / block


def quant_layer(fmt: str, out_features: int, in_features: int, bias: bool = True, *, device="meta",
                dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The layer wanx holds a block Linear in for `fmt`, empty on `device`."""
    if fmt == "bf16":
        return nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
    if fmt == "fp8":
        return FP8Linear(in_features, out_features, bias, compute_dtype=dtype, device=device)
    if fmt == "int8":
        return Int8Linear(in_features, out_features, bias, compute_dtype=dtype, device=device)
    return wgguf.GGUFLinear(in_features, out_features, fmt, bias, compute_dtype=dtype, device=device)


def held_model(preset: str | object, fmt: str) -> nn.Module:
    """A meta-device WanDiT with its block Linear layers in `fmt`, dtypes as wanx loads them."""
    cfg = dit_config(preset) if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = WanDiT(cfg)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name, model.keep_in_fp32) else torch.bfloat16)
    if fmt != "bf16":
        for name in block_linear_names(model):
            parent, _, attr = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent), attr,
                    quant_layer(fmt, linear.out_features, linear.in_features, linear.bias is not None))
    return model


def dit_bytes(preset: str | object, fmt: str) -> dict:
    """held: the exact bytes of the DiT's tensors as wanx holds them in `fmt`; estimate:
    `kept_bytes` of the same model as a file stores it (block Linear weights in `fmt`, the rest
    counted in bf16); linear_weights: the parameters the format applies to."""
    model = held_model(preset, fmt)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    linear = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                 for n in block_linear_names(model, (FP8Linear, Int8Linear, wgguf.GGUFLinear)))
    total = _param_count(preset)
    kinds = {STORED_KIND.get(fmt, fmt): linear}
    kinds["bfloat16"] = kinds.get("bfloat16", 0) + total - linear
    return dict(held=held, estimate=kept_bytes(kinds, torch.bfloat16), linear_weights=linear, params=total)


@functools.lru_cache(maxsize=None)
def _param_count(preset: str) -> int:
    return sum(p.numel() for p in held_model(preset, "bf16").parameters())


# -- packed data -----------------------------------------------------------------------------------


def packed_random(fmt: str, out_features: int, in_features: int, *, device="cpu", seed: int = 0) -> torch.Tensor:
    """Valid packed bytes of a `fmt` weight without quantizing anything: every byte in
    0x20..0x3B, so any fp16 scale field read from them (whatever the layout) is a normal number
    in [2^-7, 1) and the dequantized weight is finite (no NaN or denormal to slow a CPU)."""
    n = wgguf.packed_bytes(fmt, (out_features, in_features))
    gen = torch.Generator(device=device).manual_seed(seed)
    # one random MiB repeated: drawing every byte of a GB-sized file costs more than writing it
    chunk = torch.randint(0x20, 0x3C, (min(n, 1 << 20),), dtype=torch.uint8, device=device, generator=gen)
    return chunk.repeat(-(-n // chunk.numel()))[:n]


def filled_layer(fmt: str, out_features: int, in_features: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A layer of `fmt` with random weights on `device` (bf16 compute)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if fmt in ("bf16", "fp32"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        layer = nn.Linear(in_features, out_features, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.normal_(0, 0.02, generator=gen)
        return layer.requires_grad_(False)
    layer = quant_layer(fmt, out_features, in_features, device=device)
    layer.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device), requires_grad=False)
    if fmt == "int8":
        w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, device=device, generator=gen)
        layer.set_weight(w, scale=torch.full((out_features,), 0.02 / 127, device=device))
    elif fmt == "fp8":
        w = torch.empty(out_features, in_features, device=device, dtype=torch.bfloat16).normal_(0, 100, generator=gen)
        layer.set_weight(w.clamp_(-448, 448).to(FP8), scale=torch.full((out_features,), 0.02 / 448, device=device))
    else:
        layer.set_weight(packed_random(fmt, out_features, in_features, device=device, seed=seed))
    return layer


def torchao_layer(out_features: int, in_features: int, device: torch.device) -> tuple[nn.Module | None, str]:
    """torchao's int8 weight-only Linear (bf16), or None and why not."""
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as err:  # not installed, or built against another torch
        return None, f"torchao not available ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    model = nn.Sequential(filled_layer("bf16", out_features, in_features, device))
    try:
        quantize_(model, Int8WeightOnlyConfig())
        with torch.no_grad():
            model(torch.zeros(1, in_features, dtype=torch.bfloat16, device=device))
    except Exception as err:  # imported, but its kernels do not run with this torch or device
        return None, f"torchao {torchao.__version__} does not run here ({type(err).__name__}: {str(err)[:120]})"
    return model, f"torchao {torchao.__version__}"


# -- timing ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_together(calls: dict, device: torch.device, repeats: int) -> dict:
    """Seconds of each call: one warm-up each, then `repeats` rounds calling them in turn, the
    fastest of each kept. On a shared machine other work only ever adds time, and taking turns
    spreads its drift over every format alike."""
    best = {}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def layer_rows(fmts: list[str], shapes, tokens: int, device: torch.device, repeats: int,
               with_torchao: bool = True) -> tuple[list[dict], str]:
    """Per shape and format: seconds of the layer's forward and of its dequantization alone,
    and the forward's ratio to bf16's and float32's nn.Linear of the same shape."""
    rows, ao_note = [], ""
    for label, out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, device=device, generator=torch.Generator(device=device).manual_seed(1))
        xb = x.to(torch.bfloat16)
        layers = {fmt: filled_layer(fmt, out_f, in_f, device) for fmt in ["fp32", "bf16", *[f for f in fmts if f != "bf16"]]}
        calls = {fmt: (lambda layer=layer: layer(x if layer.weight.dtype == torch.float32 else xb))
                 if isinstance(layer, nn.Linear) else (lambda layer=layer: layer(xb)) for fmt, layer in layers.items()}
        calls.update({("dequant", fmt): layer.dequantized for fmt, layer in layers.items() if hasattr(layer, "dequantized")})
        if with_torchao:
            ao, ao_note = torchao_layer(out_f, in_f, device)
            if ao is not None:
                calls["torchao int8"] = lambda: ao(xb)
        found = timed_together(calls, device, repeats)
        del layers, calls
        for fmt in [k for k in found if isinstance(k, str)]:
            rows.append(dict(shape=label, format=fmt, s=found[fmt], dequant_s=found.get(("dequant", fmt)),
                             x_bf16=found[fmt] / found["bf16"], x_fp32=found[fmt] / found["fp32"]))
    return rows, ao_note


# -- host RAM to load a GGUF file ------------------------------------------------------------------


def write_gguf(path: Path, preset: str, qtype: str, num_layers: int | None = None) -> int:
    """A GGUF file of `preset`'s shape (its first `num_layers` blocks) as city96 lays them out:
    block Linear weights packed in `qtype` (random valid bytes), other tensors of two or more
    dims F16, one-dim F32, the 5-dim patch embedding flattened with its shape recorded. Returns
    the file's size."""
    import dataclasses

    import gguf
    import numpy as np

    cfg = dit_config(preset)
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    with torch.device("meta"):
        model = WanDiT(cfg)
    linears = {n + ".weight" for n in block_linear_names(model)}
    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), "wan")
    rng = np.random.default_rng(0)
    for name, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if name in linears:
            packed = packed_random(qtype, *shape).numpy().reshape(shape[0], -1)
            writer.add_tensor(name, packed, raw_dtype=kind)
            continue
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32 if len(shape) == 1 else np.float16)
        if data.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
            data = data.reshape(-1)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (path.parent / "config.json").write_text(json.dumps(dict(num_layers=cfg.num_layers, num_heads=cfg.num_heads)),
                                             encoding="utf-8")
    return path.stat().st_size


def _load_child(path: str) -> None:
    """In a fresh process: load the file with wanx and print the peak resident set it took."""
    import memory

    import wanx

    with memory.ResidentPeak() as mem:
        model = wanx.load_model(path)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps(dict(held=held, anon=mem.peak["RssAnon"] - mem.before["RssAnon"],
                          file=mem.peak["RssFile"] - mem.before["RssFile"],
                          kept_anon=memory.resident()["RssAnon"] - mem.before["RssAnon"])))


def load_row(preset: str, qtype: str, num_layers: int | None) -> dict:
    import memory

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"dit-{qtype}.gguf"
        start = time.perf_counter()
        size = write_gguf(path, preset, qtype, num_layers)
        written = time.perf_counter() - start
        found = memory.run_child([sys.executable, __file__, "--load-child", str(path)])
    return dict(preset=preset, qtype=qtype, num_layers=num_layers or dit_config(preset).num_layers,
                file_bytes=size, write_s=written, **found)


# -- CUDA: the whole DiT on the device ------------------------------------------------------------


def device_dit_bytes(preset: str | object, fmt: str, device: torch.device) -> int:
    """Bytes allocated on the device by the DiT held in `fmt` (meta model moved there empty,
    packed weights filled with valid random bytes)."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    model = held_model(preset, fmt).to_empty(device=device)
    for m in model.modules():
        if isinstance(m, wgguf.GGUFLinear):
            m.qweight.data.random_(0x20, 0x3C)
    torch.cuda.synchronize(device)
    used = torch.cuda.memory_allocated(device) - before
    del model
    torch.cuda.empty_cache()
    return used


# -- printing --------------------------------------------------------------------------------------


def print_bytes(fmts: list[str]) -> dict:
    table = {preset: {fmt: dit_bytes(preset, fmt) for fmt in fmts} for preset in PRESETS}
    print("DiT bytes by format (computed: block Linear layers in the format, the rest bf16, "
          "the float32-kept parameters float32; GB = 1e9 bytes)")
    print(f"| format | bits/weight | {' | '.join(f'{p} held | {p} estimate' for p in PRESETS)} | x bf16 (14B) |")
    print("|---|---|" + "---|---|" * len(PRESETS) + "---|")
    for fmt in fmts:
        cells = " | ".join(f"{table[p][fmt]['held'] / GB:.2f} GB | {table[p][fmt]['estimate'] / GB:.2f} GB"
                           for p in PRESETS)
        ratio = table["t2v-14B"][fmt]["held"] / table["t2v-14B"]["bf16"]["held"]
        print(f"| {fmt} | {bits_per_weight(fmt):.4g} | {cells} | {ratio:.3f} |")
    return table


def print_layers(rows: list[dict], tokens: int, where: str) -> None:
    print(f"\nPer-layer forward (dequantize + matmul, bf16 compute) on {where}, {tokens} tokens "
          f"(a 480P 81-frame video has {VIDEO_TOKENS}); ratios to nn.Linear of the same shape")
    print("| shape | format | x bf16 Linear | x fp32 Linear | dequant share | ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = "-" if r["dequant_s"] is None else f"{min(r['dequant_s'] / r['s'], 1):.0%}"
        share = "0%" if r["format"] in ("bf16", "fp32") else share
        print(f"| {r['shape']} | {r['format']} | {r['x_bf16']:.2f} | {r['x_fp32']:.2f} | {share} | {r['s'] * 1e3:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes-only", action="store_true", help="print the byte table and stop")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"tokens per layer call (default: 1024 on CPU, {VIDEO_TOKENS} on CUDA)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per layer (the fastest is kept; default 2)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated layer shapes to time, or 'all' (default: all on CUDA, "
                             f"{','.join(CPU_SHAPES)} on a CPU; the ratios hardly depend on the shape at a given "
                             "token count: dequantization and matmul both scale with the weight count)")
    parser.add_argument("--formats", default=None, help="comma-separated formats (default: all)")
    parser.add_argument("--load-layers", type=int, default=10,
                        help="blocks of the 1.3B-shaped GGUF file the load is measured on (default 10 of 30: "
                             "writing the whole 0.84 GB file takes 15-40 s on a slow disk; 0: all 30)")
    parser.add_argument("--load-qtypes", default="Q4_0", help="GGUF types of the load rows ('' for none)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        _load_child(args.load_child)
        return 0
    fmts = formats()
    if args.formats:
        asked = [f.strip() for f in args.formats.split(",") if f.strip()]
        unknown = [f for f in asked if f not in fmts]
        if unknown:
            parser.error(f"--formats: unknown {', '.join(unknown)}; choose from {', '.join(fmts)}")
        fmts = asked
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    labels = [s[0] for s in SHAPES]
    asked = (labels if args.shapes == "all" or (args.shapes is None and device.type == "cuda")
             else list(CPU_SHAPES) if args.shapes is None else [a.strip() for a in args.shapes.split(",")])
    unknown = [a for a in asked if a not in labels]
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(labels)} or all")
    shapes = [s for s in SHAPES if s[0] in asked]
    tokens = args.tokens or (VIDEO_TOKENS if device.type == "cuda" else 1024)

    print(f"bench/quant.py: torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads; "
          f"GGUF types from wanx.memory.gguf: {', '.join(gguf_types())}\n")
    print_bytes(fmts)
    if args.bytes_only:
        return 0

    qtypes = [q.strip() for q in args.load_qtypes.split(",") if q.strip()]
    if qtypes:
        print("\nHost RAM to load a GGUF DiT of T2V-1.3B shape with wanx.load_model (fresh process, "
              "peak anonymous memory over the start; the file is memory-mapped, its pages are page cache)")
        print("| file | blocks | file size | held by the model | peak anonymous | peak / held | file pages | write s |")
        print("|---|---|---|---|---|---|---|---|")
        for qtype in qtypes:
            r = load_row("t2v-1.3B", qtype, args.load_layers or None)
            print(f"| {qtype} | {r['num_layers']} of 30 | {r['file_bytes'] / GB:.3f} GB | {r['held'] / GB:.3f} GB | "
                  f"{r['anon'] / GB:.3f} GB | {r['anon'] / r['held']:.2f} | "
                  f"{r['file'] / GB:.3f} GB | {r['write_s']:.1f} |")

    rows, ao_note = layer_rows(fmts, shapes, tokens, device, args.repeats)
    print_layers(rows, tokens, f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu"
                 else torch.cuda.get_device_name(device))
    print(f"\ntorchao int8 weight-only: {ao_note or 'not timed'}")

    if device.type == "cuda":
        print(f"\nDiT held on {torch.cuda.get_device_name(device)} (torch.cuda.memory_allocated, measured)")
        print("| format | " + " | ".join(PRESETS) + " |")
        print("|---|" + "---|" * len(PRESETS))
        for fmt in fmts:
            print(f"| {fmt} | " + " | ".join(f"{device_dit_bytes(p, fmt, device) / GB:.2f} GB" for p in PRESETS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
