"""The `wanx` command line. Subcommands map to functions; torch is imported only inside them
so that `wanx --help` answers at once."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> int:
    from .loading import inspect_checkpoint

    for i, path in enumerate(args.paths):
        if i:
            print()
        print(inspect_checkpoint(path).summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir)
    return 0


def _size(text: str) -> tuple[int, int]:
    """'832x480' (width x height; '*' as in the official CLI works too) -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 832x480; got {text!r}") from None
    return w, h


_JOB_KEYS = {"prompt", "negative_prompt", "seed", "image", "last_image", "video", "strength", "size", "frames", "steps",
             "guidance", "shift", "sampler", "output"}


def _jobs(args: argparse.Namespace) -> list[dict]:
    """One job from the flags, or one per line of --prompts (plain text, or JSON objects
    whose keys override the flags)."""
    import json

    base = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, image=args.image,
                last_image=args.last_image, video=args.video, strength=args.strength, size=args.size,
                frames=args.frames, steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler,
                output=args.output)
    if not args.prompts:
        return [base]
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    jobs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                job = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            unknown = set(job) - _JOB_KEYS
            if unknown:
                raise ValueError(f"{path}:{number}: unknown key(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(sorted(_JOB_KEYS))}")
            if "size" in job:
                job["size"] = _size(str(job["size"]))
        else:
            job = {"prompt": line}
        jobs.append({**base, **job, "output": job.get("output")})
    if not jobs:
        raise ValueError(f"{path}: no prompts in the file")
    return jobs


def _output_path(job: dict, index: int, count: int, args: argparse.Namespace) -> Path:
    if job.get("output"):
        return Path(job["output"])
    if count == 1 and args.output:
        return Path(args.output)
    folder = Path(args.output) if args.output and count > 1 else Path("outputs")
    return folder / f"{index:03d}-seed{job['seed']}.mp4"


