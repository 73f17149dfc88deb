"""`wanx serve` refuses a bad --outputs or a port in use in one line naming the flag, before
the model loads (not a traceback, nor uvicorn's error after a long load)."""

from __future__ import annotations

import socket

import pytest


from tests.serve.conftest import free_port
from tests.test_cli_errors import error_of, no_loading  # noqa: F401 (a fixture)


def test_outputs_under_a_file_names_the_flag(capsys, no_loading, tmp_path):
    (tmp_path / "README.md").write_text("not a folder", encoding="utf-8")
    outputs = tmp_path / "README.md" / "x"
    err = error_of(capsys, ["serve", "--model", "tiny", "--no-ui", "--port", str(free_port()), "--outputs", str(outputs)])
    assert f"--outputs {outputs}: cannot make the folder (Not a directory)" in err


def test_a_port_in_use_is_named_before_the_model_loads(capsys, no_loading, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = error_of(capsys, ["serve", "--model", "tiny", "--no-ui", "--port", str(port),
                                "--outputs", str(tmp_path / "out")])
    assert f"--port {port}: 127.0.0.1:{port} is in use" in err and "choose another --port" in err
    assert not (tmp_path / "out").exists()  # refused before anything was made


# -- step caching and Wan2.2's two experts (issue 27, bug 2) ---------------------------------


def test_step_caching_on_two_experts_is_refused_before_the_model_loads(capsys, no_loading, tmp_path):
    for cache in ("--teacache", "--magcache"):
        err = error_of(capsys, ["serve", "--model", "tiny-moe", "--no-ui", "--port", str(free_port()), cache,
                                "--outputs", str(tmp_path / "out")])
        assert err == ("wanx: error: step caching (--teacache/--magcache) does not support two experts (Wan2.2 A14B) "
                       "yet")
    assert not (tmp_path / "out").exists()


def test_a_job_asking_for_teacache_on_two_experts_is_refused(tmp_path):
    from wanx.hub import find_components, resolve_model
    from wanx.pipeline import RequestError
    from wanx.runtime import Runtime
    from wanx.serve.app import Server

    server = Server(None, find_components(resolve_model("tiny-moe")), Runtime.create("cpu"), tmp_path / "out",
                    model_name="tiny-moe")
    try:
        server.submit({"prompt": "a cat", "size": "32x32", "frames": 5, "steps": 2})  # without it: queued
        with pytest.raises(RequestError) as refused:
            server.submit({"prompt": "a cat", "size": "32x32", "frames": 5, "steps": 2, "teacache": 0.2})
        assert refused.value.field == "teacache"
        assert str(refused.value) == "step caching (teacache) does not support two experts (Wan2.2 A14B) yet"
        assert server.queue.counts()["queued"] == 1
    finally:
        server.queue.stop(timeout=10)
