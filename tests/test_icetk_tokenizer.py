"""The "icetk" tokenizer kind (GLM-130B's ice_text.model) and the ChatGLM-6B ice_text.model before 2023-04-06: text
models without the command, tab, blank and byte pieces, which glm_runtime.ice_text appends to the model's bytes.

The reference here is written again from the original code (chatglm_v1_spec.md 6; the remote code's and GLM-130B's
`_configure_tokenizer`, then its encode / decode): the pieces appended with the protobuf classes sentencepiece
ships, the text rules on the plain sentencepiece package, every id + 20000. Models: tests/icetk_fixtures.py's tiny
one, and one of GLM-130B's real size (130000 text pieces) for the absolute ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from glm_runtime.architecture import GLM_130B
from glm_runtime.config import get_preset
from glm_runtime.ice_text import append_pieces
from glm_runtime.requests import decode_text
from glm_runtime.tokenizer import TokenizerError, build_context_ids, load_tokenizer, tokenizer_entry
from glm_runtime.tokenizer_folder import load_recorded_tokenizer, resolve_tokenizer
from tests.icetk_fixtures import make_icetk_text_model

IMAGE = 20000  # icetk's image tokens: every text id is shifted by this
COMMANDS = {
    "icetk": ["[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"],
    "chatglm": ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"],
}
NAMES = {"MASK": 0, "gMASK": 1, "sMASK": 2, "sop": 4, "eop": 5, "ENC": 6, "dBLOCK": 7}  # offset in the block
TEXTS = [
    "你好",
    "hello world",
    "a\nb",
    "\n\nstarts with two newlines",
    "ends with a newline\n",
    "tab\there",
    "\t\tleading tabs",
    *(f"x{' ' * n}y" for n in (1, 2, 3, 79, 80, 81, 85, 160, 161, 200)),
    " " * 85,
    "  two leading spaces",
    "trailing spaces  ",
    "mixed 中文 and English\n\t  代码",
    "emoji 👋 and 🙂: byte fallback",
    "龍 is not in the corpus, nor is é or ß",
    "def main():\n    print('hello world')\t# greeting",
    "digits 1234567890",
    "你好👋！我是人工智能助手 GLM-130B，很高兴见到你。",
]


# ---------------------------------------------------------------- the reference, written from the original code


def configured(model: bytes, kind: str) -> bytes:
    """_configure_tokenizer(text_tokenizer, special_tokens, max_blank_length=80, byte_fallback=True) on the proto."""
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    for token in COMMANDS[kind]:
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=token, score=0.0, type=3))  # CONTROL
    for token in ["<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]:
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=token, score=0.0, type=4))  # USER_DEFINED
    proto.trainer_spec.byte_fallback = True
    for i in range(256):
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=f"<0x{i:02X}>", score=0.0, type=6))  # BYTE
    return proto.SerializeToString()


def reference_encode(sp, text: str) -> list[int]:
    """GLM130BTokenizer.encode: <n>, tab, spaces 80 down to 2, SentencePiece, + the image tokens."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for i in range(80, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return [x + IMAGE for x in sp.encode(text)]


def reference_decode(sp, ids: list[int]) -> str:
    text = sp.decode([i - IMAGE for i in ids]).replace("<n>", "\n").replace("<|tab|>", "\t")
    for i in range(2, 81):
        text = text.replace(f"<|blank_{i}|>", " " * i)
    return text


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value), str(exc.value)
    return str(exc.value)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_icetk_text_model(tmp_path_factory.mktemp("icetk") / "ice_text.model")


@pytest.fixture(scope="module")
def ref(model):
    """The reference processor: the text model configured by the protobuf classes."""
    return spm.SentencePieceProcessor(model_proto=configured(model.read_bytes(), "icetk"))


@pytest.fixture(scope="module")
def tok(model):
    return load_tokenizer(model, kind="icetk")


@pytest.fixture(scope="module")
def full_size(tmp_path_factory, model) -> Path:
    """GLM-130B's size: the tiny text model filled up to 130000 pieces (never-matching normal pieces)."""
    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.pieces.extend(
        pb.ModelProto.SentencePiece(piece=f"\ue000{k}", score=-50.0, type=1) for k in range(130000 - len(proto.pieces))
    )
    path = tmp_path_factory.mktemp("icetk-full") / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    return path


# ---------------------------------------------------------------- the appended block and its ids


