"""One GPU run (issue #26): every CUDA path and GPU figure of the docs, in one command, on random
weights at the real architectures. Writes `gpu-report.json` and `gpu-report.md` into `--out`.

    python bench/gpu_all.py --out bench/results           # CUDA: full sizes, < 8 minutes on an H100/H200
    python bench/gpu_all.py --quick                       # CUDA: the same paths at small sizes (~1 minute)
    .venv/bin/python bench/gpu_all.py --device cpu --quick  # CPU: tiny sizes (the test's run, < 1 minute)
    python bench/gpu_all.py --markdown bench/results/gpu-report.json   # the table of a saved report
    python bench/gpu_all.py --markdown none               # the table with every row "not measured"

Sections, each timed and each failing on its own (its error is recorded, the next one runs):

1. correctness: T2V-1.3B shapes at a small size. bf16 on the device vs float32 on the CPU
   (same weights); FP8 (`wanx.memory.fp8`, dequantising and `torch._scaled_mm`) vs bf16;
   streamed (`BlockStreamer`, budget 0) vs resident (must be identical); live LoRA vs fused
   (`wanx.lora`); compiled (`wanx.speed.compile_blocks`) vs eager; Wan2.2 expert swap (two
   1.3B-shaped experts through `WanPipeline(dit_low=...)`, offloaded one at a time vs resident).
2. speed: one guided step (batched CFG) of 1.3B at 832x480x81, every importable attention
   backend eager and compiled, and diffusers' `WanTransformer3DModel` on the same weights
   (`bench/speed_gpu.py`'s `step_rows`).
3. memory: peak allocated/reserved of 1.3B resident, streamed at budgets 4GB and 0, FP8
   streamed at 0; 14B FP8 streamed at 6GB (`bench/gpu.py`'s configurations and `measure`).
4. end_to_end: 1.3B 480P x 81 frames x a few steps through `WanPipeline` with VAE decode, step
   cache off / TeaCache / MagCache; the 50-step time is extrapolated from the measured steps
   (and says so).
5. training: one LoRA step of `wanx train` on 1.3B 480P x 81 with the low-memory recipe
   (`--gradient-checkpointing --offload-activations --fp8`; `bench/train_memory.py`'s helpers).

CPU mode (`--device cpu`): tiny stand-in models (head dim 128, 2-4 blocks), tiny sizes; the
CUDA-only figures (peak CUDA memory, `_scaled_mm`, flash/sage kernels) are recorded as skipped
with the reason. Missing optional packages (diffusers, flash_attn, sageattention, av) skip
their rows with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (puts the repository root and src/ on sys.path)

REPORT = "gpu-report.json"
TABLE = "gpu-report.md"
GB = gpu.GB
GUIDANCE = 5.0
CACHE_NOTE = "a cache skips little in a few steps: its 50-step speed-up needs a 50-step run"
SECTIONS = ("correctness", "speed", "memory", "end_to_end", "training")

# Every row the full run reports, in table order: the docs table lists them all, "not measured"
# where a report lacks them. Rows a run adds beyond these are listed after them.
CATALOGUE = {
    "correctness": ["bf16 on device vs fp32 CPU", "FP8 dequantised vs bf16", "FP8 _scaled_mm vs bf16",
                    "streamed (budget 0) vs resident", "live LoRA vs fused", "compiled vs eager",
                    "Wan2.2 experts offloaded vs resident"],
    "speed": [f"wanx {b}{c}" for b in ("sdpa", "flash3", "flash2", "sage") for c in ("", " compiled")]
    + ["official WanModel", "diffusers WanTransformer3DModel"],
    "memory": ["1.3B resident", "1.3B streamed 4GB", "1.3B streamed 0", "1.3B FP8 streamed 0",
               "14B FP8 streamed 6GB"],
    "end_to_end": ["cache off", "teacache", "magcache", "4 steps, no CFG", "context windows, 2x the frames"],
    "training": ["LoRA step: ckpt + offload act. + FP8"],
}


@dataclasses.dataclass
class Mode:
    """Models and sizes of one run. Pixel sizes are (width, height, frames)."""

    name: str
    cfg13: object  # DiTConfig standing for T2V-1.3B
    cfg14: object  # ... for T2V-14B
    check: tuple[int, int, int]
    speed: tuple[int, int, int]
    memory: tuple[int, int, int]
    e2e: tuple[int, int, int]
    e2e_steps: int
    train: tuple[int, int, int]
    steps: int  # timed steps per row
    compile: bool
    dtype: torch.dtype  # compute dtype of the speed and memory rows


def pick_mode(device: torch.device, quick: bool) -> Mode:
    from wanx.configs import DiTConfig, dit_config

    t13, t14 = dit_config("t2v-1.3B"), dit_config("t2v-14B")
    if device.type == "cuda":
        if quick:
            return Mode("cuda quick", t13, dataclasses.replace(t14, num_layers=4), (416, 240, 5), (416, 240, 17),
                        (416, 240, 17), (416, 240, 17), 2, (416, 240, 17), 2, True, torch.bfloat16)
        return Mode("cuda full", t13, t14, (416, 240, 5), (832, 480, 81), (832, 480, 81), (832, 480, 81), 3,
                    (832, 480, 81), 3, True, torch.bfloat16)
    # CPU: stand-ins with the releases' head dim (128); float32 where times are taken (CPUs
    # emulate bf16 matmuls), bf16 where the comparison is bf16 against float32.
    if quick:
        tiny = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2)
        return Mode("cpu quick", tiny, DiTConfig(dim=384, ffn_dim=768, num_heads=3, num_layers=2), (32, 32, 5),
                    (64, 64, 5), (64, 64, 5), (32, 32, 5), 2, (32, 32, 5), 1, False, torch.float32)
    small = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4)
    return Mode("cpu", small, DiTConfig(dim=640, ffn_dim=1280, num_heads=5, num_layers=2), (64, 64, 5),
                (96, 64, 9), (96, 64, 9), (64, 64, 9), 3, (64, 64, 9), 2, True, torch.float32)


def latent(size: tuple[int, int, int]) -> tuple[int, int, int]:
    w, h, f = size
    return ((f - 1) // 4 + 1, h // 8, w // 8)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float32 on the host."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "CUDA only"


def peaks(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return dict(peak_alloc_gb=torch.cuda.max_memory_allocated(device) / GB,
                peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GB)


def reset_peaks(device: torch.device) -> None:
    gpu.release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Rows:
    """The rows of one section; each added one is printed at once."""

    def __init__(self, section: str):
        self.section, self.rows = section, []

    def add(self, name: str, *, skipped: str | None = None, error: str | None = None, note: str = "", **metrics):
        row = dict(name=name, metrics={k: v for k, v in metrics.items() if v is not None}, skipped=skipped,
                   error=error, note=note)
        self.rows.append(row)
        print(f"  [{self.section}] {name}: {format_row(row)}", flush=True)
        return row

    def attempt(self, name: str, fn, *, note: str = "") -> None:
        """Run `fn() -> metrics dict` as one row; an exception becomes the row's error."""
        try:
            metrics = fn()
        except Exception as err:  # one broken path must not cost the other rows
            traceback.print_exc()
            self.add(name, error=first_line(err), note=note)
            return
        extra = metrics.pop("note", "")
        self.add(name, note="; ".join(x for x in (note, extra) if x), **metrics)


