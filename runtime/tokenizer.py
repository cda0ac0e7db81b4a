"""GLM's tokenizers without torch: one of the original vocabularies (read by glm_runtime.vocabularies, with the
command-token ids of docs/glm.md 7) behind one GLMTokenizer.

In: GPT-2 / RoBERTa / BERT / Chinese SentencePiece vocabulary files, ChatGLM-6B's ice_text.model (+ its
tokenizer_config.json) or glmx's tokenizer.json, a folder or a file.
Out: `GLMTokenizer` (`load_tokenizer` decides the kind and the files) and the blank-filling context ids of
docs/glm.md 4.1 (`build_context_ids`, `find_blanks`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from glm_runtime.architecture import CHATGLM_6B, GLM, GLM_130B, PromptRule
from glm_runtime.config import TOKENIZER_KINDS
from glm_runtime.ice_text import read_ice_text
from glm_runtime.manifest import atomic_write_bytes, atomic_write_json, sha256_file
from glm_runtime.vocabularies import (
    BPE_FILES,
    CHATGLM_COMMAND_STRINGS,
    CHATGLM_MODEL,
    COMMAND_NAMES,
    COMMAND_STRINGS,
    JSON_SPECIAL_TOKENS,
    TextVocabulary,
    TokenizerError,
    chatglm_image_tokens,
    chinese_sp_special_ids,
    read_bert,
    read_bpe,
    read_json,
    read_sentencepiece,
)

# Callers import these from here, with the tokenizer (the vocabularies are how it reads its files).
__all__ = [
    "BLANK_NAMES",
    "BPE_FILES",
    "COMMAND_NAMES",
    "COMMAND_STRINGS",
    "JSON_SPECIAL_TOKENS",
    "META_NAME",
    "BlankError",
    "GLMTokenizer",
    "TokenizerError",
    "build_context_ids",
    "chatglm_image_tokens",
    "chinese_sp_special_ids",
    "copy_tokenizer_files",
    "find_blanks",
    "load_tokenizer",
    "tokenizer_entry",
    "tokenizer_files",
]

BLANK_NAMES = ("MASK", "sMASK", "gMASK")

META_NAME = "glmx_tokenizer.json"  # kind and options, written by GLMTokenizer.save
# (task_mask, decoder_mask) of the released models: [gMASK]/[sMASK] only for task-mask models (docs/glm.md 9.14),
# [dBLOCK] where docs/glm.md 7's table lists it (GLM-2B/10B and both Chinese models).
_DEFAULT_OPTIONS = {
    "gpt2": (True, True),
    "roberta": (False, False),
    "bert": (False, False),
    "chinese-sp": (True, True),
    "chinese-sp-fix": (True, True),
}
FAMILY = {
    "gpt2": "bpe",
    "roberta": "bpe",
    "bert": "wordpiece",
    "chinese-sp": "sp",
    "chinese-sp-fix": "sp",
    "json": "json",
    "chatglm": "sp",
    "icetk": "sp",
}


def _command_strings(kind: str) -> dict[str, str]:
    """How each command token is written, in text and in decoded output: ChatGLM has its own ("<sop>", "</s>")."""
    if kind in ("chatglm", "icetk"):  # GLM-130B's icetk: the same pieces, appended (glm_runtime.ice_text)
        return dict(CHATGLM_COMMAND_STRINGS)
    return dict(COMMAND_STRINGS, **({"pad": "[PAD]", "eos": "[PAD]"} if kind == "bert" else {}))


class BlankError(TokenizerError):
    """A blank-filling prompt has no blank token ([MASK], [sMASK] or [gMASK]) to fill."""


def check_unicode(text: str) -> None:
    """Text must be Unicode text, which a str may not be: bytes that were not UTF-8 reach Python as lone surrogates
    U+DC80..U+DCFF (a command-line argument, decoded as os.fsdecode does), and a JSON "\\ud800" escape without
    its pair is one too. No tokenizer can encode them; say where, and the fix."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        if 0xDC80 <= char <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            raise TokenizerError(
                f"the text is not UTF-8: byte 0x{char - 0xDC00:02x} at character {exc.start} is not part of a "
                f"UTF-8 character (an argument or file in another encoding); write it as UTF-8"
            ) from None
        raise TokenizerError(
            f"the text holds a lone surrogate U+{char:04X} at character {exc.start} (a JSON \\u escape without its "
            f"pair), which is not Unicode text; send the character itself, or both halves of its escape"
        ) from None


# ---------------------------------------------------------------- the tokenizer


