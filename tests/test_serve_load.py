"""A real `glmx serve` process on 127.0.0.1 and a free port, driven as users drive it: 8 clients x 25 requests
with mixed blanks, lengths and routes, each answer equal to its one-by-one answer, decode calls shared (mean
batch > 1); a client that hangs up frees its row; SIGTERM lets a running request finish, then the process
exits 0. The server is stopped by PID in `finally`; every wait is bounded."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from glm_runtime.generate import fill_blanks
from glm_runtime.session import open_model

CLIENTS, PER_CLIENT = 8, 25
START_S, REQUEST_S = 90, 60  # bounds: server start, one request
PROMPTS = [
    "The capital of France is [MASK].",
    "He went to the [MASK] and bought [MASK] for dinner.",
    "Once upon a time",
    "The [sMASK] was very good.",
    "[MASK] is the best way to learn.",
    "She said that [MASK] would come [MASK] the [MASK].",
    "Water boils at [MASK] degrees.",
    "A long time ago, in a small village near the sea, there lived an old fisherman who [sMASK]",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, route, body, timeout=REQUEST_S):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def get(port, route):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=REQUEST_S) as response:
        return response.read().decode()


def metric(port, name):
    for line in get(port, "/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(check, what, bound=START_S):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise AssertionError(f"not reached within {bound} s: {what}")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from glm_runtime.cli import run; run()",
            "serve",
            "--port",
            str(port),
            "--rows",
            "4",
            "--max-waiting",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: proc.poll() is None and json.loads(get(port, "/health"))["status"] == "ok", "glmx serve healthy"
        )
        yield port, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def make_requests(seed):
    rng = random.Random(seed)
    out = []
    for _ in range(PER_CLIENT):
        prompt, budget = rng.choice(PROMPTS), rng.randint(2, 10)
        if rng.random() < 0.5:
            settings = {"max_new_tokens": budget}
            if rng.random() < 0.3:
                settings.update(strategy="sample", seed=rng.randint(0, 99), top_k=30)
            out.append(("/v1/fill", {"prompt": prompt, **settings, "append_gmask": True}, settings))
        else:
            body = {"prompt": prompt, "max_tokens": budget}
            settings = {"max_new_tokens": budget}
            if rng.random() < 0.3:
                body.update(temperature=0.9, seed=rng.randint(0, 99))
                settings.update(strategy="sample", temperature=0.9, seed=body["seed"])
            out.append(("/v1/completions", body, settings))
    return out


def test_load_answers_equal_one_by_one_and_batches_merge(server):
    port, _ = server
    session, tok = open_model(None, "onnxruntime")
    plans = [make_requests(c) for c in range(CLIENTS)]
    answers: dict[tuple, list] = {}
    errors: list[str] = []

    def client(c):
        for route, body, _ in plans[c]:
            try:
                status, reply = post(port, route, body)
                answers[(c, id(body))] = [status, reply]
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"client {c}: {exc!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLIENTS * PER_CLIENT * REQUEST_S)
    assert not errors, errors[:3]
    alone_cache: dict[str, list[int]] = {}
    for c in range(CLIENTS):
        for route, body, settings in plans[c]:
            status, reply = answers[(c, id(body))]
            assert status == 200
            key = json.dumps([body["prompt"], settings], sort_keys=True)
            if key not in alone_cache:
                (r,) = fill_blanks(session, tok, [body["prompt"]], append_gmask=True, **settings)
                alone_cache[key] = r.tokens
            tokens = (
                reply["tokens"]
                if route == "/v1/fill"
                else _completion_tokens(tok, body["prompt"], reply["choices"][0]["glmx"]["spans"])
            )
            assert tokens == alone_cache[key], (route, body)
    rows, calls = metric(port, "glmx:decode_batch_rows_sum"), metric(port, "glmx:decode_batch_rows_count")
    assert rows / calls > 1.0, (rows, calls)  # requests shared decode calls
    assert metric(port, 'glmx:requests_total{outcome="finished"}') >= CLIENTS * PER_CLIENT


def _completion_tokens(tok, prompt, spans):
    """The FillResult.tokens layout from a completion's spans: context ids, then sop + span ids per blank."""
    from glm_runtime.tokenizer import build_context_ids

    ids = build_context_ids(tok, prompt, append_gmask=True)
    for s in spans:
        ids = ids + [tok.special["sop"], *s["token_ids"]]
    return ids


def _head(sock: socket.socket, got: bytes) -> tuple[bytes, bytes]:
    """Read until one response's header block is complete -> (header block, what followed it)."""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    return head, rest


