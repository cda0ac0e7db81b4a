"""Cloze scoring and classification (glm_runtime.score) against the torch reference's teacher-forced full
forward (context + sop + answer, sep = C; docs/glm.md 4.2), on the bundled model: multi-token and single-token scores,
a batch of prompts with blanks at different places, classification whose gold labels come from the reference's
own scores, a quantized artifact's winners, and every bad input as one CLI line."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from glm_export.cli import main
from glm_export.compare import TOLERANCES
from glm_runtime.score import classify, score_candidates
from glm_runtime.session import open_model
from glm_runtime.tokenizer import build_context_ids

PROMPTS = [
    "The cat sat on the [MASK].",
    "A function is defined with the [MASK] keyword in Python.",
    "[MASK] is better than ugly.",
]
CANDIDATES = [
    [" mat", " floor", " red chair in the corner of the room"],  # 1 to 8 tokens
    [" def", " lambda", " return"],
    ["Beautiful", " Explicit is", "Simple and clear code"],
]


@pytest.fixture(scope="module")
def bundled():
    from glm_export.checkpoint import load_checkpoint
    from glm_export.export import BUNDLED_CHECKPOINT

    session, tok = open_model(None)
    return session, tok, load_checkpoint(BUNDLED_CHECKPOINT).model


def reference_logprobs(model, tok, prompt: str, answer: str) -> np.ndarray:
    """log-softmax over the span of one teacher-forced full forward: context + sop + answer, sep = C."""
    ctx = build_context_ids(tok, prompt)
    m, C = ctx.index(tok.special["MASK"]), len(ctx)
    ans = tok.encode(answer)
    ids = ctx + [tok.special["sop"]] + ans
    pos = [list(range(C)) + [m] * (len(ans) + 1), [0] * C + list(range(1, len(ans) + 2))]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), torch.tensor([pos]), C)
    return torch.log_softmax(logits[0].double(), -1).numpy(), C, ans


def test_multi_token_scores_equal_the_reference_full_forward(bundled):
    session, tok, model = bundled
    results = score_candidates(session, tok, PROMPTS, CANDIDATES, length_penalty=0.7)
    lengths = set()
    for prompt, answers, scores in zip(PROMPTS, CANDIDATES, results):
        for answer, got in zip(answers, scores):
            logp, C, ans = reference_logprobs(model, tok, prompt, answer)
            targets = ans + [tok.special["eop"]]
            want = np.array([logp[C + t, x] for t, x in enumerate(targets)])
            budget = TOLERANCES["fp32"].allowed(float(np.abs(want).max()))
            assert np.abs(np.array(got.logprobs) - want).max() <= budget, (prompt, answer)
            assert got.token_ids == ans and got.length == len(targets)
            assert got.score == pytest.approx(got.total / len(targets) ** 0.7)
            lengths.add(len(ans))
    assert min(lengths) == 1 and max(lengths) >= 8


def test_a_batch_of_prompts_equals_each_prompt_alone(bundled):
    session, tok, _ = bundled
    together = score_candidates(session, tok, PROMPTS, CANDIDATES)
    for prompt, answers, scores in zip(PROMPTS, CANDIDATES, together):
        alone = score_candidates(session, tok, prompt, answers)
        assert [c.total for c in alone] == pytest.approx([c.total for c in scores], abs=1e-4)


def test_single_token_scores_are_the_log_softmax_at_the_blank(bundled):
    session, tok, model = bundled
    prompt, answers = "The cat sat on the [MASK].", [" mat", " floor", " table"]
    got = score_candidates(session, tok, prompt, answers, single_token=True)
    ctx = build_context_ids(tok, prompt)
    m, C = ctx.index(tok.special["MASK"]), len(ctx)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx]), torch.tensor([[list(range(C)), [0] * C]]), C)
    logp = torch.log_softmax(logits[0, m].double(), -1).numpy()
    for answer, score in zip(answers, got):
        (i,) = tok.encode(answer)
        assert score.total == pytest.approx(logp[i], abs=1e-4) and score.length == 1


def test_classification_follows_the_models_own_scores(bundled):
    """Gold labels are what the reference's own full forward prefers, so the test asks: does classify pick
    the label its scores say, and count it right (not: does a small model know sentiment)."""
    session, tok, model = bundled
    template = "{text} It was [MASK]."
    verbalizer = {"positive": [" good", " great"], "negative": " bad", "odd": " a function"}
    texts = [
        "The film was a joy from start to end.",
        "A slow and tedious evening.",
        "Python code is readable.",
        "I would not watch it again.",
        "The garden was full of flowers.",
    ]
    records = []
    for text in texts:
        best = {}
        for label, answers in verbalizer.items():
            scores = []
            for answer in [answers] if isinstance(answers, str) else answers:
                logp, C, ans = reference_logprobs(model, tok, template.format(text=text), answer)
                scores.append(sum(logp[C + t, x] for t, x in enumerate(ans + [tok.special["eop"]])))
            best[label] = max(scores)
        records.append({"text": text, "label": max(best, key=best.get)})
    result = classify(session, tok, records, template, verbalizer)
    assert result["accuracy"] == 1.0 and result["gold_records"] == len(records)
    assert sum(result["confusion"][g][g] for g in result["labels"]) == len(records)
    for p in result["predictions"]:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["probabilities"][p["label"]] == max(p["probabilities"].values())
    summed = classify(session, tok, records, template, verbalizer, aggregate="sum")
    pos = summed["predictions"][0]["scores"]["positive"]
    answers = result["predictions"][0]["answers"]
    assert pos == pytest.approx(float(np.logaddexp(answers[" good"], answers[" great"])))


def test_a_quantized_artifact_picks_the_same_winner_where_fp32_is_decisive(bundled, tmp_path):
    from glm_export.quantize import quantize_onnx

    session, tok, _ = bundled
    from glm_runtime.session import BUNDLED_MODEL

    int8 = quantize_onnx(BUNDLED_MODEL, tmp_path / "int8", scheme="int8-dynamic")  # within its budget
    child, _ = open_model(int8)
    fp32 = score_candidates(session, tok, PROMPTS, CANDIDATES)
    q = score_candidates(child, tok, PROMPTS, CANDIDATES)
    for a, b in zip(fp32, q):
        sa, sb = [c.score for c in a], [c.score for c in b]
        top2 = sorted(sa)[-2:]
        if top2[1] - top2[0] > 1.0:  # a margin of more than one nat is decisive
            assert int(np.argmax(sa)) == int(np.argmax(sb))
        per_token = max(abs(x - y) / c.length for x, y, c in zip(sa, sb, a))
        assert per_token < 0.5  # int8's per-token log-prob drift stays well inside a nat


@pytest.mark.parametrize(
    "args,expected",
    [
        (["score", "no blank here", "-c", " x"], "has no blank"),
        (["score", "a [MASK] b [MASK]", "-c", " x"], "has 2 blanks"),
        (["score", "a [MASK]", "-c", "  "], "is empty"),
        (["score", "a [MASK]", "-c", " good day", "--single-token"], "single-token scoring needs answers of one token"),
        (["score", "a [MASK]", "-c", " word" * 600], "does not fit the model"),
        (["score", "a [MASK]"], "Missing option"),
        (["classify", "{records}", "--template", "{txt} [MASK]", "--verbalizer", '{"a": " b"}'], "has no field 'txt'"),
        (
            ["classify", "{records}", "--template", "{text} [MASK]", "--verbalizer", "not json"],
            "--verbalizer is not JSON",
        ),
        (["classify", "{records}", "--template", "{text} [MASK]", "--verbalizer", '{"a": []}'], "has no answer"),
        (
            ["classify", "{records}", "--template", "{text} [MASK]", "--verbalizer", '{"a": " b"}'],
            "gold label 'positive' is not a label",
        ),
        (["classify", "{records}", "--verbalizer", '{"a": " b"}'], "needs a template"),
    ],
)
def test_bad_scoring_input_is_one_line(tmp_path, args, expected):
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "fine", "label": "positive"}\n', encoding="utf-8")
    result = CliRunner().invoke(main, [str(records) if a == "{records}" else a for a in args])
    assert result.exit_code in (1, 2), result.output  # 2: click's own usage errors
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert expected in lines[-1] and "Traceback" not in result.output, result.output


def test_cli_score_and_classify(tmp_path):
    out = CliRunner().invoke(main, ["score", "The cat sat on the [MASK].", "-c", " mat", "-c", " floor", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["winner"] == max(data["candidates"], key=lambda c: c["score"])["text"]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"template": "{text} It was [MASK].", "verbalizer": {"p": " good", "n": " bad"}}))
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "Great fun.", "label": "p"}\n{"text": "Awful.", "label": "n"}\n')
    out = CliRunner().invoke(main, ["classify", str(records), "--task", str(task)])
    assert out.exit_code == 0, out.output
    assert "accuracy" in out.output and "confusion" in out.output
