"""Image-to-video and first-last-frame-to-video (Wan2.1 I2V/FLF2V, Wan2.2 I2V-A14B): the DiT
reads y = [mask | VAE latents of the given frame(s) and zeros] beside the noise, and (Wan2.1)
CLIP tokens of the frame(s) through its image cross-attention. The output takes the first
frame's aspect ratio within the requested area."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...tasks import AREA_480P
from .base import Conditioning, Run, image_tensor, read_input, size_for_image


class ImageToVideo(Conditioning):
    task = "i2v"
    frames = ("image",)

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        plan.image = read_input("image", image_tensor, given["image"])
        plan.height, plan.width = size_for_image(plan.image, area)
        if not shift_given and plan.spec.shift_480p is not None and area <= AREA_480P:
            plan.shift = plan.spec.shift_480p  # the official 480P I2V shift
        if "last_image" in cls.frames:
            plan.last_image = read_input("last_image", image_tensor, given["last_image"])

    def inputs(self, run: Run) -> dict[str, Tensor]:
        plan, pipe = self.plan, run.pipe
        with run.stage("image conditioning", "clip", "vae"):
            return image_conditioning(pipe.image_encoder, pipe.vae, plan.image, plan.last_image, plan.height,
                                      plan.width, plan.num_frames, run.device)


class FirstLastFrameToVideo(ImageToVideo):
    task = "flf2v"
    frames = ("image", "last_image")


def image_conditioning(image_encoder, vae, image: Tensor, last_image: Tensor | None, h: int, w: int, n: int,
                       device) -> dict[str, Tensor]:
    """I2V/FLF2V inputs of the DiT: CLIP tokens of the given frame(s) `[1, 257|514, d]` (not for
    Wan2.2 I2V: image_encoder None), and y = [mask (4) | VAE latents of the frame(s) + zeros
    (16)] `[1, 20, F', h/8, w/8]`. image, last_image: `[3, H, W]` in [-1, 1] at any size (CLIP
    sees them as given). Also used by `wanx prepare` to cache the conditioning of I2V training clips."""
    images = [image] + ([last_image] if last_image is not None else [])
    clip = None
    if image_encoder is not None:
        clip = torch.cat([image_encoder(img[None].to(device)) for img in images], dim=1)

    first = F.interpolate(image[None], size=(h, w), mode="bicubic", align_corners=False)[0]
    frames = torch.zeros(3, n, h, w)
    frames[:, 0] = first
    if last_image is not None:
        frames[:, -1] = F.interpolate(crop_to_aspect(last_image, h / w)[None], size=(h, w),
                                      mode="bicubic", align_corners=False)[0]
    y = vae.encode(frames[None].to(device))  # [1, 16, F', h/8, w/8]

    # Mask: pixel frame 0 (and the last, for FLF2V) known; frame 0 repeated 4x (the temporal
    # stride) so that the F pixel frames fold into [4, F'] like the latents.
    s, st = vae.config.spatial_stride, vae.config.temporal_stride
    mask = torch.zeros(1, n, h // s, w // s, device=device)
    mask[:, 0] = 1
    if last_image is not None:
        mask[:, -1] = 1
    y = torch.cat([fold_mask(mask, st), y], dim=1)
    return {"y": y} if clip is None else {"clip_features": clip, "y": y}


def fold_mask(mask: Tensor, st: int) -> Tensor:
    """A mask over pixel frames `[1, F, h, w]` -> `[1, st, F', h, w]`: frame 0 repeated st times
    (the temporal stride) so that the F pixel frames fold into [st, F'] like the latents."""
    _, _, h, w = mask.shape
    mask = torch.cat([mask[:, :1].repeat_interleave(st, dim=1), mask[:, 1:]], dim=1)
    return mask.view(1, mask.shape[1] // st, st, h, w).transpose(1, 2)


def crop_to_aspect(image: Tensor, aspect: float) -> Tensor:
    """Center-crop `[3, H, W]` to height/width = aspect (the last frame of FLF2V to the first's)."""
    h, w = image.shape[1:]
    if h / w > aspect:
        new_h = round(w * aspect)
        top = (h - new_h) // 2
        return image[:, top: top + new_h]
    new_w = round(h / aspect)
    left = (w - new_w) // 2
    return image[:, :, left: left + new_w]
