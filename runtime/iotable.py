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

from collections.abc import Mapping
from typing import Any

PRECISIONS = ("fp32", "fp16")  # what export_onnx writes
# Quantized graphs (glm_export/quantize.py) keep the fp32 IO of their parent: only weights change.
QUANTIZED_PRECISIONS = ("int8-dynamic", "int4-weight", "int8-weight", "qdq-int8")
KV_PATTERNS = {
    "past_key": "past_key_values.{i}.key",
    "past_value": "past_key_values.{i}.value",
    "present_key": "present.{i}.key",
    "present_value": "present.{i}.value",
}
# Symbolic dims: batch, seq (tokens in this call), past_seq (cache slots), total_seq = past_seq + seq,
# logits_seq = the positions whose logits are returned (seq - logits_start).
DIMS = ("batch", "seq", "past_seq", "total_seq", "logits_seq")
# logits_start [1] int64, optional (default 0 = every position): logits are computed for positions
# logits_start..seq-1 of this call only (Slice semantics, so -1 = the last position). Blank filling reads one
# row per call, and the head is a large share of a small model's context pass (40% of the bundled model's).
LOGITS_START = "logits_start"


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
        {"name": LOGITS_START, "dtype": "int64", "shape": [1], "default": [0]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "logits_seq", V]}]
    for i in range(L):
        for part in ("key", "value"):
            inputs.append(
                {"name": KV_PATTERNS[f"past_{part}"].format(i=i), "dtype": kv, "shape": ["batch", n, "past_seq", d]}
            )
            outputs.append(
                {"name": KV_PATTERNS[f"present_{part}"].format(i=i), "dtype": kv, "shape": ["batch", n, "seq", d]}
            )
    return {
        "inputs": inputs,
        "outputs": outputs,
        "kv_patterns": dict(KV_PATTERNS),
        "num_layers": L,
        "cache": "present-is-new",
        "dims": list(DIMS),
    }


def accepted_tables(config: Any, precision: str = "fp32") -> list[dict[str, Any]]:
    """The IO tables a manifest of this config may carry: the current one; without its optional inputs (a
    TensorRT engine, whose parser makes them constants); and the table of exports made before logits_start
    existed (no optional input, logits over every position). The runtime reads all three."""
    table = io_table(config, precision)
    required = without_optional_inputs(table)
    legacy = {
        **required,
        "dims": [d for d in DIMS if d != "logits_seq"],
        "outputs": [
            {**e, "shape": ["batch", "seq", e["shape"][2]]} if e["name"] == "logits" else e for e in table["outputs"]
        ],
    }
    return [table, required, legacy]


def required_inputs(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The inputs a caller must feed (those without a "default")."""
    return [e for e in table["inputs"] if "default" not in e]


def without_optional_inputs(table: Mapping[str, Any]) -> dict[str, Any]:
    """The table with only the inputs a caller must feed (what a TensorRT engine or an IO-bound call takes)."""
    return {**table, "inputs": required_inputs(table)}


def accepts(session_or_table: Any, name: str) -> bool:
    """Whether a session (anything with .inputs) or an IO table takes the input `name`."""
    inputs = session_or_table["inputs"] if isinstance(session_or_table, Mapping) else session_or_table.inputs
    return any(e["name"] == name for e in inputs)


def past_names(table: Mapping[str, Any]) -> list[tuple[str, str]]:
    p = table["kv_patterns"]
    return [(p["past_key"].format(i=i), p["past_value"].format(i=i)) for i in range(table["num_layers"])]


def present_names(table: Mapping[str, Any]) -> list[tuple[str, str]]:
    p = table["kv_patterns"]
    return [(p["present_key"].format(i=i), p["present_value"].format(i=i)) for i in range(table["num_layers"])]


def kv_names(kind: str, i: int) -> tuple[str, str]:
    """Layer i's (key, value) names in the graphs glmx builds: kind "past" (inputs) or "present" (outputs). What
    builds or cuts a graph asks here; what runs one reads its manifest's table (past_names, present_names)."""
    return KV_PATTERNS[f"{kind}_key"].format(i=i), KV_PATTERNS[f"{kind}_value"].format(i=i)
