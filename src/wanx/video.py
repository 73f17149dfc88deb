"""Video files: a `Video` of uint8 frames that saves to H.264 mp4 (PyAV), GIF or a PNG folder,
and readers for videos and images (used for video-to-video, image conditioning and training)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_PIXELS = 64_000_000  # a 8000x8000 photo; conditioning frames are resized to <= 1280x720


def to_unit(pixels: np.ndarray):
    """uint8 `[F, H, W, 3]` (or one `[H, W, 3]` image) -> float32 tensor `[3, F, H, W]` (`[3, H, W]`)
    in [-1, 1]: the range the VAE encodes."""
    import torch

    pixels = np.asarray(pixels)
    channels_first = (3, 0, 1, 2) if pixels.ndim == 4 else (2, 0, 1)
    return torch.from_numpy(pixels.astype(np.float32)).permute(*channels_first) / 127.5 - 1


def to_pixels(video) -> np.ndarray:
    """A decoded `[3, F, H, W]` tensor in [-1, 1] -> uint8 `[F, H, W, 3]` (rounded, clipped)."""
    return ((video.detach().float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).cpu().numpy()


@dataclass
class Video:
    """Frames `[F, H, W, 3]` uint8 at `fps`, with the settings that made them."""

    frames: np.ndarray
    fps: int = 16
    metadata: dict = field(default_factory=dict)
    # the denoised latents `[C, F', H', W']` (CPU) when a pipeline made it: continuation reads them
    latents: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {self.frames.dtype} {self.frames.shape}")

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.frames.shape[2], self.frames.shape[1]

    def to_pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(f) for f in self.frames]

    def save(self, path: str | Path, fps: int | None = None, quality: int = 18) -> Path:
        """Write .mp4 (H.264, yuv420p, CRF `quality`: lower is better, 18 ~ visually lossless),
        .gif, or a folder of PNG frames (a path without suffix). Written to a temporary name
        and renamed, so a failed write leaves nothing behind."""
        path = Path(path)
        fps = fps or self.fps
        suffix = path.suffix.lower()
        if suffix not in ("", ".mp4", ".gif"):
            raise ValueError(f"{path}: unsupported output type {suffix!r}; use .mp4, .gif or a folder for PNG frames")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            if suffix == ".mp4":
                self._write_mp4(tmp, fps, quality)
            elif suffix == ".gif":
                frames = self.to_pil()
                frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000 / fps, loop=0)
            else:
                tmp.mkdir(parents=True, exist_ok=True)
                for i, frame in enumerate(self.to_pil()):
                    frame.save(tmp / f"{i:05d}.png")
            if suffix == "" and path.exists():
                raise FileExistsError(f"{path}: folder exists; choose a new name for the PNG frames")
            tmp.replace(path)
        finally:  # also on Ctrl-C: no half-written file or frame folder stays behind
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
        return path

    def _write_mp4(self, path: Path, fps: int, quality: int) -> None:
        import av

        frames = self.frames
        h, w = frames.shape[1:3]
        # yuv420p needs even sizes: pad the odd row/column by repeating the edge.
        if h % 2 or w % 2:
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        # use_metadata_tags: keep our own keys (prompt, seed, ...) rather than only the standard ones.
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as container:
            for key, value in self.metadata.items():
                container.metadata[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if self.metadata:  # players show `comment`: all settings in one line
                container.metadata["comment"] = json.dumps(self.metadata, ensure_ascii=False)
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(quality)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def read_video(path: str | Path, *, fps: float | None = None, max_frames: int | None = None) -> Video:
    """Decode a video (mp4/webm/mov/mkv/avi/gif) to RGB frames; `fps` resamples by picking the
    nearest source frame for each output time."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise ValueError(f"{path}: has no video stream (it holds {kinds}); give a video file")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 16)
            frames, times = [], []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else len(times) / source_fps)
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable video ({err})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    array = np.stack(frames)
    if fps and abs(fps - source_fps) > 1e-3:
        start, end = times[0], times[-1] + 1 / source_fps
        wanted = np.arange(start, end - 1e-9, 1 / fps)
        index = np.clip(np.searchsorted(np.asarray(times), wanted + 0.5 / source_fps) - 1, 0, len(array) - 1)
        array = array[index]
    if max_frames:
        array = array[:max_frames]
    return Video(array, fps=int(round(fps or source_fps)))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 `[H, W, 3]`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:  # decoding would take gigabytes before the resize
                raise ValueError(f"{path}: the image is {img.width}x{img.height} ({img.width * img.height / 1e6:.0f} "
                                 f"megapixels); at most {MAX_IMAGE_PIXELS / 1e6:.0f} are read: resize it first")
            return np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as err:  # Pillow's guard, before any pixel is decoded
        raise ValueError(f"{path}: the image is too large to read ({err}); resize it first") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None


def probe_video(path: str | Path) -> tuple[int, int, float]:
    """(width, height, fps) of a video's first stream, from the container: no frame decoded."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream; give a video file")
            stream = container.streams.video[0]
            return stream.codec_context.width, stream.codec_context.height, float(
                stream.average_rate or stream.guessed_rate or 16)
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable video ({err})") from None


def read_video_fitted(path: str | Path, size: tuple[int, int], *, fps: float, max_frames: int) -> Video:
    """The first `max_frames` frames of a video at `fps` (nearest source frame, as `read_video`),
    each scaled to `size` (width, height) as it is decoded: memory holds the frames kept at
    that size, never the source's frames at full size or more of them than asked for."""
    import av

    width, height = size
    kept: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 16)
            half = 0.5 / source_fps
            previous, start, last = None, None, 0.0
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else last + 1 / source_fps
                start = time if start is None else start
                last = time
                # the output times up to this frame take the one before it
                while previous is not None and len(kept) < max_frames and len(kept) / fps + half < time - start:
                    kept.append(previous)
                if len(kept) >= max_frames:
                    break
                previous = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
            end = last - (start or 0.0) + 1 / source_fps
            while previous is not None and len(kept) < max_frames and len(kept) / fps < end - 1e-9:
                kept.append(previous)
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable video ({err})") from None
    if not kept:
        raise ValueError(f"{path}: the video has no frames")
    return Video(np.stack(kept), fps=int(round(fps)))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header: no pixel decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
