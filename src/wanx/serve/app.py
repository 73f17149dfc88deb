"""`wanx serve`: one process holding one model, the job queue, the REST API under /v1 and the
web UI at /. The API and the UI check and submit requests through the same `Server.submit`,
whose checks are the CLI's (`wanx.request`), and one worker runs the queue."""

from __future__ import annotations

import hmac
import json
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, replace
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from ..pipeline import RequestError
from ..request import KEY_NAMES, PIPELINE_KEYS, check_job, fix_seed, parse_job, pipeline_kwargs
from .common import API_TYPES, AS_UPLOADED, MANY, UPLOADS, VIDEO_UPLOADS, UploadError, listed
from .jobs import (DB_FILE, INPUTS, LOCK_FILE, MARKER, JobQueue, NoWorker, check_outputs, forget_api,
                   hold_folder)

# what the UI must never hand out by path: the job database (and SQLite's companions) and the uploads
PRIVATE_FILES = (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal", INPUTS, LOCK_FILE, MARKER)
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_STEPS = 1000  # the queue is shared: one request cannot hold it for days
MAX_FRAMES = 1001
MAX_SIDE = 4096  # pixels: twice the largest official size (1280x720); more only holds the queue
MAX_ASPECT = 4  # width:height or height:width; the models are trained on 16:9 at most
MAX_JSON = 2**20  # a JSON body (a request, or the UI's calls): prompts are read only to 512 tokens
MAX_INPUT_PIXELS = 4096 * 4096  # a frame of an uploaded video, read from its header (images: read_image's)
MAX_DECODED = 512 * 2**20  # bytes of uploaded frames a request decodes (at the job's size)
CHARS_PER_TOKEN = 32  # longer text is refused before it is tokenized (umT5 tokens are rarely over 16)
# Upload kinds by their first bytes (never by the client's name or content type).
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
                (b"BM", ".bmp"))
