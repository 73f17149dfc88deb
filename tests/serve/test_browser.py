"""The web UI in a real browser: Debian's chromium driven by Playwright (no browser download)
against `wanx serve --model tiny --token ...` in a subprocess."""

from __future__ import annotations

import os
import shutil

import pytest

from wanx.video import read_video

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium; "
                                                         ".ci/run installs it)")
# As root and offline: no sandbox, and none of Chromium's calls home.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
WAIT = 180_000  # ms; seconds where the machine is free, but a shared 2-core machine can be far slower


def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def test_generate_in_the_browser(serve_process, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    server = serve_process(tmp_path / "outputs", token=TOKEN)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1500})
            page.set_default_timeout(WAIT)
            refused = page.goto(server.url + "/")
            assert refused.status == 401 and "token" in page.content()
            page.goto(f"{server.url}/?token={TOKEN}")  # sets the cookie, then the page without the token
            assert page.url.rstrip("/") == server.url
            page.wait_for_selector("#prompt textarea", timeout=WAIT)
            assert page.get_by_role("tab", name="Text to video").is_visible()
            assert page.get_by_role("tab", name="Image to video").count() == 0  # a T2V model: no I2V tab

            field(page, "prompt").fill("a red ball bounces")
            field(page, "size").fill("100x48")
            page.locator("#generate").click()
            error = page.locator("#error")
            error.get_by_text("not a multiple of 16").wait_for(timeout=WAIT)
            assert "size width 100 is not a multiple of 16; nearest valid: 96 or 112" in error.inner_text()
            assert server.client.get("/v1/videos").json()["videos"] == []  # nothing was queued

            field(page, "size").fill("64x48")
            field(page, "frames").fill("5")
            field(page, "steps").fill("2")
            field(page, "seed").fill("5")
            page.locator("#generate").click()
            video = page.locator("#result video")
            video.wait_for(timeout=WAIT)
            assert "not a multiple" not in error.inner_text()  # the error went with the good request
            source = video.get_attribute("src")
            assert source and source.endswith(".mp4")
            fetched = page.request.get(source)  # with the page's cookie
            assert fetched.ok
            (tmp_path / "shown.mp4").write_bytes(fetched.body())
            shown = read_video(tmp_path / "shown.mp4")
            assert len(shown) == 5 and shown.size == (64, 48)
            assert "done" in page.locator("#status").inner_text()

            # the UI submitted through the same queue as the API
            jobs = server.client.get("/v1/videos").json()["videos"]
            assert [(job["status"], job["request"]["prompt"], job["settings"]["seed"]) for job in jobs] == [
                ("done", "a red ball bounces", 5)]
            # a past result gives its settings back to the form
            thumbnail = page.locator("#gallery").locator("img").first
            thumbnail.wait_for(timeout=WAIT)
            field(page, "prompt").fill("")
            field(page, "seed").fill("")
            thumbnail.click()
            page.wait_for_function("document.querySelector('#prompt textarea').value === 'a red ball bounces'",
                                   timeout=WAIT)
            assert field(page, "seed").input_value() == "5" and field(page, "size").input_value() == "64x48"
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)

            # live progress of a long job, then cancel it from the queue. Long enough to be caught
            # running: 400 steps at 64x48x5 took 0.8 s on one warm thread and ended before the click
            field(page, "size").fill("256x256")
            field(page, "frames").fill("17")
            field(page, "steps").fill("1000")
            page.locator("#generate").click()
            status = page.locator("#status")
            status.get_by_text("ETA").wait_for(timeout=WAIT)
            assert "running" in status.inner_text() and "/1000" in status.inner_text()
            page.locator("#queue").get_by_text("running").filter(visible=True).first.wait_for(timeout=WAIT)
            page.locator("#cancel").click()
            status.get_by_text("cancelled").wait_for(timeout=WAIT)
            jobs = server.client.get("/v1/videos").json()["videos"]
            assert jobs[0]["status"] == "cancelled" and jobs[0]["progress"] is None
            assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("WANX_SERVE_SCREENSHOT"):  # docs/serve.md's picture: docs/serve.png
                shutil.copyfile(tmp_path / "serve.png", os.environ["WANX_SERVE_SCREENSHOT"])
        finally:
            browser.close()
