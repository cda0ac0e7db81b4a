"""runtime/playground.py in-process (Starlette's test client): the page and its files are served with a policy that
lets the browser load nothing from another host and run no inline script, the page's script never writes markup,
--no-ui leaves the page out, POST /v1/score answers what score_candidates (glmx score) gives, its refusals are one
line, and GET /v1/models names what the page shows. The page in a real browser: tests/test_playground_browser.py."""

from __future__ import annotations

import math
import re
import time
from importlib import resources

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from starlette.testclient import TestClient

from glm_runtime.playground import PAGE_FILES
from glm_runtime.score import score_candidates
from glm_runtime.serve import create_app
from glm_runtime.session import open_model

WAIT_S = 30
PROMPT = "The movie was great. It was really [MASK]."


@pytest.fixture(scope="module")
def model():
    return open_model(None, "onnxruntime")


def started(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    deadline = time.monotonic() + WAIT_S
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, f"not healthy within {WAIT_S} s"
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(model):
    c = started(create_app(lambda: model, model_id="tiny", rows=2, max_waiting=4))
    yield c
    c.__exit__(None, None, None)


def page_text(name: str) -> str:
    return resources.files("glm_runtime").joinpath("ui").joinpath(name).read_text(encoding="utf-8")


def test_the_page_and_its_files_are_served_with_a_same_origin_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.text == page_text("index.html")
    # every file the page loads is one of the served ones, on this server
    wanted = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(wanted) == ["/ui/app.js", "/ui/style.css"]
    for path in wanted:
        answer = client.get(path)
        assert answer.status_code == 200 and answer.text == page_text(path.split("/")[-1])
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/../serve.py").status_code == 404 and client.get("/ui/index.htm").status_code == 404


def test_the_page_fetches_nothing_from_another_host_and_never_writes_markup():
    for name in PAGE_FILES:
        text = page_text(name)
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} names another host"
        assert "@import" not in text and "url(" not in text
    script = page_text("app.js")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"app.js uses {sink}"
    for store in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
        assert store not in script, f"app.js stores something outside the tab: {store}"


def test_no_ui_serves_the_api_alone(model):
    c = started(create_app(lambda: model, ui=False))
    try:
        answer = c.get("/")
        assert answer.status_code == 404 and "routes:" in answer.json()["error"]["message"]
        assert "GET /ui/app.js" not in answer.json()["error"]["message"]
        assert c.get("/ui/app.js").status_code == 404
        assert c.post("/v1/score", json={"prompt": PROMPT, "candidates": [" good"]}).status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_score_route_equals_score_candidates(client, model):
    session, tok = model
    candidates = [" good", " bad", " a long and winding answer"]
    for penalty in (0.0, 1.0):
        want = score_candidates(session, tok, PROMPT, candidates, length_penalty=penalty)
        got = client.post("/v1/score", json={"prompt": PROMPT, "candidates": candidates, "length_penalty": penalty})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["prompt"] == PROMPT
        assert [c["text"] for c in body["candidates"]] == candidates
        for c, w in zip(body["candidates"], want):
            assert c["token_ids"] == w.token_ids and c["length"] == w.length
            assert c["score"] == pytest.approx(w.score, abs=1e-9)
        assert body["winner"] == max(want, key=lambda c: c.score).text
        # the page's bars: the softmax of the scores among the candidates
        z = [math.exp(w.score) for w in want]
        for c, p in zip(body["candidates"], z):
            assert c["probability"] == pytest.approx(p / sum(z), rel=1e-9)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "no blank here", "candidates": [" a"]}, "the prompt has no blank"),
        ({"prompt": PROMPT, "candidates": []}, '"candidates" must be a non-empty list of strings'),
        ({"prompt": PROMPT, "candidates": [" a", 3]}, '"candidates" must be a non-empty list of strings'),
        ({"prompt": PROMPT, "candidates": [" a"] * 65}, "send at most 64"),
        ({"prompt": 5, "candidates": [" a"]}, '"prompt" must be a string'),
        ({"prompt": PROMPT, "candidates": [" a"], "length_penalty": "1"}, '"length_penalty" must be a finite'),
        ({"prompt": PROMPT, "candidates": [" a"], "single_token": 1}, '"single_token" must be true or false'),
        ({"prompt": PROMPT, "candidates": [" a"], "top_k": 3}, "unknown field 'top_k'"),
    ],
)
def test_score_route_refuses_a_bad_body_in_one_line(client, body, message):
    answer = client.post("/v1/score", json=body)
    assert answer.status_code == 400
    said = answer.json()["error"]["message"]
    assert message in said and "\n" not in said


def test_score_route_needs_the_api_key_and_models_names_what_the_page_shows(model):
    with TestClient(create_app(lambda: model, api_key="s3cret")) as c:
        deadline = time.monotonic() + WAIT_S
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = c.post("/v1/score", json={"prompt": PROMPT, "candidates": [" good"]})
        assert refused.status_code == 401 and refused.json()["error"]["message"].startswith("missing or wrong API key")
        assert c.get("/").status_code == 200  # the page itself is public: it asks for the key
        key = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/score", json={"prompt": PROMPT, "candidates": [" good"]}, headers=key).status_code == 200
        facts = c.get("/v1/models", headers=key).json()["data"][0]["glmx"]
    assert facts["architecture"] == "glm" and facts["backend"] == "onnxruntime" and facts["chat"] is False
    assert facts["precision"] == model[0].precision


def test_the_page_ships_as_package_data_and_adds_no_dependency():
    """Every file of runtime/ui is matched by glm_runtime's package-data (a built wheel holds it: checked by hand,
    `pip wheel --no-deps .` lists glm_runtime/ui/app.js, index.html, style.css), and the playground module imports
    only the standard library and glm_runtime at the top (starlette inside its functions, as serve.py does)."""
    import ast
    import fnmatch
    import sys
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["glm_runtime"]
    files = sorted(p.relative_to(root / "runtime").as_posix() for p in (root / "runtime" / "ui").iterdir())
    assert files == [f"ui/{name}" for name in sorted(PAGE_FILES)]
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
    tree = ast.parse((root / "runtime" / "playground.py").read_text())
    top = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert top - {"__future__", "glm_runtime"} <= set(sys.stdlib_module_names), top


def test_a_request_that_meets_a_stopping_engine_is_503_not_400(model):
    """The race of a request with a stopping engine (SIGTERM's drain, or glmx serve --stages' watchdog stopping the
    engine of a dead stage): the engine is still alive when the route looks, then refuses the submit. That is the
    server's state, not the request's fault: 503 with the engine's one line, on the fill and the score routes."""
    c = started(create_app(lambda: model, model_id="tiny", rows=2, max_waiting=4))
    try:
        c.app.state.glmx.loop._stopping = True  # what EngineLoop.stop sets before the thread ends
        fill = c.post("/v1/completions", json={"prompt": "a [MASK] b", "max_tokens": 2})
        score = c.post("/v1/score", json={"prompt": "a [MASK] b", "candidates": ["x", "y"]})
        for answer in (fill, score):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["message"] == "the server is shutting down"
    finally:
        c.app.state.glmx.loop._stopping = False
        c.__exit__(None, None, None)
