"""GLM's blank-infilling pretraining collator (docs/glm.md 2, 3.4 and 5), in numpy only.

In: token samples, each "[CLS] doc <eos> [CLS] doc <eos> ..." (1-D int arrays), and a numpy Generator.
Out: a padded batch dict: input_ids [B, T], position_ids [B, 2, T], target_ids [B, T], loss_mask [B, T]
(1 on Part B only), sep [B] (Part A length; the model builds the Part A / Part B mask from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import exp, factorial

import numpy as np

Interval = tuple[int, int]  # [start, end) in the uncorrupted sample


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the command tokens the collator writes (the names of docs/glm.md 7)."""

    eos: int
    cls: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    dblock: int
    pad: int = 0


@dataclass(frozen=True)
class CollatorConfig:
    """The pretraining knobs of docs/glm.md 5 (defaults: GLM-Large's bert-only objective)."""

    bert_prob: float = 1.0
    gap_sentence_prob: float = 0.0  # the rest (1 - bert - sentence) is gpt / document mode
    mask_ratio: float = 0.15  # bert_ratio: masked tokens per sample in bert and sentence modes
    avg_block_length: float = 3.0  # Poisson lambda of span lengths
    max_block_length: int = 40  # span lengths are 1 .. max_block_length - 1
    gpt_min_ratio: float = 0.25
    # gpt mode, per one-document sample: probability of the prefix + [gMASK] + suffix form; otherwise one span of
    # G tokens inside the document becomes a single [gMASK]. GLM's value (docs/glm.md 5 `gpt_infill_prob`) is 0.5. The
    # default 1.0 always takes the prefix form and draws no random number for the choice, so the random stream,
    # and with it the recipe of the bundled model (trained before this option existed), stays reproducible.
    gpt_infill_prob: float = 1.0
    block_mask_prob: float = 0.0  # Part B input tokens of bert spans replaced by [dBLOCK]
    shuffle_blocks: bool = True

    def __post_init__(self) -> None:
        probs = (self.bert_prob, self.gap_sentence_prob)
        if min(probs) < 0 or sum(probs) > 1.0 + 1e-9:
            raise ValueError(
                f"bert_prob {self.bert_prob} and gap_sentence_prob {self.gap_sentence_prob} must be "
                f">= 0 and sum to at most 1 (the rest is gpt mode)"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.gpt_infill_prob <= 1.0:
            raise ValueError(f"gpt_infill_prob must be in [0, 1], got {self.gpt_infill_prob}")
        if self.max_block_length < 2:
            raise ValueError(f"max_block_length must be >= 2, got {self.max_block_length}")


def span_length_weights(avg_block_length: float = 3.0, max_block_length: int = 40) -> np.ndarray:
    """Probabilities of span lengths 1 .. max_block_length-1: the Poisson(lambda) pmf, renormalised."""
    pmf = np.array([exp(-avg_block_length) * avg_block_length**k / factorial(k) for k in range(1, max_block_length)])
    return pmf / pmf.sum()


def document_bounds(tokens: np.ndarray, special: SpecialIds) -> list[Interval]:
    """Interiors [start, end) of the documents of a sample: the tokens strictly between [CLS] and <eos>.

    A sample may start or end inside a document; those pieces count as documents too.
    """
    bounds, start = [], 0
    for i, t in enumerate(tokens.tolist()):
        if t == special.cls or t == special.eos:
            if i > start:
                bounds.append((start, i))
            start = i + 1
    if len(tokens) > start:
        bounds.append((start, len(tokens)))
    return bounds


def place_spans(lengths: Sequence[int], start: int, end: int, rng: np.random.Generator) -> list[Interval] | None:
    """Place spans of the given lengths, in order, at random inside [start, end), >= 1 token apart.

    The free tokens (those not needed for spans and their one-token gaps) are shared out at random before,
    between and after the spans. Returns None if the spans cannot fit.
    """
    if not lengths:
        return []
    free = (end - start) - sum(lengths) - (len(lengths) - 1)
    if free < 0:
        return None
    extra = np.sort(rng.integers(0, free + 1, size=len(lengths)))  # free tokens before each span, cumulative
    spans = []
    for i, length in enumerate(lengths):
        s = start + int(extra[i]) + sum(lengths[:i]) + i  # + i: the one-token gap after each earlier span
        spans.append((s, s + length))
    return spans


def sample_bert_spans(
    tokens: np.ndarray,
    special: SpecialIds,
    config: CollatorConfig,
    rng: np.random.Generator,
    weights: np.ndarray,
    max_tries: int = 20,
) -> list[Interval]:
    """Token-level spans (docs/glm.md 5, bert): Poisson span lengths until int(ratio * len) tokens are masked,
    placed inside documents only, non-overlapping and non-adjacent. Empty if nothing fits after retries."""
    docs = document_bounds(tokens, special)
    if not docs:
        return []
    target = int(config.mask_ratio * len(tokens))
    longest = max(range(len(docs)), key=lambda d: docs[d][1] - docs[d][0])
    for _ in range(max_tries):
        lengths: list[int] = []
        while sum(lengths) < target:
            lengths.append(int(rng.choice(len(weights), p=weights)) + 1)
        rng.shuffle(lengths)
        # every document but the longest takes spans up to its own share; the longest takes the rest
        per_doc: list[list[int]] = [[] for _ in docs]
        rest = list(lengths)
        for d, (s, e) in enumerate(docs):
            if d == longest:
                continue
            quota = int(config.mask_ratio * (e - s))
            while rest and sum(per_doc[d]) + rest[0] <= quota:
                per_doc[d].append(rest.pop(0))
        per_doc[longest] = rest
        spans: list[Interval] = []
        for d, (s, e) in enumerate(docs):
            placed = place_spans(per_doc[d], s, e, rng)
            if placed is None:
                break
            spans += placed
        else:
            return sorted(spans)
    return []


def sample_sentence_spans(
    tokens: np.ndarray, special: SpecialIds, config: CollatorConfig, rng: np.random.Generator, sentence_end: np.ndarray
) -> list[Interval]:
    """Whole sentences (docs/glm.md 5, sentence): split document interiors after sentence-ending tokens, shuffle,
    take sentences until int(ratio * len) tokens are covered. `sentence_end` is a bool table over the vocab."""
    sentences: list[Interval] = []
    for s, e in document_bounds(tokens, special):
        begin = s
        for i in range(s, e):
            if sentence_end[tokens[i]] or i == e - 1:
                sentences.append((begin, i + 1))
                begin = i + 1
    order = rng.permutation(len(sentences))
    target, chosen, covered = int(config.mask_ratio * len(tokens)), [], 0
    for k in order:
        if covered >= target:
            break
        chosen.append(sentences[k])
        covered += sentences[k][1] - sentences[k][0]
    return sorted(chosen)


@dataclass
class BlockSample:
    """One corrupted sample before batch padding. Arrays are [T] except position_ids [2, T]."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    target_ids: np.ndarray
    loss_mask: np.ndarray
    sep: int


def make_block_sample(
    tokens: np.ndarray,
    spans: Sequence[Interval],
    order: Sequence[int],
    mask_id: int,
    sop_id: int,
    eop_id: int,
    dblock_id: int | None = None,
    dblock_flags: np.ndarray | None = None,
) -> BlockSample:
    """Part A = tokens with each span collapsed to one mask token; Part B = spans in `order`, each as
    inputs "sop span" / targets "span eop" (docs/glm.md 3.4). Positions: Part A counts each span as one token;
    every Part B token takes its mask's position, block ids 1 .. len+1. sep = len - sum(spans) + #spans.

    dblock_flags (optional, bool per Part B input token) replaces those inputs with [dBLOCK].
    """
    spans = sorted(spans)
    part_a: list[int] = []
    mask_positions: list[int] = []
    cursor = 0
    for s, e in spans:
        part_a += tokens[cursor:s].tolist()
        mask_positions.append(len(part_a))
        part_a.append(mask_id)
        cursor = e
    part_a += tokens[cursor:].tolist()
    sep = len(part_a)
    b_inputs, b_targets, b_pos, b_block = [], [], [], []
    for k in order:
        s, e = spans[k]
        span = tokens[s:e].tolist()
        b_inputs += [sop_id] + span
        b_targets += span + [eop_id]
        b_pos += [mask_positions[k]] * (len(span) + 1)
        b_block += list(range(1, len(span) + 2))
    b_inputs_arr = np.array(b_inputs, dtype=np.int64)
    if dblock_flags is not None and dblock_id is not None:
        b_inputs_arr = np.where(dblock_flags & (b_inputs_arr != sop_id), dblock_id, b_inputs_arr)  # sop stays
    input_ids = np.concatenate([np.array(part_a, dtype=np.int64), b_inputs_arr])
    positions = np.array(list(range(sep)) + b_pos, dtype=np.int64)
    blocks = np.array([0] * sep + b_block, dtype=np.int64)
    targets = np.array(part_a + b_targets, dtype=np.int64)  # Part A targets are never scored
    loss_mask = np.array([0] * sep + [1] * len(b_inputs), dtype=np.int64)
    return BlockSample(input_ids, np.stack([positions, blocks]), targets, loss_mask, sep)


def make_gpt_sample(tokens: np.ndarray, suffix_len: int, gmask_id: int, sop_id: int) -> BlockSample:
    """Document mode (docs/glm.md 5, gpt): Part A = prefix + [gMASK] (position len(prefix), block 0);
    Part B inputs = sop + suffix[:-1], targets = suffix (no eop), positions all len(prefix)."""
    split = len(tokens) - suffix_len
    prefix, suffix = tokens[:split].tolist(), tokens[split:].tolist()
    sep = split + 1
    input_ids = np.array(prefix + [gmask_id] + [sop_id] + suffix[:-1], dtype=np.int64)
    positions = np.array(list(range(sep)) + [split] * suffix_len, dtype=np.int64)
    blocks = np.array([0] * sep + list(range(1, suffix_len + 1)), dtype=np.int64)
    targets = np.array(prefix + [gmask_id] + suffix, dtype=np.int64)
    loss_mask = np.array([0] * sep + [1] * suffix_len, dtype=np.int64)
    return BlockSample(input_ids, np.stack([positions, blocks]), targets, loss_mask, sep)


def pad_batch(samples: Sequence[BlockSample], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad to the longest sample (docs/glm.md 5): token pad_id, position (0, 0), target pad_id, loss 0."""
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    batch = {
        "input_ids": np.full((B, T), pad_id, dtype=np.int64),
        "position_ids": np.zeros((B, 2, T), dtype=np.int64),
        "target_ids": np.full((B, T), pad_id, dtype=np.int64),
        "loss_mask": np.zeros((B, T), dtype=np.int64),
        "sep": np.array([s.sep for s in samples], dtype=np.int64),
    }
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        batch["input_ids"][b, :n] = s.input_ids
        batch["position_ids"][b, :, :n] = s.position_ids
        batch["target_ids"][b, :n] = s.target_ids
        batch["loss_mask"][b, :n] = s.loss_mask
    return batch


class BlockCollator:
    """Draws one mode per batch (bert / sentence / gpt with the configured probabilities) and builds it."""

    def __init__(
        self, special: SpecialIds, config: CollatorConfig = CollatorConfig(), sentence_end: np.ndarray | None = None
    ):
        if config.gap_sentence_prob > 0 and sentence_end is None:
            raise ValueError("gap_sentence_prob > 0 needs a sentence_end table (bool per vocabulary id)")
        self.special = special
        self.config = config
        self.sentence_end = sentence_end
        self.weights = span_length_weights(config.avg_block_length, config.max_block_length)

    def choose_mode(self, rng: np.random.Generator) -> str:
        u = rng.random()
        if u < self.config.bert_prob:
            return "bert"
        if u < self.config.bert_prob + self.config.gap_sentence_prob:
            return "sentence"
        return "gpt"

    def make_document_sample(self, tokens: np.ndarray, length: int, rng: np.random.Generator) -> BlockSample:
        """One gpt-mode sample (docs/glm.md 5) with `length` = min(G, len - 2) generated tokens.

        Prefix form (make_gpt_sample) if the sample holds several documents or with prob gpt_infill_prob; else
        one span of `length` tokens placed uniformly inside the document, replaced by one [gMASK] and laid out
        like a bert span (make_block_sample: "sop span" / "span eop"). A span that does not fit the document
        falls back to the prefix form. No random draw for the choice when gpt_infill_prob is 1.
        """
        sp, p = self.special, self.config.gpt_infill_prob
        if p < 1.0:
            docs = document_bounds(tokens, sp)
            if len(docs) == 1 and rng.random() >= p:
                placed = place_spans([length], docs[0][0], docs[0][1], rng)
                if placed is not None:
                    return make_block_sample(tokens, placed, [0], sp.gmask, sp.sop, sp.eop)
        return make_gpt_sample(tokens, length, sp.gmask, sp.sop)

    def __call__(
        self, samples: Sequence[np.ndarray], rng: np.random.Generator, mode: str | None = None
    ) -> dict[str, np.ndarray]:
        mode = mode or self.choose_mode(rng)
        sp, cfg = self.special, self.config
        built: list[BlockSample] = []
        if mode == "gpt":
            lengths = [len(t) for t in samples]
            low = int(cfg.gpt_min_ratio * min(lengths))
            high = max(low, max(lengths) - 2)
            G = int(rng.integers(low, high + 1))
            for tokens in samples:
                tokens = np.asarray(tokens)
                built.append(self.make_document_sample(tokens, max(1, min(G, len(tokens) - 2)), rng))
        elif mode in ("bert", "sentence"):
            for tokens in samples:
                tokens = np.asarray(tokens)
                if mode == "bert":
                    spans, mask_id = sample_bert_spans(tokens, sp, cfg, rng, self.weights), sp.mask
                else:
                    spans, mask_id = sample_sentence_spans(tokens, sp, cfg, rng, self.sentence_end), sp.smask
                order = rng.permutation(len(spans)) if cfg.shuffle_blocks else np.arange(len(spans))
                flags = None
                if mode == "bert" and cfg.block_mask_prob > 0:
                    n_b = sum(e - s + 1 for s, e in spans)
                    flags = rng.random(n_b) < cfg.block_mask_prob
                built.append(
                    make_block_sample(tokens, spans, order.tolist(), mask_id, sp.sop, sp.eop, sp.dblock, flags)
                )
        else:
            raise ValueError(f"unknown mode {mode!r}; expected 'bert', 'sentence' or 'gpt'")
        batch = pad_batch(built, sp.pad)
        batch["mode"] = np.array(mode)
        return batch
