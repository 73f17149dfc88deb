"""The REST API under /v1: submit a video job, follow it, fetch the mp4, cancel or delete it.
A request body has the keys of a `wanx generate --prompts` JSON line and is checked by the
same code as the CLI before it is queued; a refusal is a 4xx whose `field` names the key."""

from __future__ import annotations

import io
import json
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from ..pipeline import RequestError
from ..tasks import describe_all
from .common import API_TYPES, MANY, UPLOADS, UploadError, preview_strip
from .jobs import STATUSES, NoWorker

router = APIRouter(prefix="/v1", tags=["videos"])

_JSON_TYPES = {str: "string", int: "integer", float: "number", list: "array", bool: "boolean"}
_DESCRIPTIONS = {
    "prompt": "what the video shows", "negative_prompt": "what to avoid (default: the official negative prompt)",
    "seed": "0..2**64-1 (default: random, returned in the settings)",
    "strength": "video-to-video: the share of the steps run (the last ones) from the noised input, in (0, 1]; "
                "default 0.8, lower keeps more of the input",
    "size": f"WIDTHxHEIGHT, multiples of 16 (default {describe_all('size')})",
    "frames": f"4k+1 (default {describe_all('num_frames')})",
    "steps": f"sampling steps (default {describe_all('steps')})",
    "guidance": f"1..30, 1: off (default {describe_all('guidance')})",
    "shift": f"schedule shift (default {describe_all('shift')})",
    "sampler": "unipc, dpm++, euler or lcm (step-distilled models)",
    "timesteps": "an explicit denoising step list, 0..1000 before the shift, strictly decreasing, e.g. "
                 "[1000, 750, 500, 250]; sets the step count (steps, if given, must agree)",
    "teacache": "TeaCache threshold for this job (0 skips nothing)",
    "extend_frames": "with the upload `extend` (a video to continue, at its size and frame rate; frames then counts "
                     "the new frames, a multiple of 4): the overlap in video frames, 4k+1 (default 9)",
    "guidance_low": "Wan2.2 A14B: the low-noise expert's guidance (default: guidance when given, else "
                    f"{describe_all('guidance_low')})",
    "boundary": "Wan2.2 A14B: where the low-noise expert takes over, 0..1 of the 1000 timesteps "
                f"(default {describe_all('boundary')})",
    # guidance variants (wanx.guidance): one of cfg_zero_star, apg, slg_layers, nag_scale; cfg_steps with any
    "cfg_steps": "real CFG on the first N steps only, then one DiT pass per step (default: every step)",
    "cfg_zero_star": "CFG-Zero*: optimized uncond scale, zero velocity on the first step (default false)",
    "apg": "adaptive projected guidance (default false)", "apg_eta": "APG: weight of the parallel part (default 1.0)",
    "apg_norm_threshold": "APG: cap on the guidance difference's norm, 0: none (default 15.0)",
    "apg_momentum": "APG: momentum of the guidance difference, in (-1, 1) (default: none)",
    "slg_layers": "skip-layer guidance: DiT blocks the uncond pass skips, e.g. [9] or [9, 10]",
    "slg_start": "SLG: first step, a fraction of the steps (default 0.1)",
    "slg_end": "SLG: end step, a fraction of the steps (default 0.9)",
    "nag_scale": "NAG (negative prompt for CFG-free models; needs negative_prompt): scale, >= 1 (typical 11)",
    "nag_tau": "NAG: norm cap (default 2.5)", "nag_alpha": "NAG: blend, 0..1 (default 0.25)",
    # context windows over a long video (wanx.pipeline.windows)
    "context_frames": "denoise in overlapping windows of this many frames (4k+1, e.g. 81) for videos longer "
                      "than the model's; default: the whole video at once",
    "context_overlap": "frames neighbouring windows share, a multiple of 4 (default 16)",
    "context_schedule": "static (the same windows every step), uniform (windows slide from step to step) or "
                        "looped (a video that loops)",
    "context_blend": "linear (ramps over the overlap) or pyramid",
    "color_match": "hold later windows to the first window's colour and brightness (default false)",
    "loras": 'LoRAs from the server\'s --loras folder: [{"name": "style.safetensors", "strength": 0.8}]',
}
REQUEST_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["prompt"],
    "properties": {key: {"type": _JSON_TYPES[kinds[-1] if kinds[-1] is float else kinds[0]],
                         "description": _DESCRIPTIONS.get(key, key)} for key, kinds in API_TYPES.items()},
}
REQUEST_SCHEMA["properties"]["timesteps"]["items"] = {"type": "number"}
REQUEST_SCHEMA["properties"]["loras"]["items"] = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "strength": {"type": "number"}}}
_MULTIPART_SCHEMA = {
    "type": "object", "required": ["request"],
    "properties": {"request": {"type": "string", "description": "the JSON request, as for application/json"},
                   **{field: {"type": "string", "format": "binary"} for field in UPLOADS}},
}
for _field, _most in MANY.items():  # several parts of one name
    _MULTIPART_SCHEMA["properties"][_field] = {"type": "array", "maxItems": _most,
                                               "items": {"type": "string", "format": "binary"}}
