"""The web UI of `wanx serve` (Gradio): a tab per task the loaded model runs, prompt and
settings, LoRAs with strengths, live progress with a latent preview, the queue with cancel,
and a gallery of past results whose settings can be reused. It submits through
`Server.submit`, the same checks and queue as the API, so errors read as the CLI's."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from ..pipeline import RequestError
from ..sampling import SAMPLERS
from ..tasks import INPUT_WORDS

# the inputs the page takes as files, in its order (VACE: one reference image here)
UI_UPLOADS = ("image", "last_image", "video", "control_video", "mask", "reference_images", "pose_video", "face_video",
              "background_video", "mask_video", "audio")
from .common import UploadError, preview_strip
from .jobs import NoWorker

if TYPE_CHECKING:  # the server passed in; no import back into the app
    from .app import Server

GALLERY_SIZE = 12
_CSS = "#error p { color: #c0392b; font-weight: 600; }"


def _number(value, integer: bool):
    """A text field as a request value: blank -> unset (the default); "5" -> 5. Text that is not
    a number stays text, so the request check refuses it in its own words, naming the key."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)):
        return int(value) if integer and float(value).is_integer() else value
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if integer and number.is_integer() else number


def request_from_form(prompt, negative, size, frames, steps, guidance, shift, sampler, seed, teacache, cfg_steps,
                      timesteps, loras, strength=None) -> dict:
    """The form's fields as a POST /v1/videos body (blank fields are left to the defaults)."""
    body = {"prompt": prompt or None}
    if negative:
        body["negative_prompt"] = negative
    if size and size.strip():
        body["size"] = size.strip()
    for key, value, integer in (("frames", frames, True), ("steps", steps, True), ("guidance", guidance, False),
                                ("shift", shift, False), ("seed", seed, True), ("teacache", teacache, False),
                                ("cfg_steps", cfg_steps, True), ("strength", strength, False)):
        value = _number(value, integer)
        if value is not None:
            body[key] = value
    if sampler:
        body["sampler"] = sampler
    if timesteps and timesteps.strip():  # 1000,750,500,250; what is not a number list the request's check names
        try:
            body["timesteps"] = [float(v) for v in timesteps.split(",")]
        except ValueError:
            body["timesteps"] = timesteps.strip()
    chosen = [{"name": str(row[0]), "strength": float(row[1])} for row in _rows(loras) if _nonzero(row[1])]
    if chosen:
        body["loras"] = chosen
    return body


def _rows(table) -> list:
    if table is None:
        return []
    if hasattr(table, "values"):  # a pandas DataFrame
        return table.values.tolist()
    return list(table)


def _nonzero(value) -> bool:
    try:
        return float(value) != 0
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=64)
def _poster(path: str, mtime: float):
    """The first frame of a finished video, for the gallery (cached per file version)."""
    import av

    with av.open(path) as container:
        for frame in container.decode(video=0):
            return frame.to_ndarray(format="rgb24")
    return None


def _status_line(job: dict | None) -> str:
    if job is None:
        return ""
    status = job["status"]
    progress = job.get("progress") or {}
    if status == "running" and progress.get("total"):
        eta = progress.get("eta_s")
        when = f", ETA {eta:.1f} s" if eta is not None else ""
        return f"**running** {job['id']}: step {progress['step']}/{progress['total']}{when}"
    if status == "failed":
        return f"**failed** {job['id']}: {job['error']}"
    if status == "done":
        took = (job["finished"] or 0) - (job["started"] or 0)
        return f"**done** {job['id']} in {took:.1f} s (seed {job['settings'].get('seed')})"
    return f"**{status}** {job['id']}"


