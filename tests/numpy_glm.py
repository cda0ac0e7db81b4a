"""An independent GLM forward in numpy, written from glm_reference_spec.md only, for golden comparisons.

In: a dict of official-name weights (numpy), input_ids [B,T], position_ids [B,2,T], a sep vector [B]
(spec 3.1 sep form, no memory). Out: logits [B,T,V] in float64. Deliberately naive: per-head loops,
explicit formulas, nothing shared with glm_export.model.
"""
from __future__ import annotations

import math

import numpy as np


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x, kind="tanh"):
    if kind == "tanh":
        return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
    erf = np.vectorize(math.erf)  # exact erf GeLU of the HF remote code, elementwise from the standard library
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def sep_mask(sep: int, T: int) -> np.ndarray:
    """Mask[i, j] = 1 iff j < sep or j <= i (spec 3.1)."""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    return ((j < sep) | (j <= i)).astype(np.float64)


def forward(weights: dict, input_ids, position_ids, seps, num_heads: int, num_layers: int, gelu="tanh"):
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    B, T = input_ids.shape
    h = W["word_embeddings.weight"].shape[1]
    d = h // num_heads
    out = np.zeros((B, T, W["word_embeddings.weight"].shape[0]))
    for b in range(B):
        x = (W["word_embeddings.weight"][input_ids[b]]
             + W["transformer.position_embeddings.weight"][position_ids[b, 0]]
             + W["transformer.block_position_embeddings.weight"][position_ids[b, 1]])  # [T, h]
        M = sep_mask(int(seps[b]), T)
        for i in range(num_layers):
            p = f"transformer.layers.{i}."
            a = _layer_norm(x, W[p + "input_layernorm.weight"], W[p + "input_layernorm.bias"])
            qkv = a @ W[p + "attention.query_key_value.weight"].T + W[p + "attention.query_key_value.bias"]
            q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]  # [Q;K;V] blocks, not interleaved
            heads = []
            for j in range(num_heads):
                cols = slice(j * d, (j + 1) * d)
                s = q[:, cols] @ (k[:, cols] / np.sqrt(d)).T
                s = s * M - 65504.0 * (1.0 - M)
                s = np.exp(s - s.max(-1, keepdims=True))
                heads.append((s / s.sum(-1, keepdims=True)) @ v[:, cols])
            o = np.concatenate(heads, axis=-1) @ W[p + "attention.dense.weight"].T + W[p + "attention.dense.bias"]
            x = x + o
            bb = _layer_norm(x, W[p + "post_attention_layernorm.weight"], W[p + "post_attention_layernorm.bias"])
            f = _gelu(bb @ W[p + "mlp.dense_h_to_4h.weight"].T + W[p + "mlp.dense_h_to_4h.bias"], gelu)
            x = x + f @ W[p + "mlp.dense_4h_to_h.weight"].T + W[p + "mlp.dense_4h_to_h.bias"]
        y = _layer_norm(x, W["transformer.final_layernorm.weight"], W["transformer.final_layernorm.bias"])
        out[b] = y @ W["word_embeddings.weight"].T
    return out
