"""A request checked and resolved before any heavy work: the task chosen from the task table
(`wanx.tasks`) by the model and the inputs given, every unset option taken from the model
folder's own settings, then the task's official defaults, and the inputs read and sized by
the task's conditioning (`conditioning.read`). Errors name the argument to change, spelled as
the caller's face spells it (`names`: the CLI says `--frames` where Python says `num_frames`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Mapping

from torch import Tensor

from ..sampling import SAMPLERS, check_timesteps
from ..configs import frames_at_most, frames_ok
from ..tasks import (ANIMATE_OPTIONS, INPUT_NEEDS, MODEL_NAMES, NEGATIVE_PROMPT, TASK_OPTIONS, TaskError, TaskSpec,
                     choose_task, default_task, model_tasks)
from ..tasks import S2V_OPTIONS

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
GUIDANCE_RANGE = (1.0, 30.0)
# The request's keywords (WanPipeline.__call__'s), each None when not given.
REQUEST_KEYS = ("image", "last_image", "video", "strength", "height", "width", "num_frames", "num_inference_steps",
                "guidance_scale", "guidance_scale_low", "boundary", "shift", "sampler", "seed", "prompt_embeds",
                "negative_prompt_embeds", "latents", "output_type", "timesteps", "guidance", "context_windows",
                "extend", "extend_frames", "control_video", "mask", "reference_images", "conditioning_scale",
                "outpaint") + ANIMATE_OPTIONS
REQUEST_KEYS = REQUEST_KEYS + tuple(key for key in S2V_OPTIONS if key not in REQUEST_KEYS)
# Options a model folder's wanx-defaults.json may set, under the same keywords.
OWN_KEYS = ("num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_low", "boundary", "shift", "sampler")


class RequestError(ValueError):
    """A request the pipeline refuses, with the argument to change (a pipeline keyword such
    as "num_frames"), so that each face can point at its own field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know of a model, from a built pipeline or from its files."""

    model_type: str
    experts: int = 1  # 2: Wan2.2 A14B
    clip: bool = True  # False: a Wan2.2 I2V DiT (no CLIP; the shared negative prompt, no 480P shift)
    latent: tuple[int, int, int] | None = None  # its VAE's channels and strides; None: the task's own
    defaults: Mapping = field(default_factory=dict)  # the folder's wanx-defaults.json
    has_text_encoder: bool = True
    has_image_encoder: bool = True
    layers: int | None = None  # DiT blocks (the range of skip-layer guidance's layers); None: not checked


@dataclass
class Plan:
    """A validated request: everything decided before any heavy work."""

    spec: TaskSpec
    height: int
    width: int
    num_frames: int
    steps: int
    shift: float
    guidance: float
    seed: int
    negative_prompt: str | None
    sampler: str = "unipc"
    # Wan2.2 A14B: the low-noise expert's guidance, and where it takes over (share of 1000)
    guidance_low: float | None = None
    boundary: float | None = None
    image: Tensor | None = None  # [3, H, W] in [-1, 1]
    last_image: Tensor | None = None
    video: Tensor | None = None  # [3, F, H, W] in [-1, 1]
    # VACE: the mask over video [1, F, H, W] in [0, 1] (1: make), the reference images [3, H, W]
    # each, and the hints' scale (one, or one per VACE layer)
    mask: Tensor | None = None
    reference_images: list[Tensor] | None = None
    control_scale: float | tuple[float, ...] = 1.0
    # latent frames in front of the video's (VACE: one per reference image), dropped before decoding
    lead_frames: int = 0
    strength: float = 0.8  # video-to-video
    # latent geometry of the model's VAE: channels, temporal and spatial stride
    latent: tuple[int, int, int] = (16, 4, 8)
    # an explicit denoising step list (0..1000, before the shift) instead of the sampler's grid;
    # steps is its length
    timesteps: tuple[float, ...] | None = None

    # a guidance variant or schedule (wanx.guidance: CFG, CFGZeroStar, APG, SLG, NAG); None: plain CFG
    guider: object | None = None
    # context windows over a long video (windows.Windows, in latent frames); None: the DiT sees it whole
    windows: object | None = None
    # continuation: the video to continue (pipeline.extend.Extension); num_frames is then the
    # clip the DiT makes, the overlap included
    extend: object | None = None
    # Wan2.2-Animate: its inputs and clips (conditioning.animate.AnimateInputs); num_frames is a clip's.
    # Not compared: two plans of the same request read the frames into two objects
    animate: object | None = field(default=None, compare=False)
    # Wan-Animate-2: its inputs and segments (conditioning.animate2.Animate2Inputs); num_frames is a segment's
    animate2: object | None = field(default=None, compare=False)
    # the task's official prompt, when none was given (Animate's)
    prompt: str | None = None
    # a sound track the output carries (S2V: the input audio): a path or (samples, rate).
    # Not compared, as the inputs read: two plans of the same request read them into two objects
    soundtrack: object | None = field(default=None, compare=False)
    # Wan2.2-S2V: its inputs and clips (conditioning.s2v.S2VInputs); num_frames is a clip's
    s2v: object | None = field(default=None, compare=False)

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def fps(self) -> int:
        return self.extend.fps if self.extend is not None else self.spec.fps

    def latent_shape(self) -> tuple[int, int, int, int]:
        """`(C, F', H', W')` of this request's latents."""
        channels, temporal, spatial = self.latent
        return (channels, self.lead_frames + (self.num_frames - 1) // temporal + 1, self.height // spatial,
                self.width // spatial)


def plan_request(model_type: str, prompt=None, negative_prompt=None, *, names: Mapping[str, str] | None = None,
                 model_defaults: Mapping | None = None, experts: int = 1, clip: bool = True, vae_config=None,
                 has_text_encoder: bool = True, has_image_encoder: bool = True, layers: int | None = None,
                 **request) -> Plan:
    """Validate a request for a `model_type` DiT (reading its image/video inputs) and resolve
    the defaults, before any weight is loaded or any heavy work starts. request: the keywords
    of `WanPipeline.__call__` (image, num_frames, ...).

    experts: 2 for Wan2.2 A14B. clip: False for a Wan2.2 I2V DiT. vae_config: the model's VAE
    config (latent channels and strides); default the one the task is released with.
    model_defaults: the model folder's own settings (`wanx-defaults.json`), taken for every
    option left unset before the official defaults of the task. layers: the DiT's blocks (checks
    skip-layer guidance's layers)."""
    latent = None if vae_config is None else (vae_config.z_dim, vae_config.temporal_stride, vae_config.spatial_stride)
    model = ModelFacts(model_type, experts, clip, latent, model_defaults or {}, has_text_encoder, has_image_encoder,
                       layers)
    return make_plan(model, prompt, negative_prompt, request, names or {})


def make_plan(model: ModelFacts, prompt, negative_prompt, request: Mapping, names: Mapping[str, str]) -> Plan:
    """The stages in their order (a request is refused at the first that finds it wrong): the
    request with the folder's own settings, each value's check, the task, the task's defaults,
    the guidance, the inputs read, then the checks of the whole."""

    def name(arg: str) -> str:
        return names.get(arg, arg)

    given, negative_prompt, frames_given = _read_request(model, negative_prompt, request)
    scales = _check_each_value(model, prompt, given, name, bool(names))
    spec = _choose_spec(model, given, name)
    plan = _task_defaults(model, spec, prompt, negative_prompt, given)
    plan.guider = _check_guidance(model, plan, given["guidance"], scales, negative_prompt, given, name)
    _read_inputs(plan, given, request, name, frames_given)
    _check_whole(plan, prompt, given, name)
    return plan


def _read_request(model: ModelFacts, negative_prompt, request: Mapping) -> tuple[dict, object, bool]:
    """Every request keyword (None when not given), those left unset taken from the model
    folder's own settings. -> (given, the negative prompt, whether num_frames was given)."""
    unknown = set(request) - set(REQUEST_KEYS)
    if unknown:
        raise TypeError(f"unknown request keyword(s): {', '.join(sorted(unknown))}")
    given = {key: request.get(key) for key in REQUEST_KEYS}
    own = model.defaults
    if negative_prompt is None:
        negative_prompt = own.get("negative_prompt")
    if given["width"] is None and given["height"] is None:
        given["width"], given["height"] = own.get("width"), own.get("height")
    frames_given = given["num_frames"] is not None  # video-to-video: else the input's count, up to the default
    for key in OWN_KEYS:
        if given[key] is None and not (key == "num_inference_steps" and given["timesteps"] is not None):
            given[key] = own.get(key)  # a step list is the step count: the folder's count does not apply
    given["sampler"] = given["sampler"] or "unipc"
    if given["output_type"] is None:
        given["output_type"] = "video"
    return given, negative_prompt, frames_given


def _check_each_value(model: ModelFacts, prompt, given: dict, name, face: bool) -> list | tuple | None:
    """`_check_values` on the request; a list of guidance scales (one per step) checked one by
    one, and given["guidance_scale"] set to their largest. -> that list, or None."""
    scales = given["guidance_scale"]  # a list: a guidance scale per step
    if isinstance(scales, (list, tuple)):
        given["guidance_scale"] = max(scales, default=None)  # the checks of one scale, on each
        for value in scales:
            _check_values(model, prompt, {**given, "guidance_scale": value}, name, face)
    else:
        scales = None
    _check_values(model, prompt, given, name, face)
    return scales


def _choose_spec(model: ModelFacts, given: dict, name) -> TaskSpec:
    """The task, from the model and the inputs given (a VACE control video is the request's
    video, a continued video's last frame an I2V model's image), with what it needs checked."""
    taken = set().union(*(spec.takes for spec in model_tasks(model.model_type, model.experts)))
    for arg in TASK_OPTIONS:  # what only some models take (VACE's), given to one that does not
        if given[arg] is not None and arg not in taken:
            raise RequestError(arg, f"{name(arg)} needs {INPUT_NEEDS[arg]}; this is "
                                    f"{MODEL_NAMES.get(model.model_type, f'a {model.model_type} model')}")
    if given["control_video"] is not None:  # the request's name for a VACE model's video
        if given["video"] is not None:
            raise RequestError("control_video", f"give {name('control_video')} or {name('video')}, not both")
        given["video"] = given["control_video"]
    inputs = {arg for arg in ("image", "last_image", "video") if given[arg] is not None}
    if given["extend"] is not None:  # the old video's last frame is an I2V/FLF2V model's image
        from .extend import check_inputs

        needs_image = all("image" in spec.needs for spec in model_tasks(model.model_type, model.experts))
        check_inputs(given, needs_image, name)
        inputs |= {"image"} if needs_image else set()
    elif given["extend_frames"] is not None:
        raise RequestError("extend_frames", f"{name('extend_frames')} is the overlap of {name('extend')}: "
                                            "give that too")
    try:
        spec = choose_task(model.model_type, model.experts, inputs, name)
    except TaskError as err:
        raise RequestError(err.field, str(err)) from None
    if spec.needs_image_encoder and not model.clip:  # a Wan2.2 I2V DiT alone: Wan2.2's negative prompt, no 480P rule
        spec = dataclasses.replace(spec, needs_image_encoder=False, shift_480p=None, negative_prompt=NEGATIVE_PROMPT)
    if spec.needs_image_encoder and not model.has_image_encoder:
        raise ValueError(f"{spec.task} needs an image encoder (CLIP) in the pipeline")
    return spec


def _task_defaults(model: ModelFacts, spec: TaskSpec, prompt, negative_prompt, given: dict) -> Plan:
    """The plan of the request's settings, each one unset taken from the task's official
    defaults (the inputs not read yet)."""
    height, width = given["height"], given["width"]
    if height is None or width is None:
        height, width = height or spec.height, width or spec.width
    guidance = given["guidance_scale"]
    steps = given["num_inference_steps"] if given["num_inference_steps"] is not None else spec.steps
    plan = Plan(spec=spec, height=height, width=width, num_frames=given["num_frames"] or spec.num_frames,
                steps=len(given["timesteps"]) if given["timesteps"] is not None else int(steps),
                shift=float(given["shift"] if given["shift"] is not None else spec.shift),
                guidance=float(guidance if guidance is not None else spec.guidance),
                seed=int(given["seed"]) if given["seed"] is not None else random.randint(0, 2**31 - 1),
                negative_prompt=None, sampler=given["sampler"],
                strength=given["strength"] if given["strength"] is not None else 0.8,
                latent=model.latent or spec.latent, timesteps=given["timesteps"])
    if prompt is None and given["prompt_embeds"] is None:
        plan.prompt = spec.prompt  # the official prompt of a task that has one (a task without was refused above)
    if spec.experts == 2:  # one guidance given applies to both experts, as the official --sample_guide_scale
        low = given["guidance_scale_low"]
        plan.guidance_low = float(low if low is not None else guidance if guidance is not None else spec.guidance_low)
        plan.boundary = float(given["boundary"] if given["boundary"] is not None else spec.boundary)
    if given["negative_prompt_embeds"] is None and (plan.guidance != 1.0 or plan.guidance_low not in (None, 1.0)):
        # "" is a prompt too: the empty text
        plan.negative_prompt = negative_prompt if negative_prompt is not None else spec.negative_prompt
    return plan


def _read_inputs(plan: Plan, given: dict, request: Mapping, name, frames_given: bool) -> None:
    """The inputs read and sized into the plan by the task's conditioning (a continued video
    first: the output takes its size and rate)."""
    from .conditioning import conditioning_for

    height, width = plan.height, plan.width  # as asked, before an input's aspect ratio sets them
    area = height * width
    extending = given["extend"] is not None
    if extending:  # the output takes the old video's size and rate
        from .extend import read_extension

        read_extension(plan, given, name, size=(request.get("width"), request.get("height")),
                       frames=request.get("num_frames"))
        area = plan.height * plan.width
    conditioning_for(plan.spec, extend=extending).read(plan, given, area=area, frames_given=frames_given,
                                                       shift_given=given["shift"] is not None, name=name)
    if min(plan.height, plan.width) < 16:
        raise RequestError("height", f"the input's aspect ratio leaves a side under 16 pixels at {width}x{height}; "
                                     f"give a larger {name('height')}")


def _check_whole(plan: Plan, prompt, given: dict, name) -> None:
    """What holds only of the options together: context windows over the video (and what
    needs them: a list of prompts; what they exclude: APG's momentum), latents of the plan's shape."""
    from .windows import plan_windows

    plan.windows = plan_windows(given["context_windows"], plan.num_frames, plan.latent[1], name)
    if isinstance(prompt, (list, tuple)):  # prompts over time: each window reads the one for where it is
        if plan.windows is None:
            raise RequestError("prompt", f"a list of prompts (one per stretch of the video) needs context windows: "
                                         f"give {name('context_frames')} shorter than the video")
        if not prompt or not all(isinstance(p, str) and p.strip() for p in prompt):
            raise RequestError("prompt", f"{name('prompt')}: a list of prompts must hold non-empty strings")
        if given["prompt_embeds"] is not None:
            raise RequestError("prompt", "give a list of prompts or prompt_embeds, not both")
    if plan.windows is not None and getattr(plan.guider, "momentum", None) is not None:
        raise RequestError("apg_momentum", f"{name('apg_momentum')} carries one running sum over the whole video; "
                                           f"with context windows leave it unset")
    latents = given["latents"]
    if latents is not None and latents.numel() != math.prod(plan.latent_shape()):
        raise ValueError(f"latents must have shape [1, {', '.join(map(str, plan.latent_shape()))}], "
                         f"got {tuple(latents.shape)}")


def _check_values(model: ModelFacts, prompt, given: dict, name, face: bool) -> None:
    """Each option on its own: present where needed, of the right range and size multiple."""
    if prompt is None and given["prompt_embeds"] is None and default_task(model.model_type, model.experts).prompt is None:
        raise RequestError("prompt", f"give {name('prompt')}" + ("" if face else " (or prompt_embeds)"))
    if prompt is not None and given["prompt_embeds"] is None and not model.has_text_encoder:
        raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
    if given["sampler"] not in SAMPLERS:
        raise RequestError("sampler", f"unknown {name('sampler')} {given['sampler']!r}; choose one of "
                                      f"{', '.join(SAMPLERS)}")
    if given["output_type"] not in ("video", "latents"):
        raise ValueError(f"output_type must be 'video' or 'latents', got {given['output_type']!r}")
    family = default_task(model.model_type, model.experts)  # its rows share the size rule
    multiple = family.multiple
    for arg in ("width", "height"):
        value = given[arg]
        if value is None:
            continue
        if value <= 0:
            raise RequestError(arg, f"{name(arg)} {value} must be positive (a multiple of {multiple}, e.g. "
                                    f"{family.example_size})")
        if value % multiple:
            nearest = f"{multiple}" if value < multiple else \
                f"{value // multiple * multiple} or {(value // multiple + 1) * multiple}"
            raise RequestError(arg, f"{name(arg)} {value} is not a multiple of {multiple}; nearest valid: {nearest} "
                                    f"({family.trained_at})")
    frames = given["num_frames"]
    if frames is not None and family.frames_rule == "4k":  # one clip's frames (S2V's infer_frames)
        if frames < 4 or frames % 4:
            raise RequestError("num_frames", f"{name('num_frames')} {frames} is one clip's frames here: a multiple "
                                             f"of 4 (e.g. {max(4, frames // 4 * 4)}; the official 80 or 48)")
    elif frames is not None and not frames_ok(frames) and given["extend"] is None:  # extend: the new frames
        low = frames_at_most(frames)
        raise RequestError("num_frames", f"{name('num_frames')} {frames} must be 4k+1 (e.g. {low} or {low + 4})")
    steps = given["num_inference_steps"]
    if steps is not None and steps < 1:
        raise RequestError("num_inference_steps", f"{name('num_inference_steps')} must be >= 1, got {steps}")
    if given["timesteps"] is not None:
        try:
            given["timesteps"] = check_timesteps(given["timesteps"])
        except ValueError as err:
            raise RequestError("timesteps", f"{name('timesteps')} {err}") from None
        count = len(given["timesteps"])
        if steps is not None and steps != count:
            raise RequestError("num_inference_steps", f"{name('num_inference_steps')} {steps} disagrees with the "
                                                      f"{count} {name('timesteps')}: give one of them (the step "
                                                      "list sets the step count)")
    for arg in ("guidance_scale", "guidance_scale_low"):
        value = given[arg]
        if value is not None and not GUIDANCE_RANGE[0] <= value <= GUIDANCE_RANGE[1]:
            raise RequestError(arg, f"{name(arg)} must be in [{GUIDANCE_RANGE[0]:g}, {GUIDANCE_RANGE[1]:g}] "
                                    f"(1 turns guidance off; the official default is 5), got {value:g}")
    if model.experts != 2 and (given["guidance_scale_low"] is not None or given["boundary"] is not None):
        arg = "guidance_scale_low" if given["guidance_scale_low"] is not None else "boundary"
        raise RequestError(arg, f"{name(arg)} is for a model with two experts (Wan2.2 A14B, e.g. "
                                "Wan-AI/Wan2.2-T2V-A14B); this one has one DiT")
    boundary = given["boundary"]
    if boundary is not None and not 0 <= boundary <= 1:
        raise RequestError("boundary", f"{name('boundary')} is a share of the 1000 training timesteps, in [0, 1] "
                                       f"(0.875 for T2V-A14B, 0.9 for I2V-A14B), got {boundary:g}")
    shift = given["shift"]
    if shift is not None and shift <= 0:
        raise RequestError("shift", f"{name('shift')} must be positive, got {shift:g}")
    seed = given["seed"]
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"{name('seed')} must be between 0 and {MAX_SEED} (2**64 - 1), got {seed}")


