"""The Hugging Face config.json mapping: a GLMConfig (glm_runtime.config, the one definition both sides share) to
and from the THUDM remote code's config.json. In: a GLMConfig or a parsed config.json. Out: the other. Only
checkpoint loading and conversion read or write these files; the runtime reads glmx manifests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glm_runtime.config import ConfigError, GLMConfig


def to_hf_dict(config: GLMConfig) -> dict[str, Any]:
    """The Hugging Face config.json of a GLMConfig (GLMConfig of the THUDM remote code, docs/glm.md 8.2)."""
    return {
        "model_type": "glm",
        "architectures": ["GLMModel"],
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "embedding_dropout_prob": config.hidden_dropout,
        "output_dropout_prob": config.hidden_dropout,
        "attention_dropout_prob": config.attention_dropout,
        "attention_scale": config.attention_scale,
        "block_position_encoding": True,
        "relative_encoding": False,
        "output_predict": True,
        "max_memory_length": 0,
        "parallel_output": True,
        "checkpoint_activations": False,
        "checkpoint_num_layers": 1,
        "initializer_range": 0.02,
        "glmx": {"gelu": config.gelu, "tokenizer": config.tokenizer, "name": config.name},
    }


def from_hf_dict(data: Mapping[str, Any], **overrides: Any) -> GLMConfig:
    """A GLMConfig from a Hugging Face config.json (docs/glm.md 8.2); ConfigError for what glmx cannot run."""
    if data.get("model_type", "glm") != "glm":
        raise ConfigError(f"config.json has model_type {data.get('model_type')!r}, expected 'glm'")
    if not data.get("block_position_encoding", True):
        raise ConfigError("block_position_encoding=False is not supported: every released GLM uses it")
    if data.get("relative_encoding", False):
        raise ConfigError("relative_encoding=True is not supported: no released GLM uses it")
    num_layers = data.get("num_layers", data.get("num_hidden_layers"))
    missing = [
        k
        for k, v in (
            ("num_layers", num_layers),
            ("hidden_size", data.get("hidden_size")),
            ("num_attention_heads", data.get("num_attention_heads")),
            ("vocab_size", data.get("vocab_size")),
        )
        if v is None
    ]
    if missing:
        raise ConfigError(f"config.json lacks {missing}")
    extra = dict(data.get("glmx", {}))
    values: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": data["hidden_size"],
        "num_attention_heads": data["num_attention_heads"],
        "vocab_size": data["vocab_size"],
        "max_sequence_length": data.get("max_sequence_length", 512),
        "hidden_dropout": data.get("output_dropout_prob", data.get("embedding_dropout_prob", 0.1)),
        "attention_dropout": data.get("attention_dropout_prob", 0.1),
        "attention_scale": float(data.get("attention_scale", 1.0)),
        # The HF remote code uses exact erf GeLU (docs/glm.md 1.2); a glmx-written file says otherwise.
        "gelu": extra.get("gelu", "erf"),
        "tokenizer": extra.get("tokenizer", "json"),
        "name": extra.get("name", "custom"),
    }
    values.update(overrides)
    return GLMConfig(**values)
