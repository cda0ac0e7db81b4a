"""GLM's vocabularies, one reader per kind: GPT-2 and RoBERTa byte-level BPE, uncased BERT WordPiece, the Chinese
SentencePiece model and glmx's tokenizer.json, each with the command-token ids of docs/glm.md 7; and ChatGLM-6B's
text rules (ChatGLMText), which glm_runtime.ice_text puts on ice_text.model (ChatGLM-6B's and GLM-130B's icetk,
chatglm_v1_spec.md 6).

In: the files of one kind (glm_runtime.tokenizer.load_tokenizer decides the kind and finds them).
Out: (text vocabulary, command ids by name), which glm_runtime.tokenizer.GLMTokenizer wraps; nothing here
knows blanks or prompts.
"""

from __future__ import annotations

import json
import re
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
# ChatGLM-6B's command tokens are pieces of ice_text.model under its own strings (chatglm_v1_spec.md 6); no sep.
CHATGLM_COMMAND_STRINGS = {
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
CHATGLM_MODEL = "ice_text.model"  # ChatGLM-6B's SentencePiece model; tokenizer_config.json beside it
CHATGLM_CONFIG = "tokenizer_config.json"
CHATGLM_MAX_BLANK = 80  # runs of 2..80 spaces are one <|blank_N|> piece each
CHATGLM_TEXT_PIECES = ("<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, CHATGLM_MAX_BLANK + 1)))
BPE_FILES = ("vocab.json", "merges.txt")  # a GPT-2 / RoBERTa byte-level BPE is this pair, side by side


class TokenizerError(GLMXError, ValueError):
    """A tokenizer cannot be loaded, or a token or id the caller asked for is not in its vocabulary."""


# ---------------------------------------------------------------- text vocabularies (the vocabulary without commands)


class TextVocabulary(Protocol):
    """What GLMTokenizer needs of a vocabulary: text segments to ids and back, token lookups, its size.

    Text ids are first_id..size-1; ids below first_id have no text (ChatGLM's image tokens, else none)."""

    size: int
    first_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, i: int) -> str | None: ...

    def longest_token_chars(self) -> int:
        """The most characters the text of one id can hold."""
        ...


def _longest_token_string(text: TextVocabulary) -> int:
    """The longest token string: a byte-level token's string has a character per byte, a WordPiece one its ##
    too, so its length bounds the characters it stands for."""
    return max((len(token) for i in range(text.first_id, text.size) if (token := text.id_to_token(i))), default=0)


class _TokenizersText:
    """A `tokenizers.Tokenizer` (byte-level BPE or WordPiece) used on text segments only."""

    first_id = 0

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

    def longest_token_chars(self) -> int:
        return _longest_token_string(self)


class _SentencePieceText:
    first_id = 0

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

    def longest_token_chars(self) -> int:
        return _longest_token_string(self)


_BLANK_RUN = re.compile(" {2,}")
_BLANK_PIECE = re.compile(r"<\|blank_([1-9][0-9]?)\|>")  # as written by _blanks (no leading zero)


def _blanks(run: re.Match) -> str:
    """A run of spaces as <|blank_80|> pieces, longest first, then one piece for the rest (a single space stays)."""
    whole, rest = divmod(len(run.group()), CHATGLM_MAX_BLANK)
    return f"<|blank_{CHATGLM_MAX_BLANK}|>" * whole + (f"<|blank_{rest}|>" if rest > 1 else " " * rest)


def _spaces(piece: re.Match) -> str:
    n = int(piece.group(1))
    return " " * n if 2 <= n <= CHATGLM_MAX_BLANK else piece.group()


class ChatGLMText:
    """ice_text.model behind ChatGLM-6B's text rules (chatglm_v1_spec.md 6): newline, tab and runs of spaces become
    pieces of their own before SentencePiece and turn back after it; every id is shifted by num_image_tokens."""

    def __init__(self, sp: Any, num_image_tokens: int) -> None:
        self.sp, self.first_id = sp, num_image_tokens
        self.size = num_image_tokens + sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        text = _BLANK_RUN.sub(_blanks, text.replace("\n", "<n>").replace("\t", "<|tab|>"))
        return [i + self.first_id for i in self.sp.encode(text)]

    def decode(self, ids: list[int]) -> str:
        if any(i < self.first_id for i in ids):  # GLMTokenizer refuses them first; never decode them as text
            raise TokenizerError(f"ids below {self.first_id} are ChatGLM image tokens, which have no text")
        text = self.sp.decode([i - self.first_id for i in ids])
        return _BLANK_PIECE.sub(_spaces, text.replace("<n>", "\n").replace("<|tab|>", "\t"))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>; tell them apart
        return i + self.first_id if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i - self.first_id) if self.first_id <= i < self.size else None

    def longest_token_chars(self) -> int:
        # a piece's string is at least as long as its text (<0xF0> is one byte, <n> one character), except a
        # <|blank_N|>, which is N spaces
        longest = max(len(self.sp.id_to_piece(i)) for i in range(self.sp.get_piece_size()))
        return max(longest, CHATGLM_MAX_BLANK)


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


