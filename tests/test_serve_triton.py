"""docs/examples/pytriton_glmx.py: the engine behind NVIDIA Triton (KServe v2 over HTTP) with PyTriton. Runs where
nvidia-pytriton is installed (not in glmx's extras: it ships a ~200 MB Triton server); skipped elsewhere.

.ci/run runs it in a venv of Debian's /usr/bin/python3.11 (3.11.2) with nvidia-pytriton and a non-editable glmx,
with GLMX_REQUIRE_TRITON=1: there a reason to skip fails the module instead."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def _skip(reason: str) -> None:
    if os.environ.get("GLMX_REQUIRE_TRITON") == "1":
        pytest.fail(f"GLMX_REQUIRE_TRITON=1, yet the Triton test would skip: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import pytriton
except ImportError:
    pytriton = None
if pytriton is None:
    _skip("nvidia-pytriton is not installed (pip install nvidia-pytriton)")
if sys.version_info[:2] == (3, 11) and sys.version_info[2] >= 6:  # seen here with nvidia-pytriton 0.7.0
    _skip(
        "PyTriton's Python stub fails to start on CPython 3.11.6+ ('_thread.RLock' object has no attribute "
        "'_recursion_count', triton-inference-server/pytriton#51); .ci/run runs this test on Debian's 3.11.2"
    )

from tests.serve_helpers import concurrently, mixed_request, one_by_one

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "pytriton_glmx.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _infer(port: int, prompt: str, max_new: int) -> dict:
    body = {
        "inputs": [
            {"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [prompt]},
            {"name": "MAX_NEW_TOKENS", "shape": [1], "datatype": "INT32", "data": [max_new]},
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/glmx/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return {o["name"]: o["data"][0] for o in json.loads(response.read())["outputs"]}


def test_triton_answers_equal_one_by_one_and_a_bad_prompt_gets_glmx_message():
    spec = importlib.util.spec_from_file_location("pytriton_glmx", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ports = [_free_port() for _ in range(3)]
    ready, stop, failed = threading.Event(), threading.Event(), []

    def run():
        try:
            example.serve(None, 4, *ports, ready=ready, stop=stop)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            failed.append(exc)
            ready.set()

    server = threading.Thread(target=run, daemon=True)
    server.start()
    try:
        assert ready.wait(180) and not failed, failed
        replies: dict[int, dict] = {}

        def ask(i):
            replies[i] = _infer(ports[0], *mixed_request(i))

        concurrently(ask, 8)
        for i, alone in enumerate(one_by_one(8)):
            assert replies[i]["TEXT"] == alone.text
            assert [s["token_ids"] for s in json.loads(replies[i]["SPANS"])] == [s.token_ids for s in alone.spans]
        with pytest.raises(urllib.error.HTTPError) as bad:
            _infer(ports[0], "no blank here", 4)
        assert "blank" in bad.value.read().decode()
    finally:
        stop.set()
        server.join(60)
