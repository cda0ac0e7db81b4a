"""GLM's blank-filling loop (docs/glm.md 4.1): fill every [MASK] / [sMASK] / [gMASK] left to right on one growing cache.
In: a session (ONNX Runtime, TensorRT or the torch reference), a GLMTokenizer, prompts, decoding settings.
Out: one FillResult per prompt (filled text, spans, tokens, timings), or StreamEvents as tokens come."""
from __future__ import annotations

import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from glm_runtime.beam import beam_search_span, check_beam
from glm_runtime.sampling import GenerationError, check_sampling
from glm_runtime.session import Session
from glm_runtime.steps import context_pass, prefill_span
from glm_runtime.tokenizer import build_context_ids, find_blanks

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class Span:
    text: str
    token_ids: list[int]
    blank: str  # the blank token it fills: "[MASK]", "[sMASK]" or "[gMASK]"
    position: int  # index of that blank in the context ids (its position id)
    stop: str  # why it ended: "eop", "eos" or "length" (max_new_tokens reached)


@dataclass
class FillResult:
    text: str  # the prompt with every blank replaced by its span
    spans: list[Span]
    tokens: list[int]  # the original's output layout: context ids, then sop + span ids per blank (no eop)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    kind: str  # "token" (a new span token), "span" (a finished span), "result" (a finished prompt),
    #            "cancelled" / "failed" (the request ended without a result; text says why when failed)
    prompt: Any  # index of the prompt (the engine's request id)
    blank: int = -1  # index of the blank within the prompt
    token_id: Optional[int] = None
    text: str = ""  # the token's or span's text
    span: Optional[Span] = None
    result: Optional[FillResult] = None


@dataclass
class _Prompt:
    index: int
    text: str
    ids: list[int]
    blanks: list[tuple[int, int]]  # (position, mask id)


# ---------------------------------------------------------------- checking the request

# which options each strategy reads; passing one another strategy does not read is refused, never ignored
STRATEGY_OPTIONS = {"greedy": (), "sample": ("temperature", "top_k", "top_p", "seed"),
                    "beam": ("num_beams", "length_penalty", "early_stopping")}
OPTION_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": None, "num_beams": 1,
                   "length_penalty": 1.0, "early_stopping": False}


def resolve_settings(max_new_tokens: Any = 32, strategy: str = "greedy", **options: Any) -> dict[str, Any]:
    """Check a request and fill in the defaults: the options a strategy reads (STRATEGY_OPTIONS) take their
    defaults when left None; an option given (not None) to a strategy that does not read it is refused."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise GenerationError(f"unknown setting {unknown[0]!r}; settings are max_new_tokens, strategy and "
                              f"{', '.join(OPTION_DEFAULTS)}")
    for name, value in options.items():
        if value is not None and name not in STRATEGY_OPTIONS[strategy]:
            owner = next(k for k, v in STRATEGY_OPTIONS.items() if name in v)
            flag = "--" + name.replace("_", "-")
            raise GenerationError(f"{flag} applies to --strategy {owner}, not {strategy}; drop it or pass "
                                  f"--strategy {owner}")
    settings = {name: OPTION_DEFAULTS[name] if options.get(name) is None else options[name]
                for name in OPTION_DEFAULTS}
    if strategy == "sample":
        check_sampling(settings["temperature"], settings["top_k"], settings["top_p"])
    if strategy == "beam":
        check_beam(settings["num_beams"], settings["length_penalty"], settings["early_stopping"])
    return {"max_new_tokens": max_new_tokens, "strategy": strategy, **settings}


def prepare_prompt(tokenizer: Any, text: Any, index: Any, append_gmask: bool, max_new_tokens: int,
                   max_positions: int) -> _Prompt:
    """Context ids and blanks of one prompt; refuses, before any work, a prompt that cannot fit.

    GLM was trained on sequences of at most P tokens (Part A + every sop + span), and the original generator
    keeps at most P - 1 memory positions (docs/glm.md 3.3); so C + blanks x (1 + max_new_tokens) must be <= P,
    which also keeps every block position (<= max_new_tokens + 1) inside the table.
    """
    if not isinstance(text, str):
        raise GenerationError(f"prompt {index} is a {type(text).__name__}, expected a string")
    try:
        ids = build_context_ids(tokenizer, text, append_gmask=append_gmask)
    except ValueError as exc:
        raise GenerationError(f"prompt {index}: {exc}") from None
    blanks = find_blanks(ids, tokenizer)
    need = len(ids) + len(blanks) * (1 + max_new_tokens)
    if need > max_positions:
        room = (max_positions - len(ids)) // len(blanks) - 1
        fix = (f"lower max_new_tokens to {room} or shorten the prompt" if room >= 1
               else "shorten the prompt or use fewer blanks")
        raise GenerationError(
            f"prompt {index} is too long for the model: {len(ids)} context tokens + {len(blanks)} blank(s) x "
            f"(1 + {max_new_tokens} new tokens) = {need} positions > max_sequence_length {max_positions}; {fix}")
    return _Prompt(index, text, ids, blanks)


# ---------------------------------------------------------------- text out

def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ids, skipping ids that have no text (padded vocabulary rows a model may still pick, docs/glm.md 9.8)."""
    known = []
    for i in ids:
        try:
            tokenizer.id_to_token(int(i))
        except ValueError:
            continue
        known.append(int(i))
    return tokenizer.decode(known)


