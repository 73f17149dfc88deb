"""Host RAM to load a real-size Wan2.1 DiT with FP8 weights and run it block-streamed
(issue #8, "host RAM"), with random weights written to disk at full size.

    .venv/bin/python bench/memory_host.py                        # T2V-14B: ~43 GB of files, 10-20 min
    .venv/bin/python bench/memory_host.py --preset t2v-1.3B      # minutes; includes the official recipe
    .venv/bin/python bench/memory_host.py --workdir /data --keep # keep the files and reuse them next time

Writes the DiT twice, streaming (header from the shapes, then tensor by tensor, never the
whole model in memory): (a) a ComfyUI fp8_scaled single file (`model.diffusion_model.*`
keys, block Linear weights float8_e4m3fn with a `scale_weight` beside each, the rest bf16, a
`scaled_fp8` marker) and (b) the official layout in bf16 (`diffusion_pytorch_model*.safetensors`,
sharded with an index above 10 GB). Then, each in a child process of its own so peaks do not
mix, with the files' pages dropped from the page cache first (cold start):

  fp8_scaled  `wanx.load_model(file, dtype=torch.float32)`: FP8 layers take the stored fp8
              weights as they are; everything else is cast to float32.
  bf16+fp8    `wanx.load_model(folder, dtype=torch.float32, quantize="fp8")`: block Linear
              weights quantised tensor by tensor while loading.
  official    the official recipe (WanDiT materialised in bf16, `safetensors.torch.load_file`,
              `load_state_dict`), only where twice the bf16 size fits in MemAvailable - 2 GiB;
              otherwise the bytes it would need are printed.

For the first two: peak RssAnon (what the process allocates) and peak total resident memory
(RssAnon + RssFile; RssFile = memory-mapped checkpoint pages, reclaimable page cache) and time
while loading, then the same for ONE forward on a tiny input (4 video tokens, 512 text tokens,
float32 compute) with every block streamed by `BlockStreamer(model, "cpu", 0)`, and the
streamer's accounting. Peaks are sampled from /proc/self/status every 2 ms (bench/memory.py);
VmHWM (the kernel's exact peak of total RSS, reset before each phase) is shown beside them.
Figures are GiB and multiples of the fp8 weight bytes (the FP8Linear weights of the blocks).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import ResidentPeak, resident  # noqa: E402

GiB = 2**30
SHARD_BYTES = 10 * 10**9  # official-layout files above this are sharded, as released checkpoints are
FP8_FILE = "wan2.1_t2v_fp8_scaled.safetensors"
COMFY_PREFIX = "model.diffusion_model."
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
RANDOM_ELEMENTS = 1 << 26  # one reusable random buffer (128 MB bf16), sliced per tensor


# --- writing the checkpoints, streaming ----------------------------------------------------


def plan(preset: str) -> tuple[list[tuple[str, tuple[int, ...], bool]], object]:
    """(official name, shape, is an FP8 layer weight) of every DiT tensor, in model order."""
    from wanx.memory.fp8 import fp8_layer_names
    from wanx.models.transformer import WanDiT

    with torch.device("meta"):
        model = WanDiT(preset)
    fp8 = set(fp8_layer_names(model))
    tensors = []
    for name, t in model.state_dict().items():
        layer, _, leaf = name.rpartition(".")
        tensors.append((name, tuple(t.shape), layer in fp8 and leaf == "weight"))
    return tensors, model.config


class RandomBytes:
    """~N(0, 0.02) values, in bf16 and as float8_e4m3fn of value / `scale`, from one buffer."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        bf16 = torch.empty(RANDOM_ELEMENTS, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
        self.scale = float(bf16.abs().max()) / torch.finfo(torch.float8_e4m3fn).max
        fp8 = (bf16.float() / self.scale).to(torch.float8_e4m3fn)
        self.buffers = {torch.bfloat16: bf16.view(torch.uint8).numpy().tobytes(),
                        torch.float8_e4m3fn: fp8.view(torch.uint8).numpy().tobytes()}
        self.rng = random.Random(seed)

    def write(self, fh, dtype: torch.dtype, numel: int) -> None:
        if dtype == torch.float32:  # the fp8 scales: one value each
            fh.write(struct.pack("<f", self.scale) * numel)
            return
        buf, size = memoryview(self.buffers[dtype]), dtype.itemsize
        remaining, pos = numel * size, self.rng.randrange(RANDOM_ELEMENTS) * size
        while remaining:
            take = min(remaining, len(buf) - pos)
            fh.write(buf[pos:pos + take])
            remaining -= take
            pos = 0


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], source: RandomBytes) -> int:
    """A safetensors file from (name, dtype, shape), the header first, then tensor by tensor
    (ordered by element size, largest first, so every tensor starts aligned)."""
    entries = sorted(entries, key=lambda e: -e[1].itemsize)  # stable: model order within a dtype
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = dtype.itemsize * (int(torch.Size(shape).numel()))
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, dtype, shape in entries:
            source.write(fh, dtype, int(torch.Size(shape).numel()))
        fh.flush()
        os.fsync(fh.fileno())
    drop_from_page_cache([path])
    return 8 + len(raw) + offset


