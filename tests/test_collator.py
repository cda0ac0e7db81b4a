"""The blank-infilling collator: spec 3.4's worked example, span statistics, document boundaries, modes, padding."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from glm_export.collator import (
    BlockCollator, CollatorConfig, SpecialIds, document_bounds, make_block_sample, make_gpt_sample, pad_batch,
    place_spans, sample_bert_spans, span_length_weights,
)

SP = SpecialIds(eos=0, cls=1, mask=2, smask=3, gmask=4, sop=5, eop=6, dblock=9, pad=0)
FIRST_WORD = 10  # ids >= 10 are ordinary tokens


def random_sample(rng: np.random.Generator, length: int, n_docs: int) -> np.ndarray:
    """[CLS] doc <eos> ... with n_docs documents, filled to `length` tokens (the last may be cut)."""
    out: list[int] = []
    while len(out) < length:
        doc_len = int(rng.integers(5, 2 * length // n_docs))
        out += [SP.cls] + rng.integers(FIRST_WORD, 1000, size=doc_len).tolist() + [SP.eos]
    return np.array(out[:length], dtype=np.int64)


def visible(sep: int, T: int) -> np.ndarray:
    """Independent numpy form of spec 3.1's sep mask: [T, T] bool, query i sees key j iff j < sep or j <= i."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j < sep) | (j <= i)


# ---------------------------------------------------------------- spec 3.4, by hand

def test_spec_worked_example_reproduced_exactly():
    CLS, EOS, M, SOP, EOP = SP.cls, SP.eos, SP.mask, SP.sop, SP.eop
    x = {k: 100 + k for k in range(1, 7)}
    tokens = np.array([CLS, x[1], x[2], x[3], x[4], x[5], x[6], EOS])
    # spans (2,4) = "x2 x3" and (5,6) = "x5"; Part B order: the second span first
    s = make_block_sample(tokens, [(2, 4), (5, 6)], order=[1, 0], mask_id=M, sop_id=SOP, eop_id=EOP)
    assert s.sep == 7 == 8 - 3 + 2
    assert s.input_ids.tolist() == [CLS, x[1], M, x[4], M, x[6], EOS] + [SOP, x[5], SOP, x[2], x[3]]
    assert s.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6] + [4, 4, 2, 2, 2]
    assert s.position_ids[1].tolist() == [0] * 7 + [1, 2, 1, 2, 3]
    assert s.target_ids[7:].tolist() == [x[5], EOP, x[2], x[3], EOP]
    assert s.loss_mask.tolist() == [0] * 7 + [1] * 5
    assert len(s.input_ids) == 12 == 8 + 2 * 2


def test_spec_worked_example_through_the_collator_with_a_controlled_draw(monkeypatch):
    """The collator's own path (span draw + shuffle) gives the same layout when the draw is forced."""
    import glm_export.collator as col
    monkeypatch.setattr(col, "sample_bert_spans", lambda *a, **k: [(2, 4), (5, 6)])

    class FixedOrder:
        def permutation(self, n):
            return np.array([1, 0])

        def random(self, *a):
            return 0.0  # choose_mode -> bert
    tokens = np.array([SP.cls, 101, 102, 103, 104, 105, 106, SP.eos])
    batch = BlockCollator(SP)([tokens], FixedOrder())
    assert batch["input_ids"][0].tolist() == [1, 101, 2, 104, 2, 106, 0, 5, 105, 5, 102, 103]
    assert batch["position_ids"][0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 4, 2, 2, 2], [0] * 7 + [1, 2, 1, 2, 3]]
    assert batch["sep"].tolist() == [7]


# ---------------------------------------------------------------- statistics over many draws

def test_span_lengths_follow_truncated_poisson_and_mask_ratio_is_15_percent():
    collator = BlockCollator(SP)
    rng = np.random.default_rng(0)
    lengths: Counter[int] = Counter()
    ratios = []
    for _ in range(300):
        tokens = random_sample(rng, 256, n_docs=int(rng.integers(1, 4)))
        spans = sample_bert_spans(tokens, SP, collator.config, rng, collator.weights)
        assert spans, "a 256-token sample always has room for its spans"
        lengths.update(e - s for s, e in spans)
        ratios.append(sum(e - s for s, e in spans) / len(tokens))
    # int(0.15 * 256) = 38 tokens at least; overshoot is at most one span
    assert min(ratios) >= 38 / 256
    assert 0.15 <= np.mean(ratios) <= 0.19
    n = sum(lengths.values())
    p = span_length_weights(3.0, 40)
    # chi-square over lengths 1..7 plus a tail bin; df = 7, the 0.999 quantile is 24.3
    observed = np.array([lengths[k] for k in range(1, 8)] + [sum(v for k, v in lengths.items() if k >= 8)])
    expected = n * np.append(p[:7], p[7:].sum())
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (chi2, observed.tolist(), expected.round(1).tolist())
    assert max(lengths) <= 39


