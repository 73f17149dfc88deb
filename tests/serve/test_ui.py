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

    official = {"size": "832x480", "frames": "81", "steps": "50 (40 for I2V)", "guidance": "5.0 (5.5 for FLF2V)",
                "shift": "5.0 (3.0 for I2V 480P, 16 for FLF2V)",
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
