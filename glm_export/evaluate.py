"""Evaluate a model written by `glmx pretrain` on its own held-out split, each figure beside a unigram baseline.

In: a glmx checkpoint folder (its manifest's extra.pretraining holds the training settings) and the corpus folder.
Out: a metrics dict (optionally written as JSON): held-out Part B perplexity and greedy exact match of
single-word [MASK] fills, with the unigram (frequency) baseline's figure on the same data, and example fills.
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_export.collator import BlockCollator, CollatorConfig
from glm_export.pretrain import (
    PretrainSettings,
    cut_samples,
    eval_batches,
    heldout_metrics,
    layout_special_ids,
    load_corpus_tokenizer,
    read_documents,
    split_documents,
    token_stream,
)
from glm_runtime.errors import GLMXError
from glm_runtime.manifest import atomic_write_json

WORD = re.compile(r"(?<= )[A-Za-z]+(?=[ ,.;:!?)\n])")  # a whole alphabetic word preceded by a space
CONTEXT_CHARS = 300  # text kept on each side of a blank
MAX_FILL_TOKENS = 8
UNIGRAM_TRAIN_BATCHES = 64


class EvaluateError(GLMXError, ValueError):
    """The checkpoint or corpus cannot be evaluated (not from glmx pretrain, corpus missing, ...)."""


def pretraining_settings(manifest) -> PretrainSettings:
    info = (manifest.extra or {}).get("pretraining") if manifest is not None else None
    if not info:
        raise EvaluateError(
            "the checkpoint's manifest has no extra.pretraining block: evaluate needs a model "
            "written by `glmx pretrain` (it re-creates that run's held-out split)"
        )
    return PretrainSettings(**info["settings"])


def unigram_part_b_counts(
    collator: BlockCollator, train: np.ndarray, s: PretrainSettings, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies, add-one smoothed, over bert-mode training batches (of at most batch_size samples): of all
    Part B targets (span tokens and eop), and of each span's first token only (the one predicted from sop)."""
    rng = np.random.default_rng([s.seed, 5])
    counts, first_counts = np.ones(vocab, dtype=np.float64), np.ones(vocab, dtype=np.float64)
    sop = layout_special_ids().sop
    take = min(s.batch_size, len(train))  # a corpus smaller than one training batch: count what there is
    for _ in range(UNIGRAM_TRAIN_BATCHES):
        idx = rng.choice(len(train), size=take, replace=False)
        batch = collator(list(train[idx]), rng, mode="bert")
        rows = batch["loss_mask"] == 1
        np.add.at(counts, batch["target_ids"][rows], 1)
        np.add.at(first_counts, batch["target_ids"][rows & (batch["input_ids"] == sop)], 1)
    return counts, first_counts


@torch.no_grad()
def part_b_perplexity(
    model, batches: list[dict[str, torch.Tensor]], unigram: np.ndarray, first_token_guess: int
) -> dict[str, float]:
    """Held-out Part B perplexity and span first-token accuracy (pretrain.heldout_metrics, as logged during
    training), each beside its baseline on the same targets: the unigram distribution, and always guessing
    first_token_guess."""
    figures = heldout_metrics(model, batches)
    logp_unigram = np.log(unigram / unigram.sum())
    total_uni, n, first_uni, firsts = 0.0, 0, 0, 0
    sop = layout_special_ids().sop
    for batch in batches:
        rows = batch["loss_mask"] == 1
        targets, first = batch["target_ids"][rows], batch["input_ids"][rows] == sop
        total_uni -= float(logp_unigram[targets.numpy()].sum())
        n += len(targets)
        first_uni += int((targets[first] == first_token_guess).sum())
        firsts += int(first.sum())
    return {
        "heldout_part_b_ppl": math.exp(figures["heldout_loss"]),
        "unigram_part_b_ppl": math.exp(total_uni / n),
        "part_b_tokens": n,
        "part_b_first_token_acc": figures["heldout_first_token_acc"],
        "unigram_part_b_first_token_acc": first_uni / firsts,
        "part_b_first_tokens": firsts,
    }


