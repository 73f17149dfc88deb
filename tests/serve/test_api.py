"""The /v1 API in process (FastAPI's TestClient) over the real tiny model and the real queue."""

from __future__ import annotations

import io
import json
import time

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from wanx.cli import main
from wanx.video import read_video

from .conftest import FAST, wait_for


@pytest.fixture
def client(make_server):
    server = make_server()
    from wanx.serve.app import create_app

    # the lifespan runs the worker; the server answers to localhost (not TestClient's 'testserver')
    with TestClient(create_app(server, ui=False), base_url="http://localhost") as client:
        client.server = server
        yield client


def _png(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_submit_poll_download_a_playable_mp4(client):
    answer = client.post("/v1/videos", json={"prompt": "a cat walks", "seed": 7, **FAST})
    assert answer.status_code == 202 and answer.headers["location"] == f"/v1/videos/{answer.json()['id']}"
    job_id = answer.json()["id"]
    job = wait_for(client, job_id)
    assert job["status"] == "done", job
    assert job["events"] == ["queued", "running", "done"] and job["attempts"] == 1
    assert job["progress"] == {"step": 2, "total": 2, "eta_s": 0.0}
    assert job["settings"]["seed"] == 7 and job["settings"]["size"] == "64x48" and job["settings"]["model"] == "tiny"
    content = client.get(f"/v1/videos/{job_id}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    path = client.server.outputs / "got.mp4"
    path.write_bytes(content.content)
    video = read_video(path)  # PyAV decodes it
    assert len(video) == 5 and video.size == (64, 48) and video.frames.std() > 0
    with av.open(str(path)) as container:
        assert container.metadata.get("seed") == "7" and container.metadata.get("prompt") == "a cat walks"
    beside = json.loads((client.server.outputs / f"{job_id}.json").read_text())  # the settings next to the video
    assert beside["seed"] == 7 and beside["request"]["prompt"] == "a cat walks"
    assert not list(client.server.outputs.glob(".*partial"))


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": "x", "size": "100x48"}, "size", "size width 100 is not a multiple of 16; nearest valid: 96 or 112"),
    ({"prompt": "x", "frames": 6}, "frames", "frames 6 must be 4k+1 (e.g. 5 or 9)"),
    ({"prompt": "x", "guidance": 40}, "guidance", "guidance must be in [1, 30]"),
    ({"prompt": "x", "seed": -1}, "seed", "seed must be a whole number between 0 and 18446744073709551615"),
    ({"prompt": "x", "sampler": "ddim"}, "sampler", "unknown sampler 'ddim'; choose one of unipc, dpm++, euler"),
    ({"prompt": "x", "frames": "five"}, "frames", "frames must be a whole number, got 'five'"),
    ({"prompt": "x", "teacache": "0.1"}, "teacache", "teacache must be a number, got '0.1'"),
    ({"prompt": "x", "teacache": "0,1"}, "teacache", "teacache must be a number, with a decimal point, got '0,1'"),
    ({"prompt": "x", "guidance": "high"}, "guidance", "guidance must be a number, got 'high'"),
    ({"prompt": "x", "steps": 5000}, "steps", "steps must be at most 1000 on this server"),
    ({"prompt": "x", "timesteps": [1000, 1000]}, "timesteps", "timesteps must be strictly decreasing"),
    ({"prompt": "x", "timesteps": []}, "timesteps", "timesteps is empty"),
    ({"prompt": "x", "timesteps": [1000, "a"]}, "timesteps", "timesteps must hold numbers"),
    ({"prompt": "x", "timesteps": "1000,500"}, "timesteps", "timesteps must be a list, got '1000,500'"),
    ({"prompt": "x", "timesteps": [1000, 500], "steps": 3}, "steps", "steps 3 disagrees with the 2 timesteps"),
    ({"prompt": "x", "timesteps": list(range(2000, 0, -1))}, "timesteps",
     "timesteps must hold at most 1000 steps on this server"),
    ({"prompt": "x", "output": "/etc/cron.d/x"}, "output", "unknown key(s) output"),
    ({"prompt": "x", "image": "/etc/passwd"}, "image", "upload the file as the multipart part 'image'"),
    ({"prompt": "x", "loras": [{"name": "../x.safetensors"}]}, "loras", "no LoRA named '../x.safetensors'"),
    ({"size": "64x48"}, "prompt", "give prompt"),
    ({"prompt": "x", "size": "4096x4096", "frames": 1001}, "size", "the largest size with this aspect ratio that fits"),
])
def test_bad_requests_get_422_naming_the_field_and_queue_nothing(client, body, field, words):
    answer = client.post("/v1/videos", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and words in answer.json()["detail"]
    assert client.get("/v1/videos").json()["videos"] == []


def test_the_api_speaks_the_cli_s_words(client, tmp_path, capsys):
    """One check, two faces: the CLI's message for a --prompts line and the API's are the
    same sentence, each naming the field as its users write it."""
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text('{"prompt": "b", "size": "100x48"}\n', encoding="utf-8")
    assert main(["generate", "--model", "tiny", "--prompts", str(prompts)]) == 2
    cli = capsys.readouterr().err.strip()
    api = client.post("/v1/videos", json={"prompt": "b", "size": "100x48"}).json()["detail"]
    assert cli == f"wanx: error: {prompts}:1: --{api}"
    prompts.write_text('{"prompt": "c", "frames": "x"}\n', encoding="utf-8")  # types too, no traceback
    assert main(["generate", "--model", "tiny", "--prompts", str(prompts)]) == 2
    api = client.post("/v1/videos", json={"prompt": "c", "frames": "x"}).json()["detail"]
    assert capsys.readouterr().err.strip() == f"wanx: error: {prompts}:1: {api}"


def test_malformed_bodies_are_4xx(client):
    assert client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/videos", json=["a list"]).status_code == 422
    nan = client.post("/v1/videos", content=b'{"prompt": "x", "shift": NaN}', headers={"content-type": "application/json"})
    assert nan.status_code == 422 and nan.json()["field"] == "shift"  # Python's json reads NaN
    assert client.get("/v1/videos/nope").status_code == 404
    assert client.get("/v1/videos/nope/content").status_code == 404
    assert client.delete("/v1/videos/nope").status_code == 404


def test_list_cancel_and_delete(client):
    long = client.post("/v1/videos", json={"prompt": "long", "size": "64x48", "frames": 5, "steps": 400}).json()["id"]
    queued = client.post("/v1/videos", json={"prompt": "waiting", **FAST}).json()["id"]
    listed = client.get("/v1/videos").json()
    assert [job["id"] for job in listed["videos"]] == [queued, long]  # newest first
    running = wait_for(client, long, ("running",))
    # the queued one is cancelled at once and never runs
    cancelled = client.delete(f"/v1/videos/{queued}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    # the running one stops at its next step
    end = time.monotonic() + 180
    while not (running["progress"] or {}).get("step") and time.monotonic() < end:
        time.sleep(0.01)
        running = client.get(f"/v1/videos/{long}").json()
    assert client.delete(f"/v1/videos/{long}").status_code == 202
    stopped = wait_for(client, long)
    assert stopped["status"] == "cancelled" and stopped["events"] == ["queued", "running", "cancelled"]
    assert client.get(f"/v1/videos/{queued}").json()["events"] == ["queued", "cancelled"]
    assert client.get(f"/v1/videos/{long}/content").status_code == 409
    assert not list(client.server.outputs.glob("*.mp4")) and not list(client.server.outputs.glob(".*"))
    assert client.get("/v1/videos?status=cancelled").json()["counts"] == {"cancelled": 2}
    # a finished job is deleted with its files
    done = client.post("/v1/videos", json={"prompt": "keep", **FAST}).json()["id"]
    wait_for(client, done)
    assert (client.server.outputs / f"{done}.mp4").is_file()
    assert client.delete(f"/v1/videos/{done}").json() == {"id": done, "deleted": True}
    assert client.get(f"/v1/videos/{done}").status_code == 404
    assert not (client.server.outputs / f"{done}.mp4").exists() and not (client.server.outputs / f"{done}.json").exists()


def test_progress_and_latent_preview_while_running(client):
    job_id = client.post("/v1/videos", json={"prompt": "slow", "size": "64x48", "frames": 5, "steps": 200}).json()["id"]
    end = time.monotonic() + 180
    while time.monotonic() < end:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 3:
            break
        time.sleep(0.01)
    assert job["progress"]["total"] == 200 and 3 <= job["progress"]["step"] < 200
    assert job["progress"]["eta_s"] > 0
    preview = client.get(f"/v1/videos/{job_id}/preview")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(preview.content)))
    assert image.shape[0] >= 48 and image.std() > 10  # the latents' structure, not a blank picture
    client.delete(f"/v1/videos/{job_id}")
    wait_for(client, job_id)


