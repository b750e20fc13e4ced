"""The web page at GET / (sqllava_edge/serve/web/index.html), driven in a real headless Chromium.

Driver: Selenium with Debian's chromium-driver. Debian builds chromedriver from the same source and version as its
chromium, so the pair always matches, and WebDriver is a W3C protocol; Playwright's Python package would talk to the
distribution's Chromium over a DevTools protocol pinned to the Chromium build it downloads itself (not reachable
here), so every Debian update could break it, and it adds a bundled Node driver. Selenium is one pure-Python wheel.

Two servers on the tiny random-weight bundle (tests/serve_helpers.py, real uvicorn on 127.0.0.1): an open one for the
conversation, the self-questions and the screenshots; a guarded one (--api-key, a 3000-byte image limit, --parallel 1
--queue 0) for the key prompt and the error messages. The random weights never emit EOS, so every generation runs to
its length cap: the page's "longest answer" setting caps the chat, and the server's task defaults (describe, self-
questions, interview answers) are cut to 24 tokens here to keep the module near half a minute.

Any JavaScript error (uncaught exception, rejected promise, console.error) fails a test; HTTP error statuses in the
console are allowed only where a test provokes them. SQLLAVA_EDGE_SCREENSHOTS=1 also copies the desktop and phone
screenshots to docs/web-desktop.png and docs/web-phone.png (docs/serving.md shows them).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.serve_helpers import ROOT, png_bytes, serving

pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install '.[serve]')")
pytest.importorskip("selenium", reason="the browser test drives Chromium with Selenium (pip install '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium "
                "chromium-driver (.ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import ElementClickInterceptedException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-color-profile=srgb"]
DESKTOP = (1280, 1000)
PHONE = 360
KEY = "web-test-key"
WAIT = 20.0  # seconds, the longest any single step may take
FAST = 24  # tokens per describe / self-question / interview answer (the server's task defaults, cut for the test)
SCREENSHOTS = os.environ.get("SQLLAVA_EDGE_SCREENSHOTS") == "1"


# --------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def short_tasks():
    """The server's task defaults cut to FAST tokens (random weights never stop early)."""
    from sqllava_edge.generation import TASK_DEFAULTS

    with pytest.MonkeyPatch.context() as mp:
        for task, config in list(TASK_DEFAULTS.items()):
            mp.setitem(TASK_DEFAULTS, task, config.replace(max_new_tokens=FAST))
        yield


@pytest.fixture(scope="module")
def server(tiny_bundle, short_tasks):
    with serving(tiny_bundle) as s:
        yield s


@pytest.fixture(scope="module")
def guarded(tiny_bundle, short_tasks):
    with serving(tiny_bundle, api_key=KEY, max_image_bytes=3000, parallel=1, queue=0) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def allowed() -> set[int]:
    """HTTP statuses a test provokes on purpose: their "Failed to load resource" console lines are not errors."""
    return set()


@pytest.fixture
def page(browser, allowed):
    """The browser, its console checked after the test."""
    browser.get_log("browser")  # drop what earlier tests left
    yield browser
    problems = console_errors(browser, allowed)
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
    assert not problems, f"the page logged errors: {problems}"


