"""`wanx prepare`: every item of a dataset VAE-encoded and umT5-encoded once, before training.

Each item becomes one `.safetensors` file in the cache folder (no pickles): `latents`
`[16, F', H/8, W/8]` and `context` `[tokens, 4096]` (the prompt's true tokens), with the
settings it was made with and its caption in the file's metadata. An item whose file exists
with the same settings is skipped, so a stopped run resumes; one made with other settings
(size, frames, fps, model) is made again. Files that cannot be used (unreadable, corrupt, too
short) are skipped with the reason, listed at the end and in `prepare-report.txt`, and never
stop the run. For I2V (FLF2V) models each item also holds the first (and last) frame's
conditioning, `clip_features` and `y`, as the pipeline computes them. `empty-text.safetensors`
holds the umT5 embedding of the empty prompt: items trained with caption dropout see it, the
same unconditional text `wanx generate --negative-prompt ""` gives. For a VACE model each
item also holds `vace_context` `[96, R + F', H/8, W/8]`, made from its control video, mask and
R reference images (the metadata.csv columns of `data.VACE_COLUMNS`) by the VACE task's own
preprocessing (`pipeline.conditioning.vace`); training puts the reference latents (its first 16
channels of the R leading frames) in front of the clip's, as the latents are at generation.

Started by `accelerate launch` (or torchrun), each process encodes its share of the items.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import (FPS, FRAME_COUNTS, METADATA, VACE_COLUMNS, Bucket, DatasetReport, Item, SkippedItem, assign_buckets,
                   check_vace, find_items, item_name, load_item, load_vace, probe)
from ..configs import frames_at_most
from ..video import to_unit

CACHE_VERSION = 1
REPORT_FILE = "prepare-report.txt"
EMPTY_TEXT_FILE = "empty-text.safetensors"  # not an item: `cached_items` leaves it out


@dataclass
class PrepareReport:
    cache: Path
    encoded: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)
    skipped: DatasetReport = field(default_factory=DatasetReport)
    buckets: dict[Bucket, int] = field(default_factory=dict)
    frames: int = 81  # the settings it was made with, for the advice when nothing could be used
    fps: float = FPS
    bucketed: bool = False
    processes: int = 1  # that shared the work (accelerate launch, torchrun)

    def nothing_prepared(self) -> str | None:
        """None when the cache holds items; else one line saying why none, and which --frames
        would keep the clips that were too short (users otherwise find an empty cache at `train`)."""
        if self.encoded or self.reused:
            return None
        line = f"nothing was prepared in {self.cache}: {self.skipped.summary()}"
        if self.skipped.short:
            shortest = min(self.skipped.short.values())
            fits = frames_at_most(shortest)
            line += (f"; the shortest clip has {shortest} frames at {self.fps:g} fps: give --frames {fits} "
                     f"(4k+1, at most {shortest}) to keep every clip")
            if not self.bucketed and max(self.skipped.short.values()) >= min(FRAME_COUNTS):
                line += ", or --buckets (each clip at the most frames it holds, up to --frames)"
        return line

    def summary(self) -> str:
        sizes = ", ".join(f"{b.width}x{b.height}x{b.num_frames}: {n}" for b, n in self.buckets.items())
        by = f" by {self.processes} processes" if self.processes > 1 else ""
        line = f"{len(self.encoded)} encoded{by}, {len(self.reused)} already cached in {self.cache} (buckets {sizes or '-'})"
        if self.skipped.skipped:
            line += f"; {self.skipped.summary()}"
        return line


def cache_file(cache: Path, dataset: Path, item: Item) -> Path:
    """One file per source, named by its stem and a hash of its path within the dataset."""
    relative = str(item.path.resolve().relative_to(dataset.resolve())) if item.path.is_absolute() else str(item.path)
    digest = hashlib.sha1(relative.encode("utf-8")).hexdigest()[:10]
    return cache / f"{item.path.stem[:60]}-{digest}.safetensors"


def prepare(dataset: str | Path, files, *, cache: str | Path | None = None, size: tuple[int, int] | None = None,
            buckets: bool = False, frames: int | None = None, fps: float = FPS, runtime=None,
            progress: bool = True) -> PrepareReport:
    """Encode every usable item of `dataset` with the VAE and umT5 of `files`
    (`wanx.hub.find_components`). size: (width, height) every item is resized and cropped to,
    or with `buckets` the area of the resolution buckets (several aspect ratios, frame counts
    up to `frames`); frames: 4k+1. Left unset, both are the model's own (`model_geometry`)."""
    from ..runtime import Runtime

    dataset = Path(dataset)
    cache = Path(cache) if cache is not None else dataset / ".wanx-cache"
    size, frames = model_geometry(files, size, frames)
    runtime = runtime or Runtime.create()
    check_memory(files, runtime, size, frames)  # before any clip is read
    report = PrepareReport(cache, frames=frames, fps=fps, bucketed=buckets)
    items = find_items(dataset, report.skipped)
    conditioning = _conditioning(files)
    _check_vace_items(dataset, items, conditioning == "vace", files.model_type)
    plans = _plan(items, size=size, buckets=buckets, frames=frames, fps=fps, report=report)
    for item, bucket in plans:
        if item.vace:  # before anything is encoded
            check_vace(item, bucket, target_fps=fps)
    fingerprint = _fingerprint(files)
    rank, processes = _share(runtime.device)
    report.processes = processes
    if rank == 0 and cache.is_dir():  # half-written items of a killed run (see _save_atomic) no process writes now
        for stale in cache.glob(".*.safetensors.partial"):
            stale.unlink(missing_ok=True)
    if processes > 1:  # the cleanup is done before any process writes
        _barrier()
    todo = []
    # each process takes its share by position among all items, not among those left to encode:
    # a process that starts late sees others' finished files, and must not shift the shares
    for item, bucket in plans[rank::processes]:
        path = cache_file(cache, dataset, item)
        settings = {"version": CACHE_VERSION, "model": fingerprint, "height": bucket.height,
                    "width": bucket.width, "frames": bucket.num_frames, "fps": fps}
        if conditioning:
            settings["conditioning"] = conditioning
        if item.vace:  # another control video, mask or reference names another item
            settings["vace"] = [str(p.name) if p is not None else None for p in (item.control, item.mask)] + \
                [p.name for p in item.references]
        settings = json.dumps(settings, sort_keys=True)
        if path.is_file() and _settings_of(path) == settings:
            report.reused.append(path)
            continue
        todo.append((item, bucket, path, settings))
    empty_text = cache / EMPTY_TEXT_FILE
    write_empty = rank == 0 and _settings_of(empty_text) != fingerprint
    if todo or write_empty:
        cache.mkdir(parents=True, exist_ok=True)
        vae, text_encoder, image_encoder, device = _encoders(files, runtime, progress)
    if write_empty:
        with torch.no_grad():
            embeddings, lengths = text_encoder.encode([""])
        _save_atomic({"context": embeddings[0, : int(lengths[0])].float().cpu().contiguous()}, empty_text,
                     {"settings": fingerprint, "caption": ""})
    if todo:
        from tqdm.auto import tqdm

        for item, bucket, path, settings in tqdm(todo, desc="preparing", unit="item", disable=not progress or rank):
            try:
                pixels = load_item(item, height=bucket.height, width=bucket.width, num_frames=bucket.num_frames,
                                   target_fps=fps)
            except SkippedItem as err:
                report.skipped.add(item.path, err.reason, err.frames)
                if report.buckets.get(bucket):  # the summary counts what was cached
                    report.buckets[bucket] -= 1
                continue
            with torch.no_grad():
                video = to_unit(pixels)[None].to(device)
                tiles = dict(tile_size=512, tile_stride=448) if bucket.height * bucket.width > 512 * 512 else {}
                latents = vae.encode(video, **tiles)[0].float().cpu().contiguous()  # [16, F', h, w]
                embeddings, lengths = text_encoder.encode([item.caption])
                tensors = {"latents": latents,
                           "context": embeddings[0, : int(lengths[0])].contiguous()}  # the prompt's true tokens
                if conditioning == "vace":
                    tensors["vace_context"] = _vace_context(vae, item, bucket, fps, device)
                elif conditioning:
                    tensors.update(_image_inputs(image_encoder, vae, video[0], conditioning, device))
            _save_atomic(tensors, path, {"settings": settings, "caption": item.caption, "source": str(item.path)})
            report.encoded.append(path)
    if processes > 1:  # one report for all: the main process writes it
        from accelerate.utils import gather_object

        skipped = gather_object(report.skipped.skipped)
        encoded = gather_object(report.encoded)
        reused = gather_object(report.reused)
        short = gather_object(list(report.skipped.short.items()))
        report.skipped.skipped[:] = list(dict.fromkeys(skipped))  # items every process probed are listed once
        report.encoded[:] = encoded
        report.reused[:] = reused
        report.skipped.short.update(short)
        if rank:
            return report
    if report.skipped.skipped:
        cache.mkdir(parents=True, exist_ok=True)
        lines = [f"{path}\t{reason}" for path, reason in report.skipped.skipped]
        (cache / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


@contextlib.contextmanager
def writing(path: Path, then: str, tmp: Path | None = None):
    """Around a write of `path` (through `tmp`, a file or a folder the caller renames): a
    failed write (a full disk, a file-size limit) removes `tmp` and becomes one line naming
    `path` and `then`, the way to go on, instead of the writer's traceback. safetensors and
    torch.save report such failures in their own error types, not as OSError."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:160]
        raise ValueError(f"cannot write {path} ({reason}); nothing half-written is kept: {then}") from None


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.partial")
    with writing(path, "make room and run `wanx prepare` again (the items already written are kept)", tmp):
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)


def _settings_of(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("settings")
    except Exception:  # safetensors' own error types: a damaged file is simply made again
        return None


def _plan(items: list[Item], *, size: tuple[int, int], buckets: bool, frames: int, fps: float,
          report: PrepareReport) -> list[tuple[Item, Bucket]]:
    """Each usable item with the (height, width, frames) it is encoded at."""
    width, height = size
    if not buckets:
        bucket = Bucket(height, width, frames)
        report.buckets = {bucket: len(items)}
        return [(item, Bucket(height, width, 1) if item.kind == "image" else bucket) for item in items]
    clips = []
    for item in items:
        try:
            clips.append(probe(item))
        except SkippedItem as err:
            report.skipped.add(item.path, err.reason)
    counts = [n for n in FRAME_COUNTS if n <= frames] or [frames]
    sorted_clips = assign_buckets(clips, area=width * height, frame_counts=counts, target_fps=fps, report=report.skipped)
    report.buckets = {bucket: len(members) for bucket, members in sorted_clips.items()}
    return [(clip.item, bucket) for bucket, members in sorted_clips.items() for clip in members]


def _share(device) -> tuple[int, int]:
    """(this process, processes) when started by accelerate launch or torchrun; (0, 1) alone.
    On CPU the process group is gloo's, which accelerate sets up only when told `cpu=True`
    (without it each process of `--multi_gpu` believes it is alone and encodes every item)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes != world:  # never each process doing all the work unnoticed
        raise RuntimeError(f"started as {world} processes, but accelerate sees {state.num_processes} "
                           f"({state.distributed_type}); start them with `accelerate launch` or `torchrun`")
    return state.process_index, state.num_processes


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _conditioning(files) -> str | None:
    """What the model's task conditions on besides text (cached with each item): its first
    frame, or its first and last frames, or a VACE model's context; None for text alone."""
    from ..tasks import default_task

    if files.model_type == "vace":
        return "vace"
    needs = default_task(files.model_type, 2 if files.moe else 1).needs
    return {("image",): "first-frame", ("image", "last_image"): "first-last-frame"}.get(needs)


def _check_vace_items(dataset: Path, items: list[Item], vace: bool, model_type: str) -> None:
    """VACE columns need a VACE model, and a VACE model needs them on every item (a plain text
    dataset on a VACE model is almost always the wrong dataset)."""
    from ..tasks import MODEL_NAMES

    columns = ", ".join(VACE_COLUMNS)
    given = next((item for item in items if item.vace), None)
    if given is not None and not vace:
        raise ValueError(f"{item_name(given)}: VACE inputs ({columns}) need a VACE model (e.g. "
                         f"Wan-AI/Wan2.1-VACE-1.3B); this --model is {MODEL_NAMES.get(model_type, model_type)}: "
                         "give a VACE model or drop those columns")
    if vace and given is None:
        raise ValueError(f"{dataset}: a VACE model trains on control videos or reference images: give "
                         f"{METADATA} the columns control_video (a video beside each item), and optionally mask "
                         "and reference_images")
    missing = next((item for item in items if vace and not item.vace), None)
    if missing is not None:
        raise ValueError(f"{item_name(missing)}: no control_video or reference_images; a VACE model "
                         "trains each item with one of them (or leave the item out)")


def _vace_context(vae, item: Item, bucket: Bucket, fps: float, device) -> torch.Tensor:
    """An item's VACE context `[96, R + F', h, w]` as the VACE task makes it at generation: no
    control video is grey frames, all to make; no mask is all white (make every pixel, guided by
    the control video); reference images on white canvases of the clip's size, in front."""
    from ..pipeline.conditioning.base import image_tensor
    from ..pipeline.conditioning.vace import encode_frames, encode_masks, mask_frames, reference_canvas

    control, mask = load_vace(item, bucket, target_fps=fps)
    shape = (bucket.num_frames, bucket.height, bucket.width)
    frames = to_unit(control) if control is not None else torch.zeros(3, *shape)
    mask = mask_frames(mask, int(fps)) if mask is not None else torch.ones(1, *shape)
    refs = [reference_canvas(image_tensor(path), bucket.height, bucket.width).to(device) for path in item.references]
    with torch.no_grad():
        latents = encode_frames(vae, frames.to(device), mask.to(device), refs)
        folded = encode_masks(mask.to(device), len(refs), vae.config.temporal_stride, vae.config.spatial_stride)
    return torch.cat([latents, folded.to(latents.dtype)], dim=0).float().cpu().contiguous()


def _image_inputs(image_encoder, vae, video: torch.Tensor, conditioning: str, device) -> dict[str, torch.Tensor]:
    """clip_features and y of a clip `[3, F, H, W]` in [-1, 1], as the I2V pipeline makes them."""
    from ..pipeline import image_conditioning

    _, frames, height, width = video.shape
    last = video[:, -1].cpu() if conditioning == "first-last-frame" else None
    inputs = image_conditioning(image_encoder, vae, video[:, 0].cpu(), last, height, width, frames, device)
    return {k: v[0].float().cpu().contiguous() for k, v in inputs.items()}


def check_cache(items: list[Path], files) -> None:
    """Stop before training when the cache was made with other encoders, or lacks (or has)
    the image conditioning this model takes."""
    fingerprint, conditioning = _fingerprint(files), _conditioning(files)
    for path in items:
        check_item(path)
        settings = json.loads(_settings_of(path) or "{}")
        if settings.get("model") != fingerprint:
            raise ValueError(f"{path.parent}: the cache was made with other encoders ({settings.get('model')}); "
                             f"run `wanx prepare` again with this --model")
        if settings.get("conditioning") != conditioning:
            need = "a VACE model's VACE context" if conditioning == "vace" else \
                f"a {files.model_type} model's image conditioning" if conditioning else "no image conditioning"
            raise ValueError(f"{path.parent}: the cache does not match this model ({need}); "
                             f"run `wanx prepare` again with this --model")


def check_item(path: Path) -> None:
    """A prepared item cut short (a killed copy, a full disk) is named with the way out, not
    read into a SafetensorError traceback or taken for another model's cache."""
    from ..loading.files import DamagedCheckpoint, read_safetensors_header

    try:
        read_safetensors_header(path)
    except DamagedCheckpoint as err:
        raise ValueError(f"the prepared item {path} is damaged ({str(err).split(': ')[-1]}); run `wanx prepare` "
                         "again, which re-encodes unreadable items and keeps the rest") from None


def _fingerprint(files) -> str:
    """The encoders an item was made with: for the VAE and umT5 their file names, sizes and a
    digest of 16 spread 64 KiB samples of their bytes (a retrained VAE has the same size; reading
    all 11 GB of umT5 would take minutes), and a digest of the whole tokenizer (new pieces give
    other text embeddings from the same umT5)."""
    parts = []
    for path in (files.vae, files.text_encoder):
        path = Path(path)
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest, total = hashlib.sha1(), 0
        for member in members:
            size = member.stat().st_size
            total += size
            with open(member, "rb") as fh:
                for k in range(16):
                    fh.seek(max(0, (size - 65536) * k // 15))
                    digest.update(fh.read(65536))
        parts.append(f"{path.name}:{total}:{digest.hexdigest()[:12]}")
    tokenizer = Path(files.tokenizer)
    tokenizer = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    if tokenizer.is_file():
        parts.append(f"tokenizer:{hashlib.sha1(tokenizer.read_bytes()).hexdigest()[:12]}")
    return ";".join(parts)


def _encoders(files, runtime, progress: bool):
    from ..loading import load_model
    from ..text import TextEncoder, Tokenizer

    tokenizer = Tokenizer(files.tokenizer)
    vae = load_model(files.vae, dtype=runtime.vae_dtype, device=runtime.device, progress=progress)
    t5 = load_model(files.text_encoder, dtype=runtime.dtype, device=runtime.text_device, progress=progress)
    clip = None
    if _conditioning(files) in ("first-frame", "first-last-frame"):
        clip = load_model(files.image_encoder, dtype=runtime.dtype, device=runtime.device, progress=progress)
    if progress:
        print(f"encoders loaded on {runtime.device}", file=sys.stderr)
    return vae, TextEncoder(t5, tokenizer, device=runtime.text_device), clip, runtime.device


def model_geometry(files, size: tuple[int, int] | None = None, frames: int | None = None) -> tuple[tuple[int, int], int]:
    """(width, height) and frames to prepare at: those given, else the model folder's own
    (`wanx-defaults.json`, e.g. the demo model's 96x96 and 17 frames), else the official ones
    of its task (832x480 and 81 frames; TI2V-5B 1280x704 and 121)."""
    from ..tasks import default_task

    own, official = files.defaults, default_task(files.model_type)
    if size is None:
        size = (own.get("width") or official.width, own.get("height") or official.height)
    if frames is None:
        frames = own.get("num_frames") or official.num_frames
    return (int(size[0]), int(size[1])), int(frames)


# One item is read, resized and encoded at a time. What it holds at once, in bytes:
# - its frames as uint8 [F, H, W, 3] (kept for the whole item), and while they are resized one
#   float32 chunk of 16 frames in and out (`resize_crop`);
# - the clip as float32 [3, F, H, W], made through one more float32 copy (`to_unit`), then on
#   the device with the VAE encoder's workspace for one tile (512 pixels a side above 512x512,
#   as `prepare` tiles): about the decoder's per pixel (the real VAE measured 19 KB per pixel in
#   fp32 at 128x128 and 256x256), so `estimate.decode_bytes`; for I2V also the first-frame
#   clip and its untiled encode (`image_conditioning`).
# The source video's own decoded frames (at its resolution) come on top, unknown before reading.
ENCODE_TILE = 512


def check_memory(files, runtime, size: tuple[int, int], frames: int, *, available: dict | None = None) -> None:
    """Refuse, in one line naming --size and --frames, a size whose encoding does not fit the
    device (and, beside a GPU, the host) with the encoders' weights, and say the largest size of
    the same aspect ratio that does: an 8192x8192 clip is otherwise killed for memory mid-run.
    available: bytes per device type ("cpu", "cuda"), measured when not given."""
    from ..memory.estimate import GiB, available_memory

    width, height = size
    from ..tasks import default_task

    m = default_task(files.model_type, 2 if files.moe else 1).multiple
    for place, need in _encode_memory(files, runtime, frames):
        have = (available or {}).get(place.type)
        have = available_memory(place) if have is None else have
        if need(width, height) <= have:
            continue
        what = (f"--size {width}x{height} with --frames {frames} needs about {need(width, height) / GiB:.1f} GiB "
                f"to encode one clip but {place} has {have / GiB:.1f} GiB available")
        if need(m, m) > have:
            raise ValueError(f"{what}; even the smallest size does not fit beside the encoders' weights "
                             f"({need(0, 0) / GiB:.1f} GiB there): use fewer --frames, --dtype bf16, --t5-device "
                             "cpu (beside a GPU), or a device with more memory")
        low, high = 0.0, 1.0  # the largest scale of (width, height) that fits

        def scaled(k: float) -> tuple[int, int]:
            return max(m, int(width * k) // m * m), max(m, int(height * k) // m * m)

        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if need(*scaled(mid)) <= have else (low, mid)
        w, h = scaled(low)
        raise ValueError(f"{what}; the largest --size with this aspect ratio that fits is {w}x{h} "
                         "(or use fewer --frames)")


def _encode_memory(files, runtime, frames: int) -> list:
    """[(device, bytes needed there as a function of (width, height))] for `check_memory`: one
    entry on a CPU, the GPU and the host otherwise."""
    import torch

    from ..memory.estimate import decode_bytes, weight_bytes

    counts = [(net, n) for net, n in files.parameter_counts() if net in ("vae", "t5", "clip")]
    weights = weight_bytes(counts, runtime.dtype, runtime.vae_dtype)
    on_device = sum(b for net, b in weights.items() if net != "t5" or runtime.text_device == runtime.device)
    on_host = sum(weights.values()) - on_device
    conditioning = _conditioning(files) is not None

    def phases(w: int, h: int) -> tuple[int, int, int, int]:
        pixels = frames * h * w * 3  # uint8
        resize = 2 * min(frames, 16) * h * w * 3 * 4
        clip = pixels * 4  # float32
        tile = (min(h, ENCODE_TILE), min(w, ENCODE_TILE)) if h * w > ENCODE_TILE ** 2 else (h, w)
        encode = clip + decode_bytes(*tile, runtime.vae_dtype)
        if conditioning:
            encode += clip + decode_bytes(h, w, runtime.vae_dtype)
        return pixels, resize, 2 * clip, encode

    if runtime.device.type == "cpu":
        def everything(w: int, h: int) -> int:
            pixels, resize, to_unit, encode = phases(w, h)
            return on_device + on_host + pixels + max(resize, to_unit, encode)

        return [(runtime.device, everything)]

    def device(w: int, h: int) -> int:
        return on_device + phases(w, h)[3]

    def host(w: int, h: int) -> int:
        pixels, resize, to_unit, _ = phases(w, h)
        return on_host + pixels + max(resize, to_unit)

    return [(runtime.device, device), (torch.device("cpu"), host)]
