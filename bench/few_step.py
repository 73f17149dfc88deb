"""Few-step distilled sampling against the defaults, in one run on the same weights: DiT forwards
(counted by a forward pre-hook: calls, and passes = the batch rows they carry, so one batched
CFG call of cond + uncond is two passes), the sampling loop's time and the whole call's.

1. A T2V-1.3B-shaped DiT (`WanDiT("t2v-1.3B")`, random weights, float32 on the CPU) at a small
   token count, latents only: the default 50 UniPC steps with CFG 5 (batched: one call of
   batch 2 a step) against 4 Euler steps at guidance 1 (one call of batch 1 a step), as a
   step-distilled checkpoint or LoRA (lightx2v, Lightning) runs. Random weights make no
   video worth looking at: this counts the work, which is the same for real weights.
2. The demo model end to end (`WanPipeline.from_pretrained("demo")`, text encoding, sampling,
   VAE decode): its own defaults (20 steps, CFG 4) against 4 steps at guidance 1. The demo
   model is not distilled, so its 4-step video is worse; again this measures the work only.
3. CUDA only: the 1.3B-shaped DiT and the real-size VAE (random weights, bf16), 832x480 x 81
   frames end to end, 50 steps CFG 5 against 4 steps guidance 1. Without CUDA it says so.

    .venv/bin/python bench/few_step.py              # CPU, 2 threads: about 4 minutes
    .venv/bin/python bench/few_step.py --quick      # a tiny DiT in part 1 (the test's run, seconds)
    python bench/few_step.py --device cuda          # adds part 3

Wall times on shared cores are noisy (other jobs take turns on them): the CPU-time column
(this process's, all threads) is the steadier measure there; the counts are exact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.oracles: random weights

from tests.oracles import randomize  # noqa: E402

DEFAULT = dict(num_inference_steps=50, guidance_scale=5.0, sampler="unipc")  # the official T2V defaults
FAST = dict(num_inference_steps=4, guidance_scale=1.0, sampler="euler", shift=5.0)  # lightx2v's 4-step recipe


class ForwardCounter:
    """Counts a module's forward calls and the batch rows they carry, from a pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.passes = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        self.passes += args[0].shape[0]

    def reset(self):
        self.calls = self.passes = 0

    def remove(self):
        self._handle.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def denoise_seconds(pipe) -> float:
    """The sampling loop's share of the last call (the pipeline times its steps)."""
    timing = pipe.last_timings
    return timing["first_step"] + sum(timing["later_steps"])


def timed_runs(pipe, device: torch.device, request: dict, settings: dict[str, dict]) -> dict[str, dict]:
    """Each setting once (after one warm-up step of the fast setting), counted and timed."""
    counter = ForwardCounter(pipe.dit)
    try:
        pipe(**{**request, **FAST, "num_inference_steps": 1})  # warm-up: allocator, kernels, first-call costs
        results = {}
        for name, setting in settings.items():
            counter.reset()
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            pipe(**{**request, **setting})
            sync(device)
            results[name] = dict(steps=setting.get("num_inference_steps"), guidance=setting.get("guidance_scale"),
                                 sampler=setting.get("sampler"), calls=counter.calls, passes=counter.passes,
                                 seconds=time.perf_counter() - start, denoise_seconds=denoise_seconds(pipe),
                                 cpu_seconds=time.process_time() - cpu_start)
        return results
    finally:
        counter.remove()


def table(title: str, results: dict[str, dict]) -> str:
    base, fast = results["default"], results["4 steps, no CFG"]
    lines = [title, f"  {'run':28s} {'steps':>5s} {'CFG':>4s} {'DiT calls':>9s} {'passes':>6s} {'denoise s':>9s} {'wall s':>8s} {'CPU s':>8s}"]
    for name, r in results.items():
        guidance = "off" if r["guidance"] in (None, 1.0) and name != "default" else f"{r['guidance'] or '':g}"
        steps = r["steps"] if r["steps"] is not None else "dflt"
        lines.append(f"  {name + ' (' + (r['sampler'] or 'unipc') + ')':28s} {steps!s:>5s} {guidance:>4s} "
                     f"{r['calls']:9d} {r['passes']:6d} {r['denoise_seconds']:9.2f} {r['seconds']:8.2f} "
                     f"{r['cpu_seconds']:8.2f}")
    lines.append(f"  {'default / 4 steps':28s} {'':5s} {'':4s} {base['calls'] / fast['calls']:8.1f}x "
                 f"{base['passes'] / fast['passes']:5.1f}x {base['denoise_seconds'] / fast['denoise_seconds']:8.1f}x "
                 f"{base['seconds'] / fast['seconds']:7.1f}x {base['cpu_seconds'] / fast['cpu_seconds']:7.1f}x")
    return "\n".join(lines)


