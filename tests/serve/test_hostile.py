"""Hostile requests against a real `wanx serve --model tiny` (uvicorn in a subprocess): each
test sends the exact request an attacker or a careless client would, over HTTP, and checks
that the server refuses it with one line and stays up. A new surface of the server (a route,
a form field, a header it reads) gets its case here.

One server per module where the case allows (the `server` fixture, with a token); cases that
stop or crash a server start their own."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from .conftest import FAST, ServeProcess, wait_for

TOKEN = "hostile-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """One `wanx serve --model tiny --token ...` for the module's cases that leave it running."""
    root = tmp_path_factory.mktemp("hostile")
    process = ServeProcess(root / "outputs", token=TOKEN)
    process.root = root
    yield process
    process.close()


def _mp4(path: Path, width: int = 64, height: int = 48, frames: int = 5) -> Path:
    """A small black H.264 mp4 (PyAV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for packet in stream.encode(black):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class GradioPage:
    """The Gradio API as the UI's page calls it (queue/join, then the event stream), in one
    session, with the dependencies found by name in /config."""

    def __init__(self, server: ServeProcess):
        self.client = server.client
        self.session = uuid.uuid4().hex[:10]
        config = self.client.get("/config").json()
        self.deps = {dep["api_name"]: (index, dep["targets"][0][0]) for index, dep in enumerate(config["dependencies"])}

    def call(self, api_name: str, data: list, timeout: float = 60) -> dict:
        """The `process_completed` message of one call (its output, or success False and the error)."""
        index, trigger = self.deps[api_name]
        payload = {"data": data, "fn_index": index, "session_hash": self.session, "event_data": None,
                   "trigger_id": trigger}
        joined = self.client.post("/gradio_api/queue/join", content=json.dumps(payload),  # JSON escapes any text
                                  headers={"content-type": "application/json"})
        assert joined.status_code == 200, joined.text
        with self.client.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session},
                                timeout=timeout) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
        raise AssertionError(f"{api_name}: the event stream ended without a result")

    def submit_video(self, video: dict, **fields) -> dict:
        """Generate on the Video to video tab with `video` as the input video's value."""
        self.call("lambda_1", [])  # the tab's select event: the session's task becomes v2v
        form = {"prompt": "a cat", "negative": "", "size": "64x48", "frames": "5", "steps": "2", "guidance": "",
                "shift": "", "sampler": "unipc", "seed": "", "teacache": "", "cfg_steps": "", "timesteps": "", **fields}
        loras = {"headers": ["LoRA", "strength"], "data": [], "metadata": None}
        return self.call("submit", [None, *form.values(), loras, video, 0.8])


def _file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": "clip.mp4"}


def _refused(message: dict) -> bool:
    """Gradio answered with an error, or the UI's error line is set."""
    return not message["success"] or bool(message["output"]["data"][0])


# -- 1: the Gradio API reads only files uploaded through it ---------------------------------------
@pytest.mark.parametrize("target", ["/etc/passwd", "outside", "symlink"])
def test_gradio_api_reads_no_server_path(server, target):
    outputs = server.root / "outputs"
    secret = _mp4(server.root / "secret" / "clip.mp4")
    if target == "outside":
        target = secret
    elif target == "symlink":  # a link inside the UI's own upload folder to a file outside it
        link = outputs / ".gradio" / "planted" / "clip.mp4"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
        target = link
    before = server.client.get("/v1/videos").json()["videos"]
    answer = GradioPage(server).submit_video(_file_data(target))
    assert _refused(answer), answer
    assert server.client.get("/v1/videos").json()["videos"] == before  # nothing queued
    copies = [p for p in server.root.rglob("*") if p.name in ("passwd", "clip.mp4") and p.is_file()
              and not p.is_symlink() and p != secret]
    assert copies == []  # and nothing copied anywhere


