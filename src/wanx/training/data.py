"""Training data: a folder of videos and images with captions, read into items, sorted into
(height, width, frames) buckets, and each item loaded as uint8 frames that fit its bucket.

Pure data handling: no model, no tensors on a device. `wanx prepare` calls these, encodes the
frames with the VAE and the captions with T5, and caches the latents per bucket.

Two dataset layouts are read (the ones users bring from DiffSynth and musubi-tuner):

    folder/metadata.csv          file_name,text   (or folder/train/metadata.csv; names relative to it)
    folder/clip.mp4 + clip.txt   a caption file of the same stem beside each video or image

A VACE dataset's metadata.csv adds, per item, `control_video` (the control or source frames,
pixel-aligned with the item), `mask` (a video or an image, white = generate; empty: all white)
and `reference_images` (image files separated by `|`); see `VACE_COLUMNS`.

Nothing is dropped silently: a file that cannot be used is skipped with a reason in words,
collected in a `DatasetReport` (users lose hours to buckets dropped without a word).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from wanx.configs import frames_ok
from wanx.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image, read_video

METADATA = "metadata.csv"
COLUMNS = ("file_name", "text")
# A VACE item's inputs (`wanx prepare` caches its VACE context): the control or source frames, the
# mask (white = generate) and reference images, `REFERENCE_SEPARATOR`-separated (a character no
# Windows file name holds, and the one `--validation-prompts` separates with).
VACE_COLUMNS = ("control_video", "mask", "reference_images")
REFERENCE_SEPARATOR = "|"
# Control videos and masks are resized and centre-cropped as the item is, so they must have its
# aspect ratio (within this, on a log scale: under 1%, a pixel or two of crop) to stay aligned.
ASPECT_TOLERANCE = 0.01
AREA_480P = 832 * 480
# (width, height) ratios; landscape, square and portrait, so no clip loses much to the crop.
ASPECTS = ((16, 9), (3, 2), (4, 3), (1, 1), (3, 4), (2, 3), (9, 16))
FRAME_COUNTS = (17, 33, 49, 65, 81)  # 4k+1: the VAE packs 1 + 4k frames into 1 + k latents
FPS = 16  # Wan2.1's training and output frame rate

Kind = Literal["video", "image"]
Mode = Literal["start", "uniform"]


@dataclass(frozen=True)
class Item:
    """One training example: a video or image file and its caption. Images are 1-frame videos."""

    path: Path
    caption: str
    kind: Kind = "video"
    # VACE inputs (the `VACE_COLUMNS` of metadata.csv); `where` names the item's csv line in errors
    control: Path | None = None
    mask: Path | None = None
    references: tuple[Path, ...] = ()
    where: str = field(default="", compare=False)

    @property
    def vace(self) -> bool:
        return self.control is not None or self.mask is not None or bool(self.references)


@dataclass(frozen=True)
class Clip:
    """An item with its size and length, read from the file's header (see `probe`)."""

    item: Item
    height: int
    width: int
    frame_count: int
    fps: float


class Bucket(NamedTuple):
    """Every example in a bucket is loaded at this size, so a batch stacks into one tensor."""

    height: int
    width: int
    num_frames: int


class SkippedItem(ValueError):
    """An item that cannot be used (unreadable, corrupt, too short); `reason` says why in words,
    and for a clip too short, `frames` how many it holds (at the target frame rate)."""

    def __init__(self, reason: str, frames: int | None = None):
        super().__init__(reason)
        self.reason, self.frames = reason, frames


@dataclass
class DatasetReport:
    """The files left out of training, each with the reason, for one summary line to the user."""

    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # clips skipped as too short -> the frames each holds, so that the user can be told which
    # --frames would keep them
    short: dict[Path, int] = field(default_factory=dict)

    def add(self, path: str | Path, reason: str, frames: int | None = None) -> None:
        self.skipped.append((Path(path), reason))
        if frames is not None:
            self.short[Path(path)] = frames

    def summary(self, shown: int = 3) -> str:
        """One line: how many files were skipped and why, the first `shown` by name."""
        if not self.skipped:
            return "no files skipped"
        listed = "; ".join(f"{path.name} ({reason})" for path, reason in self.skipped[:shown])
        more = f"; and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        noun = "file" if len(self.skipped) == 1 else "files"
        return f"{len(self.skipped)} {noun} skipped: {listed}{more}"


# ----------------------------------------------------------------------------- finding items


