"""Speed of the Wan2.1 T2V DiT on a GPU (the speed issue), on the same random weights in one run:

1. Seconds per guided denoising step (cond + uncond): wanx resident in the compute dtype with
   each attention backend (SDPA, flash3, flash2, sage where installed; eager and with
   `wanx.speed.compile_blocks`), guidance batched as `WanPipeline` runs it; the official
   `WanModel` (Wan-Video/Wan2.1 `wan/modules/model.py`, from a checkout given with
   `--official-repo`; run as its `WanT2V` does: fp32 weights under bf16 autocast, two passes);
   diffusers' `WanTransformer3DModel` (bf16 as `from_pretrained(torch_dtype=bf16)` gives it,
   its default attention, two passes as its pipeline runs guidance).
2. End to end, 50 UniPC steps through `WanPipeline` with random text embeddings (no umT5):
   uncached, TeaCache 0.08 and 0.2, MagCache (published setting); denoising and VAE decode
   (`wanx.models.vae.WanVAE()`, random weights, float32) timed apart; PSNR of the decoded
   uint8 frames against the uncached run.

    .venv/bin/python bench/speed_gpu.py                   # no CUDA: scaled-down CPU mode (a few minutes, 2 cores)
    python bench/speed_gpu.py --official-repo ~/Wan2.1   # CUDA: T2V-1.3B, 832x480, 81 frames
    python bench/speed_gpu.py --device cuda --scaled      # quick GPU smoke run at CPU-mode sizes

Targets (checked on CUDA at full size with the 1.3B preset only): wanx resident faster per
step than both peers; <= 0.9 s/step without caching (H100-class); >= 2.5x end to end with a
cache at PSNR >= 25 dB. Only exact attention (SDPA, flash) counts for the first two:
SageAttention quantises, its row is shown but not judged.

CPU mode: a small DiT (head dim 128, 4 blocks), 96x64 pixels, 9 frames, float32; every row
runs the same code path as on the GPU, except that flash/sage are not installed and the
official model's `flash_attention` (which asserts CUDA and flash-attn) is replaced by an SDPA
equivalent, marked in its row. Random weights make the cache's skip rate and PSNR a property
of this run, not of the released models.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (puts the repository root and src/ on sys.path)
from gpu import GB, build_diffusers, build_wanx, diffusers_state, random_official_state, release, sync  # noqa: E402

from wanx.attention import installed, set_attention_backend  # noqa: E402
from wanx.configs import DiTConfig, dit_config  # noqa: E402
from wanx.models.vae import WanVAE  # noqa: E402
from wanx.pipeline import WanPipeline  # noqa: E402
from wanx.speed import compile_blocks  # noqa: E402

FULL = dict(width=832, height=480, frames=81)
SCALED = dict(width=96, height=64, frames=9)
SCALED_CFG = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4)  # head dim 128 like the releases
GUIDANCE = 5.0
TARGET_STEP_S = 0.9
TARGET_SPEEDUP = 2.5
TARGET_PSNR = 25.0
CACHES = [("teacache", 0.08), ("teacache", 0.2), ("magcache", None)]  # None: the published threshold


# -- the official model ----------------------------------------------------------------------


def official_model_module(repo: Path):
    """`wan.modules.model` from a Wan2.1 checkout, without running `wan/__init__.py` or
    `wan/modules/__init__.py` (they import the whole T2V/I2V/VACE stack: T5 tokenizers,
    xfuser, ...; the model needs only torch, diffusers and `.attention`)."""
    if not (repo / "wan" / "modules" / "model.py").is_file():
        raise FileNotFoundError(f"{repo} holds no wan/modules/model.py (expected a Wan-Video/Wan2.1 checkout)")
    pkg = "_wan_official"
    for name, folder in ((pkg, repo / "wan"), (f"{pkg}.modules", repo / "wan" / "modules")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module
    return importlib.import_module(f"{pkg}.modules.model")


def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                         causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """Stand-in for the official `flash_attention` where flash-attn is absent: same
    arguments and masking of keys past k_lens; on CUDA it computes in half precision as the
    flash kernels do."""
    out_dtype = q.dtype
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        q = q.to(dtype)
    if q_scale is not None:
        q = q * q_scale
    k, v = k.to(q.dtype), v.to(q.dtype)
    mask = None
    if k_lens is not None and bool((k_lens < k.shape[1]).any()):
        mask = (torch.arange(k.shape[1], device=k.device)[None] < k_lens.to(k.device)[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=softmax_scale, is_causal=causal)
    return out.transpose(1, 2).type(out_dtype)


def build_official(module, cfg: DiTConfig, state: dict[str, torch.Tensor]):
    kwargs = dict(model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim,
                  dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
                  out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, eps=cfg.eps)
    with torch.device("meta"):  # no fp32 random init of the full model
        model = module.WanModel(**kwargs)
    # `freqs` is a plain attribute (no buffer, not in the state dict), built on the meta
    # device above; it depends on the head dim only, so a 0-block model of that head dim
    # built on the host gives the real table with the official code.
    small = dict(kwargs, dim=cfg.head_dim, num_heads=1, num_layers=0, ffn_dim=8, text_dim=8)
    model.freqs = module.WanModel(**small).freqs
    # The released checkpoints are float32 and WanT2V runs them as loaded, under bf16 autocast.
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True, strict=True)
    return model.eval()


# -- per-step timing -------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    warmup_s: float | None = None
    rel_diff: float | None = None
    note: str = ""
    exact: bool = True  # exact attention (judged against the targets)
    wanx: bool = False
    skipped: str | None = None

    @property
    def step(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def time_steps(fn, steps: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """One untimed call (warm-up; its output is returned), then `steps` timed ones, each on
    a new timestep as in sampling."""
    with torch.no_grad():
        out = fn(999.0).float().cpu()
        times = []
        for i in range(steps):
            sync(device)
            start = time.perf_counter()
            fn(980.0 - 20 * i)
            sync(device)
            times.append(time.perf_counter() - start)
    return out, times


def step_rows(args, cfg, state, device, dtype, latent_shape) -> tuple[list[Row], torch.nn.Module]:
    """Every per-step configuration; returns the rows and the wanx DiT (for the pipeline runs)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *latent_shape, generator=gen).to(device)  # float32, as the pipeline's noise
    ctx_c = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen).to(device)
    ctx_u = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen).to(device)
    both, xx = torch.cat([ctx_c, ctx_u]), torch.cat([x, x])
    rows: list[Row] = []
    reference: list[torch.Tensor] = []

    def record(row: Row, fn):
        try:
            out, row.times = time_steps(fn, args.steps, device)
            if not reference:
                reference.append(out)
            row.rel_diff = float((out - reference[0]).abs().max() / reference[0].abs().max())
        except Exception as err:  # one broken configuration must not cost the others' figures
            traceback.print_exc()
            row.skipped = f"error: {type(err).__name__}: {str(err).splitlines()[0][:140] if str(err) else ''}"
        status = f"{row.step:.3f} s/step" if row.step is not None else row.skipped
        print(f"  {row.name}: {status}" + (f" (compile warm-up {row.warmup_s:.1f} s)" if row.warmup_s else ""),
              flush=True)
        rows.append(row)

    # wanx: one model, every backend; guidance batched (cond, uncond) and one timestep for
    # both, exactly as WanPipeline calls it.
    dit = build_wanx(cfg, state, fp8=False, dtype=dtype).to(device)

    def wanx_step(tv: float) -> torch.Tensor:
        cond, uncond = dit(xx, torch.tensor([tv], device=device), both).chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    for backend in ("sdpa", "flash3", "flash2", "sage"):
        if not installed(backend):
            rows.append(Row(f"wanx {backend}", skipped="not installed", wanx=True))
            continue
        if backend != "sdpa" and device.type != "cuda":
            rows.append(Row(f"wanx {backend}", skipped="CUDA only", wanx=True))
            continue
        set_attention_backend(backend)
        exact = backend != "sage"
        record(Row(f"wanx {backend}", exact=exact, wanx=True), wanx_step)
        if args.no_compile:
            continue
        row = Row(f"wanx {backend} compiled", exact=exact, wanx=True)
        handle = None
        try:
            torch._dynamo.reset()  # each backend's graph compiled cold, warm-up time comparable
            handle = compile_blocks(dit)
            row.warmup_s = handle.warm_up(xx, torch.tensor([999.0], device=device), both)
            record(row, wanx_step)
        except Exception as err:
            traceback.print_exc()
            row.skipped = f"compile error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            rows.append(row)
        finally:
            if handle is not None:
                handle.remove()
    torch._dynamo.reset()
    set_attention_backend(args.cache_attention)

    # The official model, two passes (WanT2V.generate), lists of unbatched tensors.
    if args.official_repo is None:
        rows.append(Row("official WanModel", skipped="no --official-repo (a Wan-Video/Wan2.1 checkout)"))
    else:
        row = Row("official WanModel")
        model = None
        try:
            module = official_model_module(args.official_repo.expanduser().resolve())
            attn = importlib.import_module(module.__package__ + ".attention")
            if device.type != "cuda" or not (attn.FLASH_ATTN_2_AVAILABLE or attn.FLASH_ATTN_3_AVAILABLE):
                module.flash_attention = sdpa_flash_attention
                row.note = "its flash_attention replaced by SDPA (flash-attn absent or no CUDA)"
            else:
                row.note = "flash-attn " + ("3" if attn.FLASH_ATTN_3_AVAILABLE else "2")
            model = build_official(module, cfg, state).to(device)
            seq_len = math.prod(s // p for s, p in zip(latent_shape, cfg.patch_size))
            x0, c0, u0 = x[0], ctx_c[0].to(dtype), ctx_u[0].to(dtype)
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                        else contextlib.nullcontext())

            def official_step(tv: float) -> torch.Tensor:
                t = torch.tensor([tv], device=device)
                with autocast:
                    cond = model([x0], t=t, context=[c0], seq_len=seq_len)[0]
                    uncond = model([x0], t=t, context=[u0], seq_len=seq_len)[0]
                return (uncond + GUIDANCE * (cond - uncond))[None]

            record(row, official_step)
        except Exception as err:
            traceback.print_exc()
            row.skipped = f"error: {type(err).__name__}: {str(err).splitlines()[0][:140]}"
            rows.append(row)
        del model
        release(device)

    # diffusers, two passes (its WanPipeline), inputs in its dtype.
    try:
        import diffusers  # noqa: F401
    except ImportError:
        rows.append(Row("diffusers WanTransformer3DModel", skipped="diffusers not installed"))
    else:
        from tests.oracles import run_diffusers_dit

        model = build_diffusers(cfg, diffusers_state(state, dtype)).to(device)
        xd, cd, ud = x.to(dtype), ctx_c.to(dtype), ctx_u.to(dtype)

        def diffusers_step(tv: float) -> torch.Tensor:
            t = torch.tensor([tv], device=device)
            cond = run_diffusers_dit(model, cfg, xd, t, cd)
            uncond = run_diffusers_dit(model, cfg, xd, t, ud)
            return uncond + GUIDANCE * (cond - uncond)

        record(Row("diffusers WanTransformer3DModel", note="its default attention (SDPA)"), diffusers_step)
        del model
        release(device)
    return rows, dit


