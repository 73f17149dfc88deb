"""The `wanx` command line. Subcommands map to functions; torch is imported only inside them
so that `wanx --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> int:
    from .hub import DEMO_MODEL, TINY_MODELS, check_dits, find_networks, resolve_model
    from .loading import CheckpointError, inspect_checkpoint
    from .loading.layouts import expert_folders
    from .lora import LoraError, read_lora

    paths, notes = [], []
    for text in args.paths:
        path = resolve_model(text) if text == DEMO_MODEL or text in TINY_MODELS else Path(text)  # as --model names them
        if expert_folders(path):  # a Wan2.2 A14B folder: each expert in turn
            paths.extend(expert_folders(path))
            continue
        dits = find_networks(path).get("dit", []) if path.is_dir() else []
        if len(dits) > 1:  # each of them, and what generate says of the folder
            paths.extend(p for p, _ in dits)
            try:
                check_dits(path, dits)
            except ValueError as err:
                notes.append(f"wanx generate --model {text} would stop here: {err}")
        else:
            paths.append(path)
    for i, path in enumerate(paths):
        if i:
            print()
        try:
            print(inspect_checkpoint(path).summary())
        except CheckpointError as err:
            if "not a Wan2.1 checkpoint" not in str(err) and "unknown names" not in str(err):
                raise
            try:  # a LoRA file: say which base model it targets
                print(read_lora(path).summary())
            except LoraError:
                raise err from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


_LORA_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_LORA_FORMS = ("write PATH, PATH:STRENGTH or PATH:STRENGTH:NAME, e.g. style.safetensors:0.8; STRENGTH per step: "
               "S1,S2,... (one per step) or START-END (linear over the steps)")


def _lora_arg(flag: str, text: str) -> tuple[str, object, str | None]:
    """PATH, PATH:STRENGTH or PATH:STRENGTH:NAME. Split at the last colons only where a strength
    (then a name) follows, so a path may hold colons; any other word where the strength goes
    is a bad strength, not a missing file. STRENGTH: a number, one per step (1,0.8,0.6,0.4), or
    a range START-END (`wanx.lora.Ramp`, linear from the first step to the last)."""
    import re

    if ":" not in text or Path(text).expanduser().is_file():
        return text, 1.0, None
    rest, _, last = text.rpartition(":")
    path, _, middle = rest.rpartition(":")
    if path and _lora_strength_text(middle) is not None and _lora_strength_text(last) is None:
        if not re.fullmatch(r"[\w.+/-]+", last):
            raise ValueError(f"{flag} {text}: bad LoRA name {last!r}: use letters, digits and . _ - + /")
        return path, _strength(flag, text, middle), last
    if _lora_strength_text(last) is not None:
        return rest, _strength(flag, text, last), None
    if "/" in last or last.lower().endswith(_LORA_SUFFIXES):  # a path with a colon: read_lora says if it is missing
        return text, 1.0, None
    raise ValueError(f"{flag} {text}: bad strength {last!r}; {_LORA_FORMS}")


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _lora_strength_text(text: str) -> float | list[float] | tuple[float, float] | None:
    """A strength as written: a number, a list (S1,S2,...), or a range (START, END); else None."""
    import re

    if _number(text) is not None:
        return _number(text)
    if "," in text:
        values = [_number(part) for part in text.split(",")]
        return None if any(v is None for v in values) else values
    match = re.fullmatch(rf"({_NUMBER})-({_NUMBER})", text.strip())
    return (float(match.group(1)), float(match.group(2))) if match else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _strength(flag: str, text: str, strength: str):
    import math

    value = _lora_strength_text(strength)
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} {text}: bad strength {strength!r}: give a finite number; {_LORA_FORMS}")
    if isinstance(value, tuple):
        from .lora.apply import Ramp

        return Ramp(*value)
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir)
    return 0


def _threshold(text: str) -> float | str:
    if text == "auto":  # the flag without a value: the model's published threshold
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a cache threshold is a number such as 0.2, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a cache threshold must be >= 0, got {text!r}")
    return value


def _guidance(text: str) -> tuple[float, ...]:
    """'5' -> (5.0,); '4.0,3.0' -> (4.0, 3.0): Wan2.2 A14B's high- then low-noise expert."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"a guidance scale such as 5.0, or two for Wan2.2 A14B's experts "
                                         f"(high noise, low noise) such as 4.0,3.0; got {text!r}")
    return values


def _timesteps(text: str | None) -> list[float] | None:
    """'1000,750,500,250' -> [1000.0, 750.0, 500.0, 250.0]; the range and order are the plan's
    checks (the same for every face)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise ValueError(f"--timesteps {text!r}: give numbers separated by commas, such as 1000,750,500,250") from None


def _layers(text: str) -> list[int]:
    """'9' -> [9]; '9,10' -> [9, 10]: DiT blocks."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"DiT block numbers such as 9 or 9,10; got {text!r}") from None


# the "guidance variants" flags, each a request key (wanx.request.GUIDANCE_KEYS)
_GUIDANCE_FLAGS = ("cfg_steps", "cfg_zero_star", "apg", "apg_eta", "apg_norm_threshold", "apg_momentum", "slg_layers",
                   "slg_start", "slg_end", "nag_scale", "nag_tau", "nag_alpha")


def _guidance_flags(gen: argparse.ArgumentParser) -> None:
    """`wanx generate`'s guidance variants (wanx.guidance): one at a time; --cfg-steps with any."""
    var = gen.add_argument_group("guidance variants", "one of --cfg-zero-star, --apg, --slg-layers, --nag-scale; "
                                                      "--cfg-steps goes with any")
    var.add_argument("--cfg-steps", type=int, metavar="N", help="real CFG on the first N steps only, then one DiT "
                                                                "pass per step (distilled LoRAs: motion from CFG early)")
    var.add_argument("--cfg-zero-star", action="store_true", default=None,
                     help="CFG-Zero*: the uncond prediction scaled by <c,u>/|u|^2, zero velocity on the first step")
    var.add_argument("--apg", action="store_true", default=None, help="adaptive projected guidance (diffusers' "
                                                                      "AdaptiveProjectedGuidance)")
    var.add_argument("--apg-eta", type=float, help="APG: weight of the part parallel to the cond prediction "
                                                   "(default 1.0)")
    var.add_argument("--apg-norm-threshold", type=float, help="APG: cap on the guidance difference's norm, 0: none "
                                                              "(default 15.0)")
    var.add_argument("--apg-momentum", type=float, help="APG: momentum in (-1, 1), e.g. -0.5 (default: none)")
    var.add_argument("--slg-layers", type=_layers, metavar="N[,N...]",
                     help="skip-layer guidance: the uncond pass skips these DiT blocks, e.g. 9 or 9,10")
    var.add_argument("--slg-start", type=float, help="SLG from this fraction of the steps (default 0.1)")
    var.add_argument("--slg-end", type=float, help="SLG until this fraction of the steps (default 0.9)")
    var.add_argument("--nag-scale", type=float, help="NAG: negative-prompt guidance in cross-attention for CFG-free "
                                                     "(distilled) models, >= 1, e.g. 11; needs --negative-prompt")
    var.add_argument("--nag-tau", type=float, help="NAG: norm cap (default 2.5)")
    var.add_argument("--nag-alpha", type=float, help="NAG: blend 0..1 (default 0.25)")


_WINDOW_FLAGS = ("context_frames", "context_overlap", "context_schedule", "context_blend",
                 "color_match")  # wanx.request.WINDOW_KEYS


def _window_flags(gen: argparse.ArgumentParser) -> None:
    """`wanx generate`'s context windows (wanx.pipeline.windows): a video longer than the model's."""
    win = gen.add_argument_group("long videos", "denoise a video longer than the model's 81 frames in overlapping "
                                                "windows, blended at every step")
    win.add_argument("--context-frames", type=int, metavar="N", help="frames per window, 4k+1 (e.g. 81); default: "
                                                                     "the whole video at once")
    win.add_argument("--context-overlap", type=int, metavar="N", help="frames neighbouring windows share, a "
                                                                      "multiple of 4 (default 16)")
    win.add_argument("--context-schedule", choices=["static", "uniform", "looped"],
                     help="static: the same windows every step (default); uniform: they slide from step to step, "
                          "so no seam stays put; looped: a video that loops")
    win.add_argument("--context-blend", choices=["linear", "pyramid"], help="how windows blend: linear ramps over "
                                                                            "the overlap (default) or pyramid")
    win.add_argument("--color-match", action="store_true", default=None,
                     help="hold later windows to the first window's colour and brightness (latent statistics)")


def _size(text: str) -> tuple[int, int]:
    """'832x480' (width x height; '*' as in the official CLI works too) -> (width, height)."""
    from .request import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# How the CLI spells each WanPipeline argument, so that errors name the flag to change.
FLAGS = {"prompt": "--prompt (or --prompts FILE)", "negative_prompt": "--negative-prompt", "image": "--image",
         "last_image": "--last-image", "video": "--video", "strength": "--strength", "height": "--size height",
         "width": "--size width", "num_frames": "--frames", "num_inference_steps": "--steps",
         "guidance_scale": "--guidance", "shift": "--shift", "sampler": "--sampler", "seed": "--seed",
         "guidance_scale_low": "--guidance (its second value, the low-noise expert's)", "boundary": "--boundary",
         "timesteps": "--timesteps", "extend": "--extend", "extend_frames": "--extend-frames",
         "control_video": "--control-video", "mask": "--mask", "reference_images": "--reference-image",
         "conditioning_scale": "--control-scale", "outpaint": "--outpaint",
         "animate_inputs": "--animate-inputs", "replace": "--replace", "refert_num": "--refert-num",
         **{key: key for key in ("pose_video", "face_video", "background_video", "mask_video")},  # --prompts keys
         "audio": "--audio", "pose_video": "--pose-video", "num_clips": "--num-clips",
         "start_from_ref": "--start-from-ref",
         **{key: "--" + key.replace("_", "-") for key in (  # wanx.request.GUIDANCE_KEYS
             "cfg_steps", "cfg_zero_star", "apg", "apg_eta", "apg_norm_threshold", "apg_momentum", "slg_layers",
             "slg_start", "slg_end", "nag_scale", "nag_tau", "nag_alpha",
             "context_frames", "context_overlap", "context_schedule", "context_blend", "color_match")}}
