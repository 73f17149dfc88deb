"""The job queue of `wanx serve`: jobs persisted in SQLite in the outputs folder and run one
at a time by a worker thread (one model, loaded once).

A job moves queued -> running -> done | failed | cancelled. A restart finds the job that was
running when the process died, marks it interrupted and runs it once more (then it is left
interrupted); queued jobs simply run. Outputs are written to a temporary name and renamed
(`Video.save`), the settings JSON beside them the same way, so a reader never sees half a file.
Cancelling a running job stops it at the next sampling step (the pipeline's step callback).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import os
import secrets
import socket
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from .queue import QueueError
from .queue import redact as _redact

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "failed", "cancelled")
DB_FILE = "jobs.sqlite"
LOCK_FILE = "serve.lock"  # held (flock) by the one server that runs this folder's queue
INPUTS = "inputs"  # uploaded images and videos, under server-made names
PREVIEWS = "previews"  # each running job's latest latent preview, for API processes other than its worker's
PREVIEW_S = 1.0  # a preview file is rewritten at most this often (a step can be far shorter)

MARKER = "wanx-queue"  # in an outputs folder: the id of the queue whose results it holds


def check_outputs(url: str | None, folder: str | Path, *, api_models=(), worker_model: str | None = None) -> None:
    """Before anything loads: the queue at `url` (None: the folder's own SQLite file) answers and
    has its tables, and `folder` is its outputs folder (bind_outputs). api_models: the models a
    `wanx serve` accepts jobs for, registered in the queue; worker_model: a `wanx worker`'s model,
    refused when the queue's APIs accept no job for it. ValueError in one line otherwise."""
    from .queue import open_queue, redact

    folder = Path(folder)
    queue = open_queue(url or f"sqlite:///{folder / DB_FILE}")
    try:
        bind_outputs(queue, folder)
        if api_models:
            queue.register_api(_api_id(folder), api_models)
        served = queue.api_models() if worker_model is not None else ()
        if served and worker_model not in served:  # none yet: run_forever says so (any start order works)
            raise ValueError(f"--model {worker_model}: the API on queue {redact(queue.url)} accepts jobs only for "
                             f"{', '.join(sorted(served))}; start this worker with one of those, or a wanx serve "
                             f"--model {worker_model} on this queue")
    finally:
        queue.close()


def forget_api(url: str | None, folder: str | Path) -> None:
    """A stopping `wanx serve` takes back what check_outputs registered, so a worker is no longer
    held to the models of an API that is gone. A queue away at that moment is said in one line:
    the entry stays until an API on this host and folder replaces it."""
    from .queue import open_queue

    folder = Path(folder)
    try:
        queue = open_queue(url or f"sqlite:///{folder / DB_FILE}")
        try:
            queue.unregister_api(_api_id(folder))
        finally:
            queue.close()
    except Exception as err:  # stopping: the server's own exit must not fail on it
        print(f"wanx serve: could not take this API's models off the queue ({_one_line(err)})", file=sys.stderr)


def _api_id(folder: Path) -> str:
    """One entry per API: the folder lock allows one server on a host and folder."""
    return f"serve:{socket.gethostname()}:{folder.resolve()}"


def bind_outputs(queue, folder: Path) -> None:
    """One queue, one outputs folder: workers on one queue writing into different folders would
    each run jobs whose results the API then cannot find. The folder's MARKER holds the queue's id
    (written by the first server or worker on the queue); a folder with another queue's id, or
    without one while the queue's results go elsewhere, is refused. The folder's own SQLite queue
    (the default) needs no marker: the file lives in the folder."""
    from .queue import redact

    marker, queue_id = folder / MARKER, queue.queue_id
    fix = "give every wanx serve and wanx worker of one queue the same shared --outputs"
    if marker.is_file():
        held = marker.read_text(encoding="utf-8").strip()
        if held != queue_id:
            raise ValueError(f"--outputs {folder} holds the results of queue {held} (its {MARKER} file), not of "
                             f"--queue {redact(queue.url)} ({queue_id}); {fix}, or a new folder for this queue")
        return
    place = f"{socket.gethostname()}:{folder.resolve()}"
    own = queue.url.startswith("sqlite:///") and \
        Path(queue.url[len("sqlite:///"):]).resolve() == (folder / DB_FILE).resolve()
    bound = queue.bind_outputs(place, fresh_only=not own)
    if own:
        return
    if bound != place:
        where = f"its results go to {bound}" if bound else "it has jobs from before its outputs were recorded"
        raise ValueError(f"--outputs {folder} has no {MARKER} file but queue {redact(queue.url)} is in use ({where}); "
                         f"{fix}; if {folder} is that folder, write the queue's id in it: "
                         f"echo {queue_id} > {marker}")
    _write_atomic(marker, queue_id)


def hold_folder(folder: str | Path):
    """Take the outputs folder for this process: an exclusive lock on `folder/serve.lock`, held
    while the returned file stays open (the kernel lets it go when the process dies, however).
    Two servers on one folder would both run its queue, each taking the other's running job for
    an interrupted one. ValueError, naming the holder, when another process has it."""
    import fcntl

    folder = Path(folder)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{folder} is in use by another wanx serve ({holder}); stop it, or give this one "
                         "other --outputs") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


