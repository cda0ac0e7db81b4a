"""Independent float64 numpy oracle of GLM (Du et al. 2021), written from the facts of docs/glm.md only.

In: a state dict with the official unprefixed names (docs/glm.md 1.1) and a small cfg dict.
Out: logits of one sequence (no cache), greedy blank filling by full recomputation, and a loader for
Hugging Face hub folders. Imports numpy only at module level; never imports glm_export / glm_runtime.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

LN_EPS = 1e-5  # docs/glm.md 1.2 / 9.18: fixed, whatever the config says
MASK_FILL = 65504.0  # docs/glm.md 1.3 / 9.5: fp16 minimum, added as -65504 * (1 - mask)

_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu(x: np.ndarray, gelu: str) -> np.ndarray:
    """docs/glm.md 1.2: "tanh" = original training code (gelu_impl), "erf" = HF remote code."""
    if gelu == "tanh":
        return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
    if gelu == "erf":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
    raise ValueError(f"gelu must be 'tanh' or 'erf', got {gelu!r}")


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch.nn.LayerNorm
    return (x - mu) / np.sqrt(var + LN_EPS) * w + b


def _linear(x: np.ndarray, sd: dict, name: str) -> np.ndarray:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]  # weights are [out, in] (docs/glm.md 1.1)


def sep_mask(T: int, sep: int) -> np.ndarray:
    """docs/glm.md 3.1 sep form: query i sees key j iff j < sep or j <= i. Returns (T, T) of 0/1 float64."""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    return ((j < sep) | (j <= i)).astype(np.float64)


def _attention(a: np.ndarray, sd: dict, p: str, n: int, mask: np.ndarray, s: float) -> np.ndarray:
    """docs/glm.md 1.3. a: (T, h) already input-LayerNormed. Returns the dense output (T, h)."""
    T, h = a.shape
    d = h // n
    qkv = _linear(a, sd, p + "attention.query_key_value")  # (T, 3h): [all Q | all K | all V]
    q, k, v = qkv[:, :h], qkv[:, h : 2 * h], qkv[:, 2 * h :]  # NOT interleaved per head (docs/glm.md 9.1)
    q = q.reshape(T, n, d).transpose(1, 0, 2)  # (n, T, d), head j = features [j*d, (j+1)*d)
    k = k.reshape(T, n, d).transpose(1, 0, 2)
    v = v.reshape(T, n, d).transpose(1, 0, 2)
    if s == 1.0:
        scores = q @ (k / math.sqrt(d)).transpose(0, 2, 1)  # (n, T, T), K divided first
        scores = scores * mask - MASK_FILL * (1.0 - mask)
    else:
        # docs/glm.md 1.3 attention_scale branch: scale, mask-multiply, subtract row max (masked entries are 0
        # then), multiply by s, add the fill. Same softmax as s = 1 up to rounding.
        scores = (q / math.sqrt(s)) @ (k / math.sqrt(d * s)).transpose(0, 2, 1)
        scores = scores * mask
        scores = scores - scores.max(-1, keepdims=True)
        scores = scores * s
        scores = scores - MASK_FILL * (1.0 - mask)
    scores = scores - scores.max(-1, keepdims=True)  # stable softmax (shift invariant)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)  # (n, T, T)
    ctx = (probs @ v).transpose(1, 0, 2).reshape(T, h)  # heads concatenated in head order
    return _linear(ctx, sd, p + "attention.dense")


def forward(
    sd: dict, cfg: dict, input_ids: list, position_ids: list, block_ids: list, sep: int, gelu: str
) -> np.ndarray:
    """Logits (T, V) of one sequence, no memory, dropout off (docs/glm.md 1.2, 1.3, 2, 3.1 sep form)."""
    L, h, n = int(cfg["num_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    s = float(cfg.get("attention_scale", 1.0) or 1.0)
    if h % n:
        raise ValueError(f"hidden_size {h} not divisible by num_attention_heads {n}")
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}  # no copy when already float64
    ids = np.asarray(input_ids, dtype=np.int64)
    pos = np.asarray(position_ids, dtype=np.int64)
    blk = np.asarray(block_ids, dtype=np.int64)
    T = ids.shape[0]
    if not (pos.shape == blk.shape == (T,)):
        raise ValueError(f"lengths differ: ids {T}, positions {pos.shape}, blocks {blk.shape}")
    wte = sd["word_embeddings.weight"]  # (V, h)
    pe = sd["transformer.position_embeddings.weight"]  # (P+1, h)
    be = sd["transformer.block_position_embeddings.weight"]  # (P+1, h)
    for name, arr, table in (("input id", ids, wte), ("position", pos, pe), ("block position", blk, be)):
        if T and (arr.min() < 0 or arr.max() >= table.shape[0]):
            raise IndexError(f"{name} out of range [0, {table.shape[0]}): {arr.min()}..{arr.max()}")

    x = wte[ids] + pe[pos] + be[blk]  # (T, h), no sqrt(h) scaling
    mask = sep_mask(T, int(sep))[None]  # (1, T, T)
    for i in range(L):
        p = f"transformer.layers.{i}."
        a = _layer_norm(x, sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"])
        x = x + _attention(a, sd, p, n, mask, s)  # residual on un-normalised x
        b = _layer_norm(x, sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"])
        f = _linear(_gelu(_linear(b, sd, p + "mlp.dense_h_to_4h"), gelu), sd, p + "mlp.dense_4h_to_h")
        x = x + f
    y = _layer_norm(x, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"])
    return y @ wte.T  # (T, V), tied head, no bias


def greedy_fill(
    sd: dict,
    cfg: dict,
    context_ids: list,
    mask_id_set: set,
    sop: int,
    eop: int,
    max_new_tokens: int,
    gelu: str,
    eos: int | None = None,
) -> list:
    """Greedy blank filling, every step a full forward (no cache). Returns one id list per blank.

    Follows docs/glm.md 4.1 (original interactive loop) with argmax instead of sampling, in its training-
    equivalent single-pass form of docs/glm.md 4.2:
    - context_ids is the finished Part A ([CLS] ... [eos] built by the caller); its tokens get
      position 0..C-1 and block 0; sep = C (Part A bidirectional, Part B causal, docs/glm.md 3.1).
    - blanks = every index of context_ids whose id is in mask_id_set, ascending (docs/glm.md 4.1 step 3).
    - for blank m: append sop at (m, 1); the t-th token fed for that span (t = 0 is sop) is at
      (m, t + 1) (docs/glm.md 2, 9.3); the next token = argmax of the logits of the LAST position.
    - stop on eop (docs/glm.md 4.1 step 4; also on `eos` when given, the original's eod stop): the stop token is
      neither returned NOR kept in the sequence; or stop after max_new_tokens tokens (counter < limit).
    - the sequence keeps growing as context + sop span1 + sop span2 ..., so later blanks attend to
      every earlier span (docs/glm.md 3.2, 4.1 step 5, 9.15).
    """
    stops = {int(eop)} | ({int(eos)} if eos is not None else set())
    C = len(context_ids)
    ids = [int(t) for t in context_ids]
    pos = list(range(C))
    blk = [0] * C
    spans = []
    for m in [i for i, t in enumerate(ids[:C]) if t in mask_id_set]:
        ids.append(int(sop))
        pos.append(m)
        blk.append(1)
        span = []
        while len(span) < max_new_tokens:
            logits = forward(sd, cfg, ids, pos, blk, C, gelu)
            nxt = int(np.argmax(logits[-1]))  # first max on ties, as torch.argmax on CPU
            if nxt in stops:
                break
            span.append(nxt)
            ids.append(nxt)
            pos.append(m)
            blk.append(len(span) + 1)
        spans.append(span)
    return spans


def load_hf_folder(folder: str) -> tuple:
    """(sd, cfg) from a hub folder: config.json + pytorch_model.bin | model.safetensors (docs/glm.md 8.2).

    Also reads sharded `*.index.json` checkpoints. Strips a leading "glm." prefix; float64 arrays.
    """
    with open(os.path.join(folder, "config.json")) as fh:
        raw = json.load(fh)
    cfg = {
        "num_layers": int(raw.get("num_layers", raw.get("num_hidden_layers"))),
        "hidden_size": int(raw["hidden_size"]),
        "num_attention_heads": int(raw["num_attention_heads"]),
        "vocab_size": int(raw["vocab_size"]),
        "max_sequence_length": int(raw["max_sequence_length"]),
        "attention_scale": float(raw.get("attention_scale", 1.0)),
    }

    def files(single: str, index: str) -> list:
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as fh:
                return sorted(set(json.load(fh)["weight_map"].values()))
        return [single] if os.path.exists(os.path.join(folder, single)) else []

    sd = {}
    st_files = files("model.safetensors", "model.safetensors.index.json")
    pt_files = files("pytorch_model.bin", "pytorch_model.bin.index.json")
    if st_files:
        from safetensors.numpy import load_file

        for f in st_files:
            sd.update(load_file(os.path.join(folder, f)))
    elif pt_files:
        import torch

        for f in pt_files:
            part = torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True)
            sd.update({k: v.float().numpy() for k, v in part.items()})  # .float(): numpy has no bf16
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    out = {}
    for k, v in sd.items():
        out[k[len("glm.") :] if k.startswith("glm.") else k] = np.asarray(v, dtype=np.float64)
    return out, cfg