def console_errors(driver, allowed_statuses) -> list[str]:
    bad = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        status = re.search(r"status of (\d{3})", entry["message"])
        if entry.get("source") == "network" and status and int(status.group(1)) in allowed_statuses:
            continue
        bad.append(entry["message"])
    return bad


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def scene(path: Path) -> Path:
    """A small drawn picture (sky, sun, hills, a house) so the screenshots show an image, not noise."""
    w, h = 640, 440
    sky = np.linspace([110, 170, 235], [200, 225, 250], h // 2 + 40).astype(np.uint8)
    img = Image.new("RGB", (w, h), (96, 160, 80))
    img.paste(Image.fromarray(np.repeat(sky[:, None, :], w, axis=1)), (0, 0))
    d = ImageDraw.Draw(img)
    d.ellipse((470, 40, 560, 130), fill=(255, 205, 60))
    d.ellipse((-120, 210, 380, 520), fill=(110, 175, 90))
    d.ellipse((260, 230, 800, 560), fill=(80, 150, 70))
    d.rectangle((150, 230, 300, 350), fill=(200, 70, 60))
    d.polygon([(135, 235), (225, 160), (315, 235)], fill=(120, 60, 50))
    d.rectangle((205, 290, 240, 350), fill=(90, 55, 40))
    d.rectangle((165, 250, 195, 280), fill=(235, 235, 210))
    d.rectangle((255, 250, 285, 280), fill=(235, 235, 210))
    img.save(path, "PNG")
    return path


def wait(driver, condition, what: str, timeout: float = WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except TimeoutException:
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error") if e.is_displayed()]
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; status: "
                             f"{by_id(driver, 'status').text!r}; errors on the page: {shown}") from None


def by_id(driver, name: str):
    return driver.find_element(By.ID, name)


def click_id(driver, name: str, timeout: float = 5.0) -> None:
    """A real click on a control that a streaming answer may be pushing down the page: Chromium refuses a click whose
    point another element reached in the meantime, so try again (bounded) as a person would on a moving button."""
    deadline = time.monotonic() + timeout
    while True:
        element = by_id(driver, name)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        try:
            element.click()
            return
        except ElementClickInterceptedException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def open_page(driver, url: str, key: str | None = None) -> None:
    driver.get(url + "/")
    if key is None:
        driver.execute_script("sessionStorage.clear()")
    else:
        driver.execute_script("sessionStorage.setItem('sqllava-edge.api-key', arguments[0])", key)
    driver.refresh()


def wait_ready(driver) -> None:
    wait(driver, lambda: "Ready" in by_id(driver, "status").text, "the page to report the server ready")
    assert by_id(driver, "app").is_displayed()


def choose_image(driver, path: Path) -> None:
    by_id(driver, "fileInput").send_keys(str(path))


def set_max_tokens(driver, n: int) -> None:
    driver.execute_script("document.getElementById('maxTokens').value = arguments[0]", str(n))


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")


def ask_and_wait(driver, question: str, count: int) -> str:
    """Type `question` + Enter; wait for the count-th answer to stream in and finish; its stats line."""
    box = by_id(driver, "question")
    box.send_keys(question + Keys.ENTER)
    wait(driver, lambda: len(answers(driver)) == count and answers(driver)[-1].find_element(By.CLASS_NAME, "text").text,
         f"answer {count} to start streaming")
    wait(driver, lambda: "streaming" not in answers(driver)[-1].get_attribute("class"), f"answer {count} to finish")
    return answers(driver)[-1].find_element(By.CLASS_NAME, "stats").text


def shoot(driver, path: Path, full_page: bool = False) -> Path:
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        width = driver.execute_script("return document.documentElement.clientWidth")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        path.write_bytes(driver.get_screenshot_as_png())
    assert Image.open(path).size[0] > 0
    if SCREENSHOTS:
        target = ROOT / "docs" / path.name
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    return path


UNLABELLED = """
return [...document.querySelectorAll('button, input, textarea, select')]
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
  .map(e => e.id || e.outerHTML.slice(0, 80));
"""

OVERFLOW = """
const vw = document.documentElement.clientWidth;
const out = [...document.querySelectorAll('button, input:not(.sr-only), textarea, select, label, summary, .card, .msg, img')]
  .filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && (r.left < -0.5 || r.right > vw + 0.5); })
  .map(e => `${e.tagName.toLowerCase()}#${e.id || e.className}`);
return {vw, scrollWidth: document.documentElement.scrollWidth, out};
"""


# --------------------------------------------------------------------------------------------------------------------
# Tests


def test_ask_follow_up_and_self_questions(page, server, tmp_path):
    """Upload, ask (Enter), stream, follow up (the server's cache reused), self-questions, a self-question asked,
    an interview; desktop and 360-px phone screenshots, where no control leaves the viewport."""
    open_page(page, server.url)
    wait_ready(page)
    assert page.execute_script(UNLABELLED) == []
    assert not by_id(page, "suggestBtn").is_enabled(), "self-questions need an image first"

    choose_image(page, scene(tmp_path / "scene.png"))
    wait(page, lambda: "sent as" in by_id(page, "imageInfo").text, "the image to be re-encoded")
    info = by_id(page, "imageInfo").text
    assert "640×440 PNG" in info and "163×112 JPEG" in info, info  # short side -> the tiny model's 112 px
    assert by_id(page, "preview").is_displayed()
    set_max_tokens(page, 12)

    stats = ask_and_wait(page, "What is in the image?", 1)
    assert re.search(r"first token \d+\.\d+ s · \d+\.\d tokens/s · 12 tokens · vision onnxruntime, LLM llama\.cpp",
                     stats), stats
    scheduler, engine = server.state.scheduler, server.state.assistant.engine
    cached, encodes = scheduler.stats["cached_positions"], engine.counters.vision_encodes
    stats = ask_and_wait(page, "And what colour is the roof?", 2)
    assert "tokens/s" in stats, stats
    assert scheduler.stats["cached_positions"] > cached, "the follow-up did not reuse the first turn's KV cache"
    assert engine.counters.vision_encodes == encodes, "the follow-up encoded the same image again"

    by_id(page, "suggestBtn").click()
    suggestions = lambda: page.find_elements(By.CSS_SELECTOR, "#suggestions button.suggestion")  # noqa: E731
    wait(page, lambda: len(suggestions()) == 3, "three self-questions")
    assert by_id(page, "description").is_displayed()
    question = suggestions()[0].text
    assert question.strip()
    suggestions()[0].click()
    wait(page, lambda: len(answers(page)) == 3 and "streaming" not in answers(page)[-1].get_attribute("class"),
         "the self-question's answer")
    users = page.find_elements(By.CSS_SELECTOR, "#log .msg.user .text")
    assert users[-1].text == question

    page.execute_script("window.scrollTo(0, 0)")
    shoot(page, tmp_path / "web-desktop.png", full_page=True)

    by_id(page, "interviewBtn").click()
    wait(page, lambda: len(page.find_elements(By.CSS_SELECTOR, "#interview .q")) == 3, "the interview")
    pairs = page.find_elements(By.CSS_SELECTOR, "#interview li:not(.meta)")
    assert all(p.find_element(By.CLASS_NAME, "a").text.strip() for p in pairs), "an interview question has no answer"
    assert not by_id(page, "sqError").is_displayed() and not by_id(page, "imageError").is_displayed()

    assert not by_id(page, "cameraInput").find_element(By.XPATH, "following-sibling::label").is_displayed()
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": PHONE, "height": 780, "deviceScaleFactor": 2, "mobile": True})
    page.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 1})
    page.execute_script("window.scrollTo(0, 0)")
    assert by_id(page, "cameraInput").find_element(By.XPATH, "following-sibling::label").is_displayed(), \
        "a touch screen shows the camera button"
    fit = page.execute_script(OVERFLOW)
    assert fit["vw"] == PHONE and fit["scrollWidth"] <= PHONE and fit["out"] == [], fit
    shoot(page, tmp_path / "web-phone.png")


