"""The one comparison harness: an artifact against its reference, both behind the runtime's session contract.

In: two sessions (glm_runtime.session.Session: ONNX Runtime, TensorRT or the torch reference), GLM's cases (the
blank-filling layouts of docs/glm.md 2-4, built here from its formulas) and, for derived artifacts, held-out
text tokenized by the runtime's tokenizer of any GLM kind. Out: a `Comparison` whose `to_dict()` is the one
shape of every manifest's `parity` record (export, optimize, quantize, build-engine), judged against the one
tolerance table (structure) and the one budget table (text).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.errors import GLMXError
from glm_runtime.iotable import LOGITS_START, accepts, past_names, present_names
from glm_runtime.prefix import prefix_length
from glm_runtime.session import Session, host_array

# ------------------------------------------------------------------ tolerances and budgets (the one table)


@dataclass(frozen=True)
class Tolerance:
    """A value passes when max |candidate - reference| <= atol + rtol * max |reference| (per case and output)."""

    atol: float
    rtol: float

    def allowed(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max

    def to_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "rule": "max|candidate-reference| <= atol + rtol*max|reference|"}


# fp32: the same arithmetic, only summation order differs, so the error grows with the values summed. The
# bundled model's export differs by about 1e-6 of max|ref| (its parity record:
# runtime/bundled/glmx-small-onnx/manifest.json), while a GeLU slip (tanh for erf, docs/glm.md 1.2) on a tiny model
# whose GeLU inputs are O(1) moves logits by several times atol (tests/test_published.py shows it caught). The
# rtol term scales the budget with GLM-10B-sized logits (max|ref| ~ 50, 48 layers of 4096).
# fp16: weights and the KV cache rounded to fp16 (LayerNorm, QK product, masking and softmax kept in fp32); on
# top of the values, top-1 must agree wherever the reference's top-1 / top-2 margin exceeds twice the budget.
TOLERANCES: dict[str, Tolerance] = {"fp32": Tolerance(atol=1e-4, rtol=3e-5), "fp16": Tolerance(atol=3e-2, rtol=5e-3)}

# Text budgets per derived artifact, against its parent on held-out text. What each scheme scores on the bundled
# glmx-small under the current defaults (quantize.default_keep_fp32, quantize.nbits_recipe), and its variants, is
# in benchmarks/results/quantization_bundled.json (python -m glmx_benchmarks.quantization); each budget sits below
# its scheme's figure there. top1 = share of teacher-forced Part B positions whose argmax agrees; fill = share of
# blank prompts whose greedy fill is identical; ppl_change = |child ppl / parent ppl - 1|.
BUDGETS: dict[str, dict[str, float]] = {
    "optimized": {"top1": 0.999, "fill": 1.00, "ppl_change": 0.001, "max_logit_diff": 1e-3},
    # an fp16 graph's fused op (one Gelu) rounds to fp16 once where the parent rounded after each of its nodes:
    # logits may move by the fp16 parity tolerance (TOLERANCES["fp16"].atol)
    "optimized-fp16": {"top1": 0.999, "fill": 1.00, "ppl_change": 0.001, "max_logit_diff": 3e-2},
    "fp16": {"top1": 0.995, "fill": 0.90, "ppl_change": 0.005},
    "int8-dynamic": {"top1": 0.99, "fill": 0.75, "ppl_change": 0.02},
    "qdq-int8": {"top1": 0.98, "fill": 0.70, "ppl_change": 0.03},
    "int4-weight": {"top1": 0.95, "fill": 0.50, "ppl_change": 0.08},
    "int8-weight": {"top1": 0.99, "fill": 0.75, "ppl_change": 0.02},
}
WINDOW = 64  # tokens per teacher-forced window: half Part A, half Part B
FILL_TOKENS = 8  # greedy tokens generated per blank prompt
TEXT_BATCH = 8  # held-out windows per teacher-forced call (one batch row each: the same figures, fewer calls)


WHOLE = "whole graph: every call of every case through one session of the artifact, and of the reference"


class ParityError(GLMXError, AssertionError):
    """The artifact does not match its reference: wrong names, wrong shapes, or values out of budget."""


class BudgetError(GLMXError, ValueError):
    """A derived artifact lost more accuracy on held-out text than its scheme's budget allows."""


# ------------------------------------------------------------------ calls and cases


@dataclass
class Call:
    """One session call of a case. The cache of earlier calls is handled by the harness."""

    input_ids: np.ndarray  # int64 [B, T]
    position_ids: np.ndarray  # int64 [B, 2, T]
    block: np.ndarray  # bool [B, T, T]: which of this call's tokens each of them sees (past slots: `seen`)
    keep: np.ndarray  # bool [B, T]: which of this call's tokens later calls see (padding: False)


