"""Several ranks on one generation: denoising time per plan and rank count, against one
process on the same random weights, in one run.

    .venv/bin/python bench/parallel.py                    # CPU: gloo, 2 processes, head dim 128
    python bench/parallel.py --device cuda --gpus 1,2,4,8 --preset t2v-1.3B --size 832x480 --frames 81

Each plan runs in freshly spawned ranks (NCCL on GPUs, gloo on CPU); the time is rank 0's
denoising loop (text conditioning is given as random embeddings, the VAE is not run), the
median step after the first. With one GPU (or `--gpus 1`), the sequence-parallel path is
applied over a group of one rank, to show its overhead against the plain path. On CPU the
processes share 2 cores, so the gloo figures are for the record, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def config(preset: str | None):
    from wanx.configs import DiTConfig, dit_config

    if preset:
        return dit_config(preset)
    return DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64)


def rank_main(rank: int, world: int, port: int, plan: dict, args: dict, out: str) -> None:
    import torch.distributed as dist

    from wanx.distributed import SequenceParallel, parallelize
    from wanx.models.transformer import WanDiT
    from wanx.pipeline import WanPipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cuda = args["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, args["threads"] // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    cfg = config(args["preset"])
    torch.manual_seed(0)  # the same random weights on every rank
    with torch.device(device):
        dit = WanDiT(cfg).to(torch.bfloat16 if cuda else torch.float32).eval()
    from wanx.models.vae import WanVAE

    pipe = WanPipeline(dit, WanVAE("tiny").to(device))  # not run (latents out); the pipeline reads its dtype
    if plan.get("sp_alone"):  # the sequence-parallel path over one rank: its overhead
        SequenceParallel(dit, None, plan["sp_alone"])
    elif world > 1:
        parallelize(pipe, sp=plan.get("sp", "auto"), cfg_parallel=plan.get("cfg", False), fsdp=plan.get("fsdp", False))
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 64, cfg.text_dim, generator=g).to(device, dit.patch_embedding.weight.dtype)
    width, height = args["size"]
    pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds.flip(1), width=width, height=height,
         num_frames=args["frames"], num_inference_steps=args["steps"], seed=0, output_type="latents",
         progress=False)
    if rank == 0:
        steps = pipe.last_timings["later_steps"]
        torch.save({"step": statistics.median(steps), "first": pipe.last_timings["first_step"]}, out)
    dist.destroy_process_group()


def measure(world: int, plan: dict, args: dict) -> dict:
    import torch.multiprocessing as mp

    from wanx.distributed.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.start_processes(rank_main, args=(world, free_port(), plan, args, out), nprocs=world, start_method="spawn")
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpus", default="2", help="rank counts, comma-separated (default 2)")
    parser.add_argument("--preset", default=None, help="a real preset, e.g. t2v-1.3B (default: a small head-dim-128 DiT)")
    parser.add_argument("--size", default="320x192")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by the ranks (default 2)")
    options = parser.parse_args()
    args = {"device": options.device, "preset": options.preset, "frames": options.frames, "steps": options.steps,
            "threads": options.threads, "size": tuple(int(v) for v in options.size.split("x"))}
    cfg = config(options.preset)
    tokens = ((options.frames - 1) // 4 + 1) * (args["size"][1] // 16) * (args["size"][0] // 16)
    print(f"{options.device}, torch {torch.__version__}; DiT dim {cfg.dim}, {cfg.num_heads} heads, {cfg.num_layers} "
          f"blocks; {options.size}x{options.frames} = {tokens} tokens; guided steps, median after the first")
    rows = [("1 rank, plain", measure(1, {}, args))]
    rows.append(("1 rank, sequence-parallel path (ring)", measure(1, {"sp_alone": "ring"}, args)))
    rows.append(("1 rank, sequence-parallel path (ulysses)", measure(1, {"sp_alone": "ulysses"}, args)))
    for world in (int(v) for v in options.gpus.split(",")):
        if world < 2:
            continue
        plans = {"ulysses": {"sp": "ulysses"}, "ring": {"sp": "ring"}, "cfg parallel": {"cfg": True, "sp": "none"},
                 "ulysses + fsdp": {"sp": "ulysses", "fsdp": True}}
        if world >= 4:
            plans["cfg parallel + ulysses"] = {"cfg": True, "sp": "ulysses"}
        for name, plan in plans.items():
            if "ulysses" in name and cfg.num_heads % (world // (2 if plan.get("cfg") else 1)):
                continue
            rows.append((f"{world} ranks, {name}", measure(world, plan, args)))
    base = rows[0][1]["step"]
    print(f"\n{'plan':44s} {'s/step':>8s} {'vs 1 rank':>10s}")
    for name, result in rows:
        print(f"{name:44s} {result['step']:8.3f} {base / result['step']:9.2f}x")


if __name__ == "__main__":
    main()
