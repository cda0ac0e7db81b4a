"""ice_text.model in its three forms (chatglm_v1_spec.md 6): ChatGLM-6B's current file, which holds its command, tab,
blank and byte pieces; the file before 2023-04-06 and GLM-130B's icetk text model, which do not (the remote code
and icetk's GLM-130B tokenizer appended them at load time: `_configure_tokenizer`). Here they are appended the same
way, to the model's bytes, so one SentencePiece model gives every id.

In: the model file, the kind ("chatglm" or "icetk"), num_image_tokens if given. Out: the text vocabulary
(ChatGLM-6B's text rules, ids + num_image_tokens), the command ids by name, the options to record.

The appended block, after the text model's N pieces (GLM-130B: N = 130000, so + 20000 image tokens = 150000..):
  N+0..7    [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>   (CONTROL; GLM-130B names N+3 <eod>)
  N+8       <|tab|>, N+9..N+87 <|blank_2|>..<|blank_80|>                     (USER_DEFINED: matched whole in text)
  N+88..343 <0x00>..<0xFF>, with byte fallback switched on                   (BYTE)
The current ChatGLM-6B file is the old one with exactly this block: 2,706,249 - 2,699,926 = 6,323 bytes, which is
344 pieces (11 bytes of fields each plus their 2,536 characters: 6,320) and byte_fallback in trainer_spec (3).

The text rules are ChatGLM-6B's (<n>, <|tab|>, <|blank_N|>, byte fallback), as the GLM-130B tokenizer of the
FasterTransformer / PaddleNLP ports applies them. GLM-130B's own generate.py (SAT's icetk_glm_130B._IceTokenizer ->
icetk 0.0.7 IceTokenizer.encode) applies none: a newline is left to SentencePiece (ignore_linebreak=True), runs of
spaces and tabs too, and a character outside the vocabulary is <unk> (20000). Both give the same ids for text
without newlines, tabs, runs of spaces or unknown characters.

Editing the model is done on its protobuf wire format (appended pieces are appended fields; a second trainer_spec
is merged into the first), so the runtime needs no protobuf package.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from glm_runtime.vocabularies import (
    CHATGLM_COMMAND_STRINGS,
    CHATGLM_CONFIG,
    CHATGLM_TEXT_PIECES,
    ChatGLMText,
    TokenizerError,
    chatglm_image_tokens,
    image_tokens,
    load_sentencepiece,
)

ICE_KINDS = ("chatglm", "icetk")
ICETK_IMAGE_TOKENS = 20000  # icetk's num_image_tokens, a constant of the package (GLM-130B: ids 0..19999)
# The command pieces in the order they are appended (the remote code's SPTokenizer.special_tokens; GLM-130B's
# tokenizer has <eod> where ChatGLM has <unused_0>). None of them are made by text: CONTROL pieces.
APPENDED_COMMANDS = {
    "chatglm": ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"),
    "icetk": ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"),
}
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
# the text model's own pieces the command ids need (<n> is one of its pieces too, as the text rules need)
TEXT_MODEL_PIECES = ("<unk>", "</s>", "<pad>", "<n>")
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6  # ModelProto.SentencePiece.Type
_TRAINER_SPEC, _PIECES, _BYTE_FALLBACK = 2, 1, 35  # field numbers: ModelProto.trainer_spec / .pieces, TrainerSpec


def appended_pieces(kind: str) -> list[tuple[str, int]]:
    """(piece, type) of the block the remote code appends, in order (the module docstring's table)."""
    whitespace = CHATGLM_TEXT_PIECES[1:]  # <|tab|>, <|blank_2|>..<|blank_80|>; <n> is the text model's own
    return (
        [(p, _CONTROL) for p in APPENDED_COMMANDS[kind]]
        + [(p, _USER_DEFINED) for p in whitespace]
        + [(p, _BYTE) for p in BYTE_PIECES]
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (a string or a message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def append_pieces(model: bytes, kind: str) -> bytes:
    """The SentencePiece model `model` (its serialized ModelProto) with the appended block and byte fallback on:
    what `_configure_tokenizer` makes of it (pieces of score 0.0; the same model, other bytes)."""
    pieces = b"".join(
        _field(_PIECES, _field(1, piece.encode()) + b"\x15" + struct.pack("<f", 0.0) + _varint(3 << 3) + _varint(t))
        for piece, t in appended_pieces(kind)
    )
    byte_fallback = _field(_TRAINER_SPEC, _varint(_BYTE_FALLBACK << 3) + b"\x01")
    return model + pieces + byte_fallback


def read_ice_text(
    kind: str, files: dict[str, Path], num_image_tokens: int | None
) -> tuple[ChatGLMText, dict[str, int], dict[str, Any]]:
    """ChatGLM-6B's ice_text.model (kind chatglm, either revision) or GLM-130B's icetk text model (kind icetk), with
    ChatGLM-6B's text rules and num_image_tokens added to every id. -> (text, command ids by name, options).

    A file without the appended block gets it here (the old ChatGLM-6B file, icetk's); a file with all of it is the
    current ChatGLM-6B file; anything between is refused. num_image_tokens: given, else icetk's 20000, else
    tokenizer_config.json's (chatglm_image_tokens), else 20000 for an old file (the only revision it belongs to).
    Command ids are the model's pieces, looked up by string."""
    (model,) = files.values()
    what = "ChatGLM-6B tokenizer (ice_text.model)" if kind == "chatglm" else "GLM-130B icetk tokenizer (ice_text.model)"
    sp = load_sentencepiece(model, what)
    block = [piece for piece, _ in appended_pieces(kind)]
    held = [p for p in block if _holds(sp, p)]
    lacking = [p for p in TEXT_MODEL_PIECES if not _holds(sp, p)]
    if lacking:
        raise TokenizerError(
            f"{model} lacks the pieces {', '.join(lacking)}: not an ice_text.model (its text model has <unk>, </s>, "
            f"<pad> and <n>)"
        )
    if held and (len(held) < len(block) or kind == "icetk"):
        raise TokenizerError(_partial_block(model, kind, held, block, sp))
    appended = not held
    if appended:
        sp = load_sentencepiece(model, what, proto=append_pieces(model.read_bytes(), kind))
    if num_image_tokens is None:
        num_image_tokens = _image_tokens(kind, model, appended)
    options: dict[str, Any] = {"num_image_tokens": image_tokens(num_image_tokens, "num_image_tokens")}
    if appended:
        options["pieces_appended"] = True  # recorded: the ids of the block are computed, not read
    text = ChatGLMText(sp, options["num_image_tokens"])
    special = {name: text.token_to_id(piece) for name, piece in CHATGLM_COMMAND_STRINGS.items()}
    return text, {name: i for name, i in special.items() if i is not None}, options


def _image_tokens(kind: str, model: Path, appended: bool) -> int:
    if kind == "icetk" or (appended and not (model.parent / CHATGLM_CONFIG).is_file()):
        return ICETK_IMAGE_TOKENS
    return chatglm_image_tokens(model.parent)[0]


def _holds(sp: Any, piece: str) -> bool:
    return sp.id_to_piece(sp.piece_to_id(piece)) == piece  # an unknown piece maps to <unk>


def _partial_block(model: Path, kind: str, held: list[str], block: list[str], sp: Any) -> str:
    """Why a file holding (some of) the appended pieces is refused."""
    if kind == "icetk" and all(_holds(sp, p) for p, _ in appended_pieces("chatglm")):
        return (
            f"{model} already holds the command, tab, blank and byte pieces: it is ChatGLM-6B's current "
            f"ice_text.model, not GLM-130B's icetk text model (whose pieces are appended at load time); use kind "
            f"'chatglm'"
        )
    missing = [p for p in block if p not in held]
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"{model} holds {len(held)} of the {len(block)} pieces the {kind} tokenizer appends, lacking {shown}: "
        f"neither the current ChatGLM-6B ice_text.model (all of them) nor the file before 2023-04-06 or GLM-130B's "
        f"icetk text model (none, appended at load time)"
    )
