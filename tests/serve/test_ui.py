"""The web UI's form, built without a browser (tests/serve/test_browser.py drives it in one)."""

from __future__ import annotations


def _placeholders(server) -> dict:
    from wanx.serve.ui import build_ui

    ui = build_ui(server)
    return {block.elem_id: block.placeholder for block in ui.blocks.values()
            if getattr(block, "elem_id", None) in ("size", "frames", "steps", "guidance", "shift", "negative")}


def test_blank_settings_show_what_the_model_runs_with(make_server, tiny, tmp_path):
    """A blank field runs with the model folder's own defaults (the demo model: 96x96, 17
    frames, 20 steps, guidance 4, shift 3, no negative prompt), so its placeholder says those, not 832x480."""
    import dataclasses

    from wanx.hub import find_components, resolve_model
    from wanx.pipeline import WanPipeline
    from wanx.runtime import Runtime
    from wanx.serve.app import Server

    # a T2V model's: its rows (text and video to video) from the task table
    official = {"size": "832x480", "frames": "81", "steps": "50", "guidance": "5", "shift": "5",
                "negative": "blank: the official negative prompt of the task"}
    # the tiny set's own size, frames and steps; the official guidance, shift and negative prompt
    assert _placeholders(make_server()) == {**official, "size": "64x64", "frames": "5", "steps": "4"}
    pipe, files, runtime = tiny  # a folder without defaults of its own: the official ones
    server = Server(pipe, dataclasses.replace(files, defaults={}), runtime, tmp_path / "plain", model_name="plain")
    try:
        assert _placeholders(server) == official
    finally:
        server.queue.stop(timeout=10)

    files = find_components(resolve_model("demo"))
    runtime = Runtime.create("cpu")
    server = Server(WanPipeline.from_files(files, runtime=runtime), files, runtime, tmp_path / "demo", model_name="demo")
    try:
        assert _placeholders(server) == {"size": "96x96", "frames": "17", "steps": "20", "guidance": "4", "shift": "3",
                                        "negative": "blank: this model's own (none)"}
    finally:
        server.queue.stop(timeout=10)


def test_placeholders_follow_the_task_table():
    """Each model type's own defaults, with the rule or row that differs said beside them."""
    from wanx.serve.ui import placeholders

    i2v = placeholders({}, "i2v")
    assert (i2v["steps"], i2v["shift"], i2v["guidance"]) == ("40", "5 (3 at 480P or below)", "5")
    assert placeholders({}, "flf2v")["shift"] == "16" and placeholders({}, "ti2v")["size"] == "1280x704"
    assert placeholders({}, "t2v", 2)["guidance"] == "4,3" and placeholders({}, "i2v", 2)["shift"] == "5"


def test_the_form_sends_the_few_step_options():
    """CFG steps and a timestep list from the form reach the request as the CLI's keys; text
    that is not a list of numbers goes on as it is, for the request's check to name."""
    from wanx.serve.ui import request_from_form

    body = request_from_form("a cat", "", "", "", "", "5", "", "lcm", "", "", "2", "1000, 750,500,250", None)
    assert body == {"prompt": "a cat", "guidance": 5.0, "sampler": "lcm", "cfg_steps": 2,
                    "timesteps": [1000.0, 750.0, 500.0, 250.0]}
    assert request_from_form("a cat", "", "", "", "", "", "", "", "", "", "", "1000,x", None)["timesteps"] == "1000,x"
