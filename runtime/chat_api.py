"""POST /v1/chat/completions (OpenAI-shaped) for a chat model: the body checked and turned into one engine request
through glm_runtime.chat (the model's round template, the history fitted to its positions), and the shapes of the
answer and of its server-sent chunks. runtime/serve.py routes to it; the request runs on the same engine rows as
/v1/completions and /v1/fill."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from glm_runtime.chat import (
    AnswerStream,
    ChatError,
    ChatPrompt,
    chat_request,
    chat_rule,
    chat_settings,
    conversation_of,
    fit_conversation,
    process_response,
)
from glm_runtime.http_api import Ask, BadRequest, refuse_unsupported, said
from glm_runtime.requests import FillResult, StreamEvent
from glm_runtime.sampling import GenerationError

# OpenAI chat fields: what glmx does with each; anything else is refused by name
CHAT_KEYS = (
    "model",
    "messages",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "user",
    "n",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream_options",
)
# what glmx does not do, with the value that means "not used" (sent by some clients) allowed
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v in (None, 1),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "stream_options": lambda v: v is None,
}


def chat_ask(body: Any, model_id: str, tokenizer: Any, config: Any) -> Ask:
    """A chat completion request as one engine request, every check made (400 with the field named; 404 for
    another model's name)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(CHAT_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /v1/chat/completions takes {', '.join(CHAT_KEYS)}")
    refuse_unsupported(body, UNSUPPORTED, "one plain-text answer per request; no tools, log-probabilities or penalties")
    model = body.get("model")
    if model is not None and model != model_id:
        raise BadRequest(
            f"model {model!r} is not served here; GET /v1/models lists {model_id!r}", 404, "model_not_found"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest('"stream" must be true or false')
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and (isinstance(body[key], bool) or not isinstance(body[key], (int, float))):
            raise BadRequest(f'"{key}" must be a number, got {json.dumps(body[key])}')
    try:
        rule = chat_rule(config)
        conversation = conversation_of(body.get("messages"))
        settings = chat_settings(rule, body.get("temperature"), body.get("top_p"), body.get("seed"), body.get("stop"))
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise BadRequest(f"max_tokens must be an integer >= 1, got {json.dumps(budget)}")
        prompt = fit_conversation(tokenizer, rule, conversation, int(config.max_sequence_length), budget)
        request = chat_request(prompt, settings)
    except ChatError as exc:
        raise BadRequest(str(exc)) from None
    except GenerationError as exc:
        raise BadRequest(said(exc, "completions")) from None
    return Ask("chat", [request], False, stream, chat=prompt)


def finish(result: FillResult) -> str:
    return "length" if result.spans[0].stop == "length" else "stop"


def chat_body(model_id: str, job: Any, result: FillResult, prompt: ChatPrompt) -> dict:
    """A finished chat completion: the answer post-processed as the model's chat() does, with usage."""
    return {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": process_response(result.spans[0].text)},
                "logprobs": None,
                "finish_reason": finish(result),
            }
        ],
        "usage": {
            "prompt_tokens": job.context_tokens,
            "completion_tokens": job.new_tokens,
            "total_tokens": job.context_tokens + job.new_tokens,
        },
        "glmx": {"dropped_rounds": prompt.dropped},
    }


class ChatChunks:
    """The server-sent chunks of one streamed chat answer: the role first, then content deltas that never take a
    character back (glm_runtime.chat.AnswerStream), then the finish reason."""

    def __init__(self, model_id: str, cid: str, created: int):
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id}
        self.answer = AnswerStream()

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **self.head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def of(self, event: StreamEvent) -> list[dict[str, Any]]:
        if event.kind in ("token", "span"):
            text = self.answer.add(event.text if event.kind == "token" else event.rest)
            return [self.chunk({"content": text})] if text else []
        if event.kind == "result" and event.result is not None:
            text = self.answer.end()
            return [*([self.chunk({"content": text})] if text else []), self.chunk({}, finish(event.result))]
        return []
