"""Training glmx's own tokenizer (export side: only pretraining, the tests and the benchmarks make vocabularies; the
runtime only loads them). In: texts or files, a vocabulary size. Out: a tokenizer.json with GLM's specials at ids
0..9; or a tiny SentencePiece model laid out like ChatGLM-6B's ice_text.model (random-weight ChatGLM folders of
the tests and of the scale benchmark: nothing can be downloaded here), or like the text model the old ChatGLM-6B
file and GLM-130B's icetk are, without the pieces their tokenizers append (train_icetk_text_model)."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any

from glm_runtime.manifest import atomic_path
from glm_runtime.tokenizer import (
    BLANK_NAMES,
    COMMAND_STRINGS,
    JSON_SPECIAL_TOKENS,
    GLMTokenizer,
    TokenizerError,
    load_tokenizer,
)


def train_bpe_tokenizer(
    files_or_iterator: Any, vocab_size: int, out_file: str | os.PathLike, *, min_frequency: int = 0
) -> GLMTokenizer:
    """Train a byte-level BPE with JSON_SPECIAL_TOKENS at ids 0..9 and write it to `out_file` (atomically).

    files_or_iterator: a path (str or Path), a list of pathlib.Path, or any other iterable of training texts.
    Deterministic: the same input gives a byte-identical file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = len(JSON_SPECIAL_TOKENS) + 256  # the specials plus the 256-symbol byte alphabet
    if vocab_size < floor:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE with GLM's specials needs at least {floor}"
        )
    files = None
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files = [Path(files_or_iterator)]
    elif (
        isinstance(files_or_iterator, (list, tuple))
        and files_or_iterator
        and all(isinstance(f, os.PathLike) for f in files_or_iterator)
    ):
        files = [Path(f) for f in files_or_iterator]
    if files is not None:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TokenizerError(f"training files not found: {missing}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    blanks = {COMMAND_STRINGS[n] for n in BLANK_NAMES}  # lstrip, so other tools strip like GLM does (docs/glm.md 7)
    specials = [AddedToken(s, special=True, normalized=False, lstrip=s in blanks) for s in JSON_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files is not None:
        tok.train([str(f) for f in files], trainer)
    else:
        tok.train_from_iterator(files_or_iterator, trainer)
    with atomic_path(out_file) as tmp:
        tok.save(str(tmp), pretty=True)
    return load_tokenizer(out_file, kind="json")


# ---------------------------------------------------------------- a ChatGLM-6B-shaped ice_text.model

CHATGLM_COMMANDS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
CHATGLM_WHITESPACE = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
# user-defined pieces: SentencePiece matches them whole in text, as the real model does for <n>, tab and blanks
CHATGLM_USER_DEFINED = ["<n>", *CHATGLM_COMMANDS, *CHATGLM_WHITESPACE]

CHATGLM_CORPUS = [
    "你好，很高兴见到你，欢迎问我任何问题。",
    "我是人工智能助手，我们喜欢用语言模型生成中文文本。",
    "晚上睡不着应该怎么办？可以听音乐，也可以看书。",
    "今天天气很好，我们去公园散步吧。",
    "语言模型可以填空，也可以写代码和回答问题。",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small test of the tokenizer.",
    "GLM fills blanks in text and code; ChatGLM answers questions.",
    "Numbers such as 12345 and 2023 are split into single digits.",
    "def main():<n><|blank_4|>print('hello world')<|tab|># greeting",
]


def train_unigram(corpus: list[str], seed: int, user_defined: list[str], byte_fallback: bool) -> io.BytesIO:
    """A SentencePiece unigram model of up to 600 pieces on `corpus` (its lines weighed by `seed`): <unk> 0, <s> 1,
    </s> 2, <pad> 3, then `user_defined`; digits split, identity normalization, no whitespace squeezing (every
    string round-trips). Deterministic for a seed. -> the serialized model."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [line for line in corpus for _ in range(rng.randint(10, 30))]  # the seed weighs the lines differently
    rng.shuffle(lines)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="unigram",
        vocab_size=600,
        hard_vocab_limit=False,  # the corpus yields fewer pieces: take what it gives
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        user_defined_symbols=user_defined,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        **({"byte_fallback": True} if byte_fallback else {}),  # unset otherwise: the model's bytes stay as they were
    )
    return buf


def train_ice_text_model(path: Path, seed: int = 0) -> Path:
    """Train a SentencePiece unigram model of about 500 pieces on CHATGLM_CORPUS (its lines weighed by `seed`) and
    write it to `path` with the real ice_text.model's piece layout (tests/chatglm_fixtures.py says it): byte fallback
    on, digits split,
    identity normalization and no whitespace squeezing, so that every string round-trips. Takes ~0.1 s."""
    from sentencepiece import sentencepiece_model_pb2

    buf = train_unigram(CHATGLM_CORPUS, seed, CHATGLM_USER_DEFINED, byte_fallback=True)
    # The trainer puts user-defined and byte pieces before the trained ones; the real model has them last.
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(buf.getvalue())
    pieces = list(model.pieces)
    first_byte = next(k for k, p in enumerate(pieces) if p.piece == "<0x00>")
    meta, newline, user = pieces[:4], pieces[4], pieces[5:first_byte]
    assert newline.piece == "<n>" and [p.piece for p in user] == CHATGLM_USER_DEFINED[1:]
    byte, trained = pieces[first_byte : first_byte + 256], pieces[first_byte + 256 :]
    del model.pieces[:]
    model.pieces.extend([*meta, newline, *trained, *user, *byte])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def write_chatglm_tokenizer_config(folder: Path, num_image_tokens: int | None) -> Path:
    """The hub's tokenizer_config.json for ChatGLM-6B (current revision's fields); num_image_tokens=None leaves the
    key out, as the file before 2023-04-06 did (the remote code's default 20000 then applies)."""
    data = {
        "name_or_path": "THUDM/chatglm-6b",
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "end_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": num_image_tokens,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    if num_image_tokens is None:
        del data["num_image_tokens"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- an icetk text model (GLM-130B; old ChatGLM-6B)

ICETK_CORPUS = [*CHATGLM_CORPUS[:-1], "def main():<n>print('hello world') # greeting"]


def train_icetk_text_model(path: Path, seed: int = 0) -> Path:
    """Train a SentencePiece unigram model of about 500 pieces on ICETK_CORPUS and write it to `path` laid out like
    icetk's ice_text.model (GLM-130B's text model, and ChatGLM-6B's file before 2023-04-06): <unk> 0, <s> 1, </s> 2,
    <pad> 3, <n> 4, then the trained pieces, and none of the command, tab, blank or byte pieces, nor byte fallback
    (glm_runtime.ice_text appends them, as the original tokenizers did at load time). Identity normalization and no
    whitespace squeezing, as train_ice_text_model. ~500 pieces keep 20000 + pieces + 344 under the glm-130b-tiny
    preset's V = 21120. Deterministic for a seed; takes ~0.1 s."""
    buf = train_unigram(ICETK_CORPUS, seed, ["<n>"], byte_fallback=False)  # <n>: id 4, right after the four
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return path
