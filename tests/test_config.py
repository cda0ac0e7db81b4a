"""GLMConfig: presets against docs/glm.md 6's size table, JSON and Hugging Face round trips, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

from glm_export.hf_config import from_hf_dict, to_hf_dict
from glm_runtime.config import PRESETS, ConfigError, GLMConfig, get_preset

# docs/glm.md 6: (L, h, n, P, V, tokenizer)
SPEC_TABLE = {
    "glm-base": (12, 768, 12, 512, 30592, "bert"),
    "glm-large": (24, 1024, 16, 512, 30592, "bert"),
    "glm-roberta-large": (24, 1024, 16, 512, 50304, "roberta"),
    "glm-large-chinese": (24, 1024, 16, 1024, 50048, "chinese-sp-fix"),
    "glm-2b": (36, 2048, 32, 1024, 50304, "gpt2"),
    "glm-10b": (48, 4096, 64, 1024, 50304, "gpt2"),
    "glm-10b-chinese": (48, 4096, 64, 1024, 50048, "chinese-sp"),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_presets_match_the_spec(name):
    c = get_preset(name)
    L, h, n, P, V, tok = SPEC_TABLE[name]
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.max_sequence_length, c.vocab_size, c.tokenizer) == (
        L,
        h,
        n,
        P,
        V,
        tok,
    )
    assert c.head_dim == 64 and c.position_table_rows == P + 1 and c.vocab_size % 128 == 0


def test_glm_10b_parameter_count():
    # docs/glm.md 6: 48*12*4096^2 + 50304*4096 + 2*1025*4096 ~= 9.88 B (plus biases and LNs)
    assert abs(get_preset("GLM-10B").num_parameters() / 1e9 - 9.88) < 0.01


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_and_hf_round_trips(name):
    c = PRESETS[name]
    assert GLMConfig.from_json(c.to_json()) == c
    hf = json.loads(json.dumps(to_hf_dict(c)))
    assert hf["num_layers"] == c.num_layers and hf["max_sequence_length"] == c.max_sequence_length
    assert from_hf_dict(hf) == c


def test_reads_a_hub_style_config_json():
    """A THUDM-style config.json (no glmx block) reads with the HF code's erf GeLU."""
    hub = {
        "architectures": ["GLMModel"],
        "attention_dropout_prob": 0.1,
        "attention_scale": 1.0,
        "block_position_encoding": True,
        "checkpoint_activations": False,
        "checkpoint_num_layers": 1,
        "embedding_dropout_prob": 0.1,
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "max_sequence_length": 1024,
        "max_memory_length": 0,
        "model_type": "glm",
        "num_attention_heads": 64,
        "num_layers": 48,
        "output_dropout_prob": 0.1,
        "output_predict": True,
        "parallel_output": True,
        "pool_token": "cls",
        "relative_encoding": False,
        "spell_func": "lstm",
        "spell_length": None,
        "vocab_size": 50304,
    }
    c = from_hf_dict(hub)
    assert c.replace(gelu="tanh", name="glm-10b", tokenizer="gpt2") == get_preset("glm-10b")
    assert c.gelu == "erf"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 66}, "not divisible by num_attention_heads"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
        ({"hidden_dropout": 1.0}, r"hidden_dropout must be in \[0, 1\)"),
        ({"gelu": "relu"}, "gelu must be one of"),
        ({"attention_scale": 0.5}, "attention_scale must be a number >= 1.0"),
        ({"tokenizer": "t5"}, "tokenizer must be one of"),
    ],
)
def test_inconsistent_values_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("glm-tiny").replace(**changes)


def test_bad_json_and_hf_inputs_are_refused():
    with pytest.raises(ConfigError, match="unknown GLMConfig fields"):
        GLMConfig.from_dict({**get_preset("glm-tiny").to_dict(), "rotary": True})
    with pytest.raises(ConfigError, match="incomplete GLMConfig"):
        GLMConfig.from_dict({"num_layers": 2})
    with pytest.raises(ConfigError, match="not valid JSON"):
        GLMConfig.from_json("{")
    with pytest.raises(ConfigError, match="model_type 'bert'; glmx reads 'glm'"):
        from_hf_dict({"model_type": "bert"})
    with pytest.raises(ConfigError, match="lacks"):
        from_hf_dict({"model_type": "chatglm"})
    chatglm2 = {"model_type": "chatglm", "multi_query_attention": True, "padded_vocab_size": 65024}
    with pytest.raises(ConfigError, match=r"^config.json is a ChatGLM2-6B / ChatGLM3-6B model .*not this model$"):
        from_hf_dict(chatglm2)
    with pytest.raises(ConfigError, match="is a GLM-4 model"):
        from_hf_dict({**chatglm2, "padded_vocab_size": 151552})
    with pytest.raises(ConfigError, match="relative_encoding=True is not supported"):
        from_hf_dict({"model_type": "glm", "relative_encoding": True})
    with pytest.raises(ConfigError, match="lacks"):
        from_hf_dict({"model_type": "glm", "hidden_size": 64})
    with pytest.raises(ConfigError, match="unknown preset 'glm-7b'"):
        get_preset("glm-7b")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("glm-tiny").num_layers = 3  # type: ignore[misc]
