"""The playground page of a real `glmx serve` (127.0.0.1, a free port) driven in headless Chromium through Selenium:
a prompt with two blanks typed (the blanks inserted by the page's buttons) and filled, greedy and seeded sampling, the
highlighted spans equal to `glmx fill --json`'s for the same prompt and settings; two candidates scored, the winner
equal to `glmx score --json`'s; a prompt holding <script> and an onerror handler shown as text, nothing run; Stop
frees the row; with --api-key a wrong key shows the API's one-line error and the right key fills; a tiny ChatGLM
folder chats, streamed, equal to `glmx chat`'s turn. Servers are stopped by their PID in `finally`; every wait is
bounded. GLMX_PLAYGROUND_SCREENSHOT=PATH writes the README's screenshot (docs/playground.png) from this run.

Needs Debian's chromium and chromium-driver (.ci/run installs them) and selenium (the dev extra, chosen because it
drives the distribution's own browser through its own driver, offline; Playwright would download browser builds of
its own); skips with the reason when either is missing, fails instead when GLMX_REQUIRE_BROWSER is set (.ci/run)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from tests.test_serve_load import free_port, get, wait_until

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")  # Debian's chromium, chromium-driver
MISSING = (
    "selenium is not installed (pip install -e '.[dev]')"
    if importlib.util.find_spec("selenium") is None
    else "no Chromium and ChromeDriver here (Debian: apt-get install chromium chromium-driver; .ci/run does)"
    if CHROMIUM is None or DRIVER is None
    else None
)
if MISSING is not None:
    if os.environ.get("GLMX_REQUIRE_BROWSER"):  # .ci/run: a reason to skip fails the run instead
        pytest.fail(f"GLMX_REQUIRE_BROWSER is set: {MISSING}", pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.slow

WAIT_S = 60  # the longest any step waits
TWO_BLANKS = ("He went to the ", "[MASK]", " and bought ", "[MASK]", " for dinner.")
SCORE_PROMPT = "The movie was great. It was really [MASK]."
KEY = "s3cret"


def glmx(*args: str) -> dict:
    """One JSON answer of the glmx command line (the reference the page is held to)."""
    out = subprocess.run(
        [sys.executable, "-c", "from glm_runtime.cli import run; run()", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@contextmanager
def glmx_serve(*args: str):
    """A real glmx serve on 127.0.0.1 and a free port, until healthy; stopped by its PID at the end."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from glm_runtime.cli import run; run()", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: proc.poll() is None and json.loads(get(port, "/health"))["status"] == "ok", "healthy")
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,680",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, check, what: str):
    return WebDriverWait(driver, WAIT_S).until(lambda d: check(d), message=f"not within {WAIT_S} s: {what}")


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def typed(driver, element_id: str, text: str) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def opened(driver, port: int) -> None:
    driver.get(f"http://127.0.0.1:{port}/")
    until(driver, lambda d: d.find_element(By.ID, "model-backend").text not in ("", "…"), "model facts")


def fill_on_page(driver, settings: dict[str, str]) -> list[dict]:
    """Type TWO_BLANKS (its blanks by the page's buttons), set the strategy's controls, press Fill: the spans."""
    box = driver.find_element(By.ID, "fill-prompt")
    box.clear()
    for piece in TWO_BLANKS:
        if piece.startswith("["):
            driver.find_element(By.CSS_SELECTOR, f'.insert[data-blank="{piece}"]').click()
        else:
            box.send_keys(piece)
    assert box.get_attribute("value") == "".join(TWO_BLANKS)
    Select(driver.find_element(By.ID, "strategy")).select_by_value(settings.get("strategy", "greedy"))
    for name, value in settings.items():
        if name != "strategy":
            typed(driver, name, value)
    return pressed_fill(driver)


def pressed_fill(driver) -> list[dict]:
    driver.find_element(By.ID, "fill-run").click()
    until(driver, lambda d: d.find_element(By.ID, "fill-output").get_attribute("data-state") != "running", "filled")
    return js(
        driver,
        "return [...document.querySelectorAll('#fill-output mark.span')].map(m => ({text: m.textContent, "
        "token_ids: JSON.parse(m.dataset.tokenIds || 'null'), stop: m.dataset.stop, title: m.title}))",
    )


def shown_error(driver) -> str:
    until(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "an error line")
    return js(driver, "return document.getElementById('error').textContent")


