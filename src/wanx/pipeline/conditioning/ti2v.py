"""Wan2.2 TI2V-5B: text-to-video, or with an image image-to-video in the same model. The
image is latent frame 0 itself: put in place before the first step and after every step, its
tokens at timestep 0 (official `textimage2video.i2v`). The output size is the official
`best_output_size` within the requested area, the image LANCZOS-resized and centre-cropped."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...video import to_pixels, to_unit
from .base import Conditioning, Run, image_tensor, read_input


class TextImageToVideo(Conditioning):
    task = "ti2v"

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        if given["image"] is None:
            return
        picture = read_input("image", image_tensor, given["image"])
        multiple = plan.spec.multiple
        plan.width, plan.height = best_output_size(picture.shape[2], picture.shape[1], multiple, multiple, area)
        plan.image = resize_and_crop(picture, plan.height, plan.width)

    def __init__(self, plan):
        super().__init__(plan)
        self.first: Tensor | None = None  # the image's latent frame [1, C, 1, H', W']

    def start(self, run: Run, noise: Tensor, sigmas: Tensor) -> Tensor:
        if self.plan.image is None:
            return noise
        with run.stage("image conditioning", "vae"):
            self.first = run.pipe.vae.encode(self.plan.image[:, None][None].to(run.device)).float()
        noise = noise.clone()
        noise[:, :, :1] = self.first  # official: latent = (1 - mask) * z + mask * noise
        return noise

    def timesteps(self, t: Tensor, shape, patch_size, frames: list[int] | None = None) -> Tensor:
        if self.first is None or (frames is not None and 0 not in frames):
            return t  # a context window without the image's frame: plain text-to-video
        return first_frame_timesteps(shape, patch_size, t, 1 if frames is None else [frames.index(0)])

    def fix(self, latents: Tensor) -> None:
        # Frame 0 is the image again after every step, in the tensor the sampler goes on from
        # (the official `latent = (1 - mask2) z + mask2 latent` after scheduler.step); UniPC's
        # corrector keeps its own pre-step copy, as the official scheduler's last_sample.
        if self.first is not None:
            latents[:, :, :1] = self.first

    def metadata(self) -> dict:
        return {"mode": "i2v" if self.plan.image is not None else "t2v"}


def first_frame_timesteps(shape, patch_size, t: Tensor, known: int | list[int] = 1) -> Tensor:
    """Per-token timesteps `[1, L]` for latents of `shape` [B, C, F, H, W]: 0 for the tokens of
    the known latent frames, t elsewhere. known: how many at the start (the image: 1;
    continuation: the overlap), or their positions (a context window holding them elsewhere).
    Official: channel 0 of the mask, subsampled by the patch (frames are patched one by one, pt = 1)."""
    _, _, f, h, w = shape
    pt, ph, pw = patch_size
    mask = torch.ones(f // pt, h // ph, w // pw, device=t.device)
    mask[slice(known) if isinstance(known, int) else list(known)] = 0
    return (mask * t.reshape(())).flatten()[None]


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """Official Wan2.2 `best_output_size`: the (width, height) in multiples of (dw, dh) within
    expected_area whose aspect ratio is nearest w/h, trying width first and height first.
    A side is at least one multiple (the official code divides by zero there instead)."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = max(dw, int(ow // dw * dw))
    oh1 = max(dh, int(expected_area / ow1 // dh * dh))
    ratio1 = ow1 / oh1
    oh2 = max(dh, int(oh // dh * dh))
    ow2 = max(dw, int(expected_area / oh2 // dw * dw))
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def resize_and_crop(image: Tensor, height: int, width: int) -> Tensor:
    """Official TI2V image preparation: PIL LANCZOS resize by max(ow/iw, oh/ih), centre crop to
    (width, height). `[3, H, W]` in [-1, 1] -> `[3, height, width]` in [-1, 1]."""
    from PIL import Image

    ih, iw = image.shape[1:]
    scale = max(width / iw, height / ih)
    picture = Image.fromarray(to_pixels(image[:, None])[0])
    picture = picture.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    left, top = (picture.width - width) // 2, (picture.height - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    return to_unit(np.asarray(picture))