# -- section 1: correctness ----------------------------------------------------------------------


def random_inputs(cfg, size, device, batch: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, *latent(size), generator=gen).to(device)
    t = torch.full((batch,), 900.0, device=device)
    context = (torch.randn(batch, 64, cfg.text_dim, generator=gen) * 0.5).to(device)
    return x, t, context


def random_lora(cfg, rank: int = 8, seed: int = 5) -> dict[str, torch.Tensor]:
    """A LoRA (official key names) on every block's self-attention q and o, cross-attention k and FFN."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    shapes = {"self_attn.q": (cfg.dim, cfg.dim), "self_attn.o": (cfg.dim, cfg.dim),
              "cross_attn.k": (cfg.dim, cfg.dim), "ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    for i in range(cfg.num_layers):
        for name, (out, inp) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
            state[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.1
    return state


def section_correctness(rows: Rows, args, mode: Mode, device: torch.device) -> None:
    from wanx.lora import apply_lora
    from wanx.memory.fp8 import _scaled_mm_supported
    from wanx.memory.streaming import BlockStreamer
    from wanx.speed import compile_blocks

    cfg, bf16 = mode.cfg13, torch.bfloat16
    state = gpu.random_official_state(cfg, bf16, device if device.type == "cuda" else torch.device("cpu"))
    x, t, context = random_inputs(cfg, mode.check, device)

    def run(model, on: torch.device = device) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(on), t.to(on), context.to(on)).float().cpu()

    resident = gpu.build_wanx(cfg, state, fp8=False, dtype=bf16).to(device)
    out = run(resident)

    def versus_cpu():
        reference = gpu.build_wanx(cfg, {k: v.float() for k, v in state.items()}, fp8=False, dtype=torch.float32)
        ref = run(reference, torch.device("cpu"))
        note = "" if device.type == "cuda" else "both on the CPU here (bf16 vs float32)"
        return dict(rel_err=rel(out, ref), note=note)

    rows.attempt("bf16 on device vs fp32 CPU", versus_cpu)
    gpu.release(device)

    fp8_host = gpu.fp8_state(cfg, state, bf16, device)

    def fp8_vs_bf16(fast: bool):
        model = gpu.build_wanx(cfg, fp8_host, fp8=True, dtype=bf16, fast=fast).to(device)
        try:
            return dict(rel_err=rel(run(model), out))
        finally:
            del model
            gpu.release(device)

    rows.attempt("FP8 dequantised vs bf16", lambda: fp8_vs_bf16(False))
    if device.type != "cuda":
        rows.add("FP8 _scaled_mm vs bf16", skipped="CUDA only (torch._scaled_mm on sm_89+)")
    elif not _scaled_mm_supported(device):
        rows.add("FP8 _scaled_mm vs bf16", skipped=f"needs compute capability 8.9+, this GPU is "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
    else:
        rows.attempt("FP8 _scaled_mm vs bf16", lambda: fp8_vs_bf16(True))

    def streamed():
        model = gpu.build_wanx(cfg, state, fp8=False, dtype=bf16)  # on the host
        streamer = BlockStreamer(model, device, 0)
        try:
            err = rel(run(model), out)
            return dict(rel_err=err, identical=err == 0.0, note="" if err == 0.0 else "NOT IDENTICAL",
                        device_weights_gb=streamer.stats.peak_device_bytes / GB)
        finally:
            del model, streamer
            gpu.release(device)

    rows.attempt("streamed (budget 0) vs resident", streamed)

    def lora():
        lora_state = random_lora(cfg)
        live = gpu.build_wanx(cfg, state, fp8=False, dtype=bf16).to(device)
        apply_lora(live, lora_state, 1.0, fuse=False)
        out_live = run(live)
        del live
        fused = gpu.build_wanx(cfg, {k: v.clone() for k, v in state.items()}, fp8=False, dtype=bf16).to(device)
        apply_lora(fused, lora_state, 1.0, fuse=True)
        out_fused = run(fused)
        del fused
        gpu.release(device)
        return dict(rel_err=rel(out_live, out_fused), lora_effect=rel(out_fused, out),
                    note="lora_effect: fused vs no LoRA (the LoRA changes the output)")

    rows.attempt("live LoRA vs fused", lora)

    if not mode.compile:
        rows.add("compiled vs eager", skipped="--quick on CPU: inductor's cold C++ compile can take minutes on 2 cores "
                 "(run without --quick)")
    else:
        def compiled():
            torch._dynamo.reset()
            handle = compile_blocks(resident)
            try:
                warm = handle.warm_up(x, t, context)
                return dict(rel_err=rel(run(resident), out), warmup_s=warm)
            finally:
                handle.remove()
                torch._dynamo.reset()

        rows.attempt("compiled vs eager", compiled)
    del resident
    gpu.release(device)

    def experts():
        from wanx.memory.placement import Placement
        from wanx.models.vae import WanVAE
        from wanx.pipeline import WanPipeline
        from wanx.runtime import Runtime

        low_state = gpu.random_official_state(cfg, bf16, device if device.type == "cuda" else torch.device("cpu"),
                                              seed=1)
        torch.manual_seed(0)
        vae = WanVAE().eval()
        gen = torch.Generator().manual_seed(3)
        request = dict(prompt_embeds=torch.randn(1, 64, cfg.text_dim, generator=gen),
                       negative_prompt_embeds=torch.randn(1, 64, cfg.text_dim, generator=gen),
                       width=mode.check[0], height=mode.check[1], num_frames=mode.check[2], num_inference_steps=4,
                       boundary=0.6, guidance_scale=4.0, guidance_scale_low=3.0, shift=1.0, seed=3,
                       output_type="latents", progress=False)
        high = gpu.build_wanx(cfg, state, fp8=False, dtype=bf16)
        low = gpu.build_wanx(cfg, low_state, fp8=False, dtype=bf16)
        # Offloaded: both experts on the host, the active one moved in for its steps.
        runtime = Runtime.create(device, bf16, offload="model")
        placement = Placement("model", device, {"dit": high, "dit_low": low})
        pipe = WanPipeline(high, vae.to(device), dit_low=low, runtime=runtime, placement=placement)
        offloaded = pipe(**request).float().cpu()
        split = dict(pipe.last_experts)
        # Resident: both on the device.
        pipe = WanPipeline(high.to(device), vae, dit_low=low.to(device))
        resident_out = pipe(**request).float().cpu()
        err = rel(offloaded, resident_out)
        del pipe, high, low, vae
        gpu.release(device)
        if not (split.get("high_noise_steps") and split.get("low_noise_steps")):
            raise RuntimeError(f"the schedule did not reach both experts: {split}")
        return dict(rel_err=err, identical=err == 0.0, high_steps=split.get("high_noise_steps"),
                    low_steps=split.get("low_noise_steps"), note="" if err == 0.0 else "NOT IDENTICAL")

    rows.attempt("Wan2.2 experts offloaded vs resident", experts)


# -- section 2: speed ------------------------------------------------------------------------------


def section_speed(rows: Rows, args, mode: Mode, device: torch.device) -> None:
    import speed_gpu

    from wanx.attention import set_attention_backend

    cfg = mode.cfg13
    state = gpu.random_official_state(cfg, mode.dtype, device if device.type == "cuda" else torch.device("cpu"))
    opts = types.SimpleNamespace(steps=mode.steps, no_compile=not mode.compile, official_repo=args.official_repo,
                                 cache_attention="auto")
    try:
        found, dit = speed_gpu.step_rows(opts, cfg, state, device, mode.dtype, latent(mode.speed))
    finally:
        set_attention_backend("auto")
        torch._dynamo.reset()
    del dit
    gpu.release(device)
    by_name = {r.name: r for r in found}
    sdpa = by_name.get("wanx sdpa")
    theirs = by_name.get("diffusers WanTransformer3DModel")
    for name in [n for n in CATALOGUE["speed"] if n in by_name or n.endswith(" compiled")] + [
            n for n in by_name if n not in CATALOGUE["speed"]]:
        r = by_name.get(name)
        if r is None:  # a compiled row of a backend that did not run
            base = by_name.get(name.removesuffix(" compiled"))
            why = base.skipped if base is not None and base.skipped else (
                "--quick on CPU: no compile (inductor's cold C++ compile can take minutes on 2 cores)" if not mode.compile
                else "not run")
            rows.add(name, skipped=why)
            continue
        if r.step is None:
            text = r.skipped or "not run"
            rows.add(name, error=text if text.startswith(("error", "compile error")) else None,
                     skipped=None if text.startswith(("error", "compile error")) else text, note=r.note)
            continue
        rows.add(name, s_step=r.step, x_sdpa=r.step / sdpa.step if sdpa and sdpa.step else None,
                 diffusers_over_this=theirs.step / r.step if theirs and theirs.step else None,
                 rel_diff=r.rel_diff, warmup_s=r.warmup_s,
                 note="; ".join(x for x in (r.note, "" if r.exact else "approximate attention") if x))


# -- section 3: memory -----------------------------------------------------------------------------


def memory_rows(rows: Rows, cfg, specs: list[tuple[str, object]], mode: Mode, device: torch.device,
                label_note: str) -> None:
    """`bench/gpu.py`'s configurations on `cfg` at `mode.memory`, one row each."""
    from wanx.memory.estimate import estimate
    from wanx.memory.fp8 import _scaled_mm_supported

    frames, height, width = latent(mode.memory)
    rng = device if device.type == "cuda" else torch.device("cpu")
    official = gpu.random_official_state(cfg, mode.dtype, rng)
    fast = device.type == "cuda" and _scaled_mm_supported(device)
    ctx = gpu.Ctx(cfg=cfg, device=device, dtype=mode.dtype, official=official, fp8_fast=fast)
    if any(spec.fp8 for _, spec in specs):
        ctx.fp8 = gpu.fp8_state(cfg, official, mode.dtype, device)
        if not any(not spec.fp8 for _, spec in specs):
            ctx.official = official = None  # 14B: the float copy is not needed any more (28 GB of host RAM)
    gen = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 16, frames, height, width, generator=gen)
    ctx.inputs = dict(x=lat.expand(2, -1, -1, -1, -1).contiguous().to(device), t=torch.full((2,), 999.0, device=device),
                      context=torch.randn(2, cfg.text_len, cfg.text_dim, generator=gen).to(device, mode.dtype))
    w, h, f = mode.memory
    work = estimate(cfg, h, w, f, dtype=mode.dtype, batch=2).denoise
    reference: dict = {}
    for name, spec in specs:
        result = gpu.Result(spec.name)
        gpu.measure(spec, ctx, mode.steps, work, result, reference)
        notes = [label_note] + ([] if device.type == "cuda" else ["peak: CUDA only"])
        if spec.fp8 and fast:
            notes.append("FP8 via _scaled_mm")
        if result.step is None:
            why = result.skipped or "not run"
            rows.add(name, error=why if why.startswith("error") else None,
                     skipped=None if why.startswith("error") else why, note="; ".join(n for n in notes if n))
            continue
        metrics = dict(s_step=result.step, weights_gb=result.weights / GB)
        if device.type == "cuda":
            metrics.update(peak_alloc_gb=result.peak / GB, peak_reserved_gb=result.reserved / GB)
        rows.add(name, note="; ".join(n for n in notes if n), **metrics, units=result.units or None)
    del ctx, official
    gpu.release(device)