def _check_writable(path: Path) -> None:
    import os

    if path.suffix.lower() not in (".mp4", ".gif", ""):
        raise ValueError(f"{path}: output must end in .mp4 or .gif (or name a new folder for PNG frames)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (path.exists() and path.is_dir()):
        raise PermissionError(f"{path}: cannot write there; choose another --output")


def cmd_generate(args: argparse.Namespace) -> int:
    import random

    import torch

    from .hub import find_components, resolve_model
    from .pipeline import WanPipeline, plan_request

    jobs = _jobs(args)
    for job in jobs:  # fix the seeds now, so output names and metadata agree
        if job["seed"] is None:
            job["seed"] = random.randint(0, 2**31 - 1)
    # Everything is checked before any weight is loaded: model folder, inputs, outputs.
    files = find_components(resolve_model(args.model, source=args.source))
    model_type = files.model_type
    outputs = []
    for i, job in enumerate(jobs):
        width, height = job["size"]
        plan_request(model_type, job["prompt"], job["negative_prompt"], image=job["image"], last_image=job["last_image"],
                     video=job["video"], strength=job["strength"], height=height, width=width,
                     num_frames=job["frames"], steps=job["steps"], guidance=job["guidance"], shift=job["shift"],
                     sampler=job["sampler"], seed=job["seed"])
        out = _output_path(job, i, len(jobs), args)
        _check_writable(out)
        outputs.append(out)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device != "cpu" else torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    pipe = WanPipeline.from_files(files, device=device, dtype=dtype, progress=not args.quiet)
    pipe.name = args.model
    if not args.quiet:
        print(f"loading: {time.perf_counter() - start:.1f} s ({model_type} on {device}, {str(dtype).removeprefix('torch.')})",
              file=sys.stderr)
    for job, out in zip(jobs, outputs):
        width, height = job["size"]
        video = pipe(job["prompt"], job["negative_prompt"], image=job["image"], last_image=job["last_image"],
                     video=job["video"], strength=job["strength"], height=height, width=width,
                     num_frames=job["frames"], steps=job["steps"], guidance=job["guidance"], shift=job["shift"],
                     sampler=job["sampler"], seed=job["seed"], progress=not args.quiet)
        video.save(out, quality=args.quality)
        print(f"{out}  (seed {job['seed']}, {len(video)} frames, {video.size[0]}x{video.size[1]})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download

    print(download(args.model_id, source=args.source, local_dir=args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanx", description="Run and fine-tune Wan2.1 video models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="say what a checkpoint file or model folder is",
                          description="Print network, layout (official/diffusers/comfyui), config, dtype and "
                                      "parameter count of Wan2.1 checkpoints, reading only their headers where possible.")
    info.add_argument("paths", nargs="+", metavar="PATH", help=".safetensors, shard index, .pth/.pt, or model folder")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="make a video from text, an image, first+last frames, or a video",
                         description="Generate with a Wan2.1 model. The task follows from the model and the inputs: "
                                     "text (T2V), --image (I2V), --image + --last-image (FLF2V), --video (video-to-video "
                                     "with a T2V model). Unset options take the official defaults of the task.")
    gen.add_argument("--model", required=True,
                     help="model folder (official or diffusers layout), a model id such as Wan-AI/Wan2.1-T2V-1.3B "
                          "(downloaded), or tiny / tiny-i2v / tiny-flf2v (random weights, offline)")
    gen.add_argument("--prompt", help="what the video shows")
    gen.add_argument("--negative-prompt", help="what to avoid (default: the official negative prompt of the task)")
    gen.add_argument("--prompts", metavar="FILE", help="batch: one prompt per line, or JSON lines with per-job keys "
                                                        f"({', '.join(sorted(_JOB_KEYS))})")
    gen.add_argument("--image", help="first frame (I2V, FLF2V)")
    gen.add_argument("--last-image", help="last frame (FLF2V)")
    gen.add_argument("--video", help="input video for video-to-video")
    gen.add_argument("--strength", type=float, default=0.8, help="video-to-video: how much to change (0..1, default 0.8)")
    gen.add_argument("--size", type=_size, default=(832, 480), help="WIDTHxHEIGHT, multiples of 16 (default 832x480); "
                                                                      "I2V/FLF2V keep the image's aspect within this area")
    gen.add_argument("--frames", type=int, default=81, help="number of frames, 4k+1 (default 81 = 5 s at 16 fps)")
    gen.add_argument("--steps", type=int, help="sampling steps (default 50; 40 for I2V)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5.0; 5.5 for FLF2V)")
    gen.add_argument("--shift", type=float, help="schedule shift (default 5.0; 3.0 for I2V at 480P; 16 for FLF2V)")
    gen.add_argument("--sampler", default="unipc", choices=["unipc", "dpm++", "euler"], help="default unipc (official)")
    gen.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    gen.add_argument("--output", "-o", help="output .mp4/.gif (batch: a folder; default outputs/)")
    gen.add_argument("--quality", type=int, default=18, help="H.264 CRF, lower is better (default 18)")
    gen.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                     help="DiT and encoder weights (default bf16 on GPU, fp32 on CPU); the VAE stays fp32")
    gen.add_argument("--source", default="huggingface", choices=["huggingface", "modelscope"], help="where model ids come from")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    gen.set_defaults(func=cmd_generate)

    dl = sub.add_parser("download", help="download a model (e.g. Wan-AI/Wan2.1-T2V-1.3B) into the standard cache")
    dl.add_argument("model_id")
    dl.add_argument("--dir", help="download into this folder instead of the cache")
    dl.add_argument("--source", default="huggingface", choices=["huggingface", "modelscope"])
    dl.set_defaults(func=cmd_download)

    demo = sub.add_parser("demo", help="write a tiny random-weight model set, load it and run it (offline, seconds)",
                          description="Writes tiny DiT and VAE checkpoints in the official layout, loads them back "
                                      "with wanx.load_model, and runs a DiT forward and a VAE round trip.")
    demo.add_argument("--workdir", default=None, help="where to write the tiny checkpoints (default: a temp folder)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # user errors: one line, no stack trace
        from .loading.files import CheckpointError

        if isinstance(err, (CheckpointError, ValueError, FileNotFoundError, PermissionError, FileExistsError)):
            print(f"wanx: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
