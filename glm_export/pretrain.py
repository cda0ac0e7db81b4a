"""Pretrain a GLM from scratch with the blank-infilling objective on a folder of text, on the CPU.

In: a folder of .txt files (documents = blank-line separated blocks), a model shape and optimiser settings.
Out: <work_dir>/tokenizer.json, <work_dir>/train_state.pt (everything needed to resume EXACTLY: model, optimizer,
lr schedule, RNG states, data position), <work_dir>/log.jsonl, and at the end a glmx checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from glm_export.collator import BlockCollator, CollatorConfig, SpecialIds
from glm_export.model import GLMModel
from glm_runtime.config import GLMConfig
from glm_runtime.errors import GLMXError
from glm_runtime.manifest import atomic_path
from glm_runtime.tokenizer import JSON_SPECIAL_TOKENS

# Ids 0..9 of every glmx BPE tokenizer (pad = eos = <|endoftext|> = 0, as in GLM's GPT-2 vocab pad == eos).
SPECIAL_TOKENS = JSON_SPECIAL_TOKENS
STATE_FILE = "train_state.pt"
TOKENIZER_FILE = "tokenizer.json"
SENTENCE_END_CHARS = ".?!;:\n"  # docs/glm.md 5, gap-sentence splitting
POSITION_INITS = ("local", "sinusoidal", "normal")
TOP_FREQUENCY = 3.0  # rad per position of the fastest sin/cos pair (see sinusoidal_positions)
LOCAL_HEAD_OFFSETS = (-1, 1)  # layer-0 heads that start looking at the previous / next token
LOCAL_HEAD_GAIN = 1.7  # neighbour logit ~10 above the rest once token embeddings have grown to POSITION_RMS
POSITION_RMS = 0.1  # element RMS of the sinusoidal table: about what trained token embeddings grow to


class PretrainError(GLMXError, ValueError):
    """A pretraining input or setting is unusable (empty corpus, resume with other settings, ...)."""


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the training trajectory; a resume must use the same values."""

    vocab_size: int = 8000  # tokenizer size before padding V to a multiple of 128
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    max_sequence_length: int = 512
    seq_length: int = 256  # tokens per sample before corruption
    batch_size: int = 16
    steps: int = 1000
    lr: float = 6e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    dropout: float = 0.1
    bert_prob: float = 1.0
    gap_sentence_prob: float = 0.0
    gpt_infill_prob: float = 1.0  # CollatorConfig.gpt_infill_prob; 1.0 = the collator before it existed
    heldout_fraction: float = 0.02
    eval_batches: int = 4
    seed: int = 0
    name: str = "glmx-pretrained"
    # how the learned position table and layer 0's first heads start (init_positions): "local", "sinusoidal" or
    # "normal" (GLM's own init). Only step 0 depends on it, so states saved before it existed resume unchanged.
    position_init: str = "local"

    def __post_init__(self) -> None:
        if self.position_init not in POSITION_INITS:
            raise PretrainError(f"position_init must be one of {POSITION_INITS}, got {self.position_init!r}")


# ---------------------------------------------------------------- corpus and tokenizer