def section_memory(rows: Rows, args, mode: Mode, device: torch.device) -> None:
    from wanx.memory.streaming import parse_bytes

    Spec = gpu.Spec
    w, h, f = mode.memory
    size = f"{w}x{h}x{f}, batch 2 (guided step)"
    stand_in = "" if device.type == "cuda" else "CPU stand-in model"
    memory_rows(rows, mode.cfg13, [
        ("1.3B resident", Spec("wanx resident", "wanx")),
        ("1.3B streamed 4GB", Spec("wanx blocks 4GB", "wanx", budget=parse_bytes("4GB"))),
        ("1.3B streamed 0", Spec("wanx blocks 0", "wanx", budget=0)),
        ("1.3B FP8 streamed 0", Spec("wanx fp8 blocks 0", "wanx", fp8=True, budget=0)),
    ], mode, device, "; ".join(x for x in (size, stand_in) if x))
    layers = "" if mode.cfg14.num_layers == 40 else f"{mode.cfg14.num_layers} of 40 blocks"
    memory_rows(rows, mode.cfg14, [
        ("14B FP8 streamed 6GB", Spec("wanx fp8 blocks 6GB", "wanx", fp8=True, budget=parse_bytes("6GB"))),
    ], mode, device, "; ".join(x for x in (size, stand_in or layers) if x))
    quant_rows(rows, mode, device)


