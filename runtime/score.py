"""Cloze scoring and classification (GLM's way of doing NLU): how likely is each candidate answer for one blank.

In: a session, its tokenizer, prompts with exactly one blank, candidate answers per prompt (or a template with
{fields} and a verbalizer label -> answers, over records). Out: per candidate the summed log-probability, the
per-token log-probabilities and the length-normalised score; per record the winning label and probabilities.

Multi-token (THUDM/GLM `GLMForMultiTokenCloze`): Part A = the context with its blank, Part B = sop + the
answer's tokens at (blank position, blocks 1..n+1); the targets are the answer's tokens then eop, the score
sum(log p) / (n + 1) ** length_penalty. Single-token (`GLMForSingleTokenCloze`): log-softmax at the blank's own
position over the candidates' single ids. One context pass per prompt, shared by every candidate (its K/V
gathered into their rows); every candidate of every prompt in one span call, each row seeing its context and
its own span only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from glm_runtime import masks
from glm_runtime.errors import GLMXError
from glm_runtime.iotable import LOGITS_START, accepts, past_names, present_names
from glm_runtime.sampling import log_softmax
from glm_runtime.session import Session, host_array
from glm_runtime.steps import empty_past
from glm_runtime.tokenizer import BlankError, build_context_ids, find_blanks

AGGREGATES = ("max", "sum")  # several answers of one label: the best one's score, or the log of their summed p


class ScoreError(GLMXError, ValueError):
    """A scoring request that cannot be answered: no or several blanks, an empty or oversized candidate, ..."""


@dataclass
class CandidateScore:
    text: str
    token_ids: list[int]  # the answer's ids (single-token: the one id)
    logprobs: list[float]  # per target: answer tokens then eop (single-token: the one)
    total: float  # sum of logprobs
    length: int  # number of targets
    score: float  # total / length ** length_penalty (single-token: total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prepare(tokenizer: Any, prompt: str, candidates: Sequence[str], single_token: bool, positions: int,
             where: str) -> tuple[list[int], int, list[list[int]]]:
    if not isinstance(prompt, str):
        raise ScoreError(f"{where}: the prompt must be a string, got {type(prompt).__name__}")
    try:
        ids = build_context_ids(tokenizer, prompt)
    except BlankError:
        raise ScoreError(f"{where} has no blank; a cloze question has exactly one ([MASK] where the answer "
                         f"goes)") from None
    except ValueError as exc:
        raise ScoreError(f"{where}: {exc}") from None
    blanks = find_blanks(ids, tokenizer)
    if len(blanks) != 1:
        raise ScoreError(f"{where} has {len(blanks)} blanks; a cloze question has exactly one ([MASK] where the "
                         f"answer goes)")
    if not candidates:
        raise ScoreError(f"{where}: no candidates to score")
    encoded = []
    for text in candidates:
        if not isinstance(text, str) or not text.strip():
            raise ScoreError(f"{where}: candidate {text!r} is empty; every candidate needs some text")
        cand = tokenizer.encode(text)
        if any(i in tokenizer.special.values() for i in cand):
            raise ScoreError(f"{where}: candidate {text!r} holds a command token; candidates are plain text")
        if single_token and len(cand) != 1:
            raise ScoreError(f"{where}: candidate {text!r} is {len(cand)} tokens ({cand}), and single-token "
                             f"scoring needs answers of one token each; drop --single-token to score it whole")
        need = len(ids) + 1 + len(cand)
        if need > positions:
            raise ScoreError(f"{where}: candidate {text!r} does not fit the model: {len(ids)} context + 1 + "
                             f"{len(cand)} answer tokens = {need} positions > max_sequence_length {positions}")
        encoded.append(cand)
    return ids, blanks[0][0], encoded


def score_candidates(session: Session, tokenizer: Any, prompts: Sequence[str] | str,
                     candidates: Sequence[Sequence[str]] | Sequence[str], *, length_penalty: float = 0.0,
                     single_token: bool = False) -> list[list[CandidateScore]] | list[CandidateScore]:
    """Score every candidate answer of the blank of each prompt (see the module docstring).

    prompts: one prompt (then candidates is its list and one list is returned) or a list of prompts (then
    candidates is one list per prompt). length_penalty: 0 = the plain sum of log-probabilities.
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    lists = [list(candidates)] if single else [list(c) for c in candidates]
    if len(lists) != len(prompts):
        raise ScoreError(f"{len(prompts)} prompts but {len(lists)} candidate lists; give one list per prompt")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ScoreError(f"length_penalty must be a finite number (0 = the plain sum), got {length_penalty!r}")
    P = session.config.max_sequence_length
    prepared = [_prepare(tokenizer, p, c, single_token, P, f"prompt {i}")
                for i, (p, c) in enumerate(zip(prompts, lists))]
    contexts = [ids for ids, _, _ in prepared]
    mask_pos = np.array([m for _, m, _ in prepared])
    context_out, context_logits = _context_pass(session, tokenizer, contexts, mask_pos if single_token else None)
    if single_token:
        results = []
        for b, (_, _, cands) in enumerate(prepared):
            logp = log_softmax(context_logits[b])
            results.append([CandidateScore(text, ids, [float(logp[ids[0]])], float(logp[ids[0]]), 1,
                                           float(logp[ids[0]])) for text, ids in zip(lists[b], cands)])
        return results[0] if single else results
    rows = [(b, k) for b, (_, _, cands) in enumerate(prepared) for k in range(len(cands))]
    spans = [[tokenizer.special["sop"], *prepared[b][2][k]] for b, k in rows]
    logits = _span_pass(session, context_out, [len(c) for c in contexts], mask_pos, rows, spans)
    eop = tokenizer.special["eop"]
    results = [[] for _ in prompts]
    for r, (b, k) in enumerate(rows):
        cand = prepared[b][2][k]
        targets = [*cand, eop]
        logp = log_softmax(logits[r, :len(targets)])
        per_token = [float(logp[t, target]) for t, target in enumerate(targets)]
        total = float(sum(per_token))
        results[b].append(CandidateScore(lists[b][k], cand, per_token, total, len(targets),
                                         total / len(targets) ** length_penalty if length_penalty else total))
    return results[0] if single else results


