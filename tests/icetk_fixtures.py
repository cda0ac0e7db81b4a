"""A tiny GLM-130B icetk vocabulary for tests: a SentencePiece text model trained here without the pieces icetk's
GLM-130B tokenizer appends (glm_export.tokenizer_training.train_icetk_text_model; glm_runtime.ice_text appends them),
as the real ice_text.model of GLM-130B and of ChatGLM-6B before 2023-04-06. Nothing downloaded.

Ids: image tokens 0..19999 (no text), <unk> 20000, <s> 20001, </s> 20002 (GLM-130B's eos), <pad> 20003, <n> 20004,
the trained pieces, then the appended block from 20000 + N (N the model's pieces; GLM-130B: N = 130000, 150000..):
[MASK] [gMASK] [sMASK] <eod> <sop> <eop> <ENC> <dBLOCK>, <|tab|>, <|blank_2|>..<|blank_80|>, <0x00>..<0xFF>.
The whole vocabulary (about 20500 ids) fits the glm-130b-tiny preset's V = 21120.
"""

from __future__ import annotations

from pathlib import Path

from glm_export.tokenizer_training import ICETK_CORPUS as CORPUS
from glm_export.tokenizer_training import train_icetk_text_model as make_icetk_text_model
from glm_runtime.tokenizer import GLMTokenizer, load_tokenizer

__all__ = ["CORPUS", "icetk_tokenizer", "make_icetk_text_model"]


def icetk_tokenizer(folder: Path, seed: int = 0) -> GLMTokenizer:
    """A folder holding the tiny icetk ice_text.model, and its tokenizer (kind icetk)."""
    return load_tokenizer(make_icetk_text_model(folder / "ice_text.model", seed), kind="icetk")