def find_items(folder: str | Path, report: DatasetReport | None = None, *, captions: bool = True) -> list[Item]:
    """The dataset's items, from `metadata.csv` (in `folder` or `folder/train`) if there is one,
    else from each video/image with a same-stem `.txt` caption (searched recursively).

    Files that cannot be used (a csv row naming a missing file, a video without a caption, an
    empty caption: almost always a mistake, and caption dropout trains the empty prompt on
    purpose) are added to `report` with the reason; without a report the first one raises, so
    nothing is left out silently either way. captions=False keeps items with empty captions
    (for what trains without text, such as the VAE)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such dataset folder")
    strict = report is None
    report = report if report is not None else DatasetReport()
    csv_path = next((p for p in (folder / METADATA, folder / "train" / METADATA) if p.is_file()), None)
    items = _items_from_csv(csv_path, report, captions) if csv_path else _items_from_captions(folder, report, captions)
    if strict and report.skipped:
        path, reason = report.skipped[0]
        raise ValueError(f"{path}: {reason}")
    if not items:
        if report.skipped:
            raise ValueError(f"{folder}: no usable items; {report.summary()}")
        raise ValueError(f"{folder}: empty dataset; give a {METADATA} with columns file_name,text, "
                         f"or video/image files each with a same-name .txt caption")
    return items


def _items_from_csv(csv_path: Path, report: DatasetReport, captions: bool = True) -> list[Item]:
    """Rows of `file_name,text`; quoted fields may hold commas and newlines. `utf-8-sig`
    because spreadsheet programs start their UTF-8 exports with a byte-order mark."""
    items = []
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not set(COLUMNS) <= set(columns):
            raise ValueError(f"{csv_path}: needs columns file_name,text; it has {','.join(columns) or 'none'}")
        reader.fieldnames = columns
        for row in reader:
            name = (row["file_name"] or "").strip()
            where = f"{csv_path.name} line {reader.line_num}"
            path = csv_path.parent / name
            if not name:
                report.add(csv_path, f"{where}: empty file_name")
            elif not path.is_file():
                report.add(path, f"{where}: no such file {name}")
            elif (kind := _kind(path)) is None:
                report.add(path, f"{where}: not a video or image ({path.suffix or 'no suffix'})")
            elif not (text := (row["text"] or "").strip()) and captions:  # a short row has text None
                report.add(path, f"{where}: no caption")
            else:
                items.append(Item(path, text, kind, **_vace_inputs(row, csv_path.parent, where, name)))
    return items


def _vace_inputs(row: dict, folder: Path, where: str, name: str) -> dict:
    """The VACE columns of a csv row as Item fields; a named file that is missing or of the wrong
    kind stops the run in one line naming the row and the column (a typo in a column usually
    breaks every row: better said once, at once, than found in a report after encoding)."""
    item = f"{where} ({name})"

    def file(column: str, given: str, kinds: tuple[str, ...]) -> Path:
        path = folder / given
        if not path.is_file():
            raise ValueError(f"{item}: {column}: no such file {given}")
        if _kind(path) not in kinds:
            raise ValueError(f"{item}: {column}: {given} is not {' or '.join(f'a {k}' for k in kinds)}")
        return path

    cell = {c: (row.get(c) or "").strip() for c in VACE_COLUMNS}
    control = file("control_video", cell["control_video"], ("video", "image")) if cell["control_video"] else None
    mask = file("mask", cell["mask"], ("video", "image")) if cell["mask"] else None
    if mask is not None and control is None:
        raise ValueError(f"{item}: mask marks what to generate in control_video: give that too")
    names = [n.strip() for n in cell["reference_images"].split(REFERENCE_SEPARATOR)] if cell["reference_images"] else []
    if any(not n for n in names):
        raise ValueError(f"{item}: reference_images: an empty name in {cell['reference_images']!r} (image files "
                         f"separated by {REFERENCE_SEPARATOR})")
    references = tuple(file("reference_images", n, ("image",)) for n in names)
    return {"control": control, "mask": mask, "references": references, "where": where}


def _items_from_captions(folder: Path, report: DatasetReport, captions: bool = True) -> list[Item]:
    items = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or _kind(path) is None or _hidden(path.relative_to(folder)):
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            report.add(path, f"no caption file {caption.name}")
            continue
        text = caption.read_text(encoding="utf-8-sig").strip()
        if not text and captions:
            report.add(path, f"no caption ({caption.name} is empty)")
            continue
        items.append(Item(path, text, _kind(path)))
    return items


def _kind(path: Path) -> Kind | None:
    suffix = path.suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def _hidden(relative: Path) -> bool:
    """Dot-files and dot-folders (.partial writes, .cache) are not dataset files."""
    return any(part.startswith(".") for part in relative.parts)


# ------------------------------------------------------------------- frame sampling and sizing


def sample_frames(frames: np.ndarray, fps: float, *, num_frames: int, target_fps: float | None = FPS,
                  frame_stride: int | None = None, mode: Mode = "start") -> np.ndarray | None:
    """`num_frames` of `frames` `[F, H, W, 3]`, or None when the clip is too short.

    The clip is first resampled to `target_fps` (the nearest source frame for each output time,
    ties to the earlier one), or, with `frame_stride`, every `frame_stride`-th frame is taken
    instead. Then `mode="start"` takes the first `num_frames`; `mode="uniform"` spreads them
    evenly from the first to the last, so the whole clip is seen (at a faster pace when it is
    longer than `num_frames / target_fps` seconds)."""
    _check_frame_count(num_frames)
    if mode not in ("start", "uniform"):
        raise ValueError(f"mode must be 'start' or 'uniform', got {mode!r}")
    index = resample_index(len(frames), fps, target_fps=target_fps, frame_stride=frame_stride)
    if len(index) < num_frames:
        return None
    if mode == "start":
        return frames[index[:num_frames]]
    return frames[index[np.floor(np.linspace(0, len(index) - 1, num_frames) + 0.5).astype(int)]]


def resample_index(count: int, fps: float, *, target_fps: float | None = FPS,
                   frame_stride: int | None = None) -> np.ndarray:
    """Source frame indices of a `count`-frame clip at `fps` seen at `target_fps` (or every
    `frame_stride`-th frame); the same rule as `read_video(fps=...)`, so both agree."""
    if frame_stride is not None:
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be at least 1, got {frame_stride}")
        return np.arange(0, count, frame_stride)
    if target_fps is None or abs(target_fps - fps) < 1e-3:
        return np.arange(count)
    n = math.ceil(count * target_fps / fps - 1e-6)  # output times k / target_fps within the clip
    source = np.arange(n) * (fps / target_fps)  # in source frames
    return np.clip(np.ceil(source + 0.5 - 1e-6).astype(int) - 1, 0, count - 1)


def resize_crop(frames: np.ndarray, height: int, width: int, mode: str = "bicubic") -> np.ndarray:
    """Frames `[F, H, W, 3]` uint8 scaled (aspect kept) to cover `height x width`, then
    centre-cropped to it. Bicubic with antialiasing, so downscaled frames do not alias;
    mode="nearest-exact" for a mask, which stays black and white."""
    import torch
    import torch.nn.functional as F

    h, w = frames.shape[1:3]
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for start in range(0, len(frames), 16):  # 16 frames at a time: 81 float 1080p frames are 2 GB
        chunk = torch.from_numpy(frames[start:start + 16]).permute(0, 3, 1, 2).float()
        if mode == "bicubic":
            chunk = F.interpolate(chunk, size=size, mode="bicubic", antialias=True, align_corners=False)
        else:
            chunk = F.interpolate(chunk, size=size, mode=mode)
        chunk = chunk[:, :, top:top + height, left:left + width].round().clamp(0, 255)
        out[start:start + 16] = chunk.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _check_frame_count(num_frames: int) -> None:
    if not frames_ok(num_frames):
        raise ValueError(f"num_frames must be 4k+1 (1, 5, ..., 81), got {num_frames}")


# ------------------------------------------------------------------------------------ buckets


def bucket_size(aspect: float, area: int = AREA_480P) -> tuple[int, int]:
    """(height, width) for height/width = `aspect` within `area`, multiples of 16: the rule of
    `pipeline.conditioning.base.size_for_image`, the official I2V sizing, so training and inference sizes agree."""
    lat_h = round(math.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = round(math.sqrt(area / aspect) // 8 // 2 * 2)
    if min(lat_h, lat_w) < 2:
        raise ValueError(f"area {area} leaves a side under 16 pixels at aspect {aspect:.3g}; give a larger area")
    return lat_h * 8, lat_w * 8


def probe(item: Item) -> Clip:
    """The item's size and frame count from the file header, without decoding the frames
    (a container that does not store its frame count is decoded once to count them)."""
    if item.kind == "image":
        from PIL import Image

        try:
            with Image.open(item.path) as img:
                return Clip(item, img.height, img.width, 1, FPS)
        except (OSError, ValueError) as err:
            raise SkippedItem(f"not a readable image ({err})") from None
    import av

    try:
        with av.open(str(item.path)) as container:
            if not container.streams.video:
                raise SkippedItem("no video stream")
            stream = container.streams.video[0]
            # rounded as `read_video` rounds it, so a bucket's frame count is what `load_item` finds
            fps = float(round(stream.average_rate or stream.guessed_rate or FPS))
            count = stream.frames or sum(1 for _ in container.decode(stream))
            height, width = stream.codec_context.height, stream.codec_context.width
    except (av.error.FFmpegError, OSError) as err:
        raise SkippedItem(f"not a readable video ({err})") from None
    if not count or not height or not width:
        raise SkippedItem("the video has no frames")
    return Clip(item, height, width, count, fps)


def assign_buckets(clips: Iterable[Clip], *, area: int = AREA_480P,
                   aspects: Sequence[tuple[int, int]] = ASPECTS, frame_counts: Sequence[int] = FRAME_COUNTS,
                   target_fps: float | None = FPS, frame_stride: int | None = None, min_items: int = 1,
                   report: DatasetReport | None = None) -> dict[Bucket, list[Clip]]:
    """Clips sorted into buckets: the size of the nearest of `aspects` (width:height) within
    `area`, and the largest of `frame_counts` the clip holds at `target_fps`; images get 1 frame.

    A bucket with fewer than `min_items` clips is merged into the nearest other bucket (nearest
    aspect, then frame count) that its clips can fill: one with fewer or as many frames, of the
    same kind (video/image). A bucket with no such neighbour is kept as it is, never dropped.
    Videos too short for the smallest frame count go to `report` (without one, they raise)."""
    for n in frame_counts:
        _check_frame_count(n)
    sizes = [bucket_size(h / w, area) for w, h in aspects]
    buckets: dict[Bucket, list[Clip]] = {}
    for clip in clips:
        height, width = min(sizes, key=lambda s: _aspect_distance(s[0] / s[1], clip.height / clip.width))
        try:
            frames = 1 if clip.item.kind == "image" else _frame_bucket(clip, frame_counts, target_fps, frame_stride)
        except SkippedItem as err:
            if report is None:
                raise ValueError(f"{clip.item.path}: {err.reason}") from None
            report.add(clip.item.path, err.reason, err.frames)
            continue
        buckets.setdefault(Bucket(height, width, frames), []).append(clip)
    _merge_small(buckets, min_items)
    return dict(sorted(buckets.items()))


def _frame_bucket(clip: Clip, frame_counts: Sequence[int], target_fps: float | None,
                  frame_stride: int | None) -> int:
    available = len(resample_index(clip.frame_count, clip.fps, target_fps=target_fps, frame_stride=frame_stride))
    fitting = [n for n in frame_counts if n <= available]
    if not fitting:
        raise SkippedItem(_too_short(available, min(frame_counts), clip.fps, target_fps, frame_stride), available)
    return max(fitting)


def _merge_small(buckets: dict[Bucket, list[Clip]], min_items: int) -> None:
    """Merge under-filled buckets, smallest first, until none has a neighbour to go to."""
    while True:
        small = [b for b in buckets if len(buckets[b]) < min_items and _targets(b, buckets)]
        if not small:
            return
        source = min(small, key=lambda b: (len(buckets[b]), b))
        target = min(_targets(source, buckets), key=lambda b: (
            _aspect_distance(b.height / b.width, source.height / source.width),
            source.num_frames - b.num_frames, b))
        buckets[target].extend(buckets.pop(source))


def _targets(source: Bucket, buckets: dict[Bucket, list[Clip]]) -> list[Bucket]:
    """Buckets the source's clips can fill: no more frames than they hold, and images stay
    with images (a 1-frame bucket of video stills would train a different thing)."""
    return [b for b in buckets if b != source and b.num_frames <= source.num_frames
            and (b.num_frames == 1) == (source.num_frames == 1)]


def _aspect_distance(a: float, b: float) -> float:
    """Aspect ratios compared on a log scale, so 2:1 and 1:2 are equally far from 1:1."""
    return abs(math.log(a / b))


def _too_short(available: int, needed: int, fps: float, target_fps: float | None, frame_stride: int | None) -> str:
    if frame_stride is not None:
        return f"{available} frames at stride {frame_stride}, needs {needed}"
    return f"{available} frames at {target_fps or fps:g} fps, needs {needed}"


# ------------------------------------------------------------------------------------ loading


def load_item(item: Item, *, height: int, width: int, num_frames: int, target_fps: float | None = FPS,
              frame_stride: int | None = None, mode: Mode = "start", resize: str = "bicubic") -> np.ndarray:
    """The item as uint8 frames `[num_frames, height, width, 3]`, sampled (`sample_frames`) and
    resized and centre-cropped (`resize_crop`); raises `SkippedItem` with the reason for a
    file that is unreadable, corrupt or too short."""
    _check_frame_count(num_frames)
    try:
        if item.kind == "image":
            frames, fps = read_image(item.path)[None], float(target_fps or FPS)
        else:
            video = read_video(item.path)
            frames, fps = video.frames, float(video.fps)
    except (ValueError, OSError) as err:
        raise SkippedItem(str(err).removeprefix(f"{item.path}: ")) from None
    sampled = sample_frames(frames, fps, num_frames=num_frames, target_fps=target_fps,
                            frame_stride=frame_stride, mode=mode)
    if sampled is None:
        available = len(resample_index(len(frames), fps, target_fps=target_fps, frame_stride=frame_stride))
        if item.kind == "image":
            raise SkippedItem(f"an image is 1 frame, needs {num_frames}")
        raise SkippedItem(_too_short(available, num_frames, fps, target_fps, frame_stride), available)
    return resize_crop(sampled, height, width, resize)


# ------------------------------------------------------------------------------------- VACE


def check_vace(item: Item, bucket: Bucket, *, target_fps: float | None = FPS, frame_stride: int | None = None) -> None:
    """Before anything is encoded: the item's control video holds its bucket's frames (at
    `target_fps`), a mask video too, and both have the item's aspect ratio: they are resized and
    centre-cropped to the bucket exactly as the item is (`load_vace`), so a control video of
    another resolution is fine, another shape would be cut elsewhere and no longer line up.
    One line naming the item and the column. An unreadable item itself is left to be skipped."""
    try:
        source = probe(item)
    except SkippedItem:
        return
    for column, path in (("control_video", item.control), ("mask", item.mask)):
        if path is None:
            continue
        try:
            clip = probe(Item(path, "", _kind(path)))
        except SkippedItem as err:
            raise ValueError(f"{item_name(item)}: {column}: {path.name}: {err.reason}") from None
        if abs(math.log((clip.height / clip.width) / (source.height / source.width))) > ASPECT_TOLERANCE:
            raise ValueError(f"{item_name(item)}: {column} {path.name} is {clip.width}x{clip.height}, the clip "
                             f"{source.width}x{source.height}: give it the clip's aspect ratio (both are resized and "
                             f"cropped to {bucket.width}x{bucket.height})")
        if column == "mask" and clip.item.kind == "image":
            continue  # one mask for every frame
        held = 1 if clip.item.kind == "image" else len(
            resample_index(clip.frame_count, clip.fps, target_fps=target_fps, frame_stride=frame_stride))
        if held < bucket.num_frames:
            raise ValueError(f"{item_name(item)}: {column} {path.name} has {held} frames at {target_fps or clip.fps:g} "
                             f"fps; the clip is trained on {bucket.num_frames}: give a longer one, or fewer --frames")


def load_vace(item: Item, bucket: Bucket, *, target_fps: float | None = FPS,
              frame_stride: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The item's control frames and mask as uint8 `[F, H, W, 3]` at its bucket (None where not
    given), sampled, resized and centre-cropped as `load_item` does the item; the mask by nearest
    pixel (it stays black and white), a mask image repeated for every frame."""
    def frames(path: Path, column: str, resize: str) -> np.ndarray:
        try:
            return load_item(Item(path, "", _kind(path)), height=bucket.height, width=bucket.width,
                             num_frames=bucket.num_frames, target_fps=target_fps, frame_stride=frame_stride,
                             resize=resize)
        except SkippedItem as err:
            raise ValueError(f"{item_name(item)}: {column}: {path.name}: {err.reason}") from None

    control = frames(item.control, "control_video", "bicubic") if item.control is not None else None
    mask = None
    if item.mask is not None:
        if _kind(item.mask) == "image":
            try:
                image = read_image(item.mask)
            except (ValueError, OSError) as err:
                raise ValueError(f"{item_name(item)}: mask: {item.mask.name}: {err}") from None
            mask = np.repeat(resize_crop(np.array(image[None]), bucket.height, bucket.width, "nearest-exact"),
                             bucket.num_frames, axis=0)
        else:
            mask = frames(item.mask, "mask", "nearest-exact")
    return control, mask


def item_name(item: Item) -> str:
    """How errors name an item: its metadata.csv line and file."""
    return f"{item.where} ({item.path.name})" if item.where else str(item.path)
