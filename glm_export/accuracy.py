"""Accuracy of a derived ONNX artifact (optimized, fp16, quantized) against its fp32 parent, and the budgets.

In: the parent and child glmx ONNX folders and held-out text. Out: a figures dict (max logit difference, top-1
agreement over teacher-forced Part B positions, greedy blank-fill agreement, Part B perplexity change) that goes
into the child's manifest, judged against the one per-scheme budget table below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from glm_runtime.iotable import past_names, present_names
from glm_runtime.manifest import Manifest, load_manifest
from glm_runtime.session import quiet_options

# Budgets per artifact kind, against the fp32 parent on held-out text. Measured on the bundled glmx-small
# (benchmarks/results/quantization_bundled.json, 800 positions, 16 prompts): top-1 fp16 0.9975, int8-dynamic
# 0.9925, qdq-int8 0.9912, int4-weight 0.9938, fills 16/16 each; quantizing the tied head too cost 0.7-1.2
# points of top-1 and up to 10/16 fills, so the head stays fp32 by default (quantize.KEEP_FP32). top1 = fraction of teacher-forced Part B positions whose argmax agrees;
# fill = fraction of blank prompts whose greedy fill is identical; ppl_change = |child ppl / parent ppl - 1|.
BUDGETS: dict[str, dict[str, float]] = {
    "optimized": {"top1": 0.999, "fill": 1.00, "ppl_change": 0.001, "max_logit_diff": 1e-3},
    # an fp16 graph's fused op (one Gelu) rounds to fp16 once where the parent rounded after each of its nodes:
    # logits may move by the fp16 parity tolerance (glm_export.parity.TOLERANCES["fp16"].atol)
    "optimized-fp16": {"top1": 0.999, "fill": 1.00, "ppl_change": 0.001, "max_logit_diff": 3e-2},
    "fp16": {"top1": 0.995, "fill": 0.90, "ppl_change": 0.005},
    "int8-dynamic": {"top1": 0.99, "fill": 0.75, "ppl_change": 0.02},
    "qdq-int8": {"top1": 0.98, "fill": 0.70, "ppl_change": 0.03},
    "int4-weight": {"top1": 0.95, "fill": 0.50, "ppl_change": 0.08},
}
WINDOW = 64  # tokens per teacher-forced window: half Part A, half Part B
FILL_TOKENS = 8  # greedy tokens generated per blank prompt


class BudgetError(ValueError):
    """A derived artifact lost more accuracy than its scheme's budget allows."""


def budget_misses(scheme: str, figures: dict[str, Any]) -> list[str]:
    """Human-readable misses of `figures` against BUDGETS[scheme] (empty when within budget)."""
    budget = BUDGETS[scheme]
    misses = []
    if figures["top1_agreement"] < budget["top1"]:
        misses.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {budget['top1']}")
    if figures["fill_agreement"] < budget["fill"]:
        misses.append(f"greedy fill agreement {figures['fill_agreement']:.3f} < {budget['fill']}")
    if abs(figures["ppl_change"]) > budget["ppl_change"]:
        misses.append(f"Part B perplexity change {figures['ppl_change']:+.4f} beyond ±{budget['ppl_change']}")
    if figures["max_logit_diff"] > budget.get("max_logit_diff", float("inf")):
        misses.append(f"max logit difference {figures['max_logit_diff']:.3g} > {budget['max_logit_diff']}")
    return misses


# ---------------------------------------------------------------- running one graph

