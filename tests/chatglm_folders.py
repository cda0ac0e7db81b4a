"""Tiny ChatGLM-6B (v1) folders laid out as the hub publishes THUDM/chatglm-6b (chatglm_v1_spec.md 1, 2): config.json
with the HF field names, pytorch_model-0000N-of-0000M.bin shards + their index (or safetensors), fp16 linears and
embedding, fp32 LayerNorms, a tied lm_head stored separately, rotary_emb.inv_freq buffers, the QKV rows interleaved
per head; ice_text.model + tokenizer_config.json when a tokenizer maker is given. Random weights, made here with
numpy: nothing of glmx's is used to write them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

NUM_IMAGE_TOKENS = {"current": 0, "old": 20000}  # the 2023-04-06 "slim" revision removed 20000 image rows


def chatglm_state_dict(
    layers: int, hidden: int, heads: int, vocab: int, seed: int = 0, scale: float = 0.3
) -> dict[str, np.ndarray]:
    """Published names and layout; linears and embedding fp16, LayerNorms fp32 (spec 2, dtypes)."""
    rng = np.random.default_rng(seed)

    def g(*shape, s=scale):
        return rng.normal(0.0, s, shape).astype(np.float16)

    sd: dict[str, np.ndarray] = {"transformer.word_embeddings.weight": g(vocab, hidden, s=1.0)}
    d = hidden // heads
    inv_freq = (1.0 / (10000 ** (np.arange(0, d // 2, 2) / (d // 2)))).astype(np.float16)
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            sd[p + ln + ".weight"] = (1 + rng.normal(0, 0.1, hidden)).astype(np.float32)
            sd[p + ln + ".bias"] = rng.normal(0, 0.1, hidden).astype(np.float32)
        sd[p + "attention.rotary_emb.inv_freq"] = inv_freq
        for name, (out, inp) in {
            "attention.query_key_value": (3 * hidden, hidden),
            "attention.dense": (hidden, hidden),
            "mlp.dense_h_to_4h": (4 * hidden, hidden),
            "mlp.dense_4h_to_h": (hidden, 4 * hidden),
        }.items():
            sd[p + name + ".weight"] = g(out, inp, s=scale / np.sqrt(inp / 16))
            sd[p + name + ".bias"] = g(out, s=0.05)
    sd["transformer.final_layernorm.weight"] = (1 + rng.normal(0, 0.1, hidden)).astype(np.float32)
    sd["transformer.final_layernorm.bias"] = rng.normal(0, 0.1, hidden).astype(np.float32)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].copy()
    return sd


def chatglm_config(layers: int, hidden: int, heads: int, vocab: int, offset: int, **more) -> dict:
    """config.json as the hub's (spec 1): HF field names, special ids of the revision."""
    return {
        "_name_or_path": "THUDM/chatglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": offset + 130004 - 130000,
        "eos_token_id": offset + 130005 - 130000,
        "hidden_size": hidden,
        "inner_hidden_size": 4 * hidden,
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048,
        "model_type": "chatglm",
        "num_attention_heads": heads,
        "num_layers": layers,
        "position_encoding_2d": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "use_cache": True,
        "vocab_size": vocab,
        **more,
    }


def write_bin_shards(folder: Path, sd: dict[str, np.ndarray], shards: int = 2) -> None:
    """pytorch_model-0000N-of-0000M.bin (torch pickles, as the hub's) + pytorch_model.bin.index.json."""
    import torch

    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: torch.from_numpy(np.ascontiguousarray(sd[key])) for key in keys[k * per : (k + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(int(a.nbytes) for a in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors_shards(folder: Path, sd: dict[str, np.ndarray], shards: int = 2) -> None:
    """model-0000N-of-0000M.safetensors + model.safetensors.index.json (the hub's safetensors layout)."""
    from safetensors.numpy import save_file

    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: np.ascontiguousarray(sd[key]) for key in keys[k * per : (k + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(int(a.nbytes) for a in sd.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_chatglm_folder(
    folder: Path,
    *,
    revision: str = "current",
    safetensors: bool = False,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    text_vocab: int = 640,
    seed: int = 0,
    shards: int = 2,
    tokenizer: Callable[[Path, int], None] | None = None,
    mutate: Callable[[dict[str, np.ndarray]], None] | None = None,
    config_extra: dict | None = None,
) -> Path:
    """A hub-layout ChatGLM-6B folder of random weights. text_vocab: embedding rows past the image offset (the
    tiny tokenizer's pieces must fit; padded like the real 130344 -> 130528). tokenizer(folder, offset): writes
    ice_text.model + tokenizer_config.json (tests/chatglm_fixtures.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    offset = NUM_IMAGE_TOKENS[revision]
    vocab = offset + text_vocab
    sd = chatglm_state_dict(layers, hidden, heads, vocab, seed)
    if mutate is not None:
        mutate(sd)
    (write_safetensors_shards if safetensors else write_bin_shards)(folder, sd, shards)
    config = chatglm_config(layers, hidden, heads, vocab, offset, **(config_extra or {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer(folder, offset)
    return folder


QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_like_hf(sd: dict[str, np.ndarray], bits: int) -> None:
    """The chatglm-6b-int4 / -int8 layout, written here independently of glmx (spec 2): each layer's four linears
    as int8 `weight` (int4: two per byte, the even column in the high nibble) + fp16 `weight_scale` per row,
    scale = max|row| / (2^(bits-1) - 1) in fp16, q = round(W / scale)."""
    top = 2 ** (bits - 1) - 1
    for key in [k for k in sd if k.endswith(".weight") and any(f".{m}." in k for m in QUANTIZED_LINEARS)]:
        w = sd[key].astype(np.float32)
        scale = (np.abs(w).max(axis=1) / top).astype(np.float16)
        q = np.clip(np.round(w / scale.astype(np.float32)[:, None]), -top - 1, top).astype(np.int8)
        if bits == 4:
            nibbles = q.astype(np.uint8) & 0x0F
            q = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).astype(np.uint8).view(np.int8)
        sd[key] = q
        sd[key + "_scale"] = scale


def dequantize_like_hf(sd: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """The float state dict the released integers stand for (q x scale): what the HF code computes with."""
    out = {}
    for key, value in sd.items():
        if key.endswith("_scale"):
            continue
        if key + "_scale" in sd:
            q = value
            if bits == 4:
                raw = q.view(np.uint8)
                hi, lo = (raw >> 4).astype(np.int16), (raw & 0x0F).astype(np.int16)
                hi, lo = np.where(hi > 7, hi - 16, hi), np.where(lo > 7, lo - 16, lo)
                q = np.stack([hi, lo], axis=2).reshape(q.shape[0], -1)
            value = q.astype(np.float32) * sd[key + "_scale"].astype(np.float32)[:, None]
        out[key] = value
    return out
