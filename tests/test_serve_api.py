"""runtime/serve.py in-process (Starlette's test client, no socket): both routes' schemas as JSON and as
server-sent events, answers equal to fill_blanks, statuses 400 / 401 / 404 / 429 / 503, every metric name.
Every wait is bounded."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from starlette.testclient import TestClient

from glm_runtime.generate import fill_blanks
from glm_runtime.metrics import METRIC_NAMES
from glm_runtime.serve import create_app
from glm_runtime.session import open_model

WAIT_S = 30  # the longest any test waits for the server to reach a state


@pytest.fixture(scope="module")
def model():
    return open_model(None, "onnxruntime")


def wait_until(check, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"not reached within {WAIT_S} s: {what}")


def started(app):
    client = TestClient(app)
    client.__enter__()
    wait_until(lambda: client.get("/health").status_code == 200, "health 200")
    return client


@pytest.fixture(scope="module")
def client(model):
    c = started(create_app(lambda: model, model_id="tiny", rows=4, max_waiting=8))
    yield c
    c.__exit__(None, None, None)


def alone(model, prompt, **settings):
    session, tok = model
    (result,) = fill_blanks(session, tok, [prompt], **settings)
    return result


def sse_events(response):
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [c for c in response.text.split("\n\n") if c.strip()]
    assert all(c.startswith("data: ") for c in chunks)
    assert chunks[-1] == "data: [DONE]"
    return [json.loads(c[len("data: ") :]) for c in chunks[:-1]]


def test_completion_schema_and_answer(client, model):
    prompt = "He went to the [MASK] and bought [MASK] for dinner."
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason", "glmx"}
    want = alone(model, prompt, max_new_tokens=6)
    assert choice["glmx"]["text"] == want.text
    assert [s["token_ids"] for s in choice["glmx"]["spans"]] == [s.token_ids for s in want.spans]
    assert choice["text"] == "".join(s.text for s in want.spans)
    assert choice["finish_reason"] == ("length" if any(s.stop == "length" for s in want.spans) else "stop")
    usage = body["usage"]
    assert usage["completion_tokens"] == sum(len(s.token_ids) for s in want.spans)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_suffix_echo_lists_and_continuation(client, model):
    r = client.post(
        "/v1/completions",
        json={"prompt": "The capital of France is", "suffix": ". It is big.", "max_tokens": 5, "echo": True},
    ).json()
    want = alone(model, "The capital of France is[MASK]. It is big.", max_new_tokens=5)
    assert r["choices"][0]["text"] == want.text  # echo: the filled text
    r = client.post(
        "/v1/completions", json={"prompt": ["Once upon a time", "Water boils at [MASK] degrees."], "max_tokens": 4}
    ).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    cont = alone(model, "Once upon a time", max_new_tokens=4, append_gmask=True)  # no blank: continued
    assert r["choices"][0]["glmx"]["text"] == cont.text
    assert r["choices"][1]["glmx"]["text"] == alone(model, "Water boils at [MASK] degrees.", max_new_tokens=4).text


def test_seeded_sampling_equals_one_by_one(client, model):
    prompt = "She said that [MASK] would come."
    r = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 6, "temperature": 0.8, "seed": 11, "glmx": {"top_k": 40}},
    ).json()
    want = alone(model, prompt, max_new_tokens=6, strategy="sample", temperature=0.8, seed=11, top_k=40)
    assert r["choices"][0]["glmx"]["text"] == want.text


def test_completion_stream(client, model):
    prompt = "Once upon a time [gMASK]"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "stream": True})
    events = sse_events(r)
    want = alone(model, prompt, max_new_tokens=6)
    tokens = [e["choices"][0]["glmx"]["token_id"] for e in events if "token_id" in e["choices"][0].get("glmx", {})]
    assert tokens == want.spans[0].token_ids
    assert "".join(e["choices"][0]["text"] for e in events) == want.spans[0].text
    last = events[-1]["choices"][0]
    assert last["finish_reason"] in ("stop", "length") and last["glmx"]["text"] == want.text
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_fill_route_json_and_stream(client, model):
    prompt = "The [sMASK] was very good."
    body = {"prompt": prompt, "max_new_tokens": 5, "strategy": "beam", "num_beams": 2}
    r = client.post("/v1/fill", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = alone(model, prompt, max_new_tokens=5, strategy="beam", num_beams=2)
    assert set(got) == {"prompt", "text", "spans", "tokens", "timings"}  # glmx fill --json's keys
    assert got["prompt"] == prompt and got["tokens"] == want.tokens and got["text"] == want.text
    events = sse_events(client.post("/v1/fill", json={**body, "stream": True}))
    assert [e["kind"] for e in events][-2:] == ["span", "result"]
    assert events[-1]["tokens"] == want.tokens


def test_stop_strings_cut_the_answer_on_both_routes_streamed_or_not(client, model):
    """A span ends where its text first holds a stop string, which is not returned; the reason is "stop"."""
    prompt = "The capital of France is"
    whole = alone(model, prompt + " [gMASK]", max_new_tokens=8).spans[0].text
    stop = whole[len(whole) // 2 :][:3]  # a string from the middle of the unstopped answer
    want = whole[: whole.find(stop)]
    body = {"prompt": prompt, "max_tokens": 8, "stop": [stop, "never appears"]}
    r = client.post("/v1/completions", json=body)
    (choice,) = r.json()["choices"]
    assert choice["text"] == want and choice["finish_reason"] == "stop", (whole, stop, choice)
    chunks = sse_events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/fill", json={"prompt": prompt + " [gMASK]", "max_new_tokens": 8, "stop": stop})
    (span,) = r.json()["spans"]
    assert span["text"] == want and span["stop"] == "stop" and r.json()["text"] == prompt + want


@pytest.mark.parametrize(
    "route,body,message",
    [
        ("/v1/completions", {"prompt": "a [MASK]", "n": 2}, "n=2 is not supported"),
        ("/v1/completions", {"prompt": "a [MASK]", "logprobs": 1}, "logprobs=1 is not supported"),
        ("/v1/completions", {"prompt": "a [MASK]", "best_of": 3}, "best_of=3"),
        ("/v1/completions", {"prompt": "a [MASK]", "stop": [""]}, "stop must be a string or a list of non-empty"),
        ("/v1/completions", {"prompt": "a [MASK]", "stop": list("abcde")}, "stop takes at most 4 strings"),
        ("/v1/completions", {"prompt": "a [MASK]", "stop": "x", "glmx": {"strategy": "beam"}}, "stop applies to"),
        ("/v1/completions", {"prompt": "a [MASK]", "frequency_penalty": 0.5}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "a [MASK]", "temprature": 0.5}, "unknown field 'temprature'"),
        ("/v1/completions", {"prompt": "a [MASK]", "seed": 3}, "seed applies to sampling"),
        ("/v1/completions", {"prompt": "a [MASK]", "echo": True, "stream": True}, "echo with stream"),
        ("/v1/completions", {"prompt": 3}, '"prompt" must be a string'),
        ("/v1/completions", {"prompt": "a [MASK]", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ("/v1/completions", {"prompt": "word " * 600 + "[MASK]"}, "too long for the model"),
        ("/v1/fill", {"prompt": "no blank here"}, "no blank to fill"),
        ("/v1/fill", {"prompt": "a [MASK]", "num_beams": 2}, "--num-beams applies to --strategy beam"),
        ("/v1/fill", {"prompt": "a [MASK]", "temp": 2}, "unknown field 'temp'"),
        ("/v1/fill", {"text": "a [MASK]"}, "unknown field 'text'"),
    ],
)
def test_bad_requests_answer_400_with_glmx_message(client, route, body, message):
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_not_json_404s_and_models(client):
    r = client.post("/v1/fill", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a [MASK]"})
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["glmx"]["max_sequence_length"] == 512


def test_every_metric_is_exported(client):
    client.post("/v1/completions", json={"prompt": "a [MASK]", "max_tokens": 3})
    text = client.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"\n{name}" in "\n" + text or text.startswith(name), name
    finished = [line for line in text.splitlines() if line.startswith('glmx:requests_total{outcome="finished"}')]
    assert float(finished[0].split()[-1]) >= 1
    assert 'glmx:requests_total{outcome="invalid"}' in text


class Slow:
    """The bundled session, slowed per call, so a request stays running while the test looks."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, feeds):
        time.sleep(self.delay)
        return self.inner.run(feeds)


