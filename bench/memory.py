"""Peak resident memory of this process while a block runs, sampled every millisecond from
/proc/self/status: anonymous memory (what the process really allocates) and file-backed pages
(memory-mapped checkpoints: reclaimable page cache). Linux only. Also: the peak of one call on
CPU or CUDA (`peak_of`), measured in a fresh child process (`run_child`)."""

from __future__ import annotations

import json
import os
import subprocess
import threading

FIELDS = ("RssAnon", "RssFile")


def resident() -> dict[str, int]:
    """Current anonymous, file-backed and total resident bytes."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name = line.split(":", 1)[0]
            if name in FIELDS:
                values[name] = int(line.split()[1]) * 1024
    values["total"] = values["RssAnon"] + values["RssFile"]
    return values


class ResidentPeak:
    """`with ResidentPeak() as mem: ...` then `mem.before` and `mem.peak` (dicts of bytes)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    def __enter__(self) -> "ResidentPeak":
        self.before = resident()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for key, value in resident().items():
            self.peak[key] = max(self.peak[key], value)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def peak_of(run, device: str):
    """(peak bytes beyond what was held before, output) of `run()` under no_grad: on CUDA the
    allocator's peak, on CPU the sampled resident set."""
    import torch

    with torch.no_grad():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = run()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before, out
        with ResidentPeak() as mem:
            out = run()
        return mem.peak["total"] - mem.before["total"], out


def run_child(cmd: list[str]) -> dict:
    """Run a bench child process and read the JSON object it prints last. MALLOC_MMAP_THRESHOLD_
    makes freed tensors leave the resident set at once, so CPU samples follow live memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])
