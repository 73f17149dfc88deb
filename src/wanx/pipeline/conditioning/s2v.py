"""Speech-to-video (Wan2.2-S2V-14B): a reference image and an audio (optionally a pose video),
made clip after clip as the official `WanS2V.generate` does.

Each clip of `infer_frames` (num_frames here, 80 by default) is sampled from its own noise
(`Generator(seed + clip)`), with the DiT reading:
- ref_latents: the VAE latent of the reference image (resized on its short side and
  center-cropped to the output size);
- motion_latents: the VAE latents of the last 73 frames made so far (zeros before the first
  clip; with start_from_ref the last 6 of those zeros are the reference image);
- cond_states: the clip's pose-video latents (its first frame repeated in front, that latent
  dropped), zeros without a pose video (the official loop encodes an all -1 video and
  multiplies it by 0: zeros, without the encode here);
- audio_input: the clip's columns of the wav2vec2 embedding (`wanx.audio.encode_audio`); the
  unconditional branch gets it times 0;
- drop_motion_frames on the first clip (the official config's drop_first_motion), unless
  start_from_ref.

Each clip is decoded after its motion latents (the first clip dropping motion: after the
reference latent), its last infer_frames frames kept (the first clip drops 3 more when
dropping motion), and the last 73 frames re-encoded as the next clip's motion memory. So the
video has infer_frames - 3 + infer_frames x (clips - 1) frames (77 + 80 (n - 1)).

The clip count is the audio's (`wanx.audio.num_clips`: one clip more than the audio fills),
or num_clips when that is fewer. The size is the official `get_size_less_than_area` of the
reference image within the requested area, in multiples of 64.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...configs import S2VConfig
from .base import Conditioning, Held, Run, read_input

DROP_FIRST_MOTION = True  # wan/configs/wan_s2v_14B.py: drop_first_motion
SIZE_DIVISOR = 64  # get_size_less_than_area's padding multiple (latents a multiple of 8: the 4x motion bucket)
START_FRAMES = 6  # start_from_ref: the reference image fills the last 6 frames of the motion memory


class SpeechToVideo(Conditioning):
    task = "s2v"
    clip_after_clip = True  # one clip too: its decode drops the reference latent and 3 frames

    def __init__(self, plan):
        super().__init__(plan)
        inputs = plan.s2v
        self.inputs_ = inputs
        self.clips = inputs.clips
        self.audio_emb = None  # [1, layers, dim, clips * infer_frames], at the first clip
        self.ref_latents = self.motion_latents = self.last_frames = None
        self.index = 0  # the clip `inputs` prepares next

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        from ...audio import SAMPLE_RATE, num_clips, read_audio, resample
        from ..plan import RequestError

        for key, flag, what in (("context_windows", "context_frames", "context windows"),
                                ("extend", "extend", "continuation")):
            if given.get(key) is not None:
                raise RequestError(key, f"{name(flag)}: {what} is not available for {plan.spec.short}, which makes "
                                        "its video clip after clip over the audio (each clip carries 73 frames of "
                                        "motion memory)")
        audio = given.get("audio")
        if audio is None:
            raise RequestError("audio", f"this is a Wan2.2 S2V model: give {name('audio')} (the speech or song the "
                                        "person follows: wav, mp3, m4a, flac, or a video with sound)")
        if isinstance(audio, (str, Path)):
            samples = read_input("audio", read_audio, audio)
        else:
            samples = read_input("audio", lambda value: _samples(value, resample, SAMPLE_RATE), audio)
        infer_frames = plan.num_frames
        clips = read_input("audio", lambda s: num_clips(len(s), plan.spec.fps, infer_frames), samples)
        wanted = given.get("num_clips")
        if wanted is not None:
            if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
                raise RequestError("num_clips", f"{name('num_clips')} must be a whole number >= 1, got {wanted!r}")
            clips = min(clips, wanted)  # the official: never more than the audio gives
        image = read_input("image", _image_array, given["image"])
        plan.height, plan.width = get_size_less_than_area(image.shape[0], image.shape[1], target_area=area)
        pose = None
        if given.get("pose_video") is not None:
            pose = read_input("pose_video", lambda path: read_pose_frames(path, infer_frames * clips, plan.spec.fps),
                              given["pose_video"])
        plan.s2v = S2VInputs(image=image, samples=samples, clips=clips, pose=pose,
                             start_from_ref=bool(given.get("start_from_ref")))
        plan.soundtrack = audio if isinstance(audio, (str, Path)) else (samples, SAMPLE_RATE)

    @classmethod
    def held(cls, plan) -> Held:
        """The DiT sees the reference latent frame and the FramePack motion memory (1 + 2/8 + 16/64
        frames' tokens at 1x, 2x and 4x compression: 1.5) beside each clip's; each clip is decoded
        behind its 19 motion latent frames (73 + 80 = 153 frames at once)."""
        f = plan.num_frames
        dropped = 3 if DROP_FIRST_MOTION and not plan.s2v.start_from_ref else 0
        return Held(extra_frames=1 + 1.5, decoded_frames=S2VConfig.motion_frames + f,
                    output_frames=plan.s2v.clips * f - dropped)

    # -- per clip ------------------------------------------------------------------------------
    def _first(self, run: Run) -> None:
        """What every clip reads: the audio embedding, the reference latent, the first motion memory."""
        from ...audio import encode_audio

        plan, inputs, cfg = self.plan, self.inputs_, run.pipe.dit.config
        h, w = plan.height, plan.width
        with run.stage("audio encoding"):
            self.audio_emb, _ = encode_audio(run.pipe.audio_encoder, inputs.samples, fps=plan.spec.fps,
                                             infer_frames=plan.num_frames)
        with run.stage("reference and motion latents", "vae"):
            ref = reference_pixels(inputs.image, h, w)  # [3, H, W] in [-1, 1]
            self.ref_latents = run.encode(ref[None, :, None])
            # one tensor, as the official `videos_last_frames = motion_latents.detach()`: the
            # reference frames written below are in the memory the next clips carry
            motion = torch.zeros(1, 3, cfg.motion_frames, h, w, device=run.device)
            if inputs.start_from_ref:
                motion[:, :, -START_FRAMES:] = ref.to(run.device)[:, None]
            self.last_frames = motion
            self.motion_latents = run.encode(motion)

    @property
    def drop_motion(self) -> bool:
        return DROP_FIRST_MOTION and not self.inputs_.start_from_ref

    def inputs(self, run: Run) -> dict[str, Tensor]:
        if self.index == 0:
            self._first(run)
        r, plan, cfg = self.index, self.plan, run.pipe.dit.config
        f = plan.num_frames
        with run.stage("pose latents", "vae"):
            cond = self._pose_latents(run, r)
        audio = self.audio_emb[..., r * f:(r + 1) * f].to(run.device, torch.float32)  # wav2vec2 ran on the CPU
        return {"ref_latents": self.ref_latents, "motion_latents": self.motion_latents.clone(), "cond_states": cond,
                "audio_input": audio, "motion_frames": [cfg.motion_frames, cfg.lat_motion_frames],
                "drop_motion_frames": self.drop_motion and r == 0}

    def _pose_latents(self, run: Run, r: int) -> Tensor:
        """Clip r's pose latents `[1, 16, F/4, h, w]`: its frames with the first repeated in front,
        encoded, that latent dropped; zeros without a pose video."""
        plan, f = self.plan, self.plan.num_frames
        c, temporal, spatial = plan.latent
        if self.inputs_.pose is None:
            return torch.zeros(1, c, f // temporal, plan.height // spatial, plan.width // spatial, device=run.device)
        frames = pose_pixels(self.inputs_.pose, r, f, plan.height, plan.width)  # [3, f, H, W]
        frames = torch.cat([frames[:, :1], frames], dim=1)
        return run.encode(frames[None])[:, :, 1:]

    def batch(self, inputs: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
        """The unconditional branch hears nothing: its audio_input times 0, as the official `arg_null`."""
        out = super().batch(inputs, names)
        silent = [i for i, branch in enumerate(names) if branch.startswith("uncond")]
        if silent:
            audio = out["audio_input"].clone()
            audio[silent] = audio[silent] * 0.0
            out["audio_input"] = audio
        return out

    def clip_noise(self, index: int, noise: Tensor, generator) -> Tensor:
        """Each clip its own generator, seeded seed + clip (official): the first is the request's."""
        if index == 0:
            return noise
        # wrapped into the generator's range (the official's seeds stay below 2**63: never wrapped)
        seeded = torch.Generator(noise.device).manual_seed((self.plan.seed + index) % 2**64)
        return torch.randn(noise.shape[1:], generator=seeded, device=noise.device, dtype=torch.float32)[None]

    def finish_clip(self, run: Run, index: int, latents: Tensor) -> Tensor:
        f = self.plan.num_frames
        dropping = self.drop_motion and index == 0
        before = self.ref_latents if dropping else self.motion_latents
        with run.stage(f"decoding (clip {index + 1})", "vae"):
            image = run.decode(torch.cat([before, latents.to(before.dtype)], dim=2))[:, :, -f:]
            if dropping:
                image = image[:, :, 3:]
            overlap = min(self.last_frames.shape[2], image.shape[2])
            self.last_frames = torch.cat([self.last_frames[:, :, overlap:], image[:, :, -overlap:]], dim=2)
            self.motion_latents = run.encode(self.last_frames)
        self.index = index + 1
        return image[0]

    def metadata(self) -> dict:
        inputs = self.inputs_
        return {"clips": inputs.clips, "clip_frames": self.plan.num_frames,
                "video_frames": self.held(self.plan).output_frames,
                **({"pose_video": True} if inputs.pose is not None else {}),
                **({"start_from_ref": True} if inputs.start_from_ref else {})}


class S2VInputs:
    """A request's S2V inputs as read at plan time: the reference image (uint8 `[H, W, 3]`), the
    audio (mono float32 at 16 kHz), the clip count, the pose video's frames (uint8 `[n, h, w, 3]`,
    at most clips x infer_frames) and start_from_ref."""

    def __init__(self, image: np.ndarray, samples: np.ndarray, clips: int, pose: np.ndarray | None,
                 start_from_ref: bool):
        self.image, self.samples, self.clips, self.pose, self.start_from_ref = image, samples, clips, pose, start_from_ref


def _samples(value, resample, rate: int) -> np.ndarray:
    """(samples `[N]` or `[channels, N]`, rate) -> mono float32 at `rate`, channels averaged."""
    try:
        samples, source_rate = value
    except (TypeError, ValueError):
        raise ValueError(f"audio must be a file path or (samples, rate), got {type(value).__name__}") from None
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=0, dtype=np.float32)
    if samples.ndim != 1 or not len(samples):
        raise ValueError(f"audio samples must be [N] or [channels, N] with N > 0, got shape {samples.shape}")
    return resample(samples, int(source_rate), rate)