def test_full_server_answers_429_with_retry_after(model):
    session, tok = model
    client = started(create_app(lambda: (Slow(session, 0.02), tok), rows=1, max_waiting=0))
    try:
        holder = threading.Thread(
            target=client.post,
            args=("/v1/completions",),
            kwargs={"json": {"prompt": "Once upon a time", "max_tokens": 60}},
        )
        holder.start()
        wait_until(lambda: client.get("/health").json()["running"] == 1, "one running request")
        r = client.post("/v1/completions", json={"prompt": "a [MASK]", "max_tokens": 3})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["error"]["message"]
        holder.join(WAIT_S)
        assert 'glmx:requests_total{outcome="rejected"} 1.0' in client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)


def test_503_while_loading_and_after_a_failed_load(model):
    release = threading.Event()

    def load():
        release.wait(WAIT_S)
        return model

    client = TestClient(create_app(load))
    with client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "a [MASK]"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        wait_until(lambda: client.get("/health").status_code == 200, "loaded")

    def broken():
        raise FileNotFoundError("no model.onnx here")

    with TestClient(create_app(broken)) as client:
        wait_until(lambda: client.get("/health").json()["status"] == "error", "load failed")
        assert client.get("/health").status_code == 503
        r = client.post("/v1/fill", json={"prompt": "a [MASK]"})
        assert r.status_code == 503 and "no model.onnx here" in r.json()["error"]["message"]