def test_the_appended_model_is_the_one_configure_tokenizer_makes(model, ref):
    plain = spm.SentencePieceProcessor(model_file=str(model))
    assert all(plain.piece_to_id(p) == plain.unk_id() for p in ["[MASK]", "<|tab|>", "<0x00>"])  # none inside
    edited, want = pb.ModelProto(), pb.ModelProto()
    edited.ParseFromString(append_pieces(model.read_bytes(), "icetk"))  # glm_runtime's wire-format edit
    want.ParseFromString(configured(model.read_bytes(), "icetk"))
    assert edited == want  # every piece, score, type and the trainer spec's byte_fallback
    ours = spm.SentencePieceProcessor(model_proto=append_pieces(model.read_bytes(), "icetk"))
    assert ours.get_piece_size() == ref.get_piece_size() == plain.get_piece_size() + 344
    for i in range(ref.get_piece_size()):
        got = (ours.id_to_piece(i), ours.is_control(i), ours.is_byte(i), ours.is_unknown(i), ours.get_score(i))
        want = (ref.id_to_piece(i), ref.is_control(i), ref.is_byte(i), ref.is_unknown(i), ref.get_score(i))
        assert got == want, i


def test_ids_match_the_reference_rules(tok, ref):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference_encode(ref, text), text
        assert tok.decode(ids) == reference_decode(ref, ids) == text, text


def test_special_ids_follow_the_text_model_and_the_image_tokens(tok, model):
    n = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    first = IMAGE + n
    assert {name: tok.special[name] - first for name in NAMES} == NAMES
    assert (tok.special["unk"], tok.special["eos"], tok.special["pad"]) == (20000, 20002, 20003)
    assert tok.command_strings["eos"] == "</s>" and tok.command_strings["sop"] == "<sop>"
    assert tok.mask_ids == (tok.special["MASK"], tok.special["sMASK"], tok.special["gMASK"])
    assert tok.id_to_token(first + 3) == "<eod>"  # GLM-130B's name; ChatGLM's <unused_0>
    assert (tok.token_to_id("<|tab|>"), tok.token_to_id("<|blank_80|>"), tok.token_to_id("<0xFF>")) == (
        first + 8,
        first + 87,
        first + 343,
    )
    assert tok.vocab_size == first + 344 and tok.token_to_id("<n>") == 20004
    assert tok.options == {"num_image_tokens": IMAGE, "pieces_appended": True}
    assert tok.prompt == GLM_130B.prompt


def test_glm_130b_sized_text_model_gives_the_released_ids(full_size):
    big = load_tokenizer(full_size, kind="icetk")
    assert {name: big.special[name] for name in (*NAMES, "eos")} == {
        "MASK": 150000,
        "gMASK": 150001,
        "sMASK": 150002,
        "sop": 150004,
        "eop": 150005,
        "ENC": 150006,
        "dBLOCK": 150007,
        "eos": 20002,
    }
    assert big.token_to_id("<eod>") == 150003 and big.token_to_id("<|tab|>") == 150008
    assert big.token_to_id("<|blank_2|>") == 150009 and big.vocab_size == 150344
    # 👋 as bytes F0 9F 91 8B: the ids the spec reads off ChatGLM-6B's test, + 20000
    assert big.encode("👋")[1:] == [150328, 150247, 150233, 150227]
    got, notes = resolve_tokenizer(full_size, config=get_preset("glm-130b"))  # V 150528: 150344 padded, not to 128
    assert got.kind == "icetk" and notes[0].endswith("the model's architecture is glm-130b)")
    assert any("appended at load" in note for note in notes) and any("20000 (icetk's" in note for note in notes)


def test_whitespace_rules_and_byte_fallback(tok):
    def pieces(text):
        return [tok.id_to_token(i) for i in tok.encode(text)]

    assert [p for p in pieces("a" + " " * 85 + "b") if p.startswith("<|")] == ["<|blank_80|>", "<|blank_5|>"]
    assert [p for p in pieces("a" + " " * 200 + "b") if p.startswith("<|")] == ["<|blank_80|>"] * 2 + ["<|blank_40|>"]
    assert "<n>" in pieces("a\nb") and "<|tab|>" in pieces("a\tb")
    assert pieces("龍")[1:] == ["<0xE9>", "<0xBE>", "<0x8D>"]  # not in the corpus: its UTF-8 bytes
    assert tok.decode(tok.encode("🙂 龍")) == "🙂 龍"


def test_ids_below_20000_are_image_tokens_refused_by_decode_and_dropped_from_shown_text(tok):
    with pytest.raises(TokenizerError, match=r"id 19999 is not a token.*below num_image_tokens = 20000 are image"):
        tok.id_to_token(IMAGE - 1)
    with pytest.raises(TokenizerError, match=r"id 7 is not a token.*image tokens") as exc:
        tok.decode([*tok.encode("你好"), 7])
    one_line(exc)
    assert decode_text(tok, [0, *tok.encode("你好"), 19999, tok.vocab_size]) == "你好"  # what fill / serve show


