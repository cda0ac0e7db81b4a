"""A published checkpoint's names and layouts mapped onto glmx's: what differs is read from config.arch.

In: the weights of a Hugging Face folder as published (glm_export.weights.Weights, read lazily) and its config.
Out: the same weights under GLM's official names (docs/glm.md 1.1), the fused QKV as [Q;K;V] blocks, each tensor
still read one at a time; and notes saying what was done. For the 2021 GLM nothing changes.
ChatGLM-6B (chatglm_v1_spec.md 2): `transformer.word_embeddings.weight` is the embedding; the QKV rows are
interleaved per head and are reordered here (the rows of a per-row int8/int4 scale move with them); every
`rotary_emb.inv_freq` is ignored, as the HF code ignores it on load; `lm_head.weight` is checked equal to the
embedding and stored once.
"""

from __future__ import annotations

import re

import numpy as np

from glm_export.weights import Weights
from glm_runtime.config import GLMConfig

QKV = re.compile(r"^transformer\.layers\.\d+\.attention\.query_key_value\.(weight|bias|weight_scale)$")
INV_FREQ = re.compile(r"^transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq$")
EMBEDDING = "word_embeddings.weight"
HEAD = "lm_head.weight"


def per_head_to_blocks(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows [n heads x (q, k, v) x d, ...] -> [Q; K; V] blocks [(q, k, v) x n x d, ...] (spec 2, QKV layout)."""
    shape = rows.shape
    d = shape[0] // (3 * heads)
    return np.ascontiguousarray(rows.reshape(heads, 3, d, *shape[1:]).swapaxes(0, 1).reshape(shape))


def blocks_to_per_head(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of per_head_to_blocks: glmx's [Q; K; V] rows in the published per-head order."""
    shape = rows.shape
    d = shape[0] // (3 * heads)
    return np.ascontiguousarray(rows.reshape(3, heads, d, *shape[1:]).swapaxes(0, 1).reshape(shape))


def tied_head_note(weights: Weights) -> str:
    """Compare lm_head.weight with the embedding, row block by row block (never both whole in float32)."""
    emb, head = weights.entry(EMBEDDING), weights.entry(HEAD)
    if emb.shape != head.shape:
        return (
            f"lm_head.weight {list(head.shape)} is not the embedding's shape {list(emb.shape)}: the HF code ties "
            f"lm_head to the embedding on load and computes logits with the embedding; glmx does the same"
        )
    a, b = weights[EMBEDDING], weights[HEAD]
    worst = 0.0
    for start in range(0, a.shape[0], 8192):
        block = slice(start, start + 8192)
        worst = max(worst, float(np.abs(a[block].astype(np.float32) - b[block].astype(np.float32)).max()))
    if worst == 0.0:
        return "lm_head.weight equals the word embedding (tied): stored once"
    return (
        f"lm_head.weight differs from the word embedding (max |diff| {worst:.3g}): the HF code ties lm_head to the "
        f"embedding on load and computes logits with the embedding, ignoring lm_head.weight; glmx does the same"
    )


def to_glmx_names(weights: Weights, config: GLMConfig, notes: list[str]) -> Weights:
    """The published folder's weights under glmx's names and layout (nothing is read except lm_head, compared)."""
    arch = config.arch
    names: dict[str, str] = {}
    dropped = []
    for key in weights:
        if INV_FREQ.match(key):
            dropped.append(key)
        elif key == arch.published_embedding:
            names[key] = EMBEDDING
        elif key != HEAD or arch.published_embedding == EMBEDDING:
            names[key] = key
    if arch.published_embedding != EMBEDDING and HEAD in weights and arch.published_embedding in weights:
        view = weights.renamed({arch.published_embedding: EMBEDDING, HEAD: HEAD})
        notes.append(tied_head_note(view))
    if dropped:
        notes.append(f"ignored {len(dropped)} rotary_emb.inv_freq buffers (the HF code recomputes them on load)")
    out = weights.renamed(names)
    if arch.published_qkv == "per-head":
        heads = config.num_attention_heads
        out = out.mapped([k for k in out if QKV.match(k)], lambda a: per_head_to_blocks(a, heads))
        notes.append("query_key_value rows: interleaved per head as published -> [Q;K;V] blocks")
    return out
