"""One generation request as people write it: a JSON object with the keys of a
`wanx generate --prompts` line (prompt, size, frames, steps, seed, ...). The CLI and the
server both parse and check requests here, so a bad request gets the same words from either:
first the keys and their types, then the pipeline's own rules (`plan_request`) and the memory
estimate, all before a job is queued or a weight is loaded."""

from __future__ import annotations

import math
import random
from typing import Callable, Mapping

from .pipeline import MAX_SEED, RequestError, plan_request
from .tasks import ANIMATE_OPTIONS

# Keys of a request and the type each holds (a JSON line of --prompts, a POST /v1/videos body).
KEY_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str, list), "negative_prompt": (str,), "seed": (int,), "image": (str,), "last_image": (str,),
    "video": (str,), "strength": (int, float), "size": (str,), "frames": (int,), "steps": (int,),
    "guidance": (int, float), "shift": (int, float), "sampler": (str,), "output": (str,),
    "guidance_low": (int, float), "boundary": (int, float),  # Wan2.2 A14B: the low-noise expert
    "timesteps": (list,),  # an explicit denoising step list, e.g. [1000, 750, 500, 250]
    "extend": (str,), "extend_frames": (int,),  # continue a video; the overlap in video frames
    # VACE models: control video, mask (video or image, white = generate), reference images,
    # the hints' scale, and left,right,top,bottom to widen the canvas by
    "control_video": (str,), "mask": (str,), "reference_images": (list, str), "control_scale": (int, float, list),
    "outpaint": (str, list),
    # Wan2.2 Animate models: the preprocessed folder (a path: CLI only), or its files one by one
    # (the reference image is `image`), replacement mode, the frames carried from clip to clip
    "animate_inputs": (str,), "pose_video": (str,), "face_video": (str,), "background_video": (str,),
    "mask_video": (str,), "replace": (bool,), "refert_num": (int,),
    # Wan2.2 S2V models: the audio (any format PyAV decodes), a pose video (pose_video above), at
    # most this many clips, the reference image as the first frame
    "audio": (str,), "num_clips": (int,), "start_from_ref": (bool,),

    # guidance variants and schedule (guidance_from_options)
    "cfg_steps": (int,), "cfg_zero_star": (bool,), "apg": (bool,), "apg_eta": (int, float),
    "apg_norm_threshold": (int, float), "apg_momentum": (int, float), "slg_layers": (list, int),
    "slg_start": (int, float), "slg_end": (int, float), "nag_scale": (int, float), "nag_tau": (int, float),
    "nag_alpha": (int, float),

    # context windows over a long video (windows_from_options)
    "context_frames": (int,), "context_overlap": (int,), "context_schedule": (str,), "context_blend": (str,),
    "color_match": (bool,),
}
WINDOW_KEYS = ("context_frames", "context_overlap", "context_schedule", "context_blend", "color_match")
GUIDANCE_KEYS = ("cfg_steps", "cfg_zero_star", "apg", "apg_eta", "apg_norm_threshold", "apg_momentum", "slg_layers",
                 "slg_start", "slg_end", "nag_scale", "nag_tau", "nag_alpha")
JOB_KEYS = frozenset(KEY_TYPES)
# A request key for each pipeline keyword, so that the pipeline's errors name the key to fix.
PIPELINE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "image": "image",
                 "last_image": "last_image", "video": "video", "strength": "strength", "height": "size",
                 "width": "size", "num_frames": "frames", "num_inference_steps": "steps", "guidance_scale": "guidance",
                 "shift": "shift", "sampler": "sampler", "seed": "seed", "guidance_scale_low": "guidance_low",
                 "boundary": "boundary", "timesteps": "timesteps", "context_windows": "context_frames",
                 "extend": "extend", "extend_frames": "extend_frames", "control_video": "control_video",
                 "mask": "mask", "reference_images": "reference_images", "conditioning_scale": "control_scale",
                 "outpaint": "outpaint", **{key: key for key in ANIMATE_OPTIONS}, "audio": "audio",
                 "num_clips": "num_clips", "start_from_ref": "start_from_ref"}
# How a request's keys are spelled in errors when no face says otherwise.
KEY_NAMES = {**PIPELINE_KEYS, "height": "size height", "width": "size width"}


def parse_size(text) -> tuple[int, int]:
    """'832x480' (width x height; '*' as in the official CLI works too) -> (width, height)."""
    try:
        w, h = (int(v) for v in str(text).lower().replace("*", "x").split("x"))
    except ValueError:
        raise RequestError("size", f"size must be WIDTHxHEIGHT, e.g. 832x480; got {text!r}") from None
    return w, h


