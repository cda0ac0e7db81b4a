"""Parity of an exported ONNX graph with the torch reference on GLM's own cases, and the tolerance table.

In: an ONNX file, its precision, and a reference GLMModel (run in fp32). Out: a ParityReport (max |diff| per
case and output) or a ParityError that prints the figures. Positions and masks are built here in torch, from
the spec (sections 2 and 3); the runtime's numpy builders are deliberately not used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from glm_runtime.iotable import LOGITS_START, accepts, io_table, past_names, present_names, required_inputs
from glm_runtime.session import quiet_options


class ParityError(AssertionError):
    """The exported graph does not match the reference: wrong names, wrong shapes, or values out of budget."""


@dataclass(frozen=True)
class Tolerance:
    """A value passes when max |onnx - reference| <= atol + rtol * max |reference| (per case and output)."""
    atol: float
    rtol: float

    def allowed(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max


# The one tolerance table. fp32: same arithmetic, only summation order differs. fp16: weights and the KV
# cache rounded to fp16 (LayerNorm, QK product, masking and softmax kept in fp32); on top of the values, top-1
# must agree at every position where the reference's top-1 / top-2 margin exceeds twice the logit budget.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=0.0),
    "fp16": Tolerance(atol=3e-2, rtol=5e-3),
}

# ------------------------------------------------------------------ positions and masks (spec 2, 3.1)


def context_positions(length: int) -> torch.Tensor:
    """Part A: positions 0..length-1, block positions 0 -> [2, length]."""
    return torch.stack([torch.arange(length), torch.zeros(length, dtype=torch.long)])


def span_positions(mask_pos: int, first: int, count: int) -> torch.Tensor:
    """Part B tokens first..first+count-1 of a span (0 = sop): position mask_pos, block t+1 -> [2, count]."""
    return torch.stack([torch.full((count,), mask_pos), torch.arange(first + 1, first + count + 1)])


def sep_mask(seq: int, sep: int, past: int = 0) -> torch.Tensor:
    """Query i of `seq` new tokens sees key j iff j < sep or j <= i; every past slot is visible -> bool [seq, past+seq]."""
    i = torch.arange(seq).view(seq, 1)
    j = torch.arange(seq).view(1, seq)
    return torch.cat([torch.ones(seq, past, dtype=torch.bool), (j < sep) | (j <= i)], dim=1)


@dataclass
class PaddedBatch:
    """Rows of different lengths padded to one width. `real` [B, slots] says which cache slots hold real tokens."""
    input_ids: torch.Tensor  # [B, C]
    position_ids: torch.Tensor  # [B, 2, C]
    attention_mask: torch.Tensor  # [B, 1, C, C] bool
    real: torch.Tensor  # [B, C] bool


def padded_context(rows: Sequence[Sequence[int]], side: str, pad_id: int = 0) -> PaddedBatch:
    """Context pass of a batch: each row bidirectional over its own real tokens (sep = its length).

    Padding slots get token pad_id and position (0, 0) (spec 2) and, as queries, see only themselves, so they
    never touch a real token. side="left" puts the padding before the text, "right" after it.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    B, C = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, C), pad_id, dtype=torch.long)
    pos = torch.zeros(B, 2, C, dtype=torch.long)
    real = torch.zeros(B, C, dtype=torch.bool)
    for r, row in enumerate(rows):
        cols = slice(C - len(row), C) if side == "left" else slice(0, len(row))
        ids[r, cols] = torch.tensor(row)
        pos[r, :, cols] = context_positions(len(row))
        real[r, cols] = True
    mask = (real[:, None, :] & real[:, :, None]) | torch.eye(C, dtype=torch.bool)  # [B, C(query), C(key)]
    return PaddedBatch(ids, pos, mask[:, None], real)


def decode_mask(real: torch.Tensor, seq: int = 1) -> torch.Tensor:
    """Part B step over a cache: every real slot plus the new tokens causally -> bool [B, 1, seq, slots+seq]."""
    B = real.shape[0]
    causal = sep_mask(seq, 0).expand(B, seq, seq)
    return torch.cat([real[:, None, :].expand(B, seq, real.shape[1]), causal], dim=2)[:, None]