# What a blank field means for the released models (the official defaults, per task).
def placeholders(defaults: dict, model_type: str = "t2v", experts: int = 1) -> dict:
    """The settings' placeholders: the model folder's own defaults (`wanx-defaults.json`, e.g.
    the demo model's 96x96, 17 frames) where it has them, else the official ones of its tasks
    (the task table), so a blank field shows what it will run with."""
    from ..tasks import describe_default

    shown = {field: describe_default(model_type, experts, setting) for field, setting in (
        ("size", "size"), ("frames", "num_frames"), ("steps", "steps"), ("guidance", "guidance"), ("shift", "shift"))}
    shown["negative"] = "blank: the official negative prompt of the task"
    if defaults.get("width") and defaults.get("height"):
        shown["size"] = f"{defaults['width']}x{defaults['height']}"
    for field, key in (("frames", "num_frames"), ("steps", "num_inference_steps"), ("guidance", "guidance_scale"),
                       ("shift", "shift")):
        if defaults.get(key) is not None:
            shown[field] = f"{defaults[key]:g}"
    if defaults.get("negative_prompt") is not None:
        shown["negative"] = "blank: this model's own" + (" (none)" if not defaults["negative_prompt"] else "")
    return shown


def _ui_folder() -> Path:
    """Where Gradio keeps the files uploaded to the page (`wanx serve` puts it under the outputs)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def received(path) -> bool:
    """A file Gradio received from a page: a regular file inside its upload folder, symlinks
    resolved (a request may name any path on the server)."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return resolved.is_relative_to(_ui_folder()) and resolved.is_file() and not Path(path).is_symlink()


def discard(path) -> None:
    """Remove an upload from Gradio's folder, with the folder Gradio made for it when empty."""
    path = Path(path)
    if not received(path):
        return
    path.unlink(missing_ok=True)
    if path.parent != _ui_folder():
        try:
            path.parent.rmdir()
        except OSError:  # something else is in it
            pass


# The settings form's fields in `request_from_form`'s order (the gallery's reuse fills all but the LoRAs).
FORM = ("prompt", "negative", "size", "frames", "steps", "guidance", "shift", "sampler", "seed", "teacache",
        "cfg_steps", "timesteps", "loras")


def build_ui(server: Server) -> gr.Blocks:
    """The page, top to bottom: a tab per task with its uploads, the settings, the results
    (progress, video, queue, gallery); then the events joining them to the server."""
    hint = placeholders(server.files.defaults, server.model_type, 2 if server.files.moe else 1)
    lora_names = server.lora_names()
    with gr.Blocks(title=f"wanx: {server.model_name}") as ui:
        gr.HTML(f"<style>{_CSS}</style>")
        gr.Markdown(f"## wanx &middot; {server.model_name} ({server.model_type})")
        task = gr.State(server.tasks[0].task)
        job_id = gr.State(None)  # the job this page submitted last
        shown = gr.State(None)  # the job whose video is on show (sent once, not at every tick)
        gallery_ids = gr.State([])
        inputs = _task_tabs(server.tasks, task)
        form = _settings_form(hint, lora_names)
        page = _results()
        _on_generate(server, task, form, inputs, page, job_id)
        _on_tick(server.queue, page, job_id, shown, gallery_ids)
        _on_cancel(server.queue, page, job_id)
        _on_gallery_select(server.queue, form, page, gallery_ids)
    return ui


def _task_tabs(tasks, task: gr.State) -> dict:
    """One tab per task-table row of the model, its uploads from the row; choosing a tab sets
    `task`. -> the upload components by request field (and the video-to-video strength)."""
    inputs = {}
    with gr.Tabs():
        for spec in tasks:
            name = spec.task
            with gr.Tab(spec.title, id=name) as tab:
                inputs.update(_task_uploads(spec))
                if not spec.takes:
                    gr.Markdown("Text only: describe the video below.")
            tab.select(lambda n=name: n, outputs=task)
    return inputs


