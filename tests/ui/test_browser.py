"""The demo in a real browser: ``exl3-triton demo`` on a free port, driven through headless Chromium.

Uses the system's Chromium and chromedriver (Debian packages ``chromium`` and ``chromium-driver``,
installed by ``.ci/run``) through Selenium; nothing is downloaded at run time. Without them the test
skips locally and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from exl3_triton.ui.demo import BUNDLED_MODEL_DIR
from exl3_triton.ui.session import generator_accepts_draft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _need(condition: bool, what: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; .ci/run installs it (apt-get install chromium chromium-driver)")
        pytest.skip(f"{what} is missing (apt-get install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_url(tmp_path):
    port = _free_port()
    env = dict(os.environ, EXL3_TRITON_UI_STATE=str(tmp_path / "state"), GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "exl3_triton.cli", "demo", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail(f"the demo did not start:\n{(tmp_path / 'demo.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser():
    _need(CHROMIUM is not None, "chromium")
    _need(CHROMEDRIVER is not None, "chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2400",
                "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


class Page:
    """The panel's controls, found by their elem_id (stable across Gradio versions)."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By

    def el(self, css: str):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        return self.el(f"#{elem_id}").text

    def fill(self, elem_id: str, value) -> None:
        box = self.el(f"#{elem_id} textarea, #{elem_id} input")
        box.clear()
        box.send_keys(str(value))

    def click(self, elem_id: str) -> None:
        self.el(f"#{elem_id}").click()

    def choose(self, elem_id: str, label: str) -> None:
        for option in self.d.find_elements(self.By.CSS_SELECTOR, f"#{elem_id} label"):
            if option.text.strip() == label:
                option.click()
                return
        raise AssertionError(f"no option {label!r} in #{elem_id}")

    def wait_for(self, condition, timeout: float = 60, what: str = ""):
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # Gradio re-renders components as they update: an element found a moment ago may be gone
        retry_on = (NoSuchElementException, StaleElementReferenceException)
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1, ignored_exceptions=retry_on).until(
                lambda _: condition())
        except Exception as e:
            raise AssertionError(f"timed out waiting for {what}; page says:\n{self.d.find_element(self.By.TAG_NAME, 'body').text[:3000]}") from e


def test_demo_in_a_browser(demo_url, browser, output_dir, tmp_path):
    page = Page(browser)
    browser.get(demo_url)
    page.wait_for(lambda: page.el("#exl3-load"), what="the panel")

    # bad inputs: a clear message each, and the app keeps working
    not_exl3 = tmp_path / "not_a_model"
    not_exl3.mkdir()
    (not_exl3 / "notes.txt").write_text("hello")
    for path, seq_len, message in [(tmp_path / "missing", 512, "no such directory"),
                                   (not_exl3, 512, "no config.json"),
                                   (BUNDLED_MODEL_DIR, 10**12, "max sequence length")]:
        page.fill("exl3-model-dir", path)
        page.fill("exl3-max-seq-len", seq_len)
        page.click("exl3-load")
        page.wait_for(lambda: message in page.text("exl3-load-status"), what=f"the message {message!r}")
        assert "Error" in page.text("exl3-load-status")

    # load the bundled model through the panel
    page.fill("exl3-model-dir", BUNDLED_MODEL_DIR)
    page.fill("exl3-max-seq-len", 512)
    page.click("exl3-load")
    page.wait_for(lambda: "Loaded" in page.text("exl3-load-status"), timeout=120, what="the load")
    card = page.text("exl3-model-card")
    for fact in ("Gemma4ForCausalLM", "layers", "bits per tensor class", "q_proj 4", "weights in memory"):
        assert fact in card, card

    # a streamed reply
    page.fill("exl3-max-new", 60)
    page.fill("exl3-seed", 1)
    page.fill("exl3-message", "And God said")
    # record every state the reply passes through (polling could miss a fast stream)
    browser.execute_script("""
        window.exl3Replies = [];
        new MutationObserver(() => {
            const r = document.querySelectorAll('#exl3-chat .exl3-msg-assistant');
            if (r.length) window.exl3Replies.push(r[r.length - 1].textContent);
        }).observe(document.querySelector('#exl3-chat'), {subtree: true, childList: true, characterData: true});
    """)
    page.click("exl3-send")
    page.wait_for(lambda: "finished" in page.text("exl3-chat-stats"), timeout=240, what="the reply")
    seen = set(browser.execute_script("return window.exl3Replies"))
    stats = page.text("exl3-chat-stats")
    assert "tokens/s" in stats and "time to first token" in stats, stats
    reply = browser.find_elements(page.By.CSS_SELECTOR, "#exl3-chat .exl3-msg-assistant")[-1].text
    assert len(reply.removeprefix("Model:").strip()) > 0, reply
    assert len({s for s in seen if s.removeprefix("Model:").strip()}) >= 2, f"not streamed: {seen}"

    # regenerate: the last reply is replaced, not added to
    browser.execute_script("""
        window.exl3Stats = [];
        const s = document.querySelector('#exl3-chat-stats');
        new MutationObserver(() => window.exl3Stats.push(s.textContent))
            .observe(s, {subtree: true, childList: true, characterData: true});
    """)
    page.click("exl3-regenerate")

    def regenerated() -> bool:
        # finished after a state that was not: Gradio may re-render the old "finished" stats first, and a
        # new message sent before the regenerated reply ends is refused (slow on a busy machine)
        states = browser.execute_script("return window.exl3Stats")
        running = next((i for i, t in enumerate(states) if "finished" not in t), None)
        return running is not None and any("finished" in t for t in states[running + 1:])
    page.wait_for(regenerated, timeout=240, what="the regenerated reply")
    roles = lambda: [m.get_attribute("data-role")  # noqa: E731
                     for m in browser.find_elements(page.By.CSS_SELECTOR, "#exl3-chat .exl3-msg")]
    page.wait_for(lambda: roles() == ["user", "assistant"], what="one user message and one reply")

    # speculative decoding controls; this model has no MTP heads
    page.el("#exl3-draft-enable input[type=checkbox]").click()
    # with speculative decoding in the generator: "Drafting: ngram, depth 2"; before: "(asked for: ngram, depth 2)"
    page.wait_for(lambda: "ngram, depth 2" in page.text("exl3-draft-status"), what="n-gram drafting on")
    page.choose("exl3-draft-source", "MTP heads")
    page.wait_for(lambda: "no MTP heads" in page.text("exl3-draft-status"), what="MTP heads unavailable")
    page.choose("exl3-draft-source", "n-gram")
    page.wait_for(lambda: "no MTP heads" not in page.text("exl3-draft-status"), what="n-gram accepted")
    assert "MTP heads: unavailable" in page.text("exl3-draft-status")
    if generator_accepts_draft():  # with speculative decoding in the generator: live statistics after a reply
        page.fill("exl3-message", "And Abraham said unto God")
        page.click("exl3-send")
        page.wait_for(lambda: page.text("exl3-chat-stats").count("finished") == 1
                      and "And Abraham said unto God" in page.text("exl3-chat"), timeout=240, what="a drafted reply")
        page.wait_for(lambda: "acceptance per depth" in page.text("exl3-draft-stats"), what="the draft statistics")
        assert "tokens per step" in page.text("exl3-draft-stats")

    browser.save_screenshot(str(output_dir / "demo.png"))
    assert (output_dir / "demo.png").stat().st_size > 10_000