def post_raw(port, route, data: bytes):
    """(status, parsed error or answer) of a POST whose body is given as bytes, sent as careful clients send a big
    body: `Expect: 100-continue`, the body only once the server asks for it. A server that refuses on the headers
    (413 by Content-Length) answers without reading it, so no send races the server closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_S) as sock:
        sock.sendall(
            f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        head, rest = _head(sock, b"")
        if head.split(b" ")[1] == b"100":
            sock.sendall(data)
            head, rest = _head(sock, rest)
        while chunk := sock.recv(65536):
            rest += chunk
    return int(head.split(b" ")[1]), json.loads(rest or b"{}")


def test_hostile_requests_are_refused_at_once_while_clients_fill(server):
    """While 4 clients fill normally: a body of the maximal size holding one huge prompt (400 before tokenizing),
    a body one byte past it (413), 10000 beams (400) and more prompts than rows + waiting (400, not 429) are each
    refused at once with their status; the clients' answers equal one by one; GET /health stays under 100 ms; the
    server's memory stays within 200 MB of its size before."""
    psutil = pytest.importorskip("psutil")
    port, proc = server
    session, tok = open_model(None, "onnxruntime")
    limit = 1 << 20  # the default --max-body-bytes
    head, tail = b'{"prompt": "', b' [MASK]"}'
    hostile = [
        ("/v1/fill", head + b"a" * (limit - len(head) - len(tail)) + tail, 400, "characters"),
        ("/v1/fill", head + b"a" * (limit + 1 - len(head) - len(tail)) + tail, 413, "limit"),
        ("/v1/fill", json.dumps({"prompt": "a [MASK]", "strategy": "beam", "num_beams": 10000}).encode(), 400, "beams"),
        ("/v1/completions", json.dumps({"prompt": ["a [MASK]"] * 261, "max_tokens": 2}).encode(), 400, "261 prompts"),
    ]
    memory = psutil.Process(proc.pid)
    idle = memory.memory_info().rss
    peak, health_s, refused, answers, errors = [idle], [], [], {}, []
    done = threading.Event()

    def watch():  # /health's latency and the server's memory, every 20 ms until the clients are done
        while not done.is_set():
            t0 = time.perf_counter()
            get(port, "/health")
            health_s.append(time.perf_counter() - t0)
            peak.append(memory.memory_info().rss)
            time.sleep(0.02)

    def client(c):
        for i in range(6):
            prompt, budget = PROMPTS[(c + i) % len(PROMPTS)], 2 + (c + i) % 5
            try:
                answers[(c, i)] = (
                    prompt,
                    budget,
                    post(port, "/v1/fill", {"prompt": prompt, "max_new_tokens": budget, "append_gmask": True}),
                )
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"client {c}: {exc!r}")

    watcher = threading.Thread(target=watch)
    clients = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    watcher.start()
    for t in clients:
        t.start()
    for route, data, status, word in hostile:
        t0 = time.perf_counter()
        got, reply = post_raw(port, route, data)
        refused.append((route, status, got, word, reply.get("error", {}).get("message", ""), time.perf_counter() - t0))
    for t in clients:
        t.join(120)
    done.set()
    watcher.join(30)
    assert not errors, errors[:3]
    for route, status, got, word, message, seconds in refused:
        assert got == status and word in message, (route, got, message)
        assert seconds < 1.0, (route, seconds)  # at once: nothing waited for a row or tokenized a megabyte
    for prompt, budget, (status, reply) in answers.values():
        (alone,) = fill_blanks(session, tok, [prompt], max_new_tokens=budget, append_gmask=True)
        assert status == 200 and reply["tokens"] == alone.tokens
    assert len(answers) == 24 and len(health_s) > 5
    assert max(health_s) < 0.1, sorted(health_s)[-5:]
    assert max(peak) - idle < 200 * 2**20, (idle, max(peak))


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting-for-json"])
def test_a_client_that_hangs_up_frees_its_row(server, stream):
    # a seeded sample that runs its whole 400-token budget here (about 1 s): the client leaves while it runs
    port, _ = server
    before = metric(port, 'glmx:requests_total{outcome="cancelled"}')
    finished = metric(port, 'glmx:requests_total{outcome="finished"}')
    body = {
        "prompt": "Once upon a time [gMASK]",
        "max_new_tokens": 400,
        "strategy": "sample",
        "temperature": 1.5,
        "seed": 2,
        "stream": stream,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_S)
    conn.request("POST", "/v1/fill", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the request is running
    else:
        wait_until(lambda: json.loads(get(port, "/health"))["running"] == 1, "running", REQUEST_S)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: metric(port, 'glmx:requests_total{outcome="cancelled"}') == before + 1, "cancelled", REQUEST_S)
    wait_until(lambda: json.loads(get(port, "/health"))["running"] == 0, "row freed", REQUEST_S)
    assert metric(port, 'glmx:requests_total{outcome="finished"}') == finished  # it stopped before its end


def test_sigterm_drains_then_exits(server):
    # a seeded sample that runs its whole 400-token budget here (about 1 s): SIGTERM arrives once it is running
    port, proc = server
    body = {
        "prompt": "Once upon a time [gMASK]",
        "max_new_tokens": 400,
        "strategy": "sample",
        "temperature": 1.5,
        "seed": 2,
        "stream": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_S)
    conn.request("POST", "/v1/fill", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"data: ")  # running
    proc.send_signal(signal.SIGTERM)
    rest = response.read().decode()  # the stream goes on to its end
    conn.close()
    events = [json.loads(c[len("data: ") :]) for c in rest.split("\n\n") if c.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-1]["kind"] == "result" and len(events[-1]["spans"][0]["token_ids"]) == 400
    assert proc.wait(REQUEST_S) == 0


def test_a_model_that_does_not_load_stops_the_server_with_its_reason(tmp_path):
    """A server that cannot serve exits 1 with one Error line (a supervisor sees it), instead of answering 503
    for ever."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from glm_runtime.cli import run; run()",
            "serve",
            "--port",
            str(port),
            "--model",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: the model did not load: ManifestError: {tmp_path} has no manifest.json: not a glmx "
        f"artifact folder, or an interrupted write"
    ], out
    assert "Traceback" not in out


def test_a_taken_port_is_one_error_line():
    """A server on a port another program holds stops before loading anything, naming the port."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", "from glm_runtime.cli import run; run()", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in "
        f"use (another server is there: pick another --port)"
    )