def test_uploads_get_server_names_and_bad_ones_leave_nothing(tiny, tmp_path):
    """An I2V model queues (no worker needed): a good image is stored under a server-made name;
    a wrong kind, an oversized file or an image a T2V model cannot use is refused with nothing
    left on disk and nothing queued."""
    from wanx.hub import find_components, resolve_model
    from wanx.serve.app import Limits, Server, create_app

    _, _, runtime = tiny
    server = Server(None, find_components(resolve_model("tiny-i2v")), runtime, tmp_path / "i2v",
                    limits=Limits(max_upload=64 * 1024))
    inputs = server.outputs / "inputs"
    with TestClient(create_app(server, ui=False, worker=False), base_url="http://localhost") as client:
        request = {"request": json.dumps({"prompt": "it turns", "size": "64x48", "frames": 5})}
        answer = client.post("/v1/videos", data=request, files={"image": ("../../evil name.png", _png(), "image/png")})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert sorted(p.name for p in inputs.iterdir()) == [f"{job_id}-image.png"]
        assert not list(tmp_path.rglob("evil*"))
        assert client.get(f"/v1/videos/{job_id}").json()["inputs"] == ["image"]
        refused = [
            (client.post("/v1/videos", data=request, files={"image": ("x.png", b"#!/bin/sh\nrm -rf /\n", "image/png")}),
             415, "image"),
            (client.post("/v1/videos", data=request, files={"image": ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(70000))}),
             413, "image"),
            (client.post("/v1/videos", data=request, files={"image": ("x.png", b"\x89PNG\r\n\x1a\nbroken")}),
             422, "image"),
            (client.post("/v1/videos", data={"request": json.dumps({"prompt": "no image", **FAST})}), 422, "image"),
            (client.post("/v1/videos", data=request, files={"payload": ("x.png", _png())}), 422, "payload"),
        ]
        for answer, status, field in refused:
            assert answer.status_code == status, answer.text
            assert (answer.json()["field"] or "") == field, answer.json()
        assert "not a readable image" in refused[2][0].json()["detail"] and str(inputs) not in refused[2][0].text
        assert sorted(p.name for p in inputs.iterdir()) == [f"{job_id}-image.png"]  # only the good one
        assert len(client.get("/v1/videos").json()["videos"]) == 1
        # cancelling the queued job removes its input too
        assert client.delete(f"/v1/videos/{job_id}").json()["status"] == "cancelled"
        assert list(inputs.iterdir()) == []