_JOB_KEYS = ("prompt", "negative_prompt", "seed", "image", "last_image", "video", "strength", "size", "frames", "steps",
             "guidance", "shift", "sampler", "output", "guidance_low",
             "boundary", "timesteps", "cfg_steps", "cfg_zero_star", "apg", "apg_eta", "apg_norm_threshold", "apg_momentum",
             "slg_layers", "slg_start", "slg_end", "nag_scale", "nag_tau",
             "nag_alpha", "context_frames", "context_overlap", "context_schedule",
             "context_blend", "color_match", "extend", "extend_frames", "control_video", "mask", "reference_images",
             "control_scale", "outpaint", "animate_inputs", "pose_video", "face_video", "background_video",
             "mask_video", "replace", "refert_num", "audio", "num_clips",
             "start_from_ref")  # wanx.request.JOB_KEYS, spelled out so --help stays instant
# How the CLI spells each runtime choice and parallel-plan parameter in Runtime.check's refusals
# (`wanx serve` is given them too: its flags are these).
RUNTIME_FLAGS = {"offload": "--offload", "vram_budget": "--vram-budget", "quantize": "--fp8/--int8",
                 "cache": "--teacache/--magcache", "fsdp": "--fsdp", "sp": "--sp", "cfg_parallel": "--cfg-parallel",
                 "ranks": "add --gpus N, or start with torchrun"}
QUALITY_RANGE = (0, 51)  # libx264 CRF


def _jobs(args: argparse.Namespace) -> list[dict]:
    """One job from the flags, or one per line of --prompts (plain text, or JSON objects
    whose keys override the flags). Each job's `where` says where it came from, for errors."""
    import json

    from .request import parse_job

    guidance = args.guidance or (None,)
    base = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, image=args.image,
                last_image=args.last_image, video=args.video, strength=args.strength, size=args.size,
                frames=args.frames, steps=args.steps, guidance=guidance[0], shift=args.shift, sampler=args.sampler,
                guidance_low=guidance[1] if len(guidance) > 1 else None, boundary=args.boundary,
                timesteps=_timesteps(args.timesteps), output=None, where="", extend=args.extend,
                extend_frames=args.extend_frames, control_video=args.control_video, mask=args.mask,
                reference_images=args.reference_image, control_scale=args.control_scale, outpaint=args.outpaint,
                animate_inputs=args.animate_inputs, replace=args.replace or None, refert_num=args.refert_num,
                audio=args.audio, pose_video=args.pose_video, num_clips=args.num_clips,
                start_from_ref=args.start_from_ref or None,
                **{key: getattr(args, key) for key in _GUIDANCE_FLAGS + _WINDOW_FLAGS})
    if not args.prompts:
        return [base]
    if args.prompt is not None:
        raise ValueError("give --prompt or --prompts FILE, not both")
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); save the prompts file as UTF-8") from None
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}: "
        if line.startswith("{"):
            try:
                job = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}not valid JSON ({err.msg})") from None
            if not isinstance(job, dict):
                raise ValueError(f"{where}a JSON line must be an object such as {{\"prompt\": \"...\"}}")
            job = parse_job(job, where=where)  # the server reads its request bodies with the same rules
            # relative to the prompts file, as its author sees them
            for key in ("image", "last_image", "video", "extend", "control_video", "mask", "animate_inputs",
                        "pose_video", "face_video", "background_video", "mask_video", "audio"):
                if isinstance(job.get(key), str) and not Path(job[key]).expanduser().is_absolute():
                    job[key] = str(path.parent / job[key])
            if job.get("reference_images") is not None:  # one path or a list of them
                refs = job["reference_images"]
                job["reference_images"] = [str(path.parent / ref) if isinstance(ref, str) and not
                                           Path(ref).expanduser().is_absolute() else ref
                                           for ref in ([refs] if isinstance(refs, str) else refs)]
        else:
            job = {"prompt": line}
        jobs.append({**base, **job, "output": job.get("output"), "where": where})
    if not jobs:
        raise ValueError(f"{path}: no prompts in the file")
    return jobs


def _output_paths(jobs: list[dict], args: argparse.Namespace) -> list[Path]:
    """Where each job's video goes.

    One job: -o FILE.mp4/.gif, -o NEW_FOLDER (PNG frames), or -o EXISTING_FOLDER (a generated
    name inside). A batch: -o is a folder (default outputs/); a job's own relative `output`
    is inside it. Generated names continue after the highest number already in the folder."""
    batch = bool(args.prompts)
    target = Path(args.output) if args.output else None
    if batch and target is not None and (target.suffix.lower() in (".mp4", ".gif") or target.is_file()):
        raise ValueError(f"{target}: with --prompts, --output names a folder for the videos")
    folder = target if target is not None and (batch or target.is_dir()) else Path("outputs")
    single_file = not batch and target is not None and not target.is_dir()
    taken = [int(p.name[:3]) for p in folder.glob("[0-9][0-9][0-9]-*")] if folder.is_dir() else []
    start = max(taken, default=-1) + 1
    paths = []
    for i, job in enumerate(jobs):
        if single_file:
            paths.append(target)
        elif job.get("output"):
            paths.append(folder / job["output"])  # an absolute path stays as it is
        else:
            paths.append(folder / f"{start + i:03d}-seed{job['seed']}.mp4")
    seen = set()
    for job, path in zip(jobs, paths):
        if path.resolve() in seen:
            raise ValueError(f"{job['where']}{path}: two jobs write the same file; give each its own output")
        seen.add(path.resolve())
    return paths


def _prepare_output(path: Path, created: list[Path]) -> None:
    """Create the folder and write a probe file there, so that an unwritable output fails
    now, naming the path, and not after the generation. Folders made here go to `created`."""
    import os

    if path.suffix.lower() not in (".mp4", ".gif", ""):
        raise ValueError(f"{path}: output must end in .mp4 or .gif (or name a new folder for PNG frames)")
    if path.is_dir() and path.suffix == "":
        raise FileExistsError(f"{path}: folder exists; choose a new name for the PNG frames")
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        probe = path.parent / f".{path.name}.probe"
        with open(probe, "wb") as fh:
            fh.write(b"wanx")
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{path}: cannot write there ({err.strerror or err}); choose another --output") from None


def _lora_specs(args: argparse.Namespace) -> list[tuple]:
    """Every --lora (--lora-high, --lora-low: one Wan2.2 expert) parsed, named and read, before
    the model is found (perhaps downloaded): [(LoraFile, strength, expert, name)]. Names are
    the given ones, else the file stems, told apart by their folders where stems clash."""
    from .lora import LoraError, lora_names, read_lora

    specs = [(flag, *_lora_arg(flag, text), expert)
             for flag, texts, expert in (("--lora", args.lora, None), ("--lora-high", args.lora_high, "high"),
                                         ("--lora-low", args.lora_low, "low"))
             for text in texts or []]
    given = [name for _, _, _, name, _ in specs if name is not None]
    twice = next((name for i, name in enumerate(given) if name in given[:i]), None)
    if twice is not None:
        raise ValueError(f"two LoRAs are named {twice!r}: give each its own name (PATH:STRENGTH:NAME)")
    defaults = iter(lora_names([path for _, path, _, name, _ in specs if name is None], taken=given))
    read = []
    for flag, path, strength, name, expert in specs:
        try:
            lora = read_lora(path)
        except LoraError as err:
            raise LoraError(f"{flag} {err}") from None
        read.append((lora, strength, expert, name if name is not None else next(defaults)))
    return read


def _relighting_lora(files) -> tuple:
    """--relighting: the Wan2.2 Animate folder's relighting_lora.ckpt as a LoRA at strength 1 (the
    official merges it whole: rank 128, alpha 128)."""
    from .lora import LoraError, read_lora

    if files.model_type != "animate":
        raise ValueError(f"--relighting applies Wan2.2 Animate's relighting_lora.ckpt; this is a {files.model_type} "
                         "model")
    path = Path(files.folder) / "relighting_lora.ckpt"
    if not path.is_file():
        raise ValueError(f"--relighting: {path} is missing; it comes with Wan-AI/Wan2.2-Animate-14B")
    try:
        return read_lora(path), 1.0, None, "relighting"
    except LoraError as err:
        raise LoraError(f"--relighting {err}") from None


def _check_loras(specs: list[tuple], files, partial: bool = False) -> list[tuple]:
    """Check each LoRA of `_lora_specs` against the model folder's DiT (built on the meta
    device: shapes only), before any weight is loaded. partial (--lora-partial): what fits is
    applied, the rest named when it loads. Returns the specs with `partial` added."""
    import torch

    from .lora.apply import match
    from .models.transformer import WanDiT

    if not specs:
        return []
    if not files.moe and any(expert for _, _, expert, _ in specs):
        raise ValueError("--lora-high and --lora-low are for a model with two experts (Wan2.2 A14B); use --lora")
    with torch.device("meta"):
        dit = WanDiT(files.dit_config)
    for lora, *_ in specs:
        match(dit, lora, partial=partial)
    return [(*spec, partial) for spec in specs]


def _lora_steps(specs: list[tuple], texts: list[str], plans) -> None:
    """A per-step strength list whose length is not the steps of every job: one line, before
    any weight is loaded."""
    for (lora, strength, *_), text in zip(specs, texts):
        if not isinstance(strength, list):
            continue
        for plan, where in plans:
            if len(strength) != plan.steps:
                raise ValueError(f"{where}--lora {text}: {len(strength)} strengths for {plan.steps} steps: give one "
                                 "per step, or a range START-END (linear over the steps)")


