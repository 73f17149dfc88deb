"""Make docs/serve.png: `wanx serve --model demo` in a subprocess, two demo prompts generated
through the web UI in Debian's chromium (driven by Playwright, which downloads no browser),
then a screenshot of the page with the result, the queue and the gallery.

    python docs/serve_screenshot.py [OUT.png]      # needs the serve and test extras, and chromium

The tests drive the same UI on the tiny random model (tests/serve/test_browser.py); this script
only makes the picture in docs/serve.md, on the model whose videos mean something.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a yellow square moving down on a gray background", "a red circle moving left on a black background"]
TOKEN = "screenshot"
WAIT = 300_000  # ms


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    from playwright.sync_api import sync_playwright

    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("serve.png"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on this machine: apt-get install chromium")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "wanx", "serve", "--model", "demo", "--port", str(port),
                                   "--outputs", tmp, "--device", "cpu", "--token", TOKEN])
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=[
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                page = browser.new_page(viewport={"width": 1200, "height": 1500})
                page.set_default_timeout(WAIT)
                for _ in range(600):  # the server loads the model first
                    try:
                        page.goto(f"{url}/?token={TOKEN}")
                        break
                    except Exception:
                        time.sleep(0.5)
                page.wait_for_selector("#prompt textarea")
                for n, prompt in enumerate(PROMPTS):
                    page.locator("#prompt").locator("input, textarea").first.fill(prompt)
                    page.locator("#seed").locator("input, textarea").first.fill(str(n))
                    page.locator("#generate").click()
                    page.locator("#gallery").locator("img").nth(n).wait_for()  # there once job n is done
                page.locator("#result video").wait_for()
                time.sleep(2)  # let the video show its first frames
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
