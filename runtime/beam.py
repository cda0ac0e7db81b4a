"""Deterministic beam search over one span, the beams of one prompt being the batch rows of the cache.
In: a session, a cache whose rows hold the same prefix, the blank's mask position, settings.
Out: the best hypothesis; score = sum of log-probs / length ** length_penalty (length counts eop / eos)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from glm_runtime import masks
from glm_runtime.sampling import GenerationError, log_softmax
from glm_runtime.session import Session
from glm_runtime.steps import decode_step


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


def beam_search_span(session: Session, cache: Any, mask_pos: int, *, sop: int, stops: dict[int, str],
                     num_beams: int, max_new_tokens: int, length_penalty: float,
                     early_stopping: bool) -> tuple[Hypothesis, int]:
    """Search one span -> (best hypothesis, decode calls made). Leaves the cache holding some beams' tokens
    (the caller truncates it to the span's start and feeds the winner once).

    Each step keeps the top 2k candidates (the original draws them with multinomial, docs/glm.md 4.1; glmx is
    deterministic); a stop among the first k ends a hypothesis; a span reaching the budget has length = budget.
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
        positions = masks.decode_positions([mask_pos] * k, [step] * k)
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
                    add(Hypothesis(list(live_tokens[beam]), stops[token], score,
                                   _normalise(score, length, length_penalty)))
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


def check_beam(num_beams: Any, length_penalty: Any, early_stopping: Any) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise GenerationError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not np.isfinite(length_penalty):
        raise GenerationError(f"length_penalty must be a finite number (0 = sum of log-probs), got {length_penalty!r}")
    if not isinstance(early_stopping, bool):
        raise GenerationError(f"early_stopping must be True or False, got {early_stopping!r}")