def _lora_defaults(specs: list[tuple], jobs: list[dict]) -> None:
    """Settings the LoRAs' metadata names (steps, guidance, shift, sampler) fill the options the
    user left unset, said in one line; a LoRA that only looks step-distilled gets a hint."""
    from .lora.defaults import distilled_steps, metadata_defaults

    for lora, _, _, name, *_ in specs:
        try:
            found = metadata_defaults(lora.metadata)
        except ValueError as err:
            raise ValueError(f"LoRA {name}: {err}") from None
        flag = {"steps": "--steps", "guidance": "--guidance", "shift": "--shift", "sampler": "--sampler"}
        if found:
            used = {k: v for k, v in found.items() if any(job.get(k) is None for job in jobs)}
            for job in jobs:
                for key, value in used.items():
                    if job.get(key) is None:
                        job[key] = value
            if used:
                given = ", ".join(f"{flag[k]} {v:g}" if not isinstance(v, str) else f"{flag[k]} {v}"
                                  for k, v in used.items())
                print(f"LoRA {name}: its metadata sets {given} (options you give win)", file=sys.stderr)
            continue
        steps = distilled_steps(lora.path.name if lora.path else name, lora.metadata)
        if steps is not None and any(job.get("steps") is None or job["steps"] > 2 * steps for job in jobs):
            print(f"hint: LoRA {name} looks like a {steps}-step distilled LoRA: try --steps {steps} --guidance 1 "
                  "--shift 5", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .hub import find_model
    from .pipeline import WanPipeline
    from .pipeline.conditioning import conditioning_for
    from .request import check_job, fix_seed, request_weights
    from .runtime import Runtime

    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    if args.gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # start the ranks here, then stop
        from .distributed import check_plan, spawn
        from .distributed.launch import without_gpus

        check_plan(args.gpus, None, args.sp, args.cfg_parallel)  # before any rank starts
        return spawn(args.gpus, main, without_gpus(args.argv))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # one rank of several: its own GPU
        from .distributed.launch import rank_device

        args.device = rank_device(args.device)
    runtime = Runtime.from_flags(args)
    plan = dict(world=world_size, fsdp=args.fsdp, sp=args.sp, cfg_parallel=args.cfg_parallel)
    runtime.check(**plan, names=RUNTIME_FLAGS)  # again below, once the model's experts are known
    if args.fsdp:  # the shards place the DiT and umT5 themselves (check: no other offload was asked for)
        runtime = replace(runtime, offload="none")
    jobs = _jobs(args)
    if not QUALITY_RANGE[0] <= args.quality <= QUALITY_RANGE[1]:
        raise ValueError(f"--quality must be in [{QUALITY_RANGE[0]}, {QUALITY_RANGE[1]}] (H.264 CRF; lower is better, "
                         "18 ~ visually lossless)")
    for job in jobs:  # fix the seeds now, so output names and metadata agree
        fix_seed(job, "--seed")
    # Everything is checked before any weight is loaded: device, model folder, inputs, memory, outputs.
    world = None
    if world_size > 1:  # one rank of several: the same seeds everywhere, rank 0 writes
        from .distributed import broadcast_object, init

        world = init(runtime.device)
        seeds = broadcast_object([job["seed"] for job in jobs])
        for job, seed in zip(jobs, seeds):
            job["seed"] = seed
        if not world.main:
            args.quiet = True
    lora_specs = _lora_specs(args)
    _lora_defaults(lora_specs, jobs)
    files = find_model(args.model, dit=args.dit, dit_low=args.model_low, source=args.source)
    if args.relighting:
        lora_specs.append(_relighting_lora(files))
    runtime.check(experts=2 if files.moe else 1, **plan, names=RUNTIME_FLAGS)
    if world is not None:
        from .distributed import check_plan

        check_plan(world.size, files.dit_config.num_heads, args.sp, args.cfg_parallel)
    # each GPU holds its shard of the DiT and umT5 with --fsdp
    weights = request_weights(files, runtime, fsdp_ranks=world.size if args.fsdp and world is not None else 1)
    loras = _check_loras(lora_specs, files, partial=args.lora_partial)
    requests, plans = [], []
    outputs = _output_paths(jobs, args)
    for job, out in zip(jobs, outputs):
        try:  # an mp4 or PNG frames are streamed: the frames decoded are never all held
            plan, request = check_job(job, files, runtime=runtime, weights=weights, names=FLAGS,
                                      stream=out.suffix.lower() != ".gif")
        except (ValueError, FileNotFoundError) as err:  # a missing input file too: name the prompts line
            raise ValueError(f"{job['where']}{err}") from None
        requests.append(request)
        plans.append((plan, job["where"]))
    _lora_steps(loras, [text for texts in (args.lora, args.lora_high, args.lora_low) for text in texts or []], plans)
    writer = world is None or world.main  # only rank 0 writes files and speaks
    created: list[Path] = []
    args.written = []  # for the Ctrl-C message
    try:
        for out in outputs if writer else ():
            _prepare_output(out, created)
        start = time.perf_counter()
        # --fsdp: DiT and umT5 stay memory-mapped on the host until fully_shard moves each
        # rank's shard to its GPU, so no GPU ever holds a whole copy
        parallel = None if world is None else dict(sp=args.sp, cfg_parallel=args.cfg_parallel, fsdp=args.fsdp)
        pipe = WanPipeline.from_files(files, runtime=runtime, progress=not args.quiet, loras=loras,  # read, checked
                                      parallel=parallel, host_load=bool(args.fsdp and world is not None))
        pipe.name = args.model
        for report, expert in pipe.applied.loras if writer else ():
            print(f"{report}{f' ({expert}-noise expert)' if expert else ''}", file=sys.stderr)
        if pipe.parallel is not None and writer:
            print(f"parallel: {pipe.parallel.describe()}", file=sys.stderr)
        if not args.quiet:
            experts = ", two experts" if files.moe else ""
            from .memory.estimate import held_form

            held = held_form(pipe.dit)  # quantized or packed block layers, as kept on the device
            print(f"loading: {time.perf_counter() - start:.1f} s ({files.model_type}{experts} on {runtime.device}, "
                  f"{str(runtime.dtype).removeprefix('torch.')}{f'; DiT layers {held}' if held else ''})",
                  file=sys.stderr)
        for job, request, out, (plan, _) in zip(jobs, requests, outputs, plans):
            # mp4 and PNG frames are written as they are decoded (memory flat in length); a gif is collected
            streamed = writer and out.suffix.lower() != ".gif"
            # the other ranks stop at the latents: rank 0 alone decodes and writes; a clip-after-clip
            # task (Animate) decodes each clip on every rank, since the next clip starts from its frames
            decoded = writer or conditioning_for(plan.spec).clip_after_clip
            try:
                video = pipe(job["prompt"], job["negative_prompt"], progress=not args.quiet,
                             output_path=out if streamed else None, quality=args.quality,
                             output_type="video" if decoded else "latents", **request)
            except KeyboardInterrupt:
                args.partial = pipe.last_partial  # the frames decoded before the stop, for main's message
                raise
            if not writer:
                continue
            if not streamed:
                video.save(out, quality=args.quality)
            _write_latents(out, video, pipe)
            args.written.append(out)
            print(f"{out}  (seed {job['seed']}, {len(video)} frames, {video.size[0]}x{video.size[1]})")
            if pipe.step_cache is not None and not args.quiet:
                print(f"{pipe.step_cache.kind}: {pipe.step_cache.stats.summary()}", file=sys.stderr)
    finally:
        for folder in reversed(created):  # folders this run made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import serve  # FastAPI, Gradio and torch load only here

    if args.token is None:
        args.token = os.environ.get("WANX_TOKEN") or None
    local = _local_workers(args) if args.gpus is not None else None
    if local is None and (args.sp or args.cfg_parallel):
        raise ValueError(f"{'--sp' if args.sp else '--cfg-parallel'} makes the workers --gpus N starts one group; "
                         "add --gpus N (or run wanx worker --gpus 0,1 --sp ...)")
    if args.workers is None:
        args.workers = 0 if local else 1
    return serve(args, flags=RUNTIME_FLAGS, local=local)


def _local_workers(args: argparse.Namespace):
    """`wanx serve --gpus N`: checked before anything loads; the `wanx worker` command lines."""
    from .serve.local import LocalWorkers, worker_flags

    n = args.gpus
    if n < 1:
        raise ValueError(f"--gpus {n}: give how many GPUs get a worker (1 or more)")
    if args.workers is not None:
        raise ValueError(f"--gpus {n} starts the workers itself and this process runs none; leave out --workers")
    device = args.device or "cuda"
    group = bool(args.sp or args.cfg_parallel)
    if device != "cpu":
        if device != "cuda":
            raise ValueError(f"--gpus {n} gives each worker its GPU; --device {device} picks one: leave it out "
                             "(CUDA_VISIBLE_DEVICES chooses which GPUs this host lends)")
        import torch  # the count is NVML's: CUDA is not initialised in this process

        present = torch.cuda.device_count()
        if n > present:
            raise ValueError(f"--gpus {n}: this host has {present or 'no'} GPU{'s' if present != 1 else ''}"
                             f"{'' if present else ' (or no CUDA)'}; give at most {present}"
                             f"{'' if present else ', or --device cpu for CPU workers'}")
    if group:  # the model's head count too: a group that cannot split it would only fail in the child
        from .distributed import check_plan
        from .hub import find_components, resolve_model

        files = find_components(resolve_model(args.model, source=args.source), dit=args.dit)
        check_plan(n, files.dit_config.num_heads, args.sp or "auto", args.cfg_parallel)
    outputs = Path(args.outputs).resolve()
    queue = args.queue or f"sqlite:///{outputs / 'jobs.sqlite'}"  # the file the server's own queue opens
    skip = {"queue", "outputs", "model", "gpu", "gpus", "sp", "cfg_parallel", "device"}
    base = [sys.executable, "-m", "wanx", "worker", "--queue", queue, "--outputs", str(outputs), "--model", args.model,
            *worker_flags(args, _subparser("worker"), skip), *(["--device", args.device] if args.device else [])]
    if group:
        return LocalWorkers([base + ["--gpus", ",".join(map(str, range(n))), "--sp", args.sp or "auto",
                                     *(["--cfg-parallel"] if args.cfg_parallel else [])]],
                            [f"worker {'cpu' if device == 'cpu' else 'gpus'} 0-{n - 1}"])
    if device == "cpu":
        return LocalWorkers([base] * n, [f"worker cpu {i}" for i in range(n)])
    return LocalWorkers([base + ["--gpu", str(i)] for i in range(n)], [f"worker gpu {i}" for i in range(n)])


def _subparser(name: str) -> argparse.ArgumentParser:
    return next(action for action in build_parser()._actions
                if isinstance(action, argparse._SubParsersAction)).choices[name]


def cmd_worker(args: argparse.Namespace) -> int:
    from .serve.worker import run_worker  # torch loads only here

    return run_worker(args, main, flags=RUNTIME_FLAGS)


def _check_folder(folder: Path, flag: str, given: Path | None = None) -> None:
    """An output folder that cannot be made (it or a folder on its way is a file) or written
    in: one line naming the flag and what it was `given`, before anything is loaded."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {given or folder}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {given or folder}: cannot write in {parent}; choose another place")


def cmd_prepare(args: argparse.Namespace) -> int:
    import math

    from .hub import find_components, resolve_model
    from .runtime import Runtime
    from .distributed.launch import rank_device
    from .training.prepare import model_geometry, prepare

    if not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps must be a positive frame rate such as 16, got {args.fps:g}")
    _check_folder(Path(args.cache) if args.cache else Path(args.dataset) / ".wanx-cache", "--cache")
    args.device = rank_device(args.device)
    runtime = Runtime.from_flags(args)
    files = find_components(resolve_model(args.model, source=args.source))
    # unset: the model's own size and length (wanx-defaults.json), else the official ones
    args.size, args.frames = model_geometry(files, args.size, args.frames)
    from .configs import frames_ok

    if not frames_ok(args.frames):
        raise ValueError(f"--frames {args.frames} must be 4k+1 (e.g. 17, 33, 81)")
    if min(args.size) <= 0 or any(v % 16 for v in args.size):
        raise ValueError(f"--size {args.size[0]}x{args.size[1]}: width and height must be positive multiples of 16")
    from .tasks import default_task

    row = default_task(files.model_type, 2 if files.moe else 1)  # its size multiple: the VAE's stride x the patch
    if row.multiple != 16:
        if args.buckets:
            raise ValueError(f"--buckets sizes are multiples of 16; a {row.short} model needs multiples of "
                             f"{row.multiple}: give --size WxH instead")
        if any(v % row.multiple for v in args.size):
            raise ValueError(f"--size {args.size[0]}x{args.size[1]}: a {row.short} model needs width and height in "
                             f"multiples of {row.multiple} (e.g. {row.example_size})")
    report = prepare(args.dataset, files, cache=args.cache, size=args.size, buckets=args.buckets, frames=args.frames,
                     fps=args.fps, runtime=runtime, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # several processes: the main one reports for all
        empty = report.nothing_prepared()
        if empty:  # `train` would only find an empty cache
            raise ValueError(empty)
        print(report.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Flags -> TrainConfig, ValidationRequest and Runtime -> `wanx.training.run`."""
    from .runtime import Runtime
    from .training import run
    from .training.output import kept_after_interrupt
    from .training.recipe import TrainConfig
    from .training.run import ValidationRequest

    for name in ("data", "model", "output"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (on the command line or in the --config file)")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if isinstance(args.targets, str) \
        else tuple(args.targets)
    if args.steps is not None and args.epochs is not None:
        raise ValueError(f"give --steps or --epochs, not both (--steps {args.steps}, --epochs {args.epochs:g})")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps} (0 would write an untrained LoRA)")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs:g}")
    if args.lora_rank < 1 or args.grad_accum < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError("--lora-rank, --batch-size and --grad-accum must be >= 1 and --lr positive")
    for flag in ("save_every", "validate_every", "keep", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 <= args.caption_dropout < 1:
        raise ValueError(f"--caption-dropout is a share in [0, 1), got {args.caption_dropout}")
    if args.offload_activations and not args.gradient_checkpointing:
        raise ValueError("--offload-activations needs --gradient-checkpointing (it moves what checkpointing keeps)")
    if args.full and (args.fp8 or args.int8):
        flag = "--fp8" if args.fp8 else "--int8"
        raise ValueError(f"--full trains every weight: drop {flag} ({flag[2:].upper()} weights are frozen)")
    if args.from_scratch and not args.full:
        raise ValueError("--from-scratch trains a whole new DiT: add --full")
    config = TrainConfig(data=Path(args.data), output=Path(args.output), full=args.full,
                         from_scratch=args.from_scratch, lora_rank=args.lora_rank,
                         lora_alpha=args.lora_alpha, targets=targets, lora_blocks=args.lora_blocks,
                         lr=args.lr, lr_scheduler=args.lr_scheduler,
                         warmup_steps=args.warmup_steps, steps=None if args.epochs is not None else args.steps or 100,
                         epochs=args.epochs,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, repeats=args.repeats,
                         shift=args.shift, seed=args.seed, timesteps=args.timesteps, weighting=args.weighting,
                         caption_dropout=args.caption_dropout,
                         lora_format=args.lora_format, gradient_checkpointing=args.gradient_checkpointing,
                         offload_activations=args.offload_activations, mixed_precision=args.mixed_precision,
                         save_every=args.save_every, keep=args.keep, resume=args.resume, overwrite=args.overwrite,
                         validate_every=args.validate_every if args.validation_prompts else None,
                         expert=args.expert)
    validation = None
    if args.validation_prompts:
        validation = ValidationRequest(_prompts(args.validation_prompts), args.validation_negative_prompt,
                                       args.validation_size, args.validation_frames, args.validation_steps)
    # train's --vram-budget is read with --offload blocks only (its help says so)
    runtime = Runtime.from_flags(args)  # a --vram-budget without --offload blocks is refused, not ignored
    main_process = os.environ.get("RANK", "0") == "0"  # several processes: the main one reports for all
    try:
        path = run(config, runtime, model=args.model, source=args.source, validation=validation,
                   progress=not args.quiet, names=TRAIN_FLAGS)
    except KeyboardInterrupt:  # say what a stopped run keeps and how to go on
        if not main_process:
            return 130
        if not args.quiet:
            print(file=sys.stderr)  # end the progress bar's line
        kept = kept_after_interrupt(config.output)
        print(f"wanx: interrupted; {kept}" if kept else "wanx: interrupted, nothing written", file=sys.stderr)
        return 130
    if main_process:
        print(path)
    return 0


# How `wanx train` spells the parameters of `wanx.training.run` in its errors.
TRAIN_FLAGS = {"model": "--model", "expert": "--expert", "output": "--output", "validation": "--validation-prompts",
               "offload": "--offload", "vram_budget": "--vram-budget", "quantize": "--fp8/--int8"}


def _gpu_list(text: str) -> list[int]:
    """--gpus 0,1,...: GPU indices (argparse names the flag when this raises)."""
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give GPU indices separated by commas, e.g. 0,1 (got {text!r})") from None
    if any(k < 0 for k in gpus):
        raise argparse.ArgumentTypeError(f"GPU indices are 0 or more (got {text!r})")
    return gpus


def _prompts(text: str) -> list[str]:
    """A prompt file (one per line) or prompts separated by '|'."""
    path = Path(text)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else text.split("|")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--validation-prompts {text!r} holds no prompt")
    return prompts


def _train_toml(parser: argparse.ArgumentParser, path: str) -> None:
    """Settings of `wanx train` from a TOML file (keys are the flag names, lora-rank or
    lora_rank); flags given on the command line win."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from None
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in dests:
            raise ValueError(f"--config {path}: unknown setting {key!r}; use wanx train's flag names, e.g. lora-rank")
        action = dests[dest]
        if isinstance(value, list):  # targets = ["q", "k"]
            value = ",".join(str(v) for v in value)
        flag = action.option_strings and action.nargs == 0
        if flag and not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} must be true or false, got {value!r}")
        if not flag and (isinstance(value, bool) or (action.type is int and isinstance(value, float))):
            # int(2.5) and int(True) would pass silently where argparse refuses "2.5" and "true"
            raise ValueError(f"--config {path}: {key} = {value!r}: not {'an integer' if action.type is int else 'valid'}")
        if action.type is not None:
            try:
                value = action.type(value if action.type in (int, float) else str(value))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"--config {path}: {key} = {value!r}: {err}") from None
        elif not flag:
            value = str(value)  # data = 3 is the folder "3", as on the command line
        if action.choices is not None and value not in action.choices:  # set_defaults skips argparse's check
            raise ValueError(f"--config {path}: {key} = {value!r}: choose from {', '.join(map(str, action.choices))}")
        defaults[dest] = value
    parser.set_defaults(**defaults)


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from .hub import find_components, resolve_model
    from .pipeline import WanPipeline
    from .request import check_job, request_weights
    from .runtime import Runtime
    from .speed.cache import calibrate, calibration_path
    from .text import Tokenizer

    # Everything is checked before any weight is loaded: model, output, settings, memory, prompts.
    runtime = Runtime.from_flags(args)
    files = find_components(resolve_model(args.model, source=args.source), dit=args.dit)
    from .tasks import default_task

    if default_task(files.model_type, 2 if files.moe else 1).needs:  # an I2V/FLF2V model needs images per prompt
        raise ValueError("calibrate-cache runs text-to-video prompts: give a T2V model (I2V needs images; not yet)")
    # the runs measure what a step cache would skip: the step cache's pairs apply
    replace(runtime, cache="teacache").check(experts=2 if files.moe else 1,
                                             names={**RUNTIME_FLAGS, "cache": "calibrate-cache"})
    # the package's demo and download caches are not the user's: their calibration goes to WANX_HOME
    output = Path(args.output) if args.output else calibration_path(files.folder)
    if args.output:
        if output.is_dir():
            raise ValueError(f"--output {output}: is a folder; give a file name such as calibration.json")
        _check_folder(output.parent, "--output", output)
    if args.prompts:
        try:
            prompts = _prompts(args.prompts)
        except ValueError:
            raise ValueError(f"--prompts {args.prompts!r} holds no prompt") from None
    else:
        prompts = CALIBRATION_PROMPTS
    # size, frames, steps and negative prompt: as `generate` takes them (the model's own defaults
    # from wanx-defaults.json, else the official ones), and the same memory check
    job = dict(prompt=prompts[0], size=args.size, frames=args.frames, steps=args.steps, seed=args.seed)
    plan, _ = check_job(job, files, runtime=runtime, weights=request_weights(files, runtime), names=FLAGS)
    if plan.steps < 10:
        raise ValueError(f"--steps {plan.steps} must be >= 10 (the first 5 steps are never skipped, so they do not "
                         "calibrate)")
    text_len = files.dit_config.text_len
    texts = prompts + ([plan.negative_prompt] if plan.negative_prompt else [])
    too_long = Tokenizer(files.tokenizer).first_too_long(texts, text_len)
    if too_long:
        k, n = too_long
        text = texts[k]
        if k == len(prompts):
            what = f"the model's negative prompt ({files.folder}/wanx-defaults.json, or the official one)"
        elif args.prompts:
            what = f"--prompts: prompt {k + 1} ({text[:40]!r})"
        else:
            what = f"the built-in prompt {text!r} (give your own with --prompts)"
        raise ValueError(f"{what} has {n} tokens; this model reads at most {text_len}: shorten it")
    pipe = WanPipeline.from_files(files, runtime=runtime, progress=not args.quiet)
    result = calibrate(pipe, prompts, num_inference_steps=plan.steps, width=plan.width, height=plan.height,
                       num_frames=plan.num_frames, seed=args.seed, progress=not args.quiet)
    result.update(model=str(files.dit), size=f"{plan.width}x{plan.height}", frames=plan.num_frames,
                  prompts=len(prompts))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output)
    print(output)
    return 0


# Short enough for a model that reads 32 tokens (the demo): 32, 27 and 26 of its tokens.
CALIBRATION_PROMPTS = ["A cat walks on the grass, realistic style.",
                       "A red car drives along a road at sunset.",
                       "Two people talk in a busy cafe."]


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download

    print(download(args.model_id, source=args.source, local_dir=args.dir))
    return 0


def _runtime_flags(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """--device, --dtype, --source, --quiet: the same words in every command that loads a model."""
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help=dtype_help)
    parser.add_argument("--source", default="huggingface", choices=["huggingface", "modelscope"],
                        help="where model ids come from")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _memory_speed_flags(parser: argparse.ArgumentParser) -> None:
    """--offload, --vram-budget, --fp8, --int8, --t5-device, --teacache, --magcache, --compile,
    --attention: how a loaded model runs (generate and serve)."""
    mem = parser.add_argument_group("memory", "fit the GPU you have (default: everything resident when it fits, "
                                              "else DiT blocks streamed with an automatic budget)")
    mem.add_argument("--offload", default="auto", choices=["auto", "none", "model", "blocks"],
                     help="none: all resident; model: each network on the GPU only for its phase; blocks: DiT "
                          "blocks streamed from pinned host memory under --vram-budget")
    mem.add_argument("--vram-budget", metavar="BYTES", help="DiT weights kept on the GPU with --offload blocks: "
                                                             "e.g. 6GB, 512MB, 0, or auto (free memory less the "
                                                             "request's work); implies --offload blocks")
    mem.add_argument("--fp8", action="store_true", help="DiT block weights in FP8 (e4m3, per-channel scales): half "
                                                        "the memory of bf16, small quality cost")
    mem.add_argument("--int8", action="store_true", help="DiT block weights in INT8 (weight-only, per-channel "
                                                         "scales): half the memory of bf16, closer to it than --fp8")
    mem.add_argument("--t5-device", metavar="DEVICE", help="run the umT5 text encoder here, e.g. cpu (the official "
                                                           "--t5_cpu): frees ~11 GB of GPU memory")
    fast = parser.add_argument_group("speed", "opt-in: each option's measured speed-up and fidelity cost is in docs/benchmarks.md")
    fast.add_argument("--teacache", metavar="THRESHOLD", type=_threshold, nargs="?", const="auto",
                      help="TeaCache step caching; higher skips more (published: 0.1 T2V-1.3B, 0.2 T2V-14B, 0.3 "
                           "I2V); no value: the model's published one; 0: nothing skipped")
    fast.add_argument("--magcache", metavar="THRESHOLD", type=_threshold, nargs="?", const="auto",
                      help="MagCache step caching (published: 0.12 T2V-1.3B, 0.24 14B); no value: the model's own")
    fast.add_argument("--cache-calibration", metavar="FILE",
                      help="the model's own cache calibration (`wanx calibrate-cache`; found automatically in the "
                           "model folder)")
    fast.add_argument("--compile", action="store_true", help="compile the DiT block once with torch.compile "
                                                              "(warm-up on the first step, faster after)")
    fast.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash3", "flash2", "sage"],
                      help="attention kernel (auto: FlashAttention 3 > 2 > SDPA, as installed; sage is 8-bit, "
                           "only on request)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .tiny import TINY_MODELS  # a plain table: no torch

    tiny = " / ".join(TINY_MODELS)

    parser = argparse.ArgumentParser(prog="wanx", description="Run and fine-tune Wan2.1 video models.")
    parser.add_argument("--version", action="version", version=f"wanx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
    _add_generate(sub, tiny)
    _add_serve(sub, tiny)
    _add_worker(sub, tiny)
    _add_prepare(sub)
    parser.train_parser = _add_train(sub)
    _add_calibrate_cache(sub)
    _add_download(sub)
    _add_demo(sub)
    _add_jobs(sub)
    return parser


def _add_info(sub: argparse._SubParsersAction) -> None:
    """`wanx info PATH...`."""
    info = sub.add_parser("info", help="say what a checkpoint file or model folder is",
                          description="Print network, layout (official/diffusers/comfyui), config, dtype and "
                                      "parameter count of Wan2.1 checkpoints, reading only their headers where possible.")
    info.add_argument("paths", nargs="+", metavar="PATH", help=".safetensors, shard index, .pth/.pt, model folder "
                                                               "(its DiT), demo, or a tiny set's name")
    info.set_defaults(func=cmd_info)


def _write_latents(out: Path, video, pipe) -> None:
    """Beside an mp4: its last latent frames (`<stem>.latents.safetensors`), so that
    `--extend` continues it from them and not from its frames encoded again."""
    from .pipeline.extend import side_file, write_side_file

    try:
        write_side_file(out, video, pipe.vae.config)
    except OSError as err:  # the video is written: say what --extend will do without its latents
        print(f"wanx: warning: {side_file(out)} not written ({err.strerror or err}); --extend {out.name} will encode "
              "its last frames instead", file=sys.stderr)


def _add_generate(sub: argparse._SubParsersAction, tiny: str) -> None:
    """`wanx generate`: the task follows from the model and the inputs."""
    from .tasks import describe_all as defaults

    gen = sub.add_parser("generate", help="make a video from text, an image, first+last frames, or a video",
                         description="Generate with a Wan2.1 model. The task follows from the model and the inputs: "
                                     "text (T2V), --image (I2V), --image + --last-image (FLF2V), --video (video-to-video "
                                     "with a T2V model); Wan2.2 TI2V-5B: text, or text and --image; Wan2.2 Animate: --animate-inputs; "
                                     "Wan-Animate-2: --video (the driving video) and --image (the reference). "
                                     "Unset options take the official "
                                     "defaults of the task.")
    gen.add_argument("--model", required=True,
                     help="model folder (official or diffusers layout), a model id such as Wan-AI/Wan2.1-T2V-1.3B or "
                          "Wan-AI/Wan2.2-T2V-A14B (downloaded), a DiT file whose folder holds the other components, "
                          f"demo (the trained demo model in the package: shapes, 96x96), or {tiny} (random "
                          "weights, offline, 64x64 by default; tiny-moe has Wan2.2's two experts, tiny-ti2v is "
                          "TI2V-5B-shaped on the Wan2.2 VAE)")
    gen.add_argument("--prompt", help="what the video shows")
    gen.add_argument("--negative-prompt", help="what to avoid (default: the official negative prompt of the task)")
    # every default below is read from the task table (wanx.tasks, plain data: no torch)
    gen.add_argument("--prompts", metavar="FILE", help="batch: one prompt per line, or JSON lines with per-job keys "
                                                        f"({', '.join(sorted(_JOB_KEYS))}); their image, last_image "
                                                        "and video paths are relative to FILE's folder")
    gen.add_argument("--image", help="first frame (I2V, FLF2V; TI2V-5B: makes it image-to-video; Wan-Animate-2: "
                                      "the reference character)")
    gen.add_argument("--last-image", help="last frame (FLF2V)")
    gen.add_argument("--video", help="input video for video-to-video (Wan-Animate-2: the driving video)")
    gen.add_argument("--strength", type=float, default=0.8,
                     help="video-to-video: the share of the --steps that is run (the last ones), from the input "
                          "noised to where they begin; 0 < STRENGTH <= 1, default 0.8. The schedule is shifted toward "
                          "high noise: at shift 5 the input is noised to sigma 0.68 at 0.3, 0.88 at 0.6 and 0.95 at "
                          "0.8: lower values keep more of the input; 1 ignores it")
    gen.add_argument("--extend", metavar="VIDEO",
                     help="continue VIDEO: the output is VIDEO followed by the new frames, at its size and frame rate "
                          "(--frames then counts the NEW frames, a multiple of 4; default the model's frame count "
                          "less the overlap). Its last frames start the new ones: from the latents wanx stored beside "
                          "it (out.mp4: out.latents.safetensors) when it made the video, else encoded once. T2V, "
                          "TI2V-5B, I2V (the last frame is the image) and FLF2V (with --last-image) models; not with "
                          "--image or --video")
    vace = gen.add_argument_group("VACE models", "control video, inpainting, outpainting and reference images "
                                                 "(Wan2.1 VACE-1.3B/14B); --image/--last-image are first/last frames")
    vace.add_argument("--control-video", metavar="VIDEO",
                      help="the video the output follows (pose, depth, edges...) or the source to inpaint; its "
                           "aspect ratio is kept within --size; default --frames: its length")
    vace.add_argument("--mask", metavar="VIDEO|IMAGE",
                      help="with --control-video: white = generate, black = keep; a video of as many frames and the "
                           "same size, or one image for every frame (default: all generated)")
    vace.add_argument("--reference-image", action="append", metavar="IMAGE",
                      help="a subject or background to keep (repeatable); placed on a white canvas in front of the "
                           "video and removed from the output")
    vace.add_argument("--control-scale", type=float, metavar="S", help="strength of the VACE hints (default 1)")
    vace.add_argument("--outpaint", metavar="L,R,T,B",
                      help="widen --control-video or --image by left,right,top,bottom pixels (or fractions of "
                           "the width/height below 1) and generate the border")
    animate = gen.add_argument_group("Wan2.2 Animate models", "a reference character driven by a preprocessed "
                                                              "video (docs/animate.md)")
    animate.add_argument("--animate-inputs", metavar="FOLDER",
                         help="the official preprocessing's save_path: src_pose.mp4, src_face.mp4 and src_ref.png "
                              "(with --replace also src_bg.mp4 and src_mask.mp4); the output takes the pose video's "
                              "size and length, made clip after clip of --frames (77)")
    animate.add_argument("--replace", action="store_true",
                         help="replacement: the character takes the place of the person in src_bg.mp4 under "
                              "src_mask.mp4 (default: animation)")
    animate.add_argument("--refert-num", type=int, metavar="N",
                         help="frames each clip carries from the last: 1 (default) or 5")
    animate.add_argument("--relighting", action="store_true",
                         help="apply the model folder's relighting_lora.ckpt (light the character as the scene; "
                              "for --replace)")
    s2v = gen.add_argument_group("Wan2.2 S2V models", "a person from --image speaking or singing --audio, clip "
                                                      "after clip (docs/s2v.md)")
    s2v.add_argument("--audio", metavar="FILE",
                     help="the speech or song (wav, mp3, m4a, flac, or a video with sound); the video is as many "
                          "clips of --frames (80, a multiple of 4) as it gives, and the mp4 carries it")
    s2v.add_argument("--pose-video", metavar="VIDEO",
                     help="a pose video (e.g. DWPose) driving the body, read at 16 fps from its start; a shorter one "
                          "is padded with blank frames")
    s2v.add_argument("--num-clips", type=int, metavar="N", help="at most N clips (default: as many as the audio gives)")
    s2v.add_argument("--start-from-ref", action="store_true",
                     help="the reference image is the first frame (the first clip keeps its motion memory)")
    gen.add_argument("--extend-frames", type=int, metavar="N",
                     help="--extend's overlap in video frames, 4k+1 (default 9: 3 latent frames); at most 29 come "
                          "from the stored latents")
    gen.add_argument("--size", type=_size, help=f"WIDTHxHEIGHT, multiples of 16 (default {defaults('size')}); I2V, "
                                                 "FLF2V and video-to-video keep the input's aspect ratio within this "
                                                 "area. TI2V-5B: multiples of 32")
    gen.add_argument("--frames", type=int, help=f"number of frames, 4k+1 (default {defaults('num_frames')}; "
                                                "video-to-video: the input's frame count rounded down to 4k+1, at most "
                                                f"the default; frame rate {defaults('fps')}). With --extend: the NEW "
                                                "frames, a multiple of 4")
    gen.add_argument("--steps", type=int, help=f"sampling steps (default {defaults('steps')})")
    gen.add_argument("--guidance", type=_guidance, help="classifier-free guidance scale, 1..30; 1 turns it off "
                                                        f"(default {defaults('guidance')}). Wan2.2 A14B: HIGH,LOW for "
                                                        "its two experts (the low-noise one's default "
                                                        f"{defaults('guidance_low')}); one value: both")
    gen.add_argument("--boundary", type=float, help="Wan2.2 A14B: where the low-noise expert takes over, a share of "
                                                    f"the 1000 timesteps (default {defaults('boundary')}); the split "
                                                    "follows the timesteps, so --steps and --shift move it")
    gen.add_argument("--shift", type=float, help=f"schedule shift (default {defaults('shift')})")
    gen.add_argument("--sampler", choices=["unipc", "dpm++", "euler", "lcm"],
                     help="default unipc (official); lcm: x0 re-noised with fresh noise from the seed at each step "
                          "(step-distilled Wan2.1 models: lightx2v, rCM)")
    gen.add_argument("--timesteps", metavar="T1,T2,...",
                     help="an explicit denoising step list on the 0..1000 scale before --shift, strictly decreasing, "
                          "e.g. 1000,750,500,250 (lightx2v's 4-step releases): sigma = T/1000 shifted, final sigma 0; "
                          "it sets the step count (replaces --steps)")
    gen.add_argument("--seed", type=int, help="random seed, 0..2**64-1 (default: a random one, printed)")
    _guidance_flags(gen)
    _window_flags(gen)
    gen.add_argument("--output", "-o", help="an .mp4/.gif file, a new folder name for PNG frames, or an existing "
                                            "folder (a generated name inside). With --prompts: the folder for the "
                                            "videos (default outputs/); a job's relative \"output\" is inside it")
    gen.add_argument("--quality", type=int, default=18, help="H.264 CRF 0..51, lower is better (default 18)")
    _memory_speed_flags(gen)
    par = gen.add_argument_group("several GPUs", "split one generation across ranks (torch.distributed: NCCL on "
                                                 "GPUs, gloo on CPU); also under torchrun [--nnodes ...] -m wanx")
    par.add_argument("--gpus", type=int, default=1, help="start N local ranks (one per GPU; with --device cpu, N "
                                                         "CPU processes)")
    par.add_argument("--sp", default="auto", choices=["auto", "ulysses", "ring", "none"],
                     help="sequence parallel: ulysses (heads across ranks; the head count must divide), ring (any "
                          "count), auto (ulysses when it divides, else ring), none")
    par.add_argument("--cfg-parallel", action="store_true", help="cond and uncond on two halves of the ranks "
                                                                  "(an even count)")
    par.add_argument("--fsdp", action="store_true", help="shard the DiT weights across the ranks (FSDP2): no rank "
                                                          "holds a whole 14B copy")
    gen.add_argument("--lora", metavar="PATH[:STRENGTH[:NAME]]", action="append",
                     help="apply a LoRA (any format: ComfyUI, kohya/musubi, diffusers, DiffSynth, LoHa/LoKr) with a "
                          "strength (default 1.0; per step: S1,S2,... one per step, or START-END linear over the "
                          "steps) and a name for the output (default: the file's stem, with its folder where two "
                          "stems clash); repeat to stack")
    gen.add_argument("--lora-partial", action="store_true",
                     help="apply the parts of a LoRA this model has (e.g. a Wan2.1 I2V LoRA's image cross-attention "
                          "on Wan2.2) and list the rest, instead of refusing it")
    gen.add_argument("--lora-high", metavar="PATH[:STRENGTH[:NAME]]", action="append",
                     help="Wan2.2 A14B: a LoRA for the high-noise expert only (--lora: both)")
    gen.add_argument("--lora-low", metavar="PATH[:STRENGTH[:NAME]]", action="append",
                     help="Wan2.2 A14B: a LoRA for the low-noise expert only (e.g. from wanx train --expert low)")
    gen.add_argument("--dit", metavar="FILE", help="the DiT checkpoint to use when the model folder holds several "
                                                   "(Wan2.2 A14B: the high-noise expert)")
    gen.add_argument("--model-low", metavar="FILE", help="Wan2.2 A14B: the low-noise expert's DiT file (e.g. ComfyUI's "
                                                         "wan2.2_t2v_low_noise_14B_fp16.safetensors), with --model "
                                                         "HIGH_FILE or --dit HIGH_FILE; folders holding both experts "
                                                         "need neither")
    _runtime_flags(gen, "DiT and encoder weights (default bf16 on GPU, fp32 on CPU); the VAE stays fp32")
    gen.set_defaults(func=cmd_generate)


def _add_serve(sub: argparse._SubParsersAction, tiny: str) -> None:
    """`wanx serve`: one model behind the web UI and the job API."""
    srv = sub.add_parser("serve", help="a web UI and an HTTP job API for one model (one queue, kept across restarts)",
                         description="Load a model once and serve it: the web UI at http://HOST:PORT/ and the REST "
                                     "API under /v1 (POST /v1/videos with the keys of a --prompts JSON line; schema "
                                     "at /v1/openapi.json). Jobs run one at a time from a queue kept in "
                                     "OUTPUTS/jobs.sqlite: a restart resumes it.")
    srv.add_argument("--model", required=True, help=f"model folder, model id, demo, or {tiny} (random weights)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                         "only; give 0.0.0.0 to be reached from others, with --token)")
    srv.add_argument("--port", type=int, default=7860, help="default 7860")
    srv.add_argument("--token", help="a secret every API call (Authorization: Bearer TOKEN) and the UI "
                                     "(open /?token=TOKEN once) must give; default: $WANX_TOKEN, else none")
    srv.add_argument("--outputs", default="outputs/serve", help="folder for the videos, their settings and the job "
                                                                "database (default outputs/serve)")
    srv.add_argument("--queue", metavar="URL", help="the job queue: sqlite:///path/jobs.sqlite (default: "
                                                   "OUTPUTS/jobs.sqlite) or postgresql://user@host/database")
    srv.add_argument("--loras", metavar="FOLDER", help="LoRA files requests may choose from, by file name")
    srv.add_argument("--no-ui", action="store_true", help="the API only (no Gradio: starts faster)")
    srv.add_argument("--max-upload-mb", type=float, default=100, help="largest image or video upload (default 100)")
    srv.add_argument("--dit", metavar="FILE", help="the DiT checkpoint to use when the model folder holds several")
    srv.add_argument("--workers", type=int, choices=(0, 1),
                     help="1 (default): this process loads the model and runs the jobs; 0: only the API and UI, "
                          "the jobs run in `wanx worker` processes on the same --queue and --outputs")
    local = srv.add_argument_group("several GPUs", "workers this server starts and stops itself, as `wanx worker` "
                                                   "child processes on its --queue and --outputs")
    local.add_argument("--gpus", type=int, metavar="N", help="N local workers, one per GPU (with --device cpu, N CPU "
                                                             "workers); with --sp, one worker over the N GPUs")
    local.add_argument("--sp", choices=["auto", "ulysses", "ring"],
                       help="with --gpus N: one sequence-parallel group of N ranks (each job faster) instead of N "
                            "workers (more jobs at once); as wanx generate's --sp")
    local.add_argument("--cfg-parallel", action="store_true",
                       help="with --gpus N: one group, cond and uncond on two halves of the ranks (with --sp too)")
    srv.add_argument("--allowed-hosts", metavar="NAMES", help="host names (comma-separated) the server is reached as "
                                                             "besides localhost, IP addresses and --host, e.g. behind "
                                                             "a proxy; * for any")
    _memory_speed_flags(srv)
    _runtime_flags(srv, "DiT and encoder weights (default bf16 on GPU, fp32 on CPU); the VAE stays fp32")
    srv.set_defaults(func=cmd_serve)


def _add_worker(sub: argparse._SubParsersAction, tiny: str) -> None:
    """`wanx worker`: one model's jobs from a shared queue, beside `wanx serve --workers 0`."""
    wrk = sub.add_parser("worker", help="run one model's jobs from a shared queue (beside wanx serve --workers 0)",
                         description="Load a model once and run the jobs for it from the queue a `wanx serve "
                                     "--workers 0` takes them into, until SIGTERM or Ctrl-C (the running job goes "
                                     "back to the queue). Start one per GPU (--gpu K), or one per group of GPUs (--gpus), on any host that "
                                     "reaches the queue and the --outputs folder. $WANX_LEASE_S: how long a job of a "
                                     "worker that died waits before another runs it (default 300).")
    wrk.add_argument("--queue", metavar="URL", required=True,
                     help="the server's queue: sqlite:///OUTPUTS/jobs.sqlite (one host) or postgresql://user@host/db")
    wrk.add_argument("--model", required=True, help=f"as the server's --model (jobs are routed by it): model folder, "
                                                    f"model id, demo, or {tiny}")
    wrk.add_argument("--outputs", default="outputs/serve", help="the server's --outputs folder, shared (default "
                                                                "outputs/serve)")
    wrk.add_argument("--loras", metavar="FOLDER", help="the server's --loras folder")
    wrk.add_argument("--dit", metavar="FILE", help="the DiT checkpoint to use when the model folder holds several")
    where = wrk.add_argument_group("GPUs", "which GPU(s) this worker uses (default: as --device says)")
    pick = where.add_mutually_exclusive_group()
    pick.add_argument("--gpu", type=int, metavar="K", help="this worker on GPU K (counted as cuda:K counts them)")
    pick.add_argument("--gpus", type=_gpu_list, metavar="0,1,...",
                      help="one worker made of a sequence-parallel group of ranks, one per listed GPU (with "
                           "--device cpu, that many CPU ranks): rank 0 takes the jobs, all ranks run each one")
    where.add_argument("--sp", default="auto", choices=["auto", "ulysses", "ring", "none"],
                       help="with --gpus: sequence parallel, as wanx generate's --sp")
    where.add_argument("--cfg-parallel", action="store_true",
                       help="with --gpus: cond and uncond on two halves of the ranks (an even count)")
    _memory_speed_flags(wrk)
    _runtime_flags(wrk, "DiT and encoder weights (default bf16 on GPU, fp32 on CPU); the VAE stays fp32")
    wrk.set_defaults(func=cmd_worker)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """`wanx prepare DATASET`: a training dataset encoded once."""
    prep = sub.add_parser("prepare", help="encode a training dataset once: VAE latents and umT5 text, cached",
                          description="VAE-encode and umT5-encode every video/image of a dataset folder (metadata.csv "
                                      "with file_name,text, or a caption .txt beside each file) into one .safetensors "
                                      "file per item. Resumable; unusable files are skipped and listed with the reason.")
    prep.add_argument("dataset", help="the dataset folder")
    prep.add_argument("--model", required=True, help="model folder, model id, or tiny (its VAE and umT5 are used)")
    prep.add_argument("--cache", help="where the encoded items go (default DATASET/.wanx-cache)")
    prep.add_argument("--size", type=_size, help="WIDTHxHEIGHT every item is resized and centre-cropped to "
                                                 "(default: the model's own, e.g. the demo's 96x96; else 832x480)")
    prep.add_argument("--buckets", action="store_true", help="resolution and frame-count buckets instead: several "
                                                             "aspect ratios of the --size area, frame counts up to "
                                                             "--frames; small buckets merged, none dropped")
    prep.add_argument("--frames", type=int, help="frames per clip, 4k+1 (with buckets: the most; default: the "
                                                 "model's own, e.g. the demo's 17; else 81)")
    prep.add_argument("--fps", type=float, default=16.0, help="frame rate clips are resampled to (default 16)")
    prep.add_argument("--t5-device", help="run umT5 here, e.g. cpu")
    _runtime_flags(prep, "umT5 weights (default bf16 on GPU, fp32 on CPU); the VAE stays fp32")
    prep.set_defaults(func=cmd_prepare)


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`wanx train`; returned for --config, whose TOML keys are its flags."""
    tr = sub.add_parser("train", help="train a LoRA (or the whole DiT) on a prepared dataset",
                        description="Training of the DiT on items made by `wanx prepare` (Wan's flow-matching "
                                    "objective, AdamW). Writes the LoRA OUTPUT/NAME.safetensors (NAME: the output "
                                    "folder's name) in the official/ComfyUI key format (OUTPUT/model.safetensors "
                                    "with --full), OUTPUT/log.csv, and checkpoints OUTPUT/checkpoints/step-N/. "
                                    "Several processes/GPUs: start it with "
                                    "`accelerate launch -m wanx.cli train ...` or torchrun.")
    tr.add_argument("--config", metavar="TOML", help="read settings from a TOML file (keys are these flags' names); "
                                                     "flags on the command line win")
    tr.add_argument("--data", help="the dataset folder (its .wanx-cache) or a cache folder")
    tr.add_argument("--model", help="model folder, model id, or tiny")
    tr.add_argument("--output", help="folder for the LoRA (named after it: runs/cat -> runs/cat/cat.safetensors), "
                                     "the log and the checkpoints; one run per folder")
    tr.add_argument("--full", action="store_true", help="train every DiT weight instead of a LoRA")
    tr.add_argument("--expert", choices=["high", "low"],
                    help="Wan2.2 A14B: train this expert, on its own timesteps only (high: t >= 1000 x boundary, "
                         "low: below); generate with the result as --lora-high / --lora-low")
    tr.add_argument("--from-scratch", action="store_true",
                    help="with --full: start from Wan's random initialisation (the model folder gives the "
                         "architecture; its DiT weights are not used)")
    tr.add_argument("--lora-rank", type=int, default=32)
    tr.add_argument("--lora-alpha", type=float, help="default: the rank (scale 1)")
    tr.add_argument("--targets", default="q,k,v,o,ffn.0,ffn.2", help="block Linear layers to adapt (default q,k,v,o,ffn.0,ffn.2)")
    tr.add_argument("--lora-blocks", default="main", choices=["main", "vace", "both"],
                    help="a VACE model's blocks the LoRA adapts: main (default), vace (its VACE blocks, as "
                         "DiffSynth's VACE LoRAs) or both")
    tr.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    tr.add_argument("--lr-scheduler", default="constant", choices=["constant", "cosine"],
                    help="constant (default, as DiffSynth) or cosine decay to 0 at the last step")
    tr.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    tr.add_argument("--steps", type=int, help="optimizer steps (default 100, unless --epochs)")
    tr.add_argument("--epochs", type=float, help="instead of --steps: passes over the dataset")
    tr.add_argument("--batch-size", type=int, default=1, help="items per micro-batch, from one bucket (default 1)")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    tr.add_argument("--repeats", type=int, default=1, help="times each item is seen per epoch (default 1)")
    tr.add_argument("--shift", type=float, default=5.0, help="timestep schedule shift (default 5)")
    tr.add_argument("--timesteps", default="uniform", choices=["uniform", "logit-normal"],
                    help="how training timesteps are drawn before the shift (default uniform, as DiffSynth)")
    tr.add_argument("--weighting", default="none", choices=["none", "gaussian"],
                    help="loss weight per timestep: none, or DiffSynth's gaussian (highest mid-schedule)")
    tr.add_argument("--caption-dropout", type=float, default=0.0,
                    help="share of items trained with the empty prompt (cached by wanx prepare), so guidance with "
                         "--negative-prompt \"\" has an unconditional model to push from (default 0)")
    tr.add_argument("--lora-format", default="official", choices=["official", "diffusers"],
                    help="key format of the LoRA file (official = ComfyUI's; both load in wanx)")
    tr.add_argument("--fp8", action="store_true", help="the frozen DiT's block weights in FP8 (half the memory); the "
                                                       "LoRA still trains in fp32")
    tr.add_argument("--int8", action="store_true", help="the frozen DiT's block weights in INT8 (weight-only, "
                                                        "per-channel scales; half the memory, closer than FP8); the "
                                                        "LoRA still trains in fp32")
    tr.add_argument("--offload", default="none", choices=["none", "blocks"],
                    help="blocks: the frozen DiT stays in host memory and its blocks are streamed to the GPU "
                         "within --vram-budget (with --fp8: 14B LoRA training on a 24 GB GPU)")
    tr.add_argument("--vram-budget", help="DiT bytes kept on the GPU with --offload blocks, e.g. 6GB")
    tr.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each block's activations in the backward pass: far less memory, ~1.3x the time")
    tr.add_argument("--offload-activations", action="store_true",
                    help="with --gradient-checkpointing: the block inputs it keeps wait in host memory")
    tr.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                    help="autocast the forward pass (default no)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, help="write a checkpoint every N steps")
    tr.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    tr.add_argument("--overwrite", action="store_true",
                    help="start again in an --output holding a previous run: its LoRA, log, checkpoints, validation "
                         "videos and TensorBoard events are removed first (other files stay)")
    tr.add_argument("--validation-prompts", metavar="TEXT|FILE",
                    help="prompts for validation videos: a file (one per line) or prompts separated by |")
    tr.add_argument("--validate-every", type=int, default=100, help="steps between validation videos (default 100)")
    tr.add_argument("--validation-negative-prompt", metavar="TEXT",
                    help="negative prompt of the validation videos (default: the model's own, else the official one)")
    tr.add_argument("--validation-size", type=_size, help="WIDTHxHEIGHT (default: the model's own, else 832x480)")
    tr.add_argument("--validation-frames", type=int, help="frames, 4k+1 (default: the model's own, else 33)")
    tr.add_argument("--validation-steps", type=int, help="sampling steps (default: the model's own, else 30)")
    _runtime_flags(tr, "frozen DiT weights (default bf16 on GPU, fp32 on CPU); the LoRA trains in fp32")
    tr.set_defaults(func=cmd_train)
    return tr


def _add_calibrate_cache(sub: argparse._SubParsersAction) -> None:
    """`wanx calibrate-cache`."""
    cal = sub.add_parser("calibrate-cache", help="fit a model's own TeaCache/MagCache calibration from uncached runs",
                         description="Generate a few prompts without skipping, measure how the DiT's block stack "
                                     "changes from step to step, and fit TeaCache's polynomial and MagCache's ratio "
                                     "table for this model (a fine-tune, or a size with no published calibration). "
                                     "Written to MODEL/wanx-cache-calibration.json (for the demo and downloaded "
                                     "models: $WANX_HOME/calibrations/), where --teacache/--magcache find it.")
    cal.add_argument("--model", required=True, help="model folder, model id, or tiny")
    cal.add_argument("--dit", metavar="FILE", help="the DiT checkpoint to use when the model folder holds several")
    cal.add_argument("--prompts", metavar="TEXT|FILE", help="prompts (a file, one per line, or separated by |); "
                                                            "default: 3 built-in prompts")
    cal.add_argument("--steps", type=int, help="sampling steps, as you will generate (default: the model's own, "
                                               "e.g. the demo's 20; else 50)")
    cal.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's own, e.g. the demo's 96x96; "
                                                "else 832x480)")
    cal.add_argument("--frames", type=int, help="frames, 4k+1 (default: the model's own, e.g. the demo's 17; else 81)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--output", help="where to write the calibration (default: in the model folder, or for the "
                                      "demo and downloaded models under $WANX_HOME/calibrations/)")
    _runtime_flags(cal, "DiT and encoder weights (default bf16 on GPU, fp32 on CPU)")
    cal.set_defaults(func=cmd_calibrate_cache)


def _add_download(sub: argparse._SubParsersAction) -> None:
    """`wanx download MODEL_ID`."""
    dl = sub.add_parser("download", help="download a model (e.g. Wan-AI/Wan2.1-T2V-1.3B) into the standard cache",
                        description="Download a Wan model repository with huggingface_hub (or ModelScope) and print "
                                    "its local folder. Interrupted downloads resume; files already in the cache are "
                                    "not fetched again. Give the folder to --model, or use the id there directly.")
    dl.add_argument("model_id", help="e.g. Wan-AI/Wan2.1-T2V-1.3B, Wan-AI/Wan2.1-I2V-14B-480P, "
                                     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.2-T2V-A14B, Wan-AI/Wan2.2-I2V-A14B, "
                                     "Wan-AI/Wan2.2-TI2V-5B (each also -Diffusers)")
    dl.add_argument("--dir", help="download into this folder instead of the cache")
    dl.add_argument("--source", default="huggingface", choices=["huggingface", "modelscope"],
                    help="where the model comes from (default huggingface; modelscope needs pip install modelscope)")
    dl.set_defaults(func=cmd_download)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """`wanx demo`."""
    demo = sub.add_parser("demo", help="write a tiny random-weight model set, load it and run it (offline, seconds)",
                          description="Writes tiny DiT and VAE checkpoints in the official layout, loads them back "
                                      "with wanx.load_model, and runs a DiT forward and a VAE round trip.")
    demo.add_argument("--workdir", default=None, help="where to write the tiny checkpoints (default: a temp folder)")
    demo.set_defaults(func=cmd_demo)


JOBS_QUEUE = "sqlite:///outputs/serve/jobs.sqlite"  # `wanx serve`'s default --outputs, its default queue


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    """`wanx jobs list | cancel ID | retry ID`: the queue of `wanx serve` and its workers, from a shell."""
    jobs = sub.add_parser("jobs", help="list, cancel or retry the jobs of a wanx serve queue",
                          description="Read and change the job queue that wanx serve and its workers use, by URL; "
                                      "loads no model.")
    jobs.add_argument("--queue", metavar="URL", default=JOBS_QUEUE,
                      help=f"sqlite:///path/jobs.sqlite or postgresql://user@host/database (default {JOBS_QUEUE}: "
                           "wanx serve's with its default --outputs)")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--status", choices=("queued", "running", "done", "failed", "cancelled", "interrupted"))
    listing.add_argument("--model", help="only this model's jobs")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    actions.add_parser("cancel", help="cancel a job (a running one stops at its next step)").add_argument("id")
    actions.add_parser("retry", help="queue a failed, cancelled or interrupted job again").add_argument("id")
    jobs.set_defaults(func=cmd_jobs)


def cmd_jobs(args: argparse.Namespace) -> int:
    from .serve.queue import open_queue, redact  # the standard library only (psycopg for PostgreSQL): no torch

    if args.action == "list" and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.queue.startswith("sqlite:///") and not Path(args.queue[len("sqlite:///"):]).is_file():
        # opening would make an empty queue there: a wrong path must not look like "no jobs"
        raise ValueError(f"--queue {args.queue}: no such file; give the URL (or OUTPUTS/jobs.sqlite) wanx serve uses")
    queue = open_queue(args.queue)
    try:
        if args.action == "list":
            for job in queue.list(status=args.status, model=args.model, limit=args.limit):
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created"]))
                error = f"  {job['error']}" if job["error"] and job["status"] != "done" else ""
                print(f"{job['id']}  {job['status']:<11}  {job['model']}  {created}  attempts {job['attempts']}"
                      f"{'  cancelling' if job['cancel'] and job['status'] == 'running' else ''}{error}")
            return 0
        job = queue.get(args.id)
        if job is None:
            raise ValueError(f"no job {args.id!r} in {redact(args.queue)}; `wanx jobs list` shows the ids")
        if args.action == "cancel":
            if job["status"] in ("done", "failed", "cancelled"):
                raise ValueError(f"job {args.id} is {job['status']}: nothing to cancel")
            job = queue.cancel(args.id)
            print(f"{args.id}  {'cancelling (stops at its next step)' if job['status'] == 'running' else job['status']}")
        else:
            if job["inputs"] and job["status"] != "interrupted":  # the server deletes the uploads of an ended job
                raise ValueError(f"job {args.id} had uploaded files ({', '.join(sorted(job['inputs']))}), deleted "
                                 "when it ended: submit it again with them")
            print(f"{args.id}  {queue.retry(args.id)['status']}")
        return 0
    finally:
        queue.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        config = pre.parse_known_args(argv[1:])[0].config
        if config:
            try:
                _train_toml(parser.train_parser, config)
            except ValueError as err:
                print(f"wanx: error: {err}", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    args.argv = argv  # `--gpus N` starts N ranks of this same command
    try:
        return args.func(args)
    except KeyboardInterrupt:  # partial files are removed on the way out (Video.save, cmd_generate)
        written = getattr(args, "written", [])
        done = f"; {len(written)} video(s) were finished before" if written else ""
        if not getattr(args, "quiet", True):
            print(file=sys.stderr)  # end the progress bar's line
        partial = getattr(args, "partial", None)  # a video stopped while it was being decoded keeps its frames
        what = f"the frames decoded so far are in {partial}" if partial else "nothing written"
        print(f"wanx: interrupted, {what}{' for the current job' if written else ''}{done}", file=sys.stderr)
        return 130
    except Exception as err:  # user errors: one line, no stack trace
        from .loading.files import CheckpointError

        if isinstance(err, (CheckpointError, ValueError, FileNotFoundError, PermissionError, FileExistsError)):
            print(f"wanx: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
