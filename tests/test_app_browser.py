"""End to end in a real browser: `streamlit run app.py` from the repository root with no
XAI_CHECKPOINT, on 127.0.0.1 and a free port, driven by headless Debian Chromium through
Playwright (no browser download).

It explains a correctly classified and a misclassified test image with the shipped
checkpoint, adds an explainer, uploads a file that is not an image, and saves a
screenshot of each state to $TEST_ARTIFACTS (default xai_results/test_artifacts/; not
committed). Chromium comes from Debian's `chromium` package: `make test` installs it
when it is missing (`apt-get install -y chromium`), or set $CHROMIUM to another binary.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "xai_results" / "test_artifacts"))
TIMEOUT_MS = 180_000  # the first page compiles the explainers on the CPU


def _chromium():
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Chromium is not installed: run `apt-get install -y chromium` (Debian's "
                    "package; `make test` does it when run as root) or set $CHROMIUM")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir():
    """The real CIFAR-10 ($CIFAR10_DIR, set by .ci/run): the app reads whole files."""
    if not os.environ.get("CIFAR10_DIR"):
        pytest.skip("CIFAR10_DIR is not set (.ci/run sets it)")
    return os.environ["CIFAR10_DIR"]


@pytest.fixture(scope="module")
def server(data_dir, tmp_path_factory):
    port = _free_port()
    # As a Streamlit user starts it: `streamlit run app.py` from the repository root,
    # XAI_CHECKPOINT unset (the shipped CNN is the default), the settings read from
    # .streamlit/config.toml; only the port is chosen here.
    env = {k: v for k, v in os.environ.items() if k != "XAI_CHECKPOINT"}
    log = open(tmp_path_factory.mktemp("streamlit") / "server.log", "w+")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "streamlit"), "run", "app.py",
         f"--server.port={port}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            log.seek(0)
            pytest.fail(f"streamlit did not start on {url}:\n{log.read()}")
        time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


# The first test record the shipped checkpoint gets wrong: a truck it calls a ship. The
# page itself must say "misclassified" for it, so a different checkpoint fails loudly.
MISCLASSIFIED_RECORD = 47


def _wait_for_page(page, heading):
    """Waits until Streamlit has finished the run and `heading` is on the page."""
    page.get_by_text(heading).first.wait_for(timeout=TIMEOUT_MS)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached",
                                                            timeout=TIMEOUT_MS)


@pytest.mark.slow
def test_the_page_explains_images_in_a_real_browser(server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wrong = MISCLASSIFIED_RECORD
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server)

        # Record 0, the default: prediction, top-3 and one figure per default explainer.
        _wait_for_page(page, "Saliency — ")
        expect(page.get_by_text("Prediction:").first).to_be_visible()
        expect(page.get_by_text("true class").first).to_contain_text("correct")
        expect(page.get_by_text("Top 3:")).to_be_visible()
        figures = page.locator('[data-testid="stImage"] img')
        expect(figures).to_have_count(3, timeout=TIMEOUT_MS)  # the image and two figures
        for i in range(3):
            assert figures.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
        expect(page.get_by_text("ROAD AUC, most relevant removed first on this image").first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "app_correct.png", full_page=True)

        # Choose a misclassified image by its record and add Grad-CAM++.
        box = page.get_by_label("Image (1 – 10,000 of those shown)")
        box.fill(str(wrong + 1))
        box.press("Enter")
        _wait_for_page(page, f"test record {wrong}")
        expect(page.get_by_text("Prediction:").first).to_contain_text(
            "true class truck, misclassified")
        page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"] input').click()
        page.get_by_role("option", name="Grad-CAM++").click()
        page.keyboard.press("Escape")
        _wait_for_page(page, "Grad-CAM++ — ")
        expect(figures).to_have_count(4, timeout=TIMEOUT_MS)
        expect(page.get_by_text("Randomisation test:").first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "app_misclassified.png", full_page=True)

        # An upload that is not an image is a message in the page, not a crash.
        page.get_by_text("Upload", exact=True).click()
        page.locator('input[type="file"]').set_input_files(
            files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
        expect(page.get_by_text("is not an image that Pillow can read")).to_be_visible(
            timeout=TIMEOUT_MS)
        page.screenshot(path=ARTIFACTS / "app_bad_upload.png", full_page=True)
        browser.close()
    for name in ("app_correct.png", "app_misclassified.png", "app_bad_upload.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
