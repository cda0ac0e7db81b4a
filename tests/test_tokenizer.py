"""glm_runtime.tokenizer: spec-7 special ids for every GLM vocabulary, the [MASK] whitespace rule, round trips,
the docs/glm.md 4.1 context layout, and each error path. Every vocabulary is built here in tmp folders (nothing
downloaded).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from glm_export.tokenizer_training import train_bpe_tokenizer
from glm_runtime.tokenizer import (
    JSON_SPECIAL_TOKENS,
    BlankError,
    TokenizerError,
    build_context_ids,
    chinese_sp_special_ids,
    copy_tokenizer_files,
    find_blanks,
    load_tokenizer,
    tokenizer_files,
)

# ---------------------------------------------------------------- fixtures: vocabularies with the real sizes

# Byte-level BPE merges; by hand: "the" -> t|he, " the" -> Ġthe, " cat" -> Ġcat (a+t first, then Ġ+c, then Ġc+at).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at")]
WORDS = ["the", "cat", "sat", "on", "mat", "glm", "fills", "blanks", "model", "at", "in", "of", "a", "tokens"]


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _write_bpe(folder: Path, head: list[str], size: int, tail: list[str]) -> dict[str, int]:
    """vocab.json of exactly `size` entries (head, byte alphabet, merge products, fillers, tail) + merges.txt."""
    entries = head + _byte_alphabet() + ["".join(m) for m in MERGES]
    entries += [f"<filler{i}>" for i in range(size - len(entries) - len(tail))] + tail
    vocab = {t: i for i, t in enumerate(entries)}
    assert len(vocab) == size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return vocab


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    return folder, _write_bpe(folder, [], 50257, ["<|endoftext|>"])  # GPT-2: 50257 ids, <|endoftext|> last


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("roberta")
    return folder, _write_bpe(folder, ["<s>", "<pad>", "</s>", "<unk>"], 50265, ["<mask>"])


BERT_WORDS = ["hello", "world", "cat", "##s", ",", ".", "the", "at", "(", ")", "[", "]", "g", "##mas", "##k", "a"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    lines += [f"filler{i}" for i in range(30522 - len(lines))]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, {t: i for i, t in enumerate(lines)}


ZH_CHARS = "我们喜欢模型语言生成填空中文分词测试数据一二三四五六七八九十"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    lines = [
        " ".join(
            "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.7
            else rng.choice(WORDS + ["GLM"])
            for _ in range(10)
        )
        for _ in range(200)
    ]
    model = io.BytesIO()
    # cog-pretrain has <unk> 0, <s> 1, </s> 2, <n> 3 (docs/glm.md 7); same layout, 120 pieces instead of 50000
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=120,
        user_defined_symbols=["<n>"],
        character_coverage=1.0,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("zh") / "cog-pretrain.model"
    path.write_bytes(model.getvalue())
    return path


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def json_file(tmp_path_factory):
    return train_bpe_tokenizer(iter(_corpus()), 400, tmp_path_factory.mktemp("json") / "tokenizer.json").files[
        "tokenizer.json"
    ]


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_tokenizer(gpt2_dir[0])


@pytest.fixture(scope="module")
def bert(bert_dir):
    return load_tokenizer(bert_dir[0])


# ---------------------------------------------------------------- special-token ids (docs/glm.md 7 tables)


def test_gpt2_special_ids_match_spec_table(gpt2):
    assert gpt2.kind == "gpt2"
    assert gpt2.special == {
        "pad": 50256,
        "eos": 50256,
        "sop": 50257,
        "eop": 50258,
        "ENC": 50259,
        "MASK": 50260,
        "sep": 50261,
        "unk": 50262,
        "gMASK": 50263,
        "sMASK": 50264,
        "dBLOCK": 50265,
    }
    assert gpt2.mask_ids == (50260, 50264, 50263)
    assert (gpt2.vocab_size, gpt2.padded_vocab_size()) == (50266, 50304)  # V = 50304 for GLM-2B/10B
    assert gpt2.token_to_id("<|startofpiece|>") == 50257 and gpt2.id_to_token(50258) == "<|endofpiece|>"


def test_gpt2_without_decoder_mask_has_no_dblock(gpt2_dir):
    tok = load_tokenizer(gpt2_dir[0], decoder_mask=False)
    assert "dBLOCK" not in tok.special and tok.vocab_size == 50265 and tok.special["sMASK"] == 50264


def test_roberta_special_ids_match_spec(roberta_dir):
    tok = load_tokenizer(roberta_dir[0], kind="roberta")
    assert tok.special == {"pad": 2, "eos": 2, "sep": 2, "ENC": 0, "MASK": 50264, "unk": 3, "sop": 50265, "eop": 50266}
    assert tok.mask_ids == (50264,) and tok.padded_vocab_size() == 50304
    with_task = load_tokenizer(roberta_dir[0], kind="roberta", task_mask=True)
    assert (with_task.special["gMASK"], with_task.special["sMASK"]) == (50267, 50268)


def test_roberta_mask_is_the_vocabs_own_mask_id(tmp_path):
    _write_bpe(tmp_path, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], 300, [])
    tok = load_tokenizer(tmp_path, kind="roberta")
    assert (tok.special["MASK"], tok.special["sop"], tok.special["eop"]) == (4, 300, 301)


def test_bert_special_ids_match_spec(bert, bert_dir):
    assert bert.special == {
        "pad": 0,
        "eos": 0,
        "unk": 100,
        "ENC": 101,
        "sep": 102,
        "MASK": 103,
        "sop": 30522,
        "eop": 30523,
    }
    assert bert.mask_ids == (103,) and (bert.vocab_size, bert.padded_vocab_size()) == (30524, 30592)
    with_task = load_tokenizer(bert_dir[0], task_mask=True)
    assert (with_task.special["gMASK"], with_task.special["sMASK"]) == (30524, 30525)


def test_chinese_formula_gives_spec_table_for_50000():
    fix = chinese_sp_special_ids(50000, fix_command_token=True)
    assert fix == {
        "pad": 50000,
        "eos": 50000,
        "sep": 50001,
        "ENC": 50002,
        "MASK": 50003,
        "unk": 50004,
        "sop": 50006,
        "eop": 50007,
        "sMASK": 50008,
        "gMASK": 50009,
        "dBLOCK": 50010,
    }
    no_fix = chinese_sp_special_ids(50000, fix_command_token=False)
    assert no_fix == {**fix, "gMASK": 50007, "dBLOCK": 50009}  # gMASK == eop in GLM-10B-Chinese (docs/glm.md 9.12)
    hf = chinese_sp_special_ids(50000, fix_command_token=False, decoder_mask=False, hf_gmask=True)
    assert hf["gMASK"] == 50009 and hf["sMASK"] == 50008 and "dBLOCK" not in hf
    assert 50005 not in fix.values() and 50005 not in no_fix.values()  # never assigned in the original


@pytest.mark.parametrize("kind,fix", [("chinese-sp-fix", True), ("chinese-sp", False)])
def test_chinese_loaded_ids_follow_the_formula(sp_model, kind, fix):
    tok = load_tokenizer(sp_model, kind=kind)
    n = 120
    assert tok.special == chinese_sp_special_ids(n, fix)
    assert (tok.special["eos"], tok.special["ENC"], tok.special["MASK"], tok.special["sop"]) == (n, n + 2, n + 3, n + 6)
    assert tok.special["gMASK"] == (n + 9 if fix else n + 7) and tok.special["eop"] == n + 7
    assert tok.vocab_size == (n + 11 if fix else n + 10) and tok.padded_vocab_size() == 256
    assert tok.token_to_id("<n>") == 3
    # the shared id n+7 (no fix) shows as the blank it stands for in a prompt
    assert tok.decode([n + 7]) == ("<|endofpiece|>" if fix else "[gMASK]")
    assert tok.encode("<|endofpiece|>") == [n + 7] and tok.id_to_token(n + 3) == "[MASK]"


def test_chinese_hf_gmask_option(sp_model):
    tok = load_tokenizer(sp_model, kind="chinese-sp", hf_gmask=True)
    assert tok.special["gMASK"] == 129 and tok.special["eop"] == 127 and "dBLOCK" not in tok.special
    assert tok.encode("[gMASK]") == [129]


def test_json_special_ids_are_looked_up_by_string(json_file, tmp_path):
    tok = load_tokenizer(json_file)
    assert tok.kind == "json"
    assert tok.special == {
        "pad": 0,
        "eos": 0,
        "ENC": 1,
        "MASK": 2,
        "sMASK": 3,
        "gMASK": 4,
        "sop": 5,
        "eop": 6,
        "sep": 7,
        "unk": 8,
        "dBLOCK": 9,
    }
    assert [tok.token_to_id(s) for s in JSON_SPECIAL_TOKENS] == list(range(10))
    # a tokenizer.json with the specials in another order: ids follow the strings, not the positions
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(
        _corpus(20),
        trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=list(reversed(JSON_SPECIAL_TOKENS))),
    )
    other.save(str(tmp_path / "tokenizer.json"))
    reordered = load_tokenizer(tmp_path)
    assert reordered.special["eos"] == 9 and reordered.special["dBLOCK"] == 0 and reordered.special["MASK"] == 7


# ---------------------------------------------------------------- encoding: command split and whitespace rule


def test_gpt2_encode_golden_and_mask_whitespace_rule(gpt2, gpt2_dir):
    v = gpt2_dir[1]
    assert gpt2.encode("the cat") == [v["t"], v["he"], v["Ġcat"]]
    assert gpt2.encode(" the") == [v["Ġthe"]]
    # docs/glm.md 7: "at [MASK] (" -> "at", [MASK], " ("  (whitespace before the mask dropped, after it kept)
    assert gpt2.encode("at [MASK] (") == [v["at"], 50260, v["Ġ"], v["("]]
    assert gpt2.encode("at\n [sMASK] x [gMASK]") == [v["at"], 50264, v["Ġ"], v["x"], 50263]
    # other command tokens are split out but keep the whitespace before them
    assert gpt2.encode("a <|startofpiece|>[CLS]<|endoftext|>") == [v["a"], v["Ġ"], 50257, 50259, 50256]
    # a command-like string that is not a command token is plain text
    assert gpt2.encode("[FOO] [MASK") == gpt2.encode("[FOO]") + gpt2.encode(" [MASK")
    assert 50260 not in gpt2.encode("[FOO] [MASK")


def test_bert_encode_golden_lowercase_and_no_gmask(bert, bert_dir):
    v = bert_dir[1]
    assert bert.encode("Hello cats [MASK] world.") == [v["hello"], v["cat"], v["##s"], 103, v["world"], v["."]]
    assert bert.encode("[CLS] hello [SEP]") == [101, v["hello"], 102]
    # without task_mask "[gMASK]" is not a command token: WordPiece text, no error
    assert bert.encode("[gMASK]") == [v["["], v["g"], v["##mas"], v["##k"], v["]"]]


def test_chinese_encode_mask_rule_and_round_trip(sp_model):
    tok = load_tokenizer(sp_model, kind="chinese-sp-fix")
    text = "我们 喜欢 GLM 模型"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("我们 [MASK] 模型") == tok.encode("我们") + [123] + tok.encode(" 模型")
    assert tok.encode("我们  [gMASK]") == tok.encode("我们") + [129]


def test_json_encode_mask_rule_and_round_trip(json_file):
    tok = load_tokenizer(json_file)
    text = "the cat sat on the mat, glm fills blanks. Ünïcödé 你好\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("at [MASK] (") == tok.encode("at") + [2] + tok.encode(" (")
    assert tok.encode("x [sMASK] [gMASK]<|endofpiece|>") == tok.encode("x") + [3, 4, 6]


@pytest.mark.parametrize("text", ["the cat sat on the mat", "héllo wörld 你好 🙂\n\ttabs  and  spaces "])
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


def test_decode_with_and_without_specials(gpt2, bert):
    ids = gpt2.encode("the [MASK] cat<|endoftext|>")
    assert gpt2.decode(ids) == "the[MASK] cat<|endoftext|>"
    assert gpt2.decode(ids, skip_special_tokens=True) == "the cat"
    assert bert.decode(bert.encode("hello, world.")) == "hello, world."
    assert bert.decode([101] + bert.encode("Hello World") + [103, 0]) == "[CLS] hello world [MASK] [PAD]"
    assert bert.decode([101] + bert.encode("Hello World") + [103, 0], skip_special_tokens=True) == "hello world"


def test_roberta_command_strings_map_to_roberta_ids(roberta_dir):
    tok = load_tokenizer(roberta_dir[0], kind="roberta")
    assert tok.encode("[CLS]the [MASK]<|endoftext|>") == [0] + tok.encode("the") + [50264, 2]
    assert tok.decode(tok.encode("the cat at")) == "the cat at"
    assert tok.decode([0, 2, 3]) == "[CLS]<|endoftext|>[UNK]"  # an id shared by pad/eos/sep decodes as pad's string


# ---------------------------------------------------------------- the blank-filling context (docs/glm.md 4.1)


def test_context_layout_gpt2(gpt2):
    body = gpt2.encode("the [MASK] cat at [MASK] the")
    ids = build_context_ids(gpt2, "the [MASK] cat at [MASK] the")
    assert ids == [50259] + body + [50256]
    assert find_blanks(ids, gpt2) == [(3, 50260), (7, 50260)]
    # trailing [gMASK]: no eos (docs/glm.md 9.11); [gMASK] in the middle: eos as usual
    assert build_context_ids(gpt2, "the cat [gMASK]") == [50259] + gpt2.encode("the cat") + [50263]
    assert build_context_ids(gpt2, "[gMASK] the cat")[-1] == 50256
    assert build_context_ids(gpt2, "the cat", append_gmask=True) == [50259] + gpt2.encode("the cat") + [50263]
    mixed = build_context_ids(gpt2, "a [sMASK] b [gMASK] c [MASK]")
    assert [m for _, m in find_blanks(mixed, gpt2)] == [50264, 50263, 50260]


def test_context_layout_bert_uses_mask_and_pad_eos(bert):
    assert build_context_ids(bert, "hello [MASK] world") == [101] + bert.encode("hello [MASK] world") + [0]
    # no [gMASK] in this vocabulary: append_gmask appends [MASK] and the eos ([PAD] 0)
    assert build_context_ids(bert, "hello world", append_gmask=True) == [101] + bert.encode("hello world") + [103, 0]


@pytest.mark.parametrize("kind", ["chinese-sp", "chinese-sp-fix"])
def test_context_layout_chinese(sp_model, kind):
    tok = load_tokenizer(sp_model, kind=kind)
    assert build_context_ids(tok, "我们 [MASK] 模型") == [122] + tok.encode("我们 [MASK] 模型") + [120]
    gmask = tok.special["gMASK"]
    assert build_context_ids(tok, "我们 模型", append_gmask=True) == [122] + tok.encode("我们 模型") + [gmask]


def test_context_layout_json_and_roberta(json_file, roberta_dir):
    tok = load_tokenizer(json_file)
    assert build_context_ids(tok, "the [sMASK] cat") == [1] + tok.encode("the [sMASK] cat") + [0]
    roberta = load_tokenizer(roberta_dir[0], kind="roberta")
    assert build_context_ids(roberta, "the cat", append_gmask=True) == [0] + roberta.encode("the cat") + [50264, 2]


def test_context_without_blank_is_refused(gpt2, bert):
    with pytest.raises(BlankError, match=r"no blank to fill.*\[MASK\] \[sMASK\] \[gMASK\].*append_gmask=True"):
        build_context_ids(gpt2, "the cat")
    with pytest.raises(BlankError, match=r"\[gMASK\] is not a blank of this bert tokenizer.*task_mask=True"):
        build_context_ids(bert, "hello [gMASK]")
    assert issubclass(BlankError, ValueError)


# ---------------------------------------------------------------- saving, manifests, training


@pytest.mark.parametrize("which", ["gpt2", "bert", "json", "chinese"])
def test_save_load_round_trip_and_describe(which, gpt2, bert, json_file, sp_model, tmp_path):
    tok = {
        "gpt2": lambda: gpt2,
        "bert": lambda: bert,
        "json": lambda: load_tokenizer(json_file),
        "chinese": lambda: load_tokenizer(sp_model, kind="chinese-sp", hf_gmask=True),
    }[which]()
    again = load_tokenizer(tok.save(tmp_path / "saved"))
    assert (again.kind, again.special, again.options, again.vocab_size) == (
        tok.kind,
        tok.special,
        tok.options,
        tok.vocab_size,
    )
    text = "the cat [MASK] sat"
    assert again.encode(text) == tok.encode(text)
    info = again.describe()
    assert set(info["files"]) == set(tok.files)
    for name, digest in info["files"].items():
        assert digest == hashlib.sha256((tmp_path / "saved" / name).read_bytes()).hexdigest()
    assert info["sha256"] == info["files"][info["file"]] and info["special_tokens"] == tok.special
    assert info["kind"] == tok.kind and info["mask_ids"] == list(tok.mask_ids)


def test_tokenizer_files_name_both_halves_of_a_bpe_pair(gpt2_dir, json_file, sp_model, tmp_path):
    folder = gpt2_dir[0]
    pair = {"vocab.json": folder / "vocab.json", "merges.txt": folder / "merges.txt"}
    assert list(tokenizer_files(folder / "vocab.json").items()) == list(pair.items())  # vocab.json first
    assert list(tokenizer_files(folder / "merges.txt").items()) == list(pair.items())
    assert tokenizer_files(json_file) == {"tokenizer.json": json_file}
    assert tokenizer_files(sp_model) == {"cog-pretrain.model": sp_model}
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
    with pytest.raises(TokenizerError, match=r"needs vocab.json \+ merges.txt side by side .*missing: merges.txt"):
        tokenizer_files(half / "vocab.json")


def test_copied_bpe_pair_loads_alone_and_its_entry_matches_describe(gpt2, gpt2_dir, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    entry = copy_tokenizer_files(tokenizer_files(gpt2_dir[0] / "vocab.json"), out)
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    again = load_tokenizer(out / entry["file"])
    text = "the cat sat on the mat [MASK] glm"
    assert again.encode(text) == gpt2.encode(text) and gpt2_dir[1]["Ġthe"] in again.encode(text)  # merges read
    described = again.describe()  # hashes computed independently from the loaded tokenizer's own files
    assert (entry["file"], entry["sha256"], entry["files"]) == (
        described["file"],
        described["sha256"],
        described["files"],
    )


def test_train_bpe_tokenizer_is_deterministic_and_accepts_files(tmp_path):
    a = train_bpe_tokenizer(_corpus(), 350, tmp_path / "a.json")
    b = train_bpe_tokenizer(iter(_corpus()), 350, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.special == b.special and a.vocab_size <= 350
    (tmp_path / "corpus.txt").write_text("\n".join(_corpus()) + "\n", encoding="utf-8")
    c = train_bpe_tokenizer([tmp_path / "corpus.txt"], 350, tmp_path / "c.json")
    assert [c.token_to_id(s) for s in JSON_SPECIAL_TOKENS] == list(range(10))
    # the trained file also strips the space before a blank when used through `tokenizers` directly
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tmp_path / "c.json"))
    assert raw.encode("at [MASK]", add_special_tokens=False).ids == c.encode("at [MASK]")


# ---------------------------------------------------------------- errors


def test_error_unknown_kind(gpt2_dir):
    with pytest.raises(TokenizerError, match=r"unknown tokenizer kind 'gpt3'; choose one of .*'gpt2'"):
        load_tokenizer(gpt2_dir[0], kind="gpt3")


def test_error_missing_path(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer path .*nowhere does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_error_missing_files_are_named(tmp_path, gpt2_dir):
    with pytest.raises(TokenizerError, match=r"no tokenizer files in .*expected tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_bytes((gpt2_dir[0] / "vocab.json").read_bytes())
    with pytest.raises(TokenizerError, match=r"needs vocab.json, merges.txt; missing: .*merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"bert tokenizer needs vocab.txt; missing: .*vocab.txt"):
        load_tokenizer(tmp_path, kind="bert")


def test_error_sentencepiece_needs_explicit_kind(sp_model):
    with pytest.raises(TokenizerError, match=r"needs an explicit kind: 'chinese-sp-fix'.*'chinese-sp'"):
        load_tokenizer(sp_model)
    with pytest.raises(TokenizerError, match=r"needs an explicit kind"):
        load_tokenizer(sp_model.parent)


def test_error_wrong_vocabulary_for_kind(roberta_dir, bert_dir):
    with pytest.raises(TokenizerError, match=r"lacks \['<\|endoftext\|>'\].*kind='roberta'"):
        load_tokenizer(roberta_dir[0])
    with pytest.raises(TokenizerError, match=r"vocab.txt is not a 'gpt2' tokenizer file"):
        load_tokenizer(bert_dir[0] / "vocab.txt", kind="gpt2")


def test_error_token_the_vocab_lacks(bert, gpt2):
    with pytest.raises(TokenizerError, match=r"'\[gMASK\]' is not a token of this bert tokenizer.*task_mask=True"):
        bert.token_to_id("[gMASK]")
    with pytest.raises(TokenizerError, match=r"has no sMASK token.*task_mask=True"):
        bert.command_id("sMASK")
    with pytest.raises(TokenizerError, match=r"unknown command token name 'CLS'"):
        gpt2.command_id("CLS")
    with pytest.raises(TokenizerError, match=r"'zzzq' is not a token of this gpt2 tokenizer"):
        gpt2.token_to_id("zzzq")


def test_error_decode_id_outside_vocabulary(gpt2, sp_model):
    with pytest.raises(TokenizerError, match=r"id 50300 is not a token of this gpt2 tokenizer.*padded ids"):
        gpt2.decode([50300])
    tok = load_tokenizer(sp_model, kind="chinese-sp-fix")
    with pytest.raises(TokenizerError, match=r"id 125 is not a token"):  # n+5: never assigned (docs/glm.md 7)
        tok.decode([125])


def test_error_options_that_do_not_apply(gpt2_dir, sp_model, json_file):
    with pytest.raises(TokenizerError, match=r"hf_gmask applies only to kind 'chinese-sp'"):
        load_tokenizer(gpt2_dir[0], hf_gmask=True)
    with pytest.raises(TokenizerError, match=r"hf_gmask=True needs task_mask=True and decoder_mask=False"):
        load_tokenizer(sp_model, kind="chinese-sp", hf_gmask=True, decoder_mask=True)
    with pytest.raises(TokenizerError, match=r"do not apply to a tokenizer.json"):
        load_tokenizer(json_file, task_mask=False)


def test_error_json_without_glm_specials(tmp_path):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.train_from_iterator(
        _corpus(20), trainers.BpeTrainer(vocab_size=100, show_progress=False, special_tokens=["<|endoftext|>", "[CLS]"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"lacks GLM's special tokens \['\[MASK\]', '<\|startofpiece\|>'"):
        load_tokenizer(tmp_path)


def test_error_training_inputs(tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size 100 is too small.*at least 266"):
        train_bpe_tokenizer(_corpus(5), 100, tmp_path / "t.json")
    with pytest.raises(TokenizerError, match=r"training files not found: .*missing.txt"):
        train_bpe_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------- dependencies


def test_import_and_use_without_torch_or_sentencepiece(gpt2_dir, bert_dir, json_file, sp_model):
    script = f"""
import sys
sys.modules["torch"] = None          # any import of torch now fails
sys.modules["sentencepiece"] = None  # and so does sentencepiece: only the Chinese kinds may need it
from glm_runtime.tokenizer import load_tokenizer, build_context_ids, TokenizerError
for path in ({str(gpt2_dir[0])!r}, {str(bert_dir[0])!r}, {str(json_file)!r}):
    tok = load_tokenizer(path)
    assert build_context_ids(tok, "the [MASK] cat")[0] == tok.special["ENC"]
try:
    load_tokenizer({str(sp_model)!r}, kind="chinese-sp-fix")
except TokenizerError as exc:
    assert "pip install sentencepiece" in str(exc), exc
else:
    raise AssertionError("the Chinese kind loaded without sentencepiece")
print("ok", "torch" in sys.modules and sys.modules["torch"] is not None)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok False"
