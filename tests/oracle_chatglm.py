"""Independent float64 numpy oracle of ChatGLM-6B (v1), written from the facts of the research note
shared/chatglm_v1_spec.md only (its "Checked by running the HF remote code" list is the ground truth).

In: a state dict with the PUBLISHED Hugging Face names (spec 2) and a small cfg dict. Out: batched logits and the
HF-layout KV cache, the prompt's positions and mask (spec 5), a left-padded batch as the tokenizer builds it,
greedy generation by full recomputation, the P-tuning v2 prefix (spec 8) and a loader for hub folders. Imports
numpy and the standard library only (torch lazily, inside load_hf_folder, to unpickle .bin shards); never
imports glm_export / glm_runtime.

Layouts (HF's, spec 3-4): input_ids [B,T]; position_ids [B,2,T] (row 0 positions, row 1 block positions);
attention_mask bool [B,1,T,K] with True = MASKED; a cache entry per layer is (k, v), each [K, B, H, d], keys
stored AFTER rotary (prefix keys, which are never rotated, first).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

LN_EPS = 1e-5  # spec 1 / 3: layernorm_epsilon
MASK_VALUE = -10000.0  # spec 4.4: finite fill, BEFORE the x(layer+1) rescale; -inf would NaN a padded row
ROTARY_BASE = 10000.0  # spec 4.2
GELU_C = 0.7978845608028654  # spec 3.3: tanh ("OpenAI") GeLU
DEFAULT_ALPHA_LAYERS = 28  # spec 3.2: GLMBlock's default num_layers=28, never passed the config value


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _layer_norm(x: np.ndarray, sd: dict, name: str) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch.nn.LayerNorm
    return (x - mu) / np.sqrt(var + LN_EPS) * _f64(sd[name + ".weight"]) + _f64(sd[name + ".bias"])


def _linear(x: np.ndarray, sd: dict, name: str) -> np.ndarray:
    """torch Linear: weights [out, in]; every ChatGLM linear has a bias (spec 2)."""
    return x @ _f64(sd[name + ".weight"]).T + _f64(sd[name + ".bias"])


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(GELU_C * x * (1.0 + 0.044715 * x * x)))


def _inv_freq(d: int, inv_freq: str) -> np.ndarray:
    """spec 4.2: rotary dim rd = d/2, rd/2 frequencies 1/10000^(2j/rd).

    "fp16": computed in float32 and rounded to float16, as HF's `inv_freq.half()` (the note's reference; the
    float64 product with an integer position < 8192 is then exactly HF's fp32 product). "fp32": the float32 values
    (chatglm.cpp / TensorRT-LLM frequencies). "exact": float64. The angles are always formed in float64.
    """
    rd = d // 2
    if inv_freq == "exact":
        return 1.0 / ROTARY_BASE ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    exponent = np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd)
    f32 = np.float32(1.0) / np.float32(ROTARY_BASE) ** exponent  # float32 throughout, as torch's .float()
    if inv_freq == "fp32":
        return f32.astype(np.float64)
    if inv_freq == "fp16":
        return f32.astype(np.float16).astype(np.float64)
    raise ValueError(f"inv_freq must be 'fp16', 'fp32' or 'exact', got {inv_freq!r}")


def _rotate(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """NeoX rotate_half on the last dim (width rd): pair j with j + rd/2. x [B,H,T,rd]; pos [B,T] integers.

    The angle table is indexed by the integer position: theta = pos * inv_freq, emb = cat(theta, theta)."""
    theta = pos[:, None, :, None].astype(np.float64) * freqs  # [B,1,T,rd/2]
    cos, sin = np.cos(theta), np.sin(theta)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotary_2d(x: np.ndarray, position_ids: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """spec 4.2: dims 0..d/2-1 rotate with the positions (row 0), d/2..d-1 with the block positions (row 1)."""
    rd = x.shape[-1] // 2
    return np.concatenate(
        [_rotate(x[..., :rd], position_ids[:, 0], freqs), _rotate(x[..., rd:], position_ids[:, 1], freqs)], axis=-1
    )


def _split_qkv(mixed: np.ndarray, n: int) -> tuple:
    """spec 2: the fused rows are interleaved PER HEAD, row r = head*3d + s*d + j (s: 0 q, 1 k, 2 v).

    mixed [B,T,3h] -> q, k, v each [B,H,T,d]."""
    B, T, three_h = mixed.shape
    d = three_h // (3 * n)
    heads = mixed.reshape(B, T, n, 3 * d).transpose(0, 2, 1, 3)  # [B,H,T,3d]
    return heads[..., :d], heads[..., d : 2 * d], heads[..., 2 * d :]


def _to_cache(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 0, 1, 3)  # [B,H,T,d] -> HF cache layout [T,B,H,d]


def _from_cache(x, B: int) -> np.ndarray:
    x = _f64(x)  # [K,B',H,d], B' = B or 1 (a prefix made once for the batch)
    return np.broadcast_to(x, (x.shape[0], B, *x.shape[2:])).transpose(1, 2, 0, 3)  # -> [B,H,K,d]


def _attention(a, sd, p, layer, n, position_ids, mask, freqs, earlier) -> tuple:
    """spec 4. a: [B,T,h] input-LayerNormed. earlier: [B,H,K0,d] keys/values before these tokens (prefix, past),
    keys already rotated. mask: bool [B,1,T,K0+T], True = masked. Returns (dense output [B,T,h], (k, v) [B,H,K,d])."""
    B, T, h = a.shape
    q, k, v = _split_qkv(_linear(a, sd, p + "attention.query_key_value"), n)
    d = q.shape[-1]
    q, k = _rotary_2d(q, position_ids, freqs), _rotary_2d(k, position_ids, freqs)
    k = np.concatenate([earlier[0], k], axis=2)
    v = np.concatenate([earlier[1], v], axis=2)
    c = float(layer + 1)  # spec 4.4: the layer-scaling coefficient, 1..L
    scores = (q / (math.sqrt(d) * c)) @ k.transpose(0, 1, 3, 2)  # [B,H,T,K]
    scores = np.where(mask, MASK_VALUE, scores) * c  # fill -10000 first, then x(layer+1): masked = -10000*c
    scores = scores - scores.max(-1, keepdims=True)  # float64 softmax (shift invariant)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, h)  # heads concatenated in head order
    return _linear(ctx, sd, p + "attention.dense"), (k, v)


def _full_mask(attention_mask, B: int, T: int, P: int, K: int) -> np.ndarray:
    """bool [B,1,T,P+K]: the caller's mask over (past + new) columns, P always-visible prefix columns in front."""
    if attention_mask is None:
        return np.zeros((B, 1, T, P + K), dtype=bool)
    m = np.asarray(attention_mask)
    if m.dtype != np.bool_:
        raise TypeError(f"attention_mask must be bool with True = masked (HF), got {m.dtype}")
    if m.ndim != 4 or m.shape[-1] != K or m.shape[-2] != T:
        raise ValueError(f"attention_mask {m.shape}: expected [B,1,{T},{K}] (past + new columns, prefix excluded)")
    m = np.broadcast_to(m, (B, 1, T, K))
    return np.concatenate([np.zeros((B, 1, T, P), dtype=bool), m], axis=-1)


