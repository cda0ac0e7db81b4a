"""Training glmx's own tokenizer (export side: only pretraining and the tests make vocabularies; the runtime only
loads them). In: texts or files, a vocabulary size. Out: a tokenizer.json with GLM's specials at ids 0..9."""

from __future__ import annotations

import os
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
