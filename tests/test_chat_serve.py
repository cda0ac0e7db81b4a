"""A real `glmx serve` on 127.0.0.1 serving a tiny ChatGLM folder: 8 clients at once hold two-round conversations on
POST /v1/chat/completions (greedy and seeded sampling, some streamed), and every answer equals what `glmx chat`'s
turns give one by one; the server's metrics count the chat requests. Stopped by its PID in `finally`; every wait is
bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from tests.test_chat import QUESTIONS, _folder
from tests.test_serve_load import free_port, get, wait_until

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

CLIENTS = 8


def chat(port: int, body: dict) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read().decode()
    if not body.get("stream"):
        return json.loads(raw)["choices"][0]["message"]["content"]
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def settings_of(client: int) -> dict:
    return {"temperature": 0} if client % 2 == 0 else {"seed": 100 + client}  # odd: chat()'s sampling, seeded


def test_eight_clients_chat_at_once_and_get_their_one_by_one_answers(tmp_path):
    from glm_runtime.chat import chat_settings
    from glm_runtime.chat_cli import Turns
    from glm_runtime.session import open_model

    _, onnx = _folder(tmp_path, "chatglm-6b")
    session, tok = open_model(onnx)
    rule = session.config.arch.chat
    want = {}
    for c in range(CLIENTS):  # glmx chat's turns, one conversation after another
        s = settings_of(c)
        turns = Turns(session, tok, rule, None, 6, chat_settings(rule, s.get("temperature"), None, s.get("seed")))
        want[c] = [turns.ask(QUESTIONS[(c + k) % 3], lambda t: None)["answer"] for k in range(2)]
    session.close()
    port = free_port()
    args = ["serve", "--model", str(onnx), "--port", str(port), "--rows", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from glm_runtime.cli import run; run()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    got: dict[int, list[str]] = {}
    errors: list[str] = []

    def client(c: int) -> None:
        try:
            messages: list[dict] = []
            answers = []
            for k in range(2):
                messages.append({"role": "user", "content": QUESTIONS[(c + k) % 3]})
                body = {"messages": messages, "max_tokens": 6, "stream": c % 4 == 1, **settings_of(c)}
                answers.append(chat(port, body))
                messages.append({"role": "assistant", "content": answers[-1]})
            got[c] = answers
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"client {c}: {exc}")

    try:
        wait_until(lambda: json.loads(get(port, "/health"))["status"] == "ok", "glmx serve healthy")
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert got == want
        finished = [line for line in get(port, "/metrics").splitlines() if line.startswith("glmx:requests_total{")]
        assert sum(float(line.split()[-1]) for line in finished if 'outcome="finished"' in line) == 2 * CLIENTS
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