def _task_uploads(spec) -> dict:
    """The upload components of one task's tab, by request field, in the order the task takes them."""
    inputs = {}
    for field in spec.takes:
        optional = "" if field in spec.needs else " (optional)"
        if field not in UI_UPLOADS or field == "video" and "control_video" in spec.takes:
            continue  # VACE: its video is the control video; scale and outpaint: API and CLI
        if field == "control_video":
            inputs[field] = gr.Video(label="Control video (optional)", elem_id=field)
        elif field == "audio":  # S2V: the speech or song
            inputs[field] = gr.Audio(label="Audio: speech or song", type="filepath", elem_id=field)
        elif field == "pose_video" and "audio" in spec.takes:  # S2V's, optional
            inputs[field] = gr.Video(label=f"Pose video{optional}", elem_id=field)
        elif field == "image" and "audio" in spec.takes:
            inputs[field] = gr.Image(label="Reference image", type="filepath", elem_id=field)
        elif field == "mask":
            inputs[field] = gr.File(label="Mask: a video or an image, white = generate (optional)",
                                    file_types=["image", "video"], type="filepath", elem_id=field)
        elif field in ("pose_video", "face_video", "background_video", "mask_video"):
            # Animate: the preprocessed files as they are (a file, not re-encoded by the page)
            words = {"pose_video": "Pose video (src_pose.mp4)",
                     "face_video": "Face video (src_face.mp4)",
                     "background_video": "Background video (src_bg.mp4; replacement)",
                     "mask_video": "Mask video (src_mask.mp4; replacement)"}[field]
            inputs[field] = gr.File(label=words, file_types=["video"], type="filepath", elem_id=field)
        elif field == "image" and "face_video" in spec.takes:  # Animate's
            inputs[field] = gr.Image(label="Reference image (src_ref.png)", type="filepath", elem_id=field)
        elif field == "video":
            inputs["video"] = gr.Video(label="Input video", elem_id="input_video")
            inputs["strength"] = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Strength")
        else:
            inputs[field] = gr.Image(label=f"{INPUT_WORDS[field].removeprefix('the ').capitalize()}{optional}",
                                     type="filepath", elem_id=field)
    return inputs


