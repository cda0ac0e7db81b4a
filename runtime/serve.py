"""`glmx serve`: the engine (runtime/engine.py) behind an HTTP API, on Starlette + uvicorn, metrics for Prometheus.
In: a loader giving (session, tokenizer), rows, queue bound, per-request timeout, optional API key. Out: an ASGI app
with POST /v1/completions and /v1/chat/completions (OpenAI-shaped), POST /v1/fill (glmx fill --json's shape), GET
/health, /v1/models, /metrics. Torch-free: never imports torch or glm_export. Bodies are checked in
runtime/http_api.py and runtime/chat_api.py, the metrics kept in runtime/metrics.py.

    HTTP handlers (asyncio) --submit/cancel--> EngineLoop (one thread: Engine.run while there is work)
                         <--events (call_soon_threadsafe)-- each request's asyncio.Queue

One engine thread runs every step; handlers only check, submit and wait, so a request joins the running batch at
the next decode step. Bounded: past rows + max_waiting a request gets 429 with Retry-After; a client that hangs
up cancels its request and frees its row; --timeout cancels and answers 504.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from glm_runtime.chat_api import ChatChunks, chat_ask, chat_body
from glm_runtime.engine import Engine, EngineError, Job, QueueFull
from glm_runtime.engine_thread import EngineLoop
from glm_runtime.errors import GLMXError
from glm_runtime.http_api import (
    Ask,
    BadRequest,
    completion_body,
    completion_choice,
    error_response,
    fill_chunk,
    json_body,
    parse_body,
    said,
    sse,
)
from glm_runtime.metrics import Metrics
from glm_runtime.playground import model_facts, playground_routes
from glm_runtime.requests import ENDINGS, FillResult, StreamEvent
from glm_runtime.sampling import GenerationError

SERVE_EXTRA = "pip install 'glmx[serve]' (starlette, uvicorn, prometheus-client)"


DEFAULT_MAX_BODY = 1 << 20  # bytes: a request body past this answers 413 (--max-body-bytes)


class ServeError(GLMXError, RuntimeError):
    """The server cannot start (its extra is not installed, a bad option) or a request cannot be served."""


def _require_serve_extra() -> None:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"glmx serve needs {', '.join(missing)}: {SERVE_EXTRA}")


def _deliver(aio: asyncio.AbstractEventLoop, queue: asyncio.Queue[StreamEvent], event: StreamEvent) -> None:
    """An event from the engine thread onto a handler's queue, in the handler's event loop."""
    aio.call_soon_threadsafe(queue.put_nowait, event)


# ---------------------------------------------------------------- the app


class Server:
    """The server's state (the engine thread, the model's description, load errors, metrics) and its routes.

    load() -> (session, tokenizer) runs in a thread at startup (GET /health answers 503 until it is done), or at
    once when load_now (Ray Serve replicas). If it fails, /health answers 503 with the reason and
    on_load_error(reason) is called (`glmx serve` then stops with the reason and exit status 1)."""

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any]],
        *,
        model_id: str = "glmx",
        rows: int = 8,
        max_waiting: int = 64,
        timeout: float = 600.0,
        api_key: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        ui: bool = True,
        log: Callable[[str], None] = lambda message: None,
        on_load_error: Callable[[str], None] | None = None,
    ):
        if api_key is not None and not api_key.strip():
            raise ServeError(
                "--api-key is empty (an unset variable?): give the key, or leave the option and GLMX_API_KEY "
                "out to serve without one"
            )
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ServeError(f"max_body must be a number of bytes >= 1, got {max_body!r}")
        self.load, self.model_id, self.rows, self.max_waiting = load, model_id, rows, max_waiting
        self.max_body, self.ui = max_body, ui  # ui: the web playground (runtime/playground.py) at GET /
        self.max_prompt_chars: int | None = None  # set when the model loads
        self.timeout, self.api_key, self.log, self.on_load_error = timeout, api_key, log, on_load_error
        self.metrics = Metrics(rows)
        self.loop: EngineLoop | None = None
        self.error: str | None = None
        self.loading = True
        self.model: dict[str, Any] | None = None
        self._ids = itertools.count()

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/fill", self.fill, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            *playground_routes(self, self.ui),  # POST /v1/score; GET / unless --no-ui
        ]

    # ------------------------------------------------------------ the model

    def start(self) -> None:
        """Load the model and start the engine thread; a failure is kept as the reason /health gives."""
        try:
            session, tokenizer = self.load()
            engine = Engine(
                session,
                tokenizer,
                rows=self.rows,
                max_waiting=self.max_waiting,
                max_beams=self.rows,  # a beam request takes num_beams rows of memory: no more than the server's
                on_end=self.metrics.ended,
                on_step=self.metrics.after_step,
            )
            # no text longer than this fits the model: each token covers at most its longest string's characters
            self.max_prompt_chars = session.config.max_sequence_length * tokenizer.longest_token_chars
            self.loop = EngineLoop(engine)
            self.model = {
                "precision": session.precision,
                "max_sequence_length": session.config.max_sequence_length,
                "vocab_size": session.config.vocab_size,
                "rows": self.rows,
                "max_waiting": self.max_waiting,
                **model_facts(session),
            }
            self.log(f"glmx serve: model loaded ({self.model})")
        except Exception as exc:  # noqa: BLE001 - /health says why
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if self.on_load_error is not None:
                self.on_load_error(self.error)
            else:
                self.log(f"glmx serve: the model did not load: {self.error}")
        finally:
            self.loading = False

    def engine_loop(self) -> EngineLoop:
        if self.loading:
            raise BadRequest("the model is still loading; retry shortly", 503, "unavailable", {"Retry-After": "1"})
        loop = self.loop
        if loop is None or not loop.alive:
            why = self.error or (loop.error if loop is not None else None) or "the engine stopped"
            raise BadRequest(f"the model is not available: {why}", 503, "unavailable")
        return loop

    # ------------------------------------------------------------ routes

    async def completions(self, http: Any) -> Any:
        return await self._answer(http, "completions")

    async def fill(self, http: Any) -> Any:
        return await self._answer(http, "fill")

    async def chat_completions(self, http: Any) -> Any:
        return await self._answer(http, "chat")

    async def health(self, http: Any) -> Any:
        from starlette.responses import JSONResponse

        if self.loading:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})
        loop = self.loop
        if loop is None or not loop.alive:
            return JSONResponse({"status": "error", "error": self.error or (loop.error if loop else None)}, 503)
        engine = loop.engine
        return JSONResponse(
            {"status": "ok", "running": len(engine.running), "waiting": engine.waiting, "rows": engine.rows}
        )

    async def models(self, http: Any) -> Any:
        from starlette.responses import JSONResponse

        denied = self.check_key(http)
        if denied is not None:
            return denied
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": self.model_id, "object": "model", "created": 0, "owned_by": "glmx", "glmx": self.model}
                ],
            }
        )

    async def metrics_text(self, http: Any) -> Any:
        from starlette.responses import Response

        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(self, http: Any, exc: Any) -> Any:
        if exc.status_code == 404:
            known = ", ".join(f"{m} {r.path}" for r in self.routes() for m in sorted(r.methods - {"HEAD"}))
            return error_response(f"no route {http.method} {http.url.path}; routes: {known}", 404, "not_found")
        return error_response(exc.detail, exc.status_code, "invalid_request_error")

    # ------------------------------------------------------------ answering a fill or a completion

    def check_key(self, http: Any) -> Any:
        if self.api_key and http.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return error_response(
                "missing or wrong API key: send the header Authorization: Bearer <key>", 401, "authentication_error"
            )
        return None

    async def read_body(self, http: Any) -> bytes:
        """The request's body, refused with 413 past max_body bytes: by its Content-Length before reading, or as
        the chunks of a body without one arrive (nothing past the limit is kept)."""
        too_big = BadRequest(
            f"the body is larger than this server's limit of {self.max_body} bytes (--max-body-bytes)",
            413,
            "request_too_large",
        )
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _accept(
        self, data: bytes, route: str, loop: EngineLoop, deliver: Callable[[StreamEvent], None]
    ) -> tuple[Ask, list[Job]]:
        """The body as engine requests, every check made, submitted (JSON of up to max_body bytes, tokenizing:
        run in a worker thread)."""
        if route == "chat":  # the history is fitted to the model's positions here: tokenizing
            ask = chat_ask(json_body(data), self.model_id, loop.engine.tokenizer, loop.engine.session.config)
        else:
            ask = parse_body(data, route, self.model_id, self.rows + self.max_waiting, self.max_prompt_chars)
        return ask, self._submit_all(loop, ask, deliver)

    async def _answer(self, http: Any, route: str) -> Any:
        from starlette.responses import JSONResponse, Response, StreamingResponse

        denied = self.check_key(http)
        if denied is not None:
            return denied
        try:
            loop = self.engine_loop()
            data = await self.read_body(http)
            queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
            deliver = partial(_deliver, asyncio.get_running_loop(), queue)
            # parsing and tokenizing run in a worker thread: the event loop keeps answering (/health) meanwhile
            ask, jobs = await asyncio.to_thread(self._accept, data, route, loop, deliver)
        except BadRequest as exc:
            if exc.status == 400:
                self.metrics.requests.labels("invalid").inc()
            return error_response(str(exc), exc.status, exc.kind, exc.headers)
        if ask.stream:
            return StreamingResponse(
                self._stream(ask, loop, jobs, queue, http),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        results: dict[Any, FillResult] = {}
        try:
            async for event in self._events(loop, jobs, queue, http):
                if event.kind == "failed":
                    raise BadRequest(f"the engine failed: {event.text}", 500, "server_error")
                if event.kind == "result" and event.result is not None:
                    results[event.prompt] = event.result
        except BadRequest as exc:
            return error_response(str(exc), exc.status, exc.kind, exc.headers)
        if len(results) < len(jobs):  # the client left: nobody reads this
            return Response(status_code=499)
        if route == "fill":
            return JSONResponse({"prompt": ask.requests[0].prompt, **results[jobs[0].id].to_dict()})
        if route == "chat":
            return JSONResponse(chat_body(self.model_id, jobs[0], results[jobs[0].id], ask.chat))
        return JSONResponse(
            completion_body(self.model_id, f"cmpl-{jobs[0].id}", int(time.time()), jobs, results, ask.echo)
        )

    def _submit_all(self, loop: EngineLoop, ask: Ask, deliver: Callable[[StreamEvent], None]) -> list[Job]:
        """Submit every request of one HTTP request, their events to `deliver`; all or none (a refusal cancels the
        rest)."""
        jobs: list[Job] = []
        try:
            for request in ask.requests:
                numbered = dataclasses.replace(request, id=next(self._ids))
                jobs.append(loop.submit(numbered, deliver))
        except QueueFull as exc:
            for job in jobs:
                loop.cancel(job)
            self.metrics.requests.labels("rejected").inc()
            raise BadRequest(str(exc), 429, "server_busy", {"Retry-After": str(int(round(exc.retry_after)))}) from None
        except (GenerationError, EngineError) as exc:
            for job in jobs:
                loop.cancel(job)
            if isinstance(exc, GenerationError):
                refused = len(jobs)  # the index of the one that raised, in the request's list
                raise BadRequest(said(exc, ask.route, refused if len(ask.requests) > 1 else None)) from None
            raise BadRequest(" ".join(str(exc).split()), 503, "unavailable") from None  # stopped / stopping
        return jobs

    async def _events(
        self, loop: EngineLoop, jobs: list[Job], queue: asyncio.Queue[StreamEvent], http: Any
    ) -> AsyncIterator[StreamEvent]:
        """Every event of these jobs until each has ended; cancels them all if the client leaves or the deadline
        passes (then raises BadRequest 504)."""
        deadline = time.monotonic() + self.timeout
        open_ids = {job.id for job in jobs}
        checked = time.monotonic()
        try:
            while open_ids:
                if time.monotonic() - checked > 0.25:  # a hang-up is noticed within ~0.25 s, busy or not
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    for job in jobs:
                        loop.cancel(job, "timeout")
                    raise BadRequest(f"the request did not finish within --timeout {self.timeout:g} s", 504, "timeout")
                try:
                    event = await asyncio.wait_for(queue.get(), min(left, 0.5))
                except asyncio.TimeoutError:
                    continue
                if event.kind in ENDINGS or event.kind == "result":
                    open_ids.discard(event.prompt)
                yield event
        finally:
            for job in jobs:
                if not job.done:
                    loop.cancel(job)

    async def _stream(
        self, ask: Ask, loop: EngineLoop, jobs: list[Job], queue: asyncio.Queue[StreamEvent], http: Any
    ) -> AsyncIterator[str]:
        """Server-sent events: /v1/fill's own kinds, or OpenAI completion chunks; then [DONE]."""
        cid, created = f"cmpl-{jobs[0].id}", int(time.time())
        index = {job.id: i for i, job in enumerate(jobs)}
        chat = ChatChunks(self.model_id, f"chatcmpl-{jobs[0].id}", created) if ask.route == "chat" else None
        try:
            if chat is not None:
                yield sse(chat.first())
            async for event in self._events(loop, jobs, queue, http):
                if event.kind == "failed":
                    yield sse({"error": {"message": f"the engine failed: {event.text}", "type": "server_error"}})
                    return
                if event.kind in ENDINGS:
                    continue
                if ask.route == "fill":
                    yield sse(fill_chunk(event, ask.requests[0].prompt))
                    continue
                if chat is not None:
                    for chunk in chat.of(event):
                        yield sse(chunk)
                    continue
                yield sse(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": self.model_id,
                        "choices": [completion_choice(event, index[event.prompt])],
                    }
                )
            yield "data: [DONE]\n\n"
        except BadRequest as exc:
            yield sse({"error": {"message": str(exc), "type": exc.kind, "code": exc.status}})


def create_app(load: Callable[[], tuple[Any, Any]], *, load_now: bool = False, **options: Any) -> Any:
    """The Starlette app of a Server (options: Server's keywords); app.state.glmx is the Server. The model loads in
    a thread when the app starts, or at once when load_now (Ray Serve replicas)."""
    _require_serve_extra()
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    server = Server(load, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if not load_now:
            threading.Thread(target=server.start, name="glmx-load", daemon=True).start()
        yield
        if server.loop is not None:
            server.loop.stop()

    if load_now:
        server.start()
    app = Starlette(routes=server.routes(), exception_handlers={HTTPException: server.not_found}, lifespan=lifespan)
    app.state.glmx = server
    app.state.metrics = server.metrics
    return app


def listening_socket(host: str, port: int) -> Any:
    """A socket bound to host:port for uvicorn to serve on; ServeError with the reason when it cannot be bound."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror} (--host takes an address or a name of this machine)"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (another server is there: pick another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return sock
