"""The bundled model end to end: its ONNX export matches its checkpoint, and ONNX Runtime fills = torch fills."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from glm_export.checkpoint import load_checkpoint
from glm_export.export import BUNDLED_CHECKPOINT, validate_export
from glm_export.reference_session import TorchSession, load_torch_session
from glm_runtime.generate import fill_blanks
from glm_runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file
from glm_runtime.session import BUNDLED_MODEL, open_model

PROMPTS = [
    "A function is defined with the [MASK] keyword.",  # one blank mid-text
    "You can install [MASK] with pip, then import [MASK] in your code.",  # two blanks, the second sees the first
    "The [sMASK] Python is a programming language.",  # sentence blank
    "Beautiful is better than ugly. Explicit is better than [gMASK]",  # generation blank at the end
]


@pytest.fixture(scope="module")
def bundled():
    checkpoint = load_checkpoint(BUNDLED_CHECKPOINT)
    session, tokenizer = open_model(None)  # None = the bundled exported model, manifest verified
    return checkpoint, session, tokenizer


def test_export_records_its_parent_and_parity(bundled):
    manifest = load_manifest(BUNDLED_MODEL, kind="onnx")
    assert manifest.parent["manifest_sha256"] == sha256_file(BUNDLED_CHECKPOINT / MANIFEST_NAME)
    assert manifest.config == bundled[0].config.to_dict()
    assert manifest.parity["passed"] and manifest.parity["max_abs_diff"]["logits"] <= 1e-4


def test_bundled_onnx_matches_its_checkpoint_within_1e_4(bundled):
    """Re-run the export's GLM cases now, rather than trusting the recorded figures."""
    report = validate_export(BUNDLED_MODEL, bundled[0].model, "fp32", log=lambda m: None)
    assert not report.failures, report.failures
    assert len(report.cases) >= 5  # blank mid-text, two blanks via the cache, [gMASK], padded batches
    worst = max(figures[key] for figures in report.cases.values() for key in ("logits", "present_key", "present_value"))
    assert 0 < worst <= 1e-4, f"bundled ONNX vs checkpoint: max |diff| {worst:.3e} > 1e-4"


def test_greedy_fills_equal_the_torch_reference(bundled):
    checkpoint, session, tokenizer = bundled
    reference = TorchSession(checkpoint.model, checkpoint.config)
    onnx_results = fill_blanks(session, tokenizer, PROMPTS, max_new_tokens=12)
    torch_results = fill_blanks(reference, tokenizer, PROMPTS, max_new_tokens=12)
    for prompt, a, b in zip(PROMPTS, onnx_results, torch_results):
        assert a.tokens == b.tokens, f"{prompt!r}: onnxruntime {a.tokens} != torch {b.tokens}"
        assert a.text == b.text
    # and batched (rows of different lengths and blanks) equals one prompt at a time
    one_by_one = [fill_blanks(session, tokenizer, [p], max_new_tokens=12)[0].tokens for p in PROMPTS]
    assert [r.tokens for r in onnx_results] == one_by_one


def test_committed_metrics_name_the_bundled_checkpoint():
    metrics = json.loads((BUNDLED_CHECKPOINT.parent / "glmx-small.metrics.json").read_text())
    assert metrics["checkpoint"] == "glmx-small"
    assert metrics["heldout_part_b_ppl"] > 1 and metrics["unigram_part_b_ppl"] > 1
    for key in (
        "mask_fill_exact_match",
        "mask_fill_first_word_match",
        "mask_fill_known_length_match",
        "unigram_mask_fill_exact_match",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key  # a rate (0 is a real figure: see README)
    pretraining = load_manifest(BUNDLED_CHECKPOINT).extra["pretraining"]
    assert metrics["training_command"] == pretraining["command"] and metrics["training_command"].startswith("glmx ")
    assert metrics["steps"] == pretraining["steps_done"] == pretraining["settings"]["steps"]  # a finished run
    assert f"--steps {metrics['steps']} " in metrics["training_command"]


def test_torch_backend_finds_the_parent_checkpoint_of_the_bundled_export():
    """The parent path is stored relative to the export, so it resolves in any checkout or install."""
    manifest = load_manifest(BUNDLED_MODEL, kind="onnx")
    assert not manifest.parent["path"].startswith("/")
    session = load_torch_session(BUNDLED_MODEL)
    assert session.config.to_dict() == manifest.config