def test_a_t2v_model_refuses_an_uploaded_image_and_keeps_nothing(client):
    request = {"request": json.dumps({"prompt": "x", **FAST})}
    answer = client.post("/v1/videos", data=request, files={"image": ("a.png", _png(), "image/png")})
    assert answer.status_code == 422 and answer.json()["field"] == "image"
    assert "this is a T2V model" in answer.json()["detail"]
    assert list((client.server.outputs / "inputs").iterdir()) == []


def test_token_is_needed_everywhere_when_set(make_server):
    from wanx.serve.app import create_app

    server = make_server(token="s3cret-token")
    with TestClient(create_app(server, ui=True, worker=False), base_url="http://localhost") as client:
        body = {"prompt": "x", **FAST}
        assert client.post("/v1/videos", json=body).status_code == 401
        assert client.post("/v1/videos", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/videos").status_code == 401
        assert client.get("/v1/openapi.json").status_code == 401
        assert client.get("/").status_code == 401  # the UI
        assert client.get("/gradio_api/info").status_code == 401  # and what the UI calls
        good = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/v1/videos", json=body, headers=good).status_code == 202
        assert client.get("/v1/videos", headers=good).json()["counts"] == {"queued": 1}
        # a browser opens the page once with ?token=: a cookie, then the address without it
        opened = client.get("/?token=s3cret-token", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=Strict" in opened.headers["set-cookie"]
        assert client.get("/").status_code == 200  # the client keeps the cookie
        assert "wanx" in client.get("/").text


def test_loras_by_name_change_the_video_and_go_away_after(make_server, tiny, tmp_path):
    """A job with a LoRA from --loras differs from the same seed without it; the next job
    without it is the base model's video again; a LoRA that does not fit is refused at submit."""
    import torch
    from safetensors.torch import save_file

    from wanx.serve.app import create_app

    _, files, _ = tiny
    dim = files.dit_config.dim
    loras = tmp_path / "loras"
    loras.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, dim, generator=gen),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(dim, 4, generator=gen)},
              str(loras / "style.safetensors"))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, dim + 8, generator=gen),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(dim, 4, generator=gen)},
              str(loras / "misfit.safetensors"))
    (loras / "notes.txt").write_text("not a LoRA")
    server = make_server(loras=loras)
    with TestClient(create_app(server, ui=False), base_url="http://localhost") as client:
        assert client.get("/v1/model").json()["loras"] == ["misfit.safetensors", "style.safetensors"]
        refused = client.post("/v1/videos", json={"prompt": "x", "loras": [{"name": "misfit.safetensors"}], **FAST})
        assert refused.status_code == 422 and refused.json()["field"] == "loras"
        assert "misfit.safetensors" in refused.json()["detail"] and str(loras) not in refused.text
        frames = []
        for extra in ({}, {"loras": [{"name": "style.safetensors", "strength": 1.0}]}, {}):
            job_id = client.post("/v1/videos", json={"prompt": "a cat", "seed": 4, **FAST, **extra}).json()["id"]
            job = wait_for(client, job_id)
            assert job["status"] == "done", job
            frames.append(read_video(server.outputs / f"{job_id}.mp4").frames)
        assert job["settings"].get("loras") is None
        assert not np.array_equal(frames[0], frames[1])
        assert np.array_equal(frames[0], frames[2])