def _check_guidance(model: ModelFacts, plan: Plan, strategy, scales, negative_prompt, given: dict, name):
    """A guidance variant or schedule (`wanx.guidance`) checked against the request: its
    settings' ranges, its steps within the request's, its layers within the DiT's, a negative
    prompt for NAG. Returns the strategy, with the per-step scales when a list was given."""
    from .. import guidance as g

    if strategy is not None and not isinstance(strategy, g.CFG):
        raise TypeError(f"guidance must be a number or a wanx.guidance strategy (CFG, CFGZeroStar, APG, SLG, NAG), "
                        f"got {type(strategy).__name__}")
    if scales is not None:
        if len(scales) != plan.steps:
            raise RequestError("guidance_scale", f"{name('guidance_scale')} has {len(scales)} values, one per step: "
                                                 f"give {plan.steps} (the steps) or one number")
        strategy = copy.copy(strategy) if strategy is not None else g.CFG()
        strategy.scales = tuple(float(v) for v in scales)
    if strategy is None:
        return None

    def refuse(field: str, message: str):
        raise RequestError(field, f"{name(field)} {message}")

    if strategy.cfg_steps is not None and not 0 <= strategy.cfg_steps <= plan.steps:
        refuse("cfg_steps", f"must be between 0 and the {plan.steps} steps, got {strategy.cfg_steps}")
    if isinstance(strategy, g.CFGZeroStar) and not 0 <= strategy.zero_init_steps < plan.steps:
        refuse("cfg_zero_star", f"zero-init steps must be in [0, {plan.steps}), got {strategy.zero_init_steps}")
    if isinstance(strategy, g.APG):
        if not math.isfinite(strategy.eta):
            refuse("apg_eta", f"must be a finite number, got {strategy.eta}")
        if not strategy.norm_threshold >= 0:
            refuse("apg_norm_threshold", f"must be >= 0 (0: no cap), got {strategy.norm_threshold}")
        if strategy.momentum is not None and not -1 < strategy.momentum < 1:
            refuse("apg_momentum", f"must be in (-1, 1) (the paper uses -0.5), got {strategy.momentum}")
    if isinstance(strategy, g.SLG):
        layers = model.layers
        if not strategy.layers:
            refuse("slg_layers", "names no block: give one or more, e.g. 9 or 9,10")
        bad = [i for i in strategy.layers if i < 0 or (layers is not None and i >= layers)]
        if bad:
            refuse("slg_layers", f"{bad[0]} is not a block of this DiT: blocks are 0..{(layers or 1) - 1}")
        if not 0 <= strategy.start_at < 1:
            refuse("slg_start", f"is a fraction of the steps in [0, 1), got {strategy.start_at}")
        if not strategy.start_at < strategy.end_at <= 1:
            refuse("slg_end", f"is a fraction of the steps in ({strategy.start_at}, 1], got {strategy.end_at}")
    if isinstance(strategy, g.NAG):
        if not strategy.scale >= 1:
            refuse("nag_scale", f"must be >= 1 (1: no effect; WanVideoWrapper's default 11), got {strategy.scale}")
        if not strategy.tau > 0:
            refuse("nag_tau", f"must be > 0 (default 2.5), got {strategy.tau}")
        if not 0 <= strategy.alpha <= 1:
            refuse("nag_alpha", f"must be in [0, 1] (default 0.25), got {strategy.alpha}")
        if negative_prompt is None and given["negative_prompt_embeds"] is None:
            refuse("nag_scale", f"guides away from a negative prompt: give {name('negative_prompt')}")
        if given["negative_prompt_embeds"] is None:
            plan.negative_prompt = negative_prompt
    return strategy
