"""LoRA cost on the real T2V-1.3B architecture (random weights, fp32 on this CPU): time to read
and fuse a rank-32 LoRA on q,k,v,o (self and cross attention) and ffn.0, ffn.2 of all 30
blocks, time to unload, and the per-step overhead of a live LoRA against a fused one; the same
for diffusers (`load_lora_weights` + `fuse_lora`, PEFT) on the same weights in the same run.

    .venv/bin/python bench/lora.py            # CPU: ~3 minutes, ~12 GB of RAM
    python bench/lora.py --device cuda        # GPU, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.oracles import diffusers_dit, run_diffusers_dit  # noqa: E402
from wanx.lora import apply_lora, read_lora, remove_lora  # noqa: E402
from wanx.models.transformer import WanDiT  # noqa: E402

TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
           "cross_attn.o", "ffn.0", "ffn.2")


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device("meta"):
        dit = WanDiT("t2v-1.3B")
    state = {k: torch.randn(v.shape) * 0.02 for k, v in dit.state_dict().items()}
    dit.load_state_dict(state, assign=True)
    dit = dit.to(device, dtype).eval()
    cfg = dit.config
    work = Path(tempfile.mkdtemp(prefix="wanx-lora-bench-"))
    lora_state = {}
    for i in range(cfg.num_layers):
        for target in TARGETS:
            w = dit.get_submodule(f"blocks.{i}.{target}").weight
            key = f"diffusion_model.blocks.{i}.{target}"
            lora_state[f"{key}.lora_down.weight"] = torch.randn(args.rank, w.shape[1]) * 0.01
            lora_state[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], args.rank) * 0.01
            lora_state[f"{key}.alpha"] = torch.tensor(float(args.rank))
    path = work / "rank32.safetensors"
    save_file(lora_state, str(path))
    size = path.stat().st_size
    print(f"torch {torch.__version__}, {device}, {str(dtype).removeprefix('torch.')}; T2V-1.3B (30 blocks, random weights); "
          f"LoRA rank {args.rank} on {len(TARGETS)} modules x 30 blocks = {len(lora_state) // 3} modules, {size / 2**20:.0f} MiB")

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 1, 16, 16, generator=gen).to(device)  # 64 video tokens
    t = torch.tensor([500.0], device=device)
    context = torch.randn(1, 512, cfg.text_dim, generator=gen).to(device)
    rows = []
    with torch.no_grad():
        dit(x, t, context)  # warm-up
        t_read, lora = timed(lambda: read_lora(path))
        t_fuse, _ = timed(lambda: apply_lora(dit, lora, 1.0, fuse=True, name="a"))
        step_fused, fused_out = timed(lambda: dit(x, t, context), args.steps)
        t_unload, _ = timed(lambda: remove_lora(dit))
        step_base, base_out = timed(lambda: dit(x, t, context), args.steps)
        t_live, _ = timed(lambda: apply_lora(dit, lora, 1.0, fuse=False, name="a"))
        step_live, live_out = timed(lambda: dit(x, t, context), args.steps)
        remove_lora(dit)
        agree = ((live_out - fused_out).abs().max() / fused_out.abs().max()).item()
        rows += [("wanx: read file", t_read), ("wanx: fuse (fp32 merge)", t_fuse), ("wanx: unload (restore)", t_unload),
                 ("wanx: attach live", t_live)]
        steps = [("wanx base", step_base), ("wanx fused", step_fused), ("wanx live", step_live)]

        official = {k: v.detach().float().cpu() for k, v in dit.state_dict().items()}
        del dit
        from diffusers import WanPipeline as DiffusersPipeline

        theirs = diffusers_dit(cfg, official).to(device, dtype).eval()
        del official
        pipe = DiffusersPipeline(tokenizer=None, text_encoder=None, transformer=theirs, vae=None, scheduler=None)
        run = lambda: run_diffusers_dit(pipe.transformer, cfg, x, t, context)  # noqa: E731
        run()
        d_load, _ = timed(lambda: pipe.load_lora_weights(str(path), adapter_name="a"))
        d_live, d_live_out = timed(run, args.steps)
        d_fuse, _ = timed(lambda: pipe.fuse_lora(components=["transformer"], lora_scale=1.0))
        d_fused, _ = timed(run, args.steps)
        d_unfuse, _ = timed(lambda: pipe.unfuse_lora(components=["transformer"]))
        rows += [("diffusers: load_lora_weights", d_load), ("diffusers: fuse_lora", d_fuse),
                 ("diffusers: unfuse_lora", d_unfuse)]
        steps += [("diffusers live (PEFT)", d_live), ("diffusers fused", d_fused)]
        parity = ((d_live_out - live_out).abs().max() / live_out.abs().max()).item()

    print(f"\n{'operation':34s} {'seconds':>8s}")
    for name, seconds in rows:
        print(f"{name:34s} {seconds:8.2f}")
    print(f"{'wanx read + fuse':34s} {t_read + t_fuse:8.2f}   vs diffusers load + fuse {d_load + d_fuse:.2f}: "
          f"{(d_load + d_fuse) / (t_read + t_fuse):.2f}x")
    print(f"\n{'DiT step (64 + 512 text tokens)':34s} {'s/step':>8s} {'x base':>7s}")
    for name, seconds in steps:
        print(f"{name:34s} {seconds:8.2f} {seconds / step_base:7.2f}")
    print(f"\nlive vs fused output: {agree:.1e} of the output scale; wanx live vs diffusers live: {parity:.1e}")


if __name__ == "__main__":
    main()