class Cancelled(Exception):
    """Raised from the step callback to stop a job the user cancelled."""


class _Stopping(Exception):
    """Raised from the step callback when the server shuts down: the job goes back to queued."""


# runner(job, on_step) -> a wanx.video.Video; on_step(step, total, latents) after each step, and
# on_step(None, None, None) between the chunks the VAE decodes: a cancel stops the job at either
Runner = Callable[[dict, Callable[[int, int, object], None]], object]


class NoWorker(RuntimeError):
    """A job for a model no live worker holds (a server run with --workers 0): refused (503)."""


class _Lost(Exception):
    """Raised from the step callback when this worker's lease is gone: stop, and record nothing."""


class JobQueue:
    """Jobs in a `wanx.serve.queue` (by default `folder/jobs.sqlite`), videos as `folder/<id>.mp4`
    with `folder/<id>.json`; this process's worker thread is one claimer of that queue.

    runner: makes the video of one job (the server's pipeline call). retries: how many times a
    job interrupted by a crash is run again. url: the queue (`sqlite:///...`); model: the model
    this server's worker holds (its jobs are submitted for it)."""

    LEASE_S = 300.0  # renewed at every step (at most once a second): only a step this long loses it
    RESTART = "the server stopped while this job ran"

    def __init__(self, folder: str | Path, runner: Runner, *, retries: int = 1, url: str | None = None,
                 model: str = "", worker_id: str | None = None):
        from .queue import open_queue

        self.folder = Path(folder)
        (self.folder / INPUTS).mkdir(parents=True, exist_ok=True)
        self.runner, self.retries, self.model = runner, retries, model
        self.url = url or f"sqlite:///{self.folder / DB_FILE}"
        self.lease_s = lease_seconds()
        self._queue = open_queue(self.url, max_attempts=retries + 1, name=worker_id or "wanx serve")
        bind_outputs(self._queue, self.folder)
        # the server's worker keeps its id across restarts on this folder (whose lock makes it the
        # only one): a restart finds the jobs it was running, as interrupted. A `wanx worker` gives
        # its own, new at each start (a job it held when it died comes back when its lease runs out)
        self.worker_id = worker_id or f"serve:{socket.gethostname()}:{self.folder.resolve()}"
        # this worker's part of the temporary names its results are written under (see _run)
        self._tag = hashlib.sha1(self.worker_id.encode()).hexdigest()[:10]
        self._cancel: set[str] = set()
        self._away = False  # the queue did not answer this worker's last claim
        self._wake = threading.Condition()
        self._progress: dict[str, dict] = {}  # the running job: step, total, times
        self._latents: dict[str, object] = {}  # its latest latents, for a preview on request
        self._beat = 0.0  # when the lease was last renewed
        self._previewed = 0.0  # when this worker last wrote a preview file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a worker that died between an accepted `finish` and its renames left a done job's files
        # under their attempt names: give them their final ones (before the cleanup below takes them)
        for attempt in self.folder.glob(".*.*-*.mp4"):
            job = self._queue.get(attempt.name.split(".")[1])
            if job is not None:
                self._complete(job)
        # half-written by this worker before it died (other workers' files, under other names, are theirs),
        # or by a server from before the per-attempt names
        previews = (self.folder / PREVIEWS).glob(f".*.{self._tag}.partial")
        for stale in (*self.folder.glob(f".*.{self._tag}-*"), *previews):
            stale.unlink(missing_ok=True)
        for stale in self.folder.glob(".*.partial"):
            if re.fullmatch(r"\.[0-9a-f]{16}\.(mp4|json)\.partial", stale.name):
                stale.unlink(missing_ok=True)
        if self.url == f"sqlite:///{self.folder / DB_FILE}":
            _adopt_old_table(self.folder / DB_FILE, self.worker_id, model)
        # A job still 'running' under this worker belongs to a process that died: it was
        # interrupted, or it was being cancelled (then it stays cancelled: never run again).
        for job_id in self._queue.interrupt(self.worker_id, self.RESTART):
            if self._queue.get(job_id)["status"] == "cancelled":
                self._remove_inputs(job_id)

    # -- submitting and reading -------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        """A server-made id: it also names the job's files, so no client text reaches a path."""
        return secrets.token_hex(8)

    def input_path(self, job_id: str, field: str, suffix: str) -> Path:
        return self.folder / INPUTS / f"{job_id}-{field}{suffix}"

    def output_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.mp4"

    def submit(self, request: dict, *, inputs: dict[str, str] | None = None, job_id: str | None = None) -> str:
        job_id = self._queue.submit(request, inputs or {}, model=self.model, job_id=job_id or self.new_id())
        with self._wake:
            self._wake.notify()
        return job_id

    def get(self, job_id: str) -> dict | None:
        job = self._queue.get(job_id)
        return self._public(self._complete(job)) if job else None

    def list(self, status: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first."""
        return [self._public(self._complete(job)) for job in self._queue.list(status=status, limit=limit)]

    def counts(self) -> dict[str, int]:
        return self._queue.counts()["status"]

    def cancel(self, job_id: str) -> dict | None:
        """A queued job is cancelled at once; a running one at its next sampling step."""
        job = self._queue.cancel(job_id)  # written before the answer: a crash now must not run it again
        if job is None:
            return None
        if job["status"] == "cancelled":
            self._remove_inputs(job_id)
        elif job["status"] == "running":
            self._cancel.add(job_id)  # this process's worker stops at once, others at their heartbeat
        return self._public(job)

    def delete(self, job_id: str) -> bool:
        """Remove a finished job with its files. False when there is no such job."""
        try:
            if not self._queue.delete(job_id):
                return False
        except ValueError as err:  # not over yet
            raise RuntimeError(str(err)) from None
        for path in (self.output_path(job_id), self.output_path(job_id).with_suffix(".json"),
                     self.preview_path(job_id)):
            path.unlink(missing_ok=True)
        self._remove_inputs(job_id)
        return True

    def preview_path(self, job_id: str) -> Path:
        return self.folder / PREVIEWS / f"{job_id}.png"

    def preview(self, job_id: str) -> np.ndarray | None:
        """The running job's current latents as RGB frames (see latent_preview), or None: from this
        process's worker when it runs the job, else from the file its worker writes (`_write_preview`)."""
        latents = self._latents.get(job_id)
        if latents is not None:
            return latent_preview(latents)
        job = self._queue.get(job_id)
        if job is None or job["status"] != "running":  # a file left by a worker that died with its job is not shown
            return None
        return _read_preview(self.preview_path(job_id))

    # -- what the operations routes read --------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether this process's worker thread runs (False for an API-only process: it has none)."""
        return self._thread is not None and self._thread.is_alive()

    def counts_by_model(self) -> dict[str, dict[str, int]]:
        """{model: {status: jobs}} over the whole queue, every model and worker."""
        return self._queue.counts()["model"]

    def workers(self, max_age: float | None = None) -> list[dict]:
        """The queue's registered workers (see `Queue.workers`): models, last heartbeat, job counts, GPU memory."""
        return self._queue.workers(max_age)

    # -- the worker -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._queue.register_worker(self.worker_id, [self.model], host=socket.gethostname())
        self._thread = threading.Thread(target=self._work, name="wanx-worker", daemon=True)
        self._thread.start()

    def run_forever(self, host: str | None = None) -> None:
        """Be a worker in this thread until SIGTERM or Ctrl-C (`wanx worker`): the loop of `start`,
        here in the foreground. The signal stops the running job at its next step and gives it back
        to the queue (not counted as an attempt); a second Ctrl-C stops at once."""
        def stop(signum, frame):
            self._stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._stop.clear()
        self._queue.register_worker(self.worker_id, [self.model], host=host or socket.gethostname())
        if not self._queue.api_models():  # started before any API: not refused (start order is free), said
            print(f"wanx worker: no wanx serve has registered on queue {_redact(self.url)} yet; this worker runs its "
                  f"jobs for {self.model} once one accepts them", file=sys.stderr, flush=True)
        try:
            self._work()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            with contextlib.suppress(Exception):
                self._queue.unregister_worker(self.worker_id)
            self._queue.close()

    def live_models(self) -> set[str]:
        """The models some worker holds that was heard from within one lease (claiming, or heartbeating)."""
        return self._queue.live_models(self.lease_s)

    def stop(self, timeout: float | None = 30) -> None:
        """Stop after the current step; the job that was running goes back to the queue."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            with contextlib.suppress(Exception):
                self._queue.unregister_worker(self.worker_id)
        self._queue.close()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or running (for tests and scripts)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            counts = self.counts()
            if not counts.get("queued") and not counts.get("running") and not self._retryable():
                return True
            time.sleep(0.05)
        return False

    def _retryable(self) -> bool:
        return any(job["attempts"] <= self.retries for job in self._queue.list(status="interrupted", limit=10**6))

    def _claim(self) -> dict | None:
        """The oldest job to run (queued, or interrupted with a retry left), marked running."""
        job = self._queue.claim(self.worker_id, [self.model], self.lease_s)
        if job is None:
            return None
        self._beat = time.monotonic()
        return {**self._public(job), "input_files": job["inputs"]}

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._claim()
            except QueueError as err:  # the queue is away (a restart, the network): wait for it, said once
                if not self._away:
                    print(f"wanx: worker {self.worker_id} waits for the queue: {err}", file=sys.stderr, flush=True)
                self._away = True
                self._stop.wait(2.0)
                continue
            self._away = False
            if job is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            try:
                self._run(job)
            except QueueError as err:  # it went away as the job ended: the job is settled, or its lease runs out
                print(f"wanx: worker {self.worker_id}: {err}", file=sys.stderr, flush=True)

    def _heartbeat(self, job_id: str) -> None:
        """Renew the lease (at most once a second) and hear of a cancel from another process."""
        if time.monotonic() - self._beat < 1.0:
            return
        self._beat = time.monotonic()
        progress = self._progress.get(job_id)
        state = self._queue.heartbeat(job_id, self.worker_id, self.lease_s,
                                      progress=_progress_view(progress) if progress else None,
                                      gpu_memory=_gpu_memory())
        if state == "cancelled":
            self._cancel.add(job_id)
        elif state == "lost":
            raise _Lost

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        self._progress[job_id] = {"step": 0, "total": None, "since": time.monotonic(), "first": None}

        def on_step(step: int | None, total: int | None, latents) -> None:
            if step is not None:  # a sampling step (None: a decoded chunk)
                now = time.monotonic()
                progress = self._progress[job_id]
                if progress["first"] is None:  # the ETA counts from the first step: text encoding is not a step
                    progress["first"] = (now, step)
                progress.update(step=step, total=total, at=now)
                self._latents[job_id] = latents
                if latents is not None and now - self._previewed >= PREVIEW_S:
                    self._previewed = now
                    try:
                        self._write_preview(job_id, latents)
                    except OSError as err:  # a full or read-only disk costs the preview, not the job
                        print(f"wanx: job {job_id}: no preview written ({_one_line(err)})", file=sys.stderr)
            self._heartbeat(job_id)
            if job_id in self._cancel:
                raise Cancelled
            if self._stop.is_set():
                raise _Stopping

        # Written under this attempt's own names, renamed to the final ones only once `finish` is
        # accepted: a worker whose lease ran out (and whose job another worker now runs) writes no result
        out = self.output_path(job_id)
        attempt = self.folder / f".{job_id}.{self._tag}-{job['attempts']}.mp4"
        try:
            video = self.runner(job, on_step)
            # S2V's audio as its sound track; Video.save itself writes a temporary name and renames
            video.save(attempt, audio=getattr(video, "soundtrack", None))
            settings = {**video.metadata, "id": job_id, "request": job["request"]}
            _write_atomic(attempt.with_suffix(".json"), json.dumps(settings, indent=2, ensure_ascii=False))
            # the row names this attempt's files: if this process dies before the renames below,
            # whoever reads the job next (the API, a worker starting) completes them (_complete)
            files = {"video": attempt.name, "settings": attempt.with_suffix(".json").name}
            if self._queue.finish(job_id, self.worker_id, "done", settings=settings, result={"files": files}):
                os.replace(attempt.with_suffix(".json"), out.with_suffix(".json"))
                os.replace(attempt, out)
        except Cancelled:
            self._queue.finish(job_id, self.worker_id, "cancelled")
        except _Stopping:  # not this job's fault: it runs again on the next start, as if never started
            self._queue.release(job_id, self.worker_id)
        except _Lost:  # another worker has it now: nothing of this run is recorded
            pass
        except QueueError as err:
            # the queue's connection dropped inside a heartbeat (or the finish): not the job's fault.
            # Nothing of this run is recorded; the job goes back now (the next call reconnects), or
            # when its lease runs out if the queue is still away. A finish that did land is kept
            # (release refuses a job no longer running)
            print(f"wanx: job {job_id} given back to the queue: {err}", file=sys.stderr, flush=True)
            with contextlib.suppress(QueueError):
                if not self._queue.release(job_id, self.worker_id):
                    self.get(job_id)  # the finish landed, its answer lost: its files get their names before the cleanup
        except Exception as err:  # the job failed, the server goes on
            traceback.print_exc(file=sys.stderr)
            self._queue.finish(job_id, self.worker_id, "failed", error=_one_line(err))
        finally:
            for path in (attempt, attempt.with_suffix(".json")):  # left only when not accepted
                path.unlink(missing_ok=True)
            self._cancel.discard(job_id)
            self._progress.pop(job_id, None)
            self._latents.pop(job_id, None)
            self.preview_path(job_id).unlink(missing_ok=True)
            if self.get(job_id) and self.get(job_id)["status"] in FINAL:
                self._remove_inputs(job_id)

    # -- helpers ----------------------------------------------------------------------------
    def _write_preview(self, job_id: str, latents) -> None:
        """The job's latent preview frames as a PNG, stacked top to bottom at their own size (the
        frame count in its text), renamed into place: an API process other than this one reads it."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        frames = latent_preview(latents)
        info = PngInfo()
        info.add_text("wanx-frames", str(len(frames)))
        path = self.preview_path(job_id)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{self._tag}.partial")
        Image.fromarray(frames.reshape(-1, *frames.shape[2:])).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)

    def _remove_inputs(self, job_id: str) -> None:
        for path in (self.folder / INPUTS).glob(f"{job_id}-*"):
            path.unlink(missing_ok=True)

    def _complete(self, row: dict) -> dict:
        """A done job whose finisher stopped between its accepted `finish` and the renames: the
        attempt's files the row names get their final names (settings first, as `_run` does).
        Two readers at once are fine: the second finds the attempt's file gone. Returns `row`."""
        files = (row.get("result") or {}).get("files") if row["status"] == "done" else None
        if not isinstance(files, dict):
            return row
        out = self.output_path(row["id"])
        ours = rf"\.{re.escape(row['id'])}\.[0-9a-f]+-\d+\.(mp4|json)"  # an attempt's name: never a path from the row
        for kind, final in (("settings", out.with_suffix(".json")), ("video", out)):
            name = files.get(kind)
            if not isinstance(name, str) or not re.fullmatch(ours, name):
                continue
            if not final.exists() and (self.folder / name).exists():
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.folder / name, final)
        return row

    def _public(self, row: dict) -> dict:
        job = {"id": row["id"], "status": row["status"], "request": row["request"],
               "inputs": sorted(row["inputs"]), "settings": row["settings"],
               "error": row["error"], "attempts": row["attempts"],
               "events": [status for status, _ in row["events"]],
               "created": row["created"], "started": row["started"], "finished": row["finished"],
               "progress": None, "cancelling": row["status"] == "running" and bool(row["cancel"])}
        progress = self._progress.get(row["id"])
        if row["status"] == "running" and progress is not None:
            job["progress"] = _progress_view(progress)
        elif row["status"] == "running" and row.get("progress"):  # another process runs it: its last heartbeat's
            job["progress"] = row["progress"]
        elif row["status"] == "done" and job["settings"]:
            steps = job["settings"].get("steps")
            job["progress"] = {"step": steps, "total": steps, "eta_s": 0.0}
        return job