def test_503_after_the_engine_died(model):
    session, tok = model

    class Dying(Slow):
        def run(self, feeds):
            if feeds["input_ids"].shape[1] == 1:
                raise RuntimeError("device lost")
            return self.inner.run(feeds)

    client = started(create_app(lambda: (Dying(session, 0), tok)))
    try:
        r = client.post("/v1/fill", json={"prompt": "a [MASK]"})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        assert client.post("/v1/fill", json={"prompt": "a [MASK]"}).status_code == 503
    finally:
        client.__exit__(None, None, None)


def test_api_key(model):
    with TestClient(create_app(lambda: model, api_key="s3cret")) as client:
        wait_until(lambda: client.get("/health").status_code == 200, "loaded")
        assert client.post("/v1/fill", json={"prompt": "a [MASK]"}).status_code == 401
        ok = client.post(
            "/v1/fill", json={"prompt": "a [MASK]", "max_new_tokens": 2}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200


def test_timeout_answers_504_and_frees_the_row(model):
    session, tok = model
    client = started(create_app(lambda: (Slow(session, 0.02), tok), timeout=0.3))
    try:
        r = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 200})
        assert r.status_code == 504 and "--timeout 0.3 s" in r.json()["error"]["message"]
        wait_until(lambda: 'glmx:requests_total{outcome="timeout"} 1.0' in client.get("/metrics").text, "counted")
        assert client.get("/health").json()["running"] == 0
    finally:
        client.__exit__(None, None, None)


def test_stream_of_a_prompt_list_tags_each_choice(client, model):
    prompts = ["Water boils at [MASK] degrees.", "The capital of France is [MASK]."]
    events = sse_events(client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 4, "stream": True}))
    for i, prompt in enumerate(prompts):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        want = alone(model, prompt, max_new_tokens=4)
        assert [c["glmx"]["token_id"] for c in mine if "token_id" in c.get("glmx", {})] == want.spans[0].token_ids
        assert mine[-1]["finish_reason"] in ("stop", "length") and mine[-1]["glmx"]["text"] == want.text


def test_glmx_serve_help_and_a_bad_option():
    from click.testing import CliRunner

    from glm_runtime.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0 and "/v1/completions" in result.output and "--max-waiting" in result.output
    result = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert result.exit_code == 1 and "--port" in result.output