def forward(
    sd: dict,
    cfg: dict,
    input_ids,
    position_ids,
    attention_mask=None,
    past=None,
    inv_freq: str = "fp16",
    alpha_layers: int = DEFAULT_ALPHA_LAYERS,
    prefix=None,
) -> tuple:
    """Logits [B,T,V] float64 and the per-layer presents [(k, v)], each [K,B,H,d] with K = P + past + T.

    - input_ids [B,T]; position_ids [B,2,T] (0-based, spec 5); attention_mask bool [B,1,T,past+T], True =
      masked, or None = nothing masked (the single-sequence decode step of spec 4.4).
    - past: per-layer (k, v) [past,B,H,d] as HF's cache holds them (keys after rotary), e.g. a previous call's
      presents. A cache returned by a call WITH a prefix already holds the prefix at its front: decode from it
      with prefix=None and a mask over all its columns (its first P False) or None.
    - prefix: P-tuning v2 per-layer raw (k, v) [P,B,H,d] or [P,1,H,d] (prefix_from_ptuning): not rotated,
      occupying no positions, put in front of past; the mask gets P always-visible columns prepended (spec 8).
    - alpha = sqrt(2 * alpha_layers), 28 by default whatever cfg["num_layers"] says (spec 3.2).
    - the head is tied: logits = final_LN(x) @ word_embeddings^T. A differing lm_head.weight is ignored, as
      transformers <= 4.33 ties it on load (spec 2; on transformers 5.x it is not tied).
    """
    L, h, n = int(cfg["num_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if h % n or (h // n) % 4:
        raise ValueError(f"hidden_size {h} / num_attention_heads {n}: head dim must be a multiple of 4")
    ids = np.asarray(input_ids, dtype=np.int64)
    pos = np.asarray(position_ids, dtype=np.int64)
    if ids.ndim != 2 or pos.shape != (ids.shape[0], 2, ids.shape[1]):
        raise ValueError(f"input_ids {ids.shape} must be [B,T] and position_ids {pos.shape} [B,2,T]")
    B, T = ids.shape
    wte = _f64(sd["transformer.word_embeddings.weight"])  # [V,h]
    P = 0 if prefix is None else int(np.shape(prefix[0][0])[0])
    K0 = 0 if past is None else int(np.shape(past[0][0])[0])
    mask = _full_mask(attention_mask, B, T, P, K0 + T)
    freqs = _inv_freq(h // n, inv_freq)
    alpha = math.sqrt(2.0 * alpha_layers)
    x = wte[ids]  # [B,T,h]: no scaling, no position embedding (spec 3.1)
    presents = []
    for i in range(L):
        p = f"transformer.layers.{i}."
        earlier = [np.zeros((B, n, 0, h // n)), np.zeros((B, n, 0, h // n))]
        for cache in (prefix, past):
            if cache is not None:
                earlier = [np.concatenate([e, _from_cache(c, B)], axis=2) for e, c in zip(earlier, cache[i])]
        a = _layer_norm(x, sd, p + "input_layernorm")
        att, (k, v) = _attention(a, sd, p, i, n, pos, mask, freqs, earlier)
        presents.append((_to_cache(k), _to_cache(v)))
        hid = alpha * a + att  # spec 3.2: the skip path carries alpha * LN(x), x itself is dropped
        b = _layer_norm(hid, sd, p + "post_attention_layernorm")
        x = alpha * b + _linear(_gelu(_linear(b, sd, p + "mlp.dense_h_to_4h")), sd, p + "mlp.dense_4h_to_h")
    y = _layer_norm(x, sd, "transformer.final_layernorm")
    return y @ wte.T, presents


def _mask_index(ids: list, first: int, second: int) -> int:
    for tok in (first, second):
        if tok in ids:
            return ids.index(tok)  # the first occurrence, as list.index
    raise ValueError(f"neither mask id {first} nor {second} in the sequence")


def _context_index(ids: list, sop_id: int) -> int:
    if sop_id not in ids:
        raise ValueError(f"<sop> id {sop_id} not in the sequence (HF raises too)")
    return ids.index(sop_id)


def _positions_and_mask(ids: list, c: int, m: int) -> tuple:
    T = len(ids)
    pos = np.arange(T, dtype=np.int64)
    pos[c:] = m
    blk = np.concatenate([np.zeros(c, dtype=np.int64), np.arange(1, T - c + 1, dtype=np.int64)])
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) | (j < c)  # tril, plus columns 0..c-1 for every row
    return np.stack([pos, blk]), ~visible[None]


def chatglm_positions(ids, gmask_id: int, mask_id: int, sop_id: int) -> tuple:
    """One sequence as HF's get_position_ids / get_masks (model path, spec 5): (position_ids [2,T], mask bool
    [1,T,T] True = masked). c = index of <sop>; m = index of [gMASK] if present, else of [MASK]; pos = 0..T-1
    with pos[c:] = m; block = 0 before c, 1, 2, ... from c; rows 0..c-1 see columns 0..c-1 (not <sop>), rows
    from c on are causal over everything before them."""
    ids = [int(t) for t in ids]
    return _positions_and_mask(ids, _context_index(ids, sop_id), _mask_index(ids, gmask_id, mask_id))


def left_padded_batch(seqs, pad_id: int, gmask_id: int, mask_id: int, sop_id: int, prefer: str = "mask") -> tuple:
    """A batch padded on the LEFT to the longest sequence, as ChatGLMTokenizer._pad builds it (spec 5, "Two code
    paths"): input_ids [B,T], position_ids [B,2,T], mask bool [B,1,T,T] True = masked.

    Each sequence's positions and mask are built unpadded, then padded in front: mask rows AND columns of the
    padding True (a pad row is fully masked), positions and blocks 0. m: the tokenizer path prefers [MASK] over
    [gMASK] (prefer="mask", the default, as _pad does); prefer="gmask" gives the model path's m instead."""
    if prefer not in ("mask", "gmask"):
        raise ValueError(f"prefer must be 'mask' or 'gmask', got {prefer!r}")
    seqs = [[int(t) for t in s] for s in seqs]
    T = max(len(s) for s in seqs)
    ids, pos, mask = [], [], []
    for s in seqs:
        first, second = (mask_id, gmask_id) if prefer == "mask" else (gmask_id, mask_id)
        p, m = _positions_and_mask(s, _context_index(s, sop_id), _mask_index(s, first, second))
        pad = T - len(s)
        ids.append([int(pad_id)] * pad + s)
        pos.append(np.pad(p, [(0, 0), (pad, 0)]))
        mask.append(np.pad(m, [(0, 0), (pad, 0), (pad, 0)], constant_values=True))
    return np.asarray(ids, dtype=np.int64), np.stack(pos), np.stack(mask)


def greedy_generate(
    sd: dict,
    cfg: dict,
    ids,
    gmask_id: int,
    mask_id: int,
    sop_id: int,
    eop_id: int,
    max_new_tokens: int,
    **forward_kwargs,
) -> list:
    """Greedy generation after a prompt that already ends in [gMASK] <sop> (spec 5), every step a FULL forward
    of the whole sequence (no cache). The sequence's positions and mask are chatglm_positions of the grown
    sequence, so the token at index j >= c is at (m, j - c + 1). Returns the new ids; the <eop> that stops it is
    not returned. forward_kwargs: inv_freq, alpha_layers, prefix ([P,1,H,d] entries)."""
    seq = [int(t) for t in ids]
    out: list = []
    while len(out) < max_new_tokens:
        pos, mask = chatglm_positions(seq, gmask_id, mask_id, sop_id)
        logits, _ = forward(sd, cfg, [seq], pos[None], mask[None], **forward_kwargs)
        nxt = int(np.argmax(logits[0, -1]))  # the first max on ties, as torch.argmax
        if nxt == int(eop_id):
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def prefix_from_ptuning(prefix_sd: dict, cfg: dict, pre_seq_len: int, prefix_projection: bool) -> list:
    """The P-tuning v2 PrefixEncoder (spec 8) -> per-layer raw (k, v), each [P,1,H,d] (batch 1; forward broadcasts).

    prefix_sd: `transformer.prefix_encoder.embedding.weight` [P, 2Lh] or, with projection, [P, h] plus `trans.0`
    (Linear h->h), Tanh, `trans.2` (Linear h->2Lh); the "transformer." front is optional. The output of
    arange(P) is viewed [P, 2L, H, d]; layer i takes key = slice 2i, value = slice 2i+1 (dropout: eval)."""
    L, h, n = int(cfg["num_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    sd = {k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in prefix_sd.items()}
    x = _f64(sd["prefix_encoder.embedding.weight"])[np.arange(int(pre_seq_len))]
    if prefix_projection:
        x = _linear(np.tanh(_linear(x, sd, "prefix_encoder.trans.0")), sd, "prefix_encoder.trans.2")
    if x.shape[-1] != 2 * L * h:
        raise ValueError(f"prefix width {x.shape[-1]} != 2 * num_layers * hidden_size = {2 * L * h}")
    kv = x.reshape(int(pre_seq_len), 2 * L, n, h // n)
    return [(kv[:, 2 * i][:, None], kv[:, 2 * i + 1][:, None]) for i in range(L)]


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_safetensors(path: str) -> dict:
    """A .safetensors file with numpy alone: u64 header size, JSON header, raw little-endian data (BF16 widened)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        data = fh.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        raw = data[lo:hi]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"])
    return out


def _shards(folder: str, single: str, index: str) -> list:
    if os.path.exists(os.path.join(folder, index)):
        with open(os.path.join(folder, index)) as fh:
            return sorted(set(json.load(fh)["weight_map"].values()))
    return [single] if os.path.exists(os.path.join(folder, single)) else []


def load_hf_folder(folder: str) -> tuple:
    """(sd, cfg) from a hub folder: config.json plus `pytorch_model-0000N-of-0000M.bin` shards through
    `pytorch_model.bin.index.json` (or one pytorch_model.bin), or model.safetensors (sharded or not).

    Each tensor's dtype is read from the file (the LayerNorms may be fp32 in an fp16 checkpoint, spec 2) and kept
    as float32 (fp16/bf16 widen exactly; forward computes in float64, layer by layer). The `rotary_emb.inv_freq`
    buffers are dropped (ignored on load, spec 2). cfg: config.json's sizes, special ids and P-tuning fields."""
    with open(os.path.join(folder, "config.json")) as fh:
        raw = json.load(fh)
    if int(raw.get("quantization_bit") or 0):
        raise ValueError(f"{folder}: quantization_bit {raw['quantization_bit']}: the oracle reads float weights only")
    cfg = {
        "num_layers": int(raw.get("num_layers", raw.get("num_hidden_layers"))),
        "hidden_size": int(raw["hidden_size"]),
        "num_attention_heads": int(raw["num_attention_heads"]),
    }
    for key in ("vocab_size", "inner_hidden_size", "max_sequence_length", "pre_seq_len", "prefix_projection"):
        cfg[key] = raw.get(key)  # None where config.json lacks it (pre_seq_len, prefix_projection: not P-tuned)
    for key in ("mask_token_id", "gmask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        cfg[key] = raw.get(key)  # config.json's ids: the ChatGLMConfig class defaults are stale (spec 1)
    sd = {}
    st = _shards(folder, "model.safetensors", "model.safetensors.index.json")
    pt = _shards(folder, "pytorch_model.bin", "pytorch_model.bin.index.json")
    if st:
        for f in st:
            sd.update(_read_safetensors(os.path.join(folder, f)))
    elif pt:
        import torch

        for f in pt:
            part = torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True)
            sd.update({k: v.float().numpy() for k, v in part.items()})
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (index)")
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    return sd, cfg