# -- end to end with caching -----------------------------------------------------------------


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """WanPipeline's own conversion of decoded frames ([-1, 1] -> 0..255)."""
    return ((frames.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def psnr_255(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def cache_rows(args, cfg, dit, device, size) -> list[dict]:
    torch.manual_seed(0)  # the same random VAE whatever ran before
    vae = WanVAE().to(device).eval()
    pipe = WanPipeline(dit, vae)  # no text encoder: embeddings given
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    negative = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    request = dict(prompt_embeds=prompt, negative_prompt_embeds=negative, width=size["width"],
                   height=size["height"], num_frames=size["frames"], num_inference_steps=args.cache_steps,
                   guidance_scale=GUIDANCE, seed=3, output_type="latents", progress=False)
    calibration = None
    if args.calibration == "own":
        from wanx.speed.cache import calibrate

        start = time.perf_counter()
        # calibrate() takes prompt strings; with embeddings given, the one "prompt" is a placeholder.
        calibration = calibrate(pipe, [None], num_inference_steps=args.cache_steps, progress=False,
                                **{k: v for k, v in request.items()
                                   if k not in ("num_inference_steps", "output_type", "progress", "seed")}, seed=4)
        print(f"  own calibration fitted in {time.perf_counter() - start:.1f} s", flush=True)

    def run(kind, threshold):
        pipe.disable_cache()
        cache = pipe.enable_cache(kind, threshold, calibration=calibration) if kind else None
        sync(device)
        start = time.perf_counter()
        latents = pipe(**request)
        sync(device)
        denoise = time.perf_counter() - start
        with torch.no_grad():
            start = time.perf_counter()
            frames = to_uint8(vae.decode(latents)[0]).cpu()
            sync(device)
            decode = time.perf_counter() - start
        passes = (f"{cache.stats.total_computed}/{cache.stats.total_computed + cache.stats.total_skipped}"
                  if cache else f"{2 * args.cache_steps}/{2 * args.cache_steps}")
        thr = f"{cache.active_threshold:g}" if cache else "-"
        return dict(name=kind or "uncached", threshold=thr, passes=passes, denoise=denoise, decode=decode,
                    frames=frames)

    with torch.no_grad():  # first-call costs of the VAE (kernel selection, allocator) kept out of the timings
        vae.decode(torch.zeros(1, 16, 1, size["height"] // 8, size["width"] // 8, device=device))
    rows = [run(None, None)]
    print(f"  uncached: denoise {rows[0]['denoise']:.2f} s, decode {rows[0]['decode']:.2f} s", flush=True)
    for kind, threshold in CACHES:
        r = run(kind, threshold)
        r["psnr"] = psnr_255(r["frames"], rows[0]["frames"])
        rows.append(r)
        print(f"  {kind} {r['threshold']}: denoise {r['denoise']:.2f} s, passes {r['passes']}, "
              f"PSNR {r['psnr']:.1f} dB", flush=True)
    pipe.disable_cache()
    base = rows[0]
    for r in rows:
        r["e2e"] = r["denoise"] + r["decode"]
        r["speedup"] = base["e2e"] / r["e2e"]
        r["speedup_denoise"] = base["denoise"] / r["denoise"]
        r.pop("frames")
    rows[0]["psnr"] = float("inf")
    return rows


# -- report ----------------------------------------------------------------------------------


def verdicts(rows: list[Row], caches: list[dict]) -> list[str]:
    out = []
    ours = [r for r in rows if r.wanx and r.exact and r.step is not None]
    best = min(ours, key=lambda r: r.step) if ours else None
    peers = [r for r in rows if not r.wanx]
    if best is None:
        out.append("MISS  no exact-attention wanx row measured")
    else:
        measured = [p for p in peers if p.step is not None]
        missing = [p.name for p in peers if p.step is None]
        ok = bool(measured) and all(best.step < p.step for p in measured) and not missing
        detail = ", ".join([f"{p.name} {p.step:.3f}" for p in measured] + [f"{n} not measured" for n in missing])
        out.append(f"{'PASS' if ok else 'MISS'}  wanx faster than both peers: best {best.name} {best.step:.3f} "
                   f"s/step vs {detail}")
        out.append(f"{'PASS' if best.step <= TARGET_STEP_S else 'MISS'}  <= {TARGET_STEP_S} s/step uncached: "
                   f"{best.name} {best.step:.3f} s/step")
    good = [c for c in caches[1:] if c["speedup"] >= TARGET_SPEEDUP and c["psnr"] >= TARGET_PSNR]
    pick = max(good or caches[1:], key=lambda c: c["speedup"]) if len(caches) > 1 else None
    if pick is None:
        out.append("MISS  cache: no cached run")
    else:
        out.append(f"{'PASS' if good else 'MISS'}  >= {TARGET_SPEEDUP}x end to end at PSNR >= {TARGET_PSNR:g} dB: "
                   f"{'best' if good else 'fastest'} {pick['name']} {pick['threshold']} {pick['speedup']:.2f}x at "
                   f"{pick['psnr']:.1f} dB")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--preset", default="t2v-1.3B", choices=["t2v-1.3B", "t2v-14B"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", default=None, help="the preset at 832x480, 81 frames "
                      "(default on CUDA)")
    size.add_argument("--scaled", dest="full", action="store_false", help="the CPU-mode model and size "
                      "(default on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--cache-steps", type=int, default=50, help="sampling steps of the end-to-end runs")
    parser.add_argument("--official-repo", type=Path, default=None,
                        help="a Wan-Video/Wan2.1 checkout: adds the official WanModel row")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile_blocks rows")
    parser.add_argument("--cache-attention", default="auto", choices=["auto", "sdpa", "flash3", "flash2", "sage"],
                        help="attention backend of the end-to-end runs (default auto: flash if installed)")
    parser.add_argument("--calibration", choices=["published", "own"], default="published",
                        help="cache calibration: the published Wan2.1 one (default) or one fitted on this "
                        "random model with wanx.speed.cache.calibrate first")
    parser.add_argument("--skip-cache", action="store_true", help="per-step rows only")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (run without --device for the CPU mode)")
    if args.full is None:
        args.full = device.type == "cuda"
    if args.steps is None:
        args.steps = 5 if device.type == "cuda" else 3
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs emulate bf16 matmuls, ~6x slower
    cfg = dit_config(args.preset) if args.full else SCALED_CFG
    size = FULL if args.full else SCALED
    latent_shape = ((size["frames"] - 1) // 4 + 1, size["height"] // 8, size["width"] // 8)
    tokens = math.prod(s // p for s, p in zip(latent_shape, cfg.patch_size))
    kernels = [k for k in ("flash3", "flash2", "sage") if installed(k)]
    if device.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    else:
        print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads: NO GPU. CPU MODE: scaled-down "
              "model and size, float32; the issue's targets are GPU targets and are not judged here")
    print(f"DiT {args.preset if args.full else 'scaled'}: {cfg.num_layers} blocks, dim {cfg.dim}, {cfg.num_heads} "
          f"heads; {str(dtype).removeprefix('torch.')}; {size['width']}x{size['height']}, {size['frames']} frames = "
          f"{tokens:,} tokens; attention kernels installed: {', '.join(kernels) or 'none (SDPA only)'}", flush=True)

    state = random_official_state(cfg, dtype, device if device.type == "cuda" else torch.device("cpu"))
    print(f"\n1. one guided step (cond + uncond, guidance {GUIDANCE:g}), median of {args.steps} after a warm-up")
    rows, dit = step_rows(args, cfg, state, device, dtype, latent_shape)
    del state
    caches = []
    if not args.skip_cache:
        print(f"\n2. end to end, {args.cache_steps} UniPC steps, attention {args.cache_attention}, "
              f"{args.calibration} calibration, eager DiT")
        caches = cache_rows(args, cfg, dit, device, size)

    print(f"\n{'per guided step':<34} {'s/step':>8} {'x best wanx':>11} {'warm-up s':>9} {'rel diff':>8}  note")
    ours = [r.step for r in rows if r.wanx and r.exact and r.step]
    best = min(ours) if ours else None
    for r in rows:
        if r.step is None:
            print(f"{r.name:<34} skipped: {r.skipped}")
            continue
        rel = f"{r.step / best:.2f}" if best else "-"
        warm = f"{r.warmup_s:.1f}" if r.warmup_s else "-"
        note = r.note + ("" if r.exact else "approximate attention, not judged")
        print(f"{r.name:<34} {r.step:>8.3f} {rel:>11} {warm:>9} {r.rel_diff:>8.1e}  {note}".rstrip())
    print("rel diff: max|out - first row's out| / max|first row's out| of the warm-up step's guided output.")
    if caches:
        print(f"\n{'end to end':<10} {'thresh':>6} {'passes':>8} {'denoise s':>9} {'decode s':>8} {'total s':>8} "
              f"{'speed-up':>8} {'denoise x':>9} {'PSNR dB':>8}")
        for c in caches:
            print(f"{c['name']:<10} {c['threshold']:>6} {c['passes']:>8} {c['denoise']:>9.2f} {c['decode']:>8.2f} "
                  f"{c['e2e']:>8.2f} {c['speedup']:>7.2f}x {c['speedup_denoise']:>8.2f}x {c['psnr']:>8.1f}")
        print("passes: DiT block passes computed / all (2 branches per step); PSNR of the decoded uint8 frames "
              "against the uncached run.")
    print()
    lines = verdicts(rows, caches) if caches or rows else []
    if device.type == "cuda" and args.full and args.preset == "t2v-1.3B":
        print("\n".join(lines))
    else:
        why = "CPU mode" if device.type == "cpu" else ("scaled-down sizes" if not args.full else "14B preset")
        print(f"targets not judged ({why}; they are for T2V-1.3B at 480P on an H100-class GPU). As measured:")
        print("\n".join("  " + line.split("  ", 1)[1] for line in lines))


if __name__ == "__main__":
    main()