class GraphRunner:
    """An onnxruntime CPU session over a glmx ONNX folder, fed by the IO table in its manifest."""

    def __init__(self, folder: str | Path, threads: int = 2):
        import onnxruntime as ort
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder, kind="onnx")
        self.io = self.manifest.io
        dtypes = {e["name"]: e["dtype"] for e in self.io["inputs"]}
        self.past = past_names(self.io)
        self.present = present_names(self.io)
        self.kv_dtype = np.dtype(dtypes[self.past[0][0]])
        shape = next(e["shape"] for e in self.io["inputs"] if e["name"] == self.past[0][0])
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), quiet_options(opts),
                                            providers=["CPUExecutionProvider"])

    def empty_past(self, batch: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        z = np.zeros((batch, self.heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [(z, z)] * len(self.past)

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """feeds (input_ids, position_ids, attention_mask, past...) -> (logits [B,T,V] fp32, presents per layer)."""
        names = ["logits"] + [n for pair in self.present for n in pair]
        out = self.session.run(names, {k: v.astype(self.kv_dtype) if k.startswith("past_key_values") else v
                                       for k, v in feeds.items()})
        return out[0].astype(np.float32), [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(len(self.present))]


def make_feeds(runner: GraphRunner, ids: Sequence[int], positions: Sequence[int], blocks: Sequence[int],
               mask: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch-1 call: ids/positions/blocks of its T tokens, bool mask [T, past+T], past per layer."""
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64)[None],
             "position_ids": np.stack([np.asarray(positions, np.int64), np.asarray(blocks, np.int64)])[None],
             "attention_mask": np.asarray(mask, dtype=bool)[None, None]}
    for (k_name, v_name), (k, v) in zip(runner.past, past):
        feeds[k_name], feeds[v_name] = k, v
    return feeds


def extend_past(past, presents):
    """present-is-new: the next call's past is the old past followed by this call's new K/V (seq axis 2)."""
    return [(np.concatenate([pk, nk], axis=2), np.concatenate([pv, nv], axis=2))
            for (pk, pv), (nk, nv) in zip(past, presents)]


def decode_mask(past_len: int, seq: int) -> np.ndarray:
    """Part B rows: every past slot visible, causal among the `seq` new tokens -> bool [seq, past+seq]."""
    return np.concatenate([np.ones((seq, past_len), bool), np.tril(np.ones((seq, seq), bool))], axis=1)


# ---------------------------------------------------------------- tokens and special ids

@dataclass(frozen=True)
class Specials:
    cls: int | None
    eos: int | None
    mask: int
    gmask: int
    sop: int
    eop: int


_NAMES = {"cls": ("[CLS]", "cls", "ENC"), "eos": ("<|endoftext|>", "eos", "eod", "[SEP]", "</s>"),
          "mask": ("[MASK]", "mask", "MASK"), "gmask": ("[gMASK]", "gmask", "gMASK"),
          "sop": ("<|startofpiece|>", "sop"), "eop": ("<|endofpiece|>", "eop")}


def load_tokenizer(folder: str | Path):
    from tokenizers import Tokenizer
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the accuracy report tokenizes held-out text with it")
    return Tokenizer.from_file(str(path))


def special_ids(folder: str | Path, manifest: Manifest | None = None) -> Specials:
    """Special-token ids from the manifest's tokenizer record, else from tokenizer.json's vocabulary."""
    manifest = manifest or load_manifest(folder, kind="onnx", verify=False)
    recorded = dict(manifest.tokenizer.get("special_tokens", {}) or {})
    tok = load_tokenizer(folder)
    found: dict[str, int | None] = {}
    for key, names in _NAMES.items():
        value = next((recorded[n] for n in names if isinstance(recorded.get(n), int)), None)
        if value is None:
            value = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
        found[key] = value
    if found["gmask"] is None:
        found["gmask"] = found["mask"]
    missing = [k for k in ("mask", "sop", "eop") if found[k] is None]
    if missing:
        raise ValueError(f"{folder}: cannot find the ids of {missing} in the manifest or tokenizer.json; "
                         f"the accuracy report needs them to build blank prompts")
    return Specials(**found)


def text_ids(folder: str | Path, text: str) -> np.ndarray:
    ids = load_tokenizer(folder).encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int64)


def strip_provenance(text: str) -> str:
    """Drop the leading '# ' provenance lines of a glmx text file."""
    lines = text.splitlines()
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return "\n".join(lines)


def split_text(text: str) -> tuple[str, str]:
    """(calibration half, evaluation half): alternate blank-line separated documents, so they never overlap."""
    docs = [d.strip() for d in strip_provenance(text).split("\n\n") if d.strip()]
    return "\n\n".join(docs[0::2]), "\n\n".join(docs[1::2])


# ---------------------------------------------------------------- GLM calls built from text

def windows(ids: np.ndarray, window: int, limit: int | None = None) -> Iterator[np.ndarray]:
    for start in range(0, len(ids) - window + 1, window):
        if limit is not None and start // window >= limit:
            return
        yield ids[start:start + window]


def blank_calls(runner: GraphRunner, chunk: np.ndarray, sp: Specials):
    """A teacher-forced document blank (spec 5, gpt mode) as two graph calls, context then span.

    Part A = [CLS] chunk[:a] [gMASK]   positions 0..a+1, block 0, bidirectional, past empty
    Part B = sop chunk[a:-1]           position a+1 (the gMASK), blocks 1.., sees Part A + causal
    targets of Part B = chunk[a:].  Yields (feeds_A, build_feeds_B(presents_A), targets).
    """
    a = len(chunk) // 2
    head = ([sp.cls] if sp.cls is not None else []) + chunk[:a].tolist() + [sp.gmask]
    c = len(head)
    feeds_a = make_feeds(runner, head, range(c), [0] * c, np.ones((c, c), bool), runner.empty_past())
    span = [sp.sop] + chunk[a:-1].tolist()
    t = len(span)

    def feeds_b(presents_a):
        return make_feeds(runner, span, [c - 1] * t, range(1, t + 1), decode_mask(c, t),
                          extend_past(runner.empty_past(), presents_a))
    return feeds_a, feeds_b, chunk[a:]


def teacher_forced(runner: GraphRunner, chunks: Sequence[np.ndarray], sp: Specials) -> list[np.ndarray]:
    """Part B logits [T, V] of every chunk (context call, then the span call on its cache)."""
    out = []
    for chunk in chunks:
        feeds_a, feeds_b, _ = blank_calls(runner, chunk, sp)
        _, presents = runner.run(feeds_a)
        logits, _ = runner.run(feeds_b(presents))
        out.append(logits[0])
    return out


def blank_prompts(ids: np.ndarray, sp: Specials, count: int, length: int = 24, hole: int = 4) -> list[list[int]]:
    """[CLS] left [MASK] right [eos] prompts: `hole` tokens of held-out text replaced by one [MASK]."""
    prompts = []
    for chunk in windows(ids, length, count):
        left, right = chunk[:length // 3].tolist(), chunk[length // 3 + hole:].tolist()
        prompts.append(([sp.cls] if sp.cls is not None else []) + left + [sp.mask] + right +
                       ([sp.eos] if sp.eos is not None else []))
    return prompts


def greedy_fill(runner: GraphRunner, prompt: list[int], sp: Specials, max_tokens: int = FILL_TOKENS) -> list[int]:
    """Greedy fill of the first [MASK] (spec 4.1): context pass, then one token per call on the cache."""
    c = len(prompt)
    m = prompt.index(sp.mask)
    _, presents = runner.run(make_feeds(runner, prompt, range(c), [0] * c, np.ones((c, c), bool),
                                        runner.empty_past()))
    past = extend_past(runner.empty_past(), presents)
    token, out = sp.sop, []
    for step in range(max_tokens):
        logits, presents = runner.run(make_feeds(runner, [token], [m], [step + 1], decode_mask(c + step, 1), past))
        past = extend_past(past, presents)
        token = int(np.argmax(logits[0, -1]))
        if token in (sp.eop, sp.eos):
            break
        out.append(token)
    return out


def runtime_fills(parent_dir, child_dir, ids: np.ndarray, sp: Specials, count: int):
    """Greedy fills through the runtime (open_session + fill_blanks) on text prompts with one [MASK] each.

    -> (parent fills, child fills, method); (None, [], reason) when the runtime cannot open one of the folders,
    and the caller falls back to greedy_fill on the graphs directly.
    """
    try:
        from glm_runtime.generate import fill_blanks
        from glm_runtime.session import open_session
        from glm_runtime.tokenizer import load_tokenizer as runtime_tokenizer
        sessions = [open_session(parent_dir), open_session(child_dir)]
        m = load_manifest(parent_dir, kind="onnx", verify=False)
        tok = runtime_tokenizer(Path(parent_dir) / m.tokenizer["file"], m.tokenizer.get("kind"))
    except Exception as exc:  # noqa: BLE001 - any refusal means: measure on the graphs directly
        return None, [], f"accuracy.greedy_fill (runtime refused: {type(exc).__name__}: {exc})"
    raw = load_tokenizer(parent_dir)
    texts = []
    for prompt in blank_prompts(ids, sp, count):
        body = [t for t in prompt if t not in (sp.cls, sp.eos)]
        k = body.index(sp.mask)
        texts.append(f"{raw.decode(body[:k])} [MASK] {raw.decode(body[k + 1:])}")
    fills = [[r.spans[0].token_ids for r in fill_blanks(s, tok, texts, max_new_tokens=FILL_TOKENS)]
             for s in sessions]
    return fills[0], fills[1], "glm_runtime.generate.fill_blanks (greedy)"


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


# ---------------------------------------------------------------- the report

def measure_accuracy(parent_dir: str | Path, child_dir: str | Path, text: str, *, max_windows: int = 48,
                     prompts: int = 16, threads: int = 2) -> dict[str, Any]:
    """Compare child to parent on `text` -> figures dict (goes into the child's manifest `parity`)."""
    parent, child = GraphRunner(parent_dir, threads), GraphRunner(child_dir, threads)
    sp = special_ids(parent_dir, parent.manifest)
    ids = text_ids(parent_dir, text)
    ids = ids[ids < int(parent.manifest.config["vocab_size"])]  # a tokenizer larger than the model: skip extras
    window = min(WINDOW, (int(parent.manifest.config["max_sequence_length"]) - 2) // 2 * 2)
    chunks = list(windows(ids, window, max_windows))
    if len(chunks) < 2:
        raise ValueError(f"held-out text gives {len(ids)} tokens, fewer than 2 windows of {window}: "
                         f"pass a longer text")
    lp, lc = teacher_forced(parent, chunks, sp), teacher_forced(child, chunks, sp)
    targets = [blank_calls(parent, c, sp)[2] for c in chunks]
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(lp, lc))
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(lp, lc)])
    nll_p = np.concatenate([_nll(a, t) for a, t in zip(lp, targets)]).mean()
    nll_c = np.concatenate([_nll(b, t) for b, t in zip(lc, targets)]).mean()
    finite = all(np.isfinite(b).all() for b in lc)
    fills_p, fills_c, fill_method = runtime_fills(parent_dir, child_dir, ids, sp, prompts)
    if fills_p is None:
        fills_p = []
        for prompt in blank_prompts(ids, sp, prompts):
            fills_p.append(greedy_fill(parent, prompt, sp))
            fills_c.append(greedy_fill(child, prompt, sp))
    same = [a == b for a, b in zip(fills_p, fills_c)]
    tok_agree = [sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1) for a, b in zip(fills_p, fills_c)]
    ppl_p, ppl_c = math.exp(nll_p), math.exp(nll_c)
    return {
        "parent": str(parent_dir), "positions": int(agree.size), "windows": len(chunks), "window": window,
        "finite": bool(finite), "max_logit_diff": max_diff,
        "top1_agreement": float(agree.mean()),
        "fill_prompts": len(same), "fill_method": fill_method, "fill_tokens": FILL_TOKENS,
        "fill_agreement": float(np.mean(same)) if same else 1.0,
        "fill_token_agreement": float(np.mean(tok_agree)) if tok_agree else 1.0,
        "ppl_parent": ppl_p, "ppl_child": ppl_c, "ppl_change": ppl_c / ppl_p - 1.0,
    }