def test_spans_stay_inside_documents_and_are_not_adjacent():
    collator = BlockCollator(SP)
    rng = np.random.default_rng(1)
    for _ in range(300):
        tokens = random_sample(rng, 128, n_docs=int(rng.integers(1, 6)))
        spans = sample_bert_spans(tokens, SP, collator.config, rng, collator.weights)
        docs = document_bounds(tokens, SP)
        for s, e in spans:
            assert any(ds <= s and e <= de for ds, de in docs), (s, e, docs)
            assert not np.isin(tokens[s:e], [SP.cls, SP.eos]).any()
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 > e1, "spans must be separated by at least one token"


def test_place_spans_refuses_what_cannot_fit():
    rng = np.random.default_rng(0)
    assert place_spans([3, 3], 0, 6, rng) is None  # needs 3 + 1 + 3 = 7 tokens
    assert place_spans([3, 3], 0, 7, rng) == [(0, 3), (4, 7)]


def test_part_a_never_sees_part_b_and_part_b_is_causal():
    collator = BlockCollator(SP)
    rng = np.random.default_rng(2)
    samples = [random_sample(rng, 64, 2) for _ in range(8)]
    batch = collator(samples, rng, mode="bert")
    for b in range(len(samples)):
        sep, T = int(batch["sep"][b]), batch["input_ids"].shape[1]
        m = visible(sep, T)
        assert not m[:sep, sep:].any()  # Part A rows never see Part B columns
        assert m[:sep, :sep].all()  # Part A is bidirectional
        assert m[sep:, :sep].all()  # Part B sees all of Part A
        assert (m[sep:, sep:] == np.tril(np.ones((T - sep, T - sep), dtype=bool))).all()
        # the loss is on Part B only, and every Part B target is the token fed one step later (or eop)
        assert batch["loss_mask"][b, :sep].sum() == 0
        n_b = int(batch["loss_mask"][b].sum())
        ids, tg = batch["input_ids"][b, sep:sep + n_b], batch["target_ids"][b, sep:sep + n_b]
        nxt = np.append(ids[1:], SP.sop)
        assert ((tg == nxt) | ((tg == SP.eop) & (nxt == SP.sop))).all()


def test_model_mask_from_sep_vector_matches_numpy():
    torch = pytest.importorskip("torch")
    from glm_export.model import build_attention_mask
    rng = np.random.default_rng(3)
    batch = BlockCollator(SP)([random_sample(rng, 48, 2) for _ in range(3)], rng, mode="bert")
    T = batch["input_ids"].shape[1]
    mask = build_attention_mask(torch.from_numpy(batch["sep"]), 3, T, 0)
    for b in range(3):
        assert (mask[b, 0].numpy().astype(bool) == visible(int(batch["sep"][b]), T)).all()


# ---------------------------------------------------------------- sentence and document modes

def test_sentence_mode_masks_whole_sentences_with_smask():
    PERIOD = 50
    table = np.zeros(1000, dtype=bool)
    table[PERIOD] = True
    # [CLS] s1(3 tokens + '.') s2 s3 s4 <eos>; each sentence is 4 tokens ending in PERIOD
    sents = [[11, 12, 13, PERIOD], [21, 22, 23, PERIOD], [31, 32, 33, PERIOD], [41, 42, 43, PERIOD]]
    tokens = np.array([SP.cls] + sum(sents, []) + [SP.eos])
    cfg = CollatorConfig(bert_prob=0.0, gap_sentence_prob=1.0, mask_ratio=0.3)  # int(0.3 * 18) = 5 -> 2 sentences
    batch = BlockCollator(SP, cfg, sentence_end=table)([tokens], np.random.default_rng(0))
    assert batch["mode"] == "sentence"
    sep = int(batch["sep"][0])
    part_a = batch["input_ids"][0, :sep].tolist()
    assert part_a.count(SP.smask) == 2 and SP.mask not in part_a
    assert sep == 18 - 8 + 2
    part_b = batch["input_ids"][0, sep:].tolist()
    pieces = [part_b[i + 1:i + 5] for i, t in enumerate(part_b) if t == SP.sop]
    assert all(p in sents for p in pieces) and len(pieces) == 2
    targets = batch["target_ids"][0, sep:].tolist()
    assert targets.count(SP.eop) == 2


