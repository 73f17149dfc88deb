"""The server's modules import one way: app -> api, ui -> common, jobs (no cycle back into
the app, which imports them)."""

from __future__ import annotations

import ast
from pathlib import Path

import wanx.serve

FOLDER = Path(wanx.serve.__file__).parent
# each module and the serve modules it may import (at run time: TYPE_CHECKING imports aside)
ALLOWED = {"app": {"api", "ui", "common", "jobs", "queue"}, "api": {"common", "jobs"}, "ui": {"common", "jobs"},
           "common": set(), "jobs": {"queue"}, "queue": set()}
ALLOWED["worker"] = {"app", "jobs", "queue"}  # `wanx worker`: the server's runner and the queue's loop
ALLOWED["metrics"] = {"jobs"}  # /metrics: the app makes it, the api route renders it
ALLOWED["app"].add("metrics")
ALLOWED["api"].add("metrics")
ALLOWED["local"] = set()  # `wanx serve --gpus N`: starts `wanx worker` children, imports no serve module


def serve_imports(name: str) -> set[str]:
    tree = ast.parse((FOLDER / f"{name}.py").read_text(encoding="utf-8"))
    skipped = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
               and ast.unparse(guard.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for node in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wanx.serve."):
            found.add(node.module.removeprefix("wanx.serve."))
    return found


def test_serve_modules_import_one_way():
    modules = {path.stem for path in FOLDER.glob("*.py")} - {"__init__"}
    for name in sorted(modules):
        assert serve_imports(name) <= ALLOWED.get(name, set()), name
    assert modules == set(ALLOWED)  # a new module: say where it stands