def parse_job(obj, *, where: str = "", types: Mapping[str, tuple[type, ...]] = KEY_TYPES) -> dict:
    """A JSON object -> the request's settings, `size` as (width, height). Unknown keys and
    values of the wrong type are refused in one line naming the key (`where` goes first).
    types: the keys a face accepts and their types (default those of a --prompts line)."""
    if not isinstance(obj, dict):
        raise RequestError("", f"{where}a request must be a JSON object such as {{\"prompt\": \"...\"}}")
    unknown = set(obj) - set(types)
    if unknown:
        raise RequestError(sorted(unknown)[0], f"{where}unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                               f"known: {', '.join(sorted(types))}")
    job = {}
    for key, value in obj.items():
        kinds = types[key]
        # JSON true is a Python int: refuse it where a number is meant
        if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
            # (int, float) is any number: 0.1 is as good as 1 there
            what = "a number" if float in kinds else {str: "a string", int: "a whole number", list: "a list",
                                                      bool: "true or false"}[kinds[0]]
            if float in kinds and isinstance(value, str) and _decimal_comma(value):
                what = "a number, with a decimal point"
            raise RequestError(key, f"{where}{key} must be {what}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN and Infinity
            raise RequestError(key, f"{where}{key} must be a finite number, got {value!r}")
        job[key] = value
    if job.get("size") is not None:
        try:
            job["size"] = parse_size(job["size"])
        except RequestError as err:
            raise RequestError("size", f"{where}{err}") from None
    return job


def _decimal_comma(text: str) -> bool:
    """'0,1': a number written with a decimal comma."""
    try:
        float(text.strip().replace(",", "."))
    except ValueError:
        return False
    return "," in text


def fix_seed(job: dict, name: str = "seed") -> int:
    """The job's seed, checked, or a random one chosen now (so its output name, metadata and
    any retry agree)."""
    seed = job.get("seed")
    if seed is None:
        seed = job["seed"] = random.randint(0, 2**31 - 1)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"{job.get('where', '')}{name} must be a whole number between 0 and {MAX_SEED}, "
                                   f"got {seed}")
    return seed


def pipeline_kwargs(job: Mapping, names: Mapping[str, str] | None = None) -> dict:
    """The job's settings as WanPipeline keywords (the prompts apart); its guidance keys as a
    `wanx.guidance` strategy (`guidance`), None when none is set."""
    width, height = job.get("size") or (None, None)
    strategy = guidance_from_options({key: job.get(key) for key in GUIDANCE_KEYS},
                                     lambda key: (names or {}).get(key, key))
    return dict(image=job.get("image"), last_image=job.get("last_image"), video=job.get("video"),
                strength=job["strength"] if job.get("strength") is not None else 0.8, height=height, width=width,
                num_frames=job.get("frames"), num_inference_steps=job.get("steps"),
                guidance_scale=job.get("guidance"), guidance_scale_low=job.get("guidance_low"),
                boundary=job.get("boundary"), shift=job.get("shift"), sampler=job.get("sampler"), seed=job.get("seed"),
                timesteps=job.get("timesteps"), guidance=strategy, extend=job.get("extend"),
                extend_frames=job.get("extend_frames"), control_video=job.get("control_video"),
                mask=job.get("mask"), reference_images=job.get("reference_images"),
                conditioning_scale=job.get("control_scale"), outpaint=job.get("outpaint"),
                # replace false is the default (None): animation, or replacement when a background is given
                **{key: job.get(key) if key != "replace" else job.get(key) or None for key in ANIMATE_OPTIONS},
                audio=job.get("audio"), num_clips=job.get("num_clips"), start_from_ref=job.get("start_from_ref") or None,
                context_windows=windows_from_options({key: job.get(key) for key in WINDOW_KEYS},
                                                     lambda key: (names or {}).get(key, key)))


def check_job(job: Mapping, files, *, runtime, weights: int, names: Mapping[str, str] | None = None,
              stream: bool = False):
    """The pipeline's own checks of one job for the model `files` (hub.ModelFiles) on
    `runtime`: inputs read, sizes, frames, ranges, and whether it fits the device beside
    `weights` bytes already there. Returns (plan, pipeline keywords); raises RequestError
    naming the pipeline keyword at fault. names: how the face spells each keyword. stream:
    the frames go to a file as they are decoded (`output_path`), never all held."""
    from .memory.estimate import check_fits

    request = pipeline_kwargs(job, names or KEY_NAMES)
    plan = plan_request(files.model_type, job.get("prompt"), job.get("negative_prompt"), names=names or KEY_NAMES,
                        model_defaults=files.defaults, experts=2 if files.moe else 1, clip=files.dit_config.clip,
                        layers=files.dit_config.num_layers, **request)
    if plan.animate is not None:  # the face crops' size is the model's (its motion encoder's input)
        from .pipeline.conditioning.animate import check_face_size

        check_face_size(plan, files.dit_config)
        if job.get("size") is not None and tuple(job["size"]) != (plan.width, plan.height):
            name = (names or KEY_NAMES).get("width", "size")
            raise RequestError("height", f"{name.split()[0]} does not apply to Animate: the output takes the pose "
                                         f"video's size, {plan.width}x{plan.height}; leave it unset")
    if plan.animate2 is not None and runtime.cache is not None:  # the cache would wrap the reference pass too
        raise RequestError("", "a step cache (TeaCache/MagCache) does not apply to Animate-2: its reference "
                                     "pass goes through the same blocks; leave the cache off")
    window = None if plan.windows is None else (plan.windows.size - 1) * plan.latent[1] + 1
    from dataclasses import asdict

    from .pipeline.conditioning import conditioning_for

    held = conditioning_for(plan.spec).held(plan)  # the task's references, motion memory, clips
    try:  # batch 1: guidance runs as two passes when one batch of two does not fit
        check_fits(files.dit_config, plan.height, plan.width, plan.num_frames, device=runtime.device,
                   dtype=runtime.dtype, vae_dtype=runtime.vae_dtype, weights=weights, batch=1, window_frames=window,
                   stream=stream, **asdict(held))
    except ValueError as err:
        raise RequestError("height", str(err)) from None
    return plan, request


def request_weights(files, runtime, fsdp_ranks: int = 1) -> int:
    """Bytes of weights `runtime` keeps on its device for these model files (what a request's
    work must fit beside). fsdp_ranks: each rank holds its shard of the DiT and umT5."""
    from .memory.estimate import weight_bytes
    from .memory.placement import device_weight_bytes

    per_network = weight_bytes(files.parameter_counts(), runtime.dtype, runtime.vae_dtype, fp8=bool(runtime.quantize),
                               stored=files.stored_kinds())
    if fsdp_ranks > 1:
        per_network = {k: v // fsdp_ranks if k in ("dit", "t5") else v for k, v in per_network.items()}
    return device_weight_bytes(runtime.offload, runtime.device, per_network)


GUIDANCE_VARIANTS = ("cfg_zero_star", "apg", "slg_layers", "nag_scale")  # the keys that choose a variant


def guidance_from_options(options: Mapping, name: Callable[[str], str] = str):
    """A strategy from request options (the keys of a --prompts line: cfg_steps, cfg_zero_star,
    apg, apg_eta, apg_norm_threshold, apg_momentum, slg_layers, slg_start, slg_end, nag_scale,
    nag_tau, nag_alpha), or None when none is set. One variant at a most; `cfg_steps` goes with
    any. name: how the caller spells each key, for its errors."""
    from .guidance import APG, CFG, NAG, SLG, CFGZeroStar

    given = {k: v for k, v in options.items() if v is not None and v is not False}
    variants = [k for k in GUIDANCE_VARIANTS if k in given]
    if len(variants) > 1:
        raise RequestError(variants[1], f"{name(variants[0])} and {name(variants[1])} are two guidance variants: "
                                        "choose one")
    for key, owner in (("apg_eta", "apg"), ("apg_norm_threshold", "apg"), ("apg_momentum", "apg"),
                       ("slg_start", "slg_layers"), ("slg_end", "slg_layers"), ("nag_tau", "nag_scale"),
                       ("nag_alpha", "nag_scale")):
        if key in given and owner not in given:
            raise RequestError(key, f"{name(key)} is a setting of {name(owner)}: give {name(owner)} too")
    schedule = {"cfg_steps": given["cfg_steps"]} if "cfg_steps" in given else {}
    if not variants:
        return CFG(**schedule) if schedule else None
    kind = variants[0]

    def pick(**pairs):
        return {k: given[key] for k, key in pairs.items() if key in given}

    if kind == "cfg_zero_star":
        return CFGZeroStar(**schedule)
    if kind == "apg":
        return APG(**pick(eta="apg_eta", norm_threshold="apg_norm_threshold", momentum="apg_momentum"), **schedule)
    if kind == "slg_layers":
        layers = given["slg_layers"]
        layers = [layers] if isinstance(layers, int) else layers
        if isinstance(layers, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise RequestError("slg_layers", f"{name('slg_layers')} must be DiT block numbers such as [9, 10], "
                                             f"got {layers!r}")
        return SLG(layers, **pick(start="slg_start", end="slg_end"), **schedule)
    return NAG(given["nag_scale"], **pick(tau="nag_tau", alpha="nag_alpha"), **schedule)


def windows_from_options(options: Mapping, name: Callable[[str], str] = str):
    """Context windows from request options (context_frames, context_overlap, context_schedule,
    context_blend, color_match), or None when context_frames is not set; the others are its settings."""
    from .pipeline import ContextWindows

    given = {k: v for k, v in options.items() if v is not None and v is not False}
    if "context_frames" not in given:
        if given:
            key = sorted(given)[0]
            raise RequestError(key, f"{name(key)} is a setting of {name('context_frames')}: give "
                                    f"{name('context_frames')} too (e.g. 81)")
        return None
    keys = dict(frames="context_frames", overlap="context_overlap", schedule="context_schedule",
                blend="context_blend", color_match="color_match")
    return ContextWindows(**{k: given[key] for k, key in keys.items() if key in given})
