"""Prometheus metrics and job logs of one `wanx serve` process, in a registry of its own (one per app: the
tests make many apps in one process, and the global registry would refuse the second).

Read at each scrape from the shared queue (so they cover every worker on it): jobs per model
and status, live workers per model. Counted by this process's own worker as its jobs end: job
seconds, failures; and its GPU's peak memory (CUDA only: absent on CPU).

Each job this process's worker runs also logs one line as it starts and one as it ends, as
key=value pairs (logfmt: grep and log shippers read them): job id, model, attempt, then status
and seconds, and the error of a failed job."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("wanx.serve")

LIVE_S = 30.0  # a worker seen this recently is live (an idle one claims twice a second, a busy one beats each second)
# from a tiny CPU job (well under a second) to a long 720p one (an hour)
BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The registry of one app; `timed` wraps the worker's runner so each job it ends is counted."""

    def __init__(self, server):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.server = server
        self.registry = CollectorRegistry()
        self.job_seconds = Histogram("wanx_job_seconds", "Seconds a job ran on this process's worker, by how it ended",
                                     ["model", "status"], buckets=BUCKETS, registry=self.registry)
        self.failures = Counter("wanx_job_failures", "Jobs that failed on this process's worker",
                                ["model"], registry=self.registry)
        self.registry.register(_Collector(server))
        queue = server.queue
        # another app over the same server replaces the wrapper, never wraps it twice
        runner = getattr(queue.runner, "unwrapped", queue.runner)
        queue.runner = self.timed(runner)

    def timed(self, runner):
        from .jobs import Cancelled

        model = self.server.model_name

        def run(job, on_step):
            start = time.perf_counter()
            where = f"job={job['id']} model={_value(model)}"
            log.info("%s event=start attempt=%s", where, job.get("attempts"))

            def ended(status: str, extra: str = "", observed: bool = True) -> None:
                seconds = time.perf_counter() - start
                if observed:
                    self.job_seconds.labels(model, status).observe(seconds)
                log.info("%s event=end status=%s seconds=%.2f%s", where, status, seconds, extra)

            try:
                video = runner(job, on_step)
            except Cancelled:
                ended("cancelled")
                raise
            except Exception as err:
                # the server stopping (the job queued again), or the lease lost to another worker:
                # the job has not ended here, it is not observed
                kind = {"_Stopping": "released", "_Lost": "lost"}.get(type(err).__name__)
                if kind:
                    ended(kind, observed=False)
                else:
                    self.failures.labels(model).inc()
                    ended("failed", f" error={_value(f'{type(err).__name__}: {err}')}")
                raise
            ended("done")
            return video

        run.unwrapped = runner
        return run

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _value(text: str) -> str:
    """A logfmt value: bare when it is one plain word, else quoted on one line."""
    text = " ".join(str(text).split())
    if text and all(c.isalnum() or c in "-_./:@+" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Collector:
    """What is read from the queue at each scrape, and this process's GPU memory."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        # the shared queue under this server's JobQueue: its counts per model, its workers registry
        queue = self.server.queue._queue
        depth = GaugeMetricFamily("wanx_queue_jobs", "Jobs in the queue, by model and status", labels=["model", "status"])
        for model, statuses in sorted(queue.counts()["model"].items()):
            for status, n in sorted(statuses.items()):
                depth.add_metric([model, status], n)
        yield depth
        live: dict[str, int] = {}
        for worker in queue.workers(max_age=LIVE_S):
            for model in worker["models"]:
                live[model] = live.get(model, 0) + 1
        workers = GaugeMetricFamily("wanx_workers", f"Workers seen in the last {LIVE_S:.0f} s, by the model they hold",
                                    labels=["model"])
        for model, n in sorted(live.items()):
            workers.add_metric([model], n)
        yield workers
        torch = sys.modules.get("torch")  # never imported for this: a CPU server has no GPU memory to show
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            memory = GaugeMetricFamily("wanx_gpu_max_memory_bytes", "Peak GPU memory allocated by this process's worker",
                                       labels=["worker", "device"])
            for index in range(torch.cuda.device_count()):
                memory.add_metric([self.server.queue.worker_id, str(index)], torch.cuda.max_memory_allocated(index))
            yield memory