QUANT_FORMATS = ("bf16", "fp8", "int8", "Q8_0", "Q4_K", "Q4_0")  # bench/quant.py has every GGUF type


def quant_rows(rows: Rows, mode: Mode, device: torch.device) -> None:
    """`bench/quant.py` in a few seconds: the T2V-14B DiT held in a few formats (allocated on
    the device and measured on CUDA; counted on a meta model elsewhere) and one 14B FFN layer
    (13824x5120) dequantizing per call against bf16's nn.Linear, at a 480P 81-frame video's
    tokens (CPU: a 1024x512 stand-in layer at 64 tokens, a smoke test: its times are noise)."""
    import quant

    cuda = device.type == "cuda"
    label, out_f, in_f = ("14B ffn.0", 13824, 5120) if cuda else ("stand-in", 1024, 512)
    tokens = quant.VIDEO_TOKENS if cuda else 64
    fmts = [f for f in QUANT_FORMATS if f in quant.formats()]
    timings = {r["format"]: r for r in quant.layer_rows(fmts, [(label, out_f, in_f)], tokens, device,
                                                         max(3, mode.steps), with_torchao=False)[0]}
    for fmt in fmts:
        def one(fmt=fmt):
            computed = quant.dit_bytes("t2v-14B", fmt)["held"] / GB
            measured = dict(weights_gb=quant.device_dit_bytes("t2v-14B", fmt, device) / GB) if cuda else {}
            return dict(**measured, computed_gb=computed, x_bf16=timings[fmt]["x_bf16"])
        rows.attempt(f"quant: 14B DiT {fmt}", one,
                     note=f"layer {label} {out_f}x{in_f}, {tokens} tokens"
                     + ("" if cuda else "; DiT bytes computed (CPU: nothing allocated)"))