_VIDEO_MAGIC = ((b"\x1a\x45\xdf\xa3", ".webm"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"))


def upload_suffix(field: str, head: bytes) -> str:
    """The file suffix the server gives an upload, from its first bytes; UploadError (415)
    when it is not an image (image, last_image) or a video (video) wanx reads."""
    if field == "audio":
        return _audio_suffix(head)
    if field in VIDEO_UPLOADS or field == "mask":  # a mask is a video or an image
        if head[4:8] == b"ftyp":  # mp4 / mov
            return ".mp4"
        kinds, what = _VIDEO_MAGIC, "an mp4, mov, webm or gif video"
        if field == "mask":
            kinds, what = (*kinds, *_IMAGE_MAGIC), "a video or an image"
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return ".webp"
    else:
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return ".webp"
        kinds, what = _IMAGE_MAGIC, "a PNG, JPEG, WebP, GIF or BMP image"
    for magic, suffix in kinds:
        if head.startswith(magic):
            return suffix
    raise UploadError(field, f"{field}: the upload is not {what}", 415)


def _audio_suffix(head: bytes) -> str:
    """S2V's audio upload: wav, mp3, flac, ogg, or an m4a/mp4 with sound (PyAV reads it by content)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return ".wav"
    if head[4:8] == b"ftyp":
        return ".m4a"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return ".mp3"
    for magic, suffix in ((b"fLaC", ".flac"), (b"OggS", ".ogg")):
        if head.startswith(magic):
            return suffix
    raise UploadError("audio", "audio: the upload is not a wav, mp3, m4a, flac or ogg audio file", 415)



def _frame_count(path: Path) -> int:
    """A video's frames from its container (its duration x rate where the count is not stored)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            rate = float(stream.average_rate or stream.guessed_rate or 16)
            seconds = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
            return int(seconds * rate) + 1
    except (av.error.FFmpegError, IndexError, TypeError) as err:
        raise RequestError("extend", f"extend: not a readable video ({err})") from None

@dataclass
class Limits:
    max_upload: int = 100 * 2**20  # bytes per uploaded file
    max_steps: int = MAX_STEPS
    max_frames: int = MAX_FRAMES


class Server:
    """The loaded pipeline, its queue and the request checks: what the API and the UI share.

    pipe: a loaded WanPipeline (or None with `files` and `runtime` for a server that only
    queues, as in tests of the API alone). loras: a folder of LoRA files the requests may name."""

    def __init__(self, pipe, files, runtime, outputs: str | Path, *, loras: str | Path | None = None,
                 token: str | None = None, limits: Limits | None = None, model_name: str | None = None,
                 host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = (), queue_url: str | None = None,
                 worker_id: str | None = None, needs_workers: bool = False):
        from ..request import request_weights

        self.pipe, self.files, self.runtime = pipe, files, runtime
        self.outputs = Path(outputs)
        self.loras_dir = Path(loras) if loras else None
        self.token = token or None
        # names (beyond localhost and IP addresses) a request's Host may give: --host, --allowed-hosts;
        # the latter also the pages' (a proxy's name, as the browser sees it)
        self.allowed_hosts = {name.strip().lower().strip("[]") for name in allowed_hosts if name.strip()}
        self.host = host.lower().strip("[]")
        self.limits = limits or Limits()
        self.model_name = model_name or str(files.folder)
        self.weights = request_weights(files, runtime)
        self.queue = JobQueue(self.outputs, self.run, url=queue_url, model=self.model_name, worker_id=worker_id)
        # no worker in this process (--workers 0): a job waits for a `wanx worker`, refused when none is live
        self.needs_workers = needs_workers
        self._applied_loras: tuple = ()
        self._meta_dit = None
        self._tokenizer = None
        self._default_cache = pipe.step_cache if pipe is not None else None

    @property
    def model_type(self) -> str:
        return self.files.model_type

    @property
    def tasks(self) -> list:
        """The task-table rows this model runs (`wanx.tasks`): the UI's tabs, the API's list."""
        from ..tasks import model_tasks

        return model_tasks(self.model_type, 2 if self.files.moe else 1)

    def lora_names(self) -> list[str]:
        """LoRA files in the --loras folder, by name: a request names one of these, never a path."""
        if self.loras_dir is None or not self.loras_dir.is_dir():
            return []
        return sorted(p.name for p in self.loras_dir.iterdir() if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)

    # -- requests ---------------------------------------------------------------------------
    def submit(self, body, uploads: dict[str, tuple[bytes, str] | Path] | None = None) -> str:
        """Check a request and queue it; returns the job id. body: the JSON object; uploads:
        field -> the uploaded bytes (or a file the UI received). Raises RequestError or
        UploadError naming the field; then nothing is queued and no file stays behind."""
        uploads = {k: v for k, v in (uploads or {}).items() if v is not None}
        if self.needs_workers:
            live = self.queue.live_models()
            if self.model_name not in live:
                raise NoWorker(f"no live worker holds model {self.model_name!r} (live: "
                               f"{', '.join(sorted(live)) or 'none'}); start one: wanx worker --queue URL "
                               f"--model {self.model_name} --outputs {self.outputs}")
        if isinstance(body, dict):
            for key, value in body.items():
                check_text(key, "request")  # a key is named in the answer: it must be text too
                check_text(value, key)
            given = [k for k in UPLOADS if k in body]
            if given:
                raise RequestError(given[0], f"{given[0]}: upload the file as the multipart part {given[0]!r}; "
                                             "the server reads no path from a request")
        job = parse_job(body, types=API_TYPES)
        unknown = set(uploads) - set(UPLOADS)
        if unknown:
            name = sorted(unknown)[0]
            raise RequestError(name, f"unknown upload {name!r}; uploads are {', '.join(UPLOADS)}")
        job_id = self.queue.new_id()
        saved: list[Path] = []
        try:
            inputs = {}
            for field, data in uploads.items():
                paths = [self._save_upload(job_id, field, item, f"{field}-{i}") for i, item in enumerate(data)] \
                    if field in MANY else [self._save_upload(job_id, field, data)]
                saved += paths
                inputs[field] = [path.name for path in paths] if field in MANY else paths[0].name
                job[field] = [str(path) for path in paths] if field in MANY else str(paths[0])
            self.check(job)
            for field in inputs:  # the checks may have stored a smaller copy (_fit_inputs)
                saved += [Path(p) for p in listed(job[field])]
                inputs[field] = [Path(p).name for p in job[field]] if field in MANY else Path(job[field]).name
            request = {k: v for k, v in job.items() if k not in UPLOADS}
            if request.get("size"):
                request["size"] = "{}x{}".format(*request["size"])
            self.queue.submit(request, inputs=inputs, job_id=job_id)
        except BaseException:
            for path in saved + [Path(p) for field in inputs for p in listed(job.get(field))]:
                path.unlink(missing_ok=True)  # a refused request leaves nothing behind
            raise
        return job_id

    def check(self, job: dict) -> None:
        """The CLI's checks (wanx.request) and the server's own limits; RequestError names the key."""
        fix_seed(job)
        if job.get("steps") is not None and job["steps"] > self.limits.max_steps:
            raise RequestError("steps", f"steps must be at most {self.limits.max_steps} on this server, "
                                        f"got {job['steps']}")
        if isinstance(job.get("timesteps"), list) and len(job["timesteps"]) > self.limits.max_steps:
            raise RequestError("timesteps", f"timesteps must hold at most {self.limits.max_steps} steps on this "
                                            f"server, got {len(job['timesteps'])}")
        if job.get("frames") is not None and job["frames"] > self.limits.max_frames:
            raise RequestError("frames", f"frames must be at most {self.limits.max_frames} on this server, "
                                         f"got {job['frames']}")
        if job.get("teacache") is not None:
            if job["teacache"] < 0:
                raise RequestError("teacache", f"teacache is a threshold >= 0 (0 skips nothing), got {job['teacache']}")
            try:  # the job runs this server's runtime with TeaCache: the same pairs as `--teacache`
                replace(self.runtime, cache="teacache").check(experts=2 if self.files.moe else 1,
                                                              names={"cache": "teacache"})
            except ValueError as err:
                raise RequestError("teacache", str(err)) from None
        # before the CLI's checks, which read the inputs at this size: a size that fits the device
        # can still hold the one queue for hours
        if job.get("size"):
            width, height = job["size"]
            if max(width, height) > MAX_SIDE:
                raise RequestError("size", f"size {width}x{height}: each side must be at most {MAX_SIDE} on this "
                                           "server")
            if min(width, height) > 0 and max(width, height) > MAX_ASPECT * min(width, height):
                raise RequestError("size", f"size {width}x{height}: the aspect ratio must be at most "
                                           f"{MAX_ASPECT}:1 either way on this server")
        job["loras"] = self._check_loras(job.get("loras"))
        for key in ("prompt", "negative_prompt"):
            self._check_tokens(key, job.get(key))
        self._fit_inputs(job)
        try:
            check_job(job, self.files, runtime=self.runtime, weights=self.weights, names=KEY_NAMES)
        except RequestError as err:
            raise RequestError(PIPELINE_KEYS.get(err.field, err.field), _without_paths(str(err), job)) from None
        except (ValueError, FileNotFoundError) as err:  # an input file the readers refused
            raise RequestError("", _without_paths(str(err), job)) from None
    def _fit_inputs(self, job: dict) -> None:
        """Uploaded images and videos stored again at about the size the job uses, read frame by
        frame at that size: a small file can decode to gigabytes (a 339 KB mp4 of 300 black
        1280x720 frames; an 8000x8000 PNG of 187 KB). Their sizes are read from the headers
        first; a frame over MAX_INPUT_PIXELS, or more decoded bytes than MAX_DECODED, is refused."""
        import math

        from PIL import Image

        from ..video import MAX_IMAGE_PIXELS, image_size, probe_video, read_video_fitted

        if job.get("size"):
            area = job["size"][0] * job["size"][1]
        else:
            defaults = self.files.defaults
            area = (defaults.get("width") or 832) * (defaults.get("height") or 480)
        fitted_to = None  # the control video's size: a mask is stored at it too
        for field in UPLOADS:
            if not job.get(field) or field == "audio":  # the audio: its reader names what is wrong with it
                continue
            if field in MANY:  # reference images: read whole, within read_image's pixel cap, and scaled
                for path in job[field]:
                    try:
                        width, height = image_size(path)
                    except ValueError as err:
                        raise RequestError(field, _without_paths(str(err), job)) from None
                    if width * height > MAX_IMAGE_PIXELS:
                        raise UploadError(field, f"{field}: an upload is {width}x{height}; this server reads at most "
                                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels an image: resize it first", 422)
                continue
            path = Path(job[field])
            video_field = field in VIDEO_UPLOADS or (field == "mask" and path.suffix in (".mp4", ".webm", ".gif"))
            try:
                width, height, _ = probe_video(path) if video_field else (*image_size(path), None)
            except ValueError as err:
                raise RequestError(field, _without_paths(str(err), job)) from None
            most = MAX_INPUT_PIXELS if video_field else MAX_IMAGE_PIXELS
            if width * height > most:
                raise UploadError(field, f"{field}: the upload is {width}x{height}; this server reads at most "
                                         f"{most / 1e6:.0f} megapixels a frame: resize it first", 422)
            # read as it is (extend, Animate's videos, Animate-2's driving video: whole, at its own
            # rate): only its decoded bytes capped
            if field in AS_UPLOADED or (field == "video" and self.files.model_type == "animate2"):
                frames = _frame_count(path)
                if frames * width * height * 3 > MAX_DECODED:
                    raise UploadError(field, f"{field}: {frames} frames at {width}x{height} are more than this "
                                             f"server decodes for a request ({MAX_DECODED / 2**20:.0f} MiB)", 413)
                continue
            if field == "mask" and fitted_to is None:  # no control video: the request is refused unread
                continue
            if field == "mask" and not video_field:  # one image for every frame, at the control video's size
                try:
                    with Image.open(path) as img:
                        fitted = path.with_name(f"{path.stem}-fitted.png")
                        img.convert("RGB").resize(fitted_to, Image.NEAREST).save(fitted)
                except (OSError, Image.DecompressionBombError) as err:
                    raise RequestError(field, f"{field}: not a readable image ({err})") from None
            elif field in ("video", "control_video", "mask"):
                scale = min(1.0, math.sqrt(area / (width * height)))  # the pipeline keeps the aspect ratio
                size = (max(16, round(width * scale / 2) * 2), max(16, round(height * scale / 2) * 2))
                if field == "mask":
                    size = fitted_to
                elif field == "control_video":
                    fitted_to = size
                frames = job.get("frames") or 81
                if frames * size[0] * size[1] * 3 > MAX_DECODED:
                    raise UploadError(field, f"{field}: {frames} frames at {size[0]}x{size[1]} are more than this "
                                             f"server decodes for a request ({MAX_DECODED / 2**20:.0f} MiB)", 413)
                try:
                    video = read_video_fitted(path, size, fps=16, max_frames=frames)
                except ValueError as err:
                    raise RequestError(field, _without_paths(str(err), job)) from None
                fitted = video.save(path.with_name(f"{path.stem}-fitted.mp4"), quality=12)
            elif width * height > 2 * area:  # an image: kept a little larger, the pipeline crops and resizes it
                scale = math.sqrt(2 * area / (width * height))
                try:
                    with Image.open(path) as img:
                        target = (round(width * scale), round(height * scale))
                        img.draft("RGB", target)  # JPEG: decoded at a fraction of its size already
                        if img.mode not in ("RGB", "RGBA", "L"):  # palettes: no filter of their own
                            img = img.convert("RGB")
                        img.thumbnail(target, Image.LANCZOS)  # in place: the full size is held once
                        fitted = path.with_name(f"{path.stem}-fitted.png")
                        img.convert("RGB").save(fitted)
                except (OSError, Image.DecompressionBombError) as err:
                    raise RequestError(field, f"{field}: not a readable image ({err})") from None
            else:
                continue
            path.unlink(missing_ok=True)
            job[field] = str(fitted)

    def _check_tokens(self, key: str, text) -> None:
        """The model reads `text_len` tokens of a prompt (512): a longer one is refused, not cut."""
        if not isinstance(text, str):
            return
        from ..text import Tokenizer

        limit = self.files.dit_config.text_len
        if len(text) > CHARS_PER_TOKEN * limit:
            raise RequestError(key, f"{key} is {len(text)} characters; this model reads at most {limit} tokens: "
                                    "shorten it")
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.files.tokenizer)
        count = self._tokenizer.count(text)
        if count > limit:
            raise RequestError(key, f"{key} has {count} tokens; this model reads at most {limit}: shorten it")

    def _check_loras(self, loras) -> list[dict]:
        if not loras:
            return []
        available = self.lora_names()
        checked = []
        for entry in loras:
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or set(entry) - {"name", "strength"} or not isinstance(entry.get("name"), str):
                raise RequestError("loras", 'loras must be a list of {"name": FILE, "strength": NUMBER}')
            strength = entry.get("strength", 1.0)
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not -10 <= strength <= 10:
                raise RequestError("loras", f"loras: strength must be a number in [-10, 10], got {strength!r}")
            if entry["name"] not in available:
                known = ", ".join(available) or "none: start the server with --loras FOLDER"
                raise RequestError("loras", f"loras: no LoRA named {entry['name']!r}; available: {known}")
            self._check_lora_fits(entry["name"])
            checked.append({"name": entry["name"], "strength": float(strength)})
        return checked

    def _check_lora_fits(self, name: str) -> None:
        """The LoRA file read and matched against this model's DiT (shapes only, on the meta
        device), as `wanx generate --lora` does, so a misfit is refused before it is queued."""
        import torch

        from ..lora import read_lora
        from ..lora.apply import match
        from ..models.transformer import WanDiT

        if self._meta_dit is None:
            with torch.device("meta"):
                self._meta_dit = WanDiT(self.files.dit_config)
        try:
            match(self._meta_dit, read_lora(self.loras_dir / name))
        except Exception as err:  # any unreadable or misfitting file: the request names it
            raise RequestError("loras", f"loras: {name}: {str(err).replace(str(self.loras_dir / name), name)}") from None

    def _save_upload(self, job_id: str, field: str, data, name: str | None = None) -> Path:
        """Copy an upload under a server-made name (`name`, default the field's), after checking
        its size and kind."""
        if isinstance(data, (str, Path)):
            size = Path(data).stat().st_size
            with open(data, "rb") as fh:
                head = fh.read(16)
        else:
            size, head = len(data), bytes(data[:16])
        if size > self.limits.max_upload:
            raise UploadError(field, f"{field}: the upload is {size / 2**20:.1f} MiB; this server takes at most "
                                     f"{self.limits.max_upload / 2**20:.0f} MiB", 413)
        if size == 0:
            raise UploadError(field, f"{field}: the upload is empty", 422)
        path = self.queue.input_path(job_id, name or field, upload_suffix(field, head))
        tmp = path.with_name(f".{path.name}.partial")
        try:
            if isinstance(data, (str, Path)):
                shutil.copyfile(data, tmp)
            else:
                tmp.write_bytes(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- the worker's side ------------------------------------------------------------------
    def run(self, job: dict, on_step):
        """Make one job's video with the loaded pipeline (the queue's runner)."""
        request = dict(job["request"])
        if request.get("size"):
            request["size"] = tuple(int(v) for v in request["size"].split("x"))
        for field, name in job["input_files"].items():
            request[field] = [str(self.queue.folder / INPUTS / n) for n in name] if field in MANY else \
                str(self.queue.folder / INPUTS / name)
        self._use_loras(request.get("loras") or [])
        if request.get("teacache") is not None:
            self.pipe.enable_cache("teacache", float(request["teacache"]))
        else:
            self.pipe.step_cache = self._default_cache
        video = self.pipe(request.get("prompt"), request.get("negative_prompt"), progress=False, callback=on_step,
                          decode_callback=lambda done, total: on_step(None, None, None), **pipeline_kwargs(request))
        video.metadata["model"] = self.model_name
        return video

    def _use_loras(self, loras: list[dict]) -> None:
        """Apply the job's LoRAs, keeping them when the next job asks for the same ones."""
        wanted = tuple((entry["name"], entry["strength"]) for entry in loras)
        if wanted == self._applied_loras:
            return
        if self._applied_loras:
            self.pipe.unload_lora()
        self._applied_loras = ()
        from ..lora import lora_names

        try:  # named by stem, or by file name where stems clash (style.safetensors, style.ckpt)
            for (file, strength), name in zip(wanted, lora_names([file for file, _ in wanted])):
                self.pipe.load_lora(self.loras_dir / file, strength, name=name)
        except BaseException:  # none half-applied: the next job must see the base weights
            self.pipe.unload_lora()
            raise
        self._applied_loras = wanted

    def serves_host(self, name: str) -> bool:
        """A Host header's name this server answers to: localhost, an IP address (no DNS name
        an attacker could point here), --host, or --allowed-hosts ('*': any)."""
        import ipaddress

        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in ("localhost", self.host) or self.named_host(name)

    def named_host(self, name: str) -> bool:
        """A name given with --allowed-hosts."""
        return bool(name) and (name.lower() in self.allowed_hosts or "*" in self.allowed_hosts)

    def authorised(self, supplied: str | None) -> bool:
        return self.token is None or (supplied is not None and hmac.compare_digest(supplied.encode(), self.token.encode()))


def check_text(value, field: str) -> None:
    """RequestError when a string in `value` (a request value, or a list or object of them) is
    not text UTF-8 can hold: JSON's escapes can spell a lone UTF-16 surrogate ("\\ud800"),
    which no database row, JSON answer or video tag can be written with."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(field, f"{field}: not valid text (a lone UTF-16 surrogate, "
                                      f"{value[err.start]!r}, at character {err.start}); send UTF-8 text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, field)
            check_text(item, field)
    elif isinstance(value, list):
        for item in value:
            check_text(item, field)


def _without_paths(message: str, job: dict) -> str:
    """The pipeline names an input by its path; the client knows it by its field."""
    for field in UPLOADS:
        for path in listed(job.get(field)):
            message = message.replace(str(path), field)
    return message


# -- the ASGI app ---------------------------------------------------------------------------
COOKIE = "wanx_token"
UI_FILES = ".gradio"  # the UI's uploads and Gradio's copies of shown files, under the outputs folder
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")  # where Gradio serves files by path


class Gate:
    """What every request passes before the API or the UI sees it.

    With --token, every request needs it: `Authorization: Bearer TOKEN` (programs), or the
    cookie a browser gets by opening any page once with `?token=TOKEN` (HttpOnly, SameSite=Strict,
    so other sites' pages cannot use it). Without --token that check passes. Gradio serves
    files by path only from its own folder of uploads and copies (never the job database or
    the inputs)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self._foreign(scope, headers)
        if refused:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _problem(send, *refused)
        if scope["type"] == "http" and scope["path"] == "/healthz":  # a probe carries no token; it learns nothing
            return await self.app(scope, receive, send)
        by_bearer = self.server.authorised(_bearer(headers)) if self.server.token is not None else False
        if self.server.token is not None and not by_bearer and not self._has_cookie(headers):
            return await self._refuse_or_redirect(scope, send, headers)
        if (self.server.token is not None and not by_bearer and scope["type"] == "http"
                and scope["method"] in CHANGING and scope["path"].startswith("/v1/")
                and _media_type(headers) in SIMPLE_TYPES and "x-requested-with" not in headers):
            # what a form on any page can send with the browser's cookie (no preflight asks first)
            return await _problem(send, 403, "with the cookie, send the request as application/json or with the "
                                             "header X-Requested-With; programs send 'Authorization: Bearer TOKEN'")
        if scope["type"] == "http" and scope["path"].startswith(FILE_ROUTES) and not self._shown_file(scope["path"]):
            return await _problem(send, 403, "this server shows only its videos and the files uploaded to it")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self._limited(scope, receive, send, headers)

    async def _limited(self, scope, receive, send, headers: dict):
        """The app with the body counted as it arrives (chunked too): past the limit, the app
        reads no more and the client gets 413, before anything is spooled beyond it."""
        json_body = _media_type(headers) == "application/json"
        limit = MAX_JSON if json_body else len(UPLOADS) * self.server.limits.max_upload + MAX_JSON
        what = "a JSON body" if json_body else "a request"
        detail = f"{what} on this server is at most {limit / 2**20:.0f} MiB"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await _problem(send, 413, f"{detail}; this one is {int(length) / 2**20:.1f} MiB",
                                  [(b"connection", b"close")])
        state = {"read": 0, "over": False, "started": False}

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["over"] = True
                    raise _TooLarge
            return message

        async def sent(message):
            if state["over"]:  # the app's own answer to the cut body: the 413 goes instead
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sent)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            # and the connection closes: else the server would go on reading (and dropping) the rest
            await _problem(send, 413, detail, [(b"connection", b"close")])

    def _foreign(self, scope, headers: dict) -> tuple[int, str] | None:
        """(status, why) for a request another site's page made: a Host this server does not
        go by (DNS rebinding: a name the attacker controls, pointed at this address) or an
        Origin other than this server (CSRF; Gradio's CORS would let any localhost page read)."""
        host = headers.get("host", "")
        if not self.server.serves_host(_hostname(host)):
            return 400, (f"Host {host!r} is not served here; behind a proxy or under another name, start "
                         "wanx serve with --allowed-hosts NAME")
        origin = headers.get("origin")
        if origin is not None:
            netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
            if netloc != host.lower() and not self.server.named_host(_hostname(netloc)):
                return 403, (f"a page from {origin} may not use this server (cross-origin); behind a proxy, start "
                             "wanx serve with --allowed-hosts NAME")
        return None

    def _has_cookie(self, headers: dict) -> bool:
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is no token
            pass
        return self.server.authorised(cookie[COOKIE].value if COOKIE in cookie else None)

    async def _refuse_or_redirect(self, scope, send, headers: dict):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["type"] == "http" and self.server.authorised((query.get("token") or [None])[0]):
            rest = urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
            # only a path on this server: '//evil.example/x' would send the browser elsewhere
            path = quote(scope.get("root_path", "") + scope["path"], safe="/:@!$&'()*+,;=-._~")
            location = "/" + path.lstrip("/") + (f"?{rest}" if rest else "")
            secure = "; Secure" if _is_https(scope, headers) else ""
            return await _respond(send, 303, b"", [(b"location", location.encode()), (
                b"set-cookie", f"{COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict{secure}".encode())])
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _problem(send, 401, "this server needs its token: send 'Authorization: Bearer TOKEN' "
                                  "(in a browser, open /?token=TOKEN once)", [(b"www-authenticate", b"Bearer")])

    def _shown_file(self, path: str) -> bool:
        """A path Gradio may serve: inside its own folder under the outputs (symlinks resolved)."""
        import os

        target = path[len(FILE_ROUTES[0]):]
        folder = os.path.realpath(self.server.outputs / UI_FILES)
        return os.path.realpath(target).startswith(folder + os.sep)


class _TooLarge(Exception):
    """The body went past the server's limit (raised into the app reading it)."""


CHANGING = ("POST", "PUT", "PATCH", "DELETE")
# the content types a page's form (or a fetch without a preflight) can send
SIMPLE_TYPES = ("", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def _bearer(headers: dict) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def _media_type(headers: dict) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _hostname(netloc: str) -> str:
    """'Example.org:7860' -> 'example.org'; '[::1]:80' -> '::1'; '' when unreadable."""
    try:
        return urlsplit("//" + netloc).hostname or ""
    except ValueError:
        return ""


def _is_https(scope, headers: dict) -> bool:
    """Served over HTTPS: directly, or behind a proxy that says so."""
    forwarded = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return scope.get("scheme") in ("https", "wss") or forwarded == "https"


async def _problem(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail, "field": None}).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json"), *(headers or [])])


async def _respond(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def create_app(server: Server, *, ui: bool = True, worker: bool = True):
    """The FastAPI app: /v1 (API and its OpenAPI schema at /v1/openapi.json), the web UI at /,
    behind the gate. worker: run the queue while the app runs (lifespan)."""
    import contextlib
    import os

    from fastapi import FastAPI

    from .api import ops, router
    from .metrics import Metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if worker:
            server.queue.start()
        try:
            yield
        finally:
            if worker:
                server.queue.stop()

    app = FastAPI(title="wanx", summary=f"Wan2.1 video jobs: {server.model_name} ({server.model_type})",
                  version=_version(), openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None,
                  lifespan=lifespan)
    app.state.server = server
    app.state.runs_worker = worker
    app.state.metrics = Metrics(server)
    app.include_router(router)
    app.include_router(ops)  # /healthz, /readyz, /metrics: before the UI's mount at /
    if ui:
        # Gradio keeps uploads and copies of what it shows in GRADIO_TEMP_DIR (read when the UI
        # is built): beside this server's outputs, emptied at each start (no page survives one)
        ui_files = server.outputs / UI_FILES
        shutil.rmtree(ui_files, ignore_errors=True)
        ui_files.mkdir(parents=True)
        os.environ["GRADIO_TEMP_DIR"] = str(ui_files.resolve())
        import gradio as gr

        from .ui import build_ui

        blocks = build_ui(server)
        outputs = server.outputs.resolve()
        app = gr.mount_gradio_app(app, blocks, path="", allowed_paths=[str(outputs)], footer_links=["api"],
                                  blocked_paths=[str(outputs / name) for name in PRIVATE_FILES],
                                  max_file_size=server.limits.max_upload)
        # mount_gradio_app leaves has_launched False, and then Gradio skips its check that a file
        # a request names was uploaded through it: any server path would be read as an input
        blocks.has_launched = True
    app.add_middleware(Gate, server=server)
    return app


def _log_jobs(quiet: bool) -> None:
    """A line per job start and end (wanx.serve.metrics) on stderr, beside uvicorn's own; none with --quiet."""
    import logging

    log = logging.getLogger("wanx.serve")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False  # not twice where the root logger has a handler too


def _version() -> str:
    from .. import __version__

    return __version__


def check_port(host: str, port: int) -> None:
    """Bind host:port as uvicorn will (IPv6 for a host with ':', SO_REUSEADDR) and let it go:
    a port in use is named before the model loads, not in uvicorn's words after."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: {host}:{port} is in use (another wanx serve?); choose another "
                                 "--port") from None
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def serve(args, flags: dict | None = None, local=None) -> int:
    """`wanx serve`: check everything, load the model once, then serve until Ctrl-C. flags: how
    the command line spells each runtime choice, for Runtime.check's refusals. local: the
    `wanx worker` children to start once the queue is there and stop with the server
    (wanx.serve.local.LocalWorkers; `--gpus N`)."""
    import os
    import time

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the UI makes no calls out
    import uvicorn

    from ..hub import find_components, resolve_model
    from ..pipeline import WanPipeline
    from ..runtime import Runtime

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    workers = getattr(args, "workers", 1)
    if workers not in (0, 1):
        raise ValueError(f"--workers {workers}: give 1 (this process runs the jobs) or 0 (wanx worker processes "
                         "run them); start more with wanx worker")
    if args.loras and not Path(args.loras).is_dir():
        raise FileNotFoundError(f"--loras {args.loras}: no such folder")
    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{8,}", args.token):
        # it travels in a header and a cookie: no spaces, quotes or separators
        raise ValueError("--token must be at least 8 characters of letters, digits and . _ ~ + / = -")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        print(f"wanx serve: listening on {args.host} without --token: anyone who reaches this port can "
              "submit jobs", file=sys.stderr)
    runtime = Runtime.from_flags(args)
    check_port(args.host, args.port)  # now, not after the model has loaded
    files = find_components(resolve_model(args.model, source=args.source), dit=args.dit)
    runtime.check(experts=2 if files.moe else 1, names=flags)  # before the model loads
    outputs = Path(args.outputs)
    try:
        outputs.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way (README.md/x), no permission, ...
        raise ValueError(f"--outputs {outputs}: cannot make the folder ({err.strerror or err}); choose another "
                         "--outputs") from None
    lock = hold_folder(outputs)  # before the model loads: a second server on the folder stops here
    try:  # the queue reachable, its tables there, the folder its own, this API's model registered: before loading
        check_outputs(getattr(args, "queue", None), outputs, api_models=[args.model])
    except ValueError:
        lock.close()
        raise
    pipe = None  # --workers 0: the model is checked above but loaded only by the workers
    if workers:
        start = time.perf_counter()
        pipe = WanPipeline.from_files(files, runtime=runtime, progress=not args.quiet)
        pipe.name = args.model
        if not args.quiet:
            print(f"loading: {time.perf_counter() - start:.1f} s ({files.model_type} on {runtime.device})",
                  file=sys.stderr)
    server = Server(pipe, files, runtime, outputs, loras=args.loras, token=args.token,
                    limits=Limits(max_upload=int(args.max_upload_mb * 2**20)), model_name=args.model,
                    host=args.host, allowed_hosts=tuple((getattr(args, "allowed_hosts", None) or "").split(",")),
                    queue_url=getattr(args, "queue", None), needs_workers=not workers)
    _log_jobs(quiet=args.quiet)
    app = create_app(server, ui=not args.no_ui, worker=bool(workers))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"wanx serve: http://{host}:{args.port}/  (API: /v1, schema: /v1/openapi.json; outputs in {outputs})",
          file=sys.stderr, flush=True)
    if local is None and threading.current_thread() is threading.main_thread():
        # uvicorn, having shut down on SIGTERM, raises it again once its handlers are gone: by default
        # that ends the process before the cleanup below (the API's models taken off the queue)
        signal.signal(signal.SIGTERM, _exit_on_term)
    # no access log: the UI polls once a second per open page
    try:
        if local is not None:
            local.start()
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                    access_log=False)
    finally:
        if local is not None:
            local.stop()
        forget_api(getattr(args, "queue", None), outputs)
        lock.close()
    return 0 if local is None else local.exit_code


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(0)  # a stop asked for: the server's cleanup runs, and it is a clean exit