def dit_part(device: torch.device, quick: bool) -> tuple[str, dict]:
    from wanx.configs import DiTConfig
    from wanx.loading import count_in_words, load_model
    from wanx.models.transformer import WanDiT
    from wanx.pipeline import WanPipeline
    from wanx.tiny import tiny_model_dir

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs emulate bf16 matmuls: slower
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2) if quick else "t2v-1.3B"
    dit = randomize(WanDiT(cfg), seed=0, std=0.05).to(device, dtype).eval()
    vae = load_model(tiny_model_dir("tiny") / "Wan2.1_VAE.pth").to(device)  # unused: latents out
    pipe = WanPipeline(dit, vae)
    cfg = dit.config
    gen = torch.Generator().manual_seed(2)
    width, height, frames = 64, 64, 5
    request = dict(prompt_embeds=torch.randn(1, 64, cfg.text_dim, generator=gen),
                   negative_prompt_embeds=torch.randn(1, 64, cfg.text_dim, generator=gen), width=width,
                   height=height, num_frames=frames, seed=3, output_type="latents", progress=False)
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    results = timed_runs(pipe, device, request, {"default": DEFAULT, "4 steps, no CFG": FAST})
    name = "tiny stand-in" if quick else "T2V-1.3B-shaped"
    title = (f"1. {name} DiT (dim {cfg.dim}, {cfg.num_layers} blocks, {count_in_words(sum(p.numel() for p in dit.parameters()))} "
             f"params, {str(dtype).removeprefix('torch.')}), {width}x{height}x{frames} = {tokens} tokens, latents only")
    return table(title, results), results


def demo_part(device: torch.device) -> tuple[str, dict]:
    from wanx.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained("demo", device=device)
    request = dict(prompt="a red circle moving left on a black background", seed=1, progress=False)
    defaults = {k: pipe.defaults.get(k) for k in ("num_inference_steps", "guidance_scale")}
    results = timed_runs(pipe, device, request, {"default": {**defaults, "sampler": None},
                                                 "4 steps, no CFG": FAST})
    d = pipe.defaults
    title = (f"2. the demo model end to end ({d['width']}x{d['height']}x{d['num_frames']}, text encoding, sampling, "
             f"VAE decode; its defaults: {d['num_inference_steps']} steps, CFG {d['guidance_scale']:g})")
    return table(title, results), results


def gpu_part(device: torch.device) -> tuple[str, dict | None]:
    title = "3. T2V-1.3B-shaped, 832x480 x 81 frames end to end (bf16, random weights, real-size VAE)"
    if device.type != "cuda":
        return f"{title}\n  skipped: no CUDA device here (this row needs a GPU: python bench/few_step.py --device cuda)", None
    from wanx.models.transformer import WanDiT
    from wanx.models.vae import WanVAE
    from wanx.pipeline import WanPipeline

    torch.manual_seed(0)
    dit = randomize(WanDiT("t2v-1.3B"), seed=0, std=0.05).to(device, torch.bfloat16).eval()
    pipe = WanPipeline(dit, WanVAE().to(device).eval())
    gen = torch.Generator().manual_seed(2)
    request = dict(prompt_embeds=torch.randn(1, 64, 4096, generator=gen),
                   negative_prompt_embeds=torch.randn(1, 64, 4096, generator=gen), width=832, height=480,
                   num_frames=81, seed=3, progress=False)
    results = timed_runs(pipe, device, request, {"default": DEFAULT, "4 steps, no CFG": FAST})
    return table(title, results), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny DiT in part 1 (seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    report = {}
    for name, part in (("dit", lambda: dit_part(device, args.quick)), ("demo", lambda: demo_part(device)),
                       ("gpu", lambda: gpu_part(device))):
        text, report[name] = part()
        print("\n" + text, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