def read_documents(corpus_dir: str | Path) -> list[str]:
    """All blank-line separated blocks of every .txt file under corpus_dir, in sorted file order."""
    files = sorted(Path(corpus_dir).rglob("*.txt"))
    if not files:
        raise PretrainError(
            f"no .txt files under {corpus_dir}; put text files there "
            f"(python glm_export/data/get_corpus.py {corpus_dir} installs the default corpus)"
        )
    docs = []
    for f in files:
        docs += [d.strip() for d in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    return docs


def is_heldout(doc: str, fraction: float) -> bool:
    """Deterministic split by content hash, so it does not depend on file order or the seed."""
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < fraction


def split_documents(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    train = [d for d in docs if not is_heldout(d, fraction)]
    held = [d for d in docs if is_heldout(d, fraction)]
    if not train or not held:
        raise PretrainError(
            f"the corpus has {len(docs)} documents; with heldout_fraction {fraction} one split "
            f"is empty. Add more text or change heldout_fraction"
        )
    return train, held


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_file: str | Path) -> None:
    """Byte-level BPE with glmx's special tokens at ids 0..9 (glm_export.tokenizer_training.train_bpe_tokenizer)."""
    from glm_export.tokenizer_training import train_bpe_tokenizer

    train_bpe_tokenizer(texts, vocab_size, out_file)


def load_corpus_tokenizer(path: str | Path):
    """The raw `tokenizers` object (its encode_batch is fast on the whole corpus), with the id layout checked."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise PretrainError(
                f"{path}: special token {t!r} has id {tok.token_to_id(t)}, expected {i}; "
                f"train the tokenizer with glmx's special-token layout"
            )
    return tok


def layout_special_ids() -> SpecialIds:
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    return SpecialIds(
        eos=ids["<|endoftext|>"],
        cls=ids["[CLS]"],
        mask=ids["[MASK]"],
        smask=ids["[sMASK]"],
        gmask=ids["[gMASK]"],
        sop=ids["<|startofpiece|>"],
        eop=ids["<|endofpiece|>"],
        dblock=ids["[dBLOCK]"],
        pad=ids["<|endoftext|>"],
    )


def sentence_end_table(tok) -> np.ndarray:
    """bool [vocab]: tokens whose text contains a sentence-ending character."""
    size = tok.get_vocab_size()
    table = np.zeros(size, dtype=bool)
    for i in range(len(SPECIAL_TOKENS), size):
        table[i] = any(c in tok.decode([i]) for c in SENTENCE_END_CHARS)
    return table


def token_stream(tok, docs: list[str]) -> np.ndarray:
    """[CLS] doc <eos> [CLS] doc <eos> ... as one int32 array."""
    sp = layout_special_ids()
    parts = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        parts.append(np.array([sp.cls, *enc.ids, sp.eos], dtype=np.int32))
    return np.concatenate(parts)


def cut_samples(stream: np.ndarray, seq_length: int) -> np.ndarray:
    """[N, seq_length] consecutive windows of the stream (samples span documents, docs/glm.md 5 sample_across_doc)."""
    n = len(stream) // seq_length
    if n == 0:
        raise PretrainError(f"the corpus has {len(stream)} tokens, fewer than one sample of seq_length {seq_length}")
    return stream[: n * seq_length].reshape(n, seq_length)


def padded_vocab(tokenizer_size: int) -> int:
    return -(-tokenizer_size // 128) * 128  # docs/glm.md 6: multiple of 128


# ---------------------------------------------------------------- training pieces


def _frequencies(hidden: int, top_frequency: float) -> torch.Tensor:
    """w_i = top_frequency * 10000^(-2i/hidden), i = 0 .. hidden/2 - 1 (float64)."""
    return top_frequency * torch.exp(-math.log(10000.0) * torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)


def sinusoidal_positions(rows: int, hidden: int, std: float, top_frequency: float = TOP_FREQUENCY) -> torch.Tensor:
    """A (rows, hidden) table: columns 2i, 2i+1 = sin, cos of p * w_i, w_i = top_frequency * 10000^(-2i/hidden),
    scaled to element RMS `std`. dot(row p, row p+k) depends on k only, so "the token k to the left" is one linear
    map at every position. top_frequency near pi (not the Transformer's 1) tells neighbours apart sharply."""
    pos = torch.arange(rows, dtype=torch.float64)[:, None]
    freq = _frequencies(hidden, top_frequency)
    table = torch.zeros(rows, hidden, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: hidden // 2])
    return (table * (std * math.sqrt(2.0))).float()  # each sin/cos pair has squares summing to 1


def local_head_weights(
    hidden: int, head_dim: int, offset: int, gain: float = LOCAL_HEAD_GAIN, top_frequency: float = TOP_FREQUENCY
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q, W_k), each (head_dim, hidden), of a head whose query at position p scores keys by
    sum_i cos(w_i (p + offset - p')) over the head_dim / 2 highest frequencies of sinusoidal_positions: the
    key at p' = p + offset wins. W_q reads the sin/cos columns as they are; W_k rotates each pair by -offset."""
    pairs = head_dim // 2
    freq = _frequencies(hidden, top_frequency)
    wq = torch.zeros(head_dim, hidden, dtype=torch.float64)
    wk = torch.zeros(head_dim, hidden, dtype=torch.float64)
    for m in range(pairs):
        c, s_ = math.cos(freq[m] * offset), math.sin(freq[m] * offset)
        wq[2 * m, 2 * m] = wq[2 * m + 1, 2 * m + 1] = gain
        # key pair (sin w p', cos w p') -> (sin w (p' - offset), cos w (p' - offset))
        wk[2 * m, 2 * m], wk[2 * m, 2 * m + 1] = gain * c, -gain * s_
        wk[2 * m + 1, 2 * m], wk[2 * m + 1, 2 * m + 1] = gain * s_, gain * c
    return wq.float(), wk.float()


@torch.no_grad()
def init_positions(model: GLMModel, how: str) -> None:
    """Re-initialise for PretrainSettings.position_init: "normal" keeps GLM's init; "sinusoidal" starts the
    position table (not the block-position table, which stays N(0, 0.02)) as sinusoidal_positions; "local" also
    makes layer 0's first LOCAL_HEAD_OFFSETS heads look at the token before / after their own position
    (local_head_weights). Their values, and everything else, keep GLM's random init.

    Why: the first token of a span is predicted from sop alone, so only its [MASK]'s neighbours in Part A can
    tell it; reaching them needs attention by relative position, built from learned absolute tables. From
    GLM's init a 4-layer model trained for a few thousand CPU steps never found them: its Part A attention put
    no more weight on neighbours than on any other token, first-token accuracy stayed at the unigram level and
    changing a [MASK]'s neighbour moved the first-token distribution no more than changing a token 40 away.
    Started at N(0, 0.02) beside token embeddings that grow to ~0.1 (tied to the head), the position signal
    fades after the input LayerNorm and positional attention logits with it (they go with its square): with
    an 0.02 sinusoidal table the local heads were gone within 200 steps. Hence POSITION_RMS.
    """
    if how == "normal":
        return
    table = model.transformer.position_embeddings
    table.weight.copy_(sinusoidal_positions(*table.weight.shape, POSITION_RMS))
    if how != "local":
        return
    h, d = model.config.hidden_size, model.config.head_dim
    qkv = model.transformer.layers[0].attention.query_key_value
    for head, offset in enumerate(LOCAL_HEAD_OFFSETS[: model.config.num_attention_heads]):
        wq, wk = local_head_weights(h, d, offset)
        qkv.weight[head * d : (head + 1) * d] = wq  # rows [all Q; all K; all V], head-major (docs/glm.md 1.3)
        qkv.weight[h + head * d : h + (head + 1) * d] = wk
        qkv.bias[head * d : (head + 1) * d] = 0.0
        qkv.bias[h + head * d : h + (head + 1) * d] = 0.0


def batch_to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items() if k != "mode"}


def part_b_logits(model: GLMModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of the Part B rows only, the head applied to those rows alone (about a fifth of the
    tokens): the tied head and the fp32 softmax over V dominate a small model's step; other rows need neither."""
    x, _ = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["sep"])  # sep [B]: Part A lengths
    rows = batch["loss_mask"].bool()
    return model.lm_head(x[rows]), batch["target_ids"][rows]  # (n_loss_tokens, V), (n_loss_tokens,)


def model_loss(model: GLMModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean fp32 cross entropy over the Part B rows (part_b_logits); logit i predicts target i, with no shift
    (docs/glm.md 5 and 9.9)."""
    logits, targets = part_b_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def lr_factor(step: int, s: PretrainSettings) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr_ratio at `steps`."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: GLMModel, s: PretrainSettings) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights get no weight decay (as in the original)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or "layernorm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(s.beta1, s.beta2),
        eps=s.adam_eps,
    )


def batch_indices(step: int, n_samples: int, batch_size: int, seed: int) -> np.ndarray:
    """Sample indices of a step: epochs are seeded permutations, so the data position is just the step."""
    per_epoch = n_samples // batch_size
    if per_epoch == 0:
        raise PretrainError(f"{n_samples} training samples cannot fill one batch of {batch_size}")
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 1, epoch]).permutation(n_samples)
    return order[k * batch_size : (k + 1) * batch_size]


def collate_step(collator: BlockCollator, samples: np.ndarray, step: int, seed: int) -> dict[str, np.ndarray]:
    return collator(list(samples), np.random.default_rng([seed, 2, step]))


def eval_batches(
    collator: BlockCollator, heldout: np.ndarray, batch_size: int, n_batches: int, seed: int, mode: str = "bert"
) -> list[dict[str, torch.Tensor]]:
    """A fixed set of held-out batches (same corruption every time it is called with the same seed)."""
    rng = np.random.default_rng([seed, 3])
    out = []
    for b in range(n_batches):
        chunk = heldout[b * batch_size : (b + 1) * batch_size]
        if len(chunk) == 0:
            break
        out.append(batch_to_tensors(collator(list(chunk), rng, mode=mode)))
    return out


@torch.no_grad()
def heldout_metrics(model: GLMModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean Part B loss and the top-1 accuracy of each span's FIRST token (the one predicted from
    sop alone, so only the [MASK]'s surroundings can tell it), in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count, first_hits, firsts = 0.0, 0, 0, 0
    sop = layout_special_ids().sop
    for batch in batches:
        logits, targets = part_b_logits(model, batch)
        logits = logits.float()
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
        first = batch["input_ids"][batch["loss_mask"].bool()] == sop
        first_hits += int((logits.argmax(-1) == targets)[first].sum())
        firsts += int(first.sum())
    model.train(was_training)
    return {"heldout_loss": total / count, "heldout_first_token_acc": first_hits / max(1, firsts)}


# ---------------------------------------------------------------- the entry function


@dataclasses.dataclass
class TrainingData:
    """What a run trains and is judged on, derived from the corpus folder and the settings (deterministically)."""

    tokenizer_file: Path
    config: GLMConfig
    train: np.ndarray  # [samples, seq_length] token ids
    held: np.ndarray
    collator: BlockCollator
    eval_fixed: list[dict[str, torch.Tensor]]  # the held-out batches every evaluation scores


def prepare_data(corpus_dir: str | Path, work: Path, s: PretrainSettings) -> TrainingData:
    """Split the corpus, train (once, kept in work) and load the tokenizer, cut samples, fix the eval batches."""
    docs = read_documents(corpus_dir)
    train_docs, held_docs = split_documents(docs, s.heldout_fraction)
    tok_file = work / TOKENIZER_FILE
    if not tok_file.exists():
        train_tokenizer(iter(train_docs), s.vocab_size, tok_file)
    tok = load_corpus_tokenizer(tok_file)
    config = GLMConfig(
        num_layers=s.num_layers,
        hidden_size=s.hidden_size,
        num_attention_heads=s.num_attention_heads,
        vocab_size=padded_vocab(tok.get_vocab_size()),
        max_sequence_length=s.max_sequence_length,
        hidden_dropout=s.dropout,
        attention_dropout=s.dropout,
        name=s.name,
    )
    if s.seq_length + 1 > s.max_sequence_length:  # gpt mode adds one token ([gMASK]) before Part B
        raise PretrainError(f"seq_length {s.seq_length} needs max_sequence_length >= {s.seq_length + 1}")
    train = cut_samples(token_stream(tok, train_docs), s.seq_length)
    held = cut_samples(token_stream(tok, held_docs), s.seq_length)
    modes = CollatorConfig(
        bert_prob=s.bert_prob, gap_sentence_prob=s.gap_sentence_prob, gpt_infill_prob=s.gpt_infill_prob
    )
    collator = BlockCollator(layout_special_ids(), modes, sentence_end=sentence_end_table(tok))
    return TrainingData(
        tok_file, config, train, held, collator, eval_batches(collator, held, s.batch_size, s.eval_batches, s.seed)
    )


def _numpy_state_globals() -> list[Any]:
    """What numpy's RNG state (a uint32 array) needs to unpickle: train states saved before they held it as a plain
    list still resume. Only array reconstruction, no other callable."""
    from numpy._core.multiarray import _reconstruct  # numpy's own pickle hook for arrays

    # numpy 1 wrote the hook's name as numpy.core.multiarray, numpy 2 as numpy._core.multiarray
    alias = (_reconstruct, "numpy.core.multiarray._reconstruct")
    return [_reconstruct, alias, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(state_path: Path) -> dict[str, Any]:
    """train_state.pt through torch.load(weights_only=True): tensors and plain containers only, so a planted
    pickle runs no code; refused in one line (PretrainError) when it holds anything else or is not readable."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_state_globals()):
            saved = torch.load(state_path, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise PretrainError(
            f"{state_path} holds objects other than tensors and plain containers"
            f"{f' (it names {named.group(1)})' if named else ''}: glmx loads train states with weights_only=True, so "
            f"none of its code ran; it was not written by glmx pretrain: move it away to start over"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PretrainError(
            f"{state_path} is not a train state glmx can read ({why}); move it away to start over"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise PretrainError(f"{state_path} is not a glmx train state (no settings); move it away to start over")
    return saved


def read_saved_state(state_path: Path, s: PretrainSettings) -> dict[str, Any] | None:
    """The saved train state to resume from (None: start), refused when it was trained with other settings."""
    if not state_path.exists():
        return None
    saved = load_state(state_path)
    # a setting added since the save takes its default, which reproduces the old run
    saved["settings"] = {**dataclasses.asdict(PretrainSettings()), **saved["settings"]}
    now = dataclasses.asdict(s)
    if saved["settings"] != now:
        diff = {k: (v, now[k]) for k, v in saved["settings"].items() if now[k] != v}
        raise PretrainError(
            f"{state_path} was trained with other settings (saved, now): {diff}; "
            f"use the same settings to resume, or another work_dir to start over"
        )
    return saved


def numpy_rng_state() -> tuple[Any, ...]:
    """numpy's global RNG state with its key array as a list of ints: a train state holds tensors and plain
    containers only, so it loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))


class Trainer:
    """The model, its optimizer and schedule, the step and the evaluations so far: what a checkpoint saves and a
    resume restores (with the three RNG states), so a resumed run is bitwise the uninterrupted one."""

    def __init__(self, config: GLMConfig, s: PretrainSettings):
        torch.manual_seed(s.seed)
        self.settings, self.config = s, config
        self.model = GLMModel(config).train()
        init_positions(self.model, s.position_init)
        self.optimizer = make_optimizer(self.model, s)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(k, s))
        self.step, self.evals = 0, []

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        name, keys, *rest = saved["rng"]["numpy"]  # keys: a list (plain) or, in older states, a uint32 array
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        random.setstate(saved["rng"]["python"])
        self.step, self.evals = saved["step"], saved["evals"]

    def save(self, state_path: Path) -> None:
        state = {
            "settings": dataclasses.asdict(self.settings),
            "config": self.config.to_dict(),
            "step": self.step,
            "evals": self.evals,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate()},
        }
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """One optimizer step on one batch. -> (loss, gradient norm before clipping)."""
        loss = model_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach()), float(grad_norm)

    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        ev = {"step": self.step, **heldout_metrics(self.model, batches)}
        ev["heldout_ppl"] = math.exp(ev["heldout_loss"])
        self.evals.append(ev)
        return ev


def pretrain(
    corpus_dir: str | Path,
    work_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    *,
    checkpoint_every: int = 100,
    eval_every: int = 100,
    stop_after: int | None = None,
    threads: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Train (or resume) a GLM in work_dir; at the last step save a glmx checkpoint to checkpoint_dir.

    settings: fields of PretrainSettings. If work_dir holds a train_state.pt it is resumed, and the settings
    must equal the saved ones. stop_after = stop (with a checkpoint) after this many steps of this call.
    Returns {"step", "losses" (this call's per-step training losses), "evals", "checkpoint_dir"}.
    """
    s = PretrainSettings(**settings)
    if checkpoint_dir is not None:  # refused now, not after hours of training
        from glm_runtime.manifest import check_output

        check_output(checkpoint_dir, overwrite=overwrite, inputs=[corpus_dir, work_dir])
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    state_path = work / STATE_FILE
    saved = read_saved_state(state_path, s)
    data = prepare_data(corpus_dir, work, s)
    trainer = Trainer(data.config, s)
    if saved is not None:
        trainer.restore(saved)

    def log(record: dict[str, Any]) -> None:
        with open(work / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    losses: list[float] = []
    end = s.steps if stop_after is None else min(s.steps, trainer.step + stop_after)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=s.steps, initial=trainer.step, desc="pretrain", unit="step", mininterval=5.0, file=sys.stderr)
    t0 = time.time()
    while trainer.step < end:
        step = trainer.step
        idx = batch_indices(step, len(data.train), s.batch_size, s.seed)
        loss, grad_norm = trainer.train_step(
            batch_to_tensors(collate_step(data.collator, data.train[idx], step, s.seed))
        )
        step = trainer.step
        losses.append(loss)
        lr = trainer.scheduler.get_last_lr()[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % 10 == 0 or step == end:
            log({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "elapsed_s": round(time.time() - t0, 1)})
        if step % eval_every == 0 or step == s.steps:
            ev = trainer.evaluate(data.eval_fixed)
            log(ev)
            if bar is not None:
                bar.write(
                    f"step {step}: held-out Part B loss {ev['heldout_loss']:.4f} (ppl {ev['heldout_ppl']:.1f}), "
                    f"span first-token accuracy {ev['heldout_first_token_acc']:.3f}"
                )
        if step % checkpoint_every == 0 or step == end:
            trainer.save(state_path)
    if bar is not None:
        bar.close()

    result: dict[str, Any] = {"step": trainer.step, "losses": losses, "evals": trainer.evals, "checkpoint_dir": None}
    if trainer.step >= s.steps and checkpoint_dir is not None:
        corpus_info = Path(corpus_dir) / "corpus.json"
        extra = {
            "pretraining": {
                "settings": dataclasses.asdict(s),
                "steps_done": trainer.step,
                "evals": trainer.evals,
                "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "corpus": json.loads(corpus_info.read_text()) if corpus_info.exists() else None,
                "train_samples": int(len(data.train)),
                "heldout_samples": int(len(data.held)),
            }
        }
        save_trained_checkpoint(trainer.model.eval(), checkpoint_dir, data.tokenizer_file, extra, overwrite=overwrite)
        result["checkpoint_dir"] = str(checkpoint_dir)
    return result


def save_trained_checkpoint(
    model: GLMModel, checkpoint_dir: str | Path, tokenizer_file: Path, extra: dict[str, Any], overwrite: bool = False
) -> None:
    """Write the trained model as a glmx checkpoint folder (fp16 safetensors + tokenizer + manifest)."""
    from glm_export.checkpoint import save_checkpoint

    save_checkpoint(
        model, checkpoint_dir, tokenizer_file=str(tokenizer_file), extra=extra, dtype=torch.float16, overwrite=overwrite
    )
