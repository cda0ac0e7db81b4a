"""The web playground of `glmx serve` and the scoring route it uses. In: the Server (runtime/serve.py). Out: its extra
routes: POST /v1/score (glmx score --json's shape, each candidate's probability added), and unless --no-ui, GET / (the
page) and GET /ui/app.js, /ui/style.css (package data in runtime/ui/: plain HTML, CSS and JavaScript, no build step,
nothing from another host). The page talks to the server only through its API; model_facts() adds what it shows
of the model (architecture, backend, whether it chats) to GET /v1/models."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from importlib import resources
from typing import Any

from glm_runtime.cloze import ScoreError
from glm_runtime.engine import EngineError, QueueFull
from glm_runtime.http_api import BadRequest, error_response, json_body
from glm_runtime.requests import ScoreRequest, StreamEvent

SCORE_KEYS = ("prompt", "candidates", "length_penalty", "single_token")
MAX_CANDIDATES = 64
# the page's files: name -> media type (a fixed table: no path from the request ever reaches the file system)
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# the browser may load and send nothing outside this server, and runs no inline script (a text that slipped into
# the markup could not run)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
BACKENDS = {"OnnxRuntimeSession": "onnxruntime", "TensorRTSession": "tensorrt", "TorchSession": "torch"}
_score_ids = itertools.count()


def model_facts(session: Any) -> dict[str, Any]:
    """What the page shows of a loaded model besides its precision: architecture, backend, and whether it chats."""
    backend = BACKENDS.get(type(session).__name__, type(session).__name__)
    if backend == "PipelineSession":  # glmx serve --stages: ONNX Runtime in each stage
        backend = f"onnxruntime, {len(session.ranges)} pipeline stages"
    providers = [str(p[0] if isinstance(p, (tuple, list)) else p) for p in getattr(session, "providers", ())]
    if backend == "onnxruntime" and providers and providers[0] == "CUDAExecutionProvider":
        backend = "onnxruntime-cuda"
    config = session.config
    return {"architecture": config.architecture, "backend": backend, "chat": config.arch.chat is not None}


def playground_routes(server: Any, ui: bool = True) -> list[Any]:
    """POST /v1/score always; the page's routes unless ui is False (glmx serve --no-ui)."""
    from starlette.routing import Route

    async def score(http: Any) -> Any:
        return await answer_score(server, http)

    routes = [Route("/v1/score", score, methods=["POST"])]
    if ui:
        routes.append(Route("/", page_file("index.html"), methods=["GET"]))
        files = [name for name in PAGE_FILES if name != "index.html"]
        routes += [Route(f"/ui/{name}", page_file(name), methods=["GET"]) for name in files]
    return routes


def page_file(name: str) -> Any:
    """A handler answering one of the page's files (read once, at the first request)."""
    media = PAGE_FILES[name]
    cached: list[bytes] = []

    async def handler(http: Any) -> Any:
        from starlette.responses import Response

        if not cached:
            cached.append(resources.files("glm_runtime").joinpath("ui").joinpath(name).read_bytes())
        return Response(cached[0], media_type=f"{media}; charset=utf-8", headers=PAGE_HEADERS)

    return handler


# ---------------------------------------------------------------- POST /v1/score


def score_request(body: dict[str, Any], max_prompt_chars: int | None) -> ScoreRequest:
    """A /v1/score body as one ScoreRequest; BadRequest names the field that is wrong."""
    unknown = sorted(set(body) - set(SCORE_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /v1/score takes {', '.join(SCORE_KEYS)}")
    prompt, candidates = body.get("prompt"), body.get("candidates")
    if not isinstance(prompt, str):
        raise BadRequest('"prompt" must be a string with one blank')
    if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
        raise BadRequest(f"the prompt has {len(prompt)} characters; no text of more than {max_prompt_chars} fits")
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise BadRequest('"candidates" must be a non-empty list of strings')
    if len(candidates) > MAX_CANDIDATES:
        raise BadRequest(f'"candidates" holds {len(candidates)}; send at most {MAX_CANDIDATES}')
    penalty, single = body.get("length_penalty", 0.0), body.get("single_token", False)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
        raise BadRequest(f'"length_penalty" must be a finite number (0 = the plain sum), got {json.dumps(penalty)}')
    if not isinstance(single, bool):
        raise BadRequest(f'"single_token" must be true or false, got {json.dumps(single)}')
    return ScoreRequest((prompt,), (tuple(candidates),), float(penalty), single, f"score-{next(_score_ids)}")


def scored(prompt: str, candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """glmx score --json's answer, each candidate's probability among the candidates (softmax of the scores) added."""
    top = max(c["score"] for c in candidates)
    weights = [math.exp(c["score"] - top) for c in candidates]
    total = sum(weights)
    winner = max(range(len(candidates)), key=lambda i: candidates[i]["score"])
    return {
        "prompt": prompt,
        "winner": candidates[winner]["text"],
        "candidates": [{**c, "probability": w / total} for c, w in zip(candidates, weights)],
    }


async def answer_score(server: Any, http: Any) -> Any:
    """POST /v1/score: checked and tokenized in a worker thread, run whole by the engine between decode steps."""
    from starlette.responses import JSONResponse

    denied = server.check_key(http)
    if denied is not None:
        return denied
    try:
        loop = server.engine_loop()
        data = await server.read_body(http)
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        aio = asyncio.get_running_loop()

        def deliver(event: StreamEvent) -> None:
            aio.call_soon_threadsafe(queue.put_nowait, event)

        def submit() -> Any:
            request = score_request(json_body(data), server.max_prompt_chars)
            try:
                return loop.submit(request, deliver)
            except QueueFull as exc:
                raise BadRequest(str(exc), 429, "server_busy", {"Retry-After": str(round(exc.retry_after))}) from None
            except EngineError as exc:  # the engine stopped or is stopping: not the request's fault
                raise BadRequest(" ".join(str(exc).split()), 503, "unavailable") from None
            except ScoreError as exc:  # one prompt: "the prompt", as the fill routes say
                raise BadRequest(" ".join(str(exc).split()).replace("prompt 0", "the prompt", 1)) from None

        job = await asyncio.to_thread(submit)
        try:
            event = await asyncio.wait_for(queue.get(), server.timeout)
        except asyncio.TimeoutError:
            loop.cancel(job, "timeout")
            late = f"the request did not finish within --timeout {server.timeout:g} s"
            raise BadRequest(late, 504, "timeout") from None
    except BadRequest as exc:
        return error_response(str(exc), exc.status, exc.kind, exc.headers)
    if event.kind != "scores" or event.scores is None:
        return error_response(f"the engine failed: {event.text or event.kind}", 500, "server_error")
    return JSONResponse(scored(job.request.prompts[0], [c.to_dict() for c in event.scores[0]]))
