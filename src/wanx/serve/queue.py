"""The job queue shared by the API and any number of workers, over SQLite or PostgreSQL.

One interface, two backends chosen by URL:
- `sqlite:///path/jobs.sqlite`: one machine; WAL mode, so several local processes (the API
  and its workers) read while one writes; a claim is a `BEGIN IMMEDIATE` transaction.
- `postgresql://user@host/db`: many hosts; a claim takes its row with
  `SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on, or share, a job.

The semantics are the same code on both; only the SQL that differs (types, row locks,
placeholders) is isolated in the two backend classes.

A claimed job carries a lease (`expires_at`). The worker renews it with `heartbeat` at each
step (which also tells it about a cancel); a worker that dies stops renewing, and the next
claim re-queues its job (or fails it once it was lost `max_attempts` times). Only the lease
holder can `finish` a job, so a late duplicate (lost its lease, the job since re-claimed)
is refused and its result never recorded: each job has exactly one recorded result.
A worker that restarts under its old id calls `interrupt`: the jobs it held become
`interrupted`, claimable again while attempts are left. Every move is kept in the job's `events`.

Times are the clients' wall clocks (time.time()): hosts sharing a PostgreSQL need NTP, and
lease lengths should be far above their skew (tens of seconds, not milliseconds).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import secrets
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "failed", "cancelled")
RETRYABLE = ("failed", "cancelled", "interrupted")
# the upper bounds of the job-seconds histogram each worker keeps in its registry row (see `finish`):
# from a tiny CPU job (well under a second) to a long 720p one (an hour)
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


class QueueError(ValueError):
    """A queue that cannot be opened or used; its message is one line naming the URL and the fix."""


def redact(url: str) -> str:
    """`url` without its password, fit for an error message or a log: the one in the user part
    and a `password=` query parameter (libpq takes it there too)."""
    from urllib.parse import parse_qsl, urlencode

    parts = urlsplit(url)
    if parts.password is None and "password=" not in parts.query:
        return url  # as given (urlunsplit would drop an empty host's '//')
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(key == "password" for key, _ in query):
            shown = [(key, "***" if key == "password" else value) for key, value in query]
            parts = parts._replace(query=urlencode(shown, safe="*"))
    return urlunsplit(parts)


def open_queue(url: str, *, max_attempts: int = 3, name: str = "wanx") -> "Queue":
    """The queue at `url` (`sqlite:///path` or `postgresql://...`), its tables created on first use.
    name: who connects (a worker's id), PostgreSQL's application_name unless the URL gives one:
    an operator finds (or drops) one worker's connections in pg_stat_activity by it."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        backend = _SQLite(url)
    elif scheme in ("postgresql", "postgres"):
        backend = _Postgres(url, name)
    else:
        raise QueueError(f"queue {redact(url)!r}: unknown kind; give sqlite:///path/jobs.sqlite "
                         "or postgresql://user@host/database")
    if max_attempts < 1:
        raise QueueError(f"queue max_attempts {max_attempts}: give 1 or more")
    return Queue(backend, max_attempts=max_attempts)


class Queue:
    """Jobs (submit, claim with a lease, heartbeat, finish, cancel, read) and the workers registry."""

    def __init__(self, backend: "_Backend", *, max_attempts: int = 3):
        self._db = backend
        self.url = backend.url
        self.max_attempts = max_attempts
        backend.create_schema()
        backend.create_meta()

    def close(self) -> None:
        self._db.close()

    # -- identity: which outputs folder and which API models go with this queue ----------------------

    @property
    def queue_id(self) -> str:
        """This queue's identity, made with its tables: an outputs folder's marker holds it."""
        with self._db.transaction(write=False) as sql:
            return sql("SELECT value FROM wanx_meta WHERE key = 'queue_id'")[0][0]

    def bind_outputs(self, place: str, *, fresh_only: bool = True) -> str | None:
        """Record `place` (host:folder) as where this queue's outputs go, unless one is recorded
        already or (fresh_only) the queue has jobs from before: their results are somewhere this
        queue cannot tell. Returns the recorded place (this one if it was the first), or None."""
        with self._db.transaction() as sql:
            if not sql("SELECT 1 FROM wanx_meta WHERE key = 'outputs'"):
                if fresh_only and sql("SELECT 1 FROM wanx_jobs LIMIT 1"):
                    return None
                sql("INSERT INTO wanx_meta (key, value) VALUES ('outputs', ?) ON CONFLICT (key) DO NOTHING", (place,))
            return sql("SELECT value FROM wanx_meta WHERE key = 'outputs'")[0][0]

    def register_api(self, api_id: str, models) -> None:
        """An API (`wanx serve`) that accepts jobs for `models`: a worker for another model is refused."""
        models = [models] if isinstance(models, str) else list(models)
        with self._db.transaction() as sql:
            sql("INSERT INTO wanx_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                "value = excluded.value", (f"api:{api_id}", json.dumps(models)))

    def unregister_api(self, api_id: str) -> None:
        """The API stopped: its models no longer count for `api_models`."""
        with self._db.transaction() as sql:
            sql("DELETE FROM wanx_meta WHERE key = ?", (f"api:{api_id}",))

    def api_models(self) -> set[str]:
        """The models the APIs registered on this queue accept jobs for (empty: none has started yet)."""
        with self._db.transaction(write=False) as sql:
            rows = sql("SELECT value FROM wanx_meta WHERE key LIKE ?", ("api:%",))  # '%' in the text: psycopg's mark
        return {model for (value,) in rows for model in json.loads(value)}

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, request: dict, inputs: dict | None = None, model: str = "", priority: int = 0,
               *, job_id: str | None = None) -> str:
        """Queue a job for `model`; higher `priority` runs first, then submission order."""
        job_id = job_id or secrets.token_hex(8)
        now = time.time()
        with self._db.transaction() as sql:
            sql("INSERT INTO wanx_jobs (id, model, priority, status, request, inputs, attempts, cancel, events, "
                "created) VALUES (?, ?, ?, 'queued', ?, ?, 0, 0, ?, ?)",
                (job_id, model, int(priority), json.dumps(request), json.dumps(inputs or {}),
                 json.dumps([["queued", now]]), now))
        return job_id

    def claim(self, worker_id: str, models, lease_seconds: float) -> dict | None:
        """Take the next job for one of `models` with a lease of `lease_seconds`, or None: the
        oldest of the highest priority that is queued, or interrupted with an attempt left."""
        models = [models] if isinstance(models, str) else list(models)
        if not models:
            return None
        self.requeue_expired()
        now = time.time()
        marks = ", ".join("?" for _ in models)
        with self._db.transaction() as sql:
            rows = sql(f"SELECT id FROM wanx_jobs WHERE (status = 'queued' OR (status = 'interrupted' AND "
                       f"attempts < ?)) AND model IN ({marks}) "
                       f"ORDER BY priority DESC, seq LIMIT 1{self._db.lock_row}", (self.max_attempts, *models))
            self._touch(sql, worker_id, now)
            if not rows:
                return None
            job_id = rows[0][0]
            self._move(sql, job_id, "running", worker_id=worker_id, expires_at=now + lease_seconds, started=now,
                       error=None, attempts=("attempts + 1",))
            return self._public(sql("SELECT * FROM wanx_jobs WHERE id = ?", (job_id,))[0], sql.columns)

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float, *, progress: dict | None = None,
                  gpu_memory: int | None = None) -> str:
        """Renew the lease. Returns 'running' (go on), 'cancelled' (stop, then finish as cancelled)
        or 'lost' (the lease is no longer this worker's: stop, and record nothing).
        progress: the job's progress (step, total, eta_s) for any API process to show; gpu_memory:
        the worker's peak GPU memory in bytes (None: no GPU), kept in its registry row."""
        now = time.time()
        with self._db.transaction() as sql:
            changed = sql.update("UPDATE wanx_jobs SET expires_at = ?, progress = COALESCE(?, progress) WHERE id = ? "
                                 "AND worker_id = ? AND status = 'running'",
                                 (now + lease_seconds, json.dumps(progress) if progress is not None else None,
                                  job_id, worker_id))
            if not changed:
                return "lost"
            self._touch(sql, worker_id, now, gpu_memory)
            cancel = sql("SELECT cancel FROM wanx_jobs WHERE id = ?", (job_id,))[0][0]
        return "cancelled" if cancel else "running"

    def finish(self, job_id: str, worker_id: str, status: str, *, result=None, settings=None,
               error: str | None = None) -> bool:
        """Record the outcome; True if recorded, False if refused (this worker no longer holds the lease)."""
        if status not in FINAL:
            raise ValueError(f"finish status {status!r}: give one of {', '.join(FINAL)}")
        with self._db.transaction() as sql:
            if not self._held(sql, job_id, worker_id):
                return False
            now = time.time()
            self._move(sql, job_id, status, result=json.dumps(result), settings=json.dumps(settings), error=error,
                       finished=now, expires_at=None)
            self._count(sql, job_id, worker_id, status, now)
            return True

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a job back unrun (the worker is stopping, not the job's fault): queued again, this
        attempt not counted. False if this worker no longer holds it."""
        with self._db.transaction() as sql:
            if not self._held(sql, job_id, worker_id):
                return False
            self._move(sql, job_id, "queued", worker_id=None, expires_at=None, attempts=("attempts - 1",))
            return True

    def interrupt(self, worker_id: str, reason: str) -> list[str]:
        """A worker that restarts under the same id: the jobs it held when it died are
        `interrupted` (run again while attempts are left) or, if cancelled meanwhile, cancelled."""
        now = time.time()
        with self._db.transaction() as sql:
            rows = sql("SELECT id, cancel FROM wanx_jobs WHERE status = 'running' AND worker_id = ?"
                       f" ORDER BY seq{self._db.lock_wait}", (worker_id,))
            for job_id, cancel in rows:
                if cancel:
                    self._move(sql, job_id, "cancelled", finished=now, expires_at=None)
                else:
                    self._move(sql, job_id, "interrupted", error=reason, worker_id=None, expires_at=None)
        return [row[0] for row in rows]

    def requeue_expired(self) -> int:
        """Jobs whose lease ran out: re-queued, cancelled (if asked), or failed after `max_attempts`."""
        now = time.time()
        with self._db.transaction() as sql:
            rows = sql("SELECT id, cancel, attempts FROM wanx_jobs WHERE status = 'running' AND expires_at < ? "
                       f"ORDER BY seq{self._db.lock_row}", (now,))
            for job_id, cancel, attempts in rows:
                if cancel:
                    self._move(sql, job_id, "cancelled", finished=now, expires_at=None)
                elif attempts >= self.max_attempts:
                    self._move(sql, job_id, "failed", finished=now, expires_at=None,
                               error=f"worker lost {attempts} times (its lease expired each time)")
                else:
                    self._move(sql, job_id, "queued", worker_id=None, expires_at=None)
        return len(rows)

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a waiting job now; ask a running one to stop (its worker sees it at the next heartbeat)."""
        with self._db.transaction() as sql:
            rows = sql(f"SELECT status FROM wanx_jobs WHERE id = ?{self._db.lock_wait}", (job_id,))
            if rows and rows[0][0] in ("queued", "interrupted"):
                self._move(sql, job_id, "cancelled", finished=time.time())
            elif rows and rows[0][0] == "running":
                sql.update("UPDATE wanx_jobs SET cancel = 1 WHERE id = ?", (job_id,))
        return self.get(job_id)

    def retry(self, job_id: str) -> dict | None:
        """A failed, cancelled or interrupted job queued again, as new: its attempts back to 0, its
        error, result and times cleared (its events keep the history). None when there is no such job."""
        with self._db.transaction() as sql:
            rows = sql(f"SELECT status FROM wanx_jobs WHERE id = ?{self._db.lock_wait}", (job_id,))
            if not rows:
                return None
            if rows[0][0] not in RETRYABLE:
                raise ValueError(f"job {job_id} is {rows[0][0]}: only a {', '.join(RETRYABLE[:-1])} or "
                                 f"{RETRYABLE[-1]} job can be retried")
            self._move(sql, job_id, "queued", attempts=0, cancel=0, error=None, result=None, settings=None,
                       worker_id=None, expires_at=None, started=None, finished=None)
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Forget a job that is over (final, or interrupted); False when there is no such job."""
        with self._db.transaction() as sql:
            rows = sql(f"SELECT status FROM wanx_jobs WHERE id = ?{self._db.lock_wait}", (job_id,))
            if not rows:
                return False
            if rows[0][0] not in (*FINAL, "interrupted"):
                raise ValueError(f"job {job_id} is {rows[0][0]}: cancel it first")
            sql("DELETE FROM wanx_jobs WHERE id = ?", (job_id,))
            return True

    def get(self, job_id: str) -> dict | None:
        with self._db.transaction(write=False) as sql:
            rows = sql("SELECT * FROM wanx_jobs WHERE id = ?", (job_id,))
            return self._public(rows[0], sql.columns) if rows else None

    def list(self, status: str | None = None, model: str | None = None, limit: int = 100) -> list[dict]:
        """Jobs, newest first, optionally only one status and/or one model."""
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if model:
            where.append("model = ?")
            args.append(model)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        with self._db.transaction(write=False) as sql:
            rows = sql(f"SELECT * FROM wanx_jobs {clause}ORDER BY seq DESC LIMIT ?", (*args, int(limit)))
            return [self._public(row, sql.columns) for row in rows]

    def counts(self) -> dict:
        """{'status': {status: n}, 'model': {model: {status: n}}}."""
        with self._db.transaction(write=False) as sql:
            rows = sql("SELECT model, status, COUNT(*) FROM wanx_jobs GROUP BY model, status", ())
        by_status: dict[str, int] = {}
        by_model: dict[str, dict[str, int]] = {}
        for model, status, n in rows:
            by_status[status] = by_status.get(status, 0) + n
            by_model.setdefault(model, {})[status] = n
        return {"status": by_status, "model": by_model}

    # -- workers ---------------------------------------------------------------------------------

    def register_worker(self, worker_id: str, models, host: str = "") -> None:
        models = [models] if isinstance(models, str) else list(models)
        with self._db.transaction() as sql:
            sql("INSERT INTO wanx_workers (worker_id, models, host, last_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (worker_id) DO UPDATE SET models = excluded.models, host = excluded.host, "
                "last_seen = excluded.last_seen", (worker_id, json.dumps(models), host, time.time()))

    def unregister_worker(self, worker_id: str) -> None:
        with self._db.transaction() as sql:
            sql("DELETE FROM wanx_workers WHERE worker_id = ?", (worker_id,))

    def workers(self, max_age: float | None = None) -> list[dict]:
        """Registered workers, only those seen in the last `max_age` seconds when given. Each with
        `stats`, the jobs it ended (see `_count`): {model: {status: {count, sum (seconds), buckets}}},
        buckets as [(upper bound, jobs up to it)] over JOB_BUCKETS, and `gpu_memory`, its peak GPU
        memory in bytes at its last heartbeat (None without a GPU)."""
        with self._db.transaction(write=False) as sql:
            rows = sql("SELECT worker_id, models, host, last_seen, stats, gpu_memory FROM wanx_workers "
                       "ORDER BY worker_id", ())
        now = time.time()
        return [{"worker_id": w, "models": json.loads(m), "host": h, "last_seen": seen,
                 "stats": _cumulative(json.loads(stats) if stats else {}),
                 "gpu_memory": None if gpu is None else int(gpu)}
                for w, m, h, seen, stats, gpu in rows if max_age is None or now - seen <= max_age]

    def live_models(self, max_age: float) -> set[str]:
        """The models some worker seen in the last `max_age` seconds holds: the API refuses others."""
        return {model for worker in self.workers(max_age) for model in worker["models"]}

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _held(sql, job_id: str, worker_id: str) -> bool:
        """Whether `worker_id` holds the running job's lease, the row locked for this transaction."""
        return bool(sql(f"SELECT 1 FROM wanx_jobs WHERE id = ? AND worker_id = ? AND status = 'running'"
                        f"{sql.lock_wait}", (job_id, worker_id)))

    @staticmethod
    def _move(sql, job_id: str, status: str, **columns) -> None:
        """Move a job to `status`, recorded in its events, setting `columns` too (a 1-tuple: an SQL expression).
        Its progress is cleared: it tells of one run, and any move ends or starts one."""
        events = json.loads(sql("SELECT events FROM wanx_jobs WHERE id = ?", (job_id,))[0][0])
        columns = {"status": status, "events": json.dumps(events + [[status, time.time()]]), "progress": None,
                   **columns}
        sets = ", ".join(f"{k} = {v[0]}" if isinstance(v, tuple) else f"{k} = ?" for k, v in columns.items())
        values = [v for v in columns.values() if not isinstance(v, tuple)]
        sql.update(f"UPDATE wanx_jobs SET {sets} WHERE id = ?", (*values, job_id))

    @staticmethod
    def _touch(sql, worker_id: str, now: float, gpu_memory: int | None = None) -> None:
        sql("UPDATE wanx_workers SET last_seen = ?, gpu_memory = COALESCE(?, gpu_memory) WHERE worker_id = ?",
            (now, gpu_memory, worker_id))

    @staticmethod
    def _count(sql, job_id: str, worker_id: str, status: str, now: float) -> None:
        """Count a job `worker_id` ended in its registry row: seconds from its claim to now, by model
        and status, in JOB_BUCKETS. Written in the transaction that records the outcome, so each
        job is counted once, by the worker that ran it; every API process reads the same counts."""
        rows = sql(f"SELECT stats FROM wanx_workers WHERE worker_id = ?{sql.lock_wait}", (worker_id,))
        if not rows:
            return  # not registered (a script's own claimer): nowhere to count
        model, started = sql("SELECT model, started FROM wanx_jobs WHERE id = ?", (job_id,))[0]
        seconds = max(0.0, now - started)
        stats = json.loads(rows[0][0]) if rows[0][0] else {}
        entry = stats.setdefault(model, {}).setdefault(status, {"count": 0, "sum": 0.0,
                                                                  "buckets": [0] * len(JOB_BUCKETS)})
        entry["count"] += 1
        entry["sum"] += seconds
        entry["buckets"][next(i for i, bound in enumerate(JOB_BUCKETS) if seconds <= bound)] += 1
        sql("UPDATE wanx_workers SET stats = ? WHERE worker_id = ?", (json.dumps(stats), worker_id))

    @staticmethod
    def _public(row, columns) -> dict:
        job = dict(zip(columns, row))
        for key in ("request", "inputs", "result", "settings", "events", "progress"):
            job[key] = json.loads(job[key]) if job[key] is not None else None
        job["cancel"] = bool(job["cancel"])
        return job


def _cumulative(stats: dict) -> dict:
    """A worker's stored stats (jobs per bucket) with the buckets as Prometheus has them: (bound, jobs up to it)."""
    shown = {}
    for model, statuses in stats.items():
        for status, entry in statuses.items():
            running = list(itertools.accumulate(entry["buckets"]))
            shown.setdefault(model, {})[status] = {**entry, "buckets": list(zip(JOB_BUCKETS, running))}
    return shown


# -- backends: the only place SQL dialects differ -----------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS wanx_jobs (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    inputs TEXT NOT NULL,
    result TEXT,
    settings TEXT,
    error TEXT,
    worker_id TEXT,
    expires_at {real},
    attempts INTEGER NOT NULL,
    cancel INTEGER NOT NULL,
    events TEXT NOT NULL,
    created {real} NOT NULL,
    started {real},
    finished {real},
    progress TEXT
);
CREATE INDEX IF NOT EXISTS wanx_jobs_claim ON wanx_jobs (status, model, priority, seq);
CREATE TABLE IF NOT EXISTS wanx_workers (
    worker_id TEXT PRIMARY KEY,
    models TEXT NOT NULL,
    host TEXT NOT NULL,
    last_seen {real} NOT NULL,
    stats TEXT,
    gpu_memory {real}
);
"""
# columns added since the first release of these tables: a table made before has them added (ADD COLUMN)
_ADDED = {"wanx_jobs": {"progress": "TEXT"}, "wanx_workers": {"stats": "TEXT", "gpu_memory": "{real}"}}

_EXISTING = "SELECT to_regclass('wanx_jobs'), to_regclass('wanx_jobs_claim'), to_regclass('wanx_workers')"
_COLUMNS = "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"


# the queue's identity and the APIs on it (keys 'queue_id', 'outputs', 'api:<id>'); the id is made
# once, with the table, by whoever opens the queue first
_META = """CREATE TABLE IF NOT EXISTS wanx_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)"""
_META_ID = "INSERT INTO wanx_meta (key, value) VALUES ('queue_id', ?) ON CONFLICT (key) DO NOTHING"


class _Statement:
    """What a transaction hands out: call it for rows, `.update` for a row count."""

    def __init__(self, run, lock_wait: str):
        self._run = run
        self.lock_wait = lock_wait  # the backend's row-lock suffix ("" on SQLite: the whole file is locked)
        self.columns: list[str] = []

    def __call__(self, query: str, args=()) -> list:
        cursor = self._run(query, args)
        self.columns = [d[0] for d in cursor.description] if cursor.description else []
        return cursor.fetchall() if cursor.description else []

    def update(self, query: str, args=()) -> int:
        return self._run(query, args).rowcount


class _Backend:
    """One connection per thread, opened by `_open` at its first use, all closed by `close`."""

    url: str
    lock_row = lock_wait = ""  # SQLite: BEGIN IMMEDIATE already locks the whole file

    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def _open(self):
        raise NotImplementedError

    def _usable(self, conn) -> bool:
        return True

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or not self._usable(conn):
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def create_schema(self) -> None: ...

    def transaction(self, write: bool = True):
        """A transaction; `write=False` for reads only (SQLite then takes no write lock)."""

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


class _SQLite(_Backend):
    """One connection per thread; writes serialised by SQLite's write lock (BEGIN IMMEDIATE)."""

    def __init__(self, url: str):
        super().__init__(url)
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise QueueError(f"queue {url!r}: give a file as sqlite:///path/jobs.sqlite "
                             "(three slashes, then the path; four for an absolute one)")
        self.path = Path(url[len("sqlite:///"):])
        if not self.path.parent.is_dir():
            raise QueueError(f"queue {url}: folder {self.path.parent} does not exist; create it or give another path")

    def create_meta(self) -> None:
        try:
            with self.transaction() as sql:  # BEGIN IMMEDIATE: one process at a time
                sql(_META)
                sql(_META_ID, (str(uuid.uuid4()),))
        except sqlite3.Error as err:
            raise QueueError(f"queue {self.url}: cannot create the queue tables ({err}); "
                             "check the file is a writable SQLite database") from None

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait on the writer
            # WAL's own safe setting: no fsync per commit (idle workers claim twice a second);
            # a commit survives any process crash, only a power cut may lose the last few
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as err:
            raise QueueError(f"queue {self.url}: cannot open {self.path} ({err}); "
                             "check the file and its folder are writable") from None
        return conn

    @contextlib.contextmanager
    def transaction(self, write: bool = True):
        conn = self._connection()
        # IMMEDIATE takes the write lock up front: two claimers cannot both read the same queued row,
        # and a read-then-write transaction never fails on a snapshot another writer made stale
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _Statement(conn.execute, self.lock_wait)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def create_schema(self) -> None:
        try:
            self._connection().executescript(_SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"))
            if self._columns_missing():
                # again under the write lock: two processes opening an older file at once add each column once
                with self.transaction() as sql:
                    for table, column, kind in self._columns_missing(sql):
                        sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind.format(real='REAL')}")
        except sqlite3.Error as err:
            raise QueueError(f"queue {self.url}: cannot create the queue tables ({err}); "
                             "check the file is a writable SQLite database") from None

    def _columns_missing(self, sql=None) -> list[tuple[str, str, str]]:
        """(table, column, type) of the _ADDED columns a table made by an older wanx lacks."""
        if sql is None:
            with self.transaction(write=False) as sql:
                return self._columns_missing(sql)
        missing = []
        for table, added in _ADDED.items():
            have = {row[1] for row in sql(f"PRAGMA table_info({table})")}
            missing += [(table, column, kind) for column, kind in added.items() if column not in have]
        return missing


