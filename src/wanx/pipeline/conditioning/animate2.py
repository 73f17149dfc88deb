"""Wan-Animate-2 (diffusers' modular `WanAnimate2Blocks` / `WanAnimate2DistilledBlocks`,
modular_pipelines/wan_animate_2): a reference image's character driven by a plain video, segment
after segment, each segment's driving frames read by a reference pass of the DiT.

Sizing (diffusers' image preprocess step): the output keeps the reference image's aspect ratio
within the requested area (800x640 by default), multiples of 16; the image and every driving
frame are letterboxed into it (PIL bicubic for the image, bilinear for the video, pasted at
((W - w) // 2, (H - h) // 2)). The driving video is read at the task's 24 fps (nearest frame)
and padded with its last frames reversed to whole segments of `num_frames` (81) overlapping by
one frame; the output is cut back to its length.

Per segment k (pixel frames [80k, 80k + 81) of the padded video):
- the reference pass (`mode="extract"`, a fresh `ReferenceCache`): x = the segment's latents D,
  y = [ones (4) | D], the text "人物动作的参考视频" (`prompt_ref`), CLIP tokens of the driving
  video's first frame; it only fills the cache;
- the denoising passes (`mode="cached"`): noise for 1 + 21 latent frames (the first is the
  reference image's slot), y = [ones | the reference image's latent] for that frame, then
  [mask | latents of the previous segment's last frame and zeros], marked known for that one
  frame (none for the first segment); CLIP tokens of the reference image. The unconditional
  branch (the negative prompt, "" by default) skips block 9, so guidance runs as two passes;
- the segment is decoded less the reference frame; a later segment drops the frame it carried.

Not restated: diffusers crops the output to the reference image's content inside the letterbox
(`crop_region`); here the output is the whole letterboxed frame (its size stays a multiple of
16, which video encoders want).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...video import Video, read_video
from .animate import _image
from .base import Conditioning, Held, Run, read_input
from .i2v import fold_mask

PROMPT_REF = "人物动作的参考视频"  # diffusers' `prompt_ref` default: the reference pass' text
CARRIED = 1  # diffusers' `prev_segment_conditioning_frames`: frames each segment carries from the last


def letterbox(image: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
    """diffusers' `WanAnimate2VideoProcessor._resize_and_fill`: uint8 `[h, w, 3]` scaled with its
    aspect ratio kept (PIL `resample`) and pasted on black at ((W - w) // 2, (H - h) // 2)."""
    from PIL import Image

    src = Image.fromarray(np.ascontiguousarray(image))
    if width / height < src.width / src.height:
        new_w, new_h = width, src.height * width // src.width
    else:
        new_w, new_h = src.width * height // src.height, height
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    out = Image.new("RGB", (width, height), color=0)
    out.paste(src.resize((new_w, new_h), resample=filters[resample]), box=((width - new_w) // 2, (height - new_h) // 2))
    return np.asarray(out)


def output_size(image_height: int, image_width: int, area: int, multiple: int) -> tuple[int, int]:
    """diffusers' image preprocess: the image's size rounded to multiples (its
    `get_default_height_width`), then that aspect ratio within `area`, floored to multiples."""
    image_area, aspect = image_width * image_height, image_height / image_width
    rounded_h = round(np.sqrt(image_area * aspect)) // multiple * multiple
    rounded_w = round(np.sqrt(image_area / aspect)) // multiple * multiple
    aspect = rounded_h / rounded_w
    return int(math.sqrt(area * aspect)) // multiple * multiple, int(math.sqrt(area / aspect)) // multiple * multiple


def frame_indices(count: int, video_fps: float, fps: float) -> list[int]:
    """diffusers' `get_frame_indices`: the nearest source frame of each output time."""
    times = np.arange(0, int(count / video_fps * fps)) / fps
    return np.clip(np.round(times * video_fps).astype(int), 0, count - 1).tolist()


def to_unit(frames: np.ndarray) -> Tensor:
    """uint8 `[n, H, W, 3]` -> `[3, n, H, W]` in [-1, 1], as diffusers' processor (float32 / 255, 2x - 1)."""
    array = frames.astype(np.float32) / 255.0
    return torch.from_numpy(2.0 * array - 1.0).permute(3, 0, 1, 2)


def _driving(value, fps: int) -> np.ndarray:
    """A path (read at `fps`, the nearest frame of each time), a `Video` (resampled from its fps
    as diffusers' `get_frame_indices`) or uint8 `[F, H, W, 3]` frames (taken as `fps`)."""
    if isinstance(value, (str, Path)):
        return read_video(value, fps=fps).frames
    if isinstance(value, Video):
        return value.frames[frame_indices(len(value.frames), value.fps, fps)]
    if isinstance(value, Tensor):
        if value.ndim != 4 or value.shape[0] != 3:
            raise ValueError(f"the driving video tensor must be [3, F, H, W] in [-1, 1], got {tuple(value.shape)}")
        value = ((value.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    array = np.asarray(value)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"the driving video's frames must be uint8 [F, H, W, 3], got {array.dtype} {array.shape}")
    return array


@dataclass
class Animate2Inputs:
    """What `Animate2.read` checked: the letterboxed driving frames (uint8, as given: converted a
    segment at a time), the letterboxed reference image, and the segments they make."""

    driving: np.ndarray  # uint8 [F, H, W, 3]
    reference: np.ndarray  # uint8 [H, W, 3]
    length: int  # the driving video's frames: the output's
    segment: int  # frames per segment (num_frames)
    segments: int
    indices: list[int]  # the padded frame order: every frame, then the last ones reversed

    def segment_frames(self, index: int) -> list[int]:
        start = index * (self.segment - CARRIED)
        return self.indices[start: start + self.segment]


class Animate2(Conditioning):
    task = "animate2"
    clip_after_clip = True  # one segment too: its frames past the video's length are cut
    batch_branches = False  # the unconditional branch skips a block: cond and uncond run as two passes

    def __init__(self, plan):
        super().__init__(plan)
        self.clips = plan.animate2.segments
        self.next = 0  # the segment `inputs` prepares
        self.carried: Tensor | None = None  # the previous segment's last decoded frames [3, m, H, W]
        self.made = 0
        self.shared: dict | None = None  # what every segment reads: made once
        self.cache = None

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        from ..plan import RequestError

        for key, flag, what in (("extend", "extend", "continues a video"),
                                ("context_windows", "context_frames", "splits the video into windows")):
            if given[key] is not None:
                raise RequestError(key, f"{name(flag)} {what}; Animate-2 makes its video segment after segment, "
                                        f"each carrying the last frame of the one before: leave {name(flag)} unset")
        if given["output_type"] == "latents":
            raise RequestError("output_type", "output_type='latents' is not available for Animate-2: each segment "
                                              "is decoded for the next")
        image = read_input("image", _image, given["image"])
        height, width = output_size(*image.shape[:2], area, plan.spec.multiple)
        if min(height, width) < plan.spec.multiple:
            raise RequestError("height", f"the reference image's aspect ratio leaves a side under "
                                         f"{plan.spec.multiple} pixels within {area} pixels; give a larger size")
        frames = read_input("video", lambda v: _driving(v, plan.fps), given["video"])
        length, segment = len(frames), plan.num_frames
        if segment <= CARRIED:
            raise RequestError("num_frames", f"{name('num_frames')} {segment} is a segment's length; it must be "
                                             f"above {CARRIED} (official 81)")
        step = segment - CARRIED
        rest = (length - CARRIED) % step if length > CARRIED else 0
        padding = step - rest if rest else 0
        if length <= CARRIED or padding > length:  # the padding reverses the video's own last frames
            raise RequestError("video", f"the driving video has {length} frame(s) at {plan.fps} fps; a segment of "
                                        f"{segment} needs at least {max(CARRIED + 1, (segment + 1) // 2)}: give a "
                                        f"longer video or a smaller {name('num_frames')}")
        indices = list(range(length)) + list(range(length - 1, length - 1 - padding, -1))
        driving = np.stack([letterbox(frame, height, width, "bilinear") for frame in frames])
        plan.height, plan.width = height, width
        plan.lead_frames = 1  # the reference image's latent frame, before the segment's
        plan.animate2 = Animate2Inputs(driving, letterbox(image, height, width, "bicubic"), length, segment,
                                       (len(indices) - CARRIED) // step, indices)

    def _shared(self, run: Run) -> dict:
        """The reference image's y frame and CLIP tokens, the driving video's first frame's CLIP
        tokens, and the reference pass' text: the same for every segment."""
        from ..pipeline import _pad_text

        pipe, inputs = run.pipe, self.plan.animate2
        if pipe.step_cache is not None:  # it would wrap the reference pass too, and skip it
            raise ValueError("a step cache (TeaCache/MagCache) does not apply to Animate-2: its reference pass "
                             "goes through the same blocks; leave the cache off")
        if pipe.text_encoder is None:
            raise ValueError("Animate-2's reference pass reads the text encoder's embedding of its reference prompt: "
                             "load the pipeline with its text encoder")
        reference = to_unit(inputs.reference[None])  # [3, 1, H, W]
        with run.stage("text encoding (reference prompt)", "t5"):
            encoded, lengths = pipe.text_encoder.encode([PROMPT_REF])
            context = _pad_text(encoded[:, : int(lengths.max())].to(run.device), pipe.dit.config.text_len)
        with run.stage("animate-2 conditioning (reference image)", "clip", "vae"):
            latents = run.encode(reference[None])  # [1, 16, 1, h, w]
            ones = torch.ones(1, pipe.vae.config.temporal_stride, *latents.shape[2:], device=latents.device)
            first = to_unit(inputs.driving[inputs.indices[:1]])[:, 0]
            return {"y": torch.cat([ones, latents], dim=1), "context": context,
                    "clip": pipe.image_encoder(reference[:, 0][None].to(run.device)),
                    "clip_driving": pipe.image_encoder(first[None].to(run.device))}

    @classmethod
    def held(cls, plan) -> Held:
        """The reference latent frame beside each clip's; a clip decoded whole; the video as long
        as the input."""
        return Held(extra_frames=plan.lead_frames, decoded_frames=plan.num_frames,
                    output_frames=plan.animate2.length)

    def inputs(self, run: Run) -> dict:
        inputs, index, pipe = self.plan.animate2, self.next, run.pipe
        if self.shared is None:
            self.shared = self._shared(run)
        shared = self.shared
        h, w = self.plan.height, self.plan.width
        s, st = pipe.vae.config.spatial_stride, pipe.vae.config.temporal_stride
        carried = 0 if index == 0 else CARRIED
        with run.stage(f"animate-2 conditioning (segment {index + 1})", "vae"):
            driving = run.encode(to_unit(inputs.driving[inputs.segment_frames(index)])[None])  # D [1, 16, T', h, w]
            pixels = torch.zeros(3, inputs.segment, h, w)
            if carried:
                pixels[:, :carried] = F.interpolate(self.carried[:, -carried:].float().cpu(), size=(h, w),
                                                    mode="bicubic")
            known = torch.zeros(1, inputs.segment, h // s, w // s)
            known[:, :carried] = 1
            y = torch.cat([fold_mask(known.to(run.device), st), run.encode(pixels[None])], dim=1)
        self.cache = pipe.dit.new_cache()
        with run.stage(f"reference pass (segment {index + 1})", "dit"):
            ones = torch.ones(1, st, *driving.shape[2:], device=driving.device)
            pipe.dit(driving, torch.ones(1, device=run.device), shared["context"], shared["clip_driving"],
                     torch.cat([ones, driving], dim=1), cache=self.cache, mode="extract")
        return {"clip_features": shared["clip"], "y": torch.cat([shared["y"], y], dim=2), "cache": self.cache,
                "mode": "cached"}

    def batch(self, inputs: dict, names: tuple[str, ...]) -> dict:
        """The unconditional branch runs without block 9 (`uncond=True`), as the release's."""
        out = super().batch(inputs, names)
        uncond = {branch.startswith("uncond") for branch in names}
        if len(uncond) > 1:
            raise ValueError("Animate-2's cond and uncond branches run different blocks: they cannot be one batch")
        out["uncond"] = uncond.pop()
        return out

    def finish_clip(self, run: Run, index: int, latents: Tensor) -> Tensor:
        """Decode the segment less the reference frame; keep its last frame for the next; a later
        segment drops the frame it carried; the last stops at the video's length."""
        inputs = self.plan.animate2
        self.cache.clear()  # each segment reads its own driving frames
        with run.stage(f"decoding (segment {index + 1})", "vae"):
            pixels = run.decode(latents[:, :, 1:].float())[0]  # [3, T, H, W]
        self.carried = pixels[:, -CARRIED:]
        new = pixels if index == 0 else pixels[:, CARRIED:]
        new = new[:, : inputs.length - self.made]
        self.made += new.shape[1]
        self.next = index + 1
        return new

    def metadata(self) -> dict:
        inputs = self.plan.animate2
        return {"animate2": {"segments": inputs.segments, "segment_frames": inputs.segment,
                             "carried_frames": CARRIED, "video_frames": inputs.length}}