DISPATCH = """
const [kind, b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], name, {type: 'image/png'}));
const event = kind === 'drop' ? new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})
                              : new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
(kind === 'drop' ? document.getElementById('drop') : document.getElementById('question')).dispatchEvent(event);
"""


def test_drop_and_paste_an_image(page, server):
    """An image dropped on the page or pasted (Ctrl+V) is taken like a chosen one; the file input is keyboard-reachable."""
    open_page(page, server.url)
    wait_ready(page)
    assert page.execute_script("const e = document.getElementById('fileInput'); e.focus(); return document.activeElement === e")
    for kind, colour in (("drop", (200, 40, 40)), ("paste", (40, 160, 60))):
        png = base64.b64encode(png_bytes(Image.new("RGB", (90, 70), colour))).decode()
        page.execute_script(DISPATCH, kind, png, f"{kind}.png")
        wait(page, lambda: by_id(page, "imageInfo").text.startswith("90×70 PNG") and by_id(page, "preview").get_attribute(
            "alt").endswith(f"({kind}.png)"), f"the image by {kind}")
        assert "sent as it is" in by_id(page, "imageInfo").text
    assert by_id(page, "suggestBtn").is_enabled()


def test_api_key_is_asked_once(page, allowed, guarded):
    """With --api-key the page asks for the key, says when it is refused, keeps it in the tab's sessionStorage."""
    allowed.add(401)
    open_page(page, guarded.url)
    wait(page, lambda: by_id(page, "keyPanel").is_displayed(), "the key prompt")
    assert not by_id(page, "app").is_displayed()
    by_id(page, "keyInput").send_keys("not-the-key" + Keys.ENTER)
    wait(page, lambda: by_id(page, "keyError").is_displayed(), "the refused-key message")
    assert "refused the API key" in by_id(page, "keyError").text
    assert "invalid_api_key" in by_id(page, "keyError").text
    by_id(page, "keyInput").send_keys(KEY + Keys.ENTER)
    wait_ready(page)
    assert page.execute_script("return sessionStorage.getItem('sqllava-edge.api-key')") == KEY
    page.refresh()
    wait_ready(page)
    assert not by_id(page, "keyPanel").is_displayed(), "the key was asked for again in the same tab"


