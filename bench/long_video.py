"""Long videos with context windows: memory and time against length, seams and colour drift.

    python bench/long_video.py                  # CPU: tiny 17/161/481 frames, demo 161 frames (minutes)
    python bench/long_video.py --dit-1.3b       # also a 1.3B-shaped DiT (random weights) at 64x64
    python bench/long_video.py --device cuda --gpu   # a 1.3B-shaped DiT at 480P, 1025 frames (GPU)

Every row runs in a fresh child process, so each peak is its own:
- length: the tiny model in windows of 17 frames (overlap 8), 17 -> 161 -> 481 frames, written
  to an mp4 as they are decoded (`output_path`). Peak resident memory of the generate call (CPU: sampled RSS; CUDA: the allocator's peak) and its
  time; the ratios to the shortest run are what to read (time per frame should stay flat).
- seams and drift: the demo model (trained on 17-frame clips of shapes) at 161 frames, windows
  of 17 frames, per schedule, with and without --color-match. Seam ratio: mean |frame
  difference| across window edges over the mean inside windows (1 = no visible seam). Drift:
  the largest change of a colour channel's mean (levels of 255) between 17-frame runs and the
  first run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import ResidentPeak, run_child  # noqa: E402


def child(spec: dict) -> dict:
    import torch

    from wanx.pipeline import ContextWindows, WanPipeline
    from wanx.pipeline.windows import color_drift, plan_windows, seam_frames, seam_ratio

    device = spec.get("device", "cpu")
    torch.manual_seed(0)
    if spec["model"] == "dit-1.3B":  # a 1.3B-shaped DiT with random weights; the tiny set's VAE; no umT5
        from wanx.configs import dit_config
        from wanx.models.transformer import WanDiT

        tiny = WanPipeline.from_pretrained("tiny", device=device, dtype=torch.float32)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        dit = WanDiT(dit_config("t2v-1.3B")).to(device, dtype).eval()
        pipe = WanPipeline(dit, tiny.vae)
        text = dict(prompt_embeds=torch.randn(1, 32, 4096), negative_prompt_embeds=torch.randn(1, 32, 4096))
        prompt = None
    else:
        pipe = WanPipeline.from_pretrained(spec["model"], device=device)
        text, prompt = {}, spec["prompt"]
    windows = ContextWindows(spec["window"], spec["overlap"], spec["schedule"], color_match=spec["color_match"]) \
        if spec["window"] else None
    out = Path(spec["out"]) if spec.get("out") else None  # streamed to a file: the frames are never all held
    request = dict(num_frames=spec["frames"], height=spec["size"], width=spec["size"], seed=spec["seed"],
                   num_inference_steps=spec["steps"], context_windows=windows, progress=False, output_path=out,
                   **text)

    def generate():
        return pipe(prompt, **request)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        video = generate()
        torch.cuda.synchronize()
        seconds, peak = time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    else:
        with ResidentPeak() as mem:
            start = time.perf_counter()
            video = generate()
            seconds = time.perf_counter() - start
        peak = mem.peak["total"] - mem.before["total"]
    planned = plan_windows(windows, spec["frames"], 4, str)
    result = {"seconds": seconds, "peak": peak, "frames": len(video), "windows": len(planned.at(0)) if planned else 1}
    if planned is not None and spec.get("measure"):
        frames = video.read().frames if out is not None else video.frames
        result["seam"], result["inside"], result["ratio"] = seam_ratio(frames, seam_frames(planned, 4))
        result["drift"] = color_drift(frames, spec["window"])
    return result


def run(spec: dict) -> dict:
    return run_child([sys.executable, __file__, "--child", json.dumps(spec)])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def length_rows(model: str, lengths, size: int, steps: int, window: int, overlap: int, device: str) -> None:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="wanx-long-"))
    print(f"\n## memory and time against length: {model}, {size}x{size}, {steps} steps, windows of {window} "
          f"frames (overlap {overlap}), written to an mp4 as decoded, {device}")
    print("| frames | windows | peak memory of the call | x shortest | seconds | s per frame | x shortest |")
    print("|---|---|---|---|---|---|---|")
    first = None
    for frames in lengths:
        spec = dict(model=model, prompt="a red circle moving left on a black background", frames=frames, size=size,
                    steps=steps, window=window if frames > window else 0, overlap=overlap, schedule="static",
                    color_match=False, seed=1, device=device, out=str(folder / f"{model}-{frames}.mp4"))
        r = run(spec)
        per_frame = r["seconds"] / frames
        first = first or (r["peak"], per_frame)
        print(f"| {frames} | {r['windows']} | {mib(r['peak'])} | {r['peak'] / first[0]:.2f} | {r['seconds']:.1f} | "
              f"{per_frame:.3f} | {per_frame / first[1]:.2f} |", flush=True)


def seam_rows(frames: int, steps: int | None, device: str, seeds=(1,),
              schedules=("static", "uniform", "looped")) -> None:
    print(f"\n## seams and colour drift: demo model, {frames} frames, windows of 17 (overlap 8), "
          f"{steps or 'its 20'} steps, seeds {', '.join(map(str, seeds))}")
    print("| schedule | colour match | seam ratio (seams / inside) | mean |diff| at seams | inside | "
          "channel-mean drift (levels) | std drift |")
    print("|---|---|---|---|---|---|---|")
    for schedule in schedules:
        for color_match in (False, True) if schedule != "looped" else (False,):
            rows = []
            for seed in seeds:
                spec = dict(model="demo", prompt="a red circle moving left on a black background", frames=frames,
                            size=96, steps=steps, window=17, overlap=8, schedule=schedule, color_match=color_match,
                            seed=seed, device=device, measure=True)
                rows.append(run(spec))
            avg = {k: sum(r[k] for r in rows) / len(rows) for k in ("ratio", "seam", "inside")}
            drift = {k: sum(r["drift"][k] for r in rows) / len(rows) for k in ("mean", "std")}
            print(f"| {schedule} | {'on' if color_match else 'off'} | {avg['ratio']:.2f} | {avg['seam']:.2f} | "
                  f"{avg['inside']:.2f} | {drift['mean']:.1f} | {drift['std']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dit-1.3b", dest="dit13", action="store_true", help="also a 1.3B-shaped DiT at 64x64")
    parser.add_argument("--gpu", action="store_true", help="a 1.3B-shaped DiT at 480P, 1025 frames (CUDA)")
    parser.add_argument("--demo-frames", type=int, default=161)
    parser.add_argument("--demo-steps", type=int, default=10, help="the demo model's steps (its own default is 20)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.gpu:
        # 480P would be 480x832; the bench keeps square sizes: 640x640 has about as many tokens
        length_rows("dit-1.3B", (81, 321, 1025), 640, 4, 81, 16, args.device)
        return
    length_rows("tiny", (17, 161, 481), 32, 4, 17, 8, args.device)
    seam_rows(args.demo_frames, args.demo_steps or 10, args.device)
    if args.dit13:
        length_rows("dit-1.3B", (17, 81, 161), 64, 2, 17, 8, args.device)


if __name__ == "__main__":
    main()
