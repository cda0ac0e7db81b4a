"""A P-tuned ChatGLM-6B through glmx's text runtime (tests/test_ptuning.py covers the export, the graph and the cache
with token ids): a tiny hub folder with its ice_text.model and a P-tuning checkpoint in the official format, exported
with --ptuning; `fill_blanks` greedy token for token against the oracle's full recomputation with the prefix,
sample and beam the same on ONNX Runtime and the torch reference, scores against the oracle's log-probabilities, a
request joining a running pool of the engine (what `glmx serve` runs), /v1/completions, and quantize carrying the
prefix over to its child, optimize too (its parity check, whole or one layer at a time, with the prefix)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import oracle_chatglm as oc
from tests.chatglm_fixtures import make_ice_text_model, write_tokenizer_config
from tests.chatglm_folders import make_chatglm_folder
from tests.test_ptuning import encoder_weights, make_ptuning_folder

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("sentencepiece")

LAYERS, HIDDEN, HEADS, TEXT_ROWS, P = 2, 64, 4, 896, 6  # the tiny tokenizer's ~844 ids fit 896 rows
PROMPTS = ["你好", "晚上睡不着应该怎么办？可以听音乐。"]


def _tokenizer(folder: Path, offset: int) -> None:
    make_ice_text_model(folder / "ice_text.model")
    write_tokenizer_config(folder, offset)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from glm_export.export import export_onnx

    root = tmp_path_factory.mktemp("ptuning-fill")
    kw = {"layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "text_vocab": TEXT_ROWS, "tokenizer": _tokenizer}
    hub = make_chatglm_folder(root / "chatglm-6b", seed=7, **kw)
    sd = encoder_weights(True, pre_seq_len=P, layers=LAYERS, hidden=HIDDEN, seed=11)
    pt = make_ptuning_folder(root / "checkpoint-3000", hub, sd, pre_seq_len=P, projection=True)
    onnx = export_onnx(hub, root / "onnx", ptuning=pt, log=lambda m: None)
    return {"root": root, "hub": hub, "onnx": onnx, "encoder": sd}


@pytest.fixture(scope="module")
def model(folders):
    from glm_runtime.session import open_model

    session, tok = open_model(folders["onnx"])
    yield session, tok
    session.close()


@pytest.fixture(scope="module")
def oracle(folders):
    sd, cfg = oc.load_hf_folder(str(folders["hub"]))
    return sd, cfg, oc.prefix_from_ptuning(folders["encoder"], cfg, P, True)


def _fill(model, prompts, **settings):
    from glm_runtime.generate import fill_blanks

    session, tok = model
    return fill_blanks(session, tok, prompts, append_gmask=True, **settings)


def _oracle_span(oracle, tok, context: list[int], limit: int, prefix=True) -> list[int]:
    """The oracle's greedy span after context + <sop>, cut at the first eos too (glmx stops at eop and eos)."""
    sd, cfg, pre = oracle
    s = tok.special
    ids = [*context, s["sop"]]
    out = oc.greedy_generate(
        sd, cfg, ids, s["gMASK"], s["MASK"], s["sop"], s["eop"], limit, prefix=pre if prefix else None
    )
    return out[: out.index(s["eos"])] if s["eos"] in out else out


def test_greedy_fill_equals_the_oracle_with_the_prefix(model, oracle):
    session, tok = model
    for result in _fill(model, PROMPTS, strategy="greedy", max_new_tokens=8):
        context = result.tokens[: result.tokens.index(tok.special["sop"])]
        want = _oracle_span(oracle, tok, context, 8)
        assert result.spans[0].token_ids == want, (result.spans[0].token_ids, want)
    plain = _oracle_span(oracle, tok, context, 8, prefix=False)
    assert plain != want  # the prefix steers the fill


