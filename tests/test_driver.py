"""One driver: every way a prompt reaches the engine goes through Engine.run. Each entry point runs on the bundled
model with Engine.run wrapped; the wrapper records what each call yielded, and a test fails when an entry point
steps the engine some other way (its results would then not pass through the wrapper)."""

from __future__ import annotations

import json
import time

import pytest

from glm_runtime.engine import Engine
from glm_runtime.session import open_model

PROMPT = "The capital of France is [MASK]."


@pytest.fixture(scope="module")
def bundled():
    return open_model(None)


@pytest.fixture
def driven(monkeypatch):
    """Engine.run wrapped: the list of calls, each the list of event kinds it yielded."""
    calls: list[list[str]] = []
    run = Engine.run

    def recording(self, *args, **kwargs):
        kinds: list[str] = []
        calls.append(kinds)
        for event in run(self, *args, **kwargs):
            kinds.append(event.kind)
            yield event

    monkeypatch.setattr(Engine, "run", recording)
    return calls


def test_fill_blanks_and_stream_blanks_go_through_the_driver(bundled, driven):
    from glm_runtime.generate import fill_blanks, stream_blanks

    session, tok = bundled
    results = fill_blanks(session, tok, [PROMPT, "a [MASK] b"], max_new_tokens=3)
    assert len(driven) == 1 and driven[0].count("result") == 2 and len(results) == 2
    events = list(stream_blanks(session, tok, [PROMPT], max_new_tokens=3, strategy="beam", num_beams=2))
    assert len(driven) == 2 and driven[1] == [e.kind for e in events] and driven[1][-1] == "result"


def test_scoring_and_classify_go_through_the_driver(bundled, driven):
    from glm_runtime.score import classify, score_candidates

    session, tok = bundled
    scores = score_candidates(session, tok, PROMPT, [" Paris", " London"])
    assert driven == [["scores"]] and len(scores) == 2
    result = classify(session, tok, [{"text": "good"}], "{text} [MASK]", {"a": " yes", "b": " no"})
    assert driven[1] == ["scores"] and result["predictions"][0]["label"] in ("a", "b")


@pytest.mark.parametrize("how", ["argument", "stdin", "jsonl"])
def test_glmx_fill_goes_through_the_driver(driven, how, tmp_path):
    from click.testing import CliRunner

    from glm_runtime.cli import main

    args, given = ["fill", "--max-new-tokens", "3"], None
    if how == "argument":
        args.append(PROMPT)
    elif how == "stdin":
        args.append("--stdin")
        given = f"{PROMPT}\na [MASK] b\n"
    else:
        path = tmp_path / "in.jsonl"
        path.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps("a [MASK] b") + "\n", encoding="utf-8")
        args += ["--jsonl", str(path)]
    result = CliRunner().invoke(main, args, input=given)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(driven) == 1 and driven[0].count("result") == len(lines) == (1 if how == "argument" else 2)


def test_glmx_score_goes_through_the_driver(driven):
    from click.testing import CliRunner

    from glm_runtime.cli import main

    result = CliRunner().invoke(main, ["score", PROMPT, "-c", " Paris", "-c", " London"])
    assert result.exit_code == 0, result.output
    assert driven == [["scores"]]


def test_the_server_goes_through_the_driver(bundled, driven):
    """The server's engine thread is one Engine.run call for the life of the app; a fill and a completion answered
    over HTTP are results that call yielded."""
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from glm_runtime.serve import create_app

    with TestClient(create_app(lambda: bundled, rows=2)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.post("/v1/fill", json={"prompt": PROMPT, "max_new_tokens": 3}).status_code == 200
        assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}).status_code == 200
    assert len(driven) == 1 and driven[0].count("result") == 2
