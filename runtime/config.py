"""GLMConfig: the frozen description of a GLM's shape, with presets for the released models.

In: keyword values, a preset name, glmx JSON, or a Hugging Face `config.json` dict.
Out: a validated, immutable config that round-trips through JSON and goes into every manifest.
Facts: docs/glm.md sections 1.1, 6 and 8.2. Torch-free on purpose (the runtime reads it too).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from glm_runtime.architecture import ROTARY_INV_FREQ, Architecture, ArchitectureError, get_architecture
from glm_runtime.errors import GLMXError

LAYERNORM_EPS = 1e-5  # fixed in the original, whatever --layernorm-epsilon says (docs/glm.md 9.18)
GELU_KINDS = ("tanh", "erf")  # tanh = original training code; erf = HF remote code (docs/glm.md 1.2)
# chatglm: ChatGLM-6B's ice_text.model (SentencePiece with its own text rules, chatglm_v1_spec.md 6)
# icetk: GLM-130B's icetk text model (the old ice_text.model, ids +20000) with its specials appended (spec 6)
TOKENIZER_KINDS = ("gpt2", "roberta", "bert", "chinese-sp", "chinese-sp-fix", "json", "chatglm", "icetk")


class ConfigError(GLMXError, ValueError):
    """A config value is missing, of the wrong type, or inconsistent with another."""


@dataclass(frozen=True)
class GLMConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # padded V: tokenizer size rounded up to a multiple of 128
    max_sequence_length: int  # P; the position tables have P + 1 rows
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    gelu: str = "tanh"
    attention_scale: float = 1.0
    tokenizer: str = "json"  # which GLM vocabulary the ids belong to (docs/glm.md 7)
    name: str = "custom"
    architecture: str = "glm"  # glm_runtime.architecture: what differs between GLM and ChatGLM-6B, as data
    rotary_inv_freq: str = "fp16"  # rotary architectures: "fp16" = the HF code's rounded frequencies, "fp32" exact
    inner_hidden_size: int | None = None  # the MLP's inner width; None: 4 x hidden (GLM-130B: 32768, GeGLU x2)

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: every head needs the same width"
            )
        for field in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{field} must be in [0, 1), got {value!r}")
        if self.gelu not in GELU_KINDS:
            raise ConfigError(f"gelu must be one of {GELU_KINDS}, got {self.gelu!r}")
        if not isinstance(self.attention_scale, (int, float)) or self.attention_scale < 1.0:
            raise ConfigError(f"attention_scale must be a number >= 1.0, got {self.attention_scale!r}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {self.tokenizer!r}")
        try:
            arch = get_architecture(self.architecture)
        except ArchitectureError as exc:
            raise ConfigError(str(exc)) from None
        if self.rotary_inv_freq not in ROTARY_INV_FREQ:
            raise ConfigError(f"rotary_inv_freq must be one of {ROTARY_INV_FREQ}, got {self.rotary_inv_freq!r}")
        if self.inner_hidden_size is not None and (
            not isinstance(self.inner_hidden_size, int)
            or isinstance(self.inner_hidden_size, bool)
            or self.inner_hidden_size <= 0
        ):
            raise ConfigError(f"inner_hidden_size must be a positive integer or null, got {self.inner_hidden_size!r}")
        if arch.rotary and self.head_dim % 4:
            raise ConfigError(
                f"{arch.title} rotates two halves of each head in pairs: head_dim {self.head_dim} "
                f"must be a multiple of 4"
            )

    # derived sizes
    @property
    def arch(self) -> Architecture:
        return get_architecture(self.architecture)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def inner_size(self) -> int:
        """The MLP's inner width (the GeGLU's per half): inner_hidden_size, or 4 x hidden."""
        return 4 * self.hidden_size if self.inner_hidden_size is None else self.inner_hidden_size

    @property
    def mlp_in_size(self) -> int:
        """Rows of dense_h_to_4h: the inner width, twice it for a GeGLU ([value; gate])."""
        return self.inner_size * (2 if self.arch.mlp == "geglu" else 1)

    @property
    def position_table_rows(self) -> int:
        return self.max_sequence_length + 1

    @property
    def layernorm_epsilon(self) -> float:
        return LAYERNORM_EPS

    @property
    def position_tables(self) -> bool:
        """Whether the model adds learned position tables (GLM) rather than rotating (ChatGLM-6B)."""
        return self.arch.positions == "learned"

    def num_parameters(self) -> int:
        h, L = self.hidden_size, self.num_layers
        i, j = self.inner_size, self.mlp_in_size
        per_layer = 3 * h * h + 3 * h + h * h + h + j * h + j + i * h + h + 4 * h  # qkv, dense, mlp, 2 LNs
        tables = 2 * self.position_table_rows * h if self.position_tables else 0
        return self.vocab_size * h + tables + L * per_layer + 2 * h

    def replace(self, **changes: Any) -> GLMConfig:
        return dataclasses.replace(self, **changes)

    # glmx JSON
    def to_dict(self) -> dict[str, Any]:
        """Every field, except the architecture fields of a 2021 GLM (its manifests, written before they
        existed, stay what they were)."""
        data = dataclasses.asdict(self)
        if self.architecture == "glm":
            del data["architecture"]
        if not self.arch.rotary:
            del data["rotary_inv_freq"]
        if self.inner_hidden_size is None:
            del data["inner_hidden_size"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown GLMConfig fields {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"incomplete GLMConfig: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GLMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)


def _preset(name: str, L: int, h: int, n: int, P: int, V: int, tokenizer: str, **more: Any) -> GLMConfig:
    return GLMConfig(
        num_layers=L,
        hidden_size=h,
        num_attention_heads=n,
        max_sequence_length=P,
        vocab_size=V,
        tokenizer=tokenizer,
        name=name,
        **more,
    )


# ChatGLM-6B: no dropout in its config (inference only)
CHATGLM = {"architecture": "chatglm-6b", "gelu": "tanh", "hidden_dropout": 0.0, "attention_dropout": 0.0}
# GLM-130B (chatglm_v1_spec.md 1): configs/model_glm_130b.sh; erf GeLU inside its GeGLU
GLM130B = {"architecture": "glm-130b", "gelu": "erf", "hidden_dropout": 0.0, "attention_dropout": 0.0}


# Spec section 6. Keys are the names users type (`--preset glm-10b`).
PRESETS: dict[str, GLMConfig] = {
    c.name: c
    for c in (
        _preset("glm-base", 12, 768, 12, 512, 30592, "bert"),
        _preset("glm-large", 24, 1024, 16, 512, 30592, "bert"),
        _preset("glm-roberta-large", 24, 1024, 16, 512, 50304, "roberta"),
        _preset("glm-large-chinese", 24, 1024, 16, 1024, 50048, "chinese-sp-fix"),
        _preset("glm-2b", 36, 2048, 32, 1024, 50304, "gpt2"),
        _preset("glm-10b", 48, 4096, 64, 1024, 50304, "gpt2"),
        _preset("glm-10b-chinese", 48, 4096, 64, 1024, 50048, "chinese-sp"),
        # tiny: for tests; two layers, d = 16, a vocabulary big enough for glmx's small tokenizers
        _preset("glm-tiny", 2, 64, 4, 128, 512, "json"),
        # ChatGLM-6B v1 (chatglm_v1_spec.md 1): the current vocabulary; 150528 before 2023-04-06
        _preset("chatglm-6b", 28, 4096, 32, 2048, 130528, "chatglm", **CHATGLM),
        _preset("chatglm-tiny", 2, 64, 4, 2048, 1024, "chatglm", **CHATGLM),  # tests: ChatGLM-6B's layout, tiny
        _preset("glm-130b", 70, 12288, 96, 2048, 150528, "icetk", inner_hidden_size=32768, **GLM130B),
        # tests: GLM-130B's layout, tiny (its icetk ids start at 20000, so V holds the image-token rows too)
        _preset("glm-130b-tiny", 2, 64, 4, 2048, 21120, "icetk", inner_hidden_size=96, **GLM130B),
    )
}


def get_preset(name: str) -> GLMConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
