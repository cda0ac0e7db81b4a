"""The "chatglm" tokenizer kind (ChatGLM-6B's ice_text.model, chatglm_v1_spec.md 6) against an independent
implementation of its text rules written here on the sentencepiece package alone, on a tiny model trained once by
tests/chatglm_fixtures.py with the real piece layout: ids in both revisions (num_image_tokens 0 and 20000), round
trips, command ids, one-line errors, loading from a hub folder and from a manifest entry, and what a stream shows
of a character that arrives as byte pieces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm

from glm_runtime.generate import fill_blanks
from glm_runtime.requests import decode_text
from glm_runtime.tokenizer import TokenizerError, build_context_ids, find_blanks, load_tokenizer, tokenizer_entry
from glm_runtime.tokenizer_folder import load_recorded_tokenizer, resolve_tokenizer
from tests.chatglm_fixtures import make_ice_text_model, write_tokenizer_config
from tests.fill_fixtures import ScriptedSession, tiny_config

OLD = 20000  # num_image_tokens before 2023-04-06 (and GLM-130B's icetk)
CHATGLM_STRINGS = {
    "pad": "<pad>",
    "eos": "</s>",
    "ENC": "<ENC>",
    "MASK": "[MASK]",
    "unk": "<unk>",
    "sop": "<sop>",
    "eop": "<eop>",
    "gMASK": "[gMASK]",
    "sMASK": "[sMASK]",
    "dBLOCK": "<dBLOCK>",
}
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
    " one leading space",
    "trailing spaces  ",
    "mixed 中文 and English\n\t  代码",
    "emoji 👋 and 🙂: byte fallback",
    "龍 is not in the corpus, nor is é or ß",
    "def main():\n    print('hello world')\t# greeting",
    "digits 1234567890",
    "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你。",
]


# ---------------------------------------------------------------- the rules, written again from the spec (HF's order)


def reference_encode(sp, text: str, offset: int) -> list[int]:
    """SPTokenizer.encode: newline, tab, then runs of spaces replaced longest first, SentencePiece, + the offset."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return [i + offset for i in sp.encode(text)]


def reference_decode(sp, ids: list[int], offset: int) -> str:
    text = sp.decode([i - offset for i in ids])
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, 81):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


def stream_texts(tok, ids: list[int]) -> list[str]:
    """What a stream should show after each id of a span: the decoded span's new characters, held back while the
    span ends inside a character (its byte pieces so far decode to U+FFFD)."""
    shown, out = "", []
    for k in range(1, len(ids) + 1):
        text = decode_text(tok, ids[:k])
        if text.endswith("\ufffd"):
            out.append("")
            continue
        assert text.startswith(shown), (text, shown)  # what the rule relies on: decoding more never edits the past
        new = text[len(shown) :]
        shown += new
        out.append(new)
    return out


# ---------------------------------------------------------------- fixtures: one tiny model for the module


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chatglm")
    make_ice_text_model(folder / "ice_text.model")
    write_tokenizer_config(folder, 0)
    return folder


@pytest.fixture(scope="module")
def sp(hub):
    return spm.SentencePieceProcessor(model_file=str(hub / "ice_text.model"))


@pytest.fixture(scope="module")
def tok(hub):
    return load_tokenizer(hub, "chatglm")


@pytest.fixture(scope="module")
def old(hub):
    return load_tokenizer(hub, "chatglm", num_image_tokens=OLD)


