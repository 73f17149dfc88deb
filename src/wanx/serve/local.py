"""`wanx serve --gpus N`: the API with no worker of its own, and N local `wanx worker` child
processes (one per GPU), or with --sp one worker made of a sequence-parallel group over the N GPUs.

The children share the server's queue and outputs folder, as workers on other hosts would. Their
output comes through here, each line prefixed with the worker's name. A child that ends on its own
is named in one line and the server goes on with the others; once none is left it stops (exit 1):
an API with no worker could only refuse every job, and whatever restarts the server (systemd, a
container's policy) then restarts the workers too. When the server stops, each child gets SIGTERM
(its running job goes back to the queue at the next step) and is killed after STOP_S."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

STOP_S = 30.0  # a step of a large model on a slow GPU can take this long


def worker_flags(args, worker_parser, skip: set[str]) -> list[str]:
    """The flags of `args` (a parsed `wanx serve` line) that `wanx worker` has too, given anew
    (not the server's words copied: argparse takes abbreviations), each that differs from its default."""
    words: list[str] = []
    for action in worker_parser._actions:
        if not action.option_strings or action.dest in skip or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if action.nargs == 0:  # store_true
            words.append(flag)
        else:
            words.append(f"{flag}={value}")
    return words


class LocalWorkers:
    """The server's child workers: `commands[i]` starts worker `names[i]`."""

    def __init__(self, commands: list[list[str]], names: list[str]):
        self.commands, self.names = commands, names
        self.procs: list[subprocess.Popen] = []
        self.stopping = False
        self.exit_code = 0
        self._lock = threading.Lock()
        self._left = len(commands)

    def start(self) -> None:
        """Start every child. SIGTERM here then ends `wanx serve` with SystemExit (uvicorn, having shut
        down on it, raises the signal again once its handlers are gone: by default that would end the
        process before the children are stopped)."""
        def on_term(signum, frame):
            raise SystemExit(self.exit_code)

        signal.signal(signal.SIGTERM, on_term)
        for command, name in zip(self.commands, self.names):
            # its own session: a Ctrl-C in the terminal reaches the server, which stops the children in order,
            # and a kill after STOP_S takes a group's ranks too
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            self.procs.append(proc)
            threading.Thread(target=self._forward, args=(proc, name), name=f"wanx-{name}", daemon=True).start()
        print(f"wanx serve: started {len(self.procs)} worker(s): {', '.join(self.names)}", file=sys.stderr, flush=True)

    def _forward(self, proc: subprocess.Popen, name: str) -> None:
        last = ""
        for raw in iter(proc.stdout.readline, b""):
            # a progress bar's updates (carriage returns, the last clearing it with spaces) as the line they end on
            line = next((part for part in reversed(raw.decode(errors="replace").rstrip("\r\n").split("\r"))
                         if part.strip()), "")
            if line.strip():
                last = line.strip()
            sys.stderr.write(f"[{name}] {line}\n")
            sys.stderr.flush()
        code = proc.wait()
        with self._lock:
            self._left -= 1
            left = self._left
            if self.stopping:
                return
        said = f": {last}" if last and code > 0 else ""  # a worker that fails says why last (a signal: nothing)
        print(f"wanx serve: {name} exited with code {code}{said}; "
              f"{f'{left} worker(s) left' if left else 'no worker left, stopping'}", file=sys.stderr, flush=True)
        if not left:
            self.exit_code = 1
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down on it, then on_term ends the process

    def stop(self, timeout: float = STOP_S) -> None:
        """SIGTERM to each child still running, then SIGKILL (its whole session) after `timeout`."""
        with self._lock:
            self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"wanx serve: worker pid {proc.pid} did not stop in {timeout:.0f} s; killed", file=sys.stderr)
            try:  # a group's ranks (and anything else the child left) go with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
