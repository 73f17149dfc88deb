"""Prometheus metrics and job logs of one `wanx serve` process, in a registry of its own (one per app: the
tests make many apps in one process, and the global registry would refuse the second).

All read at each scrape from the shared queue, so they cover every worker on it, in this
process or another (`wanx worker`, on any host): jobs per model and status, live workers per
model; job seconds and failures, per worker (each worker counts the jobs it ends in its registry
row, in the transaction that records the outcome: see `Queue.finish`); each worker's peak GPU
memory (stored at its heartbeats; none on CPU). Per worker, not per API process: every API
replica answers the same numbers, none is lost when a replica restarts, and a worker's counts
only ever grow (a new worker is a new series), as Prometheus counters must; sum them with
`sum by (model, status)`. And this process's own GPU's peak memory (CUDA only).

Each job this process's worker runs also logs one line as it starts and one as it ends, as
key=value pairs (logfmt: grep and log shippers read them): job id, model, attempt, then status
and seconds, and the error of a failed job."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("wanx.serve")

LIVE_S = 30.0  # a worker seen this recently is live (an idle one claims twice a second, a busy one beats each second)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The registry of one app; `timed` wraps the worker's runner so each job it runs is logged."""

    def __init__(self, server):
        from prometheus_client import CollectorRegistry

        self.server = server
        self.registry = CollectorRegistry()
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

            def ended(status: str, extra: str = "") -> None:
                seconds = time.perf_counter() - start
                log.info("%s event=end status=%s seconds=%.2f%s", where, status, seconds, extra)

            try:
                video = runner(job, on_step)
            except Cancelled:
                ended("cancelled")
                raise
            except Exception as err:
                # the server stopping (the job queued again), or the lease lost to another worker:
                # the job has not ended here (nor is it counted: only `finish` counts)
                kind = {"_Stopping": "released", "_Lost": "lost"}.get(type(err).__name__)
                if kind:
                    ended(kind)
                else:
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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        # the shared queue under this server's JobQueue: its counts per model, its workers registry
        queue = self.server.queue
        depth = GaugeMetricFamily("wanx_queue_jobs", "Jobs in the queue, by model and status", labels=["model", "status"])
        for model, statuses in sorted(queue.counts_by_model().items()):
            for status, n in sorted(statuses.items()):
                depth.add_metric([model, status], n)
        yield depth
        registered = queue.workers()
        seconds = HistogramMetricFamily("wanx_job_seconds", "Seconds from a job's claim to its end, by the worker "
                                        "that ran it and how it ended", labels=["model", "status", "worker"])
        failures = CounterMetricFamily("wanx_job_failures", "Jobs that failed on a worker", labels=["model", "worker"])
        memory = GaugeMetricFamily("wanx_worker_gpu_max_memory_bytes", "Peak GPU memory allocated by a worker "
                                   "(at its last heartbeat)", labels=["worker", "model"])
        for worker in registered:
            name = worker["worker_id"]
            for model, statuses in sorted(worker["stats"].items()):
                for status, entry in sorted(statuses.items()):
                    buckets = [("+Inf" if bound == float("inf") else str(float(bound)), n)
                               for bound, n in entry["buckets"]]
                    seconds.add_metric([model, status, name], buckets, entry["sum"])
                failures.add_metric([model, name], statuses.get("failed", {}).get("count", 0))
            if worker["gpu_memory"] is not None:
                for model in worker["models"]:
                    memory.add_metric([name, model], worker["gpu_memory"])
        yield seconds
        yield failures
        yield memory
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