@dataclass
class Case:
    name: str
    description: str
    calls: list[Call] = field(default_factory=list)


def _call(ids: Sequence[Sequence[int]], pos: np.ndarray, block: np.ndarray, keep: np.ndarray | None = None) -> Call:
    ids = np.asarray(ids, dtype=np.int64).reshape(len(ids), -1)
    B, T = ids.shape
    block = np.broadcast_to(np.asarray(block, dtype=bool), (B, T, T)).copy()
    keep = np.ones((B, T), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    return Call(ids, np.asarray(pos, dtype=np.int64).reshape(B, 2, T), block, keep)


# GLM's layouts from docs/glm.md's own formulas (positions: section 2, masks: 3.1), independent of
# glm_runtime.masks.
def _context_pos(c: int) -> np.ndarray:
    return np.stack([np.arange(c), np.zeros(c, dtype=np.int64)])  # Part A: (0..c-1, block 0)


def _span_pos(mask_pos: int, first: int, count: int) -> np.ndarray:
    return np.stack([np.full(count, mask_pos), np.arange(first + 1, first + count + 1)])  # Part B: (m, t+1)


def _sep(seq: int, sep: int) -> np.ndarray:
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    return (j < sep) | (j <= i)  # query i sees key j iff j < sep or j <= i


# Stand-in ids for the command tokens: parity depends on the layout (where blanks and spans sit), not on
# which vocabulary row is [MASK]; real ids per vocabulary are in docs/glm.md 7.
PAD, CLS, MASK, GMASK, SOP, EOS = 0, 1, 2, 3, 4, 5
FIRST_TEXT_ID = 8


def glm_cases(vocab_size: int, seed: int = 0) -> list[Case]:
    """The blank-filling situations an exported graph must get right (docs/glm.md 3 and 4)."""
    if vocab_size < FIRST_TEXT_ID + 8:
        raise ValueError(f"parity cases need a vocabulary of at least {FIRST_TEXT_ID + 8} ids, got {vocab_size}")
    rng = np.random.default_rng(seed)

    def text(n: int) -> list[int]:
        return rng.integers(FIRST_TEXT_ID, vocab_size, n).tolist()

    def one(ids, pos, block) -> Call:
        return _call([ids], pos[None], block[None])

    cases = []
    ctx = [CLS] + text(2) + [MASK] + text(3) + [EOS]
    C = len(ctx)
    cases.append(
        Case(
            "blank_mid_context",
            "context pass with a [MASK] mid-text, sep = C, past 0",
            [one(ctx, _context_pos(C), _sep(C, C))],
        )
    )

    # two blanks filled one after the other through the cache (docs/glm.md 4.2): span 1 token by token, span 2 on top
    # of it as a 3-token chunk (seq > 1 with past > 0), then one more single step
    t = text(5)
    ctx = [CLS, t[0], MASK, t[1], t[2], MASK, t[3], EOS]
    C, (m1, m2) = len(ctx), (2, 5)
    case = Case(
        "two_blanks_through_cache",
        "context pass, span 1 decoded token by token (past > 0), span 2 on top as a chunk and a single step",
        [one(ctx, _context_pos(C), _sep(C, C))],
    )
    for k, tok in enumerate([SOP] + text(2)):
        case.calls.append(one([tok], _span_pos(m1, k, 1), _sep(1, 0)))
    case.calls.append(one([SOP] + text(2), _span_pos(m2, 0, 3), _sep(3, 0)))
    case.calls.append(one(text(1), _span_pos(m2, 3, 1), _sep(1, 0)))
    cases.append(case)

    ctx = [CLS] + text(4) + [GMASK]  # [gMASK] at the end: no eos after it (docs/glm.md 4.1)
    C = len(ctx)
    case = Case(
        "gmask_at_end",
        "prefix [gMASK] context pass, then sop and two tokens through the cache",
        [one(ctx, _context_pos(C), _sep(C, C))],
    )
    for k, tok in enumerate([SOP] + text(2)):
        case.calls.append(one([tok], _span_pos(C - 1, k, 1), _sep(1, 0)))
    cases.append(case)

    t = text(8)  # the training-equivalent single pass: Part A + both spans, sep = C (docs/glm.md 4.2)
    ctx = [CLS, t[0], MASK, t[1], t[2], MASK, t[3], EOS]
    C = len(ctx)
    ids = ctx + [SOP, t[4], t[5], SOP, t[6], t[7]]
    pos = np.concatenate([_context_pos(C), _span_pos(2, 0, 3), _span_pos(5, 0, 3)], axis=1)
    cases.append(
        Case(
            "one_pass_two_spans",
            "Part A and two Part B spans in one pass (sep mask, 2D positions)",
            [one(ids, pos, _sep(len(ids), C))],
        )
    )

    # a batch whose rows have blanks at different places and lengths, padded left or right; padding slots get
    # token PAD and position (0, 0), see only themselves, and stay invisible to every later call
    rows = [
        [CLS] + text(1) + [MASK] + text(3) + [EOS],
        [CLS] + text(2) + [MASK, EOS],
        [CLS] + text(5) + [MASK] + text(2) + [EOS],
    ]
    mask_pos = [row.index(MASK) for row in rows]
    B, W = len(rows), max(len(r) for r in rows)
    for side, n_steps in (("right", 3), ("left", 2)):
        ids, pos, real = np.full((B, W), PAD), np.zeros((B, 2, W), np.int64), np.zeros((B, W), bool)
        for r, row in enumerate(rows):
            cols = slice(W - len(row), W) if side == "left" else slice(0, len(row))
            ids[r, cols], pos[r, :, cols], real[r, cols] = row, _context_pos(len(row)), True
        block = (real[:, None, :] & real[:, :, None]) | np.eye(W, dtype=bool)
        case = Case(
            f"batch_{side}_padding",
            f"3 rows of lengths {[len(r) for r in rows]}, blanks at {mask_pos}, "
            f"{side}-padded, then {n_steps} batched decode steps",
            [_call(ids, pos, block, real)],
        )
        for k in range(n_steps):
            toks = [[SOP]] * B if k == 0 else [text(1) for _ in rows]
            case.calls.append(_call(toks, np.stack([_span_pos(m, k, 1) for m in mask_pos]), np.ones((B, 1, 1))))
        cases.append(case)
    return cases


# ------------------------------------------------------------------ running a case on a session


class _Past:
    """The cache of one session over a case: exact-length numpy past for host sessions (past_seq grows call by
    call, as the runtime's loop feeds it, and starts at 0, or at P with the session's P-tuning prefix in front),
    the session's own device cache otherwise (its first P slots the prefix, as runtime/steps.open_cache makes it)."""

    def __init__(self, session: Session, batch: int, capacity: int):
        from glm_runtime.kvcache import KVCache
        from glm_runtime.steps import empty_past, open_cache

        probe = session.new_cache(batch, 1)  # which kind of cache the session keeps, for one slot
        self.device = None
        if not isinstance(probe, KVCache):
            if hasattr(probe, "close"):
                probe.close()
            self.device = open_cache(session, batch, capacity)
        self.names = past_names(session.io)
        self.arrays = empty_past(session, batch)  # nothing, or the prefix
        self.present = present_names(session.io)

    @property
    def slots(self) -> int:
        return self.device.capacity if self.device is not None else next(iter(self.arrays.values())).shape[2]

    def feeds(self) -> dict[str, Any]:
        return self.device.feeds() if self.device is not None else dict(self.arrays)

    def append(self, out: dict[str, Any], count: int) -> None:
        if self.device is not None:
            self.device.append(out, [count] * self.device.batch)
            return
        for (pk, pv), (nk, nv) in zip(self.names, self.present):
            self.arrays[pk] = np.concatenate([self.arrays[pk], host_array(out[nk])], axis=2)
            self.arrays[pv] = np.concatenate([self.arrays[pv], host_array(out[nv])], axis=2)

    def close(self) -> None:
        if self.device is not None and hasattr(self.device, "close"):
            self.device.close()


def _check_shapes(session: Session, out: dict[str, Any], B: int, T: int, k: int, rows: int) -> None:
    """Second check (after names): every output's concrete shape for this call (`rows` logits per row)."""
    cfg = session.config
    expected = {"logits": (B, rows, cfg.vocab_size)}
    expected.update(
        {name: (B, cfg.num_attention_heads, T, cfg.head_dim) for pair in present_names(session.io) for name in pair}
    )
    for name, shape in expected.items():
        got = tuple(host_array(out[name]).shape)
        if got != shape:
            raise ParityError(
                f"call {k}: output {name!r} of {describe(session)} has shape {list(got)}, expected {list(shape)}"
            )


def run_calls(
    session: Session,
    calls: Sequence[Call],
    record: list | None = None,
    last_row_only: bool = False,
    context_logits: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Every call of a case through `session`, each seeing the kept tokens of the calls before it.
    -> per call {"logits": [B,T,V] float32, present name: [B,n,T,d] float32}. record: the feeds given, appended.
    last_row_only: the final call asks for the last position's logits only (logits_start = -1).
    context_logits=False: the calls before the final one ask for their last row only where the session takes
    logits_start (a teacher-forced check that reads the final call's logits alone; [B,1,V] for those calls)."""
    B = calls[0].input_ids.shape[0]
    trim_context = not context_logits and accepts(session, LOGITS_START)
    past = _Past(session, B, sum(c.input_ids.shape[1] for c in calls))
    seen = np.ones((B, prefix_length(session)), dtype=bool)  # which slots later calls may see: a prefix, then fed
    outputs = []
    try:
        for call in calls:
            T = call.input_ids.shape[1]
            slots = past.slots
            visible = np.zeros((B, slots), dtype=bool)
            visible[:, : seen.shape[1]] = seen
            mask = np.concatenate([np.broadcast_to(visible[:, None, :], (B, T, slots)), call.block], axis=2)
            feeds = {
                "input_ids": call.input_ids,
                "position_ids": call.position_ids,
                "attention_mask": np.ascontiguousarray(mask[:, None]),
                **past.feeds(),
            }
            final = len(outputs) == len(calls) - 1
            one_row = (last_row_only and final) or (trim_context and not final)
            if one_row:
                feeds[LOGITS_START] = np.array([-1], dtype=np.int64)
            if record is not None:
                record.append(feeds)
            out = session.run(feeds)
            _check_shapes(session, out, B, T, len(outputs), 1 if one_row else T)
            outputs.append({k: host_array(v).astype(np.float32, copy=False) for k, v in out.items()})
            past.append(out, T)
            seen = np.concatenate([seen, call.keep], axis=1)
    finally:
        past.close()
    return outputs


# ------------------------------------------------------------------ structure: GLM's cases, value budgets


def describe(session: Session) -> str:
    """'OnnxRuntimeSession CPUExecutionProvider on FOLDER (fp32)': what a record's reference / candidate was."""
    parts = [type(session).__name__]
    providers = session.providers
    if providers:
        parts.append(providers[0] if isinstance(providers[0], str) else providers[0][0])
    where = session.folder
    if where is not None:  # the staged folder of the artifact being written has a random hidden name
        parts.append(f"on {'the artifact being written' if Path(where).name.endswith('.partial') else where}")
    return " ".join(parts) + f" ({session.precision})"


@dataclass
class Comparison:
    """The parity record of one artifact against its reference: structure on GLM's cases, text if measured."""

    stage: str
    reference: str
    candidate: str
    precision: str
    tolerance: Tolerance | None  # None: values are judged on held-out text only (quantized artifacts)
    cases: dict[str, dict[str, Any]]
    top1_agreement: float
    top1_decisive_mismatches: int
    text: dict[str, Any] | None = None  # held-out text figures (derived artifacts), see compare_on_text
    versions: dict[str, str] = field(default_factory=dict)
    method: str = WHOLE  # what was run: the whole graph per call, or one layer at a time (glm_export.pieces)

    @property
    def failures(self) -> list[str]:
        out = []
        for name, f in self.cases.items():
            for key in ("logits", "present_key", "present_value"):
                if self.tolerance is not None and (not np.isfinite(f[key]) or f[key] > f[f"allowed_{key}"]):
                    out.append(
                        f"{name}: {key} max |diff| {f[key]:.3e} > budget {f[f'allowed_{key}']:.3e} "
                        f"(max|ref| {f['ref_' + ('logits' if key == 'logits' else 'present')]:.3g})"
                    )
            if f["non_finite"]:
                out.append(f"{name}: the candidate's outputs contain NaN or inf ({', '.join(f['non_finite'][:3])})")
        if self.top1_decisive_mismatches:
            out.append(
                f"top-1 differs at {self.top1_decisive_mismatches} position(s) where the reference's margin "
                f"exceeds twice the logit budget"
            )
        if self.text is not None:
            out += [f"text: {m}" for m in self.text.get("misses", [])]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def max_diff(self, key: str) -> float:
        return max(f[key] for f in self.cases.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "reference": self.reference,
            "candidate": self.candidate,
            "precision": self.precision,
            "passed": self.passed,
            "failures": self.failures,
            "tolerance": self.tolerance.to_dict() if self.tolerance is not None else None,
            "max_abs_diff": {k: self.max_diff(k) for k in ("logits", "present_key", "present_value")},
            "max_abs_ref": {k: max(f[f"ref_{k}"] for f in self.cases.values()) for k in ("logits", "present")},
            "top1_agreement": self.top1_agreement,
            "top1_decisive_mismatches": self.top1_decisive_mismatches,
            "cases": self.cases,
            "text": self.text,
            "versions": self.versions,
            "method": self.method,
        }

    def table(self) -> str:
        tol = self.tolerance
        rule = f"budget {tol.atol:g} + {tol.rtol:g}*max|ref|" if tol else "values judged on held-out text only"
        lines = [
            f"{self.stage}: {self.candidate} vs {self.reference} ({rule}):",
            f"  {'case':26s} {'calls':>5s} {'logits':>10s} {'max|ref|':>9s} {'budget':>9s} {'present.k':>10s} "
            f"{'present.v':>10s} {'max|ref|':>9s} {'budget':>9s}",
        ]
        for name, f in self.cases.items():
            lines.append(
                f"  {name:26s} {f['calls']:5d} {f['logits']:10.3e} {f['ref_logits']:9.3g} "
                f"{f['allowed_logits']:9.2e} {f['present_key']:10.3e} {f['present_value']:10.3e} "
                f"{f['ref_present']:9.3g} {f['allowed_present_key']:9.2e}"
            )
        lines.append(
            f"  top-1 agreement {self.top1_agreement:.4f} ({self.top1_decisive_mismatches} decisive mismatches)"
        )
        if self.text is not None:
            t = self.text
            fills = "not run" if t["fill_agreement"] is None else f"{t['fill_agreement']:.3f}"
            lines.append(
                f"  held-out text ({t['language']}, {t['positions']} positions, {t['fill_prompts']} fills): "
                f"top-1 {t['top1_agreement']:.4f}, fills {fills}, ppl change "
                f"{ppl_change_text(t['ppl_change'])}, max logit diff {t['max_logit_diff']:.3g}"
            )
        return "\n".join(lines + [f"  MISS {x}" for x in self.failures])

    def __str__(self) -> str:
        return self.table()


def _check_names(candidate: Session, reference: Session) -> None:
    """First check: the two sessions take and give the same names (the IO table), in the same order."""
    from glm_runtime.iotable import required_inputs

    for kind in ("inputs", "outputs"):  # an optional input (logits_start) may be absent from an engine's table
        a = [e["name"] for e in (required_inputs(candidate.io) if kind == "inputs" else candidate.io[kind])]
        b = [e["name"] for e in (required_inputs(reference.io) if kind == "inputs" else reference.io[kind])]
        if a != b:
            missing, extra = [n for n in b if n not in a], [n for n in a if n not in b]
            raise ParityError(
                f"{kind} of the candidate do not match the reference's IO table: missing {missing}, "
                f"unexpected {extra}" + ("" if missing or extra else f", order {a} != {b}")
            )
    if prefix_length(candidate) != prefix_length(reference):  # both feed it, or neither (glm_runtime.prefix)
        raise ParityError(
            f"the candidate carries a P-tuning prefix of {prefix_length(candidate)} slots and the reference one of "
            f"{prefix_length(reference)}: they are not the same model"
        )


def compare_sessions(
    candidate: Session,
    reference: Session,
    *,
    stage: str,
    tolerance: Tolerance | None = None,
    cases: Iterable[Case] | None = None,
) -> Comparison:
    """Run GLM's cases through both sessions (names checked first, each call's shapes as it returns), then `judge`
    the values (and top-1)."""
    _check_names(candidate, reference)
    tol = tolerance or TOLERANCES.get(candidate.precision)  # None for quantized precisions
    cases = list(cases) if cases is not None else glm_cases(reference.config.vocab_size)
    # the candidate's last row asked for alone (logits_start = -1); not for quantized graphs, whose dynamic
    # activation scales depend on which rows are in the call
    last_row = tol is not None and accepts(candidate, LOGITS_START) and accepts(reference, LOGITS_START)
    presents = present_names(reference.io)
    figures: dict[str, dict[str, Any]] = {}
    logits: list[list[tuple[np.ndarray, np.ndarray]]] = []
    last_rows: dict[str, np.ndarray] = {}
    for case in cases:
        got_all, want_all = run_calls(candidate, case.calls), run_calls(reference, case.calls)
        f = figures[case.name] = case_figures(case)
        for k, (got, want) in enumerate(zip(got_all, want_all)):
            for i, names in enumerate(presents):
                measure_present(f, k, i, names, [got[n] for n in names], [want[n] for n in names])
        logits.append([(got["logits"], want["logits"]) for got, want in zip(got_all, want_all)])
        if last_row and case.calls[-1].input_ids.shape[1] > 1:
            last_rows[case.name] = run_calls(candidate, case.calls, last_row_only=True)[-1]["logits"]
    return judge(
        stage,
        describe(candidate),
        describe(reference),
        candidate.precision,
        tol,
        cases,
        figures,
        logits,
        last_rows=last_rows,
    )


# ------------------------------------------------------------------ the one judge (whole graph and piecewise)


def case_figures(case: Case) -> dict[str, Any]:
    """A case's figures before anything is measured; `measure_present` and `judge` fill them in."""
    return {
        "logits": 0.0,
        "present_key": 0.0,
        "present_value": 0.0,
        "ref_logits": 0.0,
        "ref_present": 0.0,
        "worst_present_key": "",
        "worst_present_value": "",
        "non_finite": [],
        "calls": len(case.calls),
    }


def measure_present(
    f: dict[str, Any], k: int, i: int, names: Sequence[str], got: Sequence[np.ndarray], want: Sequence[np.ndarray]
) -> None:
    """Layer i's presents (key, value) of call k into its case's figures, as they are made: the piecewise check
    drops them after. A non-finite entry is (call, layer, part, text) until `judge` orders it."""
    for j, (part, name, g, w) in enumerate(zip(("key", "value"), names, got, want)):
        if not np.isfinite(g).all():
            f["non_finite"].append((k, i, j, f"call {k} {name}"))
        diff = float(np.abs(g - w).max())
        f["ref_present"] = max(f["ref_present"], float(np.abs(w).max()))
        if diff >= f[f"present_{part}"]:
            f[f"present_{part}"], f[f"worst_present_{part}"] = diff, name


def judge(
    stage: str,
    candidate: str,
    reference: str,
    precision: str,
    tolerance: Tolerance | None,
    cases: Sequence[Case],
    figures: dict[str, dict[str, Any]],
    logits: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
    *,
    last_rows: dict[str, np.ndarray] | None = None,
    method: str = WHOLE,
) -> Comparison:
    """The one judge of GLM's cases, for the whole-graph check (compare_sessions) and the piecewise one
    (glm_export.pieces) alike. Everything has run: `figures` hold each case's presents (measure_present),
    `logits` each case's calls as (candidate, reference) pairs, `last_rows` the candidate's logits_start=-1
    answer per case. Measures the logits, counts top-1 agreement and decisive mismatches against the case's
    budget, and returns the record; `Comparison.failures` lists what misses."""
    budget = tolerance or Tolerance(float("inf"), 0.0)  # no tolerance: values unjudged (text judges them)
    agree = total = decisive = 0
    for case, pairs in zip(cases, logits):
        f = figures[case.name]
        for k, (got, ref) in enumerate(pairs):
            if not np.isfinite(got).all():
                f["non_finite"].append((k, -1, 0, f"call {k} logits"))
            f["logits"] = max(f["logits"], float(np.abs(got - ref).max()))
            f["ref_logits"] = max(f["ref_logits"], float(np.abs(ref).max()))
        allowed = budget.allowed(f["ref_logits"])
        for got, ref in pairs:
            top2 = np.partition(ref, -2, axis=-1)[..., -2:]
            same = got.argmax(-1) == ref.argmax(-1)
            agree += int(same.sum())
            total += same.size
            decisive += int((~same & (top2[..., 1] - top2[..., 0] > 2 * allowed)).sum())
        if last_rows and case.name in last_rows:
            _check_last_row(case, last_rows[case.name], pairs[-1][0], allowed)
        f["non_finite"] = [text for *_, text in sorted(f["non_finite"])]  # by call: logits, then layer by layer
        f["allowed_logits"] = allowed
        f["allowed_present_key"] = f["allowed_present_value"] = budget.allowed(f["ref_present"])
    return Comparison(
        stage,
        reference,
        candidate,
        precision,
        tolerance,
        figures,
        agree / max(total, 1),
        decisive,
        versions=_versions(),
        method=method,
    )


def _check_last_row(case: Case, last: np.ndarray, full: np.ndarray, allowed: float) -> None:
    """logits_start = -1 must return the last position of the full logits (the same rows through the same
    weights; a one-row product may take another kernel, so within the logit budget)."""
    if last.shape != full[:, -1:].shape:
        raise ParityError(
            f"case {case.name!r}: logits_start=-1 gave logits of shape {list(last.shape)}, expected "
            f"{list(full[:, -1:].shape)}"
        )
    diff = float(np.abs(last - full[:, -1:]).max())
    if diff > allowed:
        raise ParityError(f"case {case.name!r}: logits_start=-1 differs from the full logits' last row by {diff:.3g}")


def _versions() -> dict[str, str]:
    from glm_runtime.manifest import tool_versions

    return tool_versions("onnxruntime", "torch")


# ------------------------------------------------------------------ text: held-out windows and greedy fills


def text_windows(tok: Any, text: str, vocab_size: int, window: int, limit: int) -> list[np.ndarray]:
    ids = np.asarray([i for i in tok.encode(text) if i < vocab_size], dtype=np.int64)
    return [ids[s : s + window] for s in range(0, len(ids) - window + 1, window)][:limit]


def blank_calls(tok: Any, chunk: np.ndarray) -> tuple[list[Call], np.ndarray]:
    """A teacher-forced document blank (docs/glm.md 5, gpt mode) as two calls, context then span.

    Part A = [CLS] chunk[:a] [gMASK]   positions 0..a+1, block 0, bidirectional ([CLS] as the prompt rule says)
    Part B = sop chunk[a:-1]           position of the [gMASK], blocks 1.., sees Part A + causal
    -> (calls, targets of Part B = chunk[a:]). A vocabulary without [gMASK] (BERT, RoBERTa) uses [MASK].
    chunk: one window [W], or B windows of one length [B, W], one row of each call per window (targets [B, W-a]).
    """
    rows = np.atleast_2d(np.asarray(chunk, dtype=np.int64))
    B, W = rows.shape
    a = W // 2
    blank = tok.special.get("gMASK", tok.special["MASK"])
    lead = [np.full((B, 1), tok.special["ENC"])] if tok.prompt.cls_first else []  # ChatGLM: no [CLS]
    head = np.concatenate([*lead, rows[:, :a], np.full((B, 1), blank)], axis=1)
    c = head.shape[1]
    span = np.concatenate([np.full((B, 1), tok.special["sop"]), rows[:, a:-1]], axis=1)
    t = span.shape[1]
    pos_a, pos_b = np.broadcast_to(_context_pos(c), (B, 2, c)), np.broadcast_to(_span_pos(c - 1, 0, t), (B, 2, t))
    calls = [_call(head, pos_a, _sep(c, c)[None]), _call(span, pos_b, _sep(t, 0)[None])]
    return calls, (rows[:, a:] if np.ndim(chunk) == 2 else rows[0, a:])


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row: logsumexp minus the target's logit (no full log-probability array)."""
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    return lse - logits[np.arange(len(targets)), targets]


def fill_prompts(tok: Any, text: str, vocab_size: int, count: int, length: int = 24, hole: int = 4) -> list[str]:
    """Text prompts with one [MASK] each: `hole` tokens of held-out text replaced by the blank."""
    out = []
    for chunk in text_windows(tok, text, vocab_size, length, count):
        left, right = chunk[: length // 3].tolist(), chunk[length // 3 + hole :].tolist()
        out.append(f"{tok.decode(left)} [MASK] {tok.decode(right)}")
    return out


def compare_on_text(
    candidate: Session,
    reference: Session,
    tok: Any,
    text: str,
    *,
    language: str = "?",
    max_windows: int = 48,
    prompts: int = 16,
) -> dict[str, Any]:
    """Teacher-forced Part B logits and greedy fills (the runtime's fill_blanks) of both sessions on `text`."""
    from glm_runtime.generate import fill_blanks

    cfg = reference.config
    window = min(WINDOW, (cfg.max_sequence_length - 2) // 2 * 2)
    chunks = text_windows(tok, text, cfg.vocab_size, window, max_windows)
    if len(chunks) < 2:
        raise ValueError(f"held-out text gives fewer than 2 windows of {window} tokens: pass a longer text")
    spans = []
    for first in range(0, len(chunks), TEXT_BATCH):  # windows of one length: TEXT_BATCH rows per call
        calls, targets = blank_calls(tok, np.stack(chunks[first : first + TEXT_BATCH]))
        got, want = (run_calls(s, calls, context_logits=False)[1]["logits"] for s in (candidate, reference))
        spans += zip(got, want, targets)
    figures = span_figures(spans)
    texts = fill_prompts(tok, text, cfg.vocab_size, prompts)
    fills = [
        [r.spans[0].token_ids for r in fill_blanks(s, tok, texts, max_new_tokens=FILL_TOKENS)]
        for s in (reference, candidate)
    ]
    same = [a == b for a, b in zip(*fills)]
    tok_agree = [sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1) for a, b in zip(*fills)]
    return {
        "language": language,
        "tokenizer": tok.kind,
        "windows": len(chunks),
        "window": window,
        **figures,
        "fill_prompts": len(same),
        "fill_method": "glm_runtime.generate.fill_blanks (greedy)",
        "fill_tokens": FILL_TOKENS,
        "fill_agreement": float(np.mean(same)) if same else 1.0,
        "fill_token_agreement": float(np.mean(tok_agree)) if tok_agree else 1.0,
    }


def span_figures(spans: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Teacher-forced figures of (candidate logits, reference logits, targets) per window's Part B span."""
    diffs, agree, nll_c, nll_r, finite = [], [], [], [], True
    for got, want, targets in spans:
        finite &= bool(np.isfinite(got).all())
        diffs.append(float(np.abs(got - want).max()))
        agree.append(got.argmax(-1) == want.argmax(-1))
        nll_c.append(_nll(got, targets))
        nll_r.append(_nll(want, targets))
    agree_all = np.concatenate(agree)
    ppl_r, ppl_c = math.exp(np.concatenate(nll_r).mean()), math.exp(np.concatenate(nll_c).mean())
    return {
        "positions": int(agree_all.size),
        "finite": finite,
        "max_logit_diff": max(diffs),
        "top1_agreement": float(agree_all.mean()),
        "ppl_reference": ppl_r,
        "ppl_candidate": ppl_c,
        "ppl_change": ppl_c / ppl_r - 1.0,
    }


def ppl_change_text(change: float) -> str:
    """A recorded ppl_change (a fraction: child ppl / parent ppl - 1) as every printed line says it: percent, as
    README's quantization table."""
    return f"{100 * change:+.2f}%"


def budget_misses(scheme: str, figures: dict[str, Any]) -> list[str]:
    """Human-readable misses of text `figures` against BUDGETS[scheme] (empty when within budget)."""
    budget = BUDGETS[scheme]
    misses = []
    if not figures["finite"]:
        misses.append("non-finite logits")
    if figures["top1_agreement"] < budget["top1"]:
        misses.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {budget['top1']}")
    if figures["fill_agreement"] is not None and figures["fill_agreement"] < budget["fill"]:
        misses.append(f"greedy fill agreement {figures['fill_agreement']:.3f} < {budget['fill']}")
    if abs(figures["ppl_change"]) > budget["ppl_change"]:
        misses.append(
            f"Part B perplexity change {ppl_change_text(figures['ppl_change'])} beyond ±{100 * budget['ppl_change']:g}%"
        )
    if figures["max_logit_diff"] > budget.get("max_logit_diff", float("inf")):
        misses.append(f"max logit difference {figures['max_logit_diff']:.3g} > {budget['max_logit_diff']}")
    return misses


def judge_text(result: Comparison, scheme: str, figures: dict[str, Any], heldout: dict[str, Any]) -> Comparison:
    """Held-out text figures (compare_on_text, or glm_export.pieces one layer at a time) judged against
    BUDGETS[scheme], into the record's `text`; a miss shows in `result.failures` as "text: ..."."""
    misses = budget_misses(scheme, figures)
    result.text = dict(
        figures, scheme=scheme, budget=BUDGETS[scheme], heldout=heldout, within_budget=not misses, misses=misses
    )
    return result


# ------------------------------------------------------------------ held-out text in the model's language

DATA = Path(__file__).resolve().parent / "data"
HELDOUT = {"en": DATA / "calibration.txt", "zh": DATA / "heldout_zh.txt"}
CHINESE_KINDS = ("chinese-sp", "chinese-sp-fix")


def language_of(tokenizer_kind: str | None) -> str:
    return "zh" if tokenizer_kind in CHINESE_KINDS else "en"


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


def heldout_text(tokenizer_kind: str | None, half: int = 1) -> tuple[str, dict[str, Any]]:
    """The bundled held-out text in the model's language: (text, record of its source). half 0 calibrates,
    half 1 evaluates; they never share a document."""
    from glm_runtime.manifest import sha256_file

    lang = language_of(tokenizer_kind)
    path = HELDOUT[lang]
    return split_text(path.read_text(encoding="utf-8"))[half], {
        "language": lang,
        "source": f"glm_export/data/{path.name} ({'odd' if half else 'even'} documents)",
        "sha256": sha256_file(path),
    }


def text_to_judge(tokenizer_kind: str | None, text: str | None = None) -> tuple[str, dict[str, Any]]:
    """(text, record of its source): the caller's text, or the bundled held-out half in the model's language."""
    if text is None:
        return heldout_text(tokenizer_kind)
    return text, {"language": language_of(tokenizer_kind), "source": "text given by the caller"}


def compare_artifact(
    candidate: Session,
    reference: Session,
    tok: Any,
    *,
    stage: str,
    scheme: str | None,
    text: str | None = None,
    tolerance: Tolerance | None = None,
) -> Comparison:
    """Structure (GLM's cases) and, with a scheme, held-out text judged against BUDGETS[scheme]."""
    result = compare_sessions(candidate, reference, stage=stage, tolerance=tolerance)
    if scheme is not None:
        text, source = text_to_judge(tok.kind, text)
        judge_text(
            result, scheme, compare_on_text(candidate, reference, tok, text, language=source["language"]), source
        )
    return result