# ------------------------------------------------------------------ GLM's own cases

# Stand-in ids for the command tokens: parity depends on the layout (where blanks and spans sit), not on
# which vocabulary row is [MASK]; real ids per vocabulary are in spec section 7.
PAD, CLS, MASK, GMASK, SOP, EOS = 0, 1, 2, 3, 4, 5
FIRST_TEXT_ID = 8

MaskArg = Union[int, torch.Tensor]


@dataclass
class Step:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, 2, T]
    attention_mask: torch.Tensor  # [B, 1, T, past+T] bool, what the ONNX graph gets
    reference_mask: MaskArg  # what the reference gets: its own sep form where the case has one


@dataclass
class Case:
    name: str
    description: str
    steps: list[Step] = field(default_factory=list)


def _step(ids: Sequence[int] | torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, ref: MaskArg | None = None) -> Step:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1, pos.shape[-1])
    pos = pos.reshape(ids.shape[0], 2, -1)
    mask = mask.reshape(ids.shape[0], 1, ids.shape[1], -1)
    return Step(ids, pos, mask, mask if ref is None else ref)


def glm_cases(vocab_size: int, seed: int = 0) -> list[Case]:
    """The blank-filling situations an exported graph must get right (spec 3 and 4)."""
    if vocab_size < FIRST_TEXT_ID + 8:
        raise ValueError(f"parity cases need a vocabulary of at least {FIRST_TEXT_ID + 8} ids, got {vocab_size}")
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(FIRST_TEXT_ID, vocab_size, (n,), generator=gen).tolist()

    cases = []
    # 1. one blank in the middle, context pass only: bidirectional over Part A (sep = C), empty past.
    ctx = [CLS] + text(2) + [MASK] + text(3) + [EOS]
    C = len(ctx)
    cases.append(Case("blank_mid_context", "context pass with a [MASK] mid-text, sep = C, past 0",
                      [_step(ctx, context_positions(C), sep_mask(C, C), ref=C)]))

    # 2. two blanks filled one after the other through the cache (spec 4.2): span 1 one token at a time,
    #    span 2 on top of it as a 3-token chunk (seq > 1 with past > 0), then one more single step.
    t = text(5)
    ctx = [CLS, t[0], MASK, t[1], t[2], MASK, t[3], EOS]
    C, (m1, m2) = len(ctx), (2, 5)
    case = Case("two_blanks_through_cache", "context pass, span 1 decoded token by token (past > 0), "
                "span 2 on top as a chunk and a single step",
                [_step(ctx, context_positions(C), sep_mask(C, C), ref=C)])
    past = C
    for k, tok in enumerate([SOP] + text(2)):
        case.steps.append(_step([tok], span_positions(m1, k, 1), sep_mask(1, 0, past), ref=0))
        past += 1
    chunk = [SOP] + text(2)
    case.steps.append(_step(chunk, span_positions(m2, 0, 3), sep_mask(3, 0, past), ref=0))
    past += 3
    case.steps.append(_step(text(1), span_positions(m2, 3, 1), sep_mask(1, 0, past), ref=0))
    cases.append(case)

    # 3. [gMASK] at the end (no eos after it, spec 4.1), then generation of its span.
    ctx = [CLS] + text(4) + [GMASK]
    C, m = len(ctx), len(ctx) - 1
    case = Case("gmask_at_end", "prefix [gMASK] context pass, then sop and two tokens through the cache",
                [_step(ctx, context_positions(C), sep_mask(C, C), ref=C)])
    for k, tok in enumerate([SOP] + text(2)):
        case.steps.append(_step([tok], span_positions(m, k, 1), sep_mask(1, 0, C + k), ref=0))
    cases.append(case)

    # 4. the training-equivalent single pass of case 2's final state: Part A + both spans, sep = C (spec 4.2).
    t = text(8)
    ctx = [CLS, t[0], MASK, t[1], t[2], MASK, t[3], EOS]
    C = len(ctx)
    ids = ctx + [SOP, t[4], t[5], SOP, t[6], t[7]]
    pos = torch.cat([context_positions(C), span_positions(2, 0, 3), span_positions(5, 0, 3)], dim=1)
    cases.append(Case("one_pass_two_spans", "Part A and two Part B spans in one pass (sep mask, 2D positions)",
                      [_step(ids, pos, sep_mask(len(ids), C), ref=C)]))

    # 5./6. a batch whose rows have blanks at different places and different lengths, padded left or right
    #    with an explicit mask, then decode steps over the padded cache (its padding slots stay masked).
    rows = [[CLS] + text(1) + [MASK] + text(3) + [EOS],
            [CLS] + text(2) + [MASK, EOS],
            [CLS] + text(5) + [MASK] + text(2) + [EOS]]
    mask_pos = [row.index(MASK) for row in rows]
    for side, n_steps in (("right", 3), ("left", 2)):
        batch = padded_context(rows, side, PAD)
        case = Case(f"batch_{side}_padding", f"3 rows of lengths {[len(r) for r in rows]}, blanks at "
                    f"{mask_pos}, {side}-padded, then {n_steps} batched decode steps",
                    [Step(batch.input_ids, batch.position_ids, batch.attention_mask, batch.attention_mask)])
        real = batch.real
        for k in range(n_steps):
            toks = torch.tensor([[SOP]] * len(rows)) if k == 0 else torch.tensor([text(1) for _ in rows])
            pos = torch.stack([span_positions(mp, k, 1) for mp in mask_pos])  # [B, 2, 1]
            mask = decode_mask(real)
            case.steps.append(Step(toks, pos, mask, mask))
            real = torch.cat([real, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
        cases.append(case)
    return cases


# ------------------------------------------------------------------ the report


@dataclass
class ParityReport:
    precision: str
    tolerance: Tolerance
    cases: dict[str, dict[str, Any]]  # case -> figures (max |diff| per output group, budgets, steps)
    top1_agreement: float  # fraction of positions whose argmax matches the reference
    top1_decisive_mismatches: int  # mismatches where the reference's top-1 margin exceeds 2x the logit budget
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        out = []
        for name, f in self.cases.items():
            for key in ("logits", "present_key", "present_value"):
                if not np.isfinite(f[key]) or f[key] > f[f"allowed_{key}"]:
                    out.append(f"{name}: {key} max |diff| {f[key]:.3e} > budget {f[f'allowed_{key}']:.3e}")
            if f["non_finite"]:
                out.append(f"{name}: the ONNX outputs contain NaN or inf ({f['non_finite']})")
        if self.top1_decisive_mismatches:
            out.append(f"top-1 differs at {self.top1_decisive_mismatches} position(s) where the reference's margin "
                       f"exceeds twice the logit budget")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def max_diff(self, key: str) -> float:
        return max(f[key] for f in self.cases.values())

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "passed": self.passed,
                "tolerance": {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
                              "rule": "max|onnx-ref| <= atol + rtol*max|ref|, per case and output"},
                "reference": "glm_export.model.GLMModel in float32 (torch)",
                "runtime": "onnxruntime CPUExecutionProvider",
                "max_abs_diff": {k: self.max_diff(k) for k in ("logits", "present_key", "present_value")},
                "top1_agreement": self.top1_agreement,
                "top1_decisive_mismatches": self.top1_decisive_mismatches,
                "cases": self.cases, "versions": self.versions}

    def table(self) -> str:
        lines = [f"parity of the {self.precision} ONNX graph vs the fp32 torch reference "
                 f"(budget {self.tolerance.atol:g} + {self.tolerance.rtol:g}*max|ref|):",
                 f"  {'case':26s} {'steps':>5s} {'logits':>10s} {'budget':>9s} {'present.k':>10s} "
                 f"{'present.v':>10s} {'budget':>9s}"]
        for name, f in self.cases.items():
            lines.append(f"  {name:26s} {f['steps']:5d} {f['logits']:10.3e} {f['allowed_logits']:9.2e} "
                         f"{f['present_key']:10.3e} {f['present_value']:10.3e} {f['allowed_present_key']:9.2e}")
        lines.append(f"  top-1 agreement {self.top1_agreement:.4f} ({self.top1_decisive_mismatches} decisive "
                     f"mismatches)")
        return "\n".join(lines + [f"  MISS {x}" for x in self.failures])

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------ running the comparison

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "bool": "tensor(bool)"}


