"""VACE (Wan2.1 VACE-1.3B/14B): one task for control video, inpainting, outpainting, first/last
frame and reference images. The DiT reads a VACE context beside the noise (`VaceWanDiT`):
the VAE latents of the frames outside the mask (inactive) and inside it (reactive), 16 + 16
channels, and the mask folded 8x8 into 64 channels at latent resolution. Reference images are
encoded as latent frames of their own in front of the video's, in the context and in the
latents, and those latent frames are dropped before decoding.

Restates the official preprocessing (Wan-Video/Wan2.1 `wan/vace.py`: `prepare_source`,
`vace_encode_frames`, `vace_encode_masks`, `decode_latent`); diffusers' `WanVACEPipeline` does
the same (`preprocess_conditions`, `prepare_video_latents`, `prepare_masks`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...configs import frames_at_most
from ...video import Video, read_image, read_video, to_unit
from .base import Conditioning, Run, image_tensor, read_input, size_for_image, video_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class Vace(Conditioning):
    task = "vace"

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        from ..plan import RequestError

        fps = plan.spec.fps
        if given["context_windows"] is not None and given["reference_images"]:
            raise RequestError("reference_images", f"{name('reference_images')} are latent frames in front of the "
                                                   f"video, which context windows do not carry: give them or "
                                                   f"{name('context_windows')}, not both")
        if given["extend"] is not None:
            raise RequestError("extend", f"{name('extend')} is not for a VACE model: give the video to continue as "
                                         f"{name('control_video')} with a {name('mask')} that is white past its end")
        video = given["video"]
        if video is not None and given["image"] is not None:
            raise RequestError("image", f"give {name('control_video')} or {name('image')} (a first frame), not both")
        if given["mask"] is not None and video is None:
            raise RequestError("mask", f"{name('mask')} marks what to generate in {name('control_video')}: give that "
                                       f"too")
        if video is not None:
            frames = read_input("video", lambda v: video_frames(v, fps), video)  # [3, F, H, W]
            count = frames.shape[1]
            if not frames_given:  # the control video's length, up to the default
                plan.num_frames = min(plan.num_frames, frames_at_most(count))
            elif count < plan.num_frames:
                raise RequestError("num_frames", f"the control video has {count} frames at {fps} fps; "
                                                 f"{name('num_frames')} is {plan.num_frames}: lower it to "
                                                 f"{frames_at_most(count)} or give a longer video")
            frames = frames[:, :plan.num_frames]
            mask = None
            if given["mask"] is not None:
                mask = read_input("mask", lambda m: mask_frames(m, fps), given["mask"])  # [1, F or 1, H, W]
                if mask.shape[2:] != frames.shape[2:]:
                    raise RequestError("mask", f"the mask is {mask.shape[3]}x{mask.shape[2]}; it needs the control "
                                               f"video's size, {frames.shape[3]}x{frames.shape[2]}")
                if mask.shape[1] == 1:  # one image for every frame
                    mask = mask.expand(1, plan.num_frames, *mask.shape[2:])
                elif mask.shape[1] < plan.num_frames:
                    raise RequestError("mask", f"the mask video has {mask.shape[1]} frames; it needs "
                                               f"{plan.num_frames} (the frames made), or give one image")
                mask = mask[:, :plan.num_frames]
            else:  # official: no mask, every pixel made under the control video's guidance; outpainting
                # keeps the picture and makes the border
                mask = torch.full((1, *frames.shape[1:]), 0.0 if given["outpaint"] is not None else 1.0)
        else:
            frames = mask = None
            firsts = [read_input(key, image_tensor, given[key]) for key in ("image", "last_image")
                      if given[key] is not None]
            if firsts:  # the official first-frame / first-last-frame tasks: the frames given, grey to make
                frames, mask = frame_canvas(given, firsts, plan.num_frames)
        if given["outpaint"] is not None:
            if frames is None:
                raise RequestError("outpaint", f"{name('outpaint')} widens a picture: give {name('control_video')} "
                                               f"or {name('image')}")
            sides = read_input("outpaint", parse_outpaint, given["outpaint"])
            frames, mask = outpaint(frames, mask, sides)
        if frames is not None:
            plan.height, plan.width = size_for_image(frames[:, 0], area)
            plan.video, plan.mask = fit(frames, mask, plan.height, plan.width)
        refs = given["reference_images"]
        if refs is not None:
            refs = [refs] if not isinstance(refs, (list, tuple)) else list(refs)
            if not refs:
                raise RequestError("reference_images", f"{name('reference_images')} is an empty list: give one or "
                                                       f"more images, or leave it unset")
            plan.reference_images = [reference_canvas(read_input("reference_images", image_tensor, ref),
                                                      plan.height, plan.width) for ref in refs]
            plan.lead_frames = len(plan.reference_images)
        scale = given["conditioning_scale"]
        if scale is not None:
            values = [scale] if isinstance(scale, (int, float)) else list(scale)
            if not values or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
                raise RequestError("conditioning_scale", f"{name('conditioning_scale')} must be a number (or one "
                                                         f"per VACE layer), got {scale!r}")
            plan.control_scale = values[0] if isinstance(scale, (int, float)) else tuple(values)

    def inputs(self, run: Run) -> dict:
        plan = self.plan
        frames = plan.video
        mask = plan.mask
        if frames is None:  # official prepare_source: no control video, grey frames all to make
            frames = torch.zeros(3, plan.num_frames, plan.height, plan.width)
            mask = torch.ones(1, plan.num_frames, plan.height, plan.width)
        vae = run.pipe.vae
        with run.stage("VACE conditioning", "vae"):
            latents = encode_frames(vae, frames.to(run.device), mask.to(run.device),
                                    [ref.to(run.device) for ref in plan.reference_images or ()])
        folded = encode_masks(mask.to(run.device), len(plan.reference_images or ()), vae.config.temporal_stride,
                              vae.config.spatial_stride)
        context = torch.cat([latents, folded], dim=0)[None]  # [1, 96, R + F', h, w]
        scale = plan.control_scale
        return {"vace_context": context, **({"vace_context_scale": scale} if scale != 1.0 else {})}

    def metadata(self) -> dict:
        plan = self.plan
        mode = "text" if plan.video is None else "control" if bool((plan.mask > 0.5).all()) else "masked"
        out = {"vace": mode}
        if plan.reference_images:
            out["reference_images"] = len(plan.reference_images)
        if plan.control_scale != 1.0:
            out["control_scale"] = plan.control_scale
        return out


def encode_frames(vae, frames: Tensor, mask: Tensor, refs: list[Tensor]) -> Tensor:
    """Official `vace_encode_frames`: frames `[3, F, H, W]` in [-1, 1], mask `[1, F, H, W]` in
    [0, 1] (white = generate), reference canvases `[3, H, W]` -> `[32, R + F', H/s, W/s]`: the
    latents of the frames outside the mask and inside it, on channels; each reference's latent
    frame (with zeros for the inside half) in front, in the order given."""
    mask = torch.where(mask > 0.5, 1.0, 0.0)
    inactive = vae.encode((frames * (1 - mask))[None])[0].float()
    reactive = vae.encode((frames * mask)[None])[0].float()
    latents = torch.cat([inactive, reactive], dim=0)
    lead = []
    for ref in refs:
        z = vae.encode(ref[:, None][None])[0].float()  # [16, 1, h, w]
        lead.append(torch.cat([z, torch.zeros_like(z)], dim=0))
    return torch.cat([*lead, latents], dim=1)


def encode_masks(mask: Tensor, refs: int, temporal: int, spatial: int) -> Tensor:
    """Official `vace_encode_masks`: mask `[1, F, H, W]` -> `[s*s, R + F', H/s, W/s]`: each s x s
    pixel block folded onto channels, the F frames subsampled to the latents' (F + 3) // 4 by
    nearest-exact, zeros for the reference frames in front."""
    _, depth, height, width = mask.shape
    h, w = 2 * (height // (spatial * 2)), 2 * (width // (spatial * 2))  # the patch grid's, as the official
    folded = mask[0].view(depth, h, spatial, w, spatial).permute(2, 4, 0, 1, 3).reshape(spatial * spatial, depth, h, w)
    folded = F.interpolate(folded[None], size=((depth + temporal - 1) // temporal, h, w), mode="nearest-exact")[0]
    return torch.cat([folded.new_zeros(folded.shape[0], refs, h, w), folded], dim=1)


def reference_canvas(image: Tensor, height: int, width: int) -> Tensor:
    """Official `prepare_source` for a reference image `[3, h, w]` in [-1, 1]: scaled (bilinear)
    to fit the output whole and centred on a white canvas `[3, height, width]`."""
    if image.shape[1:] == (height, width):
        return image
    scale = min(height / image.shape[1], width / image.shape[2])
    new_h, new_w = int(image.shape[1] * scale), int(image.shape[2] * scale)
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized
    return canvas


def mask_frames(mask, fps: int) -> Tensor:
    """A mask video or image (path, PIL image, `Video`, uint8 `[F, H, W, 3]`/`[H, W, 3]`, or a tensor
    `[1|3, F, H, W]`/`[1|3, H, W]` in [-1, 1]), white = generate -> `[1, F (1: an image), H, W]` in
    [0, 1]: its first channel, as the official `(mask + 1) / 2`."""
    if isinstance(mask, (str, Path)):
        mask = read_image(mask) if Path(mask).suffix.lower() in IMAGE_SUFFIXES else read_video(mask, fps=fps)
    if isinstance(mask, Video):
        mask = mask.frames
    if hasattr(mask, "convert"):  # PIL
        mask = np.asarray(mask.convert("RGB"))
    if isinstance(mask, Tensor):
        if mask.ndim not in (3, 4) or mask.shape[0] not in (1, 3):
            raise ValueError(f"mask tensor must be [1 or 3, F, H, W] or [1 or 3, H, W] in [-1, 1], got "
                             f"{tuple(mask.shape)}")
        mask = mask.float().cpu()
    else:
        array = np.asarray(mask)
        if array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise ValueError(f"mask must be an image [H, W, 3] or frames [F, H, W, 3] (uint8), got shape {array.shape}")
        mask = to_unit(array)
    if mask.ndim == 3:
        mask = mask[:, None]
    return ((mask[:1] + 1) / 2).clamp(0, 1)


def frame_canvas(given, images: list[Tensor], frames: int) -> tuple[Tensor, Tensor]:
    """The official first-frame (and last-frame) tasks: the image(s) at their frame(s), kept
    (mask 0), every other frame grey and made (mask 1). The frames take the first image's size;
    a last image of another size is scaled to it."""
    first = images[0]
    h, w = first.shape[1:]
    video = torch.zeros(3, frames, h, w)
    mask = torch.ones(1, frames, h, w)
    if given["image"] is not None:
        video[:, 0], mask[:, 0] = first, 0
    if given["last_image"] is not None:
        last = images[-1]
        if last.shape[1:] != (h, w):
            last = F.interpolate(last[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(-1, 1)
        video[:, -1], mask[:, -1] = last, 0
    return video, mask


def parse_outpaint(value) -> tuple[float, float, float, float]:
    """'left,right,top,bottom' (or four numbers): pixels, or fractions of the width/height below 1."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        sides = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        sides = ()
    if len(sides) != 4 or any(not np.isfinite(v) or v < 0 for v in sides) or not any(sides):
        raise ValueError(f"outpaint is left,right,top,bottom: four numbers >= 0, pixels or fractions of the size "
                         f"below 1, not all 0 (e.g. 0.25,0.25,0,0), got {value!r}")
    return sides


def outpaint(frames: Tensor, mask: Tensor, sides) -> tuple[Tensor, Tensor]:
    """The frames `[3, F, H, W]` on a larger grey canvas, the added border made (mask 1)."""
    _, n, h, w = frames.shape
    left, right, top, bottom = (round(v * (w if i < 2 else h)) if v < 1 else round(v) for i, v in enumerate(sides))
    canvas = torch.zeros(3, n, top + h + bottom, left + w + right)
    canvas[:, :, top:top + h, left:left + w] = frames
    border = torch.ones(1, n, *canvas.shape[2:])
    border[:, :, top:top + h, left:left + w] = mask
    return canvas, border


def fit(frames: Tensor, mask: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Frames (bicubic) and mask (nearest: it stays black and white) at the output size."""
    if frames.shape[2:] == (height, width):
        return frames, mask
    frames = F.interpolate(frames.transpose(0, 1), size=(height, width), mode="bicubic", align_corners=False)
    mask = F.interpolate(mask.transpose(0, 1), size=(height, width), mode="nearest-exact")
    return frames.clamp(-1, 1).transpose(0, 1), mask.transpose(0, 1)