def load_sentencepiece(model: Path, what: str, proto: bytes | None = None) -> Any:
    """A SentencePieceProcessor for `model` (or for `proto`, its bytes as edited, glm_runtime.ice_text); a missing
    package or a malformed file is a one-line TokenizerError."""
    try:
        import sentencepiece
    except ImportError:
        raise TokenizerError(
            f"the {what} needs the sentencepiece package (one of glmx's dependencies): pip install sentencepiece"
        ) from None
    try:
        if proto is not None:
            return sentencepiece.SentencePieceProcessor(model_proto=proto)
        return sentencepiece.SentencePieceProcessor(model_file=str(model))
    except Exception as exc:  # noqa: BLE001 - tokenizers / sentencepiece raise a bare Exception on a malformed file
        raise TokenizerError(f"cannot read SentencePiece model {model}: {exc}") from None


def read_sentencepiece(
    kind: str, files: dict[str, Path], options: dict[str, Any]
) -> tuple[TextVocabulary, dict[str, int]]:
    """The Chinese SentencePiece model (cog-pretrain.model) and ChineseSPTokenizer's command ids."""
    (model,) = files.values()
    text = _SentencePieceText(load_sentencepiece(model, "Chinese SentencePiece tokenizer"))
    special = chinese_sp_special_ids(
        text.size, kind == "chinese-sp-fix", options["task_mask"], options["decoder_mask"], options["hf_gmask"]
    )
    return text, special


def json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (a tokenizer's config or vocabulary), or a one-line TokenizerError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path} as {what}: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not {what}")
    return data


def chatglm_image_tokens(folder: Path) -> tuple[int, str]:
    """ChatGLM's num_image_tokens as the hub folder's tokenizer_config.json says, and where that came from.

    The current ChatGLM-6B revision writes 0; the file before 2023-04-06 has no such key, and the remote code's
    default 20000 applies (as for GLM-130B's icetk). No file: a TokenizerError, since every id depends on it.
    """
    path = folder / CHATGLM_CONFIG
    if not path.is_file():
        raise TokenizerError(
            f"{folder} has no {CHATGLM_CONFIG} to give ChatGLM's num_image_tokens, which is added to every id and "
            f"differs by 20000 between revisions (0 in the current ChatGLM-6B, 20000 before 2023-04-06 and in "
            f"GLM-130B): pass it (load_tokenizer(..., num_image_tokens=0)) or put the hub's {CHATGLM_CONFIG} beside"
        )
    data = json_object(path, "a JSON object")
    if "num_image_tokens" not in data:
        return 20000, f"{CHATGLM_CONFIG} has none: the remote code's default, as before 2023-04-06"
    return image_tokens(data["num_image_tokens"], f"{path}'s num_image_tokens"), CHATGLM_CONFIG


def image_tokens(value: Any, what: str) -> int:
    """A num_image_tokens `value` checked: a whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TokenizerError(f"{what} must be a whole number >= 0 (0 or 20000 for ChatGLM-6B), got {value!r}")
    return value


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
