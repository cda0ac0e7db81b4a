"""GLM's vocabularies, one reader per kind: GPT-2 and RoBERTa byte-level BPE, uncased BERT WordPiece, the Chinese
SentencePiece model and glmx's tokenizer.json, each with the command-token ids of docs/glm.md 7.

In: the files of one kind (glm_runtime.tokenizer.load_tokenizer decides the kind and finds them).
Out: (text vocabulary, command ids by name), which glm_runtime.tokenizer.GLMTokenizer wraps; nothing here
knows blanks or prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from glm_runtime.errors import GLMXError

# Command-token names of the original code, in the order the ids are reported (docs/glm.md 7).
COMMAND_NAMES = ("pad", "eos", "sep", "ENC", "MASK", "unk", "sop", "eop", "gMASK", "sMASK", "dBLOCK")
COMMAND_STRINGS = {
    "pad": "<|endoftext|>",
    "eos": "<|endoftext|>",
    "sep": "[SEP]",
    "ENC": "[CLS]",
    "MASK": "[MASK]",
    "unk": "[UNK]",
    "sop": "<|startofpiece|>",
    "eop": "<|endofpiece|>",
    "gMASK": "[gMASK]",
    "sMASK": "[sMASK]",
    "dBLOCK": "[dBLOCK]",
}
# glmx's tokenizer.json: these added tokens sit at ids 0..9 in this order
# (glm_export.tokenizer_training.train_bpe_tokenizer writes them).
JSON_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[CLS]",
    "[MASK]",
    "[sMASK]",
    "[gMASK]",
    "<|startofpiece|>",
    "<|endofpiece|>",
    "[SEP]",
    "[UNK]",
    "[dBLOCK]",
)
_JSON_REQUIRED = ("pad", "eos", "ENC", "MASK", "sop", "eop")
BPE_FILES = ("vocab.json", "merges.txt")  # a GPT-2 / RoBERTa byte-level BPE is this pair, side by side


class TokenizerError(GLMXError, ValueError):
    """A tokenizer cannot be loaded, or a token or id the caller asked for is not in its vocabulary."""


# ---------------------------------------------------------------- text vocabularies (the vocabulary without commands)


class TextVocabulary(Protocol):
    """What GLMTokenizer needs of a vocabulary: text segments to ids and back, token lookups, its size."""

    size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, i: int) -> str | None: ...


class _TokenizersText:
    """A `tokenizers.Tokenizer` (byte-level BPE or WordPiece) used on text segments only."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


class _SentencePieceText:
    def __init__(self, sp: Any) -> None:
        self.sp = sp
        self.size = sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>; tell them apart
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i)


# ---------------------------------------------------------------- command-token id tables (docs/glm.md 7)


def _after_vocab(start: int, options: dict[str, Any], middle: Sequence[str] = ()) -> dict[str, int]:
    """GPT-2 / RoBERTa / BERT: added commands take the next free ids after the vocabulary, in this order."""
    names = (
        ["sop", "eop", *middle]
        + (["gMASK", "sMASK"] if options["task_mask"] else [])
        + (["dBLOCK"] if options["decoder_mask"] else [])
    )
    return {name: start + k for k, name in enumerate(names)}


def chinese_sp_special_ids(
    num_pieces: int, fix_command_token: bool, task_mask: bool = True, decoder_mask: bool = True, hf_gmask: bool = False
) -> dict[str, int]:
    """Command ids of ChineseSPTokenizer for a SentencePiece model of `num_pieces` pieces (50000 in GLM).

    The original counter advances by 5 after unk, so n+5 is never used and sop/eop are n+6/n+7; without
    fix_command_token it then advances by only 2, so gMASK gets n+7 == eop (GLM-10B-Chinese, docs/glm.md 9.12).
    hf_gmask=True gives the Hugging Face convention for that model: gMASK = n+9 (its embedding row is a copy
    of row n+7), and no dBLOCK (it would collide).
    """
    n = num_pieces
    ids = {"pad": n, "eos": n, "sep": n + 1, "ENC": n + 2, "MASK": n + 3, "unk": n + 4, "sop": n + 6, "eop": n + 7}
    following = n + 8 if fix_command_token else n + 7
    if task_mask:
        first, second = ("sMASK", "gMASK") if fix_command_token else ("gMASK", "sMASK")
        ids[first], ids[second] = following, following + 1
        following += 2
        if hf_gmask:
            ids["gMASK"] = n + 9
    if decoder_mask:
        ids["dBLOCK"] = following
    return ids


def _lookup(tok: Any, tokens: Sequence[str], where: Path, what: str) -> Callable[[str], int]:
    """The id of a token by string, once every token of `tokens` is known to be there (else: not a `what`)."""
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"{where} lacks {missing}: not a {what}")

    def token_id(token: str) -> int:
        found = tok.token_to_id(token)
        if found is None:
            raise TokenizerError(f"{where} lacks {token!r}: not a {what}")
        return int(found)

    return token_id


