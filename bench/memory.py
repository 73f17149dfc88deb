"""Peak resident memory of this process while a block runs, sampled every millisecond from
/proc/self/status: anonymous memory (what the process really allocates) and file-backed pages
(memory-mapped checkpoints: reclaimable page cache). Linux only."""

from __future__ import annotations

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
