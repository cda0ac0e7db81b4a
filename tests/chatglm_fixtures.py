"""A tiny ChatGLM-6B vocabulary for tests: an ice_text.model trained here, laid out like the real one
(chatglm_v1_spec.md 6), and the hub's tokenizer_config.json beside it. Nothing downloaded.

Layout of the model's pieces (the real ids in brackets): <unk> 0, <s> 1, </s> 2, <pad> 3, <n> 4, then the trained
pieces ("▁" first, as the real 5), then [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> (130000..),
<|tab|>, <|blank_2|>..<|blank_80|> (130008..130087) and the 256 byte pieces <0x00>..<0xFF> (130088..130343).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

COMMANDS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
# user-defined pieces: SentencePiece matches them whole in text, as the real model does for <n>, tab and blanks
USER_DEFINED = ["<n>", *COMMANDS, *WHITESPACE]

CORPUS = [
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


def make_ice_text_model(path: Path, seed: int = 0) -> Path:
    """Train a SentencePiece unigram model of about 500 pieces on CORPUS (its lines weighed by `seed`) and write it
    to `path` with the real ice_text.model's piece layout (module docstring): byte fallback on, digits split,
    identity normalization and no whitespace squeezing, so that every string round-trips. Takes ~0.1 s."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    rng = random.Random(seed)
    lines = [line for line in CORPUS for _ in range(rng.randint(10, 30))]  # the seed weighs the lines differently
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
        user_defined_symbols=USER_DEFINED,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    # The trainer puts user-defined and byte pieces before the trained ones; the real model has them last.
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(buf.getvalue())
    pieces = list(model.pieces)
    first_byte = next(k for k, p in enumerate(pieces) if p.piece == "<0x00>")
    meta, newline, user = pieces[:4], pieces[4], pieces[5:first_byte]
    assert newline.piece == "<n>" and [p.piece for p in user] == USER_DEFINED[1:]
    byte, trained = pieces[first_byte : first_byte + 256], pieces[first_byte + 256 :]
    del model.pieces[:]
    model.pieces.extend([*meta, newline, *trained, *user, *byte])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def write_tokenizer_config(folder: Path, num_image_tokens: int | None) -> Path:
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