def test_errors_are_shown_and_stop_cancels(page, allowed, guarded, tmp_path):
    """An image that cannot fit the server's limit, a full queue (503) and Stop, all on the page."""
    allowed.add(503)
    open_page(page, guarded.url, key=KEY)
    wait_ready(page)

    noise = tmp_path / "noise.png"  # 150x100: no resize (short side under 112 px), and noise does not compress
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(noise)
    choose_image(page, noise)
    wait(page, lambda: by_id(page, "imageError").is_displayed(), "the too-large message")
    error = by_id(page, "imageError").text
    assert "too large for this server" in error and "limit of 2.9 KiB" in error and "--max-image-mb" in error, error

    small = tmp_path / "small.png"
    Image.new("RGB", (80, 60), (30, 120, 200)).save(small)
    choose_image(page, small)
    wait(page, lambda: "sent as it is" in by_id(page, "imageInfo").text, "the small image")
    assert not by_id(page, "imageError").is_displayed()

    set_max_tokens(page, 2000)  # long enough to still run while the page asks for more
    by_id(page, "question").send_keys("Describe the image." + Keys.ENTER)
    wait(page, lambda: answers(page) and answers(page)[-1].find_element(By.CLASS_NAME, "text").text, "streaming")
    # Pause the server's decoding (its engine lock) while the page acts, so the answer is still running when the
    # queue fills and when Stop lands, however fast this machine decodes the 2000 tokens.
    with guarded.state.assistant.engine.lock:
        click_id(page, "suggestBtn")  # --parallel 1 --queue 0: no room for a second request
        wait(page, lambda: by_id(page, "sqError").is_displayed(), "the queue-full message")
        assert "server is busy" in by_id(page, "sqError").text and "queue_full" in by_id(page, "sqError").text
        click_id(page, "stopBtn")
        wait(page, lambda: "Stopped" in answers(page)[-1].find_element(By.CLASS_NAME, "stats").text,
             "the stopped answer")
    deadline = time.monotonic() + 5
    while guarded.state.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guarded.state.scheduler.running == 0, "Stop did not free the server's sequence"
    assert by_id(page, "sendBtn").is_displayed() and not by_id(page, "stopBtn").is_displayed()

    set_max_tokens(page, 6)
    stats = ask_and_wait(page, "What colour is it?", 2)  # the conversation goes on after a stop
    assert "6 tokens" in stats, stats

    set_max_tokens(page, 2000)  # "New conversation" while an answer streams: that answer is dropped, not carried over
    by_id(page, "question").send_keys("Describe it again." + Keys.ENTER)
    wait(page, lambda: len(answers(page)) == 3 and answers(page)[-1].find_element(By.CLASS_NAME, "text").text,
         "the third answer to stream")
    click_id(page, "newBtn")
    wait(page, lambda: by_id(page, "sendBtn").is_displayed() and guarded.state.scheduler.running == 0,
         "the cancelled answer to end")
    set_max_tokens(page, 6)
    stats = ask_and_wait(page, "What colour is it?", 1)
    assert "6 tokens" in stats and len(page.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2, stats


def test_answer_as_json_follows_the_schema_and_is_pretty_printed(page, server, tmp_path):
    """The "Answer as JSON" field: the sample schema sent as response_format, the answer shown pretty-printed; a
    schema that is not JSON is refused on the page, before any request."""
    open_page(page, server.url)
    wait_ready(page)
    choose_image(page, scene(tmp_path / "scene.png"))
    wait(page, lambda: "sent as" in by_id(page, "imageInfo").text, "the image to be re-encoded")
    set_max_tokens(page, 800)
    by_id(page, "jsonAnswer").find_element(By.TAG_NAME, "summary").click()
    click_id(page, "sampleSchemaBtn")
    assert json.loads(by_id(page, "jsonSchema").get_attribute("value"))["required"] == ["objects"]
    ask_and_wait(page, "Which objects are in the image?", 1)
    text = answers(page)[-1].find_element(By.CLASS_NAME, "text").text
    assert isinstance(json.loads(text)["objects"], list) and "\n" in text, text  # parsed and pretty-printed
    box = by_id(page, "jsonSchema")
    box.clear()
    box.send_keys("{not json")
    by_id(page, "question").send_keys("Again?" + Keys.ENTER)
    wait(page, lambda: by_id(page, "schemaError").is_displayed(), "the schema error")
    assert "not valid JSON" in by_id(page, "schemaError").text and len(answers(page)) == 1
