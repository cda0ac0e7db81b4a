"""Independent float64 numpy oracle of GLM-130B, written from the research note shared/chatglm_v1_spec.md only
(§1 config, §2 SAT checkpoint layout, §3 "GLM-130B forward", §4 attention incl. its last 1D-rotary bullet, §5
"GLM-130B (generate.py ...)").

In: a state dict with the PUBLISHED (SAT) names and layout (spec 2: `transformer.word_embeddings.weight`, fused QKV
rows interleaved per head, dense_h_to_4h rows [value half; gate half]) and a small cfg dict. Out: logits, the
prompt layout of generate.py (ids, 1D positions, mask), greedy filling by full recomputation (one blank, and
several blanks spliced one at a time as fill_blanks does). Imports numpy and the standard library only; never
imports glm_export / glm_runtime.

Layouts (SAT's): input_ids [B,T]; position_ids [B,T] (ONE row: 1D rotary); attention_mask bool [B,1,T,T] with
True = MASKED. Knobs (gelu, gate, rotary, alpha_layers, inv_freq) exist so tests/test_oracle_glm130b.py can show
that each fact moves the logits beyond glmx's budget; their defaults are the spec's.
"""

from __future__ import annotations

import math

import numpy as np

LN_EPS = 1e-5  # spec 1: SAT's default --layernorm-epsilon
MASK_VALUE = -10000.0  # spec 4.4: the same SAT attention_fn: fill -10000, then x(layer+1)
ROTARY_BASE = 10000.0  # spec 4.2


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _layer_norm(x: np.ndarray, sd: dict, name: str) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * _f64(sd[name + ".weight"]) + _f64(sd[name + ".bias"])


def _linear(x: np.ndarray, sd: dict, name: str) -> np.ndarray:
    return x @ _f64(sd[name + ".weight"]).T + _f64(sd[name + ".bias"])


def gelu_of(x: np.ndarray, kind: str) -> np.ndarray:
    """spec 3 / summary 8: F.gelu, the exact erf form ("tanh": the form GLM-130B does NOT use)."""
    if kind == "erf":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def inv_freq(rd: int, rounding: str = "fp16") -> np.ndarray:
    """spec 4.2: rd/2 frequencies 1/10000^(2j/rd) over the rotary width rd, rounded to fp16 as SAT 0.2.x's
    inv_freq.half() ("fp32": the float32 values). GLM-130B: rd = the whole head (64 values for d = 128)."""
    exponent = np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd)
    f32 = np.float32(1.0) / np.float32(ROTARY_BASE) ** exponent
    return (f32.astype(np.float16) if rounding == "fp16" else f32).astype(np.float64)


def _rotate(x: np.ndarray, pos: np.ndarray, rounding: str) -> np.ndarray:
    """NeoX rotate_half over the last dim (width rd): pair j with j + rd/2. x [B,H,T,rd]; pos [B,T]."""
    rd = x.shape[-1]
    theta = pos[:, None, :, None].astype(np.float64) * inv_freq(rd, rounding)  # [B,1,T,rd/2]
    cos, sin = np.cos(theta), np.sin(theta)
    x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotary(x: np.ndarray, pos: np.ndarray, kind: str, rounding: str) -> np.ndarray:
    """ "1d" (GLM-130B, spec 4.2 last bullet): the whole head with the one position row. "2d" (ChatGLM-6B, a
    mutation here): two halves, the second rotated with block positions (taken as 0 here: no block row in SAT)."""
    if kind == "1d":
        return _rotate(x, pos, rounding)
    half = x.shape[-1] // 2
    return np.concatenate([_rotate(x[..., :half], pos, rounding), _rotate(x[..., half:], pos * 0, rounding)], -1)


def _attention(a, sd, p, layer, n, pos, mask, rotary, rounding):
    """spec 4: per-head interleaved QKV (spec 2), rotary on q and k, scores q/(sqrt d (l+1)) . k, masked -10000
    then x(l+1), softmax, P.v, dense."""
    B, T, h = a.shape
    d = h // n
    heads = _linear(a, sd, p + "attention.query_key_value").reshape(B, T, n, 3 * d).transpose(0, 2, 1, 3)
    q, k, v = heads[..., :d], heads[..., d : 2 * d], heads[..., 2 * d :]
    q, k = _rotary(q, pos, rotary, rounding), _rotary(k, pos, rotary, rounding)
    c = float(layer + 1)
    scores = (q / (math.sqrt(d) * c)) @ k.transpose(0, 1, 3, 2)
    scores = np.where(mask, MASK_VALUE, scores) * c
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, h)
    return _linear(ctx, sd, p + "attention.dense")


def _geglu(b, sd, p, gelu, gate):
    """spec 3: u = dense_h_to_4h(b) = [u1 | u2] (2 x inner), out = dense_4h_to_h(u1 * gelu(u2)): the gate is the
    SECOND half ("first": the mutation that swaps them)."""
    u = _linear(b, sd, p + "mlp.dense_h_to_4h")
    u1, u2 = np.split(u, 2, axis=-1)
    if gate == "first":
        u1, u2 = u2, u1
    return _linear(u1 * gelu_of(u2, gelu), sd, p + "mlp.dense_4h_to_h")


