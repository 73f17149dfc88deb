"""Rank programs for the distributed tests (run by torch.multiprocessing with gloo)."""

import os

import torch
import torch.distributed as dist

REQUEST = dict(prompt="a red square moves right", width=80, height=48, num_frames=9, num_inference_steps=4,
               seed=7, output_type="latents", progress=False)  # 3 x 3 x 5 = 45 tokens: padding for 2 or 4 ranks


def image() -> torch.Tensor:
    """The I2V test image, the same in every process."""
    return torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(5)) * 2 - 1


def lora_state(scale: float, seed: int = 3) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on the tiny DiT's self-attention q and ffn.0 of both blocks, the same in
    every process."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(2):
        for name, (rows, cols) in {"self_attn.q": (32, 32), "ffn.0": (64, 32)}.items():
            key = f"diffusion_model.blocks.{block}.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(4, cols, generator=g) * scale
            state[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * scale
    return state


def lora_file(folder: str) -> str:
    """`lora_state(0.2)` written to a file of this process."""
    from safetensors.torch import save_file

    path = os.path.join(folder, f"style-{os.getpid()}.safetensors")
    save_file(lora_state(0.2), path)
    return path


def run_cases(rank: int, world: int, port: int, cases: list[dict], out: str) -> None:
    """Every case on every rank; rank 0 saves the latents of each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from wanx.distributed import parallelize
    from wanx.pipeline import WanPipeline

    results = {}
    try:
        for case in cases:
            pipe = WanPipeline.from_pretrained(case.get("model", "tiny"), **case.get("load", {}))
            if case.get("lora"):  # loaded before the plan, as the CLI does
                pipe.load_lora(lora_file(os.path.dirname(out)), 0.8, fuse=case["lora"] == "fused")
            plan = parallelize(pipe, sp=case.get("sp", "auto"), cfg_parallel=case.get("cfg", False),
                               fsdp=case.get("fsdp", False))
            request = dict(REQUEST, **case.get("request", {}))
            if "image" in request:
                request["image"] = image()
            results[case["name"]] = (pipe(**request), plan.describe(),
                                     plan.sequence.length if plan.sequence else None)
            if pipe.step_cache is not None:
                results.setdefault("skipped", {})[case["name"]] = pipe.step_cache.stats.total_skipped
    finally:
        if rank == 0:
            torch.save(results, out)
        dist.destroy_process_group()


def fail_on_rank_one(argv: list[str]) -> int:
    """A `main` for wanx.distributed.spawn: rank 1 fails while rank 0 waits for it."""
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 broke on purpose")
    dist.barrier()  # rank 0 would wait here forever if the launcher did not stop it
    return 0


def vace_rank(rank: int, world: int, port: int, out: str) -> None:
    """The tiny VACE DiT on 2 ranks: sequence parallel (Ulysses, Ring) and FSDP-sharded blocks
    (the VACE blocks too); rank 0 saves each output."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tests.models.test_vace import FOUR_BLOCKS, tiny_vace, vace_inputs
    from wanx.distributed.sequence import SequenceParallel
    from wanx.distributed.shard import shard_blocks

    results = {}
    try:
        x, t, context, vace = vace_inputs(FOUR_BLOCKS, frames=3, height=6, width=10)  # 45 tokens: a padding row
        for case in ("ulysses", "ring", "fsdp"):
            model = tiny_vace(FOUR_BLOCKS)
            if case == "fsdp":
                shard_blocks(model, world, torch.device("cpu"))
            else:
                SequenceParallel(model, mode=case)
            with torch.no_grad():
                results[case] = model(x, t, context, vace_context=vace, vace_context_scale=0.7)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()
