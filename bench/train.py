"""LoRA-training step time and peak memory: wanx (`wanx train`) vs DiffSynth-Studio's Wan
trainer, on the same DiT weights and the same cached batch.

What one step is, on both sides: zero_grad, flow-matching loss (x_t = (1-s) x0 + s eps, target
eps - x0, shift-5 schedule) through the DiT with a rank-32 LoRA (alpha = rank) on q,k,v,o
(self- and cross-attention) and ffn.0, ffn.2 of every block, backward, AdamW (lr 1e-4). Both
sides run in their own child process with the same thread count; the first step is a warm-up,
the figure is the median of the rest. Peak memory is the child's peak RSS (whole process:
interpreter, torch, the model, activations), so for the tiny config it is mostly the ~0.4 GB
every torch process costs; on CUDA the peak GPU memory is polled with nvidia-smi as well.

- wanx: `wanx prepare` makes the cached latents/context, `wanx train --quiet` trains, and the
  per-step `seconds` column of its log.csv is read (it also counts loading the cached item).
- DiffSynth (`pip install diffsynth --no-deps`, PyPI): its `WanModel` (diffsynth.models.
  wan_video_dit) built with the same config, the same official-layout state dict loaded with
  strict=True, LoRA injected as `DiffusionTrainingModule.add_lora_to_model` does (peft
  `LoraConfig` + `inject_adapter_in_model`, LoRA params cast to the pipeline dtype), noise and
  target from its `FlowMatchScheduler("Wan")` (`set_timesteps(1000, training=True)`,
  `add_noise`, `training_target`, `training_weight`) as `FlowMatchSFTLoss` uses them, the DiT
  run as the T2V branch of `model_fn_wan_video` runs it (its blocks wrapped in
  `gradient_checkpoint_forward`, non-reentrant torch checkpointing when on), and
  `torch.optim.AdamW` (weight decay 0.01) as its runner. The context is zero-padded to 512 tokens, as its prompt
  encoder returns it. Only leaf modules of diffsynth are imported: its package __init__
  imports the whole library (torchvision, pandas, modelscope...), none of it used by a step,
  and no CPU build of torchvision matches torch here. The timestep is pinned to the middle of
  its schedule (wanx draws one per step; the cost does not depend on it).

Configs: "tiny" (wanx's tiny test DiT: dim 32, 2 heads of 16) on 64x48x9 videos, and "wide"
(head dim 128 like the released models: dim 512, 4 heads, ffn 1024, 2 layers, text_dim = the
tiny umT5's width) on 416x240x17 videos (1950 video tokens), random weights. Each is run
without and with gradient checkpointing.

    .venv/bin/python bench/train.py                 # CPU, 2 threads: ~3 minutes
    python bench/train.py --device cuda             # GPU: t2v-1.3B config, bf16, 832x480x81

The `--device cuda` path (the 1.3B DiT shapes with text_dim = tiny umT5 width, random weights
in bf16, 480P x 81-frame latents from the tiny VAE; both trainers in bf16 with their own LoRA
dtypes: fp32 in wanx, bf16 in DiffSynth) is written but has NOT been run yet. Absolute times on
a shared CPU are noisy; the wanx/DiffSynth ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]
RANK = 32
TEXT_LEN = 512

# name -> (DiT config overrides on the tiny preset, video WxH, frames)
CPU_CONFIGS = {
    "tiny": (None, "64x48", 9),
    "wide": (dict(dim=512, ffn_dim=1024, num_heads=4, num_layers=2), "416x240", 17),
}
CUDA_CONFIGS = {
    "1.3B": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), "832x480", 81),
}


# ---------------------------------------------------------------------------------------
# Parent: data, model folders, child runs


def make_dataset(folder: Path, size: str, frames: int) -> Path:
    import numpy as np

    from wanx.video import Video

    width, height = (int(v) for v in size.split("x"))
    folder.mkdir(parents=True)
    # A moving square on a noisy background, as the prepare tests use: any content will do,
    # the cost depends only on the shapes.
    rng = np.random.default_rng(0)
    video = np.full((frames, height, width, 3), 20, dtype=np.uint8) + rng.integers(0, 8, (1, height, width, 3),
                                                                                     dtype=np.uint8)
    side = max(4, height // 4)
    for i in range(frames):
        x = (i * 3) % (width - side)
        video[i, height // 3:height // 3 + side, x:x + side] = (255, 64, 32)
    Video(video, fps=16).save(folder / "clip.mp4")
    (folder / "metadata.csv").write_text('file_name,text\nclip.mp4,"a red square, moving right"\n', encoding="utf-8")
    return folder


def make_model(folder: Path, overrides: dict | None, dtype: str) -> Path:
    """The tiny model set (its VAE and umT5 make the cache) with the DiT replaced by a
    random-weight one of the wider config, in the official key layout."""
    import torch
    from safetensors.torch import save_file

    from wanx.configs import official_config_json
    from wanx.models.transformer import WanDiT
    from wanx.tiny import tiny_model_dir

    tiny = tiny_model_dir("tiny")
    if overrides is None:
        return tiny
    shutil.copytree(tiny, folder)
    cfg = dataclasses.replace(WanDiT("tiny").config, **overrides)
    torch.manual_seed(0)
    with torch.device("meta"):
        dit = WanDiT(cfg)
    # Small random values: the speed does not depend on them, and a trained-looking scale keeps
    # the activations finite in bf16.
    state = {k: (torch.randn(v.shape) * 0.02).to(getattr(torch, dtype)).contiguous() for k, v in dit.state_dict().items()}
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(official_config_json(cfg), indent=2) + "\n", encoding="utf-8")
    return folder


def wanx_cli() -> list[str]:
    return [sys.executable, "-m", "wanx.cli"]


def run_child(cmd: list[str], env: dict, log: Path, gpu: bool) -> tuple[int, float, float | None]:
    """(exit code, peak RSS MB, peak GPU MB or None) of one child process."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak_gpu = [None]
        stop = threading.Event()
        if gpu:
            threading.Thread(target=_poll_gpu, args=(proc.pid, peak_gpu, stop), daemon=True).start()
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all runs so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
    return proc.returncode, usage.ru_maxrss / 1024, peak_gpu[0]


