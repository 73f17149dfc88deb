"""Per-step time and peak GPU memory of the Wan2.1 DiT under wanx's memory options, against
diffusers' `WanTransformer3DModel` with its group offloading (CUDA streams), on the same
random weights, in one run (issue #8).

    .venv/bin/python bench/gpu.py                         # no CUDA: scaled-down CPU mode (~2 min, 2 cores)
    python bench/gpu.py --device cuda                     # real T2V-1.3B, 832x480, 81 frames
    python bench/gpu.py --device cuda --preset t2v-14B    # real T2V-14B (resident runs skipped if they cannot fit)
    python bench/gpu.py --device cuda --scaled            # quick GPU smoke run of every path at CPU-mode sizes

One step is one DiT forward with batch 2 (batched classifier-free guidance: the same latents,
two text contexts of 512 tokens). Configurations, each set up fresh from the same host weights,
given one warm-up forward (which also records the streaming order), then `--steps` timed ones:

- wanx resident: the whole model on the device, in the compute dtype (bf16 on CUDA);
- wanx blocks <budget>: `wanx.memory.streaming.BlockStreamer(model on the host, device, budget)`:
  what fits the budget stays on the device, every other block is copied in from pinned host
  memory just before it runs, the next one prefetched on a side stream (budgets 4GB and 0);
- wanx fp8 resident / fp8 blocks 0: `quantize_fp8` (block Linear weights float8_e4m3fn, per-channel
  scales, computing in the compute dtype), resident or streamed with budget 0;
- diffusers resident: `WanTransformer3DModel` with the same weights (converted by
  tests/oracles.py), dtypes as `from_pretrained(torch_dtype=bf16)` gives them (its
  `_keep_in_fp32_modules` in float32);
- diffusers offload: `enable_group_offload(onload_device=cuda, offload_device=cpu,
  offload_type="block_level", num_blocks_per_group=1, use_stream=True)`.

Reported per configuration: median seconds per step (configurations run one after the other,
all of them once per `--rounds`, so drift on a shared machine spreads over all of them), that
time over wanx resident and over the configuration's own resident variant, peak GPU memory
(`torch.cuda.max_memory_allocated` since a reset taken after set-up: tensors only; the CUDA
context and the allocator's cache come on top, `max_memory_reserved` is printed too), the
weight bytes on the device by BlockStreamer's accounting (resident + in flight) or by size for
resident models, and max|out - wanx resident out| / max|wanx resident out| of the warm-up
output (0 for streaming: same ops on the same tensors; fp8 and diffusers show their rounding).

CPU mode (automatic without CUDA): the same code paths with device "cpu" on a scaled-down
model (T2V widths, 4 layers, a few hundred tokens, float32: bf16 matmuls are emulated and ~6x
slower on CPUs without AVX512-BF16). There is no GPU memory to measure: the memory column is
BlockStreamer's accounting (weight bytes resident + in flight) and the times are wall time.
Streaming there really copies each streamed block host -> host, without prefetch. diffusers'
group offloading is skipped: CPU -> CPU offloading measures nothing, and diffusers refuses
`use_stream=True` for a CPU onload device. The issue's targets are GPU targets; CPU mode
prints them without judging.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.oracles: the official -> diffusers weight conversion
sys.path.insert(0, str(ROOT / "src"))

from wanx.configs import DiTConfig, dit_config  # noqa: E402
from wanx.memory.estimate import estimate  # noqa: E402
from wanx.memory.fp8 import quantize_fp8  # noqa: E402
from wanx.memory.streaming import BlockStreamer, parse_bytes  # noqa: E402
from wanx.models import keeps_fp32  # noqa: E402
from wanx.models.transformer import WanDiT  # noqa: E402

GB = 10**9  # wanx's memory sizes ("6GB") are decimal; so are the targets
FULL_LATENT = (21, 60, 104)  # 81 frames at 832x480 -> [1, 16, 21, 60, 104], 32,760 tokens a sample
SCALED_LATENT = (3, 16, 16)  # 192 tokens a sample
SCALED_LAYERS = 4
MARGIN = 2**30  # kept free on the GPU when deciding whether a configuration can fit
WEIGHT_STD = 0.02

# The targets, printed next to the figures (checked in GPU mode at full size only).
TARGET_13B = dict(peak=6 * GB, ratio=1.25)  # 1.3B at 480P within 6 GB at <= 1.25x the resident step
TARGET_14B = dict(peak=10 * GB, ratio=1.15)  # 14B FP8 fully streamed within 10 GB at <= 1.15x its resident step
SAME_TIME = 1.05  # "less memory than diffusers' offloading at the same step time": within 5%


# -- weights -------------------------------------------------------------------------------


def random_official_state(cfg: DiTConfig, dtype: torch.dtype, rng_device: torch.device, seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """Every parameter of a WanDiT, official names, on the host: normal(0, 0.02), norm gains
    1 + normal(0, 0.02); float32 where the model keeps float32, else `dtype`. Drawn on
    `rng_device` (the GPU when there is one: seconds for 14B instead of minutes)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    gen = torch.Generator(device=rng_device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        want = torch.float32 if keeps_fp32(name, WanDiT.keep_in_fp32) else dtype
        t = torch.empty(shape, dtype=want, device=rng_device).normal_(0.0, WEIGHT_STD, generator=gen)
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            t += 1.0
        state[name] = t.to("cpu")
    return state


def build_wanx(cfg: DiTConfig, state: dict[str, torch.Tensor], *, fp8: bool, dtype: torch.dtype,
               fast: bool = False) -> WanDiT:
    """A WanDiT on the host whose parameters are `state`'s tensors (assigned, not copied)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
        if fp8:  # only the module types change on the meta device (as wanx.load_model does)
            quantize_fp8(model, compute_dtype=dtype, fast=fast)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def fp8_state(cfg: DiTConfig, official: dict[str, torch.Tensor], dtype: torch.dtype,
              device: torch.device) -> dict[str, torch.Tensor]:
    """The FP8 model's state on the host, quantized once with wanx's quantize_fp8: on the GPU
    when the float model fits there (seconds for 14B instead of minutes), else on the host
    (there its other tensors are `official`'s own)."""
    model = build_wanx(cfg, official, fp8=False, dtype=dtype)
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] > model_bytes(model) + MARGIN:
        model.to(device)
    quantize_fp8(model, compute_dtype=dtype)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    del model
    release(device)
    return state


def diffusers_state(official: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Official weights converted to diffusers names (tests/oracles.py), cast as diffusers'
    `from_pretrained(torch_dtype=dtype)` does: `_keep_in_fp32_modules` (matched on whole name
    components) float32, the rest `dtype`. Tensors already in that dtype are shared, not copied."""
    from diffusers import WanTransformer3DModel

    from tests.oracles import diffusers_dit_state

    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    state = {}
    for name, t in diffusers_dit_state(official).items():
        want = torch.float32 if any(m in name.split(".") for m in keep) else dtype
        state[name] = t if t.dtype == want else t.to(want)
    return state


def build_diffusers(cfg: DiTConfig, state: dict[str, torch.Tensor]):
    """WanTransformer3DModel on the host holding `state`'s tensors: built on the meta device
    (no random fp32 init: 57 GB for 14B), its RoPE tables (non-persistent buffers, not in any
    state dict) rebuilt on the host, then the weights assigned."""
    from diffusers import WanTransformer3DModel

    if cfg.model_type != "t2v":
        raise ValueError("bench/gpu.py measures T2V models")
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
        )
    model.rope = type(model.rope)(cfg.head_dim, cfg.patch_size, model.config.rope_max_seq_len)
    model.load_state_dict(state, assign=True, strict=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers model has tensors left on the meta device: {left[:5]}")
    return model.eval()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: torch.nn.Module) -> int:
    return nbytes([*model.parameters(), *model.buffers()])


# -- configurations --------------------------------------------------------------------------


@dataclass
class Ctx:
    cfg: DiTConfig
    device: torch.device
    dtype: torch.dtype
    official: dict
    fp8: dict | None = None
    diffusers: dict | None = None
    inputs: dict = field(default_factory=dict)
    fp8_fast: bool = False
    record_stream: bool = False


@dataclass
class Run:
    forward: Callable[[], torch.Tensor]
    model: torch.nn.Module
    streamer: BlockStreamer | None = None


@dataclass
class Spec:
    name: str
    impl: str  # wanx | diffusers
    fp8: bool = False
    budget: int | None = None  # None: resident (wanx); streaming budget in bytes
    offload: bool = False  # diffusers group offloading
    baseline: str = "wanx resident"  # the configuration's own resident variant

    def weights_needed(self, ctx: Ctx) -> int:
        """Weight bytes this configuration keeps on the device (for the can-it-fit check)."""
        if self.impl == "diffusers":
            total = nbytes(ctx.diffusers.values())
            return 3 * total // ctx.cfg.num_layers if self.offload else total
        total = nbytes((ctx.fp8 if self.fp8 else ctx.official).values())
        if self.budget is None:
            return total
        return min(self.budget, total) + 2 * total // ctx.cfg.num_layers

    def setup(self, ctx: Ctx) -> Run:
        x, t, context = ctx.inputs["x"], ctx.inputs["t"], ctx.inputs["context"]
        if self.impl == "wanx":
            model = build_wanx(ctx.cfg, ctx.fp8 if self.fp8 else ctx.official, fp8=self.fp8, dtype=ctx.dtype,
                               fast=ctx.fp8_fast)
            streamer = None
            if self.budget is None:
                model.to(ctx.device)
            else:
                streamer = BlockStreamer(model, ctx.device, self.budget)
            return Run(lambda: model(x, t, context), model, streamer)

        from tests.oracles import run_diffusers_dit

        model = build_diffusers(ctx.cfg, ctx.diffusers)
        if self.offload:
            model.enable_group_offload(onload_device=ctx.device, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                                       record_stream=ctx.record_stream)
        else:
            model.to(ctx.device)
        xd = x.to(ctx.dtype)
        return Run(lambda: run_diffusers_dit(model, ctx.cfg, xd, t, context), model)


def specs(args, device: torch.device) -> tuple[list[Spec], list[str]]:
    """The configurations to run, and lines saying what was left out and why."""
    budgets = [parse_bytes(b) for b in args.budgets.split(",") if b.strip()]
    out = [Spec("wanx resident", "wanx")]
    out += [Spec(f"wanx blocks {fmt_budget(b)}", "wanx", budget=b) for b in budgets]
    out += [Spec("wanx fp8 resident", "wanx", fp8=True, baseline="wanx fp8 resident"),
            Spec("wanx fp8 blocks 0", "wanx", fp8=True, budget=0, baseline="wanx fp8 resident")]
    notes = []
    if args.skip_diffusers:
        notes.append("diffusers: skipped (--skip-diffusers)")
        return out, notes
    try:
        import diffusers  # noqa: F401
    except ImportError:
        notes.append("diffusers: not installed, skipped")
        return out, notes
    out.append(Spec("diffusers resident", "diffusers", baseline="diffusers resident"))
    if device.type == "cuda":
        out.append(Spec("diffusers offload (block, stream)", "diffusers", offload=True, baseline="diffusers resident"))
    else:
        notes.append("diffusers group offloading: skipped on CPU (CPU -> CPU offloading measures nothing, and "
                     "diffusers raises ValueError for use_stream=True with a CPU onload device)")
    return out, notes


def fmt_budget(b: int) -> str:
    return "0" if b == 0 else f"{b / GB:g}GB"


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    peak: int = 0  # max_memory_allocated (CUDA)
    reserved: int = 0  # max_memory_reserved (CUDA)
    weights: int = 0  # weight bytes on the device: streamer accounting, or model size
    units: str = ""  # streamed: resident units / all units
    setup_s: float = 0.0
    rel_diff: float | None = None
    skipped: str | None = None

    @property
    def step(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned host blocks cached by the host allocator
            torch._C._host_emptyCache()


def fits(spec: Spec, ctx: Ctx, work: int) -> str | None:
    """None, or why the configuration cannot fit the free GPU memory."""
    if ctx.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(ctx.device)
    need = spec.weights_needed(ctx) + work + MARGIN
    if need > free:
        return (f"needs ~{need / GB:.1f} GB (weights {spec.weights_needed(ctx) / GB:.1f} + activations "
                f"{work / GB:.1f} + margin), {free / GB:.1f} GB free")
    return None


def measure(spec: Spec, ctx: Ctx, steps: int, work: int, result: Result, reference: dict) -> None:
    device = ctx.device
    why = fits(spec, ctx, work)
    if why:
        result.skipped = why
        return
    run = None
    try:
        start = time.perf_counter()
        run = spec.setup(ctx)
        sync(device)
        result.setup_s = max(result.setup_s, time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = run.forward()  # warm-up (BlockStreamer records the order of its units here)
            sync(device)
            out = out.float().cpu()
            for _ in range(steps):
                sync(device)
                start = time.perf_counter()
                run.forward()
                sync(device)
                result.times.append(time.perf_counter() - start)
        if device.type == "cuda":
            result.peak = max(result.peak, torch.cuda.max_memory_allocated(device))
            result.reserved = max(result.reserved, torch.cuda.max_memory_reserved(device))
        if run.streamer is not None:
            stats = run.streamer.stats
            result.weights = max(result.weights, stats.peak_device_bytes)
            result.units = f"{len(stats.resident_units)}/{len(run.streamer.units)}"
        elif spec.offload:
            result.weights = 0  # diffusers keeps no such account
        else:
            result.weights = model_bytes(run.model)
        if spec.name == "wanx resident":
            reference.setdefault("out", out)
        ref = reference.get("out")
        if ref is not None:
            result.rel_diff = float((out - ref).abs().max() / ref.abs().max())
    except torch.cuda.OutOfMemoryError as err:
        result.skipped = f"out of memory ({str(err).splitlines()[0][:120]})"
    except Exception as err:  # one broken configuration must not cost the others' figures
        traceback.print_exc()
        result.skipped = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        del run
        release(device)


# -- report ----------------------------------------------------------------------------------


def targets(spec: Spec, preset: str, full: bool, device: torch.device) -> str:
    if spec.impl != "wanx" or spec.budget is None:
        return ""
    if preset == "t2v-1.3B" and not spec.fp8:
        text = f"<= {TARGET_13B['peak'] / GB:g} GB, <= {TARGET_13B['ratio']}x resident"
    elif preset == "t2v-14B" and spec.fp8 and spec.budget == 0:
        text = f"<= {TARGET_14B['peak'] / GB:g} GB, <= {TARGET_14B['ratio']}x fp8 resident"
    else:
        return ""
    return text if device.type == "cuda" and full else f"({text}: GPU target)"


def verdicts(results: dict[str, Result], spec_list: list[Spec], preset: str) -> list[str]:
    """The issue's targets against the figures (GPU, full size)."""
    lines = []

    def ratio(a: str, b: str) -> float | None:
        ra, rb = results.get(a), results.get(b)
        return ra.step / rb.step if ra and rb and ra.step and rb.step else None

    for spec in spec_list:
        r = results[spec.name]
        if spec.impl != "wanx" or spec.budget is None or r.step is None:
            continue
        if preset == "t2v-1.3B" and not spec.fp8:
            goal, base = TARGET_13B, "wanx resident"
        elif preset == "t2v-14B" and spec.fp8 and spec.budget == 0:
            goal, base = TARGET_14B, "wanx fp8 resident"
        else:
            continue
        q = ratio(spec.name, base)
        mem_ok = r.peak <= goal["peak"]
        time_text = f"{q:.2f}x {base}" if q is not None else f"{base} not measured"
        ok = mem_ok and q is not None and q <= goal["ratio"]
        lines.append(f"  {spec.name}: peak {r.peak / GB:.2f} GB (target <= {goal['peak'] / GB:g}), "
                     f"{time_text} (target <= {goal['ratio']}x): {'MET' if ok else 'NOT MET'}")
    off = results.get("diffusers offload (block, stream)")
    if off and off.step:
        for spec in spec_list:
            r = results[spec.name]
            if spec.impl == "wanx" and spec.budget == 0 and r.step:
                q = r.step / off.step
                ok = r.peak < off.peak and q <= SAME_TIME
                lines.append(f"  {spec.name} vs diffusers offload: peak {r.peak / GB:.2f} vs {off.peak / GB:.2f} GB, "
                             f"time {q:.2f}x (target: less memory, time within {SAME_TIME:.2f}x): "
                             f"{'MET' if ok else 'NOT MET'}")
    return lines


def table(results: dict[str, Result], spec_list: list[Spec], args, device: torch.device) -> list[str]:
    cuda = device.type == "cuda"
    head = (f"{'configuration':<34} {'s/step':>8} {'x wanx':>7} {'x own':>6} "
            + (f"{'peak GB':>8} {'rsrv GB':>8} " if cuda else "")
            + f"{'weights GB':>10} {'units':>7} {'rel diff':>8}  target (issue #8)")
    lines = [head, "-" * len(head)]
    base = results.get("wanx resident")
    for spec in spec_list:
        r = results[spec.name]
        if r.step is None:
            lines.append(f"{spec.name:<34} skipped: {r.skipped}")
            continue
        own = results.get(spec.baseline)
        x_wanx = f"{r.step / base.step:.2f}" if base and base.step else "-"
        x_own = f"{r.step / own.step:.2f}" if own and own.step else "-"
        weights = f"{r.weights / GB:.3f}" if r.weights or not spec.offload else "-"
        diff = f"{r.rel_diff:.1e}" if r.rel_diff is not None else "-"
        line = f"{spec.name:<34} {r.step:>8.3f} {x_wanx:>7} {x_own:>6} "
        if cuda:
            line += f"{r.peak / GB:>8.2f} {r.reserved / GB:>8.2f} "
        line += f"{weights:>10} {r.units or '-':>7} {diff:>8}  {targets(spec, args.preset, args.full, device)}"
        lines.append(line.rstrip())
    return lines


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--preset", default="t2v-1.3B", choices=["t2v-1.3B", "t2v-14B"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round (default 3)")
    parser.add_argument("--rounds", type=int, default=1, help="times every configuration is set up and run")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--budgets", default="4GB,0", help="wanx streaming budgets, comma-separated (default 4GB,0)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", default=None,
                      help="real layers and 480P/81-frame latents (default on CUDA)")
    size.add_argument("--scaled", dest="full", action="store_false",
                      help=f"{SCALED_LAYERS} layers, latents {list(SCALED_LATENT)} (default on CPU)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="compute dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--fp8-fast", action="store_true", help="quantize_fp8(fast=True): torch._scaled_mm on sm_89+")
    parser.add_argument("--diffusers-record-stream", action="store_true",
                        help="enable_group_offload(..., record_stream=True) (diffusers' faster variant)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (run without --device for the CPU mode)")
    if device.type not in ("cuda", "cpu"):
        parser.error("--device must be cuda or cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # streams and events are made on the current device
    if args.full is None:
        args.full = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype] or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)

    cfg = dit_config(args.preset)
    if not args.full:
        cfg = dataclasses.replace(cfg, num_layers=SCALED_LAYERS)
    frames, height, width = FULL_LATENT if args.full else SCALED_LATENT
    pt, ph, pw = cfg.patch_size
    tokens = frames // pt * (height // ph) * (width // pw)
    work = estimate(cfg, height * 8, width * 8, (frames - 1) * 4 + 1, dtype=dtype, batch=2).denoise

    from wanx.attention import _kernel, get_attention_backend

    kernels = [k for k in ("flash3", "flash2", "sage") if _kernel(k) is not None]
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / GB:.1f} GB)"
             if device.type == "cuda" else f", {torch.get_num_threads()} threads, CPU MODE (scaled figures, no GPU)"))
    print(f"DiT {args.preset}{'' if args.full else ' widths (scaled down)'}: {cfg.num_layers} layers, dim {cfg.dim}, "
          f"{cfg.num_heads} heads, ffn {cfg.ffn_dim}; {str(dtype).removeprefix('torch.')}; latents "
          f"[2, 16, {frames}, {height}, {width}] = batch 2 x {tokens:,} tokens + {cfg.text_len} text tokens; "
          f"{args.steps} timed steps after 1 warm-up, {args.rounds} round(s)")
    print(f"wanx attention: {get_attention_backend()} (kernels installed: {', '.join(kernels) or 'none'}: "
          f"otherwise SDPA); diffusers: its default attention (SDPA)", flush=True)

    rng_device = device if device.type == "cuda" else torch.device("cpu")
    start = time.perf_counter()
    ctx = Ctx(cfg=cfg, device=device, dtype=dtype,
              official=random_official_state(cfg, dtype, rng_device), fp8_fast=args.fp8_fast,
              record_stream=args.diffusers_record_stream)
    ctx.fp8 = fp8_state(cfg, ctx.official, dtype, device)
    spec_list, notes = specs(args, device)
    if any(s.impl == "diffusers" for s in spec_list):
        ctx.diffusers = diffusers_state(ctx.official, dtype)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, frames, height, width, generator=gen)
    ctx.inputs = dict(
        x=latents.expand(2, -1, -1, -1, -1).contiguous().to(device),  # the same latents for both branches
        t=torch.full((2,), 999.0, device=device),
        context=torch.randn(2, cfg.text_len, cfg.text_dim, generator=gen).to(device, dtype),  # cond, uncond
    )
    print(f"weights: bf16/fp32 {nbytes(ctx.official.values()) / GB:.3f} GB, fp8 {nbytes(ctx.fp8.values()) / GB:.3f} GB"
          f" (random, normal std {WEIGHT_STD}); prepared in {time.perf_counter() - start:.1f} s", flush=True)
    if device.type == "cuda":
        print(f"activations estimate (wanx.memory.estimate, batch 2): {work / GB:.2f} GB; "
              f"allocated before the runs: {torch.cuda.memory_allocated(device) / GB:.3f} GB", flush=True)
    for note in notes:
        print(note)

    results = {s.name: Result(s.name) for s in spec_list}
    reference: dict = {}
    for round_ in range(args.rounds):
        for spec in spec_list:
            r = results[spec.name]
            if r.skipped:
                continue
            measure(spec, ctx, args.steps, work, r, reference)
            status = (f"{r.step:.3f} s/step (steps {', '.join(f'{t:.3f}' for t in r.times)}), set-up {r.setup_s:.1f} s"
                      if r.step is not None else f"skipped: {r.skipped}")
            print(f"  [{round_ + 1}/{args.rounds}] {spec.name}: {status}", flush=True)

    print()
    for line in table(results, spec_list, args, device):
        print(line)
    print()
    print("x wanx: step time / wanx resident; x own: / the same implementation and dtype resident. "
          + ("peak GB: max_memory_allocated; rsrv GB: max_memory_reserved. " if device.type == "cuda" else
             "No GPU memory in CPU mode: ")
          + "weights GB: weight bytes on the device (streaming: BlockStreamer's peak_device_bytes, resident + in "
          "flight; else the model's size); units: streamed units kept resident / all. "
          "rel diff: max|out - wanx resident out| / max|wanx resident out|. GB = 10^9 bytes.")
    print("targets (issue #8): 1.3B at 480P within 6 GB at <= 1.25x the resident step time; 14B FP8 fully "
          "streamed within 10 GB at <= 1.15x its resident time; less memory than diffusers' group offloading "
          "at the same step time.")
    if device.type == "cuda" and args.full:
        lines = verdicts(results, spec_list, args.preset)
        print("\n".join(lines) if lines else "  (no configuration to check)")
    else:
        print("  not judged: " + ("CPU mode" if device.type == "cpu" else "scaled-down sizes")
              + " (the targets are for a GPU at full size)")
    if args.json:
        args.json.write_text(json.dumps(dict(
            device=str(device), preset=args.preset, full=args.full, dtype=str(dtype), tokens=tokens,
            results={k: dict(dataclasses.asdict(v), step=v.step) for k, v in results.items()}), indent=1))


if __name__ == "__main__":
    main()