def _adopt_old_table(path: Path, worker_id: str, model: str) -> None:
    """A folder from before the shared queue keeps its jobs in a table `jobs`: move them into
    the queue's table once (a job that was running then is this worker's, so it is interrupted)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=30)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is None:
            return
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        cancel = "cancel" if "cancel" in columns else "0"  # an older folder still
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO wanx_jobs (id, model, priority, status, request, inputs, settings, error, worker_id, "
                   "expires_at, attempts, cancel, events, created, started, finished) "
                   f"SELECT id, ?, 0, status, request, inputs, settings, error, "
                   f"CASE WHEN status = 'running' THEN ? END, NULL, attempts, {cancel}, events, created, started, "
                   "finished FROM jobs ORDER BY seq", (model, worker_id))
        db.execute("DROP TABLE jobs")
        db.execute("COMMIT")


def _progress_view(progress: dict) -> dict:
    step, total, first = progress["step"], progress["total"], progress["first"]
    eta = None
    if first is not None and total and step > first[1]:
        per_step = (progress["at"] - first[0]) / (step - first[1])
        eta = round(per_step * (total - step), 2)
    return {"step": step, "total": total, "eta_s": eta}


def _read_preview(path: Path) -> np.ndarray | None:
    """The frames `[F, h, w, 3]` of a preview file (see JobQueue._write_preview), or None when there is none."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            frames = int(image.text.get("wanx-frames", "1"))
            pixels = np.asarray(image.convert("RGB"))
    except OSError:  # none yet, or gone as the job ended
        return None
    return pixels.reshape(frames, -1, *pixels.shape[1:])