def test_sentence_mode_needs_a_sentence_table():
    with pytest.raises(ValueError, match="sentence_end table"):
        BlockCollator(SP, CollatorConfig(bert_prob=0.5, gap_sentence_prob=0.5))


def test_document_mode_is_prefix_gmask_then_suffix_without_eop():
    tokens = np.array([SP.cls, 11, 12, 13, 14, 15, SP.eos])
    s = make_gpt_sample(tokens, suffix_len=3, gmask_id=SP.gmask, sop_id=SP.sop)
    # Part A = [CLS] 11 12 13 [gMASK]; Part B = sop 14 15 -> targets 14 15 <eos>
    assert s.sep == 5
    assert s.input_ids.tolist() == [SP.cls, 11, 12, 13, SP.gmask, SP.sop, 14, 15]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4], [0, 0, 0, 0, 0, 1, 2, 3]]
    assert s.target_ids[5:].tolist() == [14, 15, SP.eos]
    assert SP.eop not in s.target_ids.tolist()
    assert s.loss_mask.tolist() == [0] * 5 + [1] * 3


def test_modes_are_drawn_per_batch_with_the_configured_probabilities():
    table = np.zeros(1000, dtype=bool)
    table[10::7] = True
    collator = BlockCollator(SP, CollatorConfig(bert_prob=0.5, gap_sentence_prob=0.3), sentence_end=table)
    rng = np.random.default_rng(4)
    modes = Counter(str(collator([random_sample(rng, 32, 1) for _ in range(2)], rng)["mode"]) for _ in range(600))
    assert abs(modes["bert"] / 600 - 0.5) < 0.07
    assert abs(modes["sentence"] / 600 - 0.3) < 0.07
    assert abs(modes["gpt"] / 600 - 0.2) < 0.07


def test_gpt_batch_uses_one_suffix_length_capped_per_sample():
    rng = np.random.default_rng(5)
    samples = [random_sample(rng, 40, 1), random_sample(rng, 12, 1)]
    batch = BlockCollator(SP, CollatorConfig(bert_prob=0.0))(samples, rng)
    assert batch["mode"] == "gpt"
    suffix = batch["loss_mask"].sum(axis=1)
    assert suffix[1] <= 12 - 2 and (suffix[0] == suffix[1] or suffix[1] == 10)
    for b, tokens in enumerate(samples):
        sep = int(batch["sep"][b])
        assert batch["input_ids"][b, sep - 1] == SP.gmask
        assert batch["input_ids"][b, :sep - 1].tolist() == tokens[:sep - 1].tolist()


# ---------------------------------------------------------------- padding and options

def test_batch_padding_is_appended_with_zero_token_position_and_loss():
    a = make_block_sample(np.array([1, 11, 12, 13, 0]), [(2, 3)], [0], SP.mask, SP.sop, SP.eop)
    b = make_block_sample(np.array([1, 11, 12, 13, 14, 15, 16, 0]), [(2, 4), (5, 6)], [0, 1], SP.mask, SP.sop, SP.eop)
    batch = pad_batch([a, b])
    n = len(a.input_ids)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert (batch["input_ids"][0, n:] == 0).all() and (batch["position_ids"][0, :, n:] == 0).all()
    assert (batch["loss_mask"][0, n:] == 0).all()
    assert batch["input_ids"][0, :n].tolist() == a.input_ids.tolist()
    assert batch["sep"].tolist() == [a.sep, b.sep]


def test_block_mask_prob_replaces_span_inputs_but_not_targets_or_sop():
    rng = np.random.default_rng(6)
    collator = BlockCollator(SP, CollatorConfig(block_mask_prob=0.5))
    batch = collator([random_sample(rng, 128, 1)], rng, mode="bert")
    sep, n = int(batch["sep"][0]), int(batch["loss_mask"][0].sum())
    ids, tg = batch["input_ids"][0, sep:sep + n], batch["target_ids"][0, sep:sep + n]
    assert (ids == SP.dblock).sum() > 0
    assert SP.dblock not in tg.tolist()
    assert (ids == SP.sop).sum() == (tg == SP.eop).sum()


def test_unknown_mode_and_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="unknown mode 'cloze'"):
        BlockCollator(SP)([np.array([1, 11, 12, 0])], np.random.default_rng(0), mode="cloze")
    with pytest.raises(ValueError, match="sum to at most 1"):
        CollatorConfig(bert_prob=0.8, gap_sentence_prob=0.5)
