"""Beam search: one prompt's beams are the rows of a cache of its own, run whole (every blank, left to right).
In: a session, a tokenizer, a prepared prompt and its settings. Out: StreamEvents (tokens, spans, the result);
each span's score = sum of log-probs / length ** length_penalty (length counts eop / eos), deterministic.
The engine (runtime/engine.py) runs a beam request this way, outside its pool of rows, in the step that takes it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from glm_runtime import masks
from glm_runtime.backend import KVCacheLike, Session
from glm_runtime.requests import (
    Prompt,
    Settings,
    Span,
    StreamEvent,
    assemble_result,
    decode_text,
    new_text,
    span_stops,
    splice_span,
    spliced_ids,
)
from glm_runtime.sampling import log_softmax
from glm_runtime.steps import context_pass, decode_step, open_cache, prefill_span
from glm_runtime.tokenizer import GLMTokenizer


@dataclass
class Hypothesis:
    tokens: list[int]
    stop: str  # "eop" | "eos" | "length"
    logprob: float  # sum of the log-probabilities of its tokens (and of the stop token)
    score: float  # logprob / length ** length_penalty


def _normalise(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


def _top_candidates(scores: np.ndarray, count: int) -> list[tuple[float, int]]:
    """The `count` best (score, flat index) of [k, V] scores, ties to the lower index (as greedy's argmax)."""
    flat = scores.reshape(-1)
    count = min(count, flat.size)
    part = np.argpartition(-flat, count - 1)[:count]
    order = np.lexsort((part, -flat[part]))
    return [(float(flat[part[i]]), int(part[i])) for i in order]


def beam_search_span(
    session: Session,
    cache: KVCacheLike,
    mask_pos: int,
    *,
    sop: int,
    stops: dict[int, str],
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool,
    count_from: int = -1,
) -> tuple[Hypothesis, int]:
    """Search one span -> (best hypothesis, decode calls made). Leaves the cache holding some beams' tokens
    (the caller truncates it to the span's start and feeds the winner once).

    Each step keeps the top 2k candidates (the original draws them with multinomial, docs/glm.md 4.1; glmx is
    deterministic); a stop among the first k ends a hypothesis; a span reaching the budget has length = budget.
    count_from >= 0: the span's positions count up from there (GLM-130B's [gMASK], masks.decode_positions).
    """
    k = num_beams
    live_tokens: list[list[int]] = [[] for _ in range(k)]
    live_scores = np.full(k, -np.inf)
    live_scores[0] = 0.0  # all rows start identical: expand only the first
    feed = [sop] * k
    finished: list[Hypothesis] = []

    def add(h: Hypothesis) -> None:
        finished.append(h)
        finished.sort(key=lambda x: -x.score)
        del finished[k:]

    steps = 0
    for step in range(max_new_tokens):
        steps += 1
        positions = masks.decode_positions([mask_pos] * k, [step] * k, [count_from] * k)
        logits = decode_step(session, cache, feed, positions, [True] * k)
        candidates = live_scores[:, None] + log_softmax(logits)  # [k, V]
        vocab = candidates.shape[1]
        chosen: list[tuple[int, int, float]] = []  # (source beam, token, summed logprob)
        for rank, (score, flat) in enumerate(_top_candidates(candidates, 2 * k)):
            if not np.isfinite(score):
                break
            beam, token = divmod(flat, vocab)
            if token in stops:
                if rank < k:  # a stop outside the first k candidates would not have survived anyway
                    length = len(live_tokens[beam]) + 1
                    add(
                        Hypothesis(
                            list(live_tokens[beam]), stops[token], score, _normalise(score, length, length_penalty)
                        )
                    )
                continue
            chosen.append((beam, token, score))
            if len(chosen) == k:
                break
        length = step + 1  # span tokens of every live beam after this step
        if not chosen:
            break
        if len(finished) >= k:
            if early_stopping:
                break
            best_live = max(s for _, _, s in chosen)
            if finished[-1].score >= _normalise(best_live, length, length_penalty):
                break
        if length == max_new_tokens:  # budget spent: the chosen continuations end here
            for b, t, score in chosen:
                add(Hypothesis(live_tokens[b] + [t], "length", score, _normalise(score, length, length_penalty)))
            break
        while len(chosen) < k:  # fewer finite candidates than beams (tiny vocabularies): pad with dead rows
            chosen.append((chosen[0][0], chosen[0][1], -np.inf))
        cache.reorder([b for b, _, _ in chosen])
        live_tokens = [live_tokens[b] + [t] for b, t, _ in chosen]
        live_scores = np.array([s for _, _, s in chosen])
        feed = [t for _, t, _ in chosen]
    return finished[0], steps


def fill_beam(session: Session, tokenizer: GLMTokenizer, prompt: Prompt, settings: Settings) -> Iterator[StreamEvent]:
    """Every blank of one prompt by beam search: num_beams rows of one cache, the winner of each span fed once
    before the next blank (the beams overwrote each other's slots); a spliced fill (PromptRule.blanks, GLM-130B)
    writes the winner into the context in place of its blank and runs the context again instead."""
    special = tokenizer.special
    stops = span_stops(tokenizer)
    spliced = tokenizer.prompt.blanks == "spliced"
    t0 = time.perf_counter()
    cache = _context(session, tokenizer, prompt, settings)
    t1 = time.perf_counter()
    spans: list[Span] = []
    steps = 0
    for k in range(len(prompt.blanks)):
        pos, mask_id = prompt.blanks[k]
        start = cache.filled.copy()
        best, calls = beam_search_span(
            session,
            cache,
            pos,
            sop=special["sop"],
            stops=stops,
            num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens,
            length_penalty=settings.length_penalty,
            early_stopping=settings.early_stopping,
            count_from=prompt.count_from(k),
        )
        steps += calls
        shown = ""
        for n, token in enumerate(best.tokens, 1):
            text, _ = new_text(tokenizer, best.tokens[:n], shown)
            shown += text
            yield StreamEvent("token", prompt.index, k, token, text)
        span = Span(decode_text(tokenizer, best.tokens), best.tokens, tokenizer.id_to_token(mask_id), pos, best.stop)
        spans.append(span)
        yield StreamEvent("span", prompt.index, k, text=span.text, span=span)
        if k + 1 < len(prompt.blanks) and spliced:  # the winner in place of its blank, the context run again
            prompt = splice_span(prompt, k, spliced_ids(tokenizer, span))
            cache = _context(session, tokenizer, prompt, settings)
        elif k + 1 < len(prompt.blanks):  # keep the prefix, feed the winner once
            cache.truncate(start)
            prefill_span(session, cache, [special["sop"], *best.tokens], pos, prompt.count_from(k))
            steps += 1
    t2 = time.perf_counter()
    generated = sum(len(s.token_ids) for s in spans)
    timings = {
        "context_s": t1 - t0,
        "decode_s": t2 - t1,
        "total_s": t2 - t0,
        "decode_steps": steps,  # counts stay integers in --json
        "new_tokens": generated,
        "tokens_per_s": generated / (t2 - t1) if t2 > t1 else 0.0,
    }
    result = assemble_result(tokenizer, prompt, spans, timings)
    yield StreamEvent("result", prompt.index, text=result.text, result=result)


def _context(session: Session, tokenizer: GLMTokenizer, prompt: Prompt, settings: Settings) -> KVCacheLike:
    """A cache of num_beams rows holding the prompt's context (one pass, repeated into every row)."""
    cache = open_cache(session, settings.num_beams, prompt.positions_needed(settings.max_new_tokens) + 1)
    context_pass(session, cache, [prompt.ids], tokenizer.special["pad"], repeat=settings.num_beams)
    return cache