def test_gradio_api_does_not_read_dev_zero(server):
    """Reading /dev/zero never ends: before, it froze the whole server."""
    result = {}
    call = threading.Thread(target=lambda: result.update(answer=GradioPage(server).submit_video(
        _file_data("/dev/zero"))), daemon=True)
    call.start()
    call.join(30)
    alive = httpx.get(server.url + "/v1/model", headers=BEARER, timeout=10)
    assert alive.status_code == 200
    assert not call.is_alive() and _refused(result["answer"]), result


# -- 9: what the UI refuses is not kept ---------------------------------------------------------
def test_refused_ui_uploads_are_removed(server):
    ui_files = server.root / "outputs" / ".gradio"
    page = GradioPage(server)
    uploaded = page.client.post("/gradio_api/upload", files={"files": ("notes.mp4", b"not a video at all" * 10)})
    assert uploaded.status_code == 200, uploaded.text
    path = Path(uploaded.json()[0])
    assert path.is_file() and path.resolve().is_relative_to(ui_files.resolve())  # Gradio's folder is the server's
    answer = page.submit_video(_file_data(path))
    assert answer["success"] and "video: the upload is not an mp4" in answer["output"]["data"][0]
    assert not path.exists()
    assert answer["output"]["data"][2] is None  # the page's input is cleared: it asks for another file


