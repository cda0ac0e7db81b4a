"""GLM's blank filling, the entry points (docs/glm.md 4.1): fill every [MASK] / [sMASK] / [gMASK] left to right.
In: a session (ONNX Runtime, TensorRT or the torch reference), a GLMTokenizer, prompts, decoding settings.
Out: one FillResult per prompt (filled text, spans, tokens, timings), or StreamEvents as tokens come.
Each call makes FillRequests (runtime/requests.py) and runs them with Engine.run (runtime/engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from glm_runtime.backend import Session
from glm_runtime.engine import Engine
from glm_runtime.requests import STRATEGIES, FillRequest, FillResult, Span, StreamEvent, resolve_settings
from glm_runtime.sampling import GenerationError
from glm_runtime.tokenizer import GLMTokenizer

__all__ = [
    "STRATEGIES",
    "FillResult",
    "Span",
    "StreamEvent",
    "fill_blanks",
    "fill_model",
    "resolve_settings",
    "stream_blanks",
]


def stream_blanks(
    session: Session,
    tokenizer: GLMTokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    strategy: str = "greedy",
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | None = None,
    stop: Sequence[str] | str | None = None,
    append_gmask: bool = False,
    rows: int | None = None,
) -> Iterator[StreamEvent]:
    """fill_blanks as an iterator of StreamEvents: tokens and spans as they come, each prompt's result when it
    is done. Every prompt is checked and submitted first (a bad one is refused before any work), then the
    engine steps until all are done. rows: how many prompts decode together (None = all of them); the others
    wait for a row."""
    if isinstance(prompts, str) or not len(prompts):
        raise GenerationError("prompts must be a non-empty list of strings")
    requests = [
        FillRequest.make(
            text,
            max_new_tokens=max_new_tokens,
            strategy=strategy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            stop=stop,
            append_gmask=append_gmask,
            id=i,
        )
        for i, text in enumerate(prompts)
    ]
    engine = Engine(session, tokenizer, rows=len(prompts) if rows is None else rows)
    return engine.run(requests)


def fill_blanks(
    session: Session,
    tokenizer: GLMTokenizer,
    prompts: Sequence[str] | str,
    *,
    stream: Callable[[StreamEvent], None] | None = None,
    **settings: Any,
) -> list[FillResult]:
    """Fill every blank of every prompt; `stream(event)` is called for each token, span and result.

    settings (stream_blanks' keywords): max_new_tokens, strategy: "greedy" (batched), "sample" (temperature /
    top_k / top_p; each prompt's random stream comes from the seed and the prompt's text alone, so a prompt
    samples the same alone, in a file or in a served batch), or "beam" (num_beams per prompt, per span; score =
    sum log-prob / length ** length_penalty); append_gmask; rows: prompts decoding together (None = all); a
    prompt's answer does not depend on which others share its batch. Settings that the strategy does not read
    are refused (resolve_settings), never ignored.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    results: dict[int, FillResult] = {}
    for event in stream_blanks(session, tokenizer, prompts, **settings):
        if stream is not None:
            stream(event)
        if event.kind == "result" and event.result is not None:
            results[event.prompt] = event.result
    return [results[i] for i in range(len(prompts))]


def fill_model(
    prompts: Sequence[str] | str, *, model: str | None = None, backend: str = "onnxruntime", **settings: Any
) -> list[FillResult]:
    """fill_blanks on a model folder (None = the bundled model) opened on `backend`, in one call."""
    from glm_runtime.session import open_model

    session, tokenizer = open_model(model, backend)
    return fill_blanks(session, tokenizer, prompts, **settings)
