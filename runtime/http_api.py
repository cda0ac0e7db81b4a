"""The HTTP API's bodies: what POST /v1/completions (OpenAI-shaped) and POST /v1/fill accept, checked and turned
into engine requests, and the shapes of their answers. In: a parsed JSON body; the engine's events and results.
Out: an Ask (FillRequests, echo, stream) or BadRequest (the one-line error the server answers, in the route's own
field names); answer bodies and server-sent events. runtime/serve.py holds the server that uses them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glm_runtime.requests import FILL_FIELDS, FillRequest, FillResult, Span, StreamEvent
from glm_runtime.sampling import GenerationError

if TYPE_CHECKING:
    from glm_runtime.engine import Job

FILL_KEYS = (*FILL_FIELDS, "stream")  # what POST /v1/fill takes
# OpenAI completion fields: what glmx does with each. Anything else is refused with its name.
COMPLETION_KEYS = (
    "model",
    "prompt",
    "suffix",
    "max_tokens",
    "echo",
    "stream",
    "temperature",
    "top_p",
    "seed",
    "user",
    "n",
    "best_of",
    "logprobs",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream_options",
    "glmx",
)
GLMX_COMPLETION_KEYS = ("strategy", "top_k", "num_beams", "length_penalty", "early_stopping")
COMPLETION_NAMES = {"max_new_tokens": "max_tokens"}  # glmx's field -> the completion route's, in messages
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class BadRequest(Exception):
    """A request the server answers with an error: its HTTP status, OpenAI's error type, extra headers."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


@dataclass
class Ask:
    """One HTTP request's engine requests, checked, and how to answer: echo the filled text, stream events."""

    route: str  # "completions", "fill" or "chat"
    requests: list[FillRequest]
    echo: bool
    stream: bool
    chat: Any = None  # a chat request's fitted prompt (glm_runtime.chat.ChatPrompt)


def _is_number(value: Any) -> bool:
    """A JSON number: true and false are not numbers (Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unsupported(body: dict[str, Any]) -> None:
    """OpenAI options glmx does not implement answer 400, never silently ignored (defaults are accepted, and only
    as the JSON type OpenAI gives them: `"n": true` is not 1)."""
    rules: dict[str, Callable[[Any], bool]] = {
        "n": lambda v: v is None or (_is_number(v) and v == 1),
        "best_of": lambda v: v is None or (_is_number(v) and v == 1),
        "logprobs": lambda v: v is None,
        "presence_penalty": lambda v: v is None or (_is_number(v) and v == 0),
        "frequency_penalty": lambda v: v is None or (_is_number(v) and v == 0),
        "logit_bias": lambda v: v is None or v == {},
        "stream_options": lambda v: v is None,
    }
    refuse_unsupported(body, rules, "spans end at eop / eos, a stop string or max_tokens; one choice per prompt")


def refuse_unsupported(body: dict[str, Any], rules: dict[str, Callable[[Any], bool]], why: str) -> None:
    """The first option of body that its rule does not accept (a value meaning "not used") answers 400 with its
    name and value, and why glmx does not do it: never silently ignored."""
    for key, ok in rules.items():
        if key in body and not ok(body[key]):
            raise BadRequest(
                f"{key}={json.dumps(body[key])} is not supported by glmx ({why}); drop it", kind="unsupported_parameter"
            )


def engine_requests(route: str, prompts: list[str], settings: dict[str, Any]) -> list[FillRequest]:
    """FillRequests of one HTTP request, each checked; a bad setting is one 400 in the route's own field names."""
    try:
        return [FillRequest.make(prompt, **settings) for prompt in prompts]
    except GenerationError as exc:
        raise BadRequest(said(exc, route)) from None


def said(exc: GenerationError, route: str, index: int | None = None) -> str:
    """A refused setting or prompt in the route's own words: its field names, and a prompt named by its index in
    the request's list ("prompt 1"), or "the prompt" when the request has one."""
    names = dict(COMPLETION_NAMES) if route == "completions" else {}
    names["prompt"] = "the prompt" if index is None else f"prompt {index}"
    return " ".join(exc.said_as(names).split())


def _flag(body: dict[str, Any], key: str) -> bool:
    """A JSON boolean field (absent: false); "false" or 0 is refused, never read as true or false."""
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" must be true or false, got {json.dumps(value)}')
    return value