class GLMTokenizer:
    """One GLM vocabulary: text ids from the underlying tokenizer plus GLM's command tokens.

    Built by `load_tokenizer`. `special` maps command names (pad, eos, sep, ENC, MASK, unk, sop, eop, gMASK,
    sMASK, dBLOCK; only those this vocabulary has) to ids; `mask_ids` are the blank tokens present.
    """

    def __init__(
        self, kind: str, text: TextVocabulary, special: dict[str, int], files: dict[str, Path], options: dict[str, Any]
    ) -> None:
        self.kind, self._text, self.files, self.options = kind, text, dict(files), dict(options)
        self.special = {name: special[name] for name in COMMAND_NAMES if name in special}
        strings = _command_strings(kind)
        self.command_strings = {name: strings[name] for name in self.special}
        self._string_to_id = {strings[name]: i for name, i in self.special.items()}
        self._id_to_string: dict[int, str] = {}
        # An id shared by several names decodes as a blank if it is one (GLM-10B-Chinese gMASK == eop, which a
        # prompt shows and a generated span never holds), else as the first name (RoBERTa pad = eos = sep).
        for name in sorted(self.special, key=lambda name: name not in BLANK_NAMES):
            self._id_to_string.setdefault(self.special[name], strings[name])
        # Spec 7: whitespace right before [MASK]/[sMASK]/[gMASK] is dropped (lstrip) except in WordPiece,
        # which discards whitespace anyway.
        self._lstrip = set() if kind == "bert" else {strings[n] for n in BLANK_NAMES if n in self.special}
        pattern = "|".join(re.escape(s) for s in sorted(self._string_to_id, key=len, reverse=True))
        self._split = re.compile(f"({pattern})")
        self.mask_ids = tuple(self.special[n] for n in BLANK_NAMES if n in self.special)
        self.vocab_size = max(text.size, max(self.special.values()) + 1)  # unpadded, specials included
        # how a prompt's context is laid out (glm_runtime.architecture): the architecture the vocabulary belongs
        # to by default; glm_runtime.session.open_model sets the model's own
        self.prompt: PromptRule = {"chatglm": CHATGLM_6B, "icetk": GLM_130B}.get(kind, GLM).prompt

    def __repr__(self) -> str:
        return f"GLMTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, special={self.special})"

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token's text can hold: a command's string, or what the vocabulary says (a token
        string's length: a byte-level token's string has a character per byte, a WordPiece one its ## too; 80 for
        ChatGLM, whose <|blank_80|> is 80 spaces), so no text of more than P x this fits P tokens. (A WordPiece
        [UNK] stands for a whole unknown word; words past 100 characters are refused by this bound.)"""
        lengths = [len(self.command_strings[name]) for name in self.special]
        return max([*lengths, self._text.longest_token_chars()])

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """The model's V: this size rounded up to a multiple of 128 (docs/glm.md 6)."""
        return -(-self.vocab_size // multiple) * multiple

    # encoding
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with command-token strings split out first as single ids; nothing added around."""
        if not text.isascii():
            check_unicode(text)
        ids: list[int] = []
        parts = self._split.split(text)  # even indices: plain text, odd: a command string
        for k in range(0, len(parts), 2):
            segment = parts[k]
            command = parts[k + 1] if k + 1 < len(parts) else None
            if command in self._lstrip:
                segment = segment.rstrip()
            if segment:
                ids.extend(self._text.encode(segment))
            if command is not None:
                ids.append(self._string_to_id[command])
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._id_to_string:
                if not skip_special_tokens:
                    if run:
                        parts.append(self._text.decode(run))
                        run = []
                    parts.append(self._id_to_string[i])
            elif self._text.first_id <= i < self._text.size:
                run.append(i)
            else:
                raise TokenizerError(
                    f"id {i} is not a token of this {self.kind} tokenizer (text ids {self._text.first_id}.."
                    f"{self._text.size - 1}, command ids {sorted(self._id_to_string)}); {self._no_text(i)}"
                )
        if run:
            parts.append(self._text.decode(run))
        return (" " if self.kind == "bert" else "").join(parts)  # WordPiece output is space separated

    def token_to_id(self, token: str) -> int:
        if token in self._string_to_id:
            return self._string_to_id[token]
        i = self._text.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{token!r} is not a token of this {self.kind} tokenizer{self._hint(token)}")
        return i

    def id_to_token(self, i: int) -> str:
        if i in self._id_to_string:
            return self._id_to_string[i]
        token = self._text.id_to_token(i) if self._text.first_id <= i < self._text.size else None
        if token is None:
            raise TokenizerError(
                f"id {i} is not a token of this {self.kind} tokenizer (size {self.vocab_size}); {self._no_text(i)}"
            )
        return token

    def _no_text(self, i: int) -> str:
        """Why id `i` has no text (a padded row, ChatGLM's image tokens, an id no token was given)."""
        if 0 <= i < self._text.first_id:
            return f"ids below num_image_tokens = {self._text.first_id} are image tokens, which have no text"
        if i >= self.vocab_size:
            return f"padded ids >= {self.vocab_size} have no text"
        return "no token has this id"

    def command_id(self, name: str) -> int:
        """Id of a command token by name ("eos", "gMASK", ...), with a clear error when the vocabulary lacks it."""
        if name in self.special:
            return self.special[name]
        if name not in COMMAND_NAMES:
            raise TokenizerError(f"unknown command token name {name!r}; names are {COMMAND_NAMES}")
        raise TokenizerError(f"this {self.kind} tokenizer has no {name} token{self._hint(COMMAND_STRINGS[name])}")

    def _hint(self, token: str) -> str:
        if token in ("[gMASK]", "[sMASK]", "[dBLOCK]") and self.kind != "json":
            option = "decoder_mask" if token == "[dBLOCK]" else "task_mask"
            return (
                f": {token} exists only when loaded with {option}=True (load_tokenizer(..., {option}=True)), "
                f"which must match how the model was trained"
            )
        return ""

    # saving and describing
    def save(self, folder: str | os.PathLike) -> Path:
        """Copy the vocabulary files into `folder` plus glmx_tokenizer.json (kind, options); load_tokenizer reads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            atomic_write_bytes(folder / name, Path(src).read_bytes())
        atomic_write_json(folder / META_NAME, {"kind": self.kind, "options": self.options})
        return folder

    def describe(self) -> dict[str, Any]:
        """The manifest's tokenizer entry: kind, options, special ids, and the sha256 of every vocabulary file."""
        hashes = {name: sha256_file(path) for name, path in self.files.items()}
        first = next(iter(self.files))
        return {
            "kind": self.kind,
            "file": first,
            "sha256": hashes[first],
            "files": hashes,
            "special_tokens": dict(self.special),
            "mask_ids": list(self.mask_ids),
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size(),
            "options": dict(self.options),
        }


# ---------------------------------------------------------------- loading


def load_tokenizer(
    path: str | os.PathLike,
    kind: str | None = None,
    *,
    task_mask: bool | None = None,
    decoder_mask: bool | None = None,
    hf_gmask: bool = False,
    num_image_tokens: int | None = None,
) -> GLMTokenizer:
    """Load a GLM tokenizer from a folder or a file.

    kind: one of TOKENIZER_KINDS; detected when left out (tokenizer.json -> json, vocab.json + merges.txt ->
    gpt2, vocab.txt -> bert, a folder written by GLMTokenizer.save -> its recorded kind). A SentencePiece
    *.model needs kind "chinese-sp-fix" (GLM-Large-Chinese), "chinese-sp" (GLM-10B-Chinese, original ids
    where gMASK == eop == 50007; hf_gmask=True for the Hugging Face checkpoints, gMASK = 50009) or "chatglm"
    (ChatGLM-6B's ice_text.model, either revision) or "icetk" (GLM-130B's icetk ice_text.model).
    task_mask / decoder_mask: add [gMASK]/[sMASK] and [dBLOCK]; default = what the released models used.
    num_image_tokens (chatglm, icetk): added to every id; default glm_runtime.ice_text.read_ice_text's.
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.is_dir() and (path / META_NAME).is_file():
        try:
            meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path / META_NAME} is corrupt ({exc}); save the tokenizer again") from None
        if kind is not None and kind != meta["kind"]:
            raise TokenizerError(f"{path} holds a {meta['kind']!r} tokenizer ({META_NAME}), not {kind!r}")
        kind = meta["kind"]
        saved = meta.get("options", {})
        task_mask = saved.get("task_mask") if task_mask is None else task_mask
        decoder_mask = saved.get("decoder_mask") if decoder_mask is None else decoder_mask
        hf_gmask = hf_gmask or saved.get("hf_gmask", False)
        num_image_tokens = saved.get("num_image_tokens") if num_image_tokens is None else num_image_tokens
    if kind is not None and kind not in TOKENIZER_KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
    kind, files = _find_files(path, kind)
    if num_image_tokens is not None and kind not in ("chatglm", "icetk"):
        raise TokenizerError(f"num_image_tokens applies only to kinds 'chatglm' and 'icetk', not {kind!r}")
    if kind in ("json", "chatglm", "icetk"):
        if task_mask is not None or decoder_mask is not None or hf_gmask:
            what = "tokenizer.json" if kind == "json" else f"{kind} tokenizer"
            raise TokenizerError(
                f"task_mask / decoder_mask / hf_gmask do not apply to a {what}: "
                f"its special tokens are looked up by string"
            )
        if kind == "json":
            text, special = read_json(files)
            return GLMTokenizer("json", text, special, files, {})
        text, special, options = read_ice_text(kind, files, num_image_tokens)
        return GLMTokenizer(kind, text, special, files, options)
    if hf_gmask and kind != "chinese-sp":
        raise TokenizerError(f"hf_gmask applies only to kind 'chinese-sp' (GLM-10B-Chinese), not {kind!r}")
    default_task, default_decoder = _DEFAULT_OPTIONS[kind]
    task_mask = default_task if task_mask is None else bool(task_mask)
    decoder_mask = (default_decoder and not hf_gmask) if decoder_mask is None else bool(decoder_mask)
    if hf_gmask and (decoder_mask or not task_mask):
        raise TokenizerError(
            "hf_gmask=True needs task_mask=True and decoder_mask=False "
            "(the HF GLM-10B-Chinese [gMASK] 50009 is the original [dBLOCK] id)"
        )
    options = {"task_mask": task_mask, "decoder_mask": decoder_mask, "hf_gmask": hf_gmask}
    if kind in ("gpt2", "roberta"):
        text, special = read_bpe(kind, files, options)
    elif kind == "bert":
        text, special = read_bert(files, options)
    else:
        text, special = read_sentencepiece(kind, files, options)
    return GLMTokenizer(kind, text, special, files, options)


def _find_files(path: Path, kind: str | None) -> tuple[str, dict[str, Path]]:
    """Which files make up the tokenizer at `path` (a folder or one of its files), and its kind."""
    folder = path.parent if path.is_file() else path
    family = files_family(path)
    if path.is_file():
        if family is None and kind is None:
            raise TokenizerError(f"cannot tell the tokenizer kind of {path}; pass kind= one of {TOKENIZER_KINDS}")
        if kind is not None and family is not None and FAMILY[kind] != family:
            raise TokenizerError(f"{path} is not a {kind!r} tokenizer file")
    else:
        if family is None and kind is None:
            raise TokenizerError(
                f"no tokenizer files in {folder}: expected tokenizer.json, vocab.json + "
                f"merges.txt, vocab.txt, or a SentencePiece *.model ({CHATGLM_MODEL} for ChatGLM-6B)"
            )
    if kind is None:
        if family == "sp":
            raise TokenizerError(
                f"a SentencePiece model ({path}) needs an explicit kind: 'chinese-sp-fix' for "
                f"GLM-Large-Chinese, 'chinese-sp' for GLM-10B-Chinese (their [gMASK] ids differ), 'chatglm' "
                f"for ChatGLM-6B's {CHATGLM_MODEL} or 'icetk' for GLM-130B's"
            )
        assert family is not None  # no files and no kind was refused above
        kind = {"json": "json", "bpe": "gpt2", "wordpiece": "bert"}[family]
    family = FAMILY[kind]
    if family == "bpe":
        files = {name: folder / name for name in BPE_FILES}
    elif family == "json":
        files = {"tokenizer.json": path if path.is_file() else folder / "tokenizer.json"}
    elif family == "wordpiece":
        files = {"vocab.txt": path if path.is_file() else folder / "vocab.txt"}
    elif path.is_file():
        files = {path.name: path}
    elif kind in ("chatglm", "icetk"):
        files = {CHATGLM_MODEL: folder / CHATGLM_MODEL}
    else:
        models = sorted(p.name for p in folder.glob("*.model"))
        chosen = "cog-pretrain.model" if "cog-pretrain.model" in models else models[0] if len(models) == 1 else None
        if chosen is None:
            found = f"several: {models}; pass the file itself" if models else "none"
            raise TokenizerError(f"{kind} needs a SentencePiece model in {folder} (cog-pretrain.model); found {found}")
        files = {chosen: folder / chosen}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise TokenizerError(f"the {kind} tokenizer needs {', '.join(files)}; missing: {', '.join(missing)}")
    return kind, files


def tokenizer_files(path: str | os.PathLike) -> dict[str, Path]:
    """Every file the tokenizer whose main file is `path` reads, by name (the main file first).

    In: one tokenizer file. Out: vocab.json or merges.txt -> both (a byte-level BPE is a pair, read from one
    folder); any other file -> itself. Only names are looked at, nothing is parsed. A missing file raises.
    """
    path = Path(path)
    names = BPE_FILES if path.name in BPE_FILES else (path.name,)
    files = {name: path.parent / name for name in names}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise TokenizerError(
            f"tokenizer {path} needs {' + '.join(files)} side by side in {path.parent}; missing: {', '.join(missing)}"
        )
    return files


def copy_tokenizer_files(files: dict[str, Path], folder: str | os.PathLike) -> dict[str, Any]:
    """Copy `files` (from tokenizer_files) into `folder`; returns the manifest's tokenizer entry for them:
    {"file": main file, "sha256": its hash, "files": {name: sha256} of every copied file}."""
    hashes = {}
    for name, src in files.items():
        shutil.copyfile(src, Path(folder) / name)
        hashes[name] = sha256_file(Path(folder) / name)
    first = next(iter(hashes))
    return {"file": first, "sha256": hashes[first], "files": hashes}


def tokenizer_entry(tok: GLMTokenizer, folder: str | os.PathLike) -> dict[str, Any]:
    """Copy the tokenizer's files into `folder`; -> its manifest entry (kind, options, special ids, hashes)."""
    return {**tok.describe(), **copy_tokenizer_files({n: Path(p) for n, p in tok.files.items()}, folder)}


# ---------------------------------------------------------------- the files of a tokenizer


_FAMILY_BY_SUFFIX = {".json": "json", ".model": "sp", ".txt": "wordpiece"}


def files_family(path: Path) -> str | None:
    """Which tokenizer family the files at `path` (a folder or one of its files) are, None if none."""
    if path.is_file():
        return "bpe" if path.name in BPE_FILES else _FAMILY_BY_SUFFIX.get(path.suffix)
    folder = path
    if (folder / "tokenizer.json").is_file():
        return "json"
    if (folder / "vocab.json").is_file():
        return "bpe"
    if (folder / "vocab.txt").is_file():
        return "wordpiece"
    return "sp" if any(folder.glob("*.model")) else None


# ---------------------------------------------------------------- the blank-filling context (docs/glm.md 4.1)


def find_blanks(ids: Sequence[int], tok: GLMTokenizer) -> list[tuple[int, int]]:
    """(position, mask id) of every blank token in `ids`, ascending (docs/glm.md 4.1 step 3)."""
    masks = set(tok.mask_ids)
    return [(pos, int(i)) for pos, i in enumerate(ids) if int(i) in masks]


def build_context_ids(tok: GLMTokenizer, text: str, *, append_gmask: bool = False) -> list[int]:
    """The context ids of a blank-filling prompt, laid out by tok.prompt (the model's architecture):
    GLM: [ENC] + encode(text) + [eos], without eos when the text ends with [gMASK] (docs/glm.md 4.1, 9.11);
    ChatGLM-6B: encode(text) alone, its span's <sop> following (chatglm_v1_spec.md 5); GLM-130B (generate.py,
    spec 5): encode(text), the [gMASK] id appended when it holds no blank (gmask_when_no_blank), then </s> unless
    the last token is a blank.

    A text without a blank is refused unless append_gmask (or the rule's gmask_when_no_blank), which appends
    " [gMASK]" (" [MASK]" for a vocabulary without [gMASK]) so the model continues the text; ChatGLM-6B and
    GLM-130B: the [gMASK] id right after the text's ids, exactly as their code appends it.
    """
    ids = tok.encode(text)
    rule = tok.prompt
    if not find_blanks(ids, tok) and not rule.cls_first and (append_gmask or rule.gmask_when_no_blank):
        ids = [*ids, tok.special["gMASK"]]  # GLM-130B's generate.py appends the command id, unasked
        if rule.eos_unless_last is None:
            return ids
    if not find_blanks(ids, tok):
        if not append_gmask:
            blanks = " ".join(tok.command_strings[n] for n in BLANK_NAMES if n in tok.special)
            foreign = [s for s in ("[sMASK]", "[gMASK]") if s in text and s not in tok._string_to_id]
            verb = "is" if len(foreign) == 1 else "are"
            note = f"; {' and '.join(foreign)} {verb} not a blank of this {tok.kind} tokenizer" if foreign else ""
            note += tok._hint(foreign[0]) if foreign else ""
            raise BlankError(
                f"the text has no blank to fill: put one of {blanks} where the model should write, "
                f"or pass append_gmask=True (glmx fill --append-gmask) to continue the text at its end{note}"
            )
        text = text + (" [gMASK]" if "gMASK" in tok.special else " [MASK]")
        ids = tok.encode(text)
    if rule.cls_first:
        ids = [tok.special["ENC"], *ids]
    if rule.eos_unless_last is not None and ids[-1] not in {
        tok.special[n] for n in rule.eos_unless_last if n in tok.special
    }:
        ids.append(tok.special["eos"])
    return ids