def _poll_gpu(pid: int, peak: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5).stdout.splitlines()
            for row in rows:
                p, mb = (s.strip() for s in row.split(","))
                if int(p) == pid:
                    peak[0] = max(peak[0] or 0.0, float(mb))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        stop.wait(0.2)


def check(code: int, log: Path, what: str) -> None:
    if code != 0:
        sys.exit(f"{what} failed (exit {code}):\n" + log.read_text(errors="replace")[-3000:])


def bench_wanx(model: Path, data: Path, work: Path, args, gc: bool, env: dict) -> tuple[float, float, float | None]:
    out = work / f"wanx-{'gc' if gc else 'nogc'}"
    cmd = [*wanx_cli(), "train", "--data", str(data), "--model", str(model), "--output", str(out), "--lora-rank",
           str(RANK), "--steps", str(args.steps), "--device", args.device, "--quiet"]
    if args.device != "cpu":
        cmd += ["--dtype", "bf16"]
    if gc:
        cmd.append("--gradient-checkpointing")
    code, rss, gpu = run_child(cmd, env, work / (out.name + ".log"), args.device != "cpu")
    check(code, work / (out.name + ".log"), "wanx train")
    with open(out / "log.csv", newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return (statistics.median(seconds[1:]), min(seconds[1:])), rss, gpu


def bench_peer(model: Path, data: Path, work: Path, args, gc: bool, env: dict) -> tuple[float, float, float | None]:
    name = f"diffsynth-{'gc' if gc else 'nogc'}"
    result = work / f"{name}.json"
    spec = dict(model=str(model), item=str(next((data / ".wanx-cache").rglob("*.safetensors"))), steps=args.steps,
                device=args.device, gc=gc, threads=args.threads, result=str(result))
    code, rss, gpu = run_child([sys.executable, __file__, "--peer-child", json.dumps(spec)], env,
                               work / f"{name}.log", args.device != "cpu")
    check(code, work / f"{name}.log", "DiffSynth step")
    seconds = json.loads(result.read_text())["seconds"]
    return (statistics.median(seconds[1:]), min(seconds[1:])), rss, gpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="steps per run; the first is a warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configs")
    parser.add_argument("--no-gc", action="store_true", help="skip the gradient-checkpointing runs")
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        return peer_child(json.loads(args.peer_child))
    if importlib.util.find_spec("diffsynth") is None:
        sys.exit("DiffSynth-Studio is not installed: pip install diffsynth --no-deps")

    configs = CPU_CONFIGS if args.device == "cpu" else CUDA_CONFIGS
    names = args.configs.split(",") if args.configs else list(configs)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    work = Path(tempfile.mkdtemp(prefix="wanx-train-bench-"))
    rows = []
    try:
        for name in names:
            overrides, size, frames = configs[name]
            model = make_model(work / f"model-{name}", overrides, "float32" if args.device == "cpu" else "bfloat16")
            info = subprocess.run([*wanx_cli(), "info", str(model)], capture_output=True, text=True, env=env, cwd=ROOT)
            if info.returncode != 0:
                sys.exit(f"wanx info {model} failed:\n{info.stdout}{info.stderr}")
            data = make_dataset(work / f"data-{name}", size, frames)
            log = work / f"prepare-{name}.log"
            code, _, _ = run_child([*wanx_cli(), "prepare", str(data), "--model", str(model), "--size", size,
                                    "--frames", str(frames), "--device", args.device, "--quiet"], env, log, False)
            check(code, log, "wanx prepare")
            for gc in (False,) if args.no_gc else (False, True):
                w = bench_wanx(model, data, work, args, gc, env)
                p = bench_peer(model, data, work, args, gc, env)
                rows.append((name, gc, w, p))
                print(f"  {name} gc={'on' if gc else 'off'}: wanx {w[0][0]:.3f} s, {w[1]:.0f} MB | "
                      f"DiffSynth {p[0][0]:.3f} s, {p[1]:.0f} MB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import importlib.metadata as md
    import torch
    print(f"\nLoRA rank {RANK} training step, {args.device}, torch {torch.__version__}, diffsynth "
          f"{md.version('diffsynth')}, {args.threads if args.device == 'cpu' else 'all'} threads, "
          f"median of {args.steps - 1} steps after a warm-up")
    gpu = args.device != "cpu"
    head = (f"{'config':<6} {'ckpt':<4} | {'wanx s':>8} {'peer s':>8} {'ratio':>6} | {'min ratio':>9} | "
            f"{'wanx MB':>8} {'peer MB':>8} {'ratio':>6}")
    if gpu:
        head += f" | {'wanx GPU':>8} {'peer GPU':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for name, gc, ((ws, wmin), wm, wg), ((ps, pmin), pm, pg) in rows:
        line = (f"{name:<6} {'on' if gc else 'off':<4} | {ws:8.3f} {ps:8.3f} {ws / ps:6.2f} | {wmin / pmin:9.2f} | "
                f"{wm:8.0f} {pm:8.0f} {wm / pm:6.2f}")
        if gpu:
            line += f" | {wg or 0:8.0f} {pg or 0:8.0f} {(wg or 0) / (pg or 1):6.2f}"
        print(line)
    print("s = median step; ratio = wanx / DiffSynth (below 1: wanx faster / smaller); min ratio = of the fastest "
          "steps (steadier on a shared CPU). MB = peak RSS of the whole child process"
          + ("; GPU = peak nvidia-smi MB" if gpu else ""))


# ---------------------------------------------------------------------------------------
# Child: DiffSynth's side


def import_diffsynth_leaves():
    """diffsynth's WanModel and FlowMatchScheduler without running its package __init__s
    (they import every pipeline and its data tools: torchvision, pandas, modelscope)."""
    root = Path(importlib.util.find_spec("diffsynth").origin).parent
    for pkg in ("diffsynth", "diffsynth.core", "diffsynth.models", "diffsynth.diffusion"):
        module = types.ModuleType(pkg)
        module.__path__ = [str(root.joinpath(*pkg.split(".")[1:]))]
        sys.modules[pkg] = module
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    from diffsynth.models.wan_video_dit import WanModel
    return WanModel, FlowMatchScheduler


def diffsynth_forward(dit, latents, timestep, context, gc: bool):
    """The text-to-video path of diffsynth.pipelines.wan_video.model_fn_wan_video, which its
    trainer calls (through FlowMatchSFTLoss) instead of WanModel.forward; that module cannot
    be imported without the whole library, so its T2V branch is followed here with its own
    building blocks."""
    from diffsynth.core.gradient import gradient_checkpoint_forward
    from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d
    from einops import rearrange

    t = dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, timestep))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))
    context = dit.text_embedding(context)
    x = dit.patchify(latents)
    f, h, w = x.shape[2:]
    x = rearrange(x, "b c f h w -> b (f h w) c").contiguous()
    freqs = torch_cat_freqs(dit.freqs, f, h, w).to(x.device)
    for block in dit.blocks:
        x = gradient_checkpoint_forward(block, gc, False, x, context, t_mod, freqs)
    x = dit.head(x, t)
    return dit.unpatchify(x, (f, h, w))