def _assemble(tokenizer: Any, prompt: _Prompt, spans: list[Span], timings: dict[str, float]) -> FillResult:
    """Splice each span's ids in place of its blank, drop [ENC] and the final eos, decode once."""
    special = tokenizer.special
    by_pos = {s.position: s.token_ids for s in spans}
    last = len(prompt.ids) - 1
    drop = {0} if prompt.ids[0] == special["ENC"] else set()
    if prompt.ids[last] == special["eos"] and last not in by_pos:
        drop.add(last)
    spliced: list[int] = []
    for k, i in enumerate(prompt.ids):
        if k not in drop:
            spliced.extend(by_pos.get(k, [i]))
    tokens = list(prompt.ids)
    for s in spans:
        tokens += [special["sop"], *s.token_ids]
    return FillResult(_decode(tokenizer, spliced), spans, tokens, timings)


def _blank_name(tokenizer: Any, mask_id: int) -> str:
    return tokenizer.id_to_token(mask_id)


def _timings(t0: float, t1: float, t2: float, steps: int, generated: int) -> dict[str, float]:
    decode = t2 - t1
    return {"context_s": t1 - t0, "decode_s": decode, "total_s": t2 - t0, "decode_steps": float(steps),
            "new_tokens": float(generated), "tokens_per_s": generated / decode if decode > 0 else 0.0}


# ---------------------------------------------------------------- beam search: one prompt, beams as rows

def _fill_beam(session: Session, tokenizer: Any, prompt: _Prompt, max_new_tokens: int, num_beams: int,
               length_penalty: float, early_stopping: bool) -> Iterator[StreamEvent]:
    special = tokenizer.special
    stops = {special["eop"]: "eop", special["eos"]: "eos"}
    t0 = time.perf_counter()
    capacity = len(prompt.ids) + len(prompt.blanks) * (1 + max_new_tokens) + 1
    cache = session.new_cache(num_beams, capacity)
    context_pass(session, cache, [prompt.ids], special["pad"], repeat=num_beams)
    t1 = time.perf_counter()
    spans: list[Span] = []
    steps = 0
    for k, (pos, mask_id) in enumerate(prompt.blanks):
        start = cache.filled.copy()
        best, calls = beam_search_span(session, cache, pos, sop=special["sop"], stops=stops, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                early_stopping=early_stopping)
        steps += calls
        for token in best.tokens:
            yield StreamEvent("token", prompt.index, k, token, _decode(tokenizer, [token]))
        span = Span(_decode(tokenizer, best.tokens), best.tokens, _blank_name(tokenizer, mask_id), pos, best.stop)
        spans.append(span)
        yield StreamEvent("span", prompt.index, k, text=span.text, span=span)
        if k + 1 < len(prompt.blanks):  # the beams overwrote each other: keep the prefix, feed the winner once
            cache.truncate(start)
            prefill_span(session, cache, [special["sop"], *best.tokens], pos)
            steps += 1
    generated = sum(len(s.token_ids) for s in spans)
    result = _assemble(tokenizer, prompt, spans, _timings(t0, t1, time.perf_counter(), steps, generated))
    yield StreamEvent("result", prompt.index, text=result.text, result=result)


