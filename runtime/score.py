"""Cloze scoring and classification (GLM's way of doing NLU), the entry points: how likely is each candidate
answer for one blank, and which label of a verbalizer fits each record best.

In: a session, its tokenizer, prompts with exactly one blank and candidate answers per prompt (or a template with
{fields} and a verbalizer label -> answers, over records). Out: per candidate a CandidateScore; per record the
winning label and probabilities. Each call is one ScoreRequest run by the engine (Engine.run); the computation
is runtime/cloze.py's (module docstring there: GLM's multi-token and single-token scoring).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from glm_runtime.backend import Session
from glm_runtime.cloze import ScoreError
from glm_runtime.engine import Engine
from glm_runtime.requests import CandidateScore, ScoreRequest
from glm_runtime.tokenizer import GLMTokenizer

AGGREGATES = ("max", "sum")  # several answers of one label: the best one's score, or the log of their summed p
__all__ = [
    "AGGREGATES",
    "CandidateScore",
    "ScoreError",
    "classify",
    "fill_template",
    "gold_label",
    "score_candidates",
    "template_fields",
]


def score_candidates(
    session: Session,
    tokenizer: GLMTokenizer,
    prompts: Sequence[str] | str,
    candidates: Sequence[Sequence[str]] | Sequence[str],
    *,
    length_penalty: float = 0.0,
    single_token: bool = False,
) -> list[list[CandidateScore]] | list[CandidateScore]:
    """Score every candidate answer of the blank of each prompt (runtime/cloze.py says how).

    prompts: one prompt (then candidates is its list and one list is returned) or a list of prompts (then
    candidates is one list per prompt). length_penalty: 0 = the plain sum of log-probabilities.
    """
    single = isinstance(prompts, str)
    texts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    lists = (tuple(candidates),) if single else tuple(tuple(c) for c in candidates)
    request = ScoreRequest(texts, lists, length_penalty=length_penalty, single_token=single_token)
    scores = next(e.scores for e in Engine(session, tokenizer, rows=1).run([request]) if e.kind == "scores")
    assert scores is not None
    return scores[0] if single else scores


# ---------------------------------------------------------------- classification: template + verbalizer


def template_fields(template: str) -> list[str]:
    """The record keys a template reads: plain {field} names only. str.format's attribute and index access
    ({text.upper}, {text[0]}) would reach into a record's values, silently (a method's repr) or as an error."""
    from string import Formatter

    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise ScoreError(f"the template {template!r} is not a valid format string: {exc}") from None
    fields = []
    for _, name, spec, _ in parsed:
        if name is None:  # literal text only
            continue
        if not name or name.isdigit():
            raise ScoreError(f"the template {template!r} has a positional field {{{name}}}; name a record's key")
        if any(c in name for c in ".[") or "{" in (spec or ""):
            raise ScoreError(
                f"the template's field {{{name}}} reads an attribute or an index of a value (or a nested field); "
                f"a field is a record's key as it is, e.g. {{{name.split('.')[0].split('[')[0]}}}"
            )
        fields.append(name)
    return fields


def fill_template(template: str, record: Mapping[str, Any], where: str) -> str:
    template_fields(template)
    try:
        return template.format_map(dict(record))
    except KeyError as exc:
        raise ScoreError(f"{where} has no field {exc.args[0]!r}, which the template reads ({template!r})") from None
    except (ValueError, TypeError) as exc:  # a format spec its value does not take ({n:d} of a string)
        raise ScoreError(f"{where}: the template {template!r} cannot format its fields: {exc}") from None


def gold_label(record: Mapping[str, Any], where: str) -> str | None:
    """A record's gold label as the verbalizer spells its labels. A verbalizer is a JSON object, so its labels are
    strings; an integer label (1) means the label of that spelling ("1"). Other types are refused."""
    if "label" not in record:
        return None
    gold = record["label"]
    if isinstance(gold, str):
        return gold
    if isinstance(gold, int) and not isinstance(gold, bool):
        return str(gold)
    kind = "a bool" if isinstance(gold, bool) else f"a {type(gold).__name__}"
    raise ScoreError(
        f"gold label {json.dumps(gold)} of {where} is {kind}; a label is a string (or an integer, read as its "
        f"digits) naming one of the verbalizer's labels"
    )


def classify(
    session: Session,
    tokenizer: GLMTokenizer,
    records: Sequence[Mapping[str, Any]],
    template: str,
    verbalizer: Mapping[str, Sequence[str] | str],
    *,
    aggregate: str = "max",
    length_penalty: float = 0.0,
    single_token: bool = False,
) -> dict[str, Any]:
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
    template_fields(template)
    prompts = [fill_template(template, rec, f"record {i}") for i, rec in enumerate(records)]
    golds = [gold_label(rec, f"record {i}") for i, rec in enumerate(records)]
    unknown = sorted({g for g in golds if g is not None} - set(labels))
    if unknown:  # before any scoring
        raise ScoreError(f"gold label {unknown[0]!r} is not a label of the verbalizer ({', '.join(labels)})")
    scores = score_candidates(
        session,
        tokenizer,
        prompts,
        [[a for _, a in flat]] * len(prompts),
        length_penalty=length_penalty,
        single_token=single_token,
    )
    predictions: list[dict[str, Any]] = []
    for gold, cands in zip(golds, scores):
        per_label: dict[str, list[float]] = {label: [] for label in labels}
        for (label, _), cand in zip(flat, cands):
            per_label[label].append(cand.score)
        label_scores = {
            label: (max(v) if aggregate == "max" else float(np.logaddexp.reduce(v))) for label, v in per_label.items()
        }
        z = np.array(list(label_scores.values()))
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        best = labels[int(np.argmax(z))]
        predictions.append(
            {
                "label": best,
                "scores": label_scores,
                "probabilities": dict(zip(labels, map(float, probs))),
                "answers": {a: c.score for (_, a), c in zip(flat, cands)},
                **({"gold": gold} if gold is not None else {}),
            }
        )
    result: dict[str, Any] = {
        "predictions": predictions,
        "labels": labels,
        "aggregate": aggregate,
        "length_penalty": length_penalty,
        "single_token": single_token,
    }
    gold = [p for p in predictions if "gold" in p]
    if gold:
        confusion = {g: {p: 0 for p in labels} for g in labels}
        for p in gold:
            confusion[p["gold"]][p["label"]] += 1
        result.update(
            accuracy=sum(p["gold"] == p["label"] for p in gold) / len(gold), confusion=confusion, gold_records=len(gold)
        )
    return result
