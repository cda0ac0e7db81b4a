"""Parity records that cannot lie: what a loader checks in a manifest's `parity` before it trusts the artifact.

In: the manifest's kind, precision, parity record and extra (docs/artifacts.md, "Parity record"; the record is made
by glm_export.compare). Out: `parity_problem(...)`, one line saying why the record cannot be trusted, or None.

The self-hash proves a manifest was written whole, not who wrote it: anyone can reseal an edited record with the
documented recipe. So a loader re-judges the record by its own figures: a record that says it failed, whose
figures are over the budget it records, whose verdict or maxima disagree with its figures, or whose precision is
not the manifest's is refused. Only `glmx quantize --accept-loss` may load with a failed verdict, and only when
every failure is a held-out-text miss it lists. The budgets themselves are the record's own (an artifact made by
another glmx keeps the budgets it was judged by); glm_export.compare.BUDGETS and TOLERANCES make them.
No glmx import: glm_runtime.manifest calls this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

FIGURES = ("logits", "present_key", "present_value")  # per case, each against its `allowed_*`
REF = {"logits": "ref_logits", "present_key": "ref_present", "present_value": "ref_present"}
# precisions only `glmx export` writes: the only records that may say the check was skipped (--no-validate)
EXPORT_PRECISIONS = ("fp32", "fp16")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def case_misses(cases: Mapping[str, Any], tolerance: Mapping[str, Any] | None) -> list[str]:
    """The structural misses the record's own case figures show (as compare.Comparison.failures judges them)."""
    misses = []
    for name, f in cases.items():
        if not isinstance(f, Mapping) or not all(_number(f.get(k)) for k in FIGURES):
            misses.append(f"case {name!r} has no figures")
            continue
        if f.get("non_finite"):
            misses.append(f"case {name!r}: non-finite outputs ({', '.join(map(str, f['non_finite'][:2]))})")
        if tolerance is None:
            continue  # quantized: values judged on held-out text only
        for key in FIGURES:
            allowed: Any = f.get(f"allowed_{key}")
            ref: Any = f.get(REF[key])
            if not (_number(allowed) and _number(ref)):
                misses.append(f"case {name!r} has no {key} budget")
            elif not _close(allowed, tolerance["atol"] + tolerance["rtol"] * ref):
                misses.append(
                    f"case {name!r}: its {key} allowance {allowed:.3g} does not follow from its recorded tolerance"
                )
            elif not f[key] <= allowed:  # NaN fails too
                misses.append(f"case {name!r}: {key} max |diff| {f[key]:.3g} > its budget {allowed:.3g}")
    return misses


def text_misses(text: Mapping[str, Any]) -> list[str]:
    """Held-out text figures against the record's own budget (as compare.budget_misses judges them)."""
    budget = text.get("budget")
    if not isinstance(budget, Mapping):
        return ["held-out text figures without their budget"]
    misses = []
    try:
        if not text["finite"]:
            misses.append("non-finite logits on held-out text")
        if not text["top1_agreement"] >= budget["top1"]:
            misses.append(f"text top-1 agreement {text['top1_agreement']:.4f} < {budget['top1']}")
        fill = text.get("fill_agreement")
        if fill is not None and not fill >= budget["fill"]:
            misses.append(f"greedy fill agreement {fill:.3f} < {budget['fill']}")
        if not abs(text["ppl_change"]) <= budget["ppl_change"]:
            misses.append(f"Part B perplexity change {text['ppl_change']:+.4f} beyond ±{budget['ppl_change']}")
        if "max_logit_diff" in budget and not text["max_logit_diff"] <= budget["max_logit_diff"]:
            misses.append(f"text max logit diff {text['max_logit_diff']:.3g} > {budget['max_logit_diff']}")
    except (KeyError, TypeError):
        misses.append("held-out text figures incomplete")
    return misses


def parity_problem(kind: str, precision: str, parity: Mapping[str, Any], extra: Mapping[str, Any]) -> str | None:
    """Why an onnx or engine artifact's parity record cannot be trusted (one line), or None. An empty record is
    not judged here (manifest.check_complete refuses it where a record is required), nor a pending one
    (load_manifest refuses that)."""
    if kind not in ("onnx", "engine") or not parity:
        return None
    if not isinstance(parity, Mapping):
        return "its parity record is not a JSON object; re-run the stage that wrote it"
    if parity.get("pending"):
        return None
    redo = "re-run the stage that wrote it"
    if parity.get("skipped"):
        derived = kind != "onnx" or precision not in EXPORT_PRECISIONS
        if derived or extra.get("quantization") is not None or extra.get("optimization") is not None:
            return (
                f"its parity record says the check was skipped, which only `glmx export --no-validate` writes, "
                f"not a {precision} {kind} artifact of another stage: the record was edited; {redo}"
            )
        return None
    passed = parity.get("passed")
    if not isinstance(passed, bool):
        return f"its parity record says neither passed nor failed (passed = {passed!r}); {redo}"
    if parity.get("precision", precision) != precision:
        return (
            f"its parity record is for precision {parity['precision']!r} but the manifest says {precision!r}: "
            f"the manifest was edited; {redo}"
        )
    failures = [str(f) for f in parity.get("failures") or []]
    accepted = parity.get("accept_loss") is True and all(f.startswith("text: ") for f in failures)
    if not passed and not (failures and accepted):
        said = failures[0] if failures else "no failure named"
        return f"its parity record says it failed ({said}); glmx loads no artifact that missed its check: {redo}"
    cases, tolerance = parity.get("cases"), parity.get("tolerance")
    if not isinstance(cases, Mapping) or not cases:
        return f"its parity record carries no case figures to back its verdict; {redo}"
    if tolerance is not None and not (
        isinstance(tolerance, Mapping) and _number(tolerance.get("atol")) and _number(tolerance.get("rtol"))
    ):
        return f"its parity record's tolerance {tolerance!r} is not atol + rtol; {redo}"
    misses = case_misses(cases, tolerance)
    decisive = parity.get("top1_decisive_mismatches", 0)
    if not (_number(decisive) and decisive == 0):
        misses.append(f"top-1 differs at {decisive} decisive position(s)")
    if misses:
        return f"its parity record's figures are over its own recorded budget ({misses[0]}): it was edited; {redo}"
    maxima = parity.get("max_abs_diff") or {}
    for key in FIGURES:
        if key in maxima and maxima[key] != max(f[key] for f in cases.values()):
            return f"its parity record's max_abs_diff.{key} {maxima[key]!r} does not match its cases; {redo}"
    text = parity.get("text")
    lost = text_misses(text) if isinstance(text, Mapping) else []
    if lost and (passed or not accepted):
        return f"its parity record's figures are over its own recorded budget ({lost[0]}): it was edited; {redo}"
    return None
