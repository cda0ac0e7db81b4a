"""The three forward phases of blank filling (docs/glm.md 4.1), each one `session.run` on the shared cache.
In: a session, a cache, token ids (context / one token per row / a span). Out: logits [B, V] of each row's
last fed token; the cache gains the fed tokens' keys and values.
A session with a P-tuning prefix (session.prefix, glm_runtime.prefix): open_cache puts it in every row's first
slots, and a context pass feeds it as its past, visible to every token; positions are as without it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from glm_runtime import masks
from glm_runtime.backend import KVCacheLike, Session, host_array
from glm_runtime.iotable import LOGITS_START, accepts, past_names


def empty_past(session: Session, batch: int) -> dict[str, np.ndarray]:
    """past_key_values for the context pass: past_seq = 0 (nothing is cached yet), or the session's P-tuning
    prefix [batch, n, P, d] in every row."""
    if session.prefix is not None:
        return {k: v.copy() for k, v in session.prefix.rows(past_names(session.io), batch).items()}  # own arrays
    c = session.config
    empty = np.zeros((batch, c.num_attention_heads, 0, c.head_dim), dtype=session.kv_dtype)
    return {name: empty for pair in past_names(session.io) for name in pair}


def open_cache(session: Session, batch: int, capacity: int) -> KVCacheLike:
    """session.new_cache with room for `capacity` tokens per row after the session's prefix, which it then holds
    in every row's first slots (KVCacheLike.hold_prefix); a session without one: new_cache itself."""
    prefix = session.prefix
    cache = session.new_cache(batch, capacity + (prefix.length if prefix is not None else 0))
    if prefix is not None:
        cache.hold_prefix(prefix)
    return cache


def context_feeds(session: Session, contexts: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """The feeds of one call over every row's context: right-padded with pad_id, Part A positions and mask,
    past_seq = 0 (or P: the prefix, which every token sees)."""
    lengths = [len(ids) for ids in contexts]
    seq = max(lengths)
    input_ids = np.full((len(contexts), seq), pad_id, dtype=np.int64)
    for b, ids in enumerate(contexts):
        input_ids[b, : len(ids)] = ids
    past = empty_past(session, len(contexts))
    mask = masks.context_mask(lengths, seq)
    p = next(iter(past.values())).shape[2]
    if p:
        mask = np.concatenate([np.ones((len(contexts), 1, seq, p), dtype=bool), mask], axis=3)
    return {
        "input_ids": input_ids,
        "position_ids": masks.context_positions(lengths, seq),
        "attention_mask": mask,
        **past,
    }


def run_context(session: Session, contexts: Sequence[Sequence[int]], pad_id: int) -> tuple[dict[str, Any], np.ndarray]:
    """One call over every row's context -> (outputs, logits [B, V] at each row's last real token). The caller
    stores present.* (cache.append, or cache.load_rows for rows that join a running pool)."""
    feeds = context_feeds(session, contexts, pad_id)
    return run_for_rows(session, feeds, np.asarray([len(ids) for ids in contexts]) - 1)


def context_pass(
    session: Session, cache: KVCacheLike, contexts: Sequence[Sequence[int]], pad_id: int, repeat: int = 1
) -> np.ndarray:
    """Run every row's context (right-padded with pad_id) and store its K/V at slots 0..C_b-1.

    repeat > 1: each context fills `repeat` consecutive cache rows (the beams of one prompt) from one pass.
    """
    lengths = [len(ids) for ids in contexts]
    out, logits = run_context(session, contexts, pad_id)
    if repeat > 1:
        out, lengths = repeat_rows(out, repeat), [n for n in lengths for _ in range(repeat)]
        logits = np.repeat(logits, repeat, axis=0)
    cache.append(out, lengths)
    return logits


def decode_step(
    session: Session, cache: KVCacheLike, tokens: Sequence[int], positions: np.ndarray, store: Sequence[bool]
) -> np.ndarray:
    """Feed one token per row (positions [W, 2, 1]); rows with store=False (finished, fed a dummy) keep
    their cache unchanged. W may be fewer than the cache's rows when the cache is sliceable (the first W
    rows run alone). Returns logits [W, V]."""
    width = len(tokens)
    feeds = {
        "input_ids": np.asarray(tokens, dtype=np.int64).reshape(-1, 1),
        "position_ids": positions,
        "attention_mask": masks.decode_mask(cache.visible[:width]),
        **cache.feeds(width),
    }
    out = session.run(feeds)
    cache.append(out, np.asarray(store, dtype=np.int64))
    return out["logits"][:, -1]


def prefill_span(
    session: Session, cache: KVCacheLike, tokens: Sequence[int], mask_pos: int, count_from: int = -1
) -> np.ndarray:
    """Feed the same span tokens (sop first, steps 0..T-1) to every row in one call; returns logits [B, V].
    count_from >= 0: a counting span's positions (masks.span_positions)."""
    batch, seq = cache.batch, len(tokens)
    feeds = {
        "input_ids": np.tile(np.asarray(tokens, dtype=np.int64), (batch, 1)),
        "position_ids": np.broadcast_to(masks.span_positions(mask_pos, 0, seq, count_from), (batch, 2, seq)).copy(),
        "attention_mask": masks.chunk_mask(cache.visible, seq),
        **cache.feeds(),
    }
    out, logits = run_for_rows(session, feeds, np.full(batch, seq - 1))
    cache.append(out, [seq] * batch)
    return logits


def run_for_rows(session: Session, feeds: dict[str, Any], rows: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Run, and return (outputs, logits [B, V] at position rows[b] of row b).

    Where the graph takes logits_start, only positions min(rows).. get the head; the offset of the returned
    logits is read from their shape, so a backend that returns every position gives the same answer.
    """
    if accepts(session, LOGITS_START):
        feeds = {**feeds, LOGITS_START: np.array([rows.min()], dtype=np.int64)}
    out = session.run(feeds)
    logits = out["logits"]
    offset = feeds["input_ids"].shape[1] - logits.shape[1]
    return out, logits[np.arange(len(rows)), rows - offset]


def repeat_rows(outputs: dict[str, Any], times: int) -> dict[str, np.ndarray]:
    """A batch-1 call's outputs repeated `times` along the batch (beam search shares one context pass)."""
    out = {}
    for name, value in outputs.items():
        out[name] = np.repeat(host_array(value), times, axis=0)
    return out