def _bare(folder: Path, hub: Path) -> Path:
    """ice_text.model alone, without tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ice_text.model").write_bytes((hub / "ice_text.model").read_bytes())
    return folder


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize("offset", [0, OLD], ids=["current", "before-2023-04-06"])
def test_ids_match_the_independent_rules_in_both_revisions(hub, sp, offset):
    tok = load_tokenizer(hub, "chatglm", num_image_tokens=offset)
    assert tok.options == {"num_image_tokens": offset}
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference_encode(sp, text, offset), text
        assert tok.decode(ids) == reference_decode(sp, ids, offset), text


def test_the_older_revision_is_the_current_one_shifted_by_exactly_20000(tok, old):
    for text in TEXTS:
        assert old.encode(text) == [i + OLD for i in tok.encode(text)], text
    assert old.special == {name: i + OLD for name, i in tok.special.items()}
    assert old.vocab_size == tok.vocab_size + OLD


def _pieces(tok, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text)]


def test_whitespace_pieces_newline_tab_and_runs_of_spaces_longest_first(tok):
    def whitespace(text):
        return [p for p in _pieces(tok, text) if p in ("<n>", "<|tab|>") or p.startswith("<|blank_")]

    assert whitespace("a" + " " * 85 + "b") == ["<|blank_80|>", "<|blank_5|>"]
    assert whitespace("a" + " " * 200 + "b") == ["<|blank_80|>", "<|blank_80|>", "<|blank_40|>"]
    assert whitespace("a" + " " * 80 + "b") == ["<|blank_80|>"]
    assert whitespace("a  b") == ["<|blank_2|>"]
    assert whitespace("a b") == []  # one space stays SentencePiece's ▁
    pieces = _pieces(tok, "a" + " " * 81 + "b")  # 81: blank_80, then a plain space (the ▁ of the next piece)
    assert pieces[pieces.index("<|blank_80|>") + 1].startswith("▁")
    assert whitespace("a\n\tb") == ["<n>", "<|tab|>"]
    assert _pieces(tok, "你好")[0] == "▁"  # the dummy prefix as its own piece, as the real "你好" -> 5, 74874


def test_byte_fallback_gives_the_utf8_bytes(tok, sp):
    ids = tok.encode("👋")
    assert [tok.id_to_token(i) for i in ids[1:]] == ["<0xF0>", "<0x9F>", "<0x91>", "<0x8B>"]
    assert tok.decode(ids) == "👋"


def test_round_trips_and_the_cases_that_cannot(tok, old):
    for t in (tok, old):
        for text in TEXTS:
            assert t.decode(t.encode(text)) == text, text
    # This model normalizes nothing (identity rule, no whitespace squeezing), so leading and trailing spaces come
    # back; the real ice_text.model's normalizer was not checked. What no ChatGLM tokenizer gives back: its own
    # piece strings typed as text, SentencePiece's ▁, and whitespace right before a blank (dropped, as in GLM).
    cannot = {
        "a<n>b": "a\nb",
        "a<|tab|>b": "a\tb",
        "a<|blank_3|>b": "a   b",
        "a▁b": "a b",
        "a \n[MASK] b": "a[MASK] b",
        "[gMASK]  x": "[gMASK]  x",  # after a command, the next segment's spaces stay
    }
    assert {text: tok.decode(tok.encode(text)) for text in cannot} == cannot


# ---------------------------------------------------------------- command tokens


def test_special_ids_are_the_models_pieces_plus_the_offset(tok, old, sp):
    for t, offset in ((tok, 0), (old, OLD)):
        assert t.special == {name: sp.piece_to_id(s) + offset for name, s in CHATGLM_STRINGS.items()}
        assert t.command_strings == CHATGLM_STRINGS
        assert t.mask_ids == (t.special["MASK"], t.special["sMASK"], t.special["gMASK"])
        assert t.vocab_size == offset + sp.get_piece_size()
    # the fixture's layout is the real one's (spec 6 table): [MASK]=130000 -> these offsets from it
    m = tok.special["MASK"]
    assert [tok.special[n] - m for n in ("gMASK", "sMASK", "sop", "eop", "ENC", "dBLOCK")] == [1, 2, 4, 5, 6, 7]
    assert (tok.special["unk"], tok.special["eos"], tok.special["pad"]) == (0, 2, 3)
    assert (tok.token_to_id("<n>"), tok.token_to_id("▁")) == (4, 5)
    assert tok.token_to_id("<|tab|>") - m == 8 and tok.token_to_id("<0x00>") - m == 88 and tok.vocab_size - m == 344


def test_command_strings_typed_in_text_are_command_ids(tok, old):
    for t in (tok, old):
        s = t.special
        assert t.encode("你好[gMASK]<sop>") == t.encode("你好") + [s["gMASK"], s["sop"]]
        assert t.encode("[MASK]</s><eop><pad><unk><ENC>") == [s[n] for n in ("MASK", "eos", "eop", "pad", "unk", "ENC")]
        assert t.encode("你好 \n[MASK]") == t.encode("你好[MASK]")  # whitespace before a blank is dropped
        assert t.encode("你好 <sop>") == t.encode("你好 ") + [s["sop"]]  # and kept before any other command
        assert t.decode([s["gMASK"], s["sop"], *t.encode("好"), s["eop"]]) == "[gMASK]<sop>好<eop>"
        assert t.decode([s["gMASK"], *t.encode("好"), s["eop"]], skip_special_tokens=True) == "好"
        assert t.id_to_token(s["gMASK"]) == "[gMASK]" and t.token_to_id("<sop>") == s["sop"]
    assert find_blanks(build_context_ids(tok, "你好[gMASK]"), tok)[0][1] == tok.special["gMASK"]


def test_ids_below_the_offset_are_image_tokens_without_text(old, tok):
    with pytest.raises(TokenizerError, match=r"id 19999 is not a token.*below num_image_tokens = 20000 are image"):
        old.id_to_token(OLD - 1)
    with pytest.raises(TokenizerError, match=r"id 5 is not a token.*image tokens"):
        old.decode([*old.encode("你好"), 5])
    with pytest.raises(TokenizerError, match=rf"id {old.vocab_size} is not a token.*padded ids"):
        old.decode([old.vocab_size])
    assert decode_text(old, [5, *old.encode("你好"), old.vocab_size]) == "你好"  # a stream skips both, as padded ids
    assert tok.id_to_token(0) == "<unk>"  # the current revision has no image tokens


def test_longest_token_chars_bounds_every_tokens_text(tok, old):
    assert tok.longest_token_chars >= 80  # <|blank_80|> is 80 spaces
    for t in (tok, old):
        first = t.options["num_image_tokens"]
        assert max(len(t.decode([i])) for i in range(first, t.vocab_size)) <= t.longest_token_chars
        text = " " * 80 * 3
        assert len(text) <= len(t.encode(text)) * t.longest_token_chars


# ---------------------------------------------------------------- loading and its errors


def test_num_image_tokens_comes_from_tokenizer_config_or_is_asked_for(hub, tmp_path):
    assert load_tokenizer(hub / "ice_text.model", "chatglm").options == {"num_image_tokens": 0}
    bare = _bare(tmp_path, hub)
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer(bare, "chatglm")
    assert "differs by 20000" in one_line(exc) and "num_image_tokens=0" in str(exc.value)
    assert load_tokenizer(bare, "chatglm", num_image_tokens=OLD).special["gMASK"] > OLD
    write_tokenizer_config(bare, None)  # the file before 2023-04-06: no key, the remote code's default
    assert load_tokenizer(bare, "chatglm").options == {"num_image_tokens": OLD}
    assert load_tokenizer(bare, "chatglm", num_image_tokens=0).options == {"num_image_tokens": 0}  # given wins
    data = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({**data, "num_image_tokens": "0"}))
    with pytest.raises(TokenizerError, match=r"num_image_tokens must be a whole number >= 0.*'0'"):
        load_tokenizer(bare, "chatglm")


def test_errors_are_one_line(hub, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["你好世界", "hello world"] * 20),
        model_prefix=str(plain / "ice_text"),
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    cases = [
        (
            lambda: load_tokenizer(plain, "chatglm", num_image_tokens=0),
            r"lacks the pieces <pad>, <n>: not an ice_text.model",  # the old file lacks only the appended block
        ),
        (lambda: load_tokenizer(hub), r"needs an explicit kind.*'chatglm' for ChatGLM-6B's ice_text.model"),
        (lambda: load_tokenizer(hub, "chatglm", task_mask=True), r"do not apply to a chatglm tokenizer"),
        (
            lambda: load_tokenizer(plain / "ice_text.model", "chinese-sp-fix", num_image_tokens=0),
            r"num_image_tokens applies only to kinds 'chatglm' and 'icetk'",
        ),
        (lambda: load_tokenizer(tmp_path, "chatglm"), r"chatglm tokenizer needs ice_text.model; missing"),
    ]
    for call, pattern in cases:
        with pytest.raises(TokenizerError, match=pattern) as exc:
            call()
        one_line(exc)


def test_without_the_sentencepiece_package_the_error_says_how_to_get_it(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # any import of it now fails
    with pytest.raises(TokenizerError, match=r"ChatGLM-6B tokenizer .* needs the sentencepiece package") as exc:
        load_tokenizer(hub, "chatglm")
    assert one_line(exc).endswith("pip install sentencepiece")


def test_a_chatglm_tokenizer_class_without_ice_text_model_is_named(tmp_path):
    write_tokenizer_config(tmp_path, 0)
    with pytest.raises(TokenizerError, match=r"names ChatGLMTokenizer, but .* has no ice_text.model") as exc:
        resolve_tokenizer(tmp_path)
    one_line(exc)
    (tmp_path / "tokenizer.model").write_bytes(b"")  # ChatGLM2/3's file under the same class name
    with pytest.raises(TokenizerError, match=r"tokenizer.model is ChatGLM2/3-6B's"):
        resolve_tokenizer(tmp_path)


def test_resolve_tokenizer_reads_a_hub_folder(hub, tok, tmp_path):
    got, notes = resolve_tokenizer(hub, config=SimpleNamespace(vocab_size=640))
    assert (got.kind, got.special, got.options) == ("chatglm", tok.special, {"num_image_tokens": 0})
    assert notes == [
        "tokenizer: chatglm (tokenizer_config.json: tokenizer_class ChatGLMTokenizer)",
        "tokenizer: num_image_tokens 0 (tokenizer_config.json)",
    ]
    folder = _bare(tmp_path / "auto", hub)
    data = json.loads((hub / "tokenizer_config.json").read_text())
    del data["tokenizer_class"]  # auto_map alone names the class too
    (folder / "tokenizer_config.json").write_text(json.dumps({**data, "num_image_tokens": OLD}))
    got, notes = resolve_tokenizer(folder / "ice_text.model", config=SimpleNamespace(vocab_size=OLD + 640))
    assert (got.kind, got.options) == ("chatglm", {"num_image_tokens": OLD})
    with pytest.raises(TokenizerError, match=r"has 500 ids, but the model has 256 embedding rows") as exc:
        resolve_tokenizer(hub, config=SimpleNamespace(vocab_size=256))
    assert "a model of V" not in one_line(exc)  # ChatGLM's V is not its size padded to 128
    with pytest.raises(TokenizerError, match=r"num_image_tokens 20000 .* V = 130528 is the ChatGLM-6B revision with 0"):
        resolve_tokenizer(folder, config=SimpleNamespace(vocab_size=130528))
    with pytest.raises(TokenizerError, match=r"tokenizer kind 'chinese-sp-fix' was asked for, but .*ChatGLMTokenizer"):
        resolve_tokenizer(hub, kind="chinese-sp-fix")


def test_resolve_tokenizer_without_tokenizer_config_takes_the_revision_of_the_models_v(hub, tmp_path):
    bare = _bare(tmp_path, hub)
    config = SimpleNamespace(vocab_size=150528, architecture="chatglm-6b")
    got, notes = resolve_tokenizer(bare, config=config)
    assert (got.kind, got.options) == ("chatglm", {"num_image_tokens": OLD})
    assert notes[-1].startswith("tokenizer: num_image_tokens 20000 (no tokenizer_config.json; V = 150528") and (
        notes[-1].endswith("ASSUMED")
    )
    with pytest.raises(TokenizerError, match=r"differs by 20000"):  # a V of no release: the file must say
        resolve_tokenizer(bare, kind="chatglm", config=SimpleNamespace(vocab_size=1024))


def test_manifest_entry_and_saved_folder_reload_with_their_options(old, hub, tmp_path):
    (tmp_path / "export").mkdir()
    entry = tokenizer_entry(old, tmp_path / "export")
    assert entry["options"] == {"num_image_tokens": OLD} and entry["kind"] == "chatglm"
    assert list(entry["files"]) == ["ice_text.model"]  # no tokenizer_config.json: the option is recorded instead
    again = load_recorded_tokenizer(tmp_path / "export", entry)
    assert (again.special, again.options, again.encode(TEXTS[-1])) == (old.special, old.options, old.encode(TEXTS[-1]))
    with pytest.raises(TokenizerError, match=r"special ids .* differ from those its manifest recorded"):
        load_recorded_tokenizer(tmp_path / "export", {**entry, "options": {"num_image_tokens": 0}})
    saved = old.save(tmp_path / "saved")
    assert load_tokenizer(saved).options == {"num_image_tokens": OLD}
    got, notes = resolve_tokenizer(saved)
    assert got.special == old.special and "recorded in" in notes[0]


# ---------------------------------------------------------------- streaming


def test_a_stream_built_from_the_decoded_span_never_splits_a_character(tok, old):
    for t in (tok, old):
        for text in ("很好👋！ ok  x", "🙂🙂 龍\n\tß", "emoji 👋 and 🙂: byte fallback"):
            span = t.encode(text)
            shown = stream_texts(t, span)
            assert not any("\ufffd" in s for s in shown), shown
            assert "".join(shown) == t.decode(span) == text.lstrip(" ")
    # why it has to be built so: one byte piece decodes alone to U+FFFD, and a ▁word piece alone loses its space
    assert [tok.decode([i]) for i in tok.encode("👋")[1:]] == ["\ufffd"] * 4
    assert tok.decode(tok.encode("a ok")[1:]) == "ok"


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_engines_token_events_never_split_a_character(tok, strategy):
    prompt = "你好[gMASK]"
    ids = build_context_ids(tok, prompt)
    ((mask_pos, _),) = find_blanks(ids, tok)
    span = tok.encode("很好👋！ ok  x")
    session = ScriptedSession({mask_pos: span}, tok.special["eop"], config=tiny_config(512))
    events = []
    extra = {"num_beams": 1} if strategy == "beam" else {}
    fill_blanks(session, tok, [prompt], stream=events.append, max_new_tokens=len(span) + 1, strategy=strategy, **extra)
    shown = [e.text for e in events if e.kind == "token"]
    assert [e.token_id for e in events if e.kind == "token"] == span
    assert not any("\ufffd" in s for s in shown), shown
    assert "".join(shown) == tok.decode(span)
