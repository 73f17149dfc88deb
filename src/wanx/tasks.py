"""The task table: one frozen row per task of each model family, with everything wanx knows
about it as data: which DiT it runs on, the inputs it needs and takes, the official defaults
(size, frames, fps, steps, shift and its 480P rule, guidance per expert, boundary, negative
prompt), the size multiple and the conditioning that prepares its model inputs
(`wanx.pipeline.conditioning`).

The pipeline chooses a row from the model and the inputs given (`choose_task`); the CLI's
help, the server's UI placeholders and its API description read the defaults from here. A new
task is a row here plus a conditioning file. Plain data: no torch, so `wanx --help` stays
instant.

Sources: the official wan/configs (`wan_t2v_1_3B.py`, `wan_i2v_14B.py`, `wan_flf2v_14B.py`,
`wan_t2v_A14B.py`, `wan_i2v_A14B.py`, `wan_ti2v_5B.py`) and generate.py's per-task defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

# Official negative prompts (wan/configs): shared, I2V adds 镜头晃动 (camera shake), FLF2V also 镜头切换 (cut).
# Wan2.2 uses the shared one for every task.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走"
)
AREA_480P = 832 * 480  # I2V at or below this area samples with shift 3 (official generate.py)


@dataclass(frozen=True)
class TaskSpec:
    """One task of one model family. Inputs are pipeline keywords (`image`, `last_image`, `video`)."""

    name: str  # the row's key, e.g. "i2v" or "i2v-A14B"
    task: str  # what the video's metadata and the conditioning class call it: t2v, i2v, flf2v, v2v, ti2v
    title: str  # in words: the server UI's tab, help texts
    model_type: str  # the DiT it runs on (DiTConfig.model_type)
    experts: int = 1  # 2: Wan2.2 A14B's high- and low-noise DiTs
    needs: tuple[str, ...] = ()  # inputs it cannot run without
    takes: tuple[str, ...] = ()  # every input it reads (needs included)
    steps: int = 50
    shift: float = 5.0
    shift_480p: float | None = None  # the shift at or below 832x480 (Wan2.1 I2V with CLIP: 3.0)
    guidance: float = 5.0  # with two experts: the high-noise expert's
    guidance_low: float | None = None  # the low-noise expert's
    boundary: float | None = None  # where the low-noise expert takes over, a share of 1000 timesteps
    negative_prompt: str = NEGATIVE_PROMPT
    width: int = 832
    height: int = 480
    num_frames: int = 81
    fps: int = 16
    multiple: int = 16  # sizes in multiples of this: the VAE's spatial stride x the 2x2 patch
    latent: tuple[int, int, int] = (16, 4, 8)  # the VAE it is released with: channels, temporal, spatial stride
    trained_at: str = "Wan2.1 is trained at 832x480 and 1280x720"
    needs_image_encoder: bool = False  # Wan2.1 I2V/FLF2V read CLIP tokens of the image(s)
    # "4k+1": num_frames is the video's; "4k": one clip's frames, a multiple of 4 (S2V's infer_frames)
    frames_rule: str = "4k+1"
    prompt: str | None = None  # the official prompt when none is given (Animate's); None: a prompt is needed
    label: str = ""  # the row in help texts; default its name in capitals (I2V-A14B)
    # the module holding its conditioning class: a file of wanx/pipeline/conditioning/, or a
    # dotted module path; default the task's name
    conditioning: str = ""

    def __post_init__(self):
        if not self.conditioning:
            object.__setattr__(self, "conditioning", self.task)

    @property
    def short(self) -> str:
        return self.label or self.name.upper()

    @property
    def example_size(self) -> str:
        return f"{self.width}x{self.height}"


_I2V_NEGATIVE = "镜头晃动，" + NEGATIVE_PROMPT
# Inputs and settings only some models take (VACE's, Animate's): a request giving one to another model is refused.
VACE_OPTIONS = ("control_video", "mask", "reference_images", "conditioning_scale", "outpaint")
# Wan2.2-Animate: the official preprocessed folder, or its files one by one (the reference
# image is `image`), replacement mode, and the frames each clip carries from the last
ANIMATE_OPTIONS = ("animate_inputs", "pose_video", "face_video", "background_video", "mask_video", "replace",
                   "refert_num")
TASK_OPTIONS = VACE_OPTIONS + ANIMATE_OPTIONS
_A14B = dict(experts=2, steps=40)
# Wan2.2-S2V: the audio it follows (a file any format PyAV decodes), a pose video (optional),
# at most this many clips (default: as many as the audio gives), the reference image as the
# first frame (the official --start_from_ref)
S2V_OPTIONS = ("audio", "pose_video", "num_clips", "start_from_ref")
TASK_OPTIONS = TASK_OPTIONS + tuple(arg for arg in S2V_OPTIONS if arg not in TASK_OPTIONS)
# The official S2V negative prompt (wan/configs/wan_s2v_14B.py)
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，"
    "畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("t2v", "t2v", "Text to video", "t2v"),
    TaskSpec("v2v", "v2v", "Video to video", "t2v", needs=("video",), takes=("video",)),
    TaskSpec("i2v", "i2v", "Image to video", "i2v", needs=("image",), takes=("image",), steps=40, shift_480p=3.0,
             negative_prompt=_I2V_NEGATIVE, needs_image_encoder=True),
    TaskSpec("flf2v", "flf2v", "First and last frame", "flf2v", needs=("image", "last_image"),
             takes=("image", "last_image"), shift=16.0, guidance=5.5, negative_prompt="镜头切换，" + _I2V_NEGATIVE,
             needs_image_encoder=True, conditioning="i2v"),
    # Wan2.2 A14B: guidance per expert, high noise first here (the official tuple is (low, high));
    # no 480P shift for I2V.
    TaskSpec("t2v-A14B", "t2v", "Text to video", "t2v", shift=12.0, guidance=4.0, guidance_low=3.0, boundary=0.875,
             **_A14B),
    TaskSpec("v2v-A14B", "v2v", "Video to video", "t2v", needs=("video",), takes=("video",), shift=12.0,
             guidance=4.0, guidance_low=3.0, boundary=0.875, **_A14B),
    TaskSpec("i2v-A14B", "i2v", "Image to video", "i2v", needs=("image",), takes=("image",), guidance=3.5,
             guidance_low=3.5, boundary=0.900, **_A14B),
    # Wan2.2 TI2V-5B: one model for text and image, 1280x704 (the area with an image), 121 frames
    # at 24 fps, on the Wan2.2 VAE (48 channels, 16x): sizes in multiples of 32.
    TaskSpec("ti2v", "ti2v", "Text (and image) to video", "ti2v", takes=("image",), width=1280, height=704,
             num_frames=121, fps=24, multiple=32, latent=(48, 4, 16), trained_at="Wan2.2 TI2V-5B is trained at 1280x704",
             label="TI2V-5B"),
    # Wan2.1 VACE: one row for every use (control video, inpaint, outpaint, first/last frame,
    # reference images; text alone: grey frames all to make). Shift 16 as the official CLI's
    # for vace; 1.3B is trained at 832x480 and 480x832 only.
    TaskSpec("vace", "vace", "VACE: control video, mask, reference images", "vace",
             takes=("image", "last_image", "video") + VACE_OPTIONS, shift=16.0,
             trained_at="Wan2.1 VACE-1.3B is trained at 832x480 and 480x832, VACE-14B also at 1280x720"),
    # Wan2.2 VACE-Fun A14B (alibaba-pai): VACE trained on Wan2.2 T2V-A14B's two experts, so that
    # model's sampling (shift 12, guidance 4 / 3, boundary 0.875, 40 steps); 81 frames at 16 fps.
    TaskSpec("vace-A14B", "vace", "VACE: control video, mask, reference images", "vace",
             takes=("image", "last_image", "video") + VACE_OPTIONS, shift=12.0, guidance=4.0, guidance_low=3.0,
             boundary=0.875, label="VACE-Fun A14B",
             trained_at="Wan2.2 VACE-Fun A14B is trained at 512, 768 and 1024 pixel areas", **_A14B),
    # Wan2.2-Animate-14B (wan/configs/wan_animate_14B.py, WanAnimate.generate): the video made
    # clip after clip of 77 frames at 30 fps, sized as the preprocessed pose video, 20 steps,
    # shift 5, no guidance (1; above 1 the unconditional branch sees a blank face), CLIP tokens
    # of the reference image, and the official prompt when none is given. The sampler is
    # generate.py's default, unipc (WanAnimate.generate's own default is dpm++).
    TaskSpec("animate", "animate", "Animate: a character driven by a pose and face video", "animate",
             takes=("image",) + ANIMATE_OPTIONS, steps=20, shift=5.0, guidance=1.0, num_frames=77, fps=30,
             needs_image_encoder=True, prompt="视频中的人在做动作", label="Animate-14B",
             trained_at="the output takes the preprocessed pose video's size"),
    # Wan-Animate-2-14B (diffusers' modular WanAnimate2Blocks): the reference image's character
    # driven by a plain video, segment after segment of 81 frames at 24 fps carrying one frame;
    # the size is the image's aspect ratio within 800x640; CFG 3 at 40 steps, the negative
    # prompt "" (diffusers' defaults). The distilled weights (same layout) sample with
    # guidance 1 and 10 steps: give them (docs/animate.md). Shift 5 and unipc are wanx's choice:
    # the release's scheduler config is not in the code read.
    TaskSpec("animate2", "animate2", "Animate-2: a reference character driven by a video", "animate2",
             needs=("image", "video"), takes=("image", "video"), steps=40, shift=5.0, guidance=3.0,
             negative_prompt="", width=640, height=800, num_frames=81, fps=24, needs_image_encoder=True,
             label="Animate-2-14B", trained_at="the output takes the reference image's aspect ratio"),
    # Wan2.2-S2V-14B (wan/configs/wan_s2v_14B.py, WanS2V.generate, generate.py): a reference image
    # and an audio, clip after clip of infer_frames (80, a multiple of 4; num_frames here) at 16
    # fps with 73 frames of motion memory, as many clips as the audio gives; the size is the
    # image's within 1280x720's area in multiples of 64 (get_size_less_than_area); 40 steps of
    # unipc (generate.py's default solver), shift 3, guidance 4.5.
    TaskSpec("s2v", "s2v", "Speech to video: an image and an audio", "s2v", needs=("image",),
             takes=("image",) + S2V_OPTIONS, steps=40, shift=3.0, guidance=4.5, negative_prompt=S2V_NEGATIVE_PROMPT,
             width=1280, height=720, num_frames=80, frames_rule="4k", label="S2V-14B",
             trained_at="the output takes the reference image's aspect ratio within this area, in multiples of 64"),
)}

INPUTS = ("image", "last_image", "video")
# What each model type is called, and what an input it cannot take would need instead.
MODEL_NAMES = {"t2v": "a T2V model", "i2v": "an I2V model", "flf2v": "an FLF2V model",
               "ti2v": "a TI2V model (text, or text and a first frame)", "vace": "a VACE model",
               "animate": "a Wan2.2 Animate model", "animate2": "a Wan-Animate-2 model"}
INPUT_NEEDS = {"image": "an I2V or FLF2V model (e.g. Wan-AI/Wan2.1-I2V-14B-480P)",
               "last_image": "an FLF2V model (Wan-AI/Wan2.1-FLF2V-14B-720P)",
               "video": "a T2V model (video-to-video)",
               **{arg: "a VACE model (e.g. Wan-AI/Wan2.1-VACE-1.3B)" for arg in VACE_OPTIONS},
               **{arg: "a Wan2.2 Animate model (Wan-AI/Wan2.2-Animate-14B)" for arg in ANIMATE_OPTIONS}}
INPUT_NEEDS.update({arg: "a Wan2.2 S2V model (Wan-AI/Wan2.2-S2V-14B)" for arg in S2V_OPTIONS})
INPUT_NEEDS["pose_video"] = "a Wan2.2 Animate or S2V model"
MODEL_NAMES["s2v"] = "a Wan2.2 S2V model"
INPUT_WORDS = {"image": "the first frame", "last_image": "the last frame", "video": "the input video",
               "control_video": "the control video", "mask": "the mask", "reference_images": "the reference image",
               "animate_inputs": "the preprocessed folder", "pose_video": "the pose video",
               "face_video": "the face video", "background_video": "the background video",
               "mask_video": "the mask video"}

# What an input is to a task that reads it otherwise (Animate-2's video drives its reference image).
TASK_INPUT_WORDS = {"animate2": {"image": "the reference image", "video": "the driving video"}}


def describe_default(model_type: str, experts: int, setting: str) -> str:
    """A setting's default for a model, in words: the model's own row's value, and where
    another of its rows or a rule differs (e.g. shift "5 (3 at 480P or below)")."""
    rows = model_tasks(model_type, experts)
    row = default_task(model_type, experts)
    if setting == "size":
        return row.example_size
    if setting == "guidance" and row.guidance_low is not None:
        return f"{row.guidance:g},{row.guidance_low:g}"
    text = f"{getattr(row, setting):g}"
    others = {f"{getattr(r, setting):g} for {r.title.lower()}" for r in rows if getattr(r, setting) != getattr(row, setting)}
    if setting == "shift" and row.shift_480p is not None:
        others.add(f"{row.shift_480p:g} at 480P or below")
    return text + (f" ({', '.join(sorted(others))})" if others else "")


def model_tasks(model_type: str, experts: int = 1) -> list[TaskSpec]:
    """The rows a model runs: its DiT type and number of experts."""
    return [spec for spec in TASKS.values() if spec.model_type == model_type and spec.experts == experts]


def default_task(model_type: str, experts: int = 1) -> TaskSpec:
    """The model's own row (what it does with text alone, or with its one kind of input)."""
    rows = model_tasks(model_type, experts)
    if not rows:
        raise ValueError(f"no task for a {model_type} model with {experts} expert(s)")
    return next((spec for spec in rows if spec.task == model_type), rows[0])