# -- section 4: end to end -------------------------------------------------------------------------


def section_end_to_end(rows: Rows, args, mode: Mode, device: torch.device) -> None:
    from wanx.models.vae import WanVAE
    from wanx.pipeline import WanPipeline

    cfg, dtype = mode.cfg13, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    state = gpu.random_official_state(cfg, dtype, device if device.type == "cuda" else torch.device("cpu"))
    dit = gpu.build_wanx(cfg, state, fp8=False, dtype=dtype).to(device)
    del state
    torch.manual_seed(0)
    vae = WanVAE().to(device).eval()
    pipe = WanPipeline(dit, vae)
    gen = torch.Generator().manual_seed(2)
    w, h, f = mode.e2e
    n = mode.e2e_steps
    request = dict(prompt_embeds=torch.randn(1, 64, cfg.text_dim, generator=gen),
                   negative_prompt_embeds=torch.randn(1, 64, cfg.text_dim, generator=gen), width=w, height=h,
                   num_frames=f, num_inference_steps=n, guidance_scale=GUIDANCE, seed=3, progress=False)
    label = f"{w}x{h}x{f}, {n} steps measured, 50 steps extrapolated (first + 49 x later step + decode)"
    for name, kind in (("cache off", None), ("teacache", "teacache"), ("magcache", "magcache")):
        def one(kind=kind):
            pipe.disable_cache()
            cache = pipe.enable_cache(kind) if kind else None
            reset_peaks(device)
            gpu.sync(device)
            start = time.perf_counter()
            pipe(**request)
            gpu.sync(device)
            total = time.perf_counter() - start
            timing = pipe.last_timings
            later = timing["later_steps"]
            step = statistics.median(later) if later else timing["first_step"]
            denoise = timing["first_step"] + sum(later)
            decode = total - denoise
            passes = (f"{cache.stats.total_computed}/{cache.stats.total_computed + cache.stats.total_skipped}"
                      if cache else f"{2 * n}/{2 * n}")
            return dict(s_step=step, first_step_s=timing["first_step"], decode_s=decode, total_s=total,
                        total_50_s=timing["first_step"] + 49 * step + decode, passes=passes, **peaks(device),
                        note=CACHE_NOTE if kind else "")
        rows.attempt(name, one, note=label)
    pipe.disable_cache()

    def few_step():  # a step-distilled model's run (lightx2v, Lightning): all of it measured
        reset_peaks(device)
        gpu.sync(device)
        start = time.perf_counter()
        pipe(**{**request, "num_inference_steps": 4, "guidance_scale": 1.0, "sampler": "euler"})
        gpu.sync(device)
        return dict(total_s=time.perf_counter() - start, passes="4/4", **peaks(device))
    rows.attempt("4 steps, no CFG", few_step, note=f"{w}x{h}x{f}, 4 Euler steps at guidance 1, measured "
                                                   "(bench/few_step.py has the 50-step run beside it)")

    def long_video():  # #30: the DiT sees one window at a time and the decoder streams to the file
        from wanx.pipeline import ContextWindows

        frames, overlap = 2 * f - 1, max(4, (f - 1) // 5 // 4 * 4)  # 81 -> 161 frames, overlap 16
        with tempfile.TemporaryDirectory() as folder:
            reset_peaks(device)
            gpu.sync(device)
            start = time.perf_counter()
            pipe(**{**request, "num_frames": frames, "num_inference_steps": 2, "output_path": Path(folder) / "long.mp4",
                    "context_windows": ContextWindows(f, overlap, "uniform")})
            gpu.sync(device)
            total = time.perf_counter() - start
        return dict(total_s=total, **peaks(device), note=f"{frames} frames in windows of {f} (overlap {overlap}), "
                                                         "2 steps, written as decoded; compare the peak with cache off's")
    rows.attempt("context windows, 2x the frames", long_video, note=f"{w}x{h}")
    del pipe, dit, vae
    gpu.release(device)


# -- section 5: training ---------------------------------------------------------------------------


def section_training(rows: Rows, args, mode: Mode, device: torch.device) -> None:
    import csv

    import train_memory

    from wanx.cli import main as wanx

    cfg = mode.cfg13
    w, h, f = mode.train
    cuda = device.type == "cuda"
    name = CATALOGUE["training"][0]
    recipe = ["--gradient-checkpointing", "--offload-activations", "--fp8"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = train_memory.model_folder(root, cfg, torch.bfloat16 if cuda else torch.float32)
        cache = train_memory.cached_items(root, folder, cfg, w, h, f, count=2)
        out = root / "lora"
        argv = ["train", "--data", str(cache), "--model", str(folder), "--output", str(out), "--lora-rank", "32",
                "--steps", "2", "--quiet", "--dtype", "bf16" if cuda else "fp32", "--device", device.type, *recipe]

        def step():
            reset_peaks(device)
            code = wanx(argv)
            if code != 0:
                raise RuntimeError(f"wanx train exited {code}")
            with open(out / "log.csv", encoding="utf-8") as fh:
                seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
            return dict(s_step=seconds[-1], first_step_s=seconds[0], **peaks(device),
                        note="" if cuda else "peak: CUDA only")
        rows.attempt(name, step, note=f"{w}x{h}x{f}, rank 32, {' '.join(recipe)}; s_step: the 2nd step")


# -- report ----------------------------------------------------------------------------------------


FORMATS = {  # metric -> (format, label)
    "rel_err": ("{:.2e}", "rel. error"), "rel_diff": ("{:.1e}", "rel. diff"), "identical": ("{}", "identical"),
    "lora_effect": ("{:.2e}", "LoRA effect"), "warmup_s": ("{:.1f} s", "compile"),
    "high_steps": ("{}", "high-noise steps"), "low_steps": ("{}", "low-noise steps"),
    "device_weights_gb": ("{:.3f} GB", "weights on device"),
    "s_step": ("{:.3f} s/step", ""), "x_sdpa": ("{:.2f}x", "x SDPA"),
    "diffusers_over_this": ("{:.2f}x", "diffusers/this"), "peak_alloc_gb": ("{:.2f} GB", "peak alloc."),
    "peak_reserved_gb": ("{:.2f} GB", "peak reserved"), "weights_gb": ("{:.3f} GB", "weights on device"),
    "units": ("{}", "resident units"), "first_step_s": ("{:.2f} s", "first step"), "decode_s": ("{:.2f} s", "decode"),
    "total_s": ("{:.2f} s", "measured total"), "total_50_s": ("{:.1f} s", "50 steps (extrapolated)"),
    "passes": ("{}", "passes"), "computed_gb": ("{:.2f} GB", "computed"),
    "x_bf16": ("{:.2f}x", "layer time x bf16 Linear"),
}


def format_row(row: dict | None) -> str:
    if row is None:
        return "not measured"
    if row.get("error"):
        return f"error: {row['error']}"
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    parts = []
    for key, value in row["metrics"].items():
        fmt, label = FORMATS.get(key, ("{}", key))
        if isinstance(value, bool):
            value = "yes" if value else "NO"
        text = fmt.format(value)
        parts.append(f"{label} {text}".strip() if label else text)
    return ", ".join(parts) or "no figures"


def markdown(report: dict | None) -> str:
    """The table of a report (None: every row "not measured"), with the run's header."""
    lines = []
    if report is None:
        lines.append("Not measured yet: no GPU run of `bench/gpu_all.py` so far.")
    else:
        m = report["meta"]
        lines.append(f"{m['gpu']}, torch {m['torch']}, CUDA {m['cuda'] or '-'}, {m['date']}, mode {m['mode']}, "
                     f"wall time {m['wall_s']:.0f} s (`{m['command']}`)")
    lines += ["", "| section | measurement | result | notes |", "|---|---|---|---|"]
    sections = (report or {}).get("sections", {})
    for section in SECTIONS:
        data = sections.get(section)
        found = {r["name"]: r for r in (data or {}).get("rows", [])}
        names = CATALOGUE[section] + [n for n in found if n not in CATALOGUE[section]]
        wall = f" ({data['wall_s']:.0f} s)" if data else ""
        for name in names:
            row = found.get(name)
            result = format_row(row)
            if row is None and data and data.get("error"):
                result = f"not measured (section error: {data['error']})"
            note = (row or {}).get("note", "").replace("|", "/")
            lines.append(f"| {section}{wall} | {name} | {result.replace('|', '/')} | {note} |")
            wall = ""
    return "\n".join(lines) + "\n"


def environment(device: torch.device, mode: Mode, argv: list[str]) -> dict:
    cuda = device.type == "cuda"
    gpu_name = (torch.cuda.get_device_name(device) if cuda
                else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    optional = {}
    for module in ("diffusers", "flash_attn", "flash_attn_interface", "sageattention", "av"):
        try:
            mod = __import__(module)
            optional[module] = getattr(mod, "__version__", "installed")
        except Exception as err:
            optional[module] = f"not importable ({type(err).__name__})"
    return dict(gpu=gpu_name, torch=torch.__version__, cuda=torch.version.cuda if cuda else None,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=str(device),
                mode=mode.name, command="python bench/gpu_all.py " + " ".join(argv), python=platform.python_version(),
                optional=optional, wall_s=0.0,
                capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="the same paths at small sizes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder (default bench/results)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--official-repo", type=Path, default=None,
                        help="a Wan-Video/Wan2.1 checkout: adds the official WanModel speed row")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no section after this many seconds (a section already running is not cut)")
    parser.add_argument("--markdown", metavar="REPORT.json", default=None,
                        help="print the table of a saved report (or 'none': every row not measured) and exit")
    args = parser.parse_args(argv)

    if args.markdown is not None:
        if args.markdown == "none":
            print(markdown(None), end="")
            return 0
        path = Path(args.markdown)
        if not path.is_file():
            parser.error(f"--markdown: {path} is not a file (give a gpu-report.json written by this script)")
        print(markdown(json.loads(path.read_text(encoding="utf-8"))), end="")
        return 0
    sections = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (use --device cpu)")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    mode = pick_mode(device, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)

    report = dict(meta=environment(device, mode, argv), sections={})
    print(f"gpu_all: {report['meta']['gpu']}, torch {torch.__version__}, mode {mode.name}", flush=True)
    start = time.perf_counter()

    def save():
        report["meta"]["wall_s"] = time.perf_counter() - start
        (args.out / REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
        (args.out / TABLE).write_text(markdown(report), encoding="utf-8")

    runners = dict(correctness=section_correctness, speed=section_speed, memory=section_memory,
                   end_to_end=section_end_to_end, training=section_training)
    for section in sections:
        print(f"\n== {section}", flush=True)
        rows = Rows(section)
        begun = time.perf_counter()
        error = None
        try:
            if args.deadline_s is not None and begun - start > args.deadline_s:
                raise TimeoutError(f"not started: --deadline-s {args.deadline_s:g} passed")
            runners[section](rows, args, mode, device)
        except Exception as err:  # the section stops; its rows so far and the other sections stay
            traceback.print_exc()
            error = first_line(err)
        finally:
            gpu.release(device)
        report["sections"][section] = dict(wall_s=time.perf_counter() - begun, error=error, rows=rows.rows)
        save()  # after every section: a run cut short still leaves what it measured
    save()
    print(f"\n{markdown(report)}")
    print(f"wrote {args.out / REPORT} and {args.out / TABLE} in {report['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
