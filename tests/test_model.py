"""The reference model against an independent numpy forward, the cache against a full pass, and Part A / B rules."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from glm_export.model import GLMModel, build_attention_mask
from tests import oracle_glm
from tests.random_models import random_weights_model

# Multi-span blank-filling layout of docs/glm.md 4.2: context "t1 [M] t2 t3 [M] t4" (C = 8) then two spans.
CONTEXT = [1, 11, 2, 12, 13, 2, 14, 0]  # [CLS] t1 [MASK] t2 t3 [MASK] t4 eos (glm-tiny json ids)
SOP = 5
SPAN1 = [21, 22]  # u1 u2, fed after sop at mask position 2
SPAN2 = [31, 32, 33]  # v1 v2 v3, fed after sop at mask position 5


def multi_span_layout():
    """input ids, positions [2, T], sep for the training-equivalent single pass (docs/glm.md 4.2)."""
    ids = CONTEXT + [SOP] + SPAN1 + [SOP] + SPAN2
    pos = list(range(8)) + [2] * 3 + [5] * 4
    block = [0] * 8 + [1, 2, 3] + [1, 2, 3, 4]
    return ids, np.array([pos, block]), len(CONTEXT)


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_matches_independent_numpy_forward(tiny_config, gelu):
    config = tiny_config.replace(gelu=gelu)
    model = random_weights_model(config, seed=1)
    ids, pos, sep = multi_span_layout()
    # batch of two rows: the multi-span layout and a shorter, differently separated variant
    ids_b = np.array([ids, ids[::-1]])
    pos_b = np.stack([pos, pos])
    seps = np.array([sep, 3])
    with torch.no_grad():
        logits, _ = model(torch.tensor(ids_b), torch.tensor(pos_b), torch.tensor(seps))
    weights = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    cfg = {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
    }
    ref = np.stack(
        [
            oracle_glm.forward(weights, cfg, i.tolist(), p[0].tolist(), p[1].tolist(), int(s), gelu)
            for i, p, s in zip(ids_b, pos_b, seps)
        ]
    )
    err = np.abs(logits.numpy() - ref).max()
    assert err < 1e-5 * max(1.0, np.abs(ref).max()), f"max |torch - numpy| = {err:.3e}"


def test_gelu_variants_differ_as_the_spec_says(tiny_config):
    """tanh and erf GeLU differ by at most ~4.7e-4 (docs/glm.md 1.2), so the option must change the outputs."""
    x = torch.linspace(-6, 6, 100001)
    diff = (torch.nn.functional.gelu(x, approximate="tanh") - torch.nn.functional.gelu(x)).abs()
    assert 4.0e-4 < diff.max().item() < 5.0e-4
    assert abs(abs(x[diff.argmax()].item()) - 2.70) < 0.05  # docs/glm.md's x = -2.70 (and its mirror)
    model_tanh = random_weights_model(tiny_config, seed=5)
    model_erf = GLMModel(tiny_config.replace(gelu="erf")).eval()
    model_erf.load_state_dict(model_tanh.state_dict())
    ids, pos, sep = multi_span_layout()
    args = (torch.tensor([ids]), torch.tensor(pos)[None], sep)
    with torch.no_grad():
        assert not torch.equal(model_tanh(*args)[0], model_erf(*args)[0])


def test_incremental_cache_equals_one_pass(tiny_config):
    """Context pass, then span after span through the cache (docs/glm.md 4.2) == one sep-masked pass."""
    model = random_weights_model(tiny_config, seed=2)
    ids, pos, sep = multi_span_layout()
    ids_t, pos_t = torch.tensor([ids]), torch.tensor(pos)[None]
    with torch.no_grad():
        full, _ = model(ids_t, pos_t, sep)
        logits, cache = model(ids_t[:, :sep], pos_t[..., :sep], sep)  # bidirectional context pass
        steps = [logits]
        for t in range(sep, len(ids)):  # one token at a time, scalar sep 0: sees all memory and itself
            logits, cache = model(ids_t[:, t : t + 1], pos_t[..., t : t + 1], 0, cache)
            steps.append(logits)
    incremental = torch.cat(steps, dim=1)
    err = (incremental - full).abs().max().item()
    assert err < 1e-5, f"incremental vs one pass: {err:.3e}"
    assert cache[0][0].shape == (1, tiny_config.num_attention_heads, len(ids), tiny_config.head_dim)


def test_part_a_ignores_part_b_and_part_b_is_causal(tiny_config):
    model = random_weights_model(tiny_config, seed=3)
    ids, pos, sep = multi_span_layout()
    base = torch.tensor([ids])
    pos_t = torch.tensor(pos)[None]
    with torch.no_grad():
        ref, _ = model(base, pos_t, sep)
        for t in range(sep, len(ids)):
            changed = base.clone()
            changed[0, t] = 100 + t
            out, _ = model(changed, pos_t, sep)
            diff = (out - ref).abs().amax(dim=-1)[0]  # per position
            assert diff[:t].max().item() == 0.0, f"perturbing Part B token {t} changed an earlier output"
            assert diff[t].item() > 0.0
        # A Part A token is seen by every position (bidirectional context, and Part B sees all of Part A).
        changed = base.clone()
        changed[0, sep - 1] = 99
        out, _ = model(changed, pos_t, sep)
        assert ((out - ref).abs().amax(dim=-1)[0] > 0).all()


def test_mask_forms_agree():
    """Scalar sep, per-sample sep and the explicit mask are the same thing (docs/glm.md 3.1)."""
    T, past = 5, 3
    scalar = build_attention_mask(2, 2, T, past)
    vector = build_attention_mask(torch.tensor([2, 2]), 2, T, past)
    assert torch.equal(scalar.expand(2, -1, -1, -1), vector)
    expected = np.concatenate([np.ones((T, past)), oracle_glm.sep_mask(T, 2)], axis=1)
    assert np.array_equal(scalar[0, 0].numpy(), expected)
    explicit = torch.zeros(2, 1, T, past + T + 4)  # extra leading columns are ignored
    explicit[..., -(past + T) :] = vector
    assert torch.equal(build_attention_mask(explicit, 2, T, past), vector)
    assert torch.equal(build_attention_mask(explicit.bool(), 2, T, past), vector)


def test_sep_zero_is_causal_and_sep_t_is_bidirectional():
    causal = build_attention_mask(0, 1, 4, 0)[0, 0]
    assert torch.equal(causal, torch.tril(torch.ones(4, 4)))
    assert torch.equal(build_attention_mask(4, 1, 4, 0)[0, 0], torch.ones(4, 4))


def test_bad_inputs_are_refused(tiny_model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids must be \[B, 2, T\]"):
        tiny_model(ids, torch.zeros(1, 4, dtype=torch.long), 4)
    pos = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="explicit attention_mask must be"):
        tiny_model(ids, pos, torch.ones(1, 1, 4, 3))
    with pytest.raises(ValueError, match="per-sample sep vector must have 1 entries"):
        build_attention_mask(torch.tensor([1, 2, 3]), 1, 4, 0)
    with pytest.raises(ValueError, match="past_key_values has 1 layers, the model has 2"):
        tiny_model(ids, pos, 0, [(torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16))])


def test_parameter_names_and_shapes_are_official(tiny_config):
    """Spec 1.1: exactly these keys, tables of P+1 rows, no LM head."""
    sd = GLMModel(tiny_config).state_dict()
    h, P, V = tiny_config.hidden_size, tiny_config.max_sequence_length, tiny_config.vocab_size
    assert sd["word_embeddings.weight"].shape == (V, h)
    assert sd["transformer.position_embeddings.weight"].shape == (P + 1, h)
    assert sd["transformer.block_position_embeddings.weight"].shape == (P + 1, h)
    assert sd["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * h, h)
    assert sd["transformer.layers.1.mlp.dense_4h_to_h.weight"].shape == (h, 4 * h)
    per_layer = {
        "input_layernorm",
        "attention.query_key_value",
        "attention.dense",
        "post_attention_layernorm",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    }
    expected = {
        "word_embeddings.weight",
        "transformer.position_embeddings.weight",
        "transformer.block_position_embeddings.weight",
        "transformer.final_layernorm.weight",
        "transformer.final_layernorm.bias",
    }
    for i in range(tiny_config.num_layers):
        for m in per_layer:
            expected |= {f"transformer.layers.{i}.{m}.weight", f"transformer.layers.{i}.{m}.bias"}
    assert set(sd) == expected
    assert sum(v.numel() for v in sd.values()) == tiny_config.num_parameters()


def test_dropout_only_in_training(tiny_config):
    model = GLMModel(tiny_config.replace(hidden_dropout=0.5, attention_dropout=0.5))
    ids, pos, sep = multi_span_layout()
    args = (torch.tensor([ids]), torch.tensor(pos)[None], sep)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*args)[0], model(*args)[0])
        model.train()
        assert not torch.equal(model(*args)[0], model(*args)[0])


def test_init_follows_the_original(tiny_config):
    """Spec 1.4: N(0, 0.02), output projections N(0, 0.02/sqrt(2L)), biases 0, LN weight 1."""
    config = tiny_config.replace(hidden_size=256, num_attention_heads=4)
    sd = GLMModel(config).state_dict()
    assert abs(sd["transformer.layers.0.mlp.dense_h_to_4h.weight"].std().item() - 0.02) < 1e-3
    out_std = 0.02 / np.sqrt(2 * config.num_layers)
    assert abs(sd["transformer.layers.0.mlp.dense_4h_to_h.weight"].std().item() - out_std) < 1e-3
    assert torch.all(sd["transformer.layers.0.attention.dense.bias"] == 0)
    assert torch.all(sd["transformer.final_layernorm.weight"] == 1)


def test_fp16_forward_is_finite_and_close(tiny_config):
    model = random_weights_model(tiny_config, seed=4)
    ids, pos, sep = multi_span_layout()
    args = (torch.tensor([ids]), torch.tensor(pos)[None], sep)
    with torch.no_grad():
        ref, _ = model(*args)
        half, _ = model.half()(*args)
    assert torch.isfinite(half).all()
    assert (half.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