def forward(
    sd: dict,
    cfg: dict,
    input_ids,
    position_ids,
    attention_mask,
    *,
    gelu: str = "erf",
    gate: str = "second",
    rotary: str = "1d",
    alpha_layers: int | None = None,
    inv_rounding: str = "fp16",
) -> np.ndarray:
    """Logits [B,T,V] float64 of a full forward (no cache). alpha = sqrt(2 * num_layers) (spec 3: DeepNorm,
    sqrt(140) for 70 layers) unless alpha_layers says otherwise; the head is tied to the word embeddings."""
    L, n = int(cfg["num_layers"]), int(cfg["num_attention_heads"])
    ids = np.asarray(input_ids, dtype=np.int64)
    pos = np.asarray(position_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=bool)
    if ids.ndim != 2 or pos.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and position_ids {pos.shape} must both be [B,T] (1D positions)")
    wte = _f64(sd["transformer.word_embeddings.weight"])
    alpha = math.sqrt(2.0 * (L if alpha_layers is None else alpha_layers))
    x = wte[ids]  # spec 3: no position embedding, no scaling
    for i in range(L):
        p = f"transformer.layers.{i}."
        a = _layer_norm(x, sd, p + "input_layernorm")
        hid = alpha * a + _attention(a, sd, p, i, n, pos, mask, rotary, inv_rounding)
        b = _layer_norm(hid, sd, p + "post_attention_layernorm")
        x = alpha * b + _geglu(b, sd, p, gelu, gate)
    return _layer_norm(x, sd, "transformer.final_layernorm") @ wte.T


# ---------------------------------------------------------------- generate.py's prompt layout (spec 5)


def context_ids(text_ids: list, blanks: tuple, gmask: int, eos: int) -> list:
    """spec 5: the text's ids with its blanks; [gMASK] appended if it holds none; eos appended unless the last
    token is a blank. (sop is appended by the caller: it starts the span.)"""
    seq = list(text_ids)
    if not any(t in blanks for t in seq):
        seq.append(gmask)
    if seq[-1] not in blanks:
        seq.append(eos)
    return seq


def layout(context: list, mask_position: int, gmask_counts: bool, total: int) -> tuple:
    """get_masks_and_position_ids for `context` + sop + generated tokens, `total` tokens in all: positions
    arange(total), the span's (from c = the sop index on) set to mask_position unless gmask_counts; mask:
    lower-triangular plus every column < c visible to every row. -> (positions [T], masked bool [T,T])."""
    c = len(context)
    pos = np.arange(total)
    if not gmask_counts:
        pos[c:] = mask_position
    visible = np.tril(np.ones((total, total), dtype=bool))
    visible[:, :c] = True
    return pos, ~visible


def greedy_span(sd, cfg, context, mask_position, gmask_counts, sop, stops, max_new, **knobs) -> list:
    """One span by full recomputation each step: context + sop + tokens so far; the argmax of the last row; ends
    at a stop id (not returned) or after max_new tokens."""
    out: list[int] = []
    while len(out) < max_new:
        seq = list(context) + [sop] + out
        pos, mask = layout(context, mask_position, gmask_counts, len(seq))
        logits = forward(sd, cfg, [seq], pos[None], mask[None, None], **knobs)
        nxt = int(np.argmax(logits[0, -1]))
        if nxt in stops:
            break
        out.append(nxt)
    return out


def fill_blanks(sd, cfg, text_ids, *, mask, smask, gmask, eos, sop, eop, max_new) -> tuple:
    """fill_blanks of generate.py (spec 5): blanks one at a time left to right, each span spliced into the
    sequence in place of its blank, the context run again for the next. Positions count up for a [gMASK] blank,
    stay at the mask position for [MASK] / [sMASK]. -> (final sequence, spans)."""
    blanks = (mask, smask, gmask)
    seq = context_ids(text_ids, blanks, gmask, eos)
    spans = []
    while any(t in blanks for t in seq):
        m = next(k for k, t in enumerate(seq) if t in blanks)
        span = greedy_span(sd, cfg, seq, m, seq[m] == gmask, sop, (eop, eos), max_new)
        spans.append(span)
        seq = seq[:m] + span + seq[m + 1 :]
    return seq, spans


def to_published(glmx_sd: dict, n: int) -> dict:
    """A state dict with glmx's names ([Q;K;V] blocks, `word_embeddings.weight`) in the SAT layout this oracle
    reads (spec 2): per-head interleaved QKV rows, `transformer.` in front of the embedding."""
    out = {}
    for key, value in glmx_sd.items():
        a = np.asarray(value, dtype=np.float64)
        if key.endswith("attention.query_key_value.weight") or key.endswith("attention.query_key_value.bias"):
            three_h = a.shape[0]
            d = three_h // (3 * n)
            a = a.reshape(3, n, d, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)  # [s, head, j] -> [head, s, j]
        out["transformer." + key if key == "word_embeddings.weight" else key] = a
    return out