def _image_array(image) -> np.ndarray:
    """A path, PIL image, uint8 `[H, W, 3]` or `[3, H, W]` tensor in [-1, 1] -> uint8 `[H, W, 3]`
    (the official code resizes the image as PIL does: uint8 in)."""
    from ...video import read_image

    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
        return ((image.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    if isinstance(image, (str, Path)):
        image = read_image(image)
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 [H, W, 3], got shape {array.shape} {array.dtype}")
    return array


def get_size_less_than_area(height: int, width: int, target_area: int = 1024 * 704,
                            divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """The official output size for an image of height x width: the largest scale (tried in
    100 steps down from the one that fills the area) whose size, padded up to multiples of 64,
    stays within target_area; else the aspect ratio's size in multiples of divisor."""
    if height * width <= target_area:  # no resizing: padding only
        min_scale, max_scale = 0.1, 1.0
    else:
        d = divisor - 1
        b = d * (height + width)
        a = height * width
        c = d ** 2 - target_area
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)  # the scale with the most padding
        max_scale = math.sqrt(target_area / (height * width))  # the scale with none
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        new_height, new_width = int(height * scale), int(width * scale)
        padded_height = new_height + (64 - new_height % 64) % 64  # 64 as the official, whatever divisor
        padded_width = new_width + (64 - new_width % 64) % 64
        if padded_height * padded_width <= target_area:
            return padded_height, padded_width
    aspect = width / height
    target_width = int((target_area * aspect) ** 0.5 // divisor * divisor)
    target_height = int((target_area / aspect) ** 0.5 // divisor * divisor)
    if target_width >= width or target_height >= height:
        target_width, target_height = int(width // divisor * divisor), int(height // divisor * divisor)
    return target_height, target_width


def _short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side to `short`, the long one int(short * long / short side)."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """torchvision's CenterCrop on `[..., h, w]`: zero-padded first where smaller (left/top get
    the floor half), then cut at round((h - height) / 2) (Python's round, half to even)."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        left, top = max(width - w, 0) // 2, max(height - h, 0) // 2
        x = F.pad(x, (left, max(width - w, 0) - left, top, max(height - h, 0) - top))
        h, w = x.shape[-2:]
        if (h, w) == (height, width):
            return x
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return x[..., top:top + height, left:left + width]


def reference_pixels(image: np.ndarray, height: int, width: int) -> Tensor:
    """The reference image as the official code prepares it: PIL bilinear resize of the short
    side to min(height, width), center crop (black where the image is short), `[3, H, W]` in [-1, 1]."""
    from PIL import Image

    h, w = image.shape[:2]
    new_h, new_w = _short_side_size(h, w, min(height, width))
    picture = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        picture = picture.resize((new_w, new_h), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return _center_crop(pixels, height, width) * 2 - 1.0


def read_pose_frames(path, n_frames: int, fps: int) -> np.ndarray:
    """The official `read_last_n_frames(reverse=True)`: from the first frame, every
    round(source fps / fps)-th (at least every one), at most n_frames; uint8 `[n, h, w, 3]`.
    A shorter video gives fewer (the rest is padded with -1 frames per clip)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    kept = []
    try:  # decoded in order, only the frames taken kept: memory is the clips' frames, not the file's
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream; give the pose video (e.g. DWPose's output)")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 16)  # decord's average rate
            interval = max(1, round(source_fps / fps))
            for index, frame in enumerate(container.decode(stream)):
                if len(kept) == n_frames:
                    break
                if index % interval == 0:
                    kept.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable video ({err})") from None
    if not kept:
        raise ValueError(f"{path}: the pose video has no frames")
    return np.stack(kept)


def pose_pixels(pose: np.ndarray, r: int, infer_frames: int, height: int, width: int) -> Tensor:
    """Clip r's pose frames `[3, infer_frames, H, W]` in [-1, 1]: bilinear (antialiased) resize of
    the short side to min(H, W), center crop (0 where short), -1 frames past the video's end."""
    part = pose[r * infer_frames:(r + 1) * infer_frames]
    out = -torch.ones(3, infer_frames, height, width)
    if len(part):
        x = torch.from_numpy(part).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1.0  # [n, 3, h, w]
        h, w = x.shape[-2:]
        new_h, new_w = _short_side_size(h, w, min(height, width))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        out[:, :len(part)] = _center_crop(x, height, width).permute(1, 0, 2, 3)
    return out