def test_commands_in_text_and_the_glm_130b_context(tok):
    s = tok.special
    assert tok.encode("你好[gMASK]") == [*tok.encode("你好"), s["gMASK"]]
    assert tok.decode([s["MASK"], *tok.encode("好"), s["eop"], s["eos"]]) == "[MASK]好<eop></s>"
    # GLM-130B's generate.py: </s> closes a text that does not end in a blank; none after a final blank
    assert build_context_ids(tok, "问 [MASK] 答") == [*tok.encode("问[MASK] 答"), 20002]
    assert build_context_ids(tok, "你好 [gMASK]") == [*tok.encode("你好"), s["gMASK"]]


# ---------------------------------------------------------------- ChatGLM-6B's file before 2023-04-06


def test_the_old_chatglm_file_reads_as_the_current_one_plus_20000(model, tmp_path):
    current = tmp_path / "current" / "ice_text.model"  # what THUDM shipped on 2023-04-06: the same block, inside
    current.parent.mkdir()
    current.write_bytes(configured(model.read_bytes(), "chatglm"))
    now = load_tokenizer(current, "chatglm", num_image_tokens=0)
    old = load_tokenizer(model, "chatglm")  # no tokenizer_config.json: a file without the block is the old revision
    assert old.options == {"num_image_tokens": 20000, "pieces_appended": True} and now.options == {
        "num_image_tokens": 0
    }
    for text in TEXTS:
        assert old.encode(text) == [i + IMAGE for i in now.encode(text)], text
        assert old.decode(old.encode(text)) == text
    assert old.special == {name: i + IMAGE for name, i in now.special.items()}
    assert old.vocab_size == now.vocab_size + IMAGE and old.id_to_token(old.special["MASK"] + 3) == "<unused_0>"
    icetk = load_tokenizer(model, "icetk")  # the same text model: GLM-130B's ids are the old ChatGLM-6B's
    assert icetk.special == old.special and all(icetk.encode(t) == old.encode(t) for t in TEXTS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    (tmp_path / "ice_text.model").write_bytes(model.read_bytes())
    assert load_tokenizer(tmp_path, "chatglm").options["num_image_tokens"] == 20000  # no key: the default


def test_files_that_are_neither_are_refused_in_one_line(model, tmp_path):
    current = tmp_path / "current.model"
    current.write_bytes(configured(model.read_bytes(), "chatglm"))
    with pytest.raises(TokenizerError, match=r"ChatGLM-6B's current ice_text.model.*use kind 'chatglm'") as exc:
        load_tokenizer(current, "icetk")
    one_line(exc)
    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.pieces.append(pb.ModelProto.SentencePiece(piece="[MASK]", score=0.0, type=3))
    partial = tmp_path / "partial.model"
    partial.write_bytes(proto.SerializeToString())
    for kind in ("icetk", "chatglm"):
        with pytest.raises(TokenizerError, match=r"holds 1 of the 344 pieces .* lacking \[gMASK\]") as exc:
            load_tokenizer(partial, kind)
        one_line(exc)
    with pytest.raises(TokenizerError, match=r"needs an explicit kind.*'icetk' for GLM-130B's") as exc:
        load_tokenizer(model)
    one_line(exc)
    with pytest.raises(TokenizerError, match=r"do not apply to a icetk tokenizer"):
        load_tokenizer(model, "icetk", task_mask=True)
    with pytest.raises(TokenizerError, match=r"has 20\d+ ids, but the model has 1024 embedding rows") as exc:
        resolve_tokenizer(model, kind="icetk", config=SimpleNamespace(vocab_size=1024))
    one_line(exc)


# ---------------------------------------------------------------- export folders


def test_saved_and_recorded_through_an_export_folders_tokenizer_files(tok, model, tmp_path):
    (tmp_path / "export").mkdir()
    entry = tokenizer_entry(tok, tmp_path / "export")
    assert (entry["kind"], entry["file"], list(entry["files"])) == ("icetk", "ice_text.model", ["ice_text.model"])
    assert entry["options"] == {"num_image_tokens": IMAGE, "pieces_appended": True}
    assert entry["special_tokens"]["MASK"] == tok.special["MASK"] and entry["vocab_size"] == tok.vocab_size
    assert (tmp_path / "export" / "ice_text.model").read_bytes() == model.read_bytes()  # the text model, as given
    again = load_recorded_tokenizer(tmp_path / "export", entry)
    assert (again.kind, again.special, again.options) == (tok.kind, tok.special, tok.options)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    with pytest.raises(TokenizerError, match=r"special ids .* differ from those its manifest recorded"):
        load_recorded_tokenizer(tmp_path / "export", {**entry, "options": {"num_image_tokens": 0}})
    saved = tok.save(tmp_path / "saved")
    assert load_tokenizer(saved).kind == "icetk" and load_tokenizer(saved).special == tok.special
    got, notes = resolve_tokenizer(saved, config=get_preset("glm-130b-tiny"))
    assert got.special == tok.special and "recorded in" in notes[0]