# ---------------------------------------------------------------- a server that one request cannot sink


@pytest.fixture(scope="module")
def guarded(model):
    """4 rows, 2 may wait, a 4 KiB body limit: small enough to reach every bound from a test."""
    c = started(create_app(lambda: model, rows=4, max_waiting=2, max_body=4096))
    yield c
    c.__exit__(None, None, None)


@pytest.mark.parametrize(
    "route,body,status,message",
    [
        # JSON booleans only: a string "false" is not false
        ("/v1/completions", {"prompt": "a [MASK]", "echo": "false"}, 400, '"echo" and "stream" must be true or false'),
        ("/v1/fill", {"prompt": "a [MASK]", "append_gmask": "false"}, 400, '"append_gmask" must be true or false'),
        ("/v1/fill", {"prompt": "a [MASK]", "stream": 1}, 400, '"stream" must be true or false'),
        ("/v1/completions", {"prompt": "a [MASK]", "n": True}, 400, "n=true is not supported"),
        ("/v1/completions", {"prompt": "a [MASK]", "presence_penalty": False}, 400, "presence_penalty=false"),
        ("/v1/completions", {"prompt": "a [MASK]", "model": 7}, 400, '"model" must be a string'),
        ("/v1/completions", {"prompt": "a [MASK]", "user": ["x"]}, 400, '"user" must be a string'),
        # beams take rows: more than the server's rows can never run
        ("/v1/fill", {"prompt": "a [MASK]", "strategy": "beam", "num_beams": 10000}, 400, "num_beams 10000 is more"),
        # more prompts than rows + waiting can never be admitted: 400, not 429 (a client would retry for ever)
        ("/v1/completions", {"prompt": ["a [MASK]"] * 7, "max_tokens": 2}, 400, "7 prompts"),
        # a list's bad prompt is named by its index in the list, not the server's request counter
        ("/v1/completions", {"prompt": ["a [MASK]", "word " * 600 + "[MASK]"]}, 400, "prompt 1 is too long"),
    ],
)
def test_hostile_requests_are_refused_with_their_reason(guarded, route, body, status, message):
    r = guarded.post(route, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_a_body_over_the_limit_answers_413_before_it_is_read(guarded):
    r = guarded.post("/v1/fill", content=b'{"prompt": "' + b"a" * 5000 + b' [MASK]"}')
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    chunked = guarded.post("/v1/fill", content=iter([b'{"prompt": "', b"a" * 5000, b' [MASK]"}']))  # no length
    assert chunked.status_code == 413


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing(model, monkeypatch):
    """The bound is max_sequence_length x the longest token's characters: no longer text can fit."""
    session, tok = model
    client = started(create_app(lambda: model, max_body=1 << 22))
    try:
        bound = session.config.max_sequence_length * tok.longest_token_chars
        calls = []
        monkeypatch.setattr(type(tok), "encode", lambda self, text: calls.append(len(text)) or [])
        r = client.post("/v1/fill", json={"prompt": "a" * (bound + 1) + " [MASK]"})
        assert r.status_code == 400 and f"more than {bound} characters" in r.json()["error"]["message"]
        assert calls == []
    finally:
        client.__exit__(None, None, None)


def test_an_empty_api_key_is_refused_at_start(model):
    from glm_runtime.serve import ServeError

    with pytest.raises(ServeError, match="--api-key is empty"):
        create_app(lambda: model, api_key="")
    with pytest.raises(ServeError, match="--api-key is empty"):
        create_app(lambda: model, api_key="  ")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_glmx_serve_refuses_an_empty_key_in_one_line(how):
    from click.testing import CliRunner

    from glm_runtime.cli import main

    args, env = (["serve", "--api-key", ""], {}) if how == "option" else (["serve"], {"GLMX_API_KEY": ""})
    result = CliRunner().invoke(main, [*args, "--port", "1"], env=env)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "Error: --api-key is empty (an unset variable?): give the key, or leave the option and GLMX_API_KEY out "
        "to serve without one"
    ]
