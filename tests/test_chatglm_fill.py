"""ChatGLM-6B through glmx's runtime on tiny hub folders of both vocabulary revisions (made here: weights by
tests/chatglm_folders.py, the ice_text.model by tests/chatglm_fixtures.py): `glmx fill` greedy token for token
against the independent oracle's full recomputation (tests/oracle_chatglm.py), --append-gmask's ids as HF's
tokenizer lays them out, [MASK] mid-text, a batch against each prompt alone, the older revision as the current one
shifted by 20000, scoring against the oracle's log-probabilities, quantize (every scheme) -> fill, the released
int4 folder -> fill, /v1/completions, and what the manifest records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import oracle_chatglm as oc
from tests.chatglm_fixtures import make_ice_text_model, write_tokenizer_config
from tests.chatglm_folders import chatglm_state_dict, make_chatglm_folder, quantize_like_hf
from tests.test_chatglm_tokenizer import reference_encode

pytest.importorskip("torch")
pytest.importorskip("onnx")
spm = pytest.importorskip("sentencepiece")

LAYERS, HIDDEN, HEADS, TEXT_ROWS = 2, 64, 4, 896  # the tiny tokenizer's ~844 ids fit 896 rows


def _tokenizer(folder: Path, offset: int) -> None:
    make_ice_text_model(folder / "ice_text.model")
    write_tokenizer_config(folder, offset)


def _old_revision(sd: dict) -> None:
    """The pre-2023-04-06 layout of the same model: 20000 image rows in front of the embedding, every text id +20000."""
    current = chatglm_state_dict(LAYERS, HIDDEN, HEADS, TEXT_ROWS, seed=7)
    image = sd["transformer.word_embeddings.weight"][:20000]
    sd.update(current)
    sd["transformer.word_embeddings.weight"] = np.concatenate([image, current["transformer.word_embeddings.weight"]])
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].copy()


def _export(hub: Path, out: Path) -> Path:
    from glm_export.export import export_onnx

    return export_onnx(hub, out, log=lambda m: None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm-fill")
    kw = {"layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "text_vocab": TEXT_ROWS, "tokenizer": _tokenizer}
    current = make_chatglm_folder(root / "chatglm-6b", seed=7, **kw)
    old = make_chatglm_folder(root / "chatglm-6b-old", revision="old", mutate=_old_revision, **kw)
    return {"root": root, "current": current, "old": old, "onnx": _export(current, root / "onnx")}


@pytest.fixture(scope="module")
def model(folders):
    from glm_runtime.session import open_model

    session, tok = open_model(folders["onnx"])
    yield session, tok
    session.close()


@pytest.fixture(scope="module")
def oracle(folders):
    return oc.load_hf_folder(str(folders["current"]))


def _greedy(model, prompts, **settings):
    from glm_runtime.generate import fill_blanks

    session, tok = model
    return fill_blanks(session, tok, prompts, strategy="greedy", **settings)


def _oracle_span(oracle, tok, context: list[int], limit: int) -> list[int]:
    """The oracle's greedy span after context + <sop>; glmx also stops at </s> (eos), so the oracle runs to the
    limit and the comparison takes its first eop/eos."""
    sd, cfg = oracle
    s = tok.special
    out = oc.greedy_generate(sd, cfg, [*context, s["sop"]], s["gMASK"], s["MASK"], s["sop"], s["eop"], limit)
    return out[: out.index(s["eos"])] if s["eos"] in out else out


def test_append_gmask_lays_the_prompt_out_as_hf_and_fills_as_the_oracle(model, oracle, folders):
    session, tok = model
    text = "你好，我们去公园散步吧。"
    sp = spm.SentencePieceProcessor(model_file=str(folders["current"] / "ice_text.model"))
    (result,) = _greedy(model, [text], append_gmask=True, max_new_tokens=10)
    hf_ids = reference_encode(sp, text, 0) + [tok.special["gMASK"], tok.special["sop"]]  # text [gMASK] <sop>
    assert result.tokens[: len(hf_ids)] == hf_ids
    span = result.spans[0]
    assert span.token_ids == _oracle_span(oracle, tok, hf_ids[:-1], 10)[: len(span.token_ids)]
    assert span.blank == "[gMASK]" and span.position == len(hf_ids) - 2


def test_a_mask_mid_text_and_two_blanks_fill_as_the_oracle(model, oracle):
    session, tok = model
    (result,) = _greedy(model, ["今天天气[MASK]，我们去公园。"], max_new_tokens=6)
    context = result.tokens[: result.tokens.index(tok.special["sop"])]
    assert tok.special["gMASK"] not in context and tok.special["ENC"] not in context  # ChatGLM: text alone
    assert result.spans[0].token_ids == _oracle_span(oracle, tok, context, 6)[: len(result.spans[0].token_ids)]


def test_a_batch_fills_as_each_prompt_alone(model):
    prompts = ["你好", "晚上睡不着应该怎么办？可以听音乐。", "Hello world [MASK] test."]
    batched = _greedy(model, prompts, append_gmask=True, max_new_tokens=6)
    for prompt, got in zip(prompts, batched):
        (alone,) = _greedy(model, [prompt], append_gmask=True, max_new_tokens=6)
        assert got.tokens == alone.tokens and got.text == alone.text


def test_the_older_revision_is_the_same_model_shifted_by_20000(model, folders, tmp_path):
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    old_onnx = _export(folders["old"], tmp_path / "old")
    manifest = json.loads((old_onnx / "manifest.json").read_text())
    assert manifest["tokenizer"]["options"]["num_image_tokens"] == 20000
    assert manifest["config"]["vocab_size"] == 20000 + TEXT_ROWS
    (current,) = _greedy(model, ["你好"], append_gmask=True, max_new_tokens=6)
    session, tok = open_model(old_onnx)
    with session:
        (old,) = fill_blanks(session, tok, ["你好"], append_gmask=True, max_new_tokens=6)
    assert old.tokens == [i + 20000 for i in current.tokens]
    assert old.text == current.text


def test_scores_are_the_oracles_log_probabilities(model, oracle):
    from glm_runtime.score import score_candidates

    session, tok = model
    prompt, candidates = "我们去[MASK]散步吧。", ["公园", "语言模型"]
    scores = score_candidates(session, tok, prompt, candidates)
    sd, cfg = oracle
    context = tok.encode(prompt)
    s = tok.special
    for cand, got in zip(candidates, scores):
        answer = tok.encode(cand)
        ids = [*context, s["sop"], *answer]  # teacher-forced: targets are the answer, then <eop>
        pos, mask = oc.chatglm_positions(ids, s["gMASK"], s["MASK"], s["sop"])
        logits = oc.forward(sd, cfg, [ids], pos[None], mask[None])[0][0][len(context) :]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        want = [float(logp[k, t]) for k, t in enumerate([*answer, s["eop"]])]
        assert got.token_ids == answer
        np.testing.assert_allclose(got.logprobs, want, atol=1e-4)


@pytest.mark.parametrize("scheme", ["fp16", "int8-dynamic", "qdq-int8", "int4-weight", "int8-weight"])
def test_every_quantization_scheme_exports_and_fills(scheme, folders, model, tmp_path):
    from glm_export.quantize import quantize_onnx
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    out = quantize_onnx(folders["onnx"], tmp_path / scheme, scheme=scheme, log=lambda m: None)
    session, tok = open_model(out)
    with session:
        (result,) = fill_blanks(session, tok, ["你好"], append_gmask=True, max_new_tokens=4)
    assert json.loads((out / "manifest.json").read_text())["config"]["architecture"] == "chatglm-6b"
    assert (
        result.tokens[: len(result.tokens) - len(result.spans[0].token_ids)]
        == _greedy(model, ["你好"], append_gmask=True, max_new_tokens=1)[0].tokens[:-1]
    )


def test_the_released_int4_folder_exports_and_fills(tmp_path):
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    hub = make_chatglm_folder(
        tmp_path / "chatglm-6b-int4",
        layers=LAYERS,
        hidden=HIDDEN,
        heads=HEADS,
        text_vocab=TEXT_ROWS,
        tokenizer=_tokenizer,
        mutate=lambda sd: quantize_like_hf(sd, 4),
        config_extra={"quantization_bit": 4},
    )
    out = _export(hub, tmp_path / "onnx")
    session, tok = open_model(out)
    with session:
        (result,) = fill_blanks(session, tok, ["你好"], append_gmask=True, max_new_tokens=4)
    assert session.precision == "int4-weight" and len(result.spans) == 1


def test_the_manifest_records_every_choice_the_folder_forced(folders):
    manifest = json.loads((folders["onnx"] / "manifest.json").read_text())
    assert manifest["config"]["architecture"] == "chatglm-6b"
    assert manifest["config"]["rotary_inv_freq"] == "fp16" and manifest["config"]["tokenizer"] == "chatglm"
    arch = manifest["extra"]["architecture"]
    assert arch["alpha"] == pytest.approx(56**0.5) and arch["positions"] == "rotary-2d"
    notes = " | ".join(manifest["extra"]["source"]["notes"])
    for said in ("sqrt(2 x 28)", "fp16-rounded", "lm_head.weight equals the word embedding", "interleaved per head"):
        assert said in notes, (said, notes)
    assert manifest["tokenizer"]["options"]["num_image_tokens"] == 0


def test_completions_are_served_on_chatglm(model):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from glm_runtime.serve import create_app

    with TestClient(create_app(lambda: model, model_id="chatglm", rows=2, max_waiting=4, load_now=True)) as client:
        r = client.post("/v1/completions", json={"prompt": "你好", "max_tokens": 4})
        assert r.status_code == 200, r.text
        (want,) = _greedy(model, ["你好"], append_gmask=True, max_new_tokens=4)
        assert r.json()["choices"][0]["text"] == want.spans[0].text


def test_the_torch_backend_reads_the_export_as_recorded(model, folders):
    """--backend torch on a ChatGLM export: the parent folder's weights, the tokenizer as the manifest records it
    (the revision's offset; the export holds ice_text.model without tokenizer_config.json), the same fill."""
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    session, tok = open_model(folders["onnx"], backend="torch")
    with session:
        (got,) = fill_blanks(session, tok, ["你好"], append_gmask=True, max_new_tokens=5)
    (want,) = _greedy(model, ["你好"], append_gmask=True, max_new_tokens=5)
    assert tok.options["num_image_tokens"] == 0 and got.tokens == want.tokens