def _check_names(session, table: dict) -> None:
    """First check: input and output names (and dtypes) are exactly the IO table's, in its order."""
    # optional inputs (a graph input with an initializer, e.g. logits_start) are listed apart by onnxruntime
    optional = [e for e in table["inputs"] if "default" in e]
    got_optional = {g.name: g for g in session.get_overridable_initializers()}
    for e in optional:
        if e["name"] not in got_optional or got_optional[e["name"]].type != _ORT_TYPES[e["dtype"]]:
            raise ParityError(f"ONNX optional input {e['name']!r} ({e['dtype']}, with a default) is missing")
    required = {"inputs": required_inputs(table), "outputs": table["outputs"]}
    for kind, got in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = [e["name"] for e in required[kind]]
        names = [g.name for g in got]
        if names != want:
            missing = [n for n in want if n not in names]
            extra = [n for n in names if n not in want]
            raise ParityError(f"ONNX {kind} do not match the IO table: missing {missing}, unexpected {extra}"
                              + ("" if missing or extra else f", order {names} != {want}"))
        for e, g in zip(required[kind], got):
            if g.type != _ORT_TYPES[e["dtype"]]:
                raise ParityError(f"ONNX {kind[:-1]} {e['name']!r} has type {g.type}, the IO table says {e['dtype']}")