_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


class Problem(BaseModel):
    detail: str
    field: str | None = None


class Progress(BaseModel):
    step: int | None
    total: int | None
    eta_s: float | None = None


class Job(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
    progress: Progress | None = None
    request: dict[str, Any]
    settings: dict[str, Any] | None = None
    error: str | None = None
    attempts: int
    events: list[str]
    inputs: list[str]
    created: float
    started: float | None = None
    finished: float | None = None
    cancelling: bool = False


class JobList(BaseModel):
    videos: list[Job]
    counts: dict[str, int]


class Submitted(BaseModel):
    id: str
    status: str


class Model(BaseModel):
    model: str
    model_type: str
    tasks: list[str]
    loras: list[str]


def _server(request: Request):
    return request.app.state.server


def problem(status: int, detail: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field}, status_code=status)


@router.post("/videos", status_code=202, response_model=Submitted,
             responses={400: _ERROR, 413: _ERROR, 415: _ERROR, 422: _ERROR},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": REQUEST_SCHEMA},
                 "multipart/form-data": {"schema": _MULTIPART_SCHEMA}}}})
async def submit_video(request: Request):
    """Queue a video. JSON body, or multipart with the JSON in the part `request` and files in
    `image`, `last_image`, `video`, `extend`. Answers at once with the job id."""
    server = _server(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: dict[str, bytes] = {}
    if kind == "application/json":
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return problem(400, f"the request is not UTF-8 (byte {err.start}); send the JSON as UTF-8")
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: no files
        limit = server.limits.max_upload
        length = request.headers.get("content-length")
        files = len(UPLOADS) + sum(most - 1 for most in MANY.values())
        if length and length.isdigit() and int(length) > files * limit + 2**20:
            return problem(413, f"the request is larger than this server takes ({limit / 2**20:.0f} MiB per file)")
        form = await request.form(max_files=files, max_fields=1, max_part_size=2**20)
        try:
            text = ""
            for field, value in form.multi_items():
                if field == "request" and isinstance(value, str):
                    text = value
                elif field == "request":
                    text = (await value.read(2**20)).decode("utf-8", errors="replace")
                elif isinstance(value, str):
                    return problem(422, f"{field}: expected an uploaded file", field)
                elif field in uploads and field not in MANY:
                    return problem(422, f"{field}: given twice", field)
                elif field in MANY and len(uploads.get(field, ())) == MANY[field]:
                    return problem(422, f"{field}: at most {MANY[field]} files", field)
                else:
                    data = await value.read(limit + 1)
                    if len(data) > limit:
                        return problem(413, f"{field}: the upload is larger than {limit / 2**20:.0f} MiB", field)
                    if field in MANY:
                        uploads.setdefault(field, []).append(data)
                    else:
                        uploads[field] = data
        finally:
            await form.close()  # the spooled temporary files go now
        if not text:
            return problem(422, "the multipart part 'request' (the JSON request) is missing", "request")
    else:
        return problem(415, "send the request as application/json, or as multipart/form-data with the JSON in "
                            "the part 'request' and the files in " + ", ".join(f"'{f}'" for f in UPLOADS))
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        return problem(400, f"the request is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})")
    try:
        job_id = await run_in_threadpool(server.submit, body, uploads)
    except UploadError as err:
        return problem(err.status, str(err), err.field)
    except RequestError as err:
        return problem(422, str(err), err.field or None)
    except NoWorker as err:
        return problem(503, str(err))
    return JSONResponse({"id": job_id, "status": "queued"}, status_code=202,
                        headers={"location": f"/v1/videos/{job_id}"})


@router.get("/videos", response_model=JobList)
def list_videos(request: Request, status: Literal[STATUSES] | None = None,  # type: ignore[valid-type]
                limit: int = Query(100, ge=1, le=1000)):
    """Jobs, newest first, and how many there are of each status."""
    server = _server(request)
    return {"videos": server.queue.list(status, limit), "counts": server.queue.counts()}


@router.get("/videos/{video_id}", response_model=Job, responses={404: _ERROR})
def get_video(request: Request, video_id: str):
    """A job: status, progress (step, total, ETA in seconds), settings, error."""
    job = _server(request).queue.get(video_id)
    if job is None:
        return problem(404, f"no video job {video_id!r}", "video_id")
    return job


@router.get("/videos/{video_id}/content", response_class=FileResponse,
            responses={200: {"content": {"video/mp4": {}}}, 404: _ERROR, 409: _ERROR})
def get_content(request: Request, video_id: str):
    """The finished mp4."""
    server = _server(request)
    job = server.queue.get(video_id)
    if job is None:
        return problem(404, f"no video job {video_id!r}", "video_id")
    if job["status"] != "done":
        return problem(409, f"job {video_id} is {job['status']}: no video yet" if job["status"] in ("queued", "running")
                       else f"job {video_id} is {job['status']}: it has no video")
    path = server.queue.output_path(job["id"])  # the server's own id, never the client's text
    if not path.is_file():
        return problem(404, f"the video of job {video_id} is gone from the outputs folder")
    return FileResponse(path, media_type="video/mp4", filename=f"{job['id']}.mp4")


@router.get("/videos/{video_id}/preview", responses={200: {"content": {"image/png": {}}}, 404: _ERROR})
def get_preview(request: Request, video_id: str):
    """A cheap look at the running job's current latents (no decoding), as a PNG strip."""
    from PIL import Image

    frames = _server(request).queue.preview(video_id)
    if frames is None:
        return problem(404, f"no preview for {video_id!r}: only a running job has one")
    buffer = io.BytesIO()
    Image.fromarray(preview_strip(frames)).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")


@router.delete("/videos/{video_id}", responses={202: {"model": Job}, 404: _ERROR})
def delete_video(request: Request, video_id: str):
    """A queued or running job is cancelled (a running one at its next step: 202); a finished
    one is deleted with its files."""
    queue = _server(request).queue
    job = queue.get(video_id)
    if job is None:
        return problem(404, f"no video job {video_id!r}", "video_id")
    if job["status"] in ("queued", "running") or (job["status"] == "interrupted" and job["attempts"] <= queue.retries):
        return JSONResponse(queue.cancel(job["id"]), status_code=202)
    try:
        queue.delete(job["id"])
    except RuntimeError as err:  # it started in between
        raise HTTPException(409, str(err)) from None
    return {"id": job["id"], "deleted": True}


@router.get("/model", response_model=Model)
def get_model(request: Request):
    """The loaded model, the tasks it runs and the LoRAs a request may name."""
    server = _server(request)
    return {"model": server.model_name, "model_type": server.model_type, "tasks": [spec.task for spec in server.tasks],
            "loras": server.lora_names()}


# -- operations: outside /v1, for probes and scrapers -----------------------------------------
# /healthz answers without the token (it tells nothing but "the process runs": a load balancer's
# probe carries no secret); /readyz and /metrics go through the token when one is set, as they
# name the models, the queue and its load.
ops = APIRouter(tags=["operations"])


@ops.get("/healthz")
def healthz():
    """The process is alive (200); nothing about the queue or the model."""
    return {"status": "ok"}


@ops.get("/readyz", responses={503: _ERROR})
def readyz(request: Request):
    """200 when the queue answers and, if this server runs a worker, its model is loaded and its
    worker runs; 503 with the reason otherwise."""
    server = _server(request)
    try:
        server.queue.counts()
    except Exception as err:  # QueueError, or the database's own: either way not ready
        return problem(503, f"the queue does not answer: {' '.join(str(err).split())}")
    if getattr(request.app.state, "runs_worker", False):
        if server.pipe is None:
            return problem(503, "this server's worker has no model loaded")
        if not server.queue.alive:
            return problem(503, "this server's worker is not running")
    return {"status": "ready"}


@ops.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request):
    """Prometheus text format: queue depth per model and status, live workers per model, job
    seconds and failures per worker, each worker's GPU memory and this process's (CUDA only)."""
    from .metrics import CONTENT_TYPE

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
