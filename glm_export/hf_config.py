"""The Hugging Face config.json mapping: a GLMConfig (glm_runtime.config, the one definition both sides share) to
and from the THUDM remote code's config.json. In: a GLMConfig or a parsed config.json. Out: the other. Only
checkpoint loading and conversion read or write these files; the runtime reads glmx manifests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glm_runtime.config import LAYERNORM_EPS, ConfigError, GLMConfig

# Fields only the ChatGLM2-6B / ChatGLM3-6B / GLM-4 config.json has (chatglm_v1_spec.md 9): they share
# model_type "chatglm" with ChatGLM-6B v1 but are another architecture.
CHATGLM2_FIELDS = ("multi_query_attention", "padded_vocab_size", "multi_query_group_num", "kv_channels", "rmsnorm")


def to_hf_dict(config: GLMConfig) -> dict[str, Any]:
    """The Hugging Face config.json of a GLMConfig (GLMConfig of the THUDM remote code, docs/glm.md 8.2; ChatGLM-6B's
    ChatGLMConfig, chatglm_v1_spec.md 1)."""
    if config.arch.hf_model_type == "chatglm":
        return _to_chatglm_dict(config)
    if config.arch.hf_model_type == "glm-130b":  # no HF layout was ever published: glmx's own fields, whole
        return {"model_type": "glm-130b", **config.to_dict()}
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


def _to_chatglm_dict(config: GLMConfig) -> dict[str, Any]:
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "inner_hidden_size": 4 * config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "layernorm_epsilon": config.layernorm_epsilon,
        "position_encoding_2d": True,
        "glmx": {
            "gelu": config.gelu,
            "tokenizer": config.tokenizer,
            "name": config.name,
            "architecture": config.architecture,
            "rotary_inv_freq": config.rotary_inv_freq,
        },
    }


def refuse_chatglm2(data: Mapping[str, Any]) -> None:
    """ChatGLM2-6B, ChatGLM3-6B and GLM-4 share model_type 'chatglm' with ChatGLM-6B v1: one line saying what
    the folder is, from the fields only they have."""
    fields = [f for f in CHATGLM2_FIELDS if f in data]
    if not fields:
        return
    padded = data.get("padded_vocab_size")
    which = "GLM-4" if padded == 151552 else "ChatGLM2-6B / ChatGLM3-6B" if padded == 65024 else "ChatGLM2/3 or GLM-4"
    raise ConfigError(
        f"config.json is a {which} model (model_type 'chatglm' with {', '.join(fields)}): a different architecture "
        f"from ChatGLM-6B v1 (RMSNorm, multi-query attention, rotary on half of each head, a causal mask); glmx "
        f"runs ChatGLM-6B v1 and GLM, not this model"
    )


def from_chatglm_dict(data: Mapping[str, Any], **overrides: Any) -> GLMConfig:
    """ChatGLM-6B v1's config.json (chatglm_v1_spec.md 1): its HF field names; what it cannot be is refused."""
    refuse_chatglm2(data)
    if not data.get("position_encoding_2d", True):
        raise ConfigError(
            "config.json has position_encoding_2d=false: ChatGLM-6B v1 uses 2D rotary positions (its 1D branch "
            "cannot generate correctly, chatglm_v1_spec.md); glmx does not run it"
        )
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if data.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks {missing}")
    inner = data.get("inner_hidden_size", 4 * data["hidden_size"])
    if inner != 4 * data["hidden_size"]:
        raise ConfigError(
            f"config.json has inner_hidden_size {inner}, not 4 x hidden_size {4 * data['hidden_size']}: every "
            f"released ChatGLM-6B has 4h, and glmx's graph assumes it"
        )
    eps = float(data.get("layernorm_epsilon", LAYERNORM_EPS))
    if eps != LAYERNORM_EPS:
        raise ConfigError(f"config.json has layernorm_epsilon {eps}; glmx runs the released {LAYERNORM_EPS}")
    extra = dict(data.get("glmx", {}))
    values: dict[str, Any] = {
        "num_layers": data["num_layers"],
        "hidden_size": data["hidden_size"],
        "num_attention_heads": data["num_attention_heads"],
        "vocab_size": data["vocab_size"],
        "max_sequence_length": data.get("max_sequence_length", 2048),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "gelu": "tanh",  # gelu_impl (chatglm_v1_spec.md 3)
        "tokenizer": extra.get("tokenizer", "chatglm"),
        "name": extra.get("name", "custom"),
        "architecture": "chatglm-6b",
        "rotary_inv_freq": extra.get("rotary_inv_freq", "fp16"),
    }
    values.update(overrides)
    return GLMConfig(**values)


def from_hf_dict(data: Mapping[str, Any], **overrides: Any) -> GLMConfig:
    """A GLMConfig from a Hugging Face config.json (docs/glm.md 8.2); ConfigError for what glmx cannot run."""
    if data.get("model_type") == "chatglm":
        return from_chatglm_dict(data, **overrides)
    if data.get("model_type") == "glm-130b":  # glmx's own folder of a GLM-130B-architecture model
        return GLMConfig.from_dict({**{k: v for k, v in data.items() if k != "model_type"}, **overrides})
    if data.get("model_type", "glm") != "glm":
        raise ConfigError(
            f"config.json has model_type {data.get('model_type')!r}; glmx reads 'glm' (GLM), 'chatglm' "
            f"(ChatGLM-6B v1) and 'glm-130b' (glmx's own GLM-130B folders; the released SAT shards: glmx convert "
            f"SAT_DIR --config model_glm_130b.sh)"
        )
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
