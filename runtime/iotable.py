"""The one declaration of a glmx graph's inputs and outputs, used by export, validation, manifest and runtime.

In: a GLMConfig (as object or dict) and a precision. Out: an IO table (names, dtypes, symbolic shapes) and
the KV-cache name patterns, stored in every ONNX / engine manifest so the runtime hard-codes no names.

Cache semantics (the reason `present` is not the usual past+new concatenation): GLM's attention has no
positional term (positions are absolute embeddings added at the input), so cached keys/values may sit in
any slot as long as the mask says which slots are visible. `present.{i}.*` therefore holds only the keys and
values of the `seq` tokens of this call; the runtime writes them into a preallocated cache in place and
passes that cache back as `past_key_values.{i}.*`, with unused slots masked out. No step copies the cache.
"""
from __future__ import annotations

from typing import Any, Mapping

PRECISIONS = ("fp32", "fp16")  # what export_onnx writes
# Quantized graphs (glm_export/quantize.py) keep the fp32 IO of their parent: only weights change.
QUANTIZED_PRECISIONS = ("int8-dynamic", "int4-weight", "qdq-int8")
KV_PATTERNS = {
    "past_key": "past_key_values.{i}.key",
    "past_value": "past_key_values.{i}.value",
    "present_key": "present.{i}.key",
    "present_value": "present.{i}.value",
}
# Symbolic dims: batch, seq (tokens in this call), past_seq (cache slots), total_seq = past_seq + seq.
DIMS = ("batch", "seq", "past_seq", "total_seq")


def _cfg(config: Any) -> Mapping[str, Any]:
    return config if isinstance(config, Mapping) else config.to_dict()


def kv_dtype(precision: str) -> str:
    if precision not in PRECISIONS + QUANTIZED_PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS + QUANTIZED_PRECISIONS}, got {precision!r}")
    return "float16" if precision == "fp16" else "float32"


def io_table(config: Any, precision: str = "fp32") -> dict[str, Any]:
    """{"inputs": [...], "outputs": [...], "kv_patterns": {...}, "num_layers": L, "cache": "present-is-new"}.

    Each entry: {"name", "dtype" (numpy name), "shape" (ints and symbolic dim names)}.
    """
    c = _cfg(config)
    L, n = c["num_layers"], c["num_attention_heads"]
    d, V = c["hidden_size"] // n, c["vocab_size"]
    kv = kv_dtype(precision)
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", 2, "seq"]},  # row 0 position, row 1 block
        {"name": "attention_mask", "dtype": "bool", "shape": ["batch", 1, "seq", "total_seq"]},  # True = visible
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", V]}]
    for i in range(L):
        for part in ("key", "value"):
            inputs.append({"name": KV_PATTERNS[f"past_{part}"].format(i=i), "dtype": kv,
                           "shape": ["batch", n, "past_seq", d]})
            outputs.append({"name": KV_PATTERNS[f"present_{part}"].format(i=i), "dtype": kv,
                            "shape": ["batch", n, "seq", d]})
    return {"inputs": inputs, "outputs": outputs, "kv_patterns": dict(KV_PATTERNS), "num_layers": L,
            "cache": "present-is-new", "dims": list(DIMS)}


def past_names(table: Mapping[str, Any]) -> list[tuple[str, str]]:
    p = table["kv_patterns"]
    return [(p["past_key"].format(i=i), p["past_value"].format(i=i)) for i in range(table["num_layers"])]


def present_names(table: Mapping[str, Any]) -> list[tuple[str, str]]:
    p = table["kv_patterns"]
    return [(p["present_key"].format(i=i), p["present_value"].format(i=i)) for i in range(table["num_layers"])]