def _gpu_memory() -> int | None:
    """This process's peak GPU memory in bytes, None without a GPU in use (torch is never imported for it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def latent_preview(latents, max_frames: int = 6) -> np.ndarray:
    """A cheap look at latents `[1, 16, F', h, w]` (or `[16, F', h, w]`): their three main
    directions across the 16 channels (PCA of this very tensor, so it needs no decoder) as
    RGB, uint8 `[min(F', max_frames), h, w, 3]`. A sign is fixed per direction so colours
    do not flip from one step to the next."""
    import torch

    x = latents.detach().float().cpu()
    if x.ndim == 5:
        x = x[0]
    channels, frames = x.shape[:2]
    pick = torch.linspace(0, frames - 1, min(frames, max_frames)).round().long()
    x = x[:, pick]  # [16, f, h, w]
    flat = x.reshape(channels, -1).T  # (N, 16)
    flat = flat - flat.mean(0)
    _, vectors = torch.linalg.eigh(flat.T @ flat / max(1, flat.shape[0]))
    top = vectors[:, -3:].flip(1)  # (16, 3), largest first
    top = top * torch.sign(top[top.abs().argmax(0), torch.arange(3)])  # the largest entry positive
    rgb = flat @ top  # (N, 3)
    scale = rgb.abs().quantile(0.99, dim=0).clamp_min(1e-6)
    rgb = ((rgb / scale).clamp(-1, 1) + 1) * 127.5
    return rgb.T.reshape(3, *x.shape[1:]).permute(1, 2, 3, 0).round().to(torch.uint8).numpy()


def lease_seconds() -> float:
    """A worker's lease: $WANX_LEASE_S, else JobQueue.LEASE_S. A worker that dies holds its job this
    long; short leases (tests, fast failover) cost a heartbeat a second either way."""
    given = os.environ.get("WANX_LEASE_S")
    if not given:
        return JobQueue.LEASE_S
    try:
        value = float(given)
    except ValueError:
        value = 0.0
    if not value >= 2:  # NaN too; a heartbeat comes at most once a second
        raise ValueError(f"WANX_LEASE_S={given}: give the lease in seconds, at least 2 (default {JobQueue.LEASE_S:.0f})")
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
