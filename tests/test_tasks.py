"""The task table: the row chosen for each model and set of inputs, the errors when none fits,
and what adding a task takes (a conditioning class and a row, nothing else)."""

import pytest
import torch

from wanx.pipeline import WanPipeline
from wanx.pipeline.conditioning import Conditioning, conditioning_for
from wanx.pipeline.conditioning.ti2v import TextImageToVideo
from wanx.tasks import TASKS, TaskError, TaskSpec, choose_task, default_task, model_tasks
from wanx.configs import frames_ok


@pytest.mark.parametrize("model_type, experts, given, row", [
    ("t2v", 1, set(), "t2v"), ("t2v", 1, {"video"}, "v2v"), ("i2v", 1, {"image"}, "i2v"),
    ("flf2v", 1, {"image", "last_image"}, "flf2v"), ("ti2v", 1, set(), "ti2v"), ("ti2v", 1, {"image"}, "ti2v"),
    ("t2v", 2, set(), "t2v-A14B"), ("t2v", 2, {"video"}, "v2v-A14B"), ("i2v", 2, {"image"}, "i2v-A14B"),
])
def test_the_row_follows_the_model_and_the_inputs(model_type, experts, given, row):
    assert choose_task(model_type, experts, given).name == row


@pytest.mark.parametrize("model_type, given, field, message", [
    ("t2v", {"image"}, "image", "this is a T2V model: image needs an I2V or FLF2V model"),
    ("t2v", {"video", "last_image"}, "last_image", "this is a T2V model: last_image needs an FLF2V model"),
    ("i2v", set(), "image", "this is an I2V model: give image (the first frame)"),
    ("i2v", {"image", "last_image"}, "last_image", "this is an I2V model: last_image needs an FLF2V model"),
    ("flf2v", {"image"}, "last_image", "this is an FLF2V model: give image (the first frame) and last_image"),
    ("ti2v", {"video"}, "video", "video needs a T2V model (video-to-video)"),
])
def test_no_row_fits_names_the_input(model_type, given, field, message):
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        choose_task(model_type, 1, given)
    assert caught.value.field == field


def test_every_row_is_consistent():
    for spec in TASKS.values():
        assert set(spec.needs) <= set(spec.takes), spec.name
        assert issubclass(conditioning_for(spec), Conditioning), spec.name
        assert (spec.experts == 2) == (spec.boundary is not None) == (spec.guidance_low is not None), spec.name
        # S2V's num_frames is one clip's, a multiple of 4 (the official infer_frames)
        assert (frames_ok(spec.num_frames) if spec.frames_rule == "4k+1" else spec.num_frames % 4 == 0), spec.name
        assert spec.width % spec.multiple == 0 == spec.height % spec.multiple
        assert spec in model_tasks(spec.model_type, spec.experts)
    assert default_task("ti2v").fps == 24 and default_task("i2v").shift_480p == 3.0
    assert default_task("i2v", 2).shift_480p is None
    assert [n for n in range(12) if frames_ok(n)] == [1, 5, 9]


class FirstFrameHeld(TextImageToVideo):
    """The walk-through's "conditioning file": a T2V model holding its first frame to an image,
    as TI2V-5B does (latent frame 0 replaced after every step, its tokens at timestep 0)."""

    task = "t2v-first"

    @classmethod
    def read(cls, plan, given, **_):
        from wanx.pipeline.conditioning.base import image_tensor

        image = image_tensor(given["image"])
        plan.image = torch.nn.functional.interpolate(image[None], size=(plan.height, plan.width))[0]

    def metadata(self):
        return {"held": "first frame"}


def test_a_new_task_is_a_conditioning_and_a_row(monkeypatch):
    """Walk-through: a new task is the class above (a new file) and one row naming its module;
    nothing else changes: the pipeline, the CLI (--image exists) and the server find it through
    the table."""
    row = TaskSpec("t2v-first", "t2v-first", "First frame held", "t2v", needs=("image",), takes=("image",), steps=3,
                   conditioning=__name__)
    monkeypatch.setitem(TASKS, row.name, row)

    pipe = WanPipeline.from_pretrained("tiny", device="cpu")
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []
    video = pipe("x", image=image, seed=1, progress=False, callback=lambda i, n, x: seen.append(x[:, :, :1].clone()))
    assert video.metadata["task"] == "t2v-first" and video.metadata["held"] == "first frame"
    assert video.metadata["steps"] == 4  # the tiny set's own setting comes before the row's default
    first = pipe.vae.encode(image[:, None][None]).float()
    assert all(torch.equal(x, first) for x in seen) and len(seen) == 4
    assert conditioning_for(TASKS["t2v"]).__name__ == "TextToVideo"
