"""ChatGLM-6B's chat on a tiny hub folder (weights: tests/chatglm_folders.py, ice_text.model:
tests/chatglm_fixtures.py): `glmx chat --jsonl` over three rounds builds the template's ids exactly (the template
written here from chatglm_v1_spec.md 7, tokenized by the independent rules of tests/test_chatglm_tokenizer.py) and
answers greedy
token for token as the numpy oracle recomputes; the history that no longer fits drops its oldest rounds and says
so; POST /v1/chat/completions answers what glmx chat answers, streamed or not, and refuses what it does not do;
a model that is not a chat model is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import oracle_chatglm as oc
from tests.chatglm_fixtures import COMMANDS, make_ice_text_model, write_tokenizer_config
from tests.chatglm_folders import make_chatglm_folder
from tests.test_chatglm_tokenizer import reference_encode

pytest.importorskip("torch")
pytest.importorskip("onnx")
spm = pytest.importorskip("sentencepiece")

QUESTIONS = ["你好", "晚上睡不着应该怎么办？", "Hello, how are you?"]


def _tokenizer(folder: Path, offset: int) -> None:
    make_ice_text_model(folder / "ice_text.model")
    write_tokenizer_config(folder, offset)


def _no_commands(root: Path):
    """Zero the embedding rows of the command pieces: the random model then never answers with <sop> or [MASK],
    whose strings a later round's prompt would carry as text (a real answer holds none)."""
    sp = spm.SentencePieceProcessor(model_file=str(make_ice_text_model(root / "probe.model")))
    rows = [sp.piece_to_id(p) for p in COMMANDS]

    def mutate(sd):
        for key in ("transformer.word_embeddings.weight", "lm_head.weight"):
            sd[key][rows] = 0

    return mutate


def _folder(root: Path, name: str, **config) -> tuple[Path, Path]:
    from glm_export.export import export_onnx

    hub = make_chatglm_folder(
        root / name, seed=11, text_vocab=896, tokenizer=_tokenizer, mutate=_no_commands(root), config_extra=config
    )
    return hub, export_onnx(hub, root / f"{name}-onnx", log=lambda m: None)


@pytest.fixture(scope="module")
def chatglm(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("chat"), "chatglm-6b")


def glmx(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from glm_runtime.cli import run; run()", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def template(rounds: list[tuple[str, str]], question: str) -> str:
    """chat()'s prompt (spec 7), written out again here."""
    if not rounds:
        return question
    text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(rounds))
    return text + f"[Round {len(rounds)}]\n问：{question}\n答："


def test_three_rounds_build_the_template_and_answer_as_the_oracle(chatglm):
    hub, onnx = chatglm
    lines = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS)
    run = glmx("chat", "--model", str(onnx), "--jsonl", "--temperature", "0", "--max-new-tokens", "6", stdin=lines)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    sp = spm.SentencePieceProcessor(model_file=str(hub / "ice_text.model"))
    sd, cfg = oc.load_hf_folder(str(hub))
    gmask, mask, sop, eop = (sp.piece_to_id(p) for p in ("[gMASK]", "[MASK]", "<sop>", "<eop>"))
    rounds: list[tuple[str, str]] = []
    for question, record in zip(QUESTIONS, records):
        ids = reference_encode(sp, template(rounds, question), 0) + [gmask, sop]
        assert record["tokens"] == ids, (question, rounds)
        want = oc.greedy_generate(sd, cfg, ids, gmask, mask, sop, eop, 6)
        assert record["answer_tokens"] == want[: len(record["answer_tokens"])] and record["answer_tokens"]
        rounds.append((question, record["answer"]))


def test_a_history_that_no_longer_fits_drops_its_oldest_rounds_and_says_so(tmp_path):
    _, onnx = _folder(tmp_path, "short", max_sequence_length=48)
    questions = ["今天天气很好，我们去公园散步吧。"] * 4
    lines = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    run = glmx("chat", "--model", str(onnx), "--jsonl", "--temperature", "0", "--max-new-tokens", "4", stdin=lines)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert any(r["dropped_rounds"] for r in records), records
    assert "oldest" in run.stderr and "dropped" in run.stderr
    for r in records:
        assert len(r["tokens"]) + 4 <= 48


def test_a_model_that_is_not_a_chat_model_is_one_line():
    run = glmx("chat", "--jsonl", stdin='"hello"\n')  # the bundled GLM
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert "not a chat model" in run.stderr


def test_chat_completions_answer_what_glmx_chat_answers(chatglm):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from glm_runtime.chat_cli import Turns
    from glm_runtime.serve import create_app
    from glm_runtime.session import open_model

    session, tok = open_model(chatglm[1])
    rule = session.config.arch.chat
    turns = Turns(session, tok, rule, None, 5, {"strategy": "greedy"})
    want = [turns.ask(q, lambda t: None)["answer"] for q in QUESTIONS[:2]]
    messages = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": want[0]},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    with TestClient(create_app(lambda: (session, tok), model_id="chatglm", rows=2, load_now=True)) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == want[1]
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        r = client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0, "stream": True}
        )
        chunks = [c[len("data: ") :] for c in r.text.split("\n\n") if c.strip()]
        assert chunks[-1] == "[DONE]"
        parsed = [json.loads(c) for c in chunks[:-1]]
        assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed) == want[1]
        assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        for body, field in (
            ({"messages": messages, "n": 2}, "n=2"),
            ({"messages": messages, "tools": [{"type": "function"}]}, "tools="),
            ({"messages": messages, "logprobs": True}, "logprobs=true"),
            ({"messages": messages[:2]}, "the last message must be the user's question"),
            ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] must be"),
            ({"messages": messages, "temperature": "hot"}, '"temperature" must be a number'),
            ({"messages": messages, "max_tokens": 0}, "max_tokens must be an integer >= 1"),
            ({"messages": messages, "temperature": 0, "seed": 3}, "temperature 0 means greedy"),
        ):
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and field in r.json()["error"]["message"], (body, r.text)
    session.close()


def test_chat_completions_on_a_model_that_is_not_a_chat_model_answer_400():
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from glm_runtime.serve import create_app
    from glm_runtime.session import open_model

    with TestClient(create_app(lambda: open_model(None), model_id="glmx", rows=2, load_now=True)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "not a chat model" in r.json()["error"]["message"]


def test_the_answer_is_post_processed_as_chat_does_and_streams_without_taking_back():
    from glm_runtime.chat import AnswerStream, process_response

    raw = "  你好,我是 ChatGLM!很高兴见到你:[[训练时间]]发布? ok, fine  "
    assert process_response(raw) == "你好，我是 ChatGLM！很高兴见到你：2023年发布？ ok, fine"
    for cut in range(1, 6):  # any split into pieces: the shown text only grows, and ends as the whole answer
        stream, shown = AnswerStream(), ""
        for k in range(0, len(raw), cut):
            piece = stream.add(raw[k : k + cut])
            shown += piece
            assert process_response(raw).startswith(shown)
        shown += stream.end()
        assert shown == process_response(raw)