def read_bpe(kind: str, files: dict[str, Path], options: dict[str, Any]) -> tuple[TextVocabulary, dict[str, int]]:
    """GPT-2 or RoBERTa byte-level BPE (vocab.json + merges.txt) and its command ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = files["vocab.json"], files["merges.txt"]
    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files  # noqa: BLE001 - tokenizers / sentencepiece raise a bare Exception on a malformed file
        raise TokenizerError(f"cannot read byte-level BPE files {vocab} and {merges}: {exc}") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = _TokenizersText(tok)
    n = text.size  # the original's num_tokens = len(encoder)
    if kind == "gpt2":
        t = _lookup(tok, ["<|endoftext|>"], vocab, "GPT-2 vocabulary (a RoBERTa vocab.json needs kind='roberta')")
        # GLM-2B/10B: sop, eop, ENC, MASK, sep, unk, then gMASK, sMASK, dBLOCK after the 50257 ids (docs/glm.md 7)
        special = {
            "pad": t("<|endoftext|>"),
            "eos": t("<|endoftext|>"),
            **_after_vocab(n, options, middle=("ENC", "MASK", "sep", "unk")),
        }
    else:
        t = _lookup(tok, ["<s>", "</s>", "<unk>", "<mask>"], vocab, "RoBERTa vocabulary")
        special = {
            "pad": t("</s>"),
            "eos": t("</s>"),
            "sep": t("</s>"),
            "ENC": t("<s>"),
            "MASK": t("<mask>"),
            "unk": t("<unk>"),
            **_after_vocab(n, options),
        }
    return text, special


def read_bert(files: dict[str, Path], options: dict[str, Any]) -> tuple[TextVocabulary, dict[str, int]]:
    """Uncased BERT WordPiece (vocab.txt) and its command ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = files["vocab.txt"]
    try:
        tok = Tokenizer(models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    except Exception as exc:  # noqa: BLE001 - tokenizers / sentencepiece raise a bare Exception on a malformed file
        raise TokenizerError(f"cannot read WordPiece vocabulary {vocab}: {exc}") from None
    # uncased BERT: clean text, split CJK characters, lower-case and strip accents (docs/glm.md 7: lower-casing on)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    t = _lookup(tok, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], vocab, "BERT vocabulary")
    text = _TokenizersText(tok)
    special = {
        "pad": t("[PAD]"),
        "eos": t("[PAD]"),
        "sep": t("[SEP]"),
        "ENC": t("[CLS]"),
        "MASK": t("[MASK]"),
        "unk": t("[UNK]"),
        **_after_vocab(text.size, options),
    }
    return text, special


def read_sentencepiece(
    kind: str, files: dict[str, Path], options: dict[str, Any]
) -> tuple[TextVocabulary, dict[str, int]]:
    """The Chinese SentencePiece model (cog-pretrain.model) and ChineseSPTokenizer's command ids."""
    try:
        import sentencepiece
    except ImportError:
        raise TokenizerError(
            "the Chinese SentencePiece tokenizer needs the sentencepiece package: pip install sentencepiece"
        ) from None
    (model,) = files.values()
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    except Exception as exc:  # noqa: BLE001 - tokenizers / sentencepiece raise a bare Exception on a malformed file
        raise TokenizerError(f"cannot read SentencePiece model {model}: {exc}") from None
    text = _SentencePieceText(sp)
    special = chinese_sp_special_ids(
        text.size, kind == "chinese-sp-fix", options["task_mask"], options["decoder_mask"], options["hf_gmask"]
    )
    return text, special


def read_json(files: dict[str, Path]) -> tuple[TextVocabulary, dict[str, int]]:
    """glmx's tokenizer.json; its command ids are looked up by string."""
    from tokenizers import Tokenizer

    (path,) = files.values()
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers / sentencepiece raise a bare Exception on a malformed file
        raise TokenizerError(f"cannot read {path} as a tokenizers JSON file: {exc}") from None
    found = {name: tok.token_to_id(COMMAND_STRINGS[name]) for name in COMMAND_NAMES}
    special = {name: int(i) for name, i in found.items() if i is not None}  # look up by string, never assume
    missing = [COMMAND_STRINGS[name] for name in _JSON_REQUIRED if name not in special]
    if missing:
        raise TokenizerError(
            f"{path} lacks GLM's special tokens {missing}; train it with "
            f"glm_export.tokenizer_training.train_bpe_tokenizer "
            f"(special tokens {list(JSON_SPECIAL_TOKENS)})"
        )
    return _TokenizersText(tok), special
