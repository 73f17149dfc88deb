"""Continuation: `extend=` a video, and the new video begins where the old one ends.

The old video's last `overlap` frames (4k+1 video frames: k latent frames) are known latent
frames at the start of the new run; the output is the old video followed by the new frames
after the overlap. The known latents come from the side file wanx writes next to each mp4
(`<stem>.latents.safetensors`: the last latent frames before decoding, with the mp4's sha256),
so a wanx-made video is continued from its own latents with no VAE round trip (the colour
creep Wan2GP #2132 traces to re-encoding tail frames); any other video has its last frames
encoded once.

How each family holds the known frames is a mixin placed before the task's conditioning class
(`extended`), so no task file branches on continuation:
- T2V (Wan2.1, Wan2.2 A14B) `RenoisedPrefix`: the known latents are put back after every step
  at the current noise level, (1 - sigma) z + sigma noise with the same noise each step: the
  DiT only ever sees inputs of the kind it was trained on (one timestep for every token, as in
  training), the SDEdit/RePaint way of inpainting with a model that has no mask input, and what
  V2V-style partial noise amounts to on the frames that are known. `CleanPrefix` (the known
  frames clean at per-token timestep 0, as TI2V-5B does) is the measured alternative.
- TI2V-5B `CleanPrefix`: its own first-frame mechanism (`ti2v.first_frame_timesteps`, `fix`)
  over k frames: the known latent frames are held clean, their tokens at timestep 0.
- I2V/FLF2V `MaskedPrefix`: the official y = [mask | VAE latents] with the mask over the whole
  overlap (SVI's and Wan2GP's "prefix video" on I2V models: frames beyond the first in y) and
  CLIP of the last old frame.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..configs import frames_ok
from ..sampling import noise_to
from ..video import VIDEO_SUFFIXES, Video, read_video, to_unit
from .conditioning.base import Conditioning, Run
from .conditioning.i2v import fold_mask

DEFAULT_OVERLAP = 9  # video frames: 3 latent frames with Wan's 4x temporal stride
SIDE_LATENT_FRAMES = 8  # latent frames kept in the side file: overlaps up to 29 video frames
SIDE_SUFFIX = ".latents.safetensors"
# T2V: "renoise" or "clean"; measured on the demo model (bench/extend_seam.py, seam / inside
# over 3 prompts from stored latents): renoise 0.84, clean 0.93. Renoise also leaves every
# token at the step's timestep, as the T2V DiT was trained (clean needs per-token timesteps,
# which Wan2.1 never saw; FramePack-style clean history is trained for, not zero-shot).
T2V_METHOD = "renoise"


@dataclass
class Extension:
    """A video to continue, read and checked at plan time."""

    source: Path
    last: np.ndarray  # its last `overlap` frames, uint8 [overlap, H, W, 3]: the plan holds no more of it
    fps: int
    overlap: int  # video frames, 4k+1
    new_frames: int  # frames the output adds after the old ones
    stored: Tensor | None  # its last latent frames from the side file [C, k, H', W'], or None: encode
    temporal_stride: int = 4
    video: Video | None = None  # a Video given in memory (else the file is read again for the output)

    @property
    def latent_frames(self) -> int:
        return (self.overlap - 1) // self.temporal_stride + 1

    def tail(self) -> Tensor:
        """The last `overlap` old frames, `[3, overlap, H, W]` in [-1, 1]."""
        return to_unit(self.last)

    def frames(self) -> np.ndarray:
        """The whole old video, uint8 `[F, H, W, 3]`: read when the output is assembled, not held
        from the plan on (a batch of plans would hold every input video)."""
        return self.video.frames if self.video is not None else read_video(self.source).frames


def read_tail(path: Path, count: int) -> tuple[np.ndarray, int, tuple[int, int], int]:
    """(the last `count` frames uint8, the number of frames, (width, height), fps) of a video
    file at its own rate, decoded frame by frame: never more than `count` frames held."""
    import collections

    import av

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    kept: collections.deque = collections.deque(maxlen=count)
    total = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream; give a video file")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 16)
            for frame in container.decode(stream):
                kept.append(frame.to_ndarray(format="rgb24"))
                total += 1
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable video ({err})") from None
    if not kept:
        raise ValueError(f"{path}: the video has no frames")
    last = np.stack(kept)
    return last, total, (last.shape[2], last.shape[1]), int(round(fps))


def side_file(video_path: str | Path) -> Path:
    """out.mp4 -> out.latents.safetensors."""
    path = Path(video_path)
    return path.with_name(path.stem + SIDE_SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_side_file(video_path: str | Path, video: Video, vae_config) -> Path | None:
    """Next to a saved mp4: its last latent frames (before decoding) and what they belong to,
    written to a temporary name and renamed. Nothing for a video without latents or not mp4."""
    from safetensors.torch import save_file

    path = Path(video_path)
    latents = getattr(video, "latents", None)
    if latents is None or path.suffix.lower() != ".mp4":
        return None
    kept = latents[:, -SIDE_LATENT_FRAMES:].detach().float().cpu().contiguous()  # [C, k, H', W']
    meta = {"sha256": file_sha256(path), "frames": len(video), "width": video.size[0], "height": video.size[1],
            "fps": video.fps, "latent_frames": kept.shape[1], "z_dim": vae_config.z_dim,
            "temporal_stride": vae_config.temporal_stride, "spatial_stride": vae_config.spatial_stride,
            "vae": f"Wan{vae_config.generation}", "generator": "wanx"}
    target = side_file(path)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        save_file({"latents": kept}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
        shutil.copymode(path, tmp)  # readable by whoever may read the video (safetensors writes 0600)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def stored_latents(video_path: Path, width: int, height: int, latent: tuple[int, int, int], k: int) -> Tensor | None:
    """The side file's last `k` latent frames when it belongs to this very file (sha256) and fits
    this model's VAE; None otherwise (the frames are then encoded)."""
    from safetensors import safe_open

    path = side_file(video_path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            latents = fh.get_tensor("latents")
    except Exception:  # an unreadable side file is as good as none: the frames are encoded
        return None
    channels, temporal, spatial = latent
    fits = (meta.get("sha256") == file_sha256(video_path) and meta.get("z_dim") == str(channels)
            and meta.get("temporal_stride") == str(temporal) and meta.get("spatial_stride") == str(spatial)
            and tuple(latents.shape[2:]) == (height // spatial, width // spatial) and latents.shape[1] >= k)
    return latents[:, -k:].float() if fits else None


def check_inputs(given: dict, needs_image: bool, name) -> None:
    """What cannot go with `extend`: a video-to-video input (both would be the video to start
    from), and a first frame (the old video's last frames are the start; an I2V model takes its
    CLIP image from the last one)."""
    from .plan import RequestError

    for arg in ("video", "image"):
        if given[arg] is not None:
            what = "video-to-video input" if arg == "video" else "first frame"
            raise RequestError(arg, f"{name('extend')} continues a video from its last frames: give it or "
                                    f"{name(arg)} (a {what}), not both")
    if given["last_image"] is not None and not needs_image:
        raise RequestError("last_image", f"{name('last_image')} needs an FLF2V model")


def read_extension(plan, given: dict, name, *, size: tuple, frames) -> None:
    """Read and check the video to continue (`given["extend"]`) into `plan.extend`; size the
    output as the video, count `num_frames` as the frames added. Called by `make_plan` before
    the task's own `read`; for I2V/FLF2V the last old frame becomes the request's image.
    size (width, height), frames: as the request gave them (None: not given)."""
    from .plan import RequestError

    source, overlap = given["extend"], given["extend_frames"]
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    channels, temporal, spatial = plan.latent
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 1 or not frames_ok(overlap):
        raise RequestError("extend_frames", f"{name('extend_frames')} {overlap} must be 4k+1 video frames (k latent "
                                            f"frames), e.g. {DEFAULT_OVERLAP}")
    if isinstance(source, Video):  # a pipeline's result in memory: its own latents when it has them
        path, video = Path("video"), source
        last, count, (width, height), fps = source.frames[-overlap:], len(source), source.size, source.fps
    elif isinstance(source, (str, Path)):
        path, video = Path(source).expanduser(), None
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise RequestError("extend", f"{name('extend')} {path}: not a video ({', '.join(VIDEO_SUFFIXES)}); "
                                         f"an image starts a video with {name('image')}")
        try:
            last, count, (width, height), fps = read_tail(path, overlap)  # at its own rate: the output keeps it
        except (ValueError, FileNotFoundError) as err:
            raise RequestError("extend", f"{name('extend')} {err}") from None
    else:
        raise RequestError("extend", f"{name('extend')} takes a video file's path or a Video, got "
                                     f"{type(source).__name__}")
    if tuple(size) not in ((None, None), (width, height)):
        raise RequestError("height", f"{name('extend')} {path.name} is {width}x{height}: the new frames take its size; "
                                     f"give {width}x{height} or leave the size out")
    multiple = plan.spec.multiple
    if width % multiple or height % multiple:
        raise RequestError("extend", f"{name('extend')} {path.name} is {width}x{height}: this model needs sides in "
                                     f"multiples of {multiple}; resize the video first")
    if count < overlap:
        raise RequestError("extend_frames", f"{name('extend')} {path.name} has {count} frames, fewer than the "
                                            f"{overlap}-frame overlap ({name('extend_frames')}): lower it")
    new = frames
    if new is None:  # the DiT runs the model's usual length, the overlap included
        new = max(temporal, (plan.num_frames - overlap) // temporal * temporal)
    elif isinstance(new, bool) or not isinstance(new, int) or new < temporal or new % temporal:
        raise RequestError("num_frames", f"with {name('extend')}, {name('num_frames')} counts the new frames: a "
                                         f"multiple of {temporal} (each latent frame adds {temporal}), e.g. "
                                         f"{max(temporal, (81 - overlap) // temporal * temporal)}, got {new}")
    k = (overlap - 1) // temporal + 1
    if k == 1:
        # A stored latent frame holds 4 video frames; a clip's first latent frame holds one (the
        # causal VAE's first step), so a lone stored one would stand where a one-frame latent
        # belongs: the demo model's seam was 3.4-8.7x the motion that way (1.25-1.58 with the one
        # frame encoded instead), against 0.4-1.6 with 5 frames and 0.7-1.0 with 9, where the
        # later known frames carry the motion (bench/extend_seam.py).
        stored = None
    elif video is not None:
        latents = video.latents
        fits = latents is not None and tuple(latents.shape) == (channels, (count - 1) // temporal + 1,
                                                                height // spatial, width // spatial)
        stored = latents[:, -k:].float() if fits else None
    else:
        stored = stored_latents(path, width, height, plan.latent, k)
    plan.width, plan.height = width, height
    plan.num_frames = overlap + new  # the clip the DiT makes: the overlap and the new frames, 4k+1
    plan.extend = Extension(path, last, fps, overlap, new, stored, temporal, video)
    if "image" in plan.spec.needs:  # I2V/FLF2V: the last old frame is CLIP's image
        given["image"] = to_unit(last[-1])


# -- the mixins: one per family ---------------------------------------------------------


class Extended(Conditioning):
    """What every family shares: the known latents (stored, or the old tail encoded once), the
    output's frames (the old video, then the new ones after the overlap) and the metadata."""

    def __init__(self, plan):
        super().__init__(plan)
        self._known: Tensor | None = None

    def known(self, run: Run) -> Tensor:
        """The old video's last k latent frames `[1, C, k, H', W']` on the device."""
        if self._known is None:
            ext = self.plan.extend
            if ext.stored is not None:
                run.say(f"extend: the last {ext.latent_frames} latent frames of {ext.source.name} from its side file")
                self._known = ext.stored[None].to(run.device)
            else:
                with run.stage(f"extend: encoding the last {ext.overlap} frames of {ext.source.name}", "vae"):
                    self._known = run.pipe.vae.encode(ext.tail()[None].to(run.device)).float()
        return self._known

    def output_frames(self) -> tuple[np.ndarray | None, int]:
        return self.plan.extend.frames(), self.plan.extend.overlap

    def metadata(self) -> dict:
        ext = self.plan.extend
        return {**super().metadata(), "extends": ext.source.name, "overlap_frames": ext.overlap,
                "new_frames": ext.new_frames}


class RenoisedPrefix(Extended):
    """T2V: the known latents at the current noise level before every step, the same noise each step."""

    def start(self, run: Run, noise: Tensor, sigmas: Tensor) -> Tensor:
        z = self.known(run)
        k = z.shape[2]
        self._noise, self._sigmas, self._step = noise[:, :, :k].clone(), sigmas, 0
        x = super().start(run, noise, sigmas).clone()
        x[:, :, :k] = noise_to(z, self._noise, float(sigmas[0]))
        return x

    def fix(self, latents: Tensor) -> None:
        super().fix(latents)
        self._step = min(self._step + 1, len(self._sigmas) - 1)  # once after each step: now at sigmas[step]
        sigma = float(self._sigmas[self._step])
        latents[:, :, :self._known.shape[2]] = noise_to(self._known, self._noise, sigma)


class CleanPrefix(Extended):
    """TI2V-5B's first-frame rule over k frames: the known latents clean, their tokens at timestep 0."""

    def start(self, run: Run, noise: Tensor, sigmas: Tensor) -> Tensor:
        z = self.known(run)
        x = super().start(run, noise, sigmas).clone()
        x[:, :, :z.shape[2]] = z
        return x

    def timesteps(self, t: Tensor, shape, patch_size, frames: list[int] | None = None) -> Tensor:
        from .conditioning.ti2v import first_frame_timesteps

        k = self._known.shape[2]
        if frames is None:
            return first_frame_timesteps(shape, patch_size, t, k)
        known = [i for i, frame in enumerate(frames) if frame < k]  # a context window: where they sit in it
        return first_frame_timesteps(shape, patch_size, t, known) if known else t

    def fix(self, latents: Tensor) -> None:
        super().fix(latents)
        latents[:, :, :self._known.shape[2]] = self._known


class MaskedPrefix(Extended):
    """I2V/FLF2V: y's mask over the overlap and its latents the known ones; CLIP of the last old
    frame (and the FLF2V last frame). The blank rest of y is the encoding of zeros, as the
    official I2V's: encoded with the old tail in front when there is no side file (one encode),
    alone with the stored latents put in front when there is."""

    def inputs(self, run: Run) -> dict[str, Tensor]:
        plan, pipe, ext = self.plan, run.pipe, self.plan.extend
        h, w, n = plan.height, plan.width, plan.num_frames
        with run.stage("image conditioning", "clip", "vae"):
            images = [plan.image] + ([plan.last_image] if plan.last_image is not None else [])
            frames = torch.zeros(3, n, h, w)
            if ext.stored is None:
                frames[:, :ext.overlap] = ext.tail()
            if plan.last_image is not None:
                from .conditioning.i2v import crop_to_aspect

                frames[:, -1] = F.interpolate(crop_to_aspect(plan.last_image, h / w)[None], size=(h, w),
                                              mode="bicubic", align_corners=False)[0]
            y = pipe.vae.encode(frames[None].to(run.device)).float()  # [1, C, F', h/s, w/s]
            k = ext.latent_frames
            if ext.stored is not None:
                y[:, :, :k] = self.known(run)
            s, st = pipe.vae.config.spatial_stride, pipe.vae.config.temporal_stride
            mask = torch.zeros(1, n, h // s, w // s, device=run.device)
            mask[:, :ext.overlap] = 1
            if plan.last_image is not None:
                mask[:, -1] = 1
            out = {"y": torch.cat([fold_mask(mask, st), y], dim=1)}
            if pipe.image_encoder is not None:
                out["clip_features"] = torch.cat([pipe.image_encoder(img[None].to(run.device)) for img in images], 1)
        return out


MIXINS = {"t2v": {"renoise": RenoisedPrefix, "clean": CleanPrefix}, "ti2v": CleanPrefix, "i2v": MaskedPrefix,
          "flf2v": MaskedPrefix}


def extended(cls: type[Conditioning], t2v_method: str | None = None) -> type[Conditioning]:
    """The task's conditioning with continuation: the family's mixin in front of it."""
    mixin = MIXINS.get(cls.task)
    if isinstance(mixin, dict):
        mixin = mixin[t2v_method or T2V_METHOD]
    if mixin is None:
        raise ValueError(f"{cls.task} cannot continue a video")
    return _compose(mixin, cls)


@functools.lru_cache(maxsize=None)
def _compose(mixin: type, cls: type) -> type[Conditioning]:
    return type(f"Extended{cls.__name__}", (mixin, cls), {"task": cls.task})