def test_fill_score_xss_and_stop_in_the_browser(browser):
    with glmx_serve("--rows", "2") as port:
        opened(browser, port)
        assert browser.find_element(By.ID, "model-id").text == "glmx-bundled"
        assert browser.find_element(By.ID, "model-arch").text == "glm"
        assert not browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="chat"]').is_displayed()  # not a chat model
        prompt = "".join(TWO_BLANKS)
        for settings, flags in [
            ({"max_new_tokens": "6"}, ["--max-new-tokens", "6"]),
            (
                {"strategy": "sample", "max_new_tokens": "5", "temperature": "0.9", "top_k": "40", "seed": "7"},
                [
                    "--max-new-tokens",
                    "5",
                    "--strategy",
                    "sample",
                    "--temperature",
                    "0.9",
                    "--top-k",
                    "40",
                    "--seed",
                    "7",
                ],
            ),
        ]:
            spans = fill_on_page(browser, settings)
            want = glmx("fill", "--json", prompt, *flags)["spans"]
            assert [(s["text"], s["token_ids"], s["stop"]) for s in spans] == [
                (w["text"], w["token_ids"], w["stop"]) for w in want
            ]
            assert all(f"stop: {w['stop']}" in s["title"] for s, w in zip(spans, want))  # what hovering shows
            stats = browser.find_element(By.ID, "fill-stats").text
            assert "first token" in stats and "tokens/s" in stats, stats
        # each control shows only for its strategy (sample is selected now)
        assert browser.find_element(By.ID, "temperature").is_displayed()
        assert not browser.find_element(By.ID, "num_beams").is_displayed()
        Select(browser.find_element(By.ID, "strategy")).select_by_value("beam")
        assert browser.find_element(By.ID, "num_beams").is_displayed()
        assert not browser.find_element(By.ID, "temperature").is_displayed()
        Select(browser.find_element(By.ID, "strategy")).select_by_value("greedy")
        fill_on_page(browser, {"max_new_tokens": "6"})  # the screenshot's state: two spans highlighted
        shot = os.environ.get("GLMX_PLAYGROUND_SCREENSHOT")
        if shot:
            assert browser.save_screenshot(shot), shot
        scored_on_page(browser)
        no_markup_runs(browser)
        stop_frees_the_row(browser, port)


def scored_on_page(browser) -> None:
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="score"]').click()
    typed(browser, "score-prompt", SCORE_PROMPT)
    boxes = browser.find_elements(By.CSS_SELECTOR, ".candidate")
    for box, text in zip(boxes, (" bad", " good")):
        box.clear()
        box.send_keys(text)
    browser.find_element(By.ID, "score-run").click()
    output = browser.find_element(By.ID, "score-output")
    until(browser, lambda d: output.get_attribute("data-state") == "done", "scored")
    want = glmx("score", "--json", SCORE_PROMPT, "-c", " bad", "-c", " good")
    winner = js(browser, "return document.querySelector('#score-output li.winner .cand-text').textContent")
    assert winner == want["winner"]
    # the bars: each candidate's share of the softmax of glmx score's scores, as drawn (CSP allows CSSOM widths)
    drawn = js(
        browser,
        "return [...document.querySelectorAll('#score-output .bar > div')]"
        ".map(d => d.offsetWidth / d.parentElement.offsetWidth)",
    )
    weights = [math.exp(c["score"]) for c in want["candidates"]]
    assert drawn == pytest.approx([w / sum(weights) for w in weights], abs=0.01)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#score-output li.winner")) == 1


def no_markup_runs(browser) -> None:
    """A prompt (and a candidate) holding markup stays text: no element made of it, no script run, no alert."""
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="fill"]').click()
    evil = '<script>alert(1)</script> <img src=x onerror="window.pwned=1;alert(2)"> [MASK] <b>bold</b>'
    typed(browser, "fill-prompt", evil)
    typed(browser, "max_new_tokens", "3")
    spans = pressed_fill(browser)
    assert len(spans) == 1
    shown = js(browser, "return document.getElementById('fill-output').textContent")
    assert shown.startswith('<script>alert(1)</script> <img src=x onerror="window.pwned=1;alert(2)"> ')
    assert shown.endswith(" <b>bold</b>")
    tags = js(browser, "return [...document.querySelectorAll('#fill-output *')].map(e => e.tagName)")
    assert tags == ["MARK"]
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="score"]').click()
    box = browser.find_elements(By.CSS_SELECTOR, ".candidate")[0]
    box.clear()
    box.send_keys("<img src=y onerror=window.pwned=2>")
    browser.find_element(By.ID, "score-run").click()
    output = browser.find_element(By.ID, "score-output")
    until(browser, lambda d: output.get_attribute("data-state") == "done", "scored")
    assert "<img src=y onerror=window.pwned=2>" in js(browser, "return arguments[0].textContent", output)
    assert js(browser, "return document.querySelectorAll('img, script:not([src]), b').length") == 0
    assert js(browser, "return window.pwned === undefined")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="fill"]').click()