# ---------------------------------------------------------------- entry points

def stream_blanks(session: Session, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32,
                  strategy: str = "greedy", temperature: Optional[float] = None, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, seed: Optional[int] = None, num_beams: Optional[int] = None,
                  length_penalty: Optional[float] = None, early_stopping: Optional[bool] = None,
                  append_gmask: bool = False, rows: Optional[int] = None) -> Iterator[StreamEvent]:
    """fill_blanks as an iterator of StreamEvents: tokens and spans as they come, each prompt's result when it
    is done. Runs on the engine (runtime/engine.py): every prompt is checked and submitted first (a bad one is
    refused before any work), then the engine steps until all are done. rows: how many prompts decode together
    (None = all of them); the others wait for a row."""
    from glm_runtime.engine import Engine
    if isinstance(prompts, str) or not len(prompts):
        raise GenerationError("prompts must be a non-empty list of strings")
    engine = Engine(session, tokenizer, rows=len(prompts) if rows is None else rows)
    options = dict(max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, append_gmask=append_gmask)
    for i, text in enumerate(prompts):
        engine.submit(text, request_id=i, **options)
    while engine.has_work():
        yield from engine.step()


def fill_blanks(session: Session, tokenizer: Any, prompts: Sequence[str] | str, *, max_new_tokens: int = 32,
                strategy: str = "greedy", temperature: Optional[float] = None, top_k: Optional[int] = None,
                top_p: Optional[float] = None, seed: Optional[int] = None, num_beams: Optional[int] = None,
                length_penalty: Optional[float] = None, early_stopping: Optional[bool] = None,
                append_gmask: bool = False, rows: Optional[int] = None,
                stream: Optional[Callable[[StreamEvent], None]] = None) -> list[FillResult]:
    """Fill every blank of every prompt; `stream(event)` is called for each token, span and result.

    strategy: "greedy" (batched), "sample" (temperature / top_k / top_p; each prompt's random stream comes from
    the seed and the prompt's text alone, so a prompt samples the same alone, in a file or in a served batch), or
    "beam" (num_beams per prompt, per span; score = sum log-prob / length ** length_penalty). Settings that the
    strategy does not read are refused (resolve_settings), never ignored. rows: prompts decoding together
    (None = all); a prompt's answer does not depend on which others share its batch.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    results: dict[int, FillResult] = {}
    for event in stream_blanks(session, tokenizer, prompts, max_new_tokens=max_new_tokens, strategy=strategy,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               num_beams=num_beams, length_penalty=length_penalty,
                               early_stopping=early_stopping, append_gmask=append_gmask, rows=rows):
        if stream is not None:
            stream(event)
        if event.kind == "result":
            results[event.prompt] = event.result
    return [results[i] for i in range(len(prompts))]


def fill_model(prompts: Sequence[str] | str, *, model: Optional[str] = None, backend: str = "onnxruntime",
               **settings: Any) -> list[FillResult]:
    """fill_blanks on a model folder (None = the bundled model) opened on `backend`, in one call."""
    from glm_runtime.session import open_model
    session, tokenizer = open_model(model, backend)
    return fill_blanks(session, tokenizer, prompts, **settings)