def write_fp8_scaled(folder: Path, tensors, config, source: RandomBytes) -> Path:
    entries = []
    for name, shape, fp8 in tensors:
        key = COMFY_PREFIX + name
        if fp8:
            entries.append((key, torch.float8_e4m3fn, shape))
            entries.append((key.removesuffix(".weight") + ".scale_weight", torch.float32, (1,)))
        else:
            entries.append((key, torch.bfloat16, shape))
    entries.append(("scaled_fp8", torch.float8_e4m3fn, (0,)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"num_heads": config.num_heads}))
    write_safetensors(folder / FP8_FILE, entries, source)
    return folder / FP8_FILE


def write_official_bf16(folder: Path, tensors, config, source: RandomBytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name, shape, _ in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, torch.bfloat16, shape))
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(folder / "diffusion_pytorch_model.safetensors", shards[0], source)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            file = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            print(f"    shard {i}/{len(shards)}", flush=True)
            write_safetensors(folder / file, shard, source)
            for name, dtype, shape in shard:
                weight_map[name] = file
                total += 2 * int(torch.Size(shape).numel())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    fields = ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim",
              "text_dim", "text_len", "eps")
    cfg = {"_class_name": "WanModel", **{k: getattr(config, k) for k in fields}, "patch_size": list(config.patch_size)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def drop_from_page_cache(files) -> None:
    """Evict the files' (clean) pages, so each measurement starts from a cold cache."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- measuring (child processes) -----------------------------------------------------------


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn):
    gc.collect()
    reset_hwm()
    before = resident()
    start = time.perf_counter()
    with ResidentPeak(interval=0.002) as mem:
        result = fn()
    seconds = time.perf_counter() - start
    return result, dict(seconds=seconds, before=before, peak=mem.peak, hwm=vm_hwm())


def live_bytes(model) -> int:
    """Bytes of the model's tensors (what RssAnon would hold if freed memory went back)."""
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


def malloc_trim() -> dict | None:
    """glibc's malloc_trim(0), then the resident memory: what of RssAnon was freed memory the
    allocator kept (None off glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return resident()


def child_wanx(path: str, quantize: str | None) -> dict:
    import wanx
    from wanx.memory.fp8 import FP8Linear
    from wanx.memory.streaming import BlockStreamer

    torch.set_grad_enabled(False)
    model, load = measure(lambda: wanx.load_model(path, dtype=torch.float32, quantize=quantize))
    gc.collect()
    load["after"] = resident()
    load["live"] = live_bytes(model)

    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    fp8_ids = {id(m.weight) for m in fp8} | {id(m.scale) for m in fp8}
    floats = [(n, p) for n, p in model.named_parameters() if id(p) not in fp8_ids]
    sizes = dict(
        num_params=sum(p.numel() for p in model.parameters()) - sum(m.scale.numel() for m in fp8),
        fp8_layers=len(fp8),
        fp8_weight_bytes=sum(m.weight.nbytes for m in fp8),
        fp8_scale_bytes=sum(m.scale.nbytes for m in fp8),
        float_bytes={str(d).removeprefix("torch."): sum(p.nbytes for _, p in floats if p.dtype == d)
                     for d in {p.dtype for _, p in floats}},
        largest_float=[(n, str(p.dtype).removeprefix("torch."), p.nbytes)
                       for n, p in sorted(floats, key=lambda x: -x[1].nbytes)[:4]],
    )

    streamer = BlockStreamer(model, "cpu", 0)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 1, 4, 4, generator=gen)  # -> 1 x 2 x 2 = 4 tokens
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    timestep = torch.tensor([500.0])
    streamer.stats.reset()
    out, forward = measure(lambda: model(x, timestep, context))
    forward["after"] = resident()
    s = streamer.stats
    forward["stats"] = dict(budget=s.budget, resident=s.resident, streamed=s.streamed, largest_unit=s.largest_unit,
                            peak_device_bytes=s.peak_device_bytes, moved_bytes=s.moved_bytes)
    forward["output"] = dict(shape=list(out.shape), finite=bool(torch.isfinite(out).all()),
                             std=float(out.float().std()))
    del out
    gc.collect()
    forward["trimmed"] = malloc_trim()
    return dict(load=load, forward=forward, sizes=sizes)


def child_official(folder: str, preset: str) -> dict:
    from safetensors.torch import load_file

    from wanx.models.transformer import WanDiT

    def recipe():
        torch.set_default_dtype(torch.bfloat16)
        model = WanDiT(preset)  # materialised, default init
        state = {}
        for file in weight_files(Path(folder)):
            state.update(load_file(str(file)))
        model.load_state_dict(state)
        return model

    model, load = measure(recipe)
    gc.collect()
    load["after"] = resident()
    load["live"] = live_bytes(model)
    load["trimmed"] = malloc_trim()
    return dict(load=load)


def run_child(spec: dict, files) -> dict:
    """Run one measurement in a child process; stop it if its anonymous memory would leave
    less than 1.5 GiB available on the machine (so a surprise never reaches the OOM killer)."""
    drop_from_page_cache(files)
    limit = mem_available() - int(1.5 * GiB)
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=out, text=True)
        stopped = None
        while child.poll() is None:
            anon = _child_anon(child.pid)
            if anon > limit:
                stopped = anon
                child.kill()
                child.wait()
                break
            time.sleep(0.05)
        if stopped is not None:
            return dict(error=f"stopped: its RssAnon reached {gib(stopped)} GiB (limit {gib(limit)} GiB)")
        if child.returncode:
            return dict(error=f"child exited with {child.returncode}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def _child_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- report ----------------------------------------------------------------------------------


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def report(preset: str, config, sizes: dict, files: dict, results: dict, official_note: str | None) -> None:
    unit = sizes["fp8_weight_bytes"]
    bf16_copy = 2 * sizes["num_params"]
    print()
    print(f"{preset}: {sizes['num_params'] / 1e9:.2f} B parameters; {sizes['fp8_layers']} FP8 layers")
    print(f"  fp8 weight bytes (FP8Linear weights, the 1.00x unit) {gib(unit)} GiB; their fp32 per-channel scales "
          f"{sizes['fp8_scale_bytes'] / 2**20:.1f} MiB")
    print(f"  a bf16 copy of the model                             {gib(bf16_copy)} GiB ({bf16_copy / unit:.2f}x)")
    print(f"  fp8_scaled file                                      {gib(files['fp8'])} GiB ({files['fp8'] / unit:.2f}x)")
    print(f"  official bf16 file(s)                                {gib(files['bf16'])} GiB ({files['bf16'] / unit:.2f}x)")
    floats = ", ".join(f"{d} {gib(b)} GiB" for d, b in sorted(sizes["float_bytes"].items()))
    largest = ", ".join(f"{n} {gib(b)}" for n, _, b in sizes["largest_float"])
    print(f"  parameters outside FP8 layers after loading (dtype=float32): {floats}; largest: {largest} GiB")
    print()
    print("cold page cache at each start; peak anon = RssAnon, peak total = RssAnon + RssFile (sampled every 2 ms);")
    print("VmHWM = kernel peak of total RSS in the phase; anon before/after = RssAnon at its start/end.")
    head = (f"{'run':<48}{'time s':>8}{'anon before':>12}{'peak anon':>11}{'x fp8':>8}{'peak total':>12}{'x fp8':>8}"
            f"{'VmHWM':>8}{'anon after':>12}")
    print(head)
    print("-" * len(head))

    def row(label: str, r: dict) -> None:
        p = r["peak"]
        print(f"{label:<48}{r['seconds']:>8.1f}{gib(r['before']['RssAnon']):>12}{gib(p['RssAnon']):>11}"
              f"{p['RssAnon'] / unit:>7.2f}x{gib(p['total']):>12}{p['total'] / unit:>7.2f}x{gib(r['hwm']):>8}"
              f"{gib(r['after']['RssAnon']):>12}")

    labels = {"fp8_scaled": "fp8_scaled file, load_model(fp32)", "bf16_fp8": "bf16 files, load_model(fp32, quantize=fp8)"}
    for key, label in labels.items():
        r = results.get(key)
        if r is None or "error" in r:
            print(f"{label:<48}{r['error'] if r else 'not run'}")
            continue
        row(label + ": load", r["load"])
        row(label.split(",")[0] + ": streamed forward", r["forward"])
    if "official" in results and "error" not in results["official"]:
        row("official: bf16 model + load_file + load_sd", results["official"]["load"])
    else:
        print(f"{'official: bf16 model + load_file + load_sd':<48}{official_note or results['official']['error']}")
    print()
    for key, label in labels.items():
        r = results.get(key)
        if r and "error" not in r:
            t = r["forward"]["trimmed"]
            print(f"{label.split(',')[0]}: the model's tensors {gib(r['load']['live'])} GiB; RssAnon after load "
                  f"{gib(r['load']['after']['RssAnon'])}, after the forward {gib(r['forward']['after']['RssAnon'])}, "
                  f"then after malloc_trim(0) {gib(t['RssAnon']) if t else '-'} GiB")
    off = results.get("official")
    if off and "error" not in off:
        t = off["load"]["trimmed"]
        print(f"official: the model's tensors {gib(off['load']['live'])} GiB; RssAnon after load "
              f"{gib(off['load']['after']['RssAnon'])}, after malloc_trim(0) {gib(t['RssAnon']) if t else '-'} GiB")
    for key, label in labels.items():
        r = results.get(key)
        if r and "error" not in r:
            s, o = r["forward"]["stats"], r["forward"]["output"]
            print(f"{label.split(',')[0]}: BlockStreamer(cpu, budget 0): streamed {gib(s['streamed'])} GiB, "
                  f"moved {gib(s['moved_bytes'])} GiB, peak_device_bytes {gib(s['peak_device_bytes'])} GiB "
                  f"(largest unit {gib(s['largest_unit'])} GiB), resident {gib(s['resident'])} GiB; "
                  f"output {o['shape']} finite={o['finite']} std={o['std']:.3g}")


def summary(preset: str, sizes: dict, results: dict, official_note: str | None) -> str:
    unit = sizes["fp8_weight_bytes"]
    parts = []
    for key, name in (("fp8_scaled", "fp8_scaled"), ("bf16_fp8", "bf16+quantize")):
        r = results.get(key)
        if r and "error" not in r:
            load, fwd = r["load"], r["forward"]
            parts.append(f"{name} load {load['seconds']:.0f} s peak anon {load['peak']['RssAnon'] / unit:.2f}x "
                         f"/ total {load['peak']['total'] / unit:.2f}x, streamed forward {fwd['seconds']:.0f} s "
                         f"peak anon {fwd['peak']['RssAnon'] / unit:.2f}x")
    off = results.get("official")
    if off and "error" not in off:
        parts.append(f"official recipe peak anon {off['load']['peak']['RssAnon'] / unit:.2f}x / total "
                     f"{off['load']['peak']['total'] / unit:.2f}x")
    else:
        parts.append(f"official recipe {official_note or off.get('error')}")
    return f"summary ({preset}, x = fp8 weight bytes {gib(unit)} GiB): " + "; ".join(parts)


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="t2v-14B", help="DiT preset (default t2v-14B; t2v-1.3B for a quick run)")
    parser.add_argument("--workdir", help="folder for the checkpoints (default: a temp dir under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the written files (and reuse them next time)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["run"] == "wanx":
            result = child_wanx(spec["path"], spec["quantize"])
        else:
            result = child_official(spec["path"], spec["preset"])
        print(json.dumps(result))
        return

    started = time.perf_counter()
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wanx-host-", dir="/tmp"))
    work = base / f"wanx-memory-host-{args.preset}"
    fp8_dir, bf16_dir = work / "fp8_scaled", work / "official_bf16"
    tensors, config = plan(args.preset)
    try:
        done = work / "complete"
        if done.is_file() and done.read_text() == args.preset:
            print(f"reusing the checkpoints in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            source = RandomBytes()
            print(f"writing {args.preset} (random weights) into {work}", flush=True)
            t0 = time.perf_counter()
            write_fp8_scaled(fp8_dir, tensors, config, source)
            t1 = time.perf_counter()
            size = sum(f.stat().st_size for f in weight_files(fp8_dir))
            print(f"  fp8_scaled file: {gib(size)} GiB in {t1 - t0:.0f} s ({size / (t1 - t0) / 1e6:.0f} MB/s)", flush=True)
            write_official_bf16(bf16_dir, tensors, config, source)
            t2 = time.perf_counter()
            size = sum(f.stat().st_size for f in weight_files(bf16_dir))
            print(f"  official bf16:   {gib(size)} GiB in {t2 - t1:.0f} s ({size / (t2 - t1) / 1e6:.0f} MB/s)", flush=True)
            del source
            gc.collect()
            done.write_text(args.preset)
        fp8_file = fp8_dir / FP8_FILE
        files = {"fp8": fp8_file.stat().st_size, "bf16": sum(f.stat().st_size for f in weight_files(bf16_dir))}
        all_files = weight_files(fp8_dir) + weight_files(bf16_dir)

        results = {}
        print("measuring: fp8_scaled file ...", flush=True)
        results["fp8_scaled"] = run_child(dict(run="wanx", path=str(fp8_file), quantize=None), all_files)
        print("measuring: bf16 files, quantize=fp8 ...", flush=True)
        results["bf16_fp8"] = run_child(dict(run="wanx", path=str(bf16_dir), quantize="fp8"), all_files)

        bf16_bytes = 2 * sum(int(torch.Size(s).numel()) for _, s, _ in tensors)
        need, avail = 2 * bf16_bytes, mem_available()
        official_note = None
        if need <= avail - 2 * GiB:
            print("measuring: official recipe ...", flush=True)
            results["official"] = run_child(dict(run="official", path=str(bf16_dir), preset=args.preset), all_files)
        else:
            official_note = (f"does not fit: needs 2 x {gib(bf16_bytes)} = {gib(need)} GiB; "
                             f"MemAvailable - 2 GiB = {gib(avail - 2 * GiB)} GiB (not run)")
        sizes = next((r["sizes"] for r in (results["fp8_scaled"], results["bf16_fp8"]) if "sizes" in r), None)
        if sizes is None:
            print("both measurements failed:", results)
            sys.exit(1)
        report(args.preset, config, sizes, files, results, official_note)
        print()
        print(summary(args.preset, sizes, results, official_note))
        print(f"wall time {time.perf_counter() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
