"""The blank-infilling collator: docs/glm.md 3.4's worked example, span statistics, document boundaries, modes,
padding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from glm_export.collator import (
    BlockCollator,
    CollatorConfig,
    SpecialIds,
    document_bounds,
    make_block_sample,
    make_gpt_sample,
    pad_batch,
    place_spans,
    sample_bert_spans,
    span_length_weights,
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
    """Independent numpy form of docs/glm.md 3.1's sep mask: [T, T] bool, query i sees key j iff j < sep or j <= i."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j < sep) | (j <= i)


# ---------------------------------------------------------------- docs/glm.md 3.4, by hand


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
        for (_, e1), (s2, _) in zip(spans, spans[1:]):
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
        ids, tg = batch["input_ids"][b, sep : sep + n_b], batch["target_ids"][b, sep : sep + n_b]
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
    pieces = [part_b[i + 1 : i + 5] for i, t in enumerate(part_b) if t == SP.sop]
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
        assert batch["input_ids"][b, : sep - 1].tolist() == tokens[: sep - 1].tolist()


# ---------------------------------------------------------------- document mode: infill form (gpt_infill_prob)


def one_doc_sample(rng: np.random.Generator, length: int) -> np.ndarray:
    """A sample holding (part of) ONE document: "[CLS] doc <eos>", "[CLS] doc", "doc <eos>" or "doc"."""
    head, tail = [[SP.cls], []][int(rng.integers(2))], [[SP.eos], []][int(rng.integers(2))]
    body = rng.integers(FIRST_WORD, 1000, size=length - len(head) - len(tail)).tolist()
    return np.array(head + body + tail, dtype=np.int64)


def expected_G(seed: int, samples: list[np.ndarray], min_ratio: float = 0.25) -> int:
    """Spec 5: G = randint(int(gpt_min_ratio * min_len), max_len - 2), the batch's first draw (mode forced)."""
    lengths = [len(t) for t in samples]
    return int(np.random.default_rng(seed).integers(int(min_ratio * min(lengths)), max(lengths) - 2 + 1))


def test_infill_form_is_one_gmask_span_inside_the_document_laid_out_like_a_bert_span():
    collator = BlockCollator(SP, CollatorConfig(bert_prob=0.0, gpt_infill_prob=0.0))
    data = np.random.default_rng(7)
    rel_starts = []
    for seed in range(150):
        samples = [one_doc_sample(data, int(data.integers(12, 64))) for _ in range(4)]
        batch = collator(samples, np.random.default_rng(seed), mode="gpt")
        G = expected_G(seed, samples)
        for b, tokens in enumerate(samples):
            L = max(1, min(G, len(tokens) - 2))  # per sample min(G, len - 2)
            sep = int(batch["sep"][b])
            ids, pos, tg = batch["input_ids"][b], batch["position_ids"][b], batch["target_ids"][b]
            part_a = ids[:sep].tolist()
            assert part_a.count(SP.gmask) == 1 and SP.mask not in part_a and SP.smask not in part_a
            s = part_a.index(SP.gmask)  # Part A is untouched before the span, so this is also the span start
            span = tokens[s : s + L].tolist()
            ((ds, de),) = document_bounds(tokens, SP)
            assert ds <= s and s + L <= de, "the span lies inside the document, never over [CLS] or <eos>"
            rel_starts.append((s - ds) / max(1, de - ds - L))
            assert sep == len(tokens) - L + 1
            assert part_a == tokens[:s].tolist() + [SP.gmask] + tokens[s + L :].tolist()
            n_b = int(batch["loss_mask"][b].sum())
            assert n_b == L + 1 and batch["loss_mask"][b, :sep].sum() == 0
            assert ids[sep : sep + n_b].tolist() == [SP.sop] + span  # Part B input: sop + span
            assert tg[sep : sep + n_b].tolist() == span + [SP.eop]  # Part B target: span + eop
            assert pos[0, :sep].tolist() == list(range(sep)) and (pos[1, :sep] == 0).all()
            assert pos[0, sep : sep + n_b].tolist() == [s] * n_b  # the [gMASK]'s position
            assert pos[1, sep : sep + n_b].tolist() == list(range(1, L + 2))
    # the start is uniform over the free room of the document: mean 0.5, sd of the mean <= sqrt(1/12/n)
    n = len(rel_starts)
    assert abs(np.mean(rel_starts) - 0.5) < 4 * np.sqrt(1 / 12 / n) + 0.02, np.mean(rel_starts)


def test_infill_form_attention_part_a_never_sees_the_span():
    torch = pytest.importorskip("torch")
    from glm_export.model import build_attention_mask

    rng = np.random.default_rng(8)
    samples = [one_doc_sample(rng, 40) for _ in range(3)]
    batch = BlockCollator(SP, CollatorConfig(bert_prob=0.0, gpt_infill_prob=0.0))(samples, rng, mode="gpt")
    T = batch["input_ids"].shape[1]
    mask = build_attention_mask(torch.from_numpy(batch["sep"]), 3, T, 0)
    for b in range(3):
        sep = int(batch["sep"][b])
        m = mask[b, 0].numpy().astype(bool)
        assert batch["input_ids"][b, sep] == SP.sop and SP.gmask in batch["input_ids"][b, :sep].tolist()
        assert (m == visible(sep, T)).all()
        assert m[:sep, :sep].all() and not m[:sep, sep:].any()  # Part A: bidirectional, blind to the span
        assert (m[sep:, sep:] == np.tril(np.ones((T - sep, T - sep), dtype=bool))).all()


