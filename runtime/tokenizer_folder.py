"""Which GLM tokenizer a folder holds, decided from the folder and checked against the model it belongs to.

In: a folder or tokenizer file (a Hugging Face hub folder, a Megatron checkpoint's root, glmx's own), the
model's config and layout. Out: the loaded GLMTokenizer and notes saying what was decided and why; a conflict
is a one-line TokenizerError. Also: the tokenizer a manifest's entry records, loaded with its kind and options.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glm_runtime.config import TOKENIZER_KINDS
from glm_runtime.tokenizer import FAMILY, META_NAME, GLMTokenizer, TokenizerError, files_family, load_tokenizer
from glm_runtime.vocabularies import CHATGLM_CONFIG, CHATGLM_MODEL, chatglm_image_tokens, json_object

# tokenizer_config.json's `tokenizer_class` in the released Hugging Face GLM folders (THUDM remote code)
HF_TOKENIZER_CLASSES = {
    "GLMBertTokenizer": "bert",
    "GLMGPT2Tokenizer": "gpt2",
    "GLMRobertaTokenizer": "roberta",
    "GLMChineseTokenizer": "chinese",
    "ChatGLMTokenizer": "chatglm",  # ChatGLM-6B (chatglm_v1_spec.md 6); ChatGLM2/3 reuse the name, not the files
}
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
FAMILY_FILES = {
    "json": "tokenizer.json",
    "bpe": "vocab.json + merges.txt",
    "wordpiece": "vocab.txt",
    "sp": "a SentencePiece *.model",
}
# Chinese SentencePiece: which id table a model of these sizes was trained with (docs/glm.md 7; presets:
# docs/glm.md 6)
_CHINESE_BY_SIZE = {(24, 1024): "chinese-sp-fix", (48, 4096): "chinese-sp"}
# ChatGLM-6B's embedding rows in each revision -> its num_image_tokens (chatglm_v1_spec.md 1 and 6)
_CHATGLM_IMAGE_TOKENS_BY_ROWS = {130528: 0, 150528: 20000}


def _hf_tokenizer_class(folder: Path) -> tuple[str | None, Path | None]:
    """tokenizer_class of `folder`/tokenizer_config.json (or its auto_map's AutoTokenizer), None when absent."""
    path = folder / HF_TOKENIZER_CONFIG
    if not path.is_file():
        return None, None
    data = json_object(path, "a JSON object")
    name = data.get("tokenizer_class")
    if not name:
        auto = (data.get("auto_map") or {}).get("AutoTokenizer")
        auto = auto[0] if isinstance(auto, list) and auto else auto
        name = auto.rsplit(".", 1)[-1] if isinstance(auto, str) else None
    return (str(name) if name else None), path


def _bpe_flavour(vocab: Path) -> str:
    """gpt2 or roberta from the vocabulary itself: RoBERTa has <s>/<mask>, GPT-2 <|endoftext|>."""
    tokens = json_object(vocab, "a BPE vocabulary (a JSON object of token -> id)")
    if "<mask>" in tokens and "<s>" in tokens:
        return "roberta"
    if "<|endoftext|>" in tokens:
        return "gpt2"
    raise TokenizerError(
        f"{vocab} has neither GPT-2's <|endoftext|> nor RoBERTa's <s>/<mask>: not a GLM byte-level BPE vocabulary"
    )


def resolve_tokenizer(
    path: str | os.PathLike, *, kind: str | None = None, config: Any = None, layout: str | None = None
) -> tuple[GLMTokenizer, list[str]]:
    """Decide which GLM tokenizer `path` (a folder or a tokenizer file) holds, load it, check it against the model.

    The folder decides, in this order: an explicit `kind`; tokenizer_config.json's tokenizer_class (the hub's
    GLMBertTokenizer, GLMGPT2Tokenizer, GLMRobertaTokenizer, GLMChineseTokenizer); the files present (a BPE
    vocabulary's own tokens tell GPT-2 from RoBERTa); for a Chinese SentencePiece model, the preset whose sizes
    match `config` (GLM-Large-Chinese vs GLM-10B-Chinese ids, docs/glm.md 7). A conflict between two of these, or a
    vocabulary that does not fit `config.vocab_size`, raises a one-line TokenizerError naming both sides.
    Returns (tokenizer, notes): the notes say what was decided and why, for the console and the manifest.
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.is_dir() and (path / META_NAME).is_file():  # written by GLMTokenizer.save: its kind is recorded
        tok = load_tokenizer(path, kind)
        return check_fits(tok, config, f"{path / META_NAME}"), [
            f"tokenizer: {tok.kind} (recorded in {path / META_NAME})"
        ]
    folder = path.parent if path.is_file() else path
    cls, cls_file = _hf_tokenizer_class(folder)
    if cls == "ChatGLMTokenizer" and not (path.is_file() or (folder / CHATGLM_MODEL).is_file()):
        raise TokenizerError(f"{cls_file} names {cls}, but {folder} has no {CHATGLM_MODEL}{_chatglm2(folder)}")
    family = files_family(path)
    if family is None:
        raise TokenizerError(
            f"no tokenizer files in {folder}: expected tokenizer.json, vocab.json + merges.txt, "
            f"vocab.txt, or a SentencePiece *.model"
        )
    notes = []
    from_class = None
    if cls is not None:
        if cls not in HF_TOKENIZER_CLASSES:
            raise TokenizerError(
                f"{cls_file} names tokenizer_class {cls!r}, which is not a GLM tokenizer glmx "
                f"knows ({', '.join(HF_TOKENIZER_CLASSES)}); pass the kind (--tokenizer-kind)"
            )
        from_class = HF_TOKENIZER_CLASSES[cls]
        want = "sp" if from_class == "chinese" else FAMILY[from_class]
        if want != family:
            raise TokenizerError(
                f"{cls_file} names {cls} ({FAMILY_FILES[want]}), but the tokenizer files are "
                f"{FAMILY_FILES[family]} ({path}); the folder mixes two tokenizers"
            )
    if kind is not None:
        if kind not in TOKENIZER_KINDS:
            raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
        if FAMILY[kind] != family:
            raise TokenizerError(
                f"tokenizer kind {kind!r} was asked for, but {path} holds {FAMILY_FILES[family]} "
                f"({'a ' + FAMILY[kind]} tokenizer is {FAMILY_FILES[FAMILY[kind]]})"
            )
        if from_class not in (None, "chinese") and from_class != kind:
            raise TokenizerError(f"tokenizer kind {kind!r} was asked for, but {cls_file} names {cls} ({from_class})")
        notes.append(f"tokenizer: {kind} (as asked)")
    elif from_class is not None and from_class != "chinese":
        kind = from_class
        assert cls_file is not None  # a tokenizer_class was read from it
        notes.append(f"tokenizer: {kind} ({cls_file.name}: tokenizer_class {cls})")
    elif family == "bpe":
        vocab = path if path.name == "vocab.json" else folder / "vocab.json"
        kind = _bpe_flavour(vocab)
        notes.append(f"tokenizer: {kind} (vocab.json + merges.txt; its tokens are {kind}'s)")
    elif family in ("json", "wordpiece"):
        kind = {"json": "json", "wordpiece": "bert"}[family]
        notes.append(f"tokenizer: {kind} ({FAMILY_FILES[family]})")
    hf_gmask = False
    ice = {"chatglm-6b": "chatglm", "glm-130b": "icetk"}.get(getattr(config, "architecture", None) or "")
    if family == "sp" and kind is None and ice is not None:
        kind = ice
        notes.append(f"tokenizer: {kind} (a SentencePiece model; the model's architecture is {config.architecture})")
    if family == "sp" and kind is None:
        sizes = (getattr(config, "num_layers", 0), getattr(config, "hidden_size", 0))  # 0: not a known size
        kind = _CHINESE_BY_SIZE.get(sizes)
        source = f"tokenizer_class {cls}, " if cls else ""
        if kind is not None:
            preset = "glm-large-chinese" if kind == "chinese-sp-fix" else "glm-10b-chinese"
            notes.append(
                f"tokenizer: {kind} ({source}SentencePiece model; the model's sizes L={sizes[0]} "
                f"h={sizes[1]} are {preset}'s, whose id table this is)"
            )
        elif layout == "hf":
            # both Hugging Face Chinese checkpoints use the fixed command ids (gMASK 50009, docs/glm.md 7 and 8.2)
            kind = "chinese-sp-fix"
            notes.append(
                f"tokenizer: chinese-sp-fix ({source}SentencePiece model in a Hugging Face folder: the "
                f"hub's Chinese GLMs use gMASK = sop + 3; sizes match no preset) - ASSUMED"
            )
        else:
            raise TokenizerError(
                f"{path} is a SentencePiece model, and the model's sizes (L={sizes[0]}, "
                f"h={sizes[1]}) match no Chinese preset: pass --tokenizer-kind chinese-sp-fix "
                f"(GLM-Large-Chinese ids) or chinese-sp (GLM-10B-Chinese, gMASK == eop)"
            )
    hf_gmask = kind == "chinese-sp" and layout == "hf"
    if hf_gmask:
        notes.append("tokenizer: Hugging Face gMASK convention (gMASK = sop + 3, its row a copy of eop's)")
    image_tokens = _chatglm_image_tokens(folder, config, notes) if kind == "chatglm" else None
    tok = load_tokenizer(path, kind, hf_gmask=hf_gmask, num_image_tokens=image_tokens)
    if kind == "icetk":
        notes.append(f"tokenizer: num_image_tokens {tok.options['num_image_tokens']} (icetk's constant)")
    if tok.options.get("pieces_appended"):
        notes.append(
            f"tokenizer: its file holds no command, tab, blank or byte pieces: appended at load as the original "
            f"tokenizer did ({tok.kind} ids {tok.special['MASK']}.. for [MASK]..<dBLOCK>)"
        )
    return check_fits(tok, config, str(path)), notes


def _chatglm2(folder: Path) -> str:
    """ChatGLM2/3-6B name their tokenizer ChatGLMTokenizer too, with a tokenizer.model: say so when it is that."""
    if (folder / "tokenizer.model").is_file():
        return " (ChatGLM-6B's vocabulary); its tokenizer.model is ChatGLM2/3-6B's, which glmx does not run"
    return " (ChatGLM-6B's vocabulary)"


def _chatglm_image_tokens(folder: Path, config: Any, notes: list[str]) -> int:
    """ChatGLM's num_image_tokens: tokenizer_config.json's, else the one of the revision whose V the model has. A
    file that disagrees with a released V is refused: every id would be off by 20000."""
    rows = getattr(config, "vocab_size", None)
    by_rows = _CHATGLM_IMAGE_TOKENS_BY_ROWS.get(rows) if isinstance(rows, int) else None
    if by_rows is not None and not (folder / CHATGLM_CONFIG).is_file():
        notes.append(
            f"tokenizer: num_image_tokens {by_rows} (no {CHATGLM_CONFIG}; V = {rows} is the ChatGLM-6B revision "
            f"with {by_rows}) - ASSUMED"
        )
        return by_rows
    n, source = chatglm_image_tokens(folder)
    if by_rows is not None and n != by_rows:
        raise TokenizerError(
            f"{folder / CHATGLM_CONFIG} gives num_image_tokens {n} ({source}), but the model's V = {rows} is the "
            f"ChatGLM-6B revision with {by_rows}: every id would be off by {abs(n - by_rows)}; pass the model's "
            f"own tokenizer files (--tokenizer)"
        )
    notes.append(f"tokenizer: num_image_tokens {n} ({source})")
    return n


def check_fits(tok: GLMTokenizer, config: Any, where: str) -> GLMTokenizer:
    """The tokenizer must belong to the model: every id an embedding row, and for the released GLM vocabularies the
    model's V is exactly the tokenizer's size padded to 128 (docs/glm.md 6; not ChatGLM's: 130344 ids, V 130528,
    nor GLM-130B's: 150344, V 150528)."""
    rows = getattr(config, "vocab_size", None)
    if rows is None:
        return tok
    padded = tok.kind not in ("json", "chatglm", "icetk")
    if tok.vocab_size > rows or (padded and tok.padded_vocab_size() != rows):
        model_of = f" (a model of V = {tok.padded_vocab_size()})" if padded else ""
        raise TokenizerError(
            f"the {tok.kind} tokenizer at {where} has {tok.vocab_size} ids{model_of}, but the model has {rows} "
            f"embedding rows: they do not belong together; pass the model's own tokenizer (--tokenizer)"
        )
    return tok


def load_recorded_tokenizer(folder: str | os.PathLike, entry: Mapping[str, Any]) -> GLMTokenizer:
    """The tokenizer a manifest's tokenizer entry describes (kind and options as recorded), checked against the
    special ids it recorded."""
    folder = Path(folder)
    if not entry.get("file"):
        raise TokenizerError(f"{folder} records no tokenizer")
    options = dict(entry.get("options") or {})
    kind = entry.get("kind")
    if kind in (None, "json"):
        tok = load_tokenizer(folder / entry["file"], kind)
    elif kind in ("chatglm", "icetk"):
        tok = load_tokenizer(folder / entry["file"], kind, num_image_tokens=options.get("num_image_tokens"))
    else:
        tok = load_tokenizer(
            folder / entry["file"],
            kind,
            task_mask=options.get("task_mask"),
            decoder_mask=options.get("decoder_mask"),
            hf_gmask=bool(options.get("hf_gmask")),
        )
    recorded = entry.get("special_tokens")
    if recorded and dict(recorded) != tok.special:
        raise TokenizerError(
            f"{folder}: the tokenizer's special ids {tok.special} differ from those its manifest "
            f"recorded {dict(recorded)}; the files or the manifest were changed"
        )
    return tok
