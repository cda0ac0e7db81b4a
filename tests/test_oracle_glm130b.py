"""The GLM-130B oracle (tests/oracle_glm130b.py) checked on its own, without glmx: its prompt layout against the
note's rules by hand, the properties its rotary must have, and every fact it encodes shown to move the logits
beyond glmx's fp32 budget (so a parity test against it can tell each one). Random SAT-layout weights made here
with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests import oracle_glm130b as og

CFG = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
V, INNER = 96, 96
MASK, GMASK, SMASK, EOS, SOP, EOP = 90, 91, 92, 93, 94, 95
FP32 = (1e-4, 3e-5)


@pytest.fixture(scope="module")
def sd():
    """SAT names and shapes (spec 2): per-head QKV, dense_h_to_4h [2 x inner, h], no lm_head."""
    rng = np.random.default_rng(7)
    h = CFG["hidden_size"]
    out = {"transformer.word_embeddings.weight": rng.normal(0, 1.0, (V, h))}
    shapes = {"attention.query_key_value": (3 * h, h), "attention.dense": (h, h)}
    shapes |= {"mlp.dense_h_to_4h": (2 * INNER, h), "mlp.dense_4h_to_h": (h, INNER)}
    for i in range(CFG["num_layers"]):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out[p + ln + ".weight"] = 1 + rng.normal(0, 0.1, h)
            out[p + ln + ".bias"] = rng.normal(0, 0.1, h)
        for name, shape in shapes.items():
            out[p + name + ".weight"] = rng.normal(0, 0.2, shape)
            out[p + name + ".bias"] = rng.normal(0, 0.05, shape[0])
    out["transformer.final_layernorm.weight"] = 1 + rng.normal(0, 0.1, h)
    out["transformer.final_layernorm.bias"] = rng.normal(0, 0.1, h)
    return out


def _gmask_case(n_text=40):
    ctx = og.context_ids(list(range(3, 3 + n_text)), (MASK, SMASK, GMASK), GMASK, EOS)
    seq = [*ctx, SOP, 10, 11]
    pos, masked = og.layout(ctx, len(ctx) - 1, True, len(seq))
    return seq, pos, masked


def test_prompt_layout_by_hand():
    """spec 5: [gMASK] appended to a text without a blank, no eos after it; eos after a text not ending in a blank;
    [gMASK] spans count on from c, [MASK] spans sit at the mask; the context is bidirectional, the span causal."""
    assert og.context_ids([5, 6], (MASK, SMASK, GMASK), GMASK, EOS) == [5, 6, GMASK]
    assert og.context_ids([5, MASK, 6], (MASK, SMASK, GMASK), GMASK, EOS) == [5, MASK, 6, EOS]
    assert og.context_ids([5, SMASK], (MASK, SMASK, GMASK), GMASK, EOS) == [5, SMASK]
    pos, masked = og.layout([5, 6, GMASK], 2, True, 6)
    assert pos.tolist() == [0, 1, 2, 3, 4, 5]
    assert og.layout([5, MASK, 6, EOS], 1, False, 6)[0].tolist() == [0, 1, 2, 3, 1, 1]
    visible = ~masked
    assert visible[:3, :3].all() and not visible[:3, 3:].any()  # context rows: the context only
    assert visible[4].tolist() == [True] * 5 + [False]  # span rows: causal


def test_the_rotary_depends_on_position_differences_only(sd):
    """1D rotary without a prefix: shifting every position by the same amount leaves the logits as they are
    (spec: rotary scores depend only on differences); a per-token change does not."""
    seq, pos, masked = _gmask_case()
    base = og.forward(sd, CFG, [seq], pos[None], masked[None, None], inv_rounding="fp32")
    shifted = og.forward(sd, CFG, [seq], pos[None] + 17, masked[None, None], inv_rounding="fp32")
    np.testing.assert_allclose(shifted, base, atol=1e-9)
    moved = pos.copy()
    moved[-1] += 1
    assert np.abs(og.forward(sd, CFG, [seq], moved[None], masked[None, None], inv_rounding="fp32") - base).max() > 1e-3


def test_inv_freq_covers_the_whole_head():
    """spec 4.2: d = 128 -> 64 frequencies 1/10000^(2j/128), rounded to fp16."""
    f = og.inv_freq(128)
    assert f.shape == (64,) and f[0] == 1.0
    assert abs(f[1] - 10000 ** (-2 / 128)) < 1e-3 and f[1] == float(np.float16(10000 ** (-2 / 128)))


def test_the_erf_gelu_is_exact():
    x = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    want = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(og.gelu_of(x, "erf"), want, rtol=1e-15)


@pytest.mark.parametrize(
    "mutation",
    [{"gate": "first"}, {"rotary": "2d"}, {"gelu": "tanh"}, {"alpha_layers": 28}, {"inv_rounding": "fp32"}],
    ids=["value-gate-swapped", "2d-rotary", "tanh-gelu", "alpha-sqrt56", "fp32-inv-freq"],
)
def test_each_fact_moves_the_logits_beyond_the_fp32_budget(sd, mutation):
    seq, pos, masked = _gmask_case()
    base = og.forward(sd, CFG, [seq], pos[None], masked[None, None])
    wrong = og.forward(sd, CFG, [seq], pos[None], masked[None, None], **mutation)
    budget = FP32[0] + FP32[1] * np.abs(base).max()
    assert np.abs(wrong - base).max() > budget, mutation


def test_positions_counting_or_fixed_and_splicing_matter(sd):
    """The same ids with [MASK]-style fixed positions instead of counting ones give other logits; and
    fill_blanks splices each span in place of its blank (the final sequence holds no blank)."""
    seq, pos, masked = _gmask_case()
    c = seq.index(SOP)
    fixed = pos.copy()
    fixed[c:] = c - 1
    base = og.forward(sd, CFG, [seq], pos[None], masked[None, None])
    assert np.abs(og.forward(sd, CFG, [seq], fixed[None], masked[None, None]) - base).max() > 1e-2
    final, spans = og.fill_blanks(
        sd, CFG, [5, MASK, 6, SMASK, 7], mask=MASK, smask=SMASK, gmask=GMASK, eos=EOS, sop=SOP, eop=EOP, max_new=3
    )
    assert len(spans) == 2 and not {MASK, SMASK, GMASK} & set(final)
    assert final == [5, *spans[0], 6, *spans[1], 7, EOS]


def test_to_published_interleaves_the_qkv_rows_per_head():
    """glmx's [Q; K; V] blocks -> SAT's [head 0: q, k, v], [head 1: ...] (spec 2)."""
    n, d = 2, 3
    blocks = np.arange(3 * n * d)  # row r of block s, head j: s * n*d + j*d + i
    got = og.to_published({"transformer.layers.0.attention.query_key_value.bias": blocks}, n)
    per_head = got["transformer.layers.0.attention.query_key_value.bias"]
    assert per_head.tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14, 3, 4, 5, 9, 10, 11, 15, 16, 17]