@pytest.mark.parametrize(
    "settings",
    [{"strategy": "sample", "seed": 5, "temperature": 0.8}, {"strategy": "beam", "num_beams": 3}],
    ids=["sample", "beam"],
)
def test_sample_and_beam_agree_on_onnxruntime_and_the_torch_reference(model, folders, settings):
    """The torch reference (the hub checkpoint's GLMModel) given the export's prefix: the same tokens. (Opened as
    `--backend torch` on the export itself, a ChatGLM export with a tokenizer cannot be read yet: its ice_text.model
    has no tokenizer_config.json beside it; tests/test_ptuning.py opens a tokenizer-less export that way.)"""
    from glm_export.checkpoint import load_checkpoint
    from glm_export.reference_session import TorchSession

    session, tok = model
    got = _fill(model, PROMPTS, max_new_tokens=6, **settings)
    loaded = load_checkpoint(folders["hub"])
    with TorchSession(loaded.model, loaded.config, prefix=session.prefix) as reference:
        want = _fill((reference, tok), PROMPTS, max_new_tokens=6, **settings)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_scores_are_the_oracles_log_probabilities_with_the_prefix(model, oracle):
    from glm_runtime.score import score_candidates

    session, tok = model
    prompt, candidates = "我们去[MASK]散步吧。", ["公园", "语言模型"]
    scores = score_candidates(session, tok, prompt, candidates)
    sd, cfg, prefix = oracle
    context, s = tok.encode(prompt), tok.special
    for cand, got in zip(candidates, scores):
        answer = tok.encode(cand)
        ids = [*context, s["sop"], *answer]  # teacher-forced: the targets are the answer, then <eop>
        pos, mask = oc.chatglm_positions(ids, s["gMASK"], s["MASK"], s["sop"])
        logits = oc.forward(sd, cfg, [ids], pos[None], mask[None], prefix=prefix)[0][0][len(context) :]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        want = [float(logp[k, t]) for k, t in enumerate([*answer, s["eop"]])]
        np.testing.assert_allclose(got.logprobs, want, atol=1e-4)


def test_a_request_joining_a_running_pool_fills_as_it_does_alone(model):
    """The engine `glmx serve` runs: the second request joins after the first ran two decode calls (its own
    context pass, then cache.load_rows into a row whose first slots hold the prefix)."""
    from glm_runtime.engine import Engine
    from glm_runtime.requests import FillRequest

    session, tok = model
    alone = [r.tokens for r in _fill(model, PROMPTS, strategy="greedy", max_new_tokens=6)]
    engine = Engine(session, tok, rows=2)
    first = engine.submit(FillRequest.make(PROMPTS[0], max_new_tokens=6, append_gmask=True))
    engine.step()
    engine.step()
    assert first.state == "running"
    second = engine.submit(FillRequest.make(PROMPTS[1], max_new_tokens=6, append_gmask=True))
    engine.run_until_done()
    assert first.result is not None and second.result is not None
    assert [first.result.tokens, second.result.tokens] == alone


def test_completions_are_served_with_the_prefix(model):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from glm_runtime.serve import create_app

    with TestClient(create_app(lambda: model, model_id="chatglm-pt", rows=2, max_waiting=4, load_now=True)) as client:
        r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4})
        assert r.status_code == 200, r.text
        (want,) = _fill(model, PROMPTS[:1], strategy="greedy", max_new_tokens=4)
        assert r.json()["choices"][0]["text"] == want.spans[0].text


@pytest.mark.parametrize("check", ["whole", "piecewise"])
def test_optimize_carries_the_prefix_over_and_checks_with_it(folders, tmp_path, check):
    from glm_export.optimize import optimize_onnx
    from glm_runtime.session import open_model

    out = optimize_onnx(folders["onnx"], tmp_path / "fused", check=check, log=lambda m: None)
    child = json.loads((out / "manifest.json").read_text())
    assert child["extra"]["ptuning"]["pre_seq_len"] == P and "prefix.safetensors" in child["files"]
    assert child["parity"]["passed"] and ("piecewise" in child["parity"]["method"]) == (check == "piecewise")
    session, _ = open_model(out)
    with session:
        assert session.prefix is not None and session.prefix.length == P


def test_quantize_carries_the_prefix_over_hashed(model, folders, tmp_path):
    """The child holds the same prefix bytes, hashed in its own manifest, and its parity check ran with them on both
    sides (the structural check passes; int8's loss on text is recorded, accepted here: the test's prefix values of
    ~10 are hard on dynamic int8 activations)."""
    from glm_export.quantize import quantize_onnx
    from glm_runtime.session import open_model

    out = quantize_onnx(folders["onnx"], tmp_path / "int8", scheme="int8-dynamic", accept_loss=True, log=lambda m: None)
    parent = json.loads((folders["onnx"] / "manifest.json").read_text())
    child = json.loads((out / "manifest.json").read_text())
    assert child["extra"]["ptuning"] == parent["extra"]["ptuning"]
    assert child["files"]["prefix.safetensors"] == parent["files"]["prefix.safetensors"]
    assert (out / "prefix.safetensors").read_bytes() == (folders["onnx"] / "prefix.safetensors").read_bytes()
    assert not [f for f in child["parity"]["failures"] if not f.startswith("text: ")]
    session, tok = open_model(out)
    with session:
        assert session.prefix is not None and session.prefix.length == P
        (got,) = _fill((session, tok), PROMPTS[:1], strategy="greedy", max_new_tokens=4)
    assert got.spans[0].token_ids
