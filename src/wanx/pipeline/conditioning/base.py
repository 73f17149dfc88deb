"""The conditioning contract, and the inputs every task reads the same way."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...video import Video, read_image, read_video, to_unit


@dataclass(frozen=True)
class Held:
    """What one request holds at its peak beyond a plain video of `num_frames`, for the memory
    estimate (`memory.estimate.estimate`)."""

    extra_frames: float = 0.0  # latent frames' worth of DiT tokens beside the video's own
    decoded_frames: int | None = None  # frames one decode makes at once (None: the video's)
    output_frames: int | None = None  # frames of the whole video (None: num_frames)


@dataclass
class Run:
    """What a conditioning may use while a request runs: the pipeline's networks and device,
    and `stage`, which times a stage and brings the networks it names onto the device."""

    pipe: object
    progress: bool

    @property
    def device(self):
        return self.pipe.device

    @contextlib.contextmanager
    def stage(self, name: str, *networks: str):
        """Time a stage (one line on stderr with progress on), with `networks` placed for it."""
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for network in networks:
                stack.enter_context(self.pipe.placement.phase(network))
            yield
        if self.progress:
            print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)

    def say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr)

    def encode(self, video: Tensor) -> Tensor:
        """VAE latents of `[1, 3, F, H, W]` pixels in [-1, 1] (on the device, the VAE placed for it)."""
        with self.pipe.placement.phase("vae"):
            return self.pipe.vae.encode(video.to(self.device))

    def decode(self, latents: Tensor) -> Tensor:
        """Pixels `[1, 3, F, H, W]` in [-1, 1] of latents (the VAE placed for it): the clips of a
        clip-after-clip task are decoded whole, since the next clip reads their last frames."""
        with self.pipe.placement.phase("vae"):
            return self.pipe.vae.decode(latents.to(self.device))


class Conditioning:
    """Text alone: nothing to add. Every method's default is the plain text-to-video loop.

    A clip-after-clip task (Animate, S2V) sets `clips` above 1 at `read`: the pipeline then
    runs the loop once per clip (`inputs`, `schedule`, `clip_noise`, `start`, the steps), and
    hands each clip's latents to `finish_clip`, which decodes them, keeps what the next clip
    carries (its last frames) and returns the frames the clip adds to the video."""

    task = ""
    clips = 1
    # True: the clip loop even for one clip, since `finish_clip` shapes the video (Animate trims
    # its last clip to the input's length); False: the clip loop only when clips is above 1
    clip_after_clip = False
    # False: guidance never batches the cond and uncond branches (Animate-2's uncond pass skips a
    # block, so `batch` gets one branch at a time)
    batch_branches = True

    def __init__(self, plan):
        self.plan = plan

    @property
    def by_clips(self) -> bool:
        """Whether the pipeline runs the clip loop (`finish_clip` makes the frames)."""
        return self.clip_after_clip or self.clips > 1

    @classmethod
    def read(cls, plan, given: dict, *, area: int, frames_given: bool, shift_given: bool, name) -> None:
        """Read and check this task's inputs from `given` (the request's keywords) into `plan`,
        and size the output from them (within `area` pixels). name: how the caller spells an
        argument, for errors."""

    @classmethod
    def held(cls, plan) -> Held:
        """What a request of this task holds beyond a plain video, read from `plan` after
        `read`: by default the latent frames in front of the video's (VACE's reference images,
        Animate-2's reference)."""
        return Held(extra_frames=plan.lead_frames)

    def inputs(self, run: Run) -> dict[str, Tensor]:
        """Extra DiT inputs, batch 1 (expanded to the guidance batch)."""
        return {}

    def schedule(self, sigmas: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        return sigmas, timesteps

    def start(self, run: Run, noise: Tensor, sigmas: Tensor) -> Tensor:
        """The latents the loop starts from."""
        return noise

    def timesteps(self, t: Tensor, shape, patch_size, frames: list[int] | None = None) -> Tensor:
        """The DiT's timestep input for latents of `shape`: t `[1]` for every token by default.
        frames: the latent frames x holds, when a context window holds only some (None: all)."""
        return t

    def window(self, inputs: dict[str, Tensor], frames: list[int]) -> dict[str, Tensor]:
        """The DiT inputs of a context window holding latent `frames`: an input laid out over
        latent frames (`[B, C, F', H, W]`, I2V's y) is cut to them; the rest (CLIP tokens)
        is the same for every window."""
        return {key: value[:, :, frames] if isinstance(value, Tensor) and value.ndim == 5 else value
                for key, value in inputs.items()}

    def batch(self, inputs: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
        """The DiT inputs of a batch of guidance branches (`names`: "cond", "uncond", ...): the
        same inputs for each by default; a task whose unconditional branch sees other inputs
        (Animate's blank face video) overrides this."""
        return {key: value.expand(len(names), *value.shape[1:]) if isinstance(value, Tensor) else value
                for key, value in inputs.items()}

    def fix(self, latents: Tensor) -> None:
        """After each step, in place: frames the task holds to a known value."""

    def clip_noise(self, index: int, noise: Tensor, generator) -> Tensor:
        """The noise clip `index` starts from: the request's for the first, then more drawn from
        the same generator (Animate's official loop; S2V seeds each clip on its own)."""
        if index == 0:
            return noise
        return torch.randn(noise.shape[1:], generator=generator, device=noise.device, dtype=torch.float32)[None]

    def finish_clip(self, run: Run, index: int, latents: Tensor) -> Tensor:
        """Clip `index`'s denoised latents -> the frames it adds to the video `[3, n, H, W]` in
        [-1, 1]; the task keeps what the next clip carries. Only for `clips` above 1."""
        raise NotImplementedError(f"{type(self).__name__} runs one clip")

    def output_frames(self) -> tuple[np.ndarray | None, int]:
        """(frames that go before the generated ones, generated frames dropped at the start):
        continuation puts the old video first and drops the overlap it regenerated."""
        return None, 0

    def metadata(self) -> dict:
        return {}


def read_input(field: str, read, value):
    """An input file read for the plan; a file that is there but unusable names its field."""
    from ..plan import RequestError

    try:
        return read(value)
    except RequestError:
        raise
    except ValueError as err:
        raise RequestError(field, str(err)) from None


def image_tensor(image) -> Tensor:
    """A path, PIL image, uint8 `[H, W, 3]` array or `[3, H, W]` tensor in [-1, 1] -> tensor in [-1, 1]."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
        return image.float().cpu()
    if isinstance(image, (str, Path)):
        image = read_image(image)
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {array.shape}")
    return to_unit(array)


def video_frames(video, fps: int) -> Tensor:
    """A path, `Video`, uint8 `[F, H, W, 3]` array or `[3, F, H, W]` tensor -> `[3, F, H, W]` in [-1, 1]
    (files are read at `fps`)."""
    if isinstance(video, (str, Path)):
        video = read_video(video, fps=fps)
    if isinstance(video, Video):
        video = video.frames
    if isinstance(video, Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"video tensor must be [3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        return video.float().cpu()
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"video frames must be [F, H, W, 3] uint8, got shape {array.shape}")
    return to_unit(array)


def size_for_image(image: Tensor, max_area: int) -> tuple[int, int]:
    """The official I2V size: the image's aspect ratio within max_area, multiples of 16."""
    height, width = image.shape[1:]
    lat_h = round(math.sqrt(max_area * height / width) // 8 // 2 * 2)
    lat_w = round(math.sqrt(max_area * width / height) // 8 // 2 * 2)
    return lat_h * 8, lat_w * 8