# -- 12: redirects stay on this server; the cookie is Secure over HTTPS; no database by path ----
def test_token_redirect_stays_on_this_server(server):
    for path, expected in (("//evil.example/x", "/evil.example/x"), ("/\\evil.example/x", "/%5Cevil.example/x"),
                           ("/%09/evil.example", "/%09/evil.example")):
        answer = httpx.get(f"{server.url}{path}?token={TOKEN}&a=1", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == f"{expected}?a=1", answer.headers["location"]


def test_cookie_is_secure_behind_an_https_proxy(server):
    plain = httpx.get(f"{server.url}/?token={TOKEN}", follow_redirects=False)
    assert "Secure" not in plain.headers["set-cookie"]  # plain HTTP on loopback: a Secure cookie would be dropped
    proxied = httpx.get(f"{server.url}/?token={TOKEN}", headers={"X-Forwarded-Proto": "https"}, follow_redirects=False)
    assert proxied.status_code == 303 and "; Secure" in proxied.headers["set-cookie"]


def test_gradio_serves_no_database_or_inputs(server):
    outputs = (server.root / "outputs").resolve()
    (outputs / "inputs" / "someone-image.png").write_bytes(b"\x89PNG\r\n\x1a\nprivate")
    for path in (outputs / "jobs.sqlite", outputs / "inputs" / "someone-image.png", Path("/etc/passwd"),
                 server.root / "secret" / "clip.mp4"):
        answer = server.client.get(f"/gradio_api/file={path}")
        assert answer.status_code == 403, (path, answer.status_code)


# -- 3: CSRF and DNS rebinding -------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_server(tiny, tmp_path_factory):
    """A second server, without --token (anyone on this machine may use it: no other site's page),
    taking uploads of at most 1 MiB."""
    root = tmp_path_factory.mktemp("hostile-open")
    process = ServeProcess(root / "outputs", "--max-upload-mb", "1")
    process.root = root
    yield process
    process.close()


JOB = json.dumps({"prompt": "forged", **FAST})
COOKIE = {"Cookie": f"wanx_token={TOKEN}"}


def _count(server) -> int:
    return len(server.client.get("/v1/videos").json()["videos"])


def test_a_foreign_host_is_not_served(server, open_server):
    for process, auth in ((server, BEARER), (open_server, {})):
        answer = httpx.get(process.url + "/v1/videos", headers={"Host": "evil.example", **auth})
        assert answer.status_code == 400 and "--allowed-hosts" in answer.json()["detail"]
        assert httpx.get(process.url + "/", headers={"Host": "evil.example:80", **auth}).status_code == 400
        assert httpx.get(process.url + "/v1/model", headers={"Host": f"localhost:{process.port}", **auth}).status_code == 200


def test_forms_from_other_pages_queue_nothing(server, open_server):
    before, before_open = _count(server), _count(open_server)
    other = f"http://127.0.0.1:{server.port + 1}"  # a page on another local port: the same site for the cookie
    for headers in ({**COOKIE, "Origin": other}, COOKIE, {**COOKIE, "Origin": "null"}):
        for post in ({"data": {"request": JOB}}, {"files": {"request": (None, JOB)}}):
            answer = httpx.post(server.url + "/v1/videos", headers=headers, **post)
            assert answer.status_code == 403, (headers, post, answer.text)
    answer = httpx.post(open_server.url + "/v1/videos", headers={"Origin": other}, data={"request": JOB})
    assert answer.status_code == 403 and "cross-origin" in answer.json()["detail"]
    assert httpx.post(server.url + "/gradio_api/upload", headers={**COOKIE, "Origin": other},
                      files={"files": ("a.mp4", b"x")}).status_code == 403
    assert (_count(server), _count(open_server)) == (before, before_open)
    # what stays: curl with the token (no Origin), the page's own JSON with the cookie, and a tokenless curl
    assert httpx.post(server.url + "/v1/videos", headers=BEARER, files={"request": (None, JOB)}).status_code == 202
    same = httpx.post(server.url + "/v1/videos", json=json.loads(JOB), headers={**COOKIE, "Origin": server.url})
    assert same.status_code == 202, same.text
    assert httpx.post(open_server.url + "/v1/videos", data={"request": JOB}).status_code == 202


def test_a_page_on_another_port_cannot_queue_through_the_browser(server, tmp_path):
    """The CSRF case end to end: Chromium holds the cookie; a page served from another local
    port posts a form to the server when it loads."""
    import http.server
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from .test_browser import ARGS

    form = (f'<form method="post" enctype="multipart/form-data" action="{server.url}/v1/videos">'
            f"<input name=\"request\" value='{JOB}'></form><script>document.forms[0].submit()</script>")

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = form.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    before = _count(server)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
            try:
                page = browser.new_page()
                page.goto(f"{server.url}/v1/model?token={TOKEN}")  # the user opened the server once: the cookie
                assert page.context.cookies()[0]["name"] == "wanx_token"
                with page.expect_response(f"{server.url}/v1/videos") as posted:
                    page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
                assert posted.value.request.method == "POST" and posted.value.status == 403
            finally:
                browser.close()
    finally:
        evil.shutdown()
    assert _count(server) == before


# -- 4: one server per outputs folder ---------------------------------------------------------
def test_a_second_server_on_the_same_outputs_is_refused_before_loading(server):
    import subprocess
    import sys
    import time

    from .conftest import free_port

    job = server.client.post("/v1/videos", json={"prompt": "mine", **FAST}).json()["id"]
    start = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "wanx", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(free_port()), "--outputs", str(server.root / "outputs")],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another wanx serve (pid " in lines[0], second.stderr
    assert wait_for(server.client, job)["events"] == ["queued", "running", "done"]  # the first one's, untouched
    assert time.monotonic() - start < 60


# -- 6: text must be text ------------------------------------------------------------------------
def test_a_lone_surrogate_is_refused_and_the_queue_still_lists(server):
    before = _count(server)
    for body in (b'{"prompt": "a \\ud800 cat", "size": "64x48", "frames": 5, "steps": 2}',
                 b'{"prompt": "a cat", "negative_prompt": "\\udfff", "size": "64x48", "frames": 5, "steps": 2}',
                 b'{"prompt": "a cat", "\\ud800": 1}'):
        answer = server.client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "lone UTF-16 surrogate" in answer.json()["detail"], answer.text
    bad_bytes = server.client.post("/v1/videos", content=b'{"prompt": "a \xff cat"}',
                                   headers={"content-type": "application/json"})
    assert bad_bytes.status_code == 400 and "not UTF-8" in bad_bytes.json()["detail"]
    answer = GradioPage(server).call("submit", [None, "a \ud800", "", "64x48", "5", "2", "", "", "unipc", "", "", "", "", "",
                                                {"headers": ["LoRA", "strength"], "data": [], "metadata": None},
                                                None, 0.8])
    assert _refused(answer), answer
    listed = server.client.get("/v1/videos")
    assert listed.status_code == 200 and _count(server) == before


# -- 7: a cancel outlives a crash -----------------------------------------------------------------
def test_a_cancel_is_kept_across_a_crash(tiny, tmp_path):
    """DELETE a running job, SIGKILL the server before the job stops, start it again: the job
    stays cancelled. The job is cancelled while its VAE decodes (seconds per chunk on 256x256),
    so the kill lands before the worker sees the cancel."""
    import time

    outputs = tmp_path / "outputs"
    first = ServeProcess(outputs)
    try:
        job = first.client.post("/v1/videos", json={"prompt": "long", "size": "256x256", "frames": 17,
                                                    "steps": 2}).json()["id"]
        end = time.monotonic() + 180
        while (first.client.get(f"/v1/videos/{job}").json()["progress"] or {}).get("step") != 2:
            assert time.monotonic() < end, "the job made no steps"
            time.sleep(0.02)
        answer = first.client.delete(f"/v1/videos/{job}")
        first.kill()
        assert answer.status_code == 202 and answer.json()["cancelling"], answer.text
    finally:
        first.close()
    second = ServeProcess(outputs)
    try:
        again = second.client.get(f"/v1/videos/{job}").json()
        assert again["status"] == "cancelled" and again["attempts"] == 1, again
        assert again["events"] == ["queued", "running", "cancelled"]
        assert not (outputs / f"{job}.mp4").exists()
    finally:
        second.close()


# -- 5: bodies and prompts are bounded -----------------------------------------------------------
def test_a_large_json_body_is_413(server):
    before = _count(server)
    body = json.dumps({"prompt": "a " * 2_500_000, **FAST}).encode()  # 5 MB
    sized = server.client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert sized.status_code == 413 and "at most 1 MiB" in sized.json()["detail"], sized.text
    chunked = server.client.post("/v1/videos", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                                 headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert _count(server) == before


def test_a_chunked_upload_is_cut_at_the_limit(open_server):
    """No Content-Length: the server counts what arrives and stops reading past its limit
    (1 MiB per file here: 4 MiB for a request), not after spooling all of it."""
    before = _count(open_server)
    sent = [0]
    boundary = "hostileboundary"

    def body():
        head = (f'--{boundary}\r\ncontent-disposition: form-data; name="request"\r\n\r\n{JOB}\r\n'
                f'--{boundary}\r\ncontent-disposition: form-data; name="video"; filename="v.mp4"\r\n'
                "content-type: video/mp4\r\n\r\n").encode()
        yield head
        chunk = bytes(2**20)
        for _ in range(256):  # 256 MiB, if the server read it all
            sent[0] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        answer = httpx.post(open_server.url + "/v1/videos", content=body(), timeout=60,
                            headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert answer.status_code == 413, answer.text
    except httpx.TransportError:  # the server closed the connection after its 413
        pass
    assert sent[0] < 64 * 2**20, f"the server read {sent[0] / 2**20:.0f} MiB"
    assert _count(open_server) == before


def test_a_prompt_longer_than_the_model_reads_is_refused(server):
    before = _count(server)
    words = server.client.post("/v1/videos", json={"prompt": "cat " * 600, **FAST})
    assert words.status_code == 422 and words.json()["field"] == "prompt", words.text
    assert "this model reads at most 512" in words.json()["detail"] and "has 601 tokens" in words.json()["detail"]
    negative = server.client.post("/v1/videos", json={"prompt": "a cat", "negative_prompt": "x" * 400_000, **FAST})
    assert negative.status_code == 422 and negative.json()["field"] == "negative_prompt", negative.text
    assert _count(server) == before


# -- 8: sizes are bounded; a cancel reaches the VAE decode ---------------------------------------
@pytest.mark.parametrize("size, words", [("1000000x16", "each side must be at most 4096"),
                                         ("2048x256", "aspect ratio must be at most 4:1"),
                                         ("256x2048", "aspect ratio must be at most 4:1")])
def test_sizes_are_bounded(server, size, words):
    before = _count(server)
    answer = server.client.post("/v1/videos", json={"prompt": "a cat", "size": size, "frames": 5, "steps": 2})
    assert answer.status_code == 422 and answer.json()["field"] == "size" and words in answer.json()["detail"], \
        answer.text
    assert _count(server) == before


def test_a_cancel_stops_the_vae_decode(open_server):
    """Cancelled once the last step is done (its VAE decode takes seconds per chunk at 256x256):
    the job ends cancelled with no video, not done after decoding everything."""
    import time

    job = open_server.client.post("/v1/videos", json={"prompt": "decode", "size": "256x256", "frames": 17,
                                                      "steps": 2}).json()["id"]
    end = time.monotonic() + 180
    while (open_server.client.get(f"/v1/videos/{job}").json()["progress"] or {}).get("step") != 2:
        assert time.monotonic() < end, "the job made no steps"
        time.sleep(0.02)
    assert open_server.client.delete(f"/v1/videos/{job}").status_code == 202
    stopped = wait_for(open_server.client, job)
    assert stopped["status"] == "cancelled", stopped
    assert not (open_server.root / "outputs" / f"{job}.mp4").exists()


# -- 2: small files that decode to gigabytes ------------------------------------------------------
def _peak_rise(process: ServeProcess, post) -> tuple[int, object]:
    """How far the server's peak resident memory (VmHWM, its own accounting) rises above its
    resident memory while `post()` runs (and the job it queues, until it ends), in bytes."""
    status = Path(f"/proc/{process.proc.pid}/status")

    def field(name: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(name + ":"))
        return int(line.split()[1]) * 1024

    Path(f"/proc/{process.proc.pid}/clear_refs").write_text("5")  # the peak starts again from now
    before = field("VmRSS")
    answer = post()
    if answer.status_code == 202:
        wait_for(process.client, answer.json()["id"])
    return field("VmHWM") - before, answer


@pytest.fixture(scope="module")
def i2v_server(tiny, tmp_path_factory):
    process = ServeProcess(tmp_path_factory.mktemp("hostile-i2v") / "outputs", "--model", "tiny-i2v")
    yield process
    process.close()


def test_a_video_bomb_is_read_at_the_job_s_size(open_server, tmp_path):
    bomb = _mp4(tmp_path / "bomb.mp4", 1280, 720, 300)  # 300 black 720p frames: a few hundred KB
    assert bomb.stat().st_size < 2**20
    request = json.dumps({"prompt": "a cat", "size": "64x48", "frames": 5, "steps": 2, "strength": 0.5})
    rise, answer = _peak_rise(open_server, lambda: open_server.client.post(
        "/v1/videos", data={"request": request}, files={"video": ("bomb.mp4", bomb.read_bytes(), "video/mp4")}))
    assert answer.status_code == 202, answer.text
    job = open_server.client.get(f"/v1/videos/{answer.json()['id']}").json()
    assert job["status"] == "done" and job["settings"]["size"] == "64x32", job  # 16:9 within 64x48
    assert rise < 300 * 2**20, f"the server's peak memory rose {rise / 2**20:.0f} MiB"


def test_an_image_bomb_is_read_at_the_job_s_size(i2v_server, tmp_path):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (8000, 8000)).save(bomb)  # 64 megapixels of black: about 190 KB
    request = json.dumps({"prompt": "a cat", "size": "64x48", "frames": 5, "steps": 2})
    rise, answer = _peak_rise(i2v_server, lambda: i2v_server.client.post(
        "/v1/videos", data={"request": request}, files={"image": ("bomb.png", bomb.read_bytes(), "image/png")}))
    assert answer.status_code == 202, answer.text
    assert i2v_server.client.get(f"/v1/videos/{answer.json()['id']}").json()["status"] == "done"
    assert rise < 300 * 2**20, f"the server's peak memory rose {rise / 2**20:.0f} MiB"
