"""Video files: a `Video` of uint8 frames that saves to H.264 mp4 (PyAV), GIF or a PNG folder,
a `VideoWriter` that writes frames as they come (a long video is never held whole), and
readers for videos and images (used for video-to-video, image conditioning and training)."""

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

    def save(self, path: str | Path, fps: int | None = None, quality: int = 18,
             audio: str | Path | tuple[np.ndarray, int] | None = None) -> Path:
        """Write .mp4 (H.264, yuv420p, CRF `quality`: lower is better, 18 ~ visually lossless),
        .gif, or a folder of PNG frames (a path without suffix), through a `VideoWriter`.
        Written to a temporary name and renamed, so a failed write leaves nothing behind.
        `audio` (.mp4 only): a sound track, as `VideoWriter`'s."""
        with VideoWriter(path, fps or self.fps, quality=quality, metadata=self.metadata, keep_partial=False,
                         audio=audio) as out:
            out.write(self.frames)
        return out.path


@dataclass
class SavedVideo:
    """A video written to `path` as it was decoded (`WanPipeline(..., output_path=...)`): its
    frames are in the file, never all in memory. `len()`, `size`, `fps` and `metadata` as a
    `Video`'s; `read()` loads the frames back (as the file holds them: mp4 is lossy)."""

    path: Path
    num_frames: int
    size: tuple[int, int]  # (width, height)
    fps: int = 16
    metadata: dict = field(default_factory=dict)
    latents: object = field(default=None, repr=False, compare=False)  # as a Video's: continuation reads them

    def __len__(self) -> int:
        return self.num_frames

    def read(self) -> Video:
        if self.path.is_dir():
            frames = np.stack([read_image(p) for p in sorted(self.path.glob("*.png"))])
            return Video(frames, fps=self.fps, metadata=self.metadata)
        video = read_video(self.path)
        return Video(video.frames, fps=self.fps, metadata=self.metadata)