def cancelled(port: int) -> float:
    for line in get(port, "/metrics").splitlines():
        if line.startswith("glmx:requests_total{") and 'outcome="cancelled"' in line:
            return float(line.split()[-1])
    return 0.0


def stop_frees_the_row(browser, port: int) -> None:
    """A long continuation stopped after its first tokens: the request is cancelled and its row freed. (Sampled
    at temperature 3, seed 1: it runs to its 400-token budget, ~10 s here, where greedy ends at eos in 35.)"""
    before = cancelled(port)
    typed(browser, "fill-prompt", "A long time ago, in a small village near the sea, there lived [gMASK]")
    Select(browser.find_element(By.ID, "strategy")).select_by_value("sample")
    for name, value in (("max_new_tokens", "400"), ("temperature", "3"), ("top_k", "0"), ("seed", "1")):
        typed(browser, name, value)
    browser.find_element(By.ID, "fill-run").click()
    until(
        browser,
        lambda d: js(d, "return document.querySelector('#fill-output mark.span').textContent.length > 0"),
        "a token",
    )
    browser.find_element(By.ID, "fill-stop").click()
    output = browser.find_element(By.ID, "fill-output")
    until(browser, lambda d: output.get_attribute("data-state") == "stopped", "stopped")
    wait_until(lambda: cancelled(port) == before + 1, "the request cancelled", WAIT_S)
    wait_until(lambda: json.loads(get(port, "/health"))["running"] == 0, "its row free", WAIT_S)


def test_a_wrong_api_key_shows_the_apis_one_line_error(browser):
    with glmx_serve("--api-key", KEY) as port:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/fill", b'{"prompt": "a [MASK]"}', {"Authorization": "Bearer nope"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=WAIT_S)
        said = json.loads(refused.value.read())["error"]["message"]
        browser.get(f"http://127.0.0.1:{port}/")
        assert shown_error(browser) == said  # /v1/models without a key: the page asks for it
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed()
        key.send_keys("nope\t")
        typed(browser, "fill-prompt", "The capital of France is [MASK].")
        typed(browser, "max_new_tokens", "4")
        js(browser, "document.getElementById('error').hidden = true")
        assert pressed_fill(browser)[0]["token_ids"] is None
        assert shown_error(browser) == said and "\n" not in said
        key.clear()
        key.send_keys(KEY + "\t")
        until(
            browser, lambda d: d.find_element(By.ID, "model-backend").text == "onnxruntime", "model facts with the key"
        )
        spans = pressed_fill(browser)
        want = glmx("fill", "--json", "The capital of France is [MASK].", "--max-new-tokens", "4")["spans"]
        assert [s["text"] for s in spans] == [w["text"] for w in want]
        assert js(browser, "return localStorage.length + sessionStorage.length + document.cookie.length") == 0


def test_chat_tab_streams_the_answer_glmx_chat_gives(browser, tmp_path):
    from glm_runtime.chat import chat_settings
    from glm_runtime.chat_cli import Turns
    from glm_runtime.session import open_model
    from tests.test_chat import QUESTIONS, _folder

    _, onnx = _folder(tmp_path, "chatglm-6b")
    session, tok = open_model(onnx)
    rule = session.config.arch.chat
    turns = Turns(session, tok, rule, None, 6, chat_settings(rule, 0, None, None))
    want = [turns.ask(QUESTIONS[k], lambda t: None)["answer"] for k in range(2)]
    session.close()
    with glmx_serve("--model", str(onnx)) as port:
        opened(browser, port)
        assert browser.find_element(By.ID, "model-arch").text == "chatglm-6b"
        browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="chat"]').click()
        typed(browser, "chat-max-tokens", "6")
        typed(browser, "chat-temperature", "0")
        for k in range(2):  # two rounds: the second carries the first as history
            typed(browser, "chat-input", QUESTIONS[k])
            browser.find_element(By.ID, "chat-send").click()
            until(browser, lambda d: d.find_element(By.ID, "chat-send").is_enabled(), "answered")
        shown = js(browser, "return [...document.querySelectorAll('#conversation li')].map(li => li.textContent)")
        assert shown == [QUESTIONS[0], want[0], QUESTIONS[1], want[1]]
