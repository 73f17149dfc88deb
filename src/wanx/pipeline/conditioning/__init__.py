"""One conditioning per task: what the task adds to the shared sampling loop.

At plan time `read` reads and checks the task's inputs and sizes the output from them. At run
time the pipeline asks the same object, in this order: `inputs` (extra DiT inputs such as the
image latents and CLIP tokens), `schedule` (the steps it runs), `start` (the latents the loop
begins from), then each step `timesteps` (per token, or one for all) and `fix` (frames held to
a known value), and at the end `metadata`. A new task is a file here, registered in
`CONDITIONINGS` under the task table's `task`, plus its row in `wanx.tasks`.
"""

from __future__ import annotations

from .base import Conditioning, Run
from .i2v import FirstLastFrameToVideo, ImageToVideo
from .t2v import TextToVideo
from .ti2v import TextImageToVideo
from .v2v import VideoToVideo

CONDITIONINGS: dict[str, type[Conditioning]] = {cls.task: cls for cls in (
    TextToVideo, VideoToVideo, ImageToVideo, FirstLastFrameToVideo, TextImageToVideo)}


def conditioning_for(spec) -> type[Conditioning]:
    """The conditioning class of a task-table row."""
    return CONDITIONINGS[spec.task]


__all__ = ["CONDITIONINGS", "Conditioning", "Run", "conditioning_for"]