def torch_cat_freqs(freqs, f: int, h: int, w: int):
    import torch

    return torch.cat([freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                      freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                      freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)


def peer_child(spec: dict) -> None:
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors import safe_open
    from safetensors.torch import load_file

    WanModel, FlowMatchScheduler = import_diffsynth_leaves()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = Path(spec["model"])
    cfg = json.loads((model / "config.json").read_text())
    state = load_file(str(model / "diffusion_pytorch_model.safetensors"))
    text_dim = state["text_embedding.0.weight"].shape[1]
    with torch.device("meta"):
        dit = WanModel(dim=cfg["dim"], in_dim=cfg["in_dim"], ffn_dim=cfg["ffn_dim"], out_dim=cfg["out_dim"],
                       text_dim=text_dim, freq_dim=cfg["freq_dim"], eps=cfg["eps"], patch_size=(1, 2, 2),
                       num_heads=cfg["num_heads"], num_layers=cfg["num_layers"], has_image_input=False)
    dit.load_state_dict(state, strict=True, assign=True)  # the same tensors wanx trains on
    del state
    # WanModel computes its RoPE table in __init__ (a plain attribute, so it is on the meta device
    # here): remake it. Its split of the head dim (d - 2(d//3), d//3, d//3 channels) equals the
    # official one (d - 4(d//6), 2(d//6), 2(d//6)) for head dim 128 but not for the tiny model's
    # 16 (6/5/5: odd, its RoPE fails); there the official 8/4/4 tables are built with its own
    # precompute_freqs_cis, which costs the same.
    from diffsynth.models.wan_video_dit import precompute_freqs_cis, precompute_freqs_cis_3d
    head_dim = cfg["dim"] // cfg["num_heads"]
    if (head_dim // 3) % 2:
        dit.freqs = tuple(precompute_freqs_cis(n) for n in (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6),
                                                            2 * (head_dim // 6)))
    else:
        dit.freqs = precompute_freqs_cis_3d(head_dim)
    dit = dit.to(device, dtype)

    # As its trainer: freeze everything, inject peft LoRA, cast the LoRA to the pipeline dtype.
    dit.requires_grad_(False)
    dit = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS), dit)
    for p in dit.parameters():
        if p.requires_grad:
            p.data = p.to(dtype)
    dit.train()
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(1000, training=True)
    timestep = scheduler.timesteps[500:501].to(device, dtype)
    with safe_open(spec["item"], "pt") as f:
        x0 = f.get_tensor("latents")[None].to(device, dtype)
        context = f.get_tensor("context").float()
    context = torch.nn.functional.pad(context, (0, 0, 0, TEXT_LEN - context.shape[0]))[None].to(device, dtype)

    generator = torch.Generator(device).manual_seed(0)
    seconds = []
    for _ in range(spec["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
        x_t = scheduler.add_noise(x0, noise, timestep)
        target = scheduler.training_target(x0, noise, timestep)
        pred = diffsynth_forward(dit, x_t, timestep, context, spec["gc"])
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()) * scheduler.training_weight(timestep)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            sys.exit(f"DiffSynth loss is not finite: {loss}")
    Path(spec["result"]).write_text(json.dumps({"seconds": seconds, "loss": loss.item()}))


if __name__ == "__main__":
    main()