class _Postgres(_Backend):
    """One connection per thread (psycopg 3, imported only here); claims lock their row, skipping locked ones."""

    lock_row = " FOR UPDATE SKIP LOCKED"  # a claimer passes over rows another claimer is taking
    lock_wait = " FOR UPDATE"  # a cancel or a finish waits for them

    def __init__(self, url: str, name: str = "wanx"):
        super().__init__(url)
        self.name = name[:63]  # the server keeps 63 bytes of it
        try:
            importlib.import_module("psycopg")  # only a PostgreSQL queue needs it
        except ImportError:
            raise QueueError(f"queue {redact(url)}: PostgreSQL needs psycopg 3; "
                             "pip install 'wanx[serve]' (or 'psycopg[binary]')") from None

    def _usable(self, conn) -> bool:
        return not (conn.closed or conn.broken)

    def create_meta(self) -> None:
        import psycopg

        try:
            with self.transaction() as sql:
                # a role that may only use the tables must not need CREATE: look first
                if sql("SELECT to_regclass('wanx_meta')")[0][0] is None:
                    sql("SELECT pg_advisory_xact_lock(727274)")  # create_schema's: one creator at a time
                    sql(_META)
                if not sql("SELECT 1 FROM wanx_meta WHERE key = 'queue_id'"):
                    sql(_META_ID, (str(uuid.uuid4()),))
        except psycopg.errors.InsufficientPrivilege as err:
            reason = err.diag.message_primary or " ".join(str(err).split())
            user = urlsplit(self.url).username or "this user"
            raise QueueError(f"queue {redact(self.url)}: no permission to create the queue tables ({reason}); "
                             f"create them once as a role that may, or GRANT CREATE ON SCHEMA public TO {user}") from None

    def _open(self):
        import psycopg

        try:
            named = {} if "application_name" in self.url else {"application_name": self.name}  # the URL's wins
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10, **named)
        except psycopg.Error as err:
            reason = " ".join(str(err).split())
            raise QueueError(f"queue {redact(self.url)}: cannot connect ({reason}); "
                             "check the server is running and the URL's host, port, user and database") from None

    @contextlib.contextmanager
    def transaction(self, write: bool = True):
        import psycopg

        conn = self._connection()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(conn.transaction())  # sends BEGIN
                except psycopg.OperationalError:
                    # dropped while idle (a server restart, pg_terminate_backend, a NAT's timeout):
                    # nothing has run, so a new connection takes its place, once
                    self._local.conn = None
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = self._connection()
                    stack.enter_context(conn.transaction())
                cursor = stack.enter_context(conn.cursor())

                def run(query, args):
                    cursor.execute(query.replace("?", "%s"), args)
                    return cursor
                yield _Statement(run, self.lock_wait)
        except psycopg.OperationalError as err:
            # the server went away or dropped us: forget this connection (the next call opens a
            # new one) and say so in one line; the transaction did not happen
            self._local.conn = None
            with contextlib.suppress(Exception):
                conn.close()
            reason = " ".join(str(err).split())
            raise QueueError(f"queue {redact(self.url)}: lost the connection ({reason}); "
                             "nothing was changed, try again once the server is back") from None

    def create_schema(self) -> None:
        import psycopg

        try:
            with self.transaction() as sql:
                # a role that may only use the tables (workers, the API) must not need CREATE: look first
                if all(name is not None for name in sql(_EXISTING)[0]) and self._columns_there(sql):
                    return
                # concurrent first users would race on CREATE TABLE IF NOT EXISTS; one at a time
                sql("SELECT pg_advisory_xact_lock(727274)")
                for statement in _SCHEMA.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION").split(";"):
                    if statement.strip():
                        sql(statement)
                # tables made before a column was added (the CREATEs above left them as they were)
                for table, added in _ADDED.items():
                    for column, kind in added.items():
                        sql(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                            f"{kind.format(real='DOUBLE PRECISION')}")
        except psycopg.errors.InsufficientPrivilege as err:
            reason = err.diag.message_primary or " ".join(str(err).split())
            user = urlsplit(self.url).username or "this user"
            raise QueueError(f"queue {redact(self.url)}: no permission to create the queue tables ({reason}); "
                             f"create them once as a role that may, or GRANT CREATE ON SCHEMA public TO {user}") from None

    @staticmethod
    def _columns_there(sql) -> bool:
        have = set(map(tuple, sql(_COLUMNS)))
        return all((table, column) in have for table, added in _ADDED.items() for column in added)