class VideoWriter:
    """Frames written to a video file as they come, so a long video is never held whole:
    `with VideoWriter("out.mp4", 16) as out: out.write(frames)` (uint8 `[n, H, W, 3]`, any n
    per call). .mp4 (H.264, yuv420p, CRF `quality`, odd sizes padded by the edge, `metadata`
    as tags and all of it in `comment`), a folder of PNG frames (a path without suffix: one
    file per frame as written) or .gif (collected: gifs are small).

    The file is written under a hidden temporary name and renamed to `path` at the end. When
    the writing stops on an exception (Ctrl-C too) after some frames, the file is finished
    properly, so it plays, and kept as `<stem>.partial<suffix>` (`out.partial.mp4`, named in
    `kept`); with keep_partial=False, or when no frame was written, nothing stays behind.

    `audio` (.mp4 only): an audio file's path (its first audio stream, any format PyAV reads)
    or `(samples, rate)` (float `[N]` or `[channels, N]` in [-1, 1]), written as the mp4's AAC
    track (192 kb/s, its own rate, mono or stereo: as the official S2V's ffmpeg merge) along
    the frames, and cut at the video's end; a shorter audio ends where it ends. Read here,
    before any frame: a bad file is refused first."""

    def __init__(self, path: str | Path, fps: float, *, quality: int = 18, metadata: dict | None = None,
                 keep_partial: bool = True, audio: str | Path | tuple[np.ndarray, int] | None = None):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in ("", ".mp4", ".gif"):
            raise ValueError(f"{path}: unsupported output type {self.suffix!r}; "
                             "use .mp4, .gif or a folder for PNG frames")
        if not (isinstance(quality, int) and 0 <= quality <= 51):
            raise ValueError(f"quality must be an H.264 CRF in [0, 51] (lower is better, 18 ~ visually lossless), "
                             f"got {quality!r}")
        if self.suffix == "" and self.path.exists():  # before any frame is made
            raise FileExistsError(f"{self.path}: folder exists; choose a new name for the PNG frames")
        self.fps, self.quality, self.metadata = fps, quality, dict(metadata or {})
        self.keep_partial = keep_partial
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the first frames
        self.kept: Path | None = None  # the .partial file kept after an interruption
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._container = self._stream = None
        self._gif: list[np.ndarray] = []
        if audio is not None and self.suffix != ".mp4":
            kind = self.suffix or "a folder of PNG frames"
            raise ValueError(f"{path}: an audio track needs an .mp4 output, not {kind}")
        self._audio = None if audio is None else _AudioTrack(audio, self.path)

    @property
    def partial_path(self) -> Path:
        """Where an interrupted write keeps what it wrote: out.mp4 -> out.partial.mp4."""
        return self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")

    def __enter__(self) -> "VideoWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames `[n, H, W, 3]` (or one `[H, W, 3]`) of the size of the first ones."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        size = (frames.shape[2], frames.shape[1])
        if self.size is not None and size != self.size:
            raise ValueError(f"{self.path}: frames of {size[0]}x{size[1]} after frames of "
                             f"{self.size[0]}x{self.size[1]}; a video has one size")
        self.size = size
        if self.suffix == ".mp4":
            self._write_mp4(frames)
        elif self.suffix == ".gif":
            self._gif.extend(frames)
            self.frames_written += len(frames)
        else:
            from PIL import Image

            self._tmp.mkdir(exist_ok=True)
            for frame in frames:
                Image.fromarray(frame).save(self._tmp / f"{self.frames_written:05d}.png")
                self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and give it its name."""
        try:
            self._finish()
            if self.frames_written == 0:
                raise ValueError(f"{self.path}: no frames were written")
            if self.suffix == "" and self.path.exists():
                raise FileExistsError(f"{self.path}: folder exists; choose a new name for the PNG frames")
            self._tmp.replace(self.path)
        finally:
            self._remove_tmp()
        return self.path

    def _abort(self) -> None:
        """Stopped part-way: keep what was written as a finished .partial file, or nothing."""
        try:
            if self.keep_partial and self.frames_written:
                self._finish()
                if self.suffix == "" and self.partial_path.exists():
                    import shutil

                    shutil.rmtree(self.partial_path)  # a folder of frames from an earlier stop
                self._tmp.replace(self.partial_path)
                self.kept = self.partial_path
        except Exception:  # noqa: BLE001 (the exception on its way out is the one to report)
            pass
        finally:
            self._remove_tmp()

    def _finish(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            try:
                for packet in self._stream.encode():  # flush the frames the encoder holds
                    container.mux(packet)
                if self._audio is not None:  # the sound up to the video's end, and what the encoder holds
                    self._audio.write(container, self.frames_written / self.fps, last=True)
            finally:
                container.close()
        elif self._gif:
            from PIL import Image

            frames = [Image.fromarray(f) for f in self._gif]
            frames[0].save(self._tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000 / self.fps,
                           loop=0)

    def _remove_tmp(self) -> None:
        if self._container is not None:  # stopped in a way that left it open
            self._container.close()
            self._container = None
        if self._tmp.is_dir():
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
        elif self._tmp.exists():
            self._tmp.unlink()

    def _write_mp4(self, frames: np.ndarray) -> None:
        import av

        h, w = frames.shape[1:3]
        # yuv420p needs even sizes: pad the odd row/column by repeating the edge.
        if h % 2 or w % 2:
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._container is None:
            # use_metadata_tags: keep our own keys (prompt, seed, ...) rather than only the standard ones.
            container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "use_metadata_tags"})
            self._container = container
            for key, value in self.metadata.items():
                container.metadata[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if self.metadata:  # players show `comment`: all settings in one line
                container.metadata["comment"] = json.dumps(self.metadata, ensure_ascii=False)
            self._stream = container.add_stream("libx264", rate=Fraction(self.fps))
            self._stream.width, self._stream.height = frames.shape[2], frames.shape[1]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.quality)}
            if self._audio is not None:
                self._audio.add_stream(container)
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
            self.frames_written += 1
        if self._audio is not None:  # the sound along the frames, so the file interleaves as it grows
            self._audio.write(self._container, self.frames_written / self.fps)


class _AudioTrack:
    """A VideoWriter's sound: the samples `[channels, N]` float32 at `rate`, encoded as AAC up
    to the time the frames reach."""

    BITRATE = 192_000  # the official merge_video_audio's `-b:a 192k`
    AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)

    def __init__(self, audio, path: Path):
        if isinstance(audio, (str, Path)):
            from .audio import _decode

            samples, rate = _decode(audio, layout=None)
            if samples.shape[0] > 2:  # the track here is mono or stereo: FFmpeg mixes a surround file down
                samples, rate = _decode(audio, layout="stereo")
        else:
            try:
                samples, rate = audio
            except (TypeError, ValueError):
                raise ValueError(f"{path}: audio must be a file path or (samples, rate), "
                                 f"got {type(audio).__name__}") from None
            samples = np.asarray(samples, dtype=np.float32)
            samples = samples[None] if samples.ndim == 1 else samples
            if samples.ndim != 2 or samples.shape[0] not in (1, 2) or not samples.shape[1]:
                raise ValueError(f"{path}: audio samples must be [N] or [channels (1 or 2), N] with N > 0, "
                                 f"got shape {tuple(np.shape(audio[0]))}")
            if not (isinstance(rate, (int, np.integer)) and rate > 0):
                raise ValueError(f"{path}: audio rate must be a positive integer (Hz), got {rate!r}")
        if rate not in self.AAC_RATES:  # FFmpeg's AAC encoder takes these only
            from .audio import resample

            samples, rate = np.stack([resample(channel, rate, 48_000) for channel in samples]), 48_000
        self.samples, self.rate = np.ascontiguousarray(samples), int(rate)
        self.written = 0  # samples handed to the encoder
        self.stream = None

    def add_stream(self, container) -> None:
        self.stream = container.add_stream("aac", rate=self.rate)
        self.stream.layout = "mono" if self.samples.shape[0] == 1 else "stereo"
        self.stream.bit_rate = self.BITRATE

    def write(self, container, seconds: float, last: bool = False) -> None:
        """Encode the samples up to `seconds` (whole encoder frames unless `last`), then flush if `last`."""
        import av

        end = min(self.samples.shape[1], round(seconds * self.rate))
        size = self.stream.codec_context.frame_size or 1024
        layout = "mono" if self.samples.shape[0] == 1 else "stereo"
        while self.written < end and (last or end - self.written >= size):
            chunk = self.samples[:, self.written:min(end, self.written + size)]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = self.rate, self.written
            self.written += chunk.shape[1]
            for packet in self.stream.encode(frame):
                container.mux(packet)
        if last:
            for packet in self.stream.encode():
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