def test_teacache_is_chosen_per_job(client):
    cached = client.post("/v1/videos", json={"prompt": "a cat", "seed": 2, "teacache": 0.1, **FAST}).json()["id"]
    plain = client.post("/v1/videos", json={"prompt": "a cat", "seed": 2, **FAST}).json()["id"]
    assert wait_for(client, cached)["settings"]["cache"]["kind"] == "teacache"
    assert wait_for(client, plain)["settings"].get("cache") is None  # the next job is back to the server's default
    assert client.post("/v1/videos", json={"prompt": "x", "teacache": -1}).json()["field"] == "teacache"


def test_an_uploaded_video_is_continued(client, tmp_path):
    """`extend` comes as an upload like the other inputs, kept at its size (not refitted): the
    video is the upload's frames followed by the new ones."""
    from wanx.video import Video

    clip = tmp_path / "clip.mp4"
    Video(np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), np.uint8)).save(clip)
    body = {"prompt": "it goes on", "seed": 3, "steps": 2, "frames": 4, "extend_frames": 5}
    answer = client.post("/v1/videos", data={"request": json.dumps(body)},
                         files={"extend": ("clip.mp4", clip.read_bytes(), "video/mp4")})
    assert answer.status_code == 202, answer.text
    job = wait_for(client, answer.json()["id"])
    assert job["status"] == "done", job
    path = tmp_path / "got.mp4"
    path.write_bytes(client.get(f"/v1/videos/{job['id']}/content").content)
    video = read_video(path)
    assert len(video) == 9 + 4 and video.size == (64, 48)
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["comment"])["overlap_frames"] == 5