def _context_pass(session: Session, tokenizer: Any, contexts: list[list[int]],
                  rows: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every prompt's context in one right-padded call. -> (host K/V of every layer, logits at `rows` or None)."""
    lengths = [len(c) for c in contexts]
    seq = max(lengths)
    ids = np.full((len(contexts), seq), tokenizer.special["pad"], dtype=np.int64)
    for b, c in enumerate(contexts):
        ids[b, :len(c)] = c
    feeds = {"input_ids": ids, "position_ids": masks.context_positions(lengths, seq),
             "attention_mask": masks.context_mask(lengths, seq), **empty_past(session, len(contexts))}
    if rows is None and accepts(session, LOGITS_START):
        feeds[LOGITS_START] = np.array([-1], dtype=np.int64)  # the context's logits are not read
    out = session.run(feeds)
    logits = None
    if rows is not None:
        full = host_array(out["logits"])
        logits = full[np.arange(len(contexts)), rows - (seq - full.shape[1])]
    return {name: host_array(out[name]) for pair in present_names(session.io) for name in pair}, logits


def _span_pass(session: Session, context: dict[str, np.ndarray], lengths: list[int], mask_pos: np.ndarray,
               rows: list[tuple[int, int]], spans: list[list[int]]) -> np.ndarray:
    """Every candidate's sop + answer in one call on its prompt's gathered context K/V. -> logits [R, T, V]."""
    R, T = len(spans), max(len(s) for s in spans)
    prompt_of = np.array([b for b, _ in rows])
    ids = np.zeros((R, T), dtype=np.int64)
    blocks = np.zeros((R, T), dtype=np.int64)
    for r, span in enumerate(spans):
        ids[r, :len(span)] = span
        blocks[r] = np.arange(1, T + 1)  # padding continues the block count: hidden, but inside the table
    positions = np.stack([np.repeat(mask_pos[prompt_of][:, None], T, axis=1), blocks], axis=1)
    past_len = next(iter(context.values())).shape[2]
    visible = np.arange(past_len)[None, :] < np.asarray(lengths)[prompt_of][:, None]  # [R, past]
    names = [(past, present) for pair_past, pair_present in zip(past_names(session.io), present_names(session.io))
             for past, present in zip(pair_past, pair_present)]
    pasts = {past: np.ascontiguousarray(context[present][prompt_of]) for past, present in names}
    if _takes_chunks(session, R, T, past_len):
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": masks.chunk_mask(visible, T),
                 **pasts}
        return host_array(session.run(feeds)["logits"])
    # an engine whose profiles take one token per row over a cache (TensorRT's "decode"): the span goes in T
    # single-token calls, each seeing the context, the span so far, and itself
    logits = []
    for t in range(T):
        feeds = {"input_ids": ids[:, t:t + 1], "position_ids": positions[:, :, t:t + 1],
                 "attention_mask": masks.decode_mask(visible), **pasts}
        out = session.run(feeds)
        logits.append(host_array(out["logits"])[:, -1])
        for past, present in names:
            pasts[past] = np.concatenate([pasts[past], host_array(out[present]).astype(pasts[past].dtype)], axis=2)
        visible = np.concatenate([visible, np.ones((R, 1), dtype=bool)], axis=1)
    return np.stack(logits, axis=1)