def single_word_blanks(docs: list[str], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(left text, word, right text) for up to n single-word blanks, one per document, in a seeded order."""
    rng = np.random.default_rng([seed, 4])
    out = []
    for d in rng.permutation(len(docs)):
        doc = docs[d]
        words = list(WORD.finditer(doc))
        if len(doc.split()) < 8 or not words:
            continue
        m = words[int(rng.integers(len(words)))]
        left = doc[max(0, m.start() - CONTEXT_CHARS) : m.start()]
        right = doc[m.end() : m.end() + CONTEXT_CHARS]
        if m.start() > CONTEXT_CHARS:  # start and end the window on whole words
            left = left[left.find(" ") + 1 :]
        if m.end() + CONTEXT_CHARS < len(doc) and " " in right:
            right = right[: right.rfind(" ")]
        out.append((left.rstrip(" "), m.group(), right))  # the space before the word belongs to the blank
        if len(out) == n:
            break
    return out


def _context(model, tok, left: str, right: str) -> tuple[list[int], int]:
    """[CLS] left [MASK] right <eos>, each side cut to fit the position tables; returns (ids, mask position)."""
    sp = layout_special_ids()
    half = (model.config.max_sequence_length - 3) // 2  # [CLS] left [MASK] right <eos> must fit the tables
    left_ids = tok.encode(left, add_special_tokens=False).ids[-half:]
    right_ids = tok.encode(right, add_special_tokens=False).ids[:half]
    ids = [sp.cls] + left_ids + [sp.mask]
    return ids + right_ids + [sp.eos], len(ids) - 1


@torch.no_grad()
def known_length_match(model, tok, left: str, right: str, word: str) -> bool:
    """GLM's cloze protocol (LAMBADA-style): with the answer's length given, is every answer token the argmax
    after sop + the answer tokens before it (teacher forced, one pass over Part B)?"""
    sp = layout_special_ids()
    ids, mask_pos = _context(model, tok, left, right)
    answer = tok.encode(" " + word, add_special_tokens=False).ids
    C, n = len(ids), len(answer)
    tokens = ids + [sp.sop] + answer[:-1]
    positions = torch.tensor([[list(range(C)) + [mask_pos] * n, [0] * C + list(range(1, n + 1))]])
    logits, _ = model(torch.tensor([tokens]), positions, C)
    return bool((logits[0, C:].argmax(-1) == torch.tensor(answer)).all())


@torch.no_grad()
def greedy_fill_torch(model, tok, left: str, right: str) -> list[int]:
    """Greedy blank filling (docs/glm.md 4.1): context pass with sep = C, then sop at (mask_pos, 1), ... until
    eop/eos."""
    sp = layout_special_ids()
    ids, mask_pos = _context(model, tok, left, right)
    C = len(ids)
    positions = torch.stack([torch.arange(C), torch.zeros(C, dtype=torch.long)]).unsqueeze(0)  # (1, 2, C)
    _, past = model(torch.tensor([ids]), positions, C)
    token, out = sp.sop, []
    for t in range(MAX_FILL_TOKENS):
        logits, past = model(torch.tensor([[token]]), torch.tensor([[[mask_pos], [t + 1]]]), 0, past)
        token = int(logits[0, -1].argmax())
        if token in (sp.eop, sp.eos):
            break
        out.append(token)
    return out


def blanks_and_words(
    corpus_dir: str | Path, train_docs: list[str], held_docs: list[str], n: int, seed: int
) -> tuple[list[tuple[str, str, str]], Counter]:
    """What the fill figures are measured on, before any work: the held-out blanks and the training words (the
    unigram answer); each must have something in it."""
    blanks = single_word_blanks(held_docs, n, seed)
    if not blanks:
        raise EvaluateError(
            f"{corpus_dir}: no single-word blank can be cut from its held-out split ({len(held_docs)} of "
            f"{len(train_docs) + len(held_docs)} documents): a blank needs a document of 8 or more words with an "
            f"alphabetic word after a space; evaluate on the corpus the model was trained on, or a larger one"
        )
    word_counts = Counter(m.group() for d in train_docs for m in WORD.finditer(d))
    if not word_counts:
        raise EvaluateError(
            f"{corpus_dir}: its training split ({len(train_docs)} documents) holds no alphabetic word after a "
            f"space, so the unigram baseline has no word to answer; evaluate on the corpus the model was trained on"
        )
    return blanks, word_counts


def evaluate(
    checkpoint_dir: str | Path,
    corpus_dir: str | Path,
    out_file: str | Path | None = None,
    *,
    fill_examples: int = 500,
    ppl_batches: int = 8,
    threads: int = 2,
) -> dict[str, Any]:
    """Compute the metrics of a `glmx pretrain` model on its held-out split; write them to out_file if given."""
    from glm_export.checkpoint import load_checkpoint

    for name, value in (("fill_examples", fill_examples), ("ppl_batches", ppl_batches), ("threads", threads)):
        if value < 1:
            raise EvaluateError(f"{name} must be at least 1, got {value} (--{name.replace('_', '-')})")
    torch.set_num_threads(threads)
    loaded = load_checkpoint(checkpoint_dir)
    s = pretraining_settings(loaded.manifest)
    if loaded.tokenizer_file is None:
        raise EvaluateError(f"{checkpoint_dir} has no tokenizer file; it must hold the tokenizer it was trained with")
    tok = load_corpus_tokenizer(loaded.tokenizer_file)
    model = loaded.model.eval()
    train_docs, held_docs = split_documents(read_documents(corpus_dir), s.heldout_fraction)
    blanks, word_counts = blanks_and_words(corpus_dir, train_docs, held_docs, fill_examples, s.seed)
    train = cut_samples(token_stream(tok, train_docs), s.seq_length)
    held = cut_samples(token_stream(tok, held_docs), s.seq_length)
    collator = BlockCollator(layout_special_ids(), CollatorConfig())

    batches = eval_batches(collator, held, s.batch_size, ppl_batches, s.seed)
    unigram, first_counts = unigram_part_b_counts(collator, train, s, tok.get_vocab_size())
    metrics: dict[str, Any] = {"checkpoint": loaded.config.name}
    first_guess = int(first_counts.argmax())
    metrics.update(
        part_b_perplexity(
            model,
            batches,
            np.pad(unigram, (0, loaded.config.vocab_size - len(unigram)), constant_values=1.0),
            first_guess,
        )
    )
    metrics["unigram_first_token"] = tok.decode([first_guess])

    # single-word blanks: the model's greedy fill vs. always answering the most frequent training word
    top_word = word_counts.most_common(1)[0][0]
    hits, hits_first, hits_known, hits_uni, examples = 0, 0, 0, 0, []
    for left, word, right in blanks:
        fill = tok.decode(greedy_fill_torch(model, tok, left, right)).strip()
        hits += fill == word
        hits_first += (fill.split() or [""])[0].strip(".,;:!?\"'") == word
        hits_known += known_length_match(model, tok, left, right, word)
        hits_uni += top_word == word
        if len(examples) < 40:
            examples.append({"prompt": f"{left} [MASK]{right}", "answer": word, "fill": fill})
    metrics.update(
        {
            "mask_fill_exact_match": hits / len(blanks),
            "unigram_mask_fill_exact_match": hits_uni / len(blanks),
            # the free fill's first word (the model chooses its span length; a single-word blank does not say so)
            "mask_fill_first_word_match": hits_first / len(blanks),
            # GLM's cloze protocol: answer length given, every token the argmax (teacher forced); the unigram
            # baseline's figure is the same "always the most frequent word" rate
            "mask_fill_known_length_match": hits_known / len(blanks),
            "unigram_word": top_word,
            "mask_fill_examples_scored": len(blanks),
            "evaluate_command": shlex.join(
                ["glmx", "evaluate", str(checkpoint_dir), str(corpus_dir)]
                + (["--out", str(out_file)] if out_file else [])
                + ["--fill-examples", str(fill_examples), "--ppl-batches", str(ppl_batches)]
            ),
            "training_command": (loaded.manifest.extra["pretraining"].get("command")),
            "corpus": loaded.manifest.extra["pretraining"].get("corpus"),
            "steps": loaded.manifest.extra["pretraining"].get("steps_done"),
            "examples": examples,
        }
    )
    if out_file is not None:
        atomic_write_json(out_file, metrics)
    return metrics
