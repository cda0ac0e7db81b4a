"""Cloze scoring, the computation (GLM's way of doing NLU): how likely is each candidate answer for one blank.

In: a session, its tokenizer, a ScoreRequest (prompts with exactly one blank, candidate answers per prompt).
Out: per candidate the summed log-probability, the per-token log-probabilities and the length-normalised score.
The engine runs a scoring request with these functions (check_scoring when it is submitted, score_cloze in the
step that takes it); runtime/score.py holds the entry points (score_candidates, classify).

Multi-token (THUDM/GLM `GLMForMultiTokenCloze`): Part A = the context with its blank, Part B = sop + the
answer's tokens at (blank position, blocks 1..n+1); the targets are the answer's tokens then eop, the score
sum(log p) / (n + 1) ** length_penalty. Single-token (`GLMForSingleTokenCloze`): log-softmax at the blank's own
position over the candidates' single ids. One context pass per prompt, shared by every candidate (its K/V
gathered into their rows); every candidate of every prompt in one span call, each row seeing its context and
its own span only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glm_runtime import masks
from glm_runtime.backend import Session, host_array
from glm_runtime.errors import GLMXError
from glm_runtime.iotable import LOGITS_START, accepts, past_names, present_names
from glm_runtime.requests import CandidateScore, ScoreRequest, counts_up
from glm_runtime.sampling import log_softmax
from glm_runtime.steps import context_feeds
from glm_runtime.tokenizer import BlankError, GLMTokenizer, build_context_ids, find_blanks


class ScoreError(GLMXError, ValueError):
    """A scoring request that cannot be answered: no or several blanks, an empty or oversized candidate, ..."""


def _prepare(
    tokenizer: GLMTokenizer, prompt: str, candidates: Sequence[str], single_token: bool, positions: int, where: str
) -> tuple[list[int], int, list[list[int]]]:
    if not isinstance(prompt, str):
        raise ScoreError(f"{where}: the prompt must be a string, got {type(prompt).__name__}")
    try:
        ids = build_context_ids(tokenizer, prompt)
    except BlankError:
        raise ScoreError(
            f"{where} has no blank; a cloze question has exactly one ([MASK] where the answer goes)"
        ) from None
    except ValueError as exc:
        raise ScoreError(f"{where}: {exc}") from None
    blanks = find_blanks(ids, tokenizer)
    if len(blanks) != 1:
        raise ScoreError(
            f"{where} has {len(blanks)} blanks; a cloze question has exactly one ([MASK] where the answer goes)"
        )
    if not candidates:
        raise ScoreError(f"{where}: no candidates to score")
    encoded = []
    for text in candidates:
        if not isinstance(text, str) or not text.strip():
            raise ScoreError(f"{where}: candidate {text!r} is empty; every candidate needs some text")
        cand = tokenizer.encode(text)
        if any(i in tokenizer.special.values() for i in cand):
            raise ScoreError(f"{where}: candidate {text!r} holds a command token; candidates are plain text")
        if single_token and len(cand) != 1:
            raise ScoreError(
                f"{where}: candidate {text!r} is {len(cand)} tokens ({cand}), and single-token "
                f"scoring needs answers of one token each; drop --single-token to score it whole"
            )
        need = len(ids) + 1 + len(cand)
        if need > positions:
            raise ScoreError(
                f"{where}: candidate {text!r} does not fit the model: {len(ids)} context + 1 + "
                f"{len(cand)} answer tokens = {need} positions > max_sequence_length {positions}"
            )
        encoded.append(cand)
    return ids, blanks[0][0], encoded


@dataclass
class ClozeBatch:
    """A checked scoring request: per prompt its context ids, the blank's position and the candidates' ids.
    count_from: per prompt, where a counting span's sop sits (GLM-130B's [gMASK]: the context length), else -1."""

    request: ScoreRequest
    contexts: list[list[int]]
    mask_pos: np.ndarray
    answers: list[list[list[int]]]
    count_from: np.ndarray | None = None


def check_scoring(tokenizer: GLMTokenizer, request: ScoreRequest, positions: int) -> ClozeBatch:
    """Check every prompt and candidate of a request before any work (ScoreError says which and why)."""
    if len(request.candidates) != len(request.prompts):
        raise ScoreError(
            f"{len(request.prompts)} prompts but {len(request.candidates)} candidate lists; give one list per prompt"
        )
    if not request.prompts:
        raise ScoreError("no prompts to score")
    penalty = request.length_penalty
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
        raise ScoreError(f"length_penalty must be a finite number (0 = the plain sum), got {penalty!r}")
    prepared = [
        _prepare(tokenizer, p, c, request.single_token, positions, f"prompt {i}")
        for i, (p, c) in enumerate(zip(request.prompts, request.candidates))
    ]
    return ClozeBatch(
        request,
        [ids for ids, _, _ in prepared],
        np.array([m for _, m, _ in prepared]),
        [answers for _, _, answers in prepared],
        np.array([len(ids) if counts_up(tokenizer, ids[m]) else -1 for ids, m, _ in prepared]),
    )


def score_cloze(session: Session, tokenizer: GLMTokenizer, batch: ClozeBatch) -> list[list[CandidateScore]]:
    """Every candidate of every prompt: one context pass for all prompts, one span call for all candidates."""
    request, contexts, mask_pos = batch.request, batch.contexts, batch.mask_pos
    context_out, context_logits = _context_pass(
        session, tokenizer, contexts, mask_pos if request.single_token else None
    )
    if request.single_token:
        assert context_logits is not None
        results = []
        for b, answers in enumerate(batch.answers):
            logp = log_softmax(context_logits[b])
            results.append(
                [
                    CandidateScore(text, ids, [float(logp[ids[0]])], float(logp[ids[0]]), 1, float(logp[ids[0]]))
                    for text, ids in zip(request.candidates[b], answers)
                ]
            )
        return results
    rows = [(b, k) for b, answers in enumerate(batch.answers) for k in range(len(answers))]
    spans = [[tokenizer.special["sop"], *batch.answers[b][k]] for b, k in rows]
    logits = _span_pass(session, context_out, [len(c) for c in contexts], mask_pos, rows, spans, batch.count_from)
    eop = tokenizer.special["eop"]
    scored: list[list[CandidateScore]] = [[] for _ in request.prompts]
    for r, (b, k) in enumerate(rows):
        answer = batch.answers[b][k]
        targets = [*answer, eop]
        logp = log_softmax(logits[r, : len(targets)])
        per_token = [float(logp[t, target]) for t, target in enumerate(targets)]
        total = float(sum(per_token))
        penalty = request.length_penalty
        scored[b].append(
            CandidateScore(
                request.candidates[b][k],
                answer,
                per_token,
                total,
                len(targets),
                total / len(targets) ** penalty if penalty else total,
            )
        )
    return scored


def _context_pass(
    session: Session, tokenizer: GLMTokenizer, contexts: list[list[int]], rows: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every prompt's context in one right-padded call. -> (host K/V of every layer, logits at `rows` or None)."""
    feeds = context_feeds(session, contexts, tokenizer.special["pad"])
    seq = feeds["input_ids"].shape[1]
    if rows is None and accepts(session, LOGITS_START):
        feeds[LOGITS_START] = np.array([-1], dtype=np.int64)  # the context's logits are not read
    out = session.run(feeds)
    logits = None
    if rows is not None:
        full = host_array(out["logits"])
        logits = full[np.arange(len(contexts)), rows - (seq - full.shape[1])]
    return {name: host_array(out[name]) for pair in present_names(session.io) for name in pair}, logits


