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
from typing import Any

import numpy as np

from glm_export.hf_quantized import QuantizedCheckpointError, dequantize
from glm_export.nbits import Released
from glm_export.weights import Weights
from glm_runtime.config import GLMConfig

QKV = re.compile(r"^transformer\.layers\.\d+\.attention\.query_key_value\.(weight|bias|weight_scale)$")
INV_FREQ = re.compile(r"^transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq$")
EMBEDDING = "word_embeddings.weight"
# The base model sits under "glm." in HF downstream classes and under "model." in the original's
# GLMForSequenceClassification (docs/glm.md 8.1, 8.2): checkpoint reading and LoRA adapters strip them alike.
BASE_PREFIXES = ("glm.", "model.")
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


def published_name(name: str, config: GLMConfig) -> str:
    """The key a published folder of config's architecture holds glmx's weight `name` under (the inverse of
    to_glmx_names' renaming; a ChatGLM folder's QKV rows are also per head, which random weights need not know)."""
    return config.arch.published_embedding if name == EMBEDDING else name


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


def _released(weights: Weights, bits: int) -> tuple[Weights, dict[str, Any]]:
    """A chatglm-6b-int4 / -int8 folder (spec 2): each `<linear>.weight` int8 [out, in*bits/8] with its
    `<linear>.weight_scale` fp16 [out], checked from the headers. -> (the weights with each such weight
    dequantized when read, float32 [out, in], the scales dropped; per linear, a reader of its integers)."""
    prefixes = [k[: -len(".weight_scale")] for k in weights if k.endswith(".weight_scale")]
    if not prefixes:
        raise QuantizedCheckpointError(
            f"config.json says quantization_bit {bits}, but no <linear>.weight_scale tensor is in the files: "
            f"they are not a chatglm-6b-int{bits} checkpoint"
        )
    derived: dict[str, Any] = {}
    readers: dict[str, Any] = {}
    for prefix in prefixes:
        w, sc = f"{prefix}.weight", f"{prefix}.weight_scale"
        (out, width), scale_shape = weights.shape(w), weights.shape(sc)
        if weights.dtype_name(w) != "int8" or weights.dtype_name(sc) != "float16" or scale_shape != (out,):
            raise QuantizedCheckpointError(
                f"{w} is {weights.dtype_name(w)} {[out, width]} with a {weights.dtype_name(sc)} scale "
                f"{list(scale_shape)}: a chatglm-6b-int{bits} linear is int8 [out, in*{bits}/8] with an fp16 "
                f"scale [out]"
            )

        def read(w=w, sc=sc):
            return weights[w], weights[sc]

        readers[prefix] = read
        derived[w] = ((out, width * 8 // bits), np.float32, lambda read=read: dequantize(*read(), bits))
    kept = weights.derived(derived)
    return kept.renamed({k: k for k in kept if not k.endswith(".weight_scale")}), readers


def to_glmx_names(
    weights: Weights, config: GLMConfig, notes: list[str], bits: int = 0
) -> tuple[Weights, Released | None]:
    """The published folder's weights under glmx's names and layout (nothing is read except lm_head, compared).
    bits: the folder's quantization_bit (4 / 8: a chatglm-6b-int4 / -int8 folder, its integers returned as a
    Released for glm_export.nbits to carry over; 0: float weights)."""
    arch = config.arch
    readers: dict[str, Any] = {}
    if bits:
        weights, readers = _released(weights, bits)
        notes.append(
            f"quantization_bit {bits}: {len(readers)} linears are int{bits} with an fp16 scale per row; read as "
            f"they are for the int{bits}-weight graph, dequantized (q x scale) for the reference"
        )
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
        for prefix in [p for p in readers if p.endswith("query_key_value")]:
            read = readers[prefix]
            readers[prefix] = lambda read=read: tuple(per_head_to_blocks(a, heads) for a in read())
    return out, (Released(bits, readers) if bits else None)