def is_infill_form(batch: dict, b: int) -> bool:
    """Infill form ends its Part B targets with eop; the prefix form never writes eop (docs/glm.md 5)."""
    return SP.eop in batch["target_ids"][b, int(batch["sep"][b]) :].tolist()


def test_gpt_infill_prob_half_gives_both_forms_at_that_rate():
    collator = BlockCollator(SP, CollatorConfig(bert_prob=0.0, gpt_infill_prob=0.5))
    rng = np.random.default_rng(9)
    prefix, n = 0, 0
    for _ in range(200):
        samples = [one_doc_sample(rng, int(rng.integers(12, 48))) for _ in range(4)]
        batch = collator(samples, rng, mode="gpt")
        for b, tokens in enumerate(samples):
            sep = int(batch["sep"][b])
            if not is_infill_form(batch, b):
                prefix += 1
                assert batch["input_ids"][b, :sep].tolist() == tokens[: sep - 1].tolist() + [SP.gmask]
            n += 1
    # prefix form ~ Binomial(800, 0.5): 4 sigma = 0.071
    assert abs(prefix / n - 0.5) < 4 * np.sqrt(0.25 / n), prefix / n


def test_multi_document_samples_always_take_the_prefix_form():
    collator = BlockCollator(SP, CollatorConfig(bert_prob=0.0, gpt_infill_prob=0.0))
    rng = np.random.default_rng(10)
    checked = 0
    for seed in range(100):
        samples = [random_sample(rng, 64, n_docs=3) for _ in range(4)]
        samples = [t for t in samples if len(document_bounds(t, SP)) > 1]
        batch = collator(samples, np.random.default_rng(seed), mode="gpt")
        G = expected_G(seed, samples)
        for b, tokens in enumerate(samples):
            L, sep = max(1, min(G, len(tokens) - 2)), int(batch["sep"][b])
            assert not is_infill_form(batch, b)
            assert sep == len(tokens) - L + 1
            assert batch["input_ids"][b, :sep].tolist() == tokens[: sep - 1].tolist() + [SP.gmask]
            assert batch["target_ids"][b, sep : sep + L].tolist() == tokens[sep - 1 :].tolist()
            checked += 1
    assert checked > 300


@pytest.mark.parametrize("config", [CollatorConfig(bert_prob=0.0), CollatorConfig(bert_prob=0.0, gpt_infill_prob=1.0)])
def test_default_gpt_infill_prob_keeps_the_random_stream_of_the_prefix_only_collator(config):
    """gpt_infill_prob = 1 (the default) draws nothing but G: same batch and same generator state as building
    every sample with make_gpt_sample from a twin generator that draws only the mode and G."""
    data = np.random.default_rng(11)
    for seed in range(20):
        samples = [one_doc_sample(data, 40), random_sample(data, 48, 3), one_doc_sample(data, 20)]
        rng, twin = np.random.default_rng(seed), np.random.default_rng(seed)
        batch = BlockCollator(SP, config)(samples, rng)
        assert twin.random() >= config.bert_prob  # the mode draw: gpt
        lengths = [len(t) for t in samples]
        G = int(twin.integers(int(0.25 * min(lengths)), max(lengths) - 2 + 1))
        ref = pad_batch([make_gpt_sample(t, max(1, min(G, len(t) - 2)), SP.gmask, SP.sop) for t in samples])
        for k in ref:
            assert (batch[k] == ref[k]).all(), k
        assert rng.bit_generator.state == twin.bit_generator.state
    # the check can fail: below 1, one-document samples draw the choice and move the stream
    rng, twin = np.random.default_rng(0), np.random.default_rng(0)
    BlockCollator(SP, CollatorConfig(bert_prob=0.0, gpt_infill_prob=0.99))([one_doc_sample(data, 40)], rng)
    twin.random(), twin.integers(0, 10)
    assert rng.bit_generator.state != twin.bit_generator.state


def test_infill_span_that_does_not_fit_the_document_falls_back_to_the_prefix_form():
    collator = BlockCollator(SP, CollatorConfig(gpt_infill_prob=0.0))
    tokens = np.array([SP.cls, SP.cls, 11, 12, SP.eos])  # one document of 2 tokens; length 3 = len - 2
    s = collator.make_document_sample(tokens, 3, np.random.default_rng(0))
    assert s.input_ids.tolist() == [SP.cls, SP.cls, SP.gmask, SP.sop, 11, 12]
    assert s.target_ids[3:].tolist() == [11, 12, SP.eos]


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
    ids, tg = batch["input_ids"][0, sep : sep + n], batch["target_ids"][0, sep : sep + n]
    assert (ids == SP.dblock).sum() > 0
    assert SP.dblock not in tg.tolist()
    assert (ids == SP.sop).sum() == (tg == SP.eop).sum()


def test_unknown_mode_and_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="unknown mode 'cloze'"):
        BlockCollator(SP)([np.array([1, 11, 12, 0])], np.random.default_rng(0), mode="cloze")
    with pytest.raises(ValueError, match="sum to at most 1"):
        CollatorConfig(bert_prob=0.8, gap_sentence_prob=0.5)
    with pytest.raises(ValueError, match="gpt_infill_prob must be in"):
        CollatorConfig(gpt_infill_prob=1.5)
