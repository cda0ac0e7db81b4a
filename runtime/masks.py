"""GLM's 2-D positions and attention masks in numpy (docs/glm.md 2, 3, 4.1-4.2), independent of the torch model;
a counting span (GLM-130B's [gMASK], chatglm_v1_spec.md 5) takes count_from + step in row 0.
In: context lengths, mask positions, span steps, which cache slots each row has filled.
Out: int64 position_ids [B, 2, T] and bool attention masks [B, 1, T, past + T] (True = visible)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _lengths(lengths: Sequence[int], seq: int | None) -> tuple[np.ndarray, int]:
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0 or (lengths < 1).any():
        raise ValueError(f"every row needs at least one token, got lengths {lengths.tolist()}")
    seq = int(lengths.max()) if seq is None else int(seq)
    if seq < lengths.max():
        raise ValueError(f"seq {seq} is shorter than the longest row ({int(lengths.max())} tokens)")
    return lengths, seq


# ---------------------------------------------------------------- positions (docs/glm.md 2)


def context_positions(lengths: Sequence[int], seq: int | None = None) -> np.ndarray:
    """Part A positions for right-padded rows: (0..C_b-1, block 0); padding gets (0, 0). -> [B, 2, seq]."""
    lengths, seq = _lengths(lengths, seq)
    pos = np.arange(seq, dtype=np.int64)[None, :] * (np.arange(seq)[None, :] < lengths[:, None])  # [B, seq]
    return np.stack([pos, np.zeros_like(pos)], axis=1)


def decode_positions(
    mask_pos: Sequence[int], step: Sequence[int], count_from: Sequence[int] | None = None
) -> np.ndarray:
    """One fed token per row: the t-th token of a span (t = 0 is sop) sits at (mask_pos, t + 1). -> [B, 2, 1].

    count_from (per row, default all -1): where a counting span's sop sits (GLM-130B's [gMASK],
    PromptRule.gmask_counts: the context length), its step t then at count_from + t in row 0; -1: row 0 stays
    at the mask's position. Row 1 (the block position) is t + 1 either way (a 1D model never reads it)."""
    mask_pos = np.asarray(mask_pos, dtype=np.int64).reshape(-1)
    step = np.asarray(step, dtype=np.int64).reshape(-1)
    first = first_positions(mask_pos, step, count_from)
    return np.stack([first, step + 1], axis=1)[:, :, None]


def first_positions(mask_pos: np.ndarray, step: np.ndarray, count_from: Sequence[int] | int | None) -> np.ndarray:
    """Row 0 of span tokens at `step`: mask_pos, or count_from + step where count_from >= 0."""
    if count_from is None:
        return mask_pos
    origin = np.broadcast_to(np.asarray(count_from, dtype=np.int64), np.broadcast_shapes(mask_pos.shape, step.shape))
    return np.where(origin >= 0, origin + step, mask_pos)


def span_positions(mask_pos: int, first_step: int, count: int, count_from: int = -1) -> np.ndarray:
    """`count` consecutive span tokens from step `first_step`: (mask_pos, first_step+1 ...). -> [2, count].
    count_from >= 0: row 0 counts up, count_from + first_step ... (decode_positions)."""
    steps = np.arange(first_step, first_step + count, dtype=np.int64)
    first = first_positions(np.full(count, mask_pos, dtype=np.int64), steps, None if count_from < 0 else count_from)
    return np.stack([first, steps + 1])


def filled_layout(
    context_len: int, spans: Sequence[tuple[int, int]], count_from: Sequence[int] | None = None
) -> tuple[np.ndarray, int]:
    """The training-equivalent single sequence after filling (docs/glm.md 4.2): context, then per blank sop + span.

    spans: (mask_pos, number of span tokens fed after sop) in fill order; count_from: per span, as
    span_positions (default: none counts). -> (positions [2, total], sep = C).
    """
    origins = [-1] * len(spans) if count_from is None else list(count_from)
    parts = [np.stack([np.arange(context_len, dtype=np.int64), np.zeros(context_len, dtype=np.int64)])]
    parts += [span_positions(m, 0, 1 + n, o) for (m, n), o in zip(spans, origins)]
    return np.concatenate(parts, axis=1), context_len


# ---------------------------------------------------------------- masks (docs/glm.md 3)


def sep_mask(sep: int, seq: int) -> np.ndarray:
    """The explicit form of the original's scalar sep: query i sees key j iff j < sep or j <= i. -> [seq, seq]."""
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    return (j < sep) | (j <= i)


def context_mask(lengths: Sequence[int], seq: int | None = None) -> np.ndarray:
    """Context pass (sep = C_b per row): bidirectional over each row's real tokens, padding keys invisible.

    A padding query sees only itself, so no row of the mask is empty. -> bool [B, 1, seq, seq].
    """
    lengths, seq = _lengths(lengths, seq)
    real = np.arange(seq)[None, :] < lengths[:, None]  # [B, seq]
    mask = real[:, None, :] & real[:, :, None]  # real query x real key
    mask |= np.eye(seq, dtype=bool)[None]
    return mask[:, None]


def decode_mask(visible: np.ndarray) -> np.ndarray:
    """One new token per row: it sees the cache slots its row has filled, and itself.

    visible: bool [B, past] (the cache's slot map). -> bool [B, 1, 1, past + 1].
    """
    visible = np.asarray(visible, dtype=bool)
    own = np.ones((visible.shape[0], 1), dtype=bool)
    return np.concatenate([visible, own], axis=1)[:, None, None, :]


def chunk_mask(visible: np.ndarray, seq: int) -> np.ndarray:
    """`seq` new tokens per row after a cache: all filled slots, then causal among the new tokens (Part B).

    visible: bool [B, past]. -> bool [B, 1, seq, past + seq]. With seq = 1 this is decode_mask.
    """
    visible = np.asarray(visible, dtype=bool)
    past = np.broadcast_to(visible[:, None, :], (visible.shape[0], seq, visible.shape[1]))
    causal = np.broadcast_to(np.tril(np.ones((seq, seq), dtype=bool)), (visible.shape[0], seq, seq))
    return np.concatenate([past, causal], axis=2)[:, None]
