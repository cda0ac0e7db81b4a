"""`glmx serve`: the engine (runtime/engine.py) behind an HTTP API, on Starlette + uvicorn, metrics for Prometheus.
In: a loader giving (session, tokenizer), rows, queue bound, per-request timeout, optional API key.
Out: an ASGI app with POST /v1/completions (OpenAI-shaped), POST /v1/fill (glmx fill --json's shape), GET
/health, /v1/models, /metrics. Torch-free: the server never imports torch or glm_export.

    HTTP handlers (asyncio) --submit/cancel--> EngineLoop (one thread: engine.step() while there is work)
                         <--events (call_soon_threadsafe)-- each request's asyncio.Queue

One engine thread runs every step; handlers only check, submit and wait, so a request joins the running batch at
the next decode step. Bounded: past rows + max_waiting a request gets 429 with Retry-After; a client that hangs
up cancels its request and frees its row; --timeout cancels and answers 504.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import json
import threading
import time
from typing import Any, Callable, Optional

from glm_runtime.engine import Engine, EngineError, QueueFull
from glm_runtime.errors import GLMXError
from glm_runtime.sampling import GenerationError

SERVE_EXTRA = "pip install 'glmx[serve]' (starlette, uvicorn, prometheus-client)"


class ServeError(GLMXError, RuntimeError):
    """The server cannot start (its extra is not installed, a bad option) or a request cannot be served."""


def _require_serve_extra() -> None:
    missing = []
    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ServeError(f"glmx serve needs {', '.join(missing)}: {SERVE_EXTRA}")


# ---------------------------------------------------------------- metrics (names follow vLLM's, prefix glmx:)

METRIC_NAMES = ("glmx:requests_total", "glmx:num_requests_running", "glmx:num_requests_waiting",
                "glmx:request_queue_time_seconds", "glmx:time_to_first_token_seconds",
                "glmx:time_per_output_token_seconds", "glmx:e2e_request_latency_seconds",
                "glmx:decode_batch_rows", "glmx:kv_slots_used", "glmx:kv_cache_usage_perc",
                "glmx:prompt_tokens_total", "glmx:generation_tokens_total")
OUTCOMES = ("finished", "cancelled", "timeout", "failed", "rejected", "invalid")  # engine endings + refused ones


class Metrics:
    """Prometheus metrics in a registry of their own (two apps in one process do not collide)."""

    def __init__(self, rows: int):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        prometheus_client.disable_created_metrics()  # no *_created series beside every counter and histogram
        self.registry = r = CollectorRegistry()
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("glmx:requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.running = Gauge("glmx:num_requests_running", "Requests holding a row", registry=r)
        self.waiting = Gauge("glmx:num_requests_waiting", "Requests waiting for a row", registry=r)
        self.queue_time = Histogram("glmx:request_queue_time_seconds", "Submit to admission", buckets=latency,
                                    registry=r)
        self.ttft = Histogram("glmx:time_to_first_token_seconds", "Submit to first span token", buckets=latency,
                              registry=r)
        self.tpot = Histogram("glmx:time_per_output_token_seconds", "Decode time per new token",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=r)
        self.e2e = Histogram("glmx:e2e_request_latency_seconds", "Submit to result", buckets=latency, registry=r)
        self.batch = Histogram("glmx:decode_batch_rows", "Rows in each decode call",
                               buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, rows})), registry=r)
        self.slots = Gauge("glmx:kv_slots_used", "KV cache slots the running requests hold", registry=r)
        self.usage = Gauge("glmx:kv_cache_usage_perc", "KV slots used / allocated (0..1)", registry=r)
        self.prompt_tokens = Counter("glmx:prompt_tokens", "Context tokens of finished requests", registry=r)
        self.generation_tokens = Counter("glmx:generation_tokens", "Span tokens generated", registry=r)

    def after_step(self, engine: Engine, rows_fed: int) -> None:
        self.running.set(len(engine.running))
        self.waiting.set(engine.waiting)
        if rows_fed:
            self.batch.observe(rows_fed)
        used = engine.slots_used()
        self.slots.set(used)
        total = engine.cache.batch * engine.cache.capacity
        self.usage.set(used / total if total else 0.0)

    def ended(self, request: Any) -> None:
        self.requests.labels(request.state).inc()
        if request.admitted_at is not None:
            self.queue_time.observe(max(request.admitted_at - request.context_s - request.submitted_at, 0.0))
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted_at)
        if request.state == "finished":
            self.e2e.observe(request.finished_at - request.submitted_at)
            self.prompt_tokens.inc(len(request.prompt.ids))
            new = request.new_tokens
            self.generation_tokens.inc(new)
            if new and request.admitted_at is not None:
                self.tpot.observe((request.finished_at - request.admitted_at) / new)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the engine thread

class EngineLoop:
    """Runs engine.step() in one thread while there is work; submit/cancel from any thread (the handlers')."""

    def __init__(self, engine: Engine, metrics: Optional[Metrics] = None):
        self.engine, self.metrics = engine, metrics
        self.error: Optional[str] = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="glmx-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: str, on_event: Callable[[Any], None], **settings: Any) -> Any:
        if self.error is not None:
            raise EngineError(f"the engine stopped: {self.error}")
        if self._stopping:
            raise EngineError("the server is shutting down")
        request = self.engine.submit(prompt, on_event=on_event, **settings)
        self._wake.set()
        return request

    def cancel(self, request: Any, reason: str = "cancelled") -> None:
        self.engine.cancel(request, reason)
        self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            if not engine.has_work():
                if self._stopping:
                    return
                self._wake.wait(0.25)
                continue
            rows_before = engine.decode_rows
            try:
                engine.step()
            except Exception as exc:  # noqa: BLE001 - the session died: every request ends with the reason
                self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                engine.fail_all(self.error)
                return
            if self.metrics:
                self.metrics.after_step(engine, engine.decode_rows - rows_before)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is running and waiting (bounded by timeout), then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None


# ---------------------------------------------------------------- request checking

FILL_KEYS = ("prompt", "max_new_tokens", "strategy", "temperature", "top_k", "top_p", "seed", "num_beams",
             "length_penalty", "early_stopping", "append_gmask", "stream")
# OpenAI completion fields: what glmx does with each. Anything else is refused with its name.
COMPLETION_KEYS = ("model", "prompt", "suffix", "max_tokens", "echo", "stream", "temperature", "top_p", "seed",
                   "user", "n", "best_of", "logprobs", "stop", "presence_penalty", "frequency_penalty",
                   "logit_bias", "stream_options", "glmx")
GLMX_COMPLETION_KEYS = ("strategy", "top_k", "num_beams", "length_penalty", "early_stopping")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def _unsupported(body: dict) -> None:
    """OpenAI options glmx does not implement answer 400, never silently ignored (defaults are accepted)."""
    rules = {"n": lambda v: v in (None, 1), "best_of": lambda v: v in (None, 1), "logprobs": lambda v: v is None,
             "stop": lambda v: v in (None, [], ""), "presence_penalty": lambda v: v in (None, 0, 0.0),
             "frequency_penalty": lambda v: v in (None, 0, 0.0), "logit_bias": lambda v: v in (None, {}),
             "stream_options": lambda v: v is None}
    for key, ok in rules.items():
        if key in body and not ok(body[key]):
            raise BadRequest(f"{key}={json.dumps(body[key])} is not supported by glmx (spans end at eop / eos or "
                             f"max_tokens; one choice per prompt); drop it", kind="unsupported_parameter")


def completion_settings(body: dict) -> tuple[list[str], dict, bool, bool]:
    """(prompts, engine settings, echo, stream) of an OpenAI completion request; BadRequest when it is not one."""
    unknown = sorted(set(body) - set(COMPLETION_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /v1/completions takes {', '.join(COMPLETION_KEYS)}")
    _unsupported(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompt" must be a string or a non-empty list of strings')
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise BadRequest('"suffix" must be a string')
        prompts = [p + "[MASK]" + suffix for p in prompts]
    extra = body.get("glmx") or {}
    if not isinstance(extra, dict) or set(extra) - set(GLMX_COMPLETION_KEYS):
        raise BadRequest(f'"glmx" must be an object with any of {", ".join(GLMX_COMPLETION_KEYS)}')
    temperature, top_p = body.get("temperature"), body.get("top_p")
    strategy = extra.get("strategy")
    if strategy is None:  # OpenAI's knobs pick the strategy: temperature 0 or none given = greedy
        sampling = (temperature not in (None, 0, 0.0)) or (top_p not in (None, 1, 1.0)) or "top_k" in extra
        strategy = "sample" if sampling else "greedy"
    budget = body.get("max_tokens")
    settings = {"max_new_tokens": DEFAULT_MAX_TOKENS if budget is None else budget, "strategy": strategy,
                **{k: v for k, v in extra.items() if k != "strategy"}}
    if strategy == "sample":
        settings.update(temperature=temperature if temperature not in (None,) else None, top_p=top_p,
                        seed=body.get("seed"))
    else:
        for key, value in (("temperature", temperature if temperature not in (0, 0.0) else None), ("top_p", top_p),
                           ("seed", body.get("seed"))):
            if value is not None:
                raise BadRequest(f"{key} applies to sampling, not {strategy}; drop it or set temperature > 0")
    echo, stream = bool(body.get("echo") or False), body.get("stream") or False
    if not isinstance(echo, bool) or not isinstance(stream, bool):
        raise BadRequest('"echo" and "stream" must be true or false')
    if echo and stream:
        raise BadRequest("echo with stream is not supported: the filled text is known at the end; stream without "
                         "echo (the last chunk's glmx.text holds the filled text)", kind="unsupported_parameter")
    # a prompt without a blank is continued at its end, as a completion ([gMASK] appended)
    settings["append_gmask"] = True
    return prompts, settings, echo, stream


def fill_settings(body: dict) -> tuple[str, dict, bool]:
    """(prompt, engine settings, stream) of a /v1/fill request: glmx fill --jsonl's keys, plus stream."""
    unknown = sorted(set(body) - set(FILL_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /v1/fill takes {', '.join(FILL_KEYS)}")
    if not isinstance(body.get("prompt"), str):
        raise BadRequest('"prompt" must be a string')
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest('"stream" must be true or false')
    settings = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
    settings["append_gmask"] = bool(settings.get("append_gmask", False))
    return body["prompt"], settings, stream


# ---------------------------------------------------------------- the app

def create_app(load: Callable[[], tuple[Any, Any]], *, model_id: str = "glmx", rows: int = 8,
               max_waiting: int = 64, timeout: float = 600.0, api_key: Optional[str] = None,
               load_now: bool = False, log: Callable[[str], None] = lambda message: None,
               on_load_error: Optional[Callable[[str], None]] = None) -> Any:
    """The Starlette app. load() -> (session, tokenizer) runs in a thread at startup (GET /health answers 503
    until it is done), or at once when load_now (Ray Serve replicas). If it fails, /health answers 503 with the
    reason and on_load_error(reason) is called (`glmx serve` then stops with the reason and exit status 1)."""
    _require_serve_extra()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    state: dict[str, Any] = {"loop": None, "error": None, "loading": True, "model": None}
    metrics = Metrics(rows)
    ids = itertools.count()

    def start() -> None:
        try:
            session, tokenizer = load()
            engine = Engine(session, tokenizer, rows=rows, max_waiting=max_waiting, on_end=metrics.ended)
            state["loop"] = EngineLoop(engine, metrics)
            state["model"] = {"precision": session.precision,
                              "max_sequence_length": session.config.max_sequence_length,
                              "vocab_size": session.config.vocab_size, "rows": rows, "max_waiting": max_waiting}
            log(f"glmx serve: model loaded ({state['model']})")
        except Exception as exc:  # noqa: BLE001 - /health says why
            state["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if on_load_error is not None:
                on_load_error(state["error"])
            else:
                log(f"glmx serve: the model did not load: {state['error']}")
        finally:
            state["loading"] = False

    def error(message: str, status: int = 400, kind: str = "invalid_request_error", headers=None) -> Response:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)

    def check_key(request: Request) -> Optional[Response]:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error("missing or wrong API key: send the header Authorization: Bearer <key>", 401,
                         "authentication_error")
        return None

    def engine_loop() -> EngineLoop:
        if state["loading"]:
            raise BadRequest("the model is still loading; retry shortly", 503, "unavailable",
                             {"Retry-After": "1"})
        loop = state["loop"]
        if loop is None or not loop.alive:
            why = state["error"] or (loop.error if loop is not None else None) or "the engine stopped"
            raise BadRequest(f"the model is not available: {why}", 503, "unavailable")
        return loop

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def submit_all(loop: EngineLoop, prompts: list[str], settings: dict,
                   route: str) -> tuple[list[Any], asyncio.Queue]:
        """Submit every prompt of one HTTP request onto one queue; all or none (a refusal cancels the rest)."""
        queue: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        requests = []
        try:
            for prompt in prompts:
                requests.append(loop.submit(prompt, lambda event: aio.call_soon_threadsafe(queue.put_nowait, event),
                                            request_id=next(ids), **settings))
        except QueueFull as exc:
            for r in requests:
                loop.cancel(r)
            metrics.requests.labels("rejected").inc()
            raise BadRequest(str(exc), 429, "server_busy", {"Retry-After": str(int(round(exc.retry_after)))}) \
                from None
        except (GenerationError, EngineError) as exc:
            for r in requests:
                loop.cancel(r)
            metrics.requests.labels("invalid").inc()
            message = " ".join(str(exc).split())
            if route == "completions":  # say it in the route's own field names
                message = message.replace("max_new_tokens", "max_tokens")
            raise BadRequest(message) from None
        return requests, queue

    async def events_of(loop: EngineLoop, requests: list[Any], queue: asyncio.Queue, http: Request):
        """Every event of these requests until each has ended; cancels them all if the client leaves or the
        deadline passes (then raises BadRequest 504)."""
        deadline = time.monotonic() + timeout
        open_ids = {r.id for r in requests}
        checked = time.monotonic()
        try:
            while open_ids:
                if time.monotonic() - checked > 0.25:  # a hang-up is noticed within ~0.25 s, busy or not
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    for r in requests:
                        loop.cancel(r, "timeout")
                    raise BadRequest(f"the request did not finish within --timeout {timeout:g} s", 504, "timeout")
                try:
                    event = await asyncio.wait_for(queue.get(), min(left, 0.5))
                except asyncio.TimeoutError:
                    continue
                if event.kind in ("result", "cancelled", "timeout", "failed"):
                    open_ids.discard(event.prompt)
                yield event
        finally:
            for r in requests:
                if not r.done:
                    loop.cancel(r)

    def failed(event: Any) -> BadRequest:
        return BadRequest(f"the engine failed: {event.text}", 500, "server_error")

    async def handle(http: Request, route: str) -> Response:
        denied = check_key(http)
        if denied is not None:
            return denied
        try:
            loop = engine_loop()
            body = await read_json(http)
            if route == "completions":
                model = body.get("model")
                if model is not None and model != model_id:
                    return error(f"model {model!r} is not served here; GET /v1/models lists {model_id!r}", 404,
                                 "model_not_found")
                prompts, settings, echo, stream = completion_settings(body)
            else:
                prompt, settings, stream = fill_settings(body)
                prompts, echo = [prompt], False
            requests, queue = submit_all(loop, prompts, settings, route)
        except BadRequest as exc:
            return error(str(exc), exc.status, exc.kind, exc.headers)
        created, cid = int(time.time()), f"cmpl-{requests[0].id}"
        index = {r.id: i for i, r in enumerate(requests)}
        if stream:
            return StreamingResponse(sse(route, loop, requests, queue, http, created, cid, index),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results: dict[Any, Any] = {}
        try:
            async for event in events_of(loop, requests, queue, http):
                if event.kind == "failed":
                    raise failed(event)
                if event.kind == "result":
                    results[event.prompt] = event.result
        except BadRequest as exc:
            return error(str(exc), exc.status, exc.kind, exc.headers)
        if len(results) < len(requests):  # the client left: nobody reads this
            return Response(status_code=499)
        ordered = [(r, results[r.id]) for r in requests]
        if route == "fill":
            (request, result), = ordered
            return JSONResponse({"prompt": prompts[0], **result.to_dict()})
        return JSONResponse(completion_body(cid, created, ordered, echo))

    def completion_body(cid: str, created: int, ordered: list, echo: bool) -> dict:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (request, result) in enumerate(ordered):
            prompt_tokens += len(request.prompt.ids)
            completion_tokens += request.new_tokens
            choices.append({"index": i, "text": result.text if echo else "".join(s.text for s in result.spans),
                            "logprobs": None, "finish_reason": finish_reason(result.spans),
                            "glmx": {"text": result.text, "spans": [vars(s) for s in result.spans]}})
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def finish_reason(spans: list) -> str:
        return "length" if any(s.stop == "length" for s in spans) else "stop"

    async def sse(route, loop, requests, queue, http, created, cid, index):
        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            async for event in events_of(loop, requests, queue, http):
                if event.kind == "failed":
                    yield data({"error": {"message": f"the engine failed: {event.text}", "type": "server_error"}})
                    return
                if event.kind in ("cancelled", "timeout"):
                    continue
                if route == "fill":
                    if event.kind == "token":
                        yield data({"kind": "token", "blank": event.blank, "token_id": event.token_id,
                                    "text": event.text})
                    elif event.kind == "span":
                        yield data({"kind": "span", "blank": event.blank, "span": vars(event.span)})
                    else:
                        yield data({"kind": "result", "prompt": requests[0].prompt.text, **event.result.to_dict()})
                    continue
                choice = {"index": index[event.prompt], "text": "", "logprobs": None, "finish_reason": None}
                if event.kind == "token":
                    choice.update(text=event.text, glmx={"blank": event.blank, "token_id": event.token_id})
                elif event.kind == "span":
                    choice.update(glmx={"blank": event.blank, "span": vars(event.span)})
                else:
                    choice.update(finish_reason=finish_reason(event.result.spans),
                                  glmx={"text": event.result.text, "spans": [vars(s) for s in event.result.spans]})
                yield data({"id": cid, "object": "text_completion", "created": created, "model": model_id,
                            "choices": [choice]})
            yield "data: [DONE]\n\n"
        except BadRequest as exc:
            yield data({"error": {"message": str(exc), "type": exc.kind, "code": exc.status}})

    async def completions(http: Request) -> Response:
        return await handle(http, "completions")

    async def fill(http: Request) -> Response:
        return await handle(http, "fill")

    async def health(http: Request) -> Response:
        if state["loading"]:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})
        loop = state["loop"]
        if loop is None or not loop.alive:
            return JSONResponse({"status": "error", "error": state["error"] or (loop.error if loop else None)}, 503)
        engine = loop.engine
        return JSONResponse({"status": "ok", "running": len(engine.running), "waiting": engine.waiting,
                             "rows": engine.rows})

    async def models(http: Request) -> Response:
        denied = check_key(http)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "glmx", "glmx": state["model"]}]})

    async def metrics_route(http: Request) -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(http: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(f"no route {http.method} {http.url.path}; routes: POST /v1/completions, POST /v1/fill, "
                         f"GET /health, GET /v1/models, GET /metrics", 404, "not_found")
        return error(exc.detail, exc.status_code, "invalid_request_error")

    def lifespan(app):
        import contextlib

        @contextlib.asynccontextmanager
        async def span():
            if not load_now:
                threading.Thread(target=start, name="glmx-load", daemon=True).start()
            yield
            if state["loop"] is not None:
                state["loop"].stop()
        return span()

    if load_now:
        start()
    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/fill", fill, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.glmx = state
    app.state.metrics = metrics
    return app


def listening_socket(host: str, port: int) -> Any:
    """A socket bound to host:port for uvicorn to serve on; ServeError with the reason when it cannot be bound."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror} (--host takes an address or a name of "
                         f"this machine)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (another server is there: pick another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def serve(model: Optional[str], backend: str, host: str, port: int, rows: int, max_waiting: int, timeout: float,
          api_key: Optional[str], log: Callable[[str], None] = print) -> None:
    """Run the app under uvicorn until SIGINT / SIGTERM (uvicorn stops accepting, lets running requests finish,
    then the engine drains)."""
    _require_serve_extra()
    import uvicorn

    from glm_runtime.session import open_model

    def load():
        return open_model(model, backend)

    model_id = "glmx-bundled" if model is None else str(model).rstrip("/").split("/")[-1]
    failure: dict[str, str] = {}

    def load_failed(reason: str) -> None:  # a server that cannot serve stops, so a supervisor sees the failure
        failure["reason"] = reason
        server.should_exit = True
    app = create_app(load, model_id=model_id, rows=rows, max_waiting=max_waiting, timeout=timeout,
                     api_key=api_key, log=log, on_load_error=load_failed)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=int(timeout)))
    sock = listening_socket(host, port)  # before anything loads: a taken port is one clear line
    log(f"glmx serve: http://{host}:{port} model {model_id!r} backend {backend}, rows {rows}, "
        f"max waiting {max_waiting}, timeout {timeout:g} s{', API key required' if api_key else ''}")
    import signal
    import sys

    def drained(signum, frame):  # uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown: exit 0 then
        sys.exit(0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, drained)
    server.run(sockets=[sock])
    if failure:
        raise ServeError(f"the model did not load: {failure['reason']}")
    log("glmx serve: stopped")
