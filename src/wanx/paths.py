"""Folders a command writes its results into (`wanx train --output`, `prepare --cache`,
`calibrate-cache --output`, the server's outputs): checked before anything heavy starts, made
with a probe write, so that one that cannot be is one line naming how it was given, and a
failed start leaves no empty folder behind."""

from __future__ import annotations

import os
from pathlib import Path


def check_folder(folder: Path, name: str, given: Path | str | None = None) -> None:
    """Refuse a folder that cannot be made (it or a folder on its way is a file) or written in:
    one line naming `name` (a flag or a parameter) and what it was `given`."""
    parent = Path(folder)
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name} {given or folder}: {parent} is a file, not a folder; choose another {name}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {given or folder}: cannot write there ({parent} is not writable); "
                              "choose another place")


def make_folder(folder: Path, name: str) -> list[Path]:
    """Create `folder` (and missing parents) and write a probe file there, so that an
    unwritable one fails now, naming `name`, not after a model loads. Returns the folders made
    here, for `remove_empty`."""
    missing, parent = [], Path(folder)
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    try:
        for path in reversed(missing):
            path.mkdir(exist_ok=True)  # exist_ok: another process of the run may make it first
            created.append(path)
        probe = Path(folder) / f".wanx-probe-{os.getpid()}"
        probe.write_bytes(b"wanx")
        probe.unlink()
    except OSError as err:
        remove_empty(created)
        raise ValueError(f"{name} {folder}: cannot write there ({err.strerror or err}); choose another folder") from None
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders `make_folder` made that are still empty (a failed or stopped start),
    innermost first."""
    for folder in reversed(created):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