def _check_shapes(case: str, k: int, outputs: dict[str, np.ndarray], expected: dict[str, tuple]) -> None:
    """Second check: every output's concrete shape for this step."""
    for name, shape in expected.items():
        if tuple(outputs[name].shape) != shape:
            raise ParityError(f"case {case!r} step {k}: output {name!r} has shape {list(outputs[name].shape)}, "
                              f"expected {list(shape)}")


def _check_logits_start(session, feeds: dict[str, np.ndarray], full: np.ndarray, case: str, k: int,
                        allowed: float) -> None:
    """logits_start = -1 must return the last position of the full logits (the same rows through the same
    weights; a one-row product may take another kernel, so within the precision's logit budget)."""
    last = session.run(["logits"], {**feeds, LOGITS_START: np.array([-1], dtype=np.int64)})[0]
    if last.shape != full[:, -1:].shape:
        raise ParityError(f"case {case!r} step {k}: logits_start=-1 gave logits of shape {list(last.shape)}, "
                          f"expected {list(full[:, -1:].shape)}")
    diff = float(np.abs(last - full[:, -1:]).max())
    if diff > allowed:
        raise ParityError(f"case {case!r} step {k}: logits_start=-1 differs from the full logits' last row by "
                          f"{diff:.3g}")


def check_parity(onnx_path: str | Path, model: torch.nn.Module, precision: str, *,
                 cases: list[Case] | None = None, tolerance: Tolerance | None = None,
                 raise_on_miss: bool = True) -> ParityReport:
    """Run every case through onnxruntime (CPU) and the fp32 reference; check names, then shapes, then values."""
    import onnxruntime as ort

    config = model.config
    table = io_table(config, precision)
    tol = tolerance or TOLERANCES[precision]
    ref = model if all(p.dtype == torch.float32 for p in model.parameters()) else copy.deepcopy(model).float()
    was_training = ref.training
    ref.eval()
    kv_dtype = np.float16 if precision == "fp16" else np.float32
    n, d, L, V = config.num_attention_heads, config.head_dim, config.num_layers, config.vocab_size
    session = ort.InferenceSession(str(onnx_path), quiet_options(), providers=["CPUExecutionProvider"])
    _check_names(session, table)
    out_names = [o.name for o in session.get_outputs()]
    pasts, presents = past_names(table), present_names(table)

    figures: dict[str, dict[str, Any]] = {}
    agree = total = decisive = 0
    try:
        for case in cases if cases is not None else glm_cases(V):
            B = case.steps[0].input_ids.shape[0]
            onnx_cache = [(np.zeros((B, n, 0, d), kv_dtype), np.zeros((B, n, 0, d), kv_dtype)) for _ in range(L)]
            ref_cache = None
            f = {"logits": 0.0, "present_key": 0.0, "present_value": 0.0, "ref_logits": 0.0, "ref_present": 0.0,
                 "worst_present_key": "", "worst_present_value": "", "non_finite": [], "steps": len(case.steps)}
            for k, step in enumerate(case.steps):
                past, T = onnx_cache[0][0].shape[2], step.input_ids.shape[1]
                feeds = {"input_ids": step.input_ids.numpy(), "position_ids": step.position_ids.numpy(),
                         "attention_mask": step.attention_mask.expand(B, 1, T, past + T).numpy()}
                for (pk, pv), (ck, cv) in zip(pasts, onnx_cache):
                    feeds[pk], feeds[pv] = ck, cv
                out = dict(zip(out_names, session.run(None, feeds)))
                expected = {"logits": (B, T, V)}
                expected.update({name: (B, n, T, d) for pair in presents for name in pair})
                _check_shapes(case.name, k, out, expected)
                with torch.no_grad():
                    logits, ref_cache = ref(step.input_ids, step.position_ids, step.reference_mask, ref_cache)
                ref_logits = logits.numpy()
                if T > 1 and accepts(table, LOGITS_START):
                    _check_logits_start(session, feeds, out["logits"], case.name, k,
                                        tol.allowed(float(np.abs(ref_logits).max())))
                f["logits"] = max(f["logits"], float(np.abs(out["logits"] - ref_logits).max()))
                f["ref_logits"] = max(f["ref_logits"], float(np.abs(ref_logits).max()))
                if not np.isfinite(out["logits"]).all():
                    f["non_finite"].append(f"step {k} logits")
                for i, ((kn, vn), (rk, rv)) in enumerate(zip(presents, ref_cache)):
                    for part, name, r in (("key", kn, rk), ("value", vn, rv)):
                        new = r[:, :, past:, :].numpy()  # the reference returns past+new; ONNX only new
                        got = out[name].astype(np.float32)
                        if not np.isfinite(got).all():
                            f["non_finite"].append(f"step {k} {name}")
                        diff = float(np.abs(got - new).max())
                        f["ref_present"] = max(f["ref_present"], float(np.abs(new).max()))
                        if diff >= f[f"present_{part}"]:
                            f[f"present_{part}"], f[f"worst_present_{part}"] = diff, name
                    onnx_cache[i] = (np.concatenate([onnx_cache[i][0], out[kn]], axis=2),
                                     np.concatenate([onnx_cache[i][1], out[vn]], axis=2))
                # top-1: count every position; a mismatch counts against the budget only where it is decisive
                top2 = np.sort(ref_logits, axis=-1)[..., -2:]
                margin = top2[..., 1] - top2[..., 0]
                same = out["logits"].argmax(-1) == ref_logits.argmax(-1)
                agree += int(same.sum())
                total += same.size
                decisive += int((~same & (margin > 2 * tol.allowed(f["ref_logits"]))).sum())
            f["allowed_logits"] = tol.allowed(f["ref_logits"])
            f["allowed_present_key"] = f["allowed_present_value"] = tol.allowed(f["ref_present"])
            figures[case.name] = f
    finally:
        ref.train(was_training)
    report = ParityReport(precision, tol, figures, agree / max(total, 1), decisive,
                          versions={"onnxruntime": ort.__version__, "torch": torch.__version__})
    if raise_on_miss and not report.passed:
        raise ParityError(f"{Path(onnx_path).name} misses its {precision} parity budget\n{report.table()}")
    return report
