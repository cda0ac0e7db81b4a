"""Choosing the next token: small pure numpy functions (greedy, temperature, top-k, top-p, seeded sampling).
In: logits [B, V] and settings. Out: token ids [B] (int64) or filtered logits.
Sampling draws from one numpy Generator per row, so the same seed gives the same tokens."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from glm_runtime.errors import GLMXError


class GenerationError(GLMXError, ValueError):
    """A generation setting or prompt is invalid; the message says which and how to fix it.

    field: the request field it concerns (None: the request as a whole). The message is `subject + detail`,
    subject being how glmx spells the field (max_new_tokens, --top-k, prompt 3); `said_as(names)` gives the same
    message with the subject in a front end's own words (the server's max_tokens), so no text is rewritten."""

    def __init__(self, detail: str, *, field: str | None = None, subject: str | None = None):
        self.field, self.detail = field, detail
        self.subject = subject if subject is not None else (field or "")
        super().__init__(self.subject + detail)

    def said_as(self, names: Mapping[str, str]) -> str:
        """The message with the field named as `names` maps it (fields it does not map keep glmx's subject)."""
        if self.field is None or self.field not in names:
            return str(self)
        return names[self.field] + self.detail


def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not temperature > 0
        or not np.isfinite(temperature)
    ):
        raise GenerationError(
            f" must be a number > 0, got {temperature!r}; for the most likely token every step "
            f"use --strategy greedy (which takes no temperature)",
            field="temperature",
            subject="--temperature",
        )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise GenerationError(f" must be an integer >= 0 (0 = no top-k filter), got {top_k!r}", field="top_k")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise GenerationError(f" must be in (0, 1] (1 = no nucleus filter), got {top_p!r}", field="top_p")


def check_beam(num_beams: Any, length_penalty: Any, early_stopping: Any) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise GenerationError(f" must be an integer >= 1, got {num_beams!r}", field="num_beams")
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, numbers.Real)
        or not math.isfinite(float(length_penalty))
    ):
        raise GenerationError(
            f" must be a finite number (0 = sum of log-probs), got {length_penalty!r}", field="length_penalty"
        )
    if not isinstance(early_stopping, bool):
        raise GenerationError(f" must be True or False, got {early_stopping!r}", field="early_stopping")


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise GenerationError(f" must be a non-negative integer or None, got {seed!r}", field="seed")


def prompt_generators(seed: int | None, prompts: Sequence[str]) -> list[np.random.Generator]:
    """One stream per prompt from the seed and that prompt's text alone (SeedSequence([seed, sha256(text)])):
    the same prompt and seed sample the same wherever the prompt sits, alone, in a file or in a served batch.
    seed None: fresh entropy for each prompt."""
    _check_seed(seed)
    out = []
    for text in prompts:
        if seed is None:
            out.append(np.random.default_rng())
            continue
        digest = hashlib.sha256(str(text).encode("utf-8")).digest()
        words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
        out.append(np.random.default_rng(np.random.SeedSequence([int(seed), *words])))
    return out


def make_generators(seed: int | None, count: int) -> list[np.random.Generator]:
    """One independent stream per row, all derived from `seed` (None = fresh entropy)."""
    _check_seed(seed)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-probabilities over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy(logits: np.ndarray) -> np.ndarray:
    """Arg-max per row (the lowest id wins a tie). [B, V] -> [B]."""
    return np.asarray(logits).argmax(axis=-1).astype(np.int64)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's k largest logits (ties with the k-th kept), the rest -inf. k = 0 keeps all."""
    logits = np.asarray(logits, dtype=np.float64)
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[..., -k, None]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep each row's smallest set of most likely tokens whose probability reaches p (nucleus); p = 1 keeps all."""
    logits = np.asarray(logits, dtype=np.float64)
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = np.exp(log_softmax(np.take_along_axis(logits, order, axis=-1)))
    before = np.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep_sorted = before < p  # the top token always has before = 0
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def sample(
    logits: np.ndarray,
    generators: Sequence[np.random.Generator],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Temperature, then top-k, then top-p, then one draw per row from that row's generator. [B, V] -> [B]."""
    check_sampling(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64)
    if len(generators) != logits.shape[0]:
        raise ValueError(f"need one generator per row: {logits.shape[0]} rows, {len(generators)} generators")
    filtered = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = np.exp(log_softmax(filtered))
    cdf = np.cumsum(probs, axis=-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b, rng in enumerate(generators):
        u = rng.random() * cdf[b, -1]
        out[b] = min(int(np.searchsorted(cdf[b], u, side="right")), logits.shape[-1] - 1)
    # searchsorted can land on a zero-probability id only at the float edge; step back to the last kept id
    zero = probs[np.arange(len(out)), out] == 0
    for b in np.flatnonzero(zero):
        out[b] = int(np.flatnonzero(probs[b] > 0)[-1])
    return out