def _takes_chunks(session: Session, batch: int, seq: int, past: int) -> bool:
    """Whether one call of `seq` tokens over a `past`-slot cache fits the session (only engines have limits)."""
    return session.fits(batch, seq, past)


# ---------------------------------------------------------------- classification: template + verbalizer


def fill_template(template: str, record: Mapping[str, Any], where: str) -> str:
    try:
        return template.format_map(dict(record))
    except KeyError as exc:
        raise ScoreError(f"{where} has no field {exc.args[0]!r}, which the template reads ({template!r})") from None
    except (ValueError, IndexError) as exc:
        raise ScoreError(f"the template {template!r} is not a valid format string: {exc}") from None


def classify(session: Session, tokenizer: Any, records: Sequence[Mapping[str, Any]], template: str,
             verbalizer: Mapping[str, Sequence[str] | str], *, aggregate: str = "max", length_penalty: float = 0.0,
             single_token: bool = False) -> dict[str, Any]:
    """The label of each record: its template filled, every answer of every label scored, a label's score the
    best of its answers ("max") or the log of their summed probabilities ("sum"). -> {"predictions": [...],
    and with gold labels (a record's "label") "accuracy" and "confusion" (gold -> predicted -> count)}."""
    if aggregate not in AGGREGATES:
        raise ScoreError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if not verbalizer:
        raise ScoreError("the verbalizer is empty; map each label to one or more answers")
    answers = {label: [a] if isinstance(a, str) else list(a) for label, a in verbalizer.items()}
    if any(not a for a in answers.values()):
        raise ScoreError(f"label {next(k for k, a in answers.items() if not a)!r} has no answer in the verbalizer")
    labels = list(answers)
    flat = [(label, a) for label in labels for a in answers[label]]
    if not records:
        raise ScoreError("no records to classify")
    prompts = [fill_template(template, rec, f"record {i}") for i, rec in enumerate(records)]
    scores = score_candidates(session, tokenizer, prompts, [[a for _, a in flat]] * len(prompts),
                              length_penalty=length_penalty, single_token=single_token)
    predictions = []
    for rec, cands in zip(records, scores):
        per_label: dict[str, list[float]] = {label: [] for label in labels}
        for (label, _), cand in zip(flat, cands):
            per_label[label].append(cand.score)
        label_scores = {label: (max(v) if aggregate == "max" else float(np.logaddexp.reduce(v)))
                        for label, v in per_label.items()}
        z = np.array(list(label_scores.values()))
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        best = labels[int(np.argmax(z))]
        predictions.append({"label": best, "scores": label_scores,
                            "probabilities": dict(zip(labels, map(float, probs))),
                            "answers": {a: c.score for (_, a), c in zip(flat, cands)},
                            **({"gold": rec["label"]} if "label" in rec else {})})
    result: dict[str, Any] = {"predictions": predictions, "labels": labels, "aggregate": aggregate,
                              "length_penalty": length_penalty, "single_token": single_token}
    gold = [p for p in predictions if "gold" in p]
    if gold:
        unknown = sorted({str(p["gold"]) for p in gold} - set(labels))
        if unknown:
            raise ScoreError(f"gold label {unknown[0]!r} is not a label of the verbalizer ({', '.join(labels)})")
        confusion = {g: {p: 0 for p in labels} for g in labels}
        for p in gold:
            confusion[p["gold"]][p["label"]] += 1
        result.update(accuracy=sum(p["gold"] == p["label"] for p in gold) / len(gold), confusion=confusion,
                      gold_records=len(gold))
    return result
