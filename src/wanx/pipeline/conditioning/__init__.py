"""One conditioning per task: what the task adds to the shared sampling loop.

At plan time `read` reads and checks the task's inputs and sizes the output from them. At run
time the pipeline asks the same object, in this order: `inputs` (extra DiT inputs such as the
image latents and CLIP tokens), `schedule` (the steps it runs), `start` (the latents the loop
begins from), then each step `timesteps` (per token, or one for all) and `fix` (frames held to
a known value), and at the end `metadata`. A new task is a file here (or any module) holding a
`Conditioning` subclass whose `task` is the row's, plus its row in `wanx.tasks`, which names the
module (`TaskSpec.conditioning`); nothing registers it anywhere else.
"""

from __future__ import annotations

import importlib

from .base import Conditioning, Held, Run


def conditioning_for(spec, extend: bool = False) -> type[Conditioning]:
    """The conditioning class of a task-table row: in the module the row names (a file of this
    package, or a dotted module path), the `Conditioning` subclass whose `task` is the row's.
    extend: with continuation of a video (`wanx.pipeline.extend`) in front of it."""
    module = spec.conditioning if "." in spec.conditioning else f"{__name__}.{spec.conditioning}"
    found = [value for value in vars(importlib.import_module(module)).values()
             if isinstance(value, type) and issubclass(value, Conditioning) and value.task == spec.task]
    if len(found) != 1:
        raise LookupError(f"task {spec.name!r}: {module} holds {len(found)} Conditioning classes for "
                          f"task {spec.task!r}; it needs one")
    if extend:
        from ..extend import extended

        return extended(found[0])
    return found[0]


__all__ = ["Conditioning", "Held", "Run", "conditioning_for"]