def completion_request(body: dict[str, Any], max_prompts: int | None = None) -> Ask:
    """An OpenAI completion request as engine requests; BadRequest when it is not one. max_prompts: the most
    prompts the server can ever hold at once (rows + waiting); a longer list could never be admitted."""
    unknown = sorted(set(body) - set(COMPLETION_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /v1/completions takes {', '.join(COMPLETION_KEYS)}")
    _unsupported(body)
    for key in ("model", "user"):
        if key in body and not isinstance(body[key], str):
            raise BadRequest(f'"{key}" must be a string')
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and not _is_number(body[key]):
            raise BadRequest(f'"{key}" must be a number, got {json.dumps(body[key])}')
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompt" must be a string or a non-empty list of strings')
    if max_prompts is not None and len(prompts) > max_prompts:
        raise BadRequest(
            f"this request holds {len(prompts)} prompts, and the server holds at most {max_prompts} at once "
            f"(--rows + --max-waiting): it could never be admitted; send at most {max_prompts} per request"
        )
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise BadRequest('"suffix" must be a string')
        prompts = [p + "[MASK]" + suffix for p in prompts]
    extra = body.get("glmx") or {}
    if not isinstance(extra, dict) or set(extra) - set(GLMX_COMPLETION_KEYS):
        raise BadRequest(f'"glmx" must be an object with any of {", ".join(GLMX_COMPLETION_KEYS)}')
    temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    strategy = extra.get("strategy")
    if strategy is None:  # OpenAI's knobs pick the strategy: temperature 0 or none given = greedy
        sampling = (temperature not in (None, 0, 0.0)) or (top_p not in (None, 1, 1.0)) or "top_k" in extra
        strategy = "sample" if sampling else "greedy"
    budget = body.get("max_tokens")
    settings = {
        "max_new_tokens": DEFAULT_MAX_TOKENS if budget is None else budget,
        "strategy": strategy,
        **{k: v for k, v in extra.items() if k != "strategy"},
    }
    if body.get("stop") not in (None, [], ""):  # a span ends at the first stop string, which is cut off
        settings["stop"] = body["stop"]
    if strategy == "sample":
        settings.update(temperature=temperature, top_p=top_p, seed=seed)
    else:
        for key, value in (
            ("temperature", temperature if temperature not in (0, 0.0) else None),
            ("top_p", top_p),
            ("seed", seed),
        ):
            if value is not None:
                raise BadRequest(f"{key} applies to sampling, not {strategy}; drop it or set temperature > 0")
    echo, stream = body.get("echo", False), body.get("stream", False)
    if not isinstance(echo, bool) or not isinstance(stream, bool):
        raise BadRequest('"echo" and "stream" must be true or false')
    if echo and stream:
        raise BadRequest(
            "echo with stream is not supported: the filled text is known at the end; stream without "
            "echo (the last chunk's glmx.text holds the filled text)",
            kind="unsupported_parameter",
        )
    # a prompt without a blank is continued at its end, as a completion ([gMASK] appended)
    return Ask("completions", engine_requests("completions", prompts, {**settings, "append_gmask": True}), echo, stream)


def fill_request(body: dict[str, Any]) -> Ask:
    """A /v1/fill request: glmx fill --jsonl's keys, plus stream."""
    unknown = sorted(set(body) - set(FILL_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /v1/fill takes {', '.join(FILL_KEYS)}")
    if not isinstance(body.get("prompt"), str):
        raise BadRequest('"prompt" must be a string')
    stream = _flag(body, "stream")
    settings = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
    settings["append_gmask"] = _flag(body, "append_gmask")
    return Ask("fill", engine_requests("fill", [body["prompt"]], settings), False, stream)


def json_body(data: bytes) -> dict[str, Any]:
    """A POST body that must be one JSON object."""
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def parse_body(data: bytes, route: str, model_id: str, max_prompts: int, max_prompt_chars: int | None) -> Ask:
    """A POST body of `route` ("completions" or "fill") as engine requests, every check made: JSON, fields, the
    served model's name, at most max_prompts prompts (rows + waiting), none longer than max_prompt_chars (no
    longer text fits the model: refused before it is tokenized)."""
    body = json_body(data)
    if route == "fill":
        ask = fill_request(body)
    else:
        model = body.get("model")
        if isinstance(model, str) and model != model_id:
            raise BadRequest(
                f"model {model!r} is not served here; GET /v1/models lists {model_id!r}", 404, "model_not_found"
            )
        ask = completion_request(body, max_prompts=max_prompts)
    for i, request in enumerate(ask.requests):
        if max_prompt_chars is not None and len(request.prompt) > max_prompt_chars:
            which = "the prompt" if len(ask.requests) == 1 else f"prompt {i}"
            raise BadRequest(
                f"{which} has {len(request.prompt)} characters, and no text of more than {max_prompt_chars} "
                f"characters fits this model's max_sequence_length; shorten it"
            )
    return ask


# ---------------------------------------------------------------- answers


def sse(obj: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def finish_reason(spans: list[Span]) -> str:
    return "length" if any(s.stop == "length" for s in spans) else "stop"


def error_response(
    message: str, status: int = 400, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def completion_body(
    model_id: str, cid: str, created: int, jobs: list[Job], results: dict[Any, FillResult], echo: bool
) -> dict[str, Any]:
    """A finished /v1/completions answer: one choice per prompt, in order, with usage."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, job in enumerate(jobs):
        result = results[job.id]
        prompt_tokens += job.context_tokens
        completion_tokens += job.new_tokens
        choices.append(
            {
                "index": i,
                "text": result.text if echo else "".join(s.text for s in result.spans),
                "logprobs": None,
                "finish_reason": finish_reason(result.spans),
                "glmx": {"text": result.text, "spans": [vars(s) for s in result.spans]},
            }
        )
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def fill_chunk(event: StreamEvent, prompt: str) -> dict[str, Any]:
    """One server-sent event of /v1/fill: a token, a span or the result."""
    if event.kind == "token":
        return {"kind": "token", "blank": event.blank, "token_id": event.token_id, "text": event.text}
    if event.kind == "span":
        return {"kind": "span", "blank": event.blank, "rest": event.rest, "span": vars(event.span)}
    assert event.result is not None
    return {"kind": "result", "prompt": prompt, **event.result.to_dict()}


def completion_choice(event: StreamEvent, index: int) -> dict[str, Any]:
    """The choice of one streamed /v1/completions chunk."""
    choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
    if event.kind == "token":
        choice.update(text=event.text, glmx={"blank": event.blank, "token_id": event.token_id})
    elif event.kind == "span":
        choice.update(text=event.rest, glmx={"blank": event.blank, "span": vars(event.span)})
    elif event.result is not None:
        choice.update(
            finish_reason=finish_reason(event.result.spans),
            glmx={"text": event.result.text, "spans": [vars(s) for s in event.result.spans]},
        )
    return choice