def _span_pass(
    session: Session,
    context: dict[str, np.ndarray],
    lengths: list[int],
    mask_pos: np.ndarray,
    rows: list[tuple[int, int]],
    spans: list[list[int]],
    count_from: np.ndarray | None = None,
) -> np.ndarray:
    """Every candidate's sop + answer in one call on its prompt's gathered context K/V (after the session's
    P-tuning prefix, when it has one); a counting prompt's span (count_from >= 0) counts up in row 0.
    -> logits [R, T, V]."""
    R, T = len(spans), max(len(s) for s in spans)
    prompt_of = np.array([b for b, _ in rows])
    ids = np.zeros((R, T), dtype=np.int64)
    blocks = np.zeros((R, T), dtype=np.int64)
    for r, span in enumerate(spans):
        ids[r, : len(span)] = span
        blocks[r] = np.arange(1, T + 1)  # padding continues the block count: hidden, but inside the table
    positions = np.stack([np.repeat(mask_pos[prompt_of][:, None], T, axis=1), blocks], axis=1)
    if count_from is not None:  # row 0 of a counting span: count_from + step (masks.decode_positions)
        positions[:, 0] = masks.first_positions(positions[:, 0], blocks - 1, count_from[prompt_of][:, None])
    past_len = next(iter(context.values())).shape[2]
    visible = np.arange(past_len)[None, :] < np.asarray(lengths)[prompt_of][:, None]  # [R, past]
    names = [
        (past, present)
        for pair_past, pair_present in zip(past_names(session.io), present_names(session.io))
        for past, present in zip(pair_past, pair_present)
    ]
    pasts = {past: np.ascontiguousarray(context[present][prompt_of]) for past, present in names}
    if session.prefix is not None:  # P-tuning: the prefix's slots first, visible to every row
        front = session.prefix.rows(past_names(session.io), R)
        pasts = {name: np.concatenate([front[name], value], axis=2) for name, value in pasts.items()}
        visible = np.concatenate([np.ones((R, session.prefix.length), dtype=bool), visible], axis=1)
        past_len += session.prefix.length
    if _takes_chunks(session, R, T, past_len):
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": masks.chunk_mask(visible, T), **pasts}
        return host_array(session.run(feeds)["logits"])
    # an engine whose profiles take one token per row over a cache (TensorRT's "decode"): the span goes in T
    # single-token calls, each seeing the context, the span so far, and itself
    logits = []
    for t in range(T):
        feeds = {
            "input_ids": ids[:, t : t + 1],
            "position_ids": positions[:, :, t : t + 1],
            "attention_mask": masks.decode_mask(visible),
            **pasts,
        }
        out = session.run(feeds)
        logits.append(host_array(out["logits"])[:, -1])
        for past, present in names:
            pasts[past] = np.concatenate([pasts[past], host_array(out[present]).astype(pasts[past].dtype)], axis=2)
        visible = np.concatenate([visible, np.ones((R, 1), dtype=bool)], axis=1)
    return np.stack(logits, axis=1)


def _takes_chunks(session: Session, batch: int, seq: int, past: int) -> bool:
    """Whether one call of `seq` tokens over a `past`-slot cache fits the session (only engines have limits)."""
    return session.fits(batch, seq, past)