def _settings_form(hint: dict, lora_names: list) -> dict:
    """The prompt, the LoRAs and the settings; a blank field shows in `hint` what it runs with.
    -> the components by the names in FORM."""
    form = {}
    form["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
    form["negative"] = gr.Textbox(label="Negative prompt", placeholder=hint["negative"], elem_id="negative")
    with gr.Accordion("LoRAs", open=bool(lora_names)):
        form["loras"] = gr.Dataframe(headers=["LoRA", "strength"], datatype=["str", "number"],
                                     value=[[n, 0.0] for n in lora_names] or None, interactive=True,
                                     label="strength 0: not used" if lora_names else "no --loras folder given")
    with gr.Accordion("Advanced settings", open=True):
        with gr.Row():
            form["size"] = gr.Textbox(label="Size (WIDTHxHEIGHT)", placeholder=hint["size"], elem_id="size")
            form["frames"] = gr.Textbox(label="Frames (4k+1)", placeholder=hint["frames"], elem_id="frames")
            form["steps"] = gr.Textbox(label="Steps", placeholder=hint["steps"], elem_id="steps")
            form["seed"] = gr.Textbox(label="Seed", placeholder="random", elem_id="seed")
        with gr.Row():
            form["guidance"] = gr.Textbox(label="Guidance (1..30)", placeholder=hint["guidance"], elem_id="guidance")
            form["shift"] = gr.Textbox(label="Shift", placeholder=hint["shift"], elem_id="shift")
            form["sampler"] = gr.Dropdown(list(SAMPLERS), value="unipc", label="Sampler", elem_id="sampler")
            form["teacache"] = gr.Textbox(label="TeaCache threshold", placeholder="off", elem_id="teacache")
        with gr.Row():  # few-step (distilled) models: their step list, CFG on the first steps only
            form["cfg_steps"] = gr.Textbox(label="CFG steps (then one pass a step)", placeholder="all",
                                           elem_id="cfg_steps")
            form["timesteps"] = gr.Textbox(label="Timesteps (e.g. 1000,750,500,250)", placeholder="from Steps",
                                           elem_id="timesteps")
    return {name: form[name] for name in FORM}


def _results() -> dict:
    """The Generate button, the error and status lines, the preview and the video, the queue
    with cancel, the gallery with the chosen result's settings. -> the components by name."""
    page = {}
    page["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
    page["error"] = gr.Markdown("", elem_id="error")
    page["status"] = gr.Markdown("", elem_id="status")
    with gr.Row():
        page["preview"] = gr.Image(label="Preview (latents, no decoding)", interactive=False, elem_id="preview",
                                   height=160)
        page["result"] = gr.Video(label="Result", interactive=False, elem_id="result")
    with gr.Accordion("Queue", open=True):
        page["table"] = gr.Dataframe(headers=["id", "status", "progress", "prompt"], interactive=False,
                                     elem_id="queue")
        with gr.Row():
            page["active"] = gr.Dropdown([], label="Job", elem_id="cancel_job")
            page["cancel"] = gr.Button("Cancel", elem_id="cancel")
    with gr.Accordion("Gallery (click a result to see it and reuse its settings)", open=True):
        page["gallery"] = gr.Gallery(label="Past results", columns=6, height=220, object_fit="contain",
                                     elem_id="gallery")
        page["settings"] = gr.JSON(label="Settings of the chosen result")
    return page


def _on_generate(server: Server, task: gr.State, form: dict, inputs: dict, page: dict, job_id: gr.State) -> None:
    """Generate: the active tab's uploads and the form as a request, through `Server.submit`;
    the job's id into `job_id`, or the error in one line (a refused upload cleared)."""
    upload_fields = [f for f in UI_UPLOADS if f in inputs]

    def submit(current_task, *values):
        fields = values[:len(form)]
        uploads_given = dict(zip(upload_fields, values[len(form):len(form) + len(upload_fields)]))
        strength_value = values[-1] if "strength" in inputs else None
        spec = next(spec for spec in server.tasks if spec.task == current_task)
        body = request_from_form(*fields, strength=strength_value if "video" in spec.takes else None)
        # only the active tab's inputs go with the request; a missing one is left out: the
        # pipeline's check names it, in the CLI's words
        uploads = {f: uploads_given.get(f) for f in spec.takes if uploads_given.get(f)}
        if "reference_images" in uploads:  # one here; the API takes several
            uploads["reference_images"] = [uploads["reference_images"]]
        keep = [gr.update()] * len(upload_fields)
        missing = [f for f in spec.needs if f not in uploads]
        plain = next((other for other in server.tasks if not set(other.needs) - set(uploads)), None)
        if missing and plain is not None:  # else it would quietly run as the model's other task
            return (f"{missing[0]}: give {INPUT_WORDS[missing[0]]} ({spec.title.lower()}), or use the "
                    f"{plain.title} tab"), gr.update(), *keep
        for field, path in uploads.items():  # Gradio checks this too; a file it let through is still not read
            if not all(received(p) for p in (path if isinstance(path, list) else [path])):
                return f"{field}: only a file uploaded through this page is read", gr.update(), *keep
        try:
            new_id = server.submit(body, uploads)
        except (RequestError, UploadError, NoWorker) as err:  # NoWorker: shown as the API's 503 says it
            # an upload the server refused is of no further use: removed, and the page asks for another
            refused = [f for f in uploads if isinstance(err, UploadError) and err.field == f
                       or isinstance(err, RequestError) and err.field in (f, "")]
            for field in refused:
                for path in uploads[field] if isinstance(uploads[field], list) else [uploads[field]]:
                    discard(path)
            return str(err), gr.update(), *[None if f in refused else gr.update() for f in upload_fields]
        return "", new_id, *keep

    extra = [inputs[f] for f in upload_fields] + ([inputs["strength"]] if "strength" in inputs else [])
    page["generate"].click(submit, inputs=[task, *form.values(), *extra],
                           outputs=[page["error"], job_id, *[inputs[f] for f in upload_fields]])


def _on_tick(queue, page: dict, job_id: gr.State, shown: gr.State, gallery_ids: gr.State) -> None:
    """Once a second: this page's job's status line, preview and (once, when done) video; the
    queue table and its job choice; the gallery when its jobs changed."""

    def refresh(current, on_show, known, chosen):
        job = queue.get(current) if current else None
        frames_now = queue.preview(current) if job is not None and job["status"] == "running" else None
        picture = preview_strip(frames_now) if frames_now is not None else gr.update()
        video, on_show_next = gr.update(), on_show
        if job is not None and job["status"] == "done" and on_show != job["id"]:
            video, on_show_next = str(queue.output_path(job["id"])), job["id"]
        rows = []
        for item in queue.list("running", 10) + queue.list("queued", 50)[::-1]:  # the order they will run
            progress = item.get("progress") or {}
            done = f"{progress.get('step')}/{progress.get('total')}" if progress.get("total") else ""
            rows.append([item["id"], item["status"], done, _prompt_text(item["request"])[:60]])
        ids = [row[0] for row in rows]
        recent = queue.list("done", GALLERY_SIZE)
        recent_ids = [item["id"] for item in recent]
        if recent_ids != known:
            shown_items = []
            for item in recent:
                path = queue.output_path(item["id"])
                if path.is_file():
                    shown_items.append((_poster(str(path), path.stat().st_mtime),
                                        _prompt_text(item["request"])[:40]))
            pictures = gr.update(value=shown_items)
        else:
            pictures = gr.update()
        return (_status_line(job), picture, video, on_show_next, rows or None,
                gr.update(choices=ids, value=chosen if chosen in ids else ids[0] if ids else None), pictures,
                recent_ids)

    timer = gr.Timer(1.0)  # progress, queue and gallery once a second: light beside the worker
    timer.tick(refresh, inputs=[job_id, shown, gallery_ids, page["active"]],
               outputs=[page["status"], page["preview"], page["result"], shown, page["table"], page["active"],
                        page["gallery"], gallery_ids],
               show_progress="hidden")


def _on_cancel(queue, page: dict, job_id: gr.State) -> None:
    """Cancel: the job chosen in the queue, else this page's own; a click with neither says so."""

    def cancel_job(chosen, current):
        # the job chosen in the queue; else this page's own job: the dropdown is refilled every
        # second, and a click that lands while it is being refilled arrives with no value
        target = chosen or current
        if not target:
            return "nothing to cancel: choose a job in the queue"
        queue.cancel(target)
        return ""

    page["cancel"].click(cancel_job, inputs=[page["active"], job_id], outputs=page["error"])


def _on_gallery_select(queue, form: dict, page: dict, gallery_ids: gr.State) -> None:
    """A click on a past result: its video on show, its settings shown and put back in the form."""
    refilled = [form[name] for name in FORM if name != "loras"]

    def reuse(known, evt: gr.SelectData):
        job = queue.get(known[evt.index]) if evt.index is not None and evt.index < len(known) else None
        if job is None:
            return [gr.update()] * len(refilled) + [None, gr.update()]
        request = job["request"]
        text = {k: "" if request.get(k) is None else str(request[k])
                for k in ("frames", "steps", "guidance", "shift", "seed", "teacache", "cfg_steps")}
        steps_list = ",".join(f"{t:g}" for t in request["timesteps"]) if request.get("timesteps") else ""
        return (request.get("prompt", ""), request.get("negative_prompt") or "", request.get("size") or "",
                text["frames"], text["steps"], text["guidance"], text["shift"], request.get("sampler") or "unipc",
                text["seed"], text["teacache"], text["cfg_steps"], steps_list, job["settings"],
                str(queue.output_path(job["id"])))

    page["gallery"].select(reuse, inputs=gallery_ids, outputs=[*refilled, page["settings"], page["result"]])


def _prompt_text(request: dict) -> str:
    """A job's prompt in one line (prompts over time joined by " | ")."""
    prompt = request.get("prompt") or ""
    return " | ".join(prompt) if isinstance(prompt, list) else prompt