class TaskError(ValueError):
    """No task of the model fits the inputs; `field` is the input to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def choose_task(model_type: str, experts: int, given: set[str], name=lambda arg: arg) -> TaskSpec:
    """The row that needs no input missing from `given` and takes every input in it; else a
    TaskError naming the input to change. name: how the caller spells an input."""
    rows = model_tasks(model_type, experts)
    if not rows:
        raise TaskError("", f"no task for a {model_type} model with {experts} expert(s)")
    fitting = [spec for spec in rows if set(spec.needs) <= given <= set(spec.takes)]
    if fitting:  # the most specific: the one that uses the most of what was given
        return max(fitting, key=lambda spec: len(spec.needs))
    model = MODEL_NAMES.get(model_type, f"a {model_type} model")
    taken = set().union(*(spec.takes for spec in rows))
    for arg in INPUTS:
        if arg in given and arg not in taken:
            raise TaskError(arg, f"this is {model}: {name(arg)} needs {INPUT_NEEDS[arg]}")
    together = [arg for arg in INPUTS if arg in given]
    if not any(set(together) <= set(spec.takes) for spec in rows):
        first, *rest = together
        raise TaskError(first, f"give either {name(first)} or {'/'.join(map(name, rest))}, not both")
    missing = min((spec for spec in rows if given <= set(spec.takes)), key=lambda spec: len(set(spec.needs) - given))
    words = {**INPUT_WORDS, **TASK_INPUT_WORDS.get(missing.name, {})}
    wanted = " and ".join(f"{name(arg)} ({words[arg]})" for arg in missing.needs)
    raise TaskError(next(arg for arg in missing.needs if arg not in given), f"this is {model}: give {wanted}")


def describe_all(setting: str) -> str:
    """A setting's official defaults over the whole table, for help texts: the T2V row's value,
    then the rows that differ ("50; 40 for I2V, T2V-A14B, ..."). size is WIDTHxHEIGHT;
    guidance_low and boundary (two experts only) list their rows alone."""
    def value(spec: TaskSpec):
        return spec.example_size if setting == "size" else getattr(spec, setting)

    def text(v) -> str:
        return v if isinstance(v, str) else f"{v:g}"

    rows = [spec for spec in TASKS.values() if value(spec) is not None]
    base = value(TASKS["t2v"])
    others: dict[str, list[str]] = {}
    for spec in rows:
        if value(spec) != base:
            others.setdefault(text(value(spec)), []).append(spec.short)
    parts = [f"{v} for {', '.join(names)}" for v, names in others.items()]
    if setting == "shift":
        parts += [f"{spec.shift_480p:g} for {spec.short} at 480P or below" for spec in rows if spec.shift_480p]
    if base is None:
        return "; ".join(parts)
    return text(base) + (f"; {'; '.join(parts)}" if parts else "")
