"""The benchmark run: every backend/precision of each model, against torch eager fp32 and the hardware floor.

In: models, variants (artifacts.VARIANTS), contexts / past lengths / batches, an output folder.
Out: results.json (machine, versions, every sample, ratios, floors, targets), results.md, PNG plots and a
README.md naming the command, all checked by `check_results` before they are written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_runtime.config import GLMConfig
from glm_runtime.errors import GLMXError
from glmx_benchmarks import artifacts, floor, report
from glmx_benchmarks.machine import cpu_facts

DEFAULT_VARIANTS = (
    "torch-fp32",
    "ort-fp32",
    "ort-optimized",
    "ort-fp16",
    "ort-int8",
    "ort-int8-head",
    "ort-fused-int8-head",
    "ort-int4",
    "ort-qdq-int8",
    "tensorrt-fp16",
)
QUICK_VARIANTS = ("torch-fp32", "ort-fp32")
# Timing budgets: warm-up calls, then repeat until min_n samples and min_s seconds (cap max_n, or max_s once n >= 3)
# variant_s: past this many seconds a backend's remaining figures are left out (listed in not_measured)
FULL_BUDGET = {"warmup": 2, "min_n": 9, "min_s": 0.8, "max_n": 60, "max_s": 5.0, "variant_s": 75}
QUICK_BUDGET = {"warmup": 1, "min_n": 3, "min_s": 0.02, "max_n": 8, "max_s": 0.3, "variant_s": 60}
TARGET_MODEL, TARGET_PAST, TARGET_CONTEXT, TARGET_BATCH = "glm-large-shape", 128, 128, 8
TARGETS = {  # from the issue: GLM-Large shape, batch 1, past 128, best CPU path vs torch eager fp32
    "decode_vs_floor": ("decode latency / bandwidth floor", "<=", 1.15),
    "decode_speedup": ("decode speed-up vs torch eager fp32", ">=", 5.0),
    "context_speedup": (f"context pass ({TARGET_CONTEXT} tokens) speed-up vs torch eager fp32", ">=", 3.0),
    "batch8_speedup": (f"batch-{TARGET_BATCH} throughput vs torch eager fp32", ">=", 5.0),
}
WORKER_TIMEOUT_S = 900
FULL_ROUNDS, QUICK_ROUNDS = 3, 2  # rounds of the target figures (the full pass is round 1)


class BenchmarkError(GLMXError, RuntimeError):
    """A figure the benchmark wrote is missing or not sane (non-finite, non-positive, p90 < median)."""


# ---------------------------------------------------------------- the machine


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from glm_runtime.manifest import tool_versions

    # read from the installed metadata where not imported (importing torch only for its version costs seconds a run)
    versions = {
        "numpy": None,
        "onnx": None,
        "onnxruntime": None,
        "torch": None,
        **tool_versions("onnx", "onnxruntime", "torch"),
    }
    return {
        "cpu": cpu,
        "cpu_flags": cpu_facts()["flags"],
        "cores": os.cpu_count(),
        "threads_used": threads,
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
        "versions": versions,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------- one backend, in its own process


def run_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Start glmx_benchmarks.worker on `spec`; its last 'BENCH-RESULT' line is the result (or an error)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS=str(spec["threads"]),
        MKL_NUM_THREADS=str(spec["threads"]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "glmx_benchmarks.worker", json.dumps(spec)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=None if spec.get("progress") else subprocess.PIPE,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-RESULT ")]
    if not lines:
        tail = (proc.stderr or "")[-400:] if proc.stderr else f"exit status {proc.returncode}"
        return {"error": f"worker died without a result ({tail.strip()})"}
    return json.loads(lines[-1][len("BENCH-RESULT ") :])


# ---------------------------------------------------------------- derived figures


def _ratio(reference: Mapping[str, Any] | None, figure: Mapping[str, Any] | None) -> float | None:
    if not reference or not figure:
        return None
    return reference["median"] / figure["median"]


def add_comparisons(model: dict[str, Any], bandwidth: float, matmul_rate: float) -> None:
    """Per variant: speed-up vs torch eager fp32 per figure, and each figure's floor and ratio to it."""
    config = GLMConfig.from_dict(model["config"])
    variants = model["variants"]
    ref = variants.get(artifacts.REFERENCE, {})
    for v in variants.values():
        if "error" in v or "skipped" in v:
            continue
        kv_item = 2 if v["precision"] == "fp16" else 4
        for context, fig in v["context"].items():
            # the torch reference computes the head at every position; glmx's runtime only at the last one
            head_rows = int(context) if v.get("backend") == "torch" else 1
            fig["floor_s"] = floor.context_flops(config, int(context), head_rows) / matmul_rate
            fig["vs_floor"] = fig["median"] / fig["floor_s"]
            fig["speedup_vs_torch"] = _ratio(ref.get("context", {}).get(context), fig)
        for past, fig in v["decode"].items():
            fig["floor_s"] = floor.decode_floor_s(v["streamed_weight_bytes"], config, int(past), 1, bandwidth, kv_item)
            fig["vs_floor"] = fig["median"] / fig["floor_s"]
            fig["speedup_vs_torch"] = _ratio(ref.get("decode", {}).get(past), fig)
        for batch, fig in v["batch"].items():
            fig["floor_s"] = floor.decode_floor_s(
                v["streamed_weight_bytes"], config, model["batch_past"], int(batch), bandwidth, kv_item
            )
            fig["vs_floor"] = fig["median"] / fig["floor_s"]
            fig["speedup_vs_torch"] = _ratio(ref.get("batch", {}).get(batch), fig)


def budget_verdict(accuracy: Mapping[str, Any]) -> dict[str, Any]:
    """Whether a bundled-model artifact keeps within its accuracy budget, from its manifest's figures."""
    if accuracy.get("within_budget") is not None:
        ok = bool(accuracy["within_budget"])
        return {
            "within_budget": ok,
            "why": f"top-1 {accuracy['top1_agreement']:.4f} vs its fp32 parent, greedy "
            f"fills {accuracy['fill_agreement']:.3f}: {'within' if ok else 'outside'} "
            f"its scheme's budget",
        }
    if accuracy.get("parity_passed") is not None:
        ok = bool(accuracy["parity_passed"])
        return {"within_budget": ok, "why": f"the exporter's parity check against torch {'passed' if ok else 'failed'}"}
    return {"within_budget": None, "why": "no accuracy figure in its manifest"}


def budget_status(variants: Sequence[str], cache: Path, say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Per variant: does its recipe keep the bundled model within the scheme's accuracy budget? Read from the
    bundled model's artifacts (built into the cache when missing): the GLM-Large-shaped model's weights are
    random, so its own accuracy figures say nothing. The targets count only variants within budget."""
    try:
        bundled = artifacts.prepare_model("bundled", cache, say)
    except artifacts.SkipVariant as exc:
        return {v: {"within_budget": None, "why": f"the bundled model is not available: {exc}"} for v in variants}
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v == artifacts.REFERENCE:
            out[v] = {"within_budget": True, "why": "the reference"}
            continue
        try:
            _, folder = artifacts.prepare_variant(bundled, v, say)
        except artifacts.SkipVariant as exc:
            out[v] = {"within_budget": None, "why": f"no bundled artifact: {exc}"}
            continue
        out[v] = budget_verdict(artifacts.accuracy_figures(folder))
    return out


def evaluate_targets(
    model: Mapping[str, Any],
    at: Mapping[str, list[int]] | None = None,
    status: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The issue's targets on this model: best non-reference path per figure, its ratio, met or missed.

    at: the figures to judge (round_grid's form); default the issue's context 128, past 128, batch 8.
    status: budget_status; when given, only variants within their accuracy budget compete (the issue: "with
    the bundled model's greedy fills unchanged, or within the scheme's stated budget").
    """
    variants = {k: v for k, v in model["variants"].items() if "error" not in v and "skipped" not in v}
    fast = {
        k: v
        for k, v in variants.items()
        if k != artifacts.REFERENCE and (status is None or (status.get(k) or {}).get("within_budget") is True)
    }
    at = at or {"contexts": [TARGET_CONTEXT], "pasts": [TARGET_PAST], "batches": [TARGET_BATCH]}
    past, context, batch = str(at["pasts"][0]), str(at["contexts"][0]), str(at["batches"][0])

    def best(section: str, key: str) -> tuple[str | None, dict[str, Any] | None]:
        have = [(v[section][key]["median"], k) for k, v in fast.items() if key in v.get(section, {})]
        if not have:
            return None, None
        name = min(have)[1]
        return name, fast[name][section][key]

    out: dict[str, Any] = {}
    decode_name, decode = best("decode", past)
    context_name, ctx = best("context", context)
    batch_name, bat = best("batch", batch)
    values = {
        "decode_vs_floor": (decode_name, decode and decode["vs_floor"]),
        "decode_speedup": (decode_name, decode and decode.get("speedup_vs_torch")),
        "context_speedup": (context_name, ctx and ctx.get("speedup_vs_torch")),
        "batch8_speedup": (batch_name, bat and bat.get("speedup_vs_torch")),
    }
    for key, (label, op, goal) in TARGETS.items():
        variant, value = values[key]
        if value is None:
            out[key] = {
                "label": label,
                "goal": f"{op} {goal}",
                "variant": variant,
                "value": None,
                "met": None,
                "note": "not measured in this run",
            }
            continue
        met = value <= goal if op == "<=" else value >= goal
        margin = goal / value if op == "<=" else value / goal  # > 1: met with room; < 1: missed by that factor
        out[key] = {
            "label": label,
            "goal": f"{op} {goal}",
            "variant": variant,
            "value": value,
            "met": met,
            "margin": margin,
        }
    return out


# ---------------------------------------------------------------- repeated rounds of the target figures


def round_grid(contexts: Sequence[int], batches: Sequence[int], batch_past: int) -> dict[str, list[int]]:
    """The figures a target round re-measures: the target context, decode at batch_past, the target batch
    (or the grid's largest where the grid lacks the target value, as in --quick)."""
    context = TARGET_CONTEXT if TARGET_CONTEXT in contexts else max(contexts)
    batch = TARGET_BATCH if TARGET_BATCH in batches else max(batches)
    return {"contexts": [context], "pasts": [batch_past], "batches": [batch]}


def rotated(names: Sequence[str], k: int) -> list[str]:
    """Round k's variant order: the full pass's order rotated by k, so no variant always runs in the same slot
    (first after the model build, or last when the machine has warmed up)."""
    return list(names[k % len(names) :]) + list(names[: k % len(names)])


def round_entry(entry: Mapping[str, Any], figures: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A model entry holding one round's figures, with each variant's fixed facts (precision, bytes) copied."""
    variants = {}
    for name, fig in figures.items():
        base = entry["variants"][name]
        variants[name] = {
            "backend": base["backend"],
            "precision": base["precision"],
            "streamed_weight_bytes": base["streamed_weight_bytes"],
            **{section: fig[section] for section in ("context", "decode", "batch")},
        }
    return {"config": entry["config"], "batch_past": entry["batch_past"], "variants": variants}


def summarize_rounds(per_round: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each target over the rounds: every round's value and variant, their median and range, and a verdict:
    "met in every round", "missed in every round" or "met in k of n rounds"."""
    out: dict[str, Any] = {}
    for key, (label, op, goal) in TARGETS.items():
        rounds = [
            {"value": r[key]["value"], "variant": r[key]["variant"], "met": r[key]["met"]}
            for r in per_round
            if r.get(key, {}).get("value") is not None
        ]
        if not rounds:
            out[key] = {"label": label, "goal": f"{op} {goal}", "rounds": [], "verdict": "not measured"}
            continue
        values = sorted(r["value"] for r in rounds)
        met = sum(bool(r["met"]) for r in rounds)
        verdict = (
            "met in every round"
            if met == len(rounds)
            else "missed in every round"
            if met == 0
            else f"met in {met} of {len(rounds)} rounds"
        )
        out[key] = {
            "label": label,
            "goal": f"{op} {goal}",
            "rounds": rounds,
            "median": statistics.median(values),
            "min": values[0],
            "max": values[-1],
            "met_rounds": met,
            "verdict": verdict,
        }
    return out


def run_target_rounds(
    entry: dict[str, Any],
    model: Mapping[str, Any],
    rounds: int,
    grid: Mapping[str, list[int]],
    budget,
    threads: int,
    progress: bool,
    say: Callable[[str], None],
    before_round: Callable[[], None] = lambda: None,
) -> None:
    """Re-measure the target figures of every measured variant rounds - 1 more times, in rotated order, into
    entry["rounds"]; score_model turns them into ratios, each round's from that round alone (torch included).
    before_round: called before each round (the run samples the memory bandwidth there)."""
    names = [k for k, v in entry["variants"].items() if "error" not in v and "skipped" not in v]
    entry["rounds"] = []
    if artifacts.REFERENCE not in names:
        return
    for k in range(1, rounds):
        before_round()
        figures: dict[str, Any] = {}
        order = rotated(names, k)
        for name in order:
            say(f"bench: {model['name']} round {k + 1}/{rounds}: {name}")
            v = entry["variants"][name]
            result = run_worker(
                worker_spec(
                    v["backend"],
                    v["folder"],
                    grid["contexts"],
                    grid["pasts"],
                    grid["batches"],
                    grid["pasts"][0],
                    budget,
                    threads,
                    progress,
                    first_context=grid["contexts"][0],
                )
            )
            if "error" in result:
                say(f"bench: {model['name']} round {k + 1} {name} failed: {result['error']}")
                continue
            figures[name] = result
        entry["rounds"].append({"order": order, "variants": round_entry(entry, figures)["variants"]})


def score_model(entry: dict[str, Any], grid: Mapping[str, list[int]], bandwidth: float, matmul_rate: float) -> None:
    """Ratios (vs torch, vs floor), targets and, when rounds were run, the targets over rounds of one model
    entry, from its measured figures; run again when the bandwidth estimate improves."""
    add_comparisons(entry, bandwidth, matmul_rate)
    status = entry.get("budget_status")
    entry["targets"] = evaluate_targets(entry, grid, status)
    if "rounds" not in entry:
        return
    per_round = [entry["targets"]]
    for r in entry["rounds"]:
        one = {"config": entry["config"], "batch_past": entry["batch_past"], "variants": r["variants"]}
        add_comparisons(one, bandwidth, matmul_rate)
        per_round.append(evaluate_targets(one, grid, status))
    entry["target_rounds"] = summarize_rounds(per_round)


# ---------------------------------------------------------------- sanity of everything written


def _check_timing(where: str, fig: Any, problems: list[str]) -> None:
    if not isinstance(fig, Mapping):
        problems.append(f"{where}: missing")
        return
    for key in ("median", "p90", "n", "samples"):
        if key not in fig:
            problems.append(f"{where}: field {key!r} is missing")
            return
    for key in ("median", "p90"):
        value = fig[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"{where}: {key} = {value!r} is not a positive finite number")
    if not problems and fig["p90"] < fig["median"]:
        problems.append(f"{where}: p90 {fig['p90']:.4g} < median {fig['median']:.4g}")
    if fig["n"] != len(fig["samples"]) or fig["n"] < 1:
        problems.append(f"{where}: n = {fig['n']} but {len(fig['samples'])} samples")
    if any(not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0) for s in fig["samples"]):
        problems.append(f"{where}: a sample is not a positive finite number")
    for key in ("floor_s", "vs_floor", "speedup_vs_torch", "tokens_per_s"):
        value = fig.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            problems.append(f"{where}: {key} = {value!r} is not a positive finite number")


def check_results(results: Mapping[str, Any]) -> None:
    """Raise BenchmarkError listing every figure that is missing or not sane; silent when all are."""
    problems: list[str] = []
    for key in ("machine", "floor", "models", "command"):
        if key not in results:
            problems.append(f"results: field {key!r} is missing")
    bw = results.get("floor", {}).get("bandwidth", {}).get("read_bytes_per_s")
    if not (isinstance(bw, (int, float)) and math.isfinite(bw) and bw > 0):
        problems.append(f"floor: bandwidth {bw!r} is not a positive finite number")
    measured = 0
    for model_name, model in results.get("models", {}).items():
        for name, v in model.get("variants", {}).items():
            if "error" in v or "skipped" in v:
                continue
            measured += 1
            where = f"{model_name}/{name}"
            for key in ("load_s", "peak_rss_bytes", "disk_bytes", "streamed_weight_bytes"):
                value = v.get(key)
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    problems.append(f"{where}: {key} = {value!r} is not a positive finite number")
            for section in ("context", "decode", "batch"):
                if not v.get(section):
                    problems.append(f"{where}: no {section} figures")
                for key, fig in v.get(section, {}).items():
                    _check_timing(f"{where} {section} {key}", fig, problems)
        if model_name == results.get("grid", {}).get("rounds_model") and "target_rounds" in model:
            want = results["grid"]["rounds"]
            for key, t in model["target_rounds"].items():
                if t["verdict"] == "not measured":
                    continue
                if len(t["rounds"]) != want:
                    problems.append(f"{model_name} target {key}: {len(t['rounds'])} rounds, expected {want}")
                if any(
                    not (isinstance(r["value"], (int, float)) and math.isfinite(r["value"]) and r["value"] > 0)
                    for r in t["rounds"]
                ):
                    problems.append(f"{model_name} target {key}: a round's value is not a positive finite number")
    if measured == 0:
        problems.append("no variant was measured")
    if problems:
        raise BenchmarkError(f"{len(problems)} benchmark figure(s) are not sane: " + "; ".join(problems[:12]))


# ---------------------------------------------------------------- the run


def _grid(quick: bool, contexts, pasts, batches) -> tuple[list[int], list[int], list[int], int]:
    if quick:
        contexts, pasts, batches = contexts or (16, 32), pasts or (8, 32), batches or (1, 4)
    else:
        contexts, pasts, batches = contexts or (64, 128, 256, 512), pasts or (32, 128, 384), batches or (1, 4, 8)
    batch_past = TARGET_PAST if TARGET_PAST in pasts else max(pasts)
    return [int(c) for c in contexts], [int(p) for p in pasts], [int(b) for b in batches], batch_past


@dataclass
class Plan:
    """What one run measures, with every default resolved (quick or full) and every name checked."""

    models: tuple[str, ...]
    variants: tuple[str, ...]
    quick: bool
    out_dir: Path
    cache: Path
    contexts: list[int]
    pasts: list[int]
    batches: list[int]
    batch_past: int
    budget: Mapping[str, float]
    rounds: int
    threads: int

    @property
    def rounds_model(self) -> str:
        return TARGET_MODEL if TARGET_MODEL in self.models else self.models[0]

    def grid(self) -> dict[str, Any]:
        return {
            "contexts": self.contexts,
            "pasts": self.pasts,
            "batches": self.batches,
            "batch_past": self.batch_past,
            "budget": self.budget,
            "rounds": self.rounds,
            "rounds_model": self.rounds_model,
            "round_figures": round_grid(self.contexts, self.batches, self.batch_past),
        }


# What marks a folder as glmx bench's own: its results.json in the format run_benchmarks writes (these keys).
RESULTS_KEYS = ("command", "machine", "floor", "grid", "models")


def check_bench_output(out_dir: str | Path) -> None:
    """Refuse, before any work, an output folder glmx bench would write over without it being its own: a file,
    or an existing folder holding anything while its results.json is missing or not one glmx bench wrote (a JSON
    object with RESULTS_KEYS). An empty or new folder, or an earlier results folder, is taken."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"{out_dir} is a file, not a results folder; choose a new folder (-o DIR)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and all(k in data for k in RESULTS_KEYS) and isinstance(data["command"], str):
        return
    raise BenchmarkError(
        f"{out_dir} holds files but is not a glmx bench results folder (no results.json written by glmx bench), "
        f"and glmx bench would replace its results.json, results.md, README.md and plots: choose a new or empty "
        f"folder (-o DIR), or leave out -o for a new glmx-bench-DATE-TIME folder"
    )


def make_plan(
    models: Sequence[str],
    variants: Sequence[str] | None,
    quick: bool,
    out_dir: str | Path | None,
    cache_dir: str | Path,
    contexts,
    pasts,
    batches,
    threads: int,
    rounds: int | None,
) -> Plan:
    """Resolve --quick's defaults and refuse unknown models, variants and round counts (ValueError)."""
    if quick:
        models = ("tiny",) if tuple(models) == ("bundled", "glm-large-shape") else tuple(models)
        variants = variants or QUICK_VARIANTS
        out_dir = out_dir or tempfile.mkdtemp(prefix="glmx-bench-")
    variants = tuple(variants or DEFAULT_VARIANTS)
    for m in models:
        if m not in artifacts.MODELS and not artifacts.is_export_folder(m):
            raise ValueError(
                f"unknown model {m!r}; choose from {artifacts.MODELS} or give an exported fp32 ONNX "
                f"folder (glmx export CHECKPOINT -o FOLDER)"
            )
    for v in variants:
        if v not in artifacts.VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {sorted(artifacts.VARIANTS)}")
    if out_dir is None:
        raise ValueError("out_dir is required for a full run (--quick writes to a temporary folder)")
    check_bench_output(out_dir)
    contexts, pasts, batches, batch_past = _grid(quick, contexts, pasts, batches)
    rounds = (QUICK_ROUNDS if quick else FULL_ROUNDS) if rounds is None else int(rounds)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return Plan(
        tuple(models),
        variants,
        quick,
        Path(out_dir),
        Path(cache_dir),
        contexts,
        pasts,
        batches,
        batch_past,
        QUICK_BUDGET if quick else FULL_BUDGET,
        rounds,
        threads,
    )


def run_benchmarks(
    *,
    models: Sequence[str] = ("bundled", "glm-large-shape"),
    variants: Sequence[str] | None = None,
    quick: bool = False,
    out_dir: str | Path | None = "benchmarks/results",
    cache_dir: str | Path = artifacts.DEFAULT_CACHE,
    contexts: Sequence[int] | None = None,
    pasts: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    threads: int = 2,
    plots: bool = True,
    progress: bool = True,
    command: str | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Measure every variant of every model; write and return the results (see the module docstring).

    quick: the tiny model, torch and ONNX Runtime fp32 only, a small grid, writing to a temporary folder unless
    out_dir is given: a few seconds, for CI. rounds: how often the target figures are measured (the full pass
    is the first; default 3, --quick 2), each round's ratios within that round, so the report gives each target
    as a median and range over rounds. Raises BenchmarkError when a written figure is not sane.
    """
    say: Callable[[str], None] = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    plan = make_plan(models, variants, quick, out_dir, cache_dir, contexts, pasts, batches, threads, rounds)
    plan.cache.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = (
            f"python -c 'from glmx_benchmarks.bench import run_benchmarks; run_benchmarks(models={plan.models!r}, "
            f"variants={plan.variants!r}, quick={quick}, out_dir={str(plan.out_dir)!r}, threads={threads}, "
            f"rounds={plan.rounds})'"
        )
    results: dict[str, Any] = {
        "command": command,
        "quick": quick,
        "machine": machine_info(threads),
        "grid": plan.grid(),
        "models": {},
    }
    # --quick measures random-weight models only; the full run judges targets on paths within budget
    status = None if quick else budget_status(plan.variants, plan.cache, say)
    say(f"bench: measuring memory bandwidth and matmul rate ({threads} threads)")
    samples: list[dict[str, Any]] = []

    def sample_bandwidth() -> None:  # --quick checks the path: a small array (its figures judge nothing)
        samples.append(
            floor.measure_bandwidth(megabytes=16 if quick else 512, threads=threads, repeats=3 if quick else 7)
        )

    sample_bandwidth()
    results["floor"] = {"bandwidth": samples[0], "matmul": {}}
    bar = _progress_bar(len(plan.models) * len(plan.variants), progress)
    for model_name in plan.models:
        if model_name != plan.models[0]:
            sample_bandwidth()
        results["models"][model_name] = measure_model(
            plan, model_name, results, status, bar, progress, say, sample_bandwidth
        )
    bar.close()
    sample_bandwidth()
    settle_floor(results, samples)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    check_results(results)
    report.write_all(results, plan.out_dir, plots=plots, log=say)
    results["out_dir"] = str(plan.out_dir)
    return results


def measure_model(
    plan: Plan,
    model_name: str,
    results: dict[str, Any],
    status: Mapping[str, Any] | None,
    bar: Any,
    progress: bool,
    say: Callable[[str], None],
    sample_bandwidth: Callable[[], None],
) -> dict[str, Any]:
    """One model's entry: its artifacts prepared (or the reason it was skipped), its matmul rate (into
    results["floor"]), every variant in its own process, then the target rounds if it is the rounds model."""
    entry: dict[str, Any] = {"variants": {}, "batch_past": plan.batch_past}
    try:
        model = artifacts.prepare_model(model_name, plan.cache, say)
    except artifacts.SkipVariant as exc:
        entry["skipped"] = str(exc)
        say(f"bench: {model_name} skipped: {exc}")
        bar.update(len(plan.variants))
        return entry
    config = artifacts.load_config(model["fp32"])
    entry.update(config=config.to_dict(), random_weights=model["random_weights"])
    results["floor"]["matmul"][model_name] = floor.measure_matmul(
        config, tokens=TARGET_CONTEXT if not plan.quick else 32, repeats=3 if plan.quick else 5
    )
    fp32_bytes = floor.streamed_weight_bytes(model["fp32"])["streamed_bytes"]
    for variant in plan.variants:
        bar.set_description(f"{model_name} {variant}")
        entry["variants"][variant] = _measure_variant(
            model,
            variant,
            fp32_bytes,
            plan.contexts,
            plan.pasts,
            plan.batches,
            plan.batch_past,
            plan.budget,
            plan.threads,
            progress,
            say,
        )
        bar.update(1)
    if status is not None:
        entry["budget_status"] = {k: v for k, v in status.items() if k in entry["variants"]}
    if model_name == plan.rounds_model:
        run_target_rounds(
            entry,
            model,
            plan.rounds,
            results["grid"]["round_figures"],
            plan.budget,
            plan.threads,
            progress,
            say,
            before_round=sample_bandwidth,
        )
    if model_name != TARGET_MODEL:
        entry["targets_note"] = f"the issue's targets are set for {TARGET_MODEL}; shown here for reference"
    return entry


def settle_floor(results: dict[str, Any], samples: Sequence[Mapping[str, Any]]) -> None:
    """Score every model against the best bandwidth sample of the run.

    The floor is the fastest this machine was seen to read: a sample taken while a neighbour loaded it would put
    a floor above real timings (ratios < 1), so every ratio is scored against the best sample of the run."""
    best = max(samples, key=lambda b: b["read_bytes_per_s"])
    results["floor"]["bandwidth"] = dict(
        best,
        samples_read_bytes_per_s=[b["read_bytes_per_s"] for b in samples],
        method=best["method"] + f"; the max over {len(samples)} samples spread over the run (start, before each "
        "model after the first and each later round, end)",
    )
    for model_name, entry in results["models"].items():
        if "config" in entry:
            score_model(
                entry,
                results["grid"]["round_figures"],
                best["read_bytes_per_s"],
                results["floor"]["matmul"][model_name]["flops_per_s"],
            )


def worker_spec(
    backend: str,
    folder: str | Path,
    contexts,
    pasts,
    batches,
    batch_past: int,
    budget,
    threads: int,
    progress: bool,
    first_context: int = TARGET_CONTEXT,
) -> dict[str, Any]:
    """The JSON spec glmx_benchmarks.worker measures: one backend on one folder over the given grid."""
    return {
        "backend": backend,
        "folder": str(folder),
        "threads": threads,
        "contexts": list(contexts),
        "pasts": list(pasts),
        "batches": list(batches),
        "batch_past": batch_past,
        "budget": budget,
        "progress": progress,
        "first_context": first_context,
        "deadline_s": budget["variant_s"],
    }


def _measure_variant(
    model, variant, fp32_bytes, contexts, pasts, batches, batch_past, budget, threads, progress, say
) -> dict[str, Any]:
    try:
        backend, folder = artifacts.prepare_variant(model, variant, say)
    except artifacts.SkipVariant as exc:
        say(f"bench: {model['name']} {variant} skipped: {exc}")
        return {"skipped": str(exc)}
    result = run_worker(worker_spec(backend, folder, contexts, pasts, batches, batch_past, budget, threads, progress))
    if "error" in result:
        say(f"bench: {model['name']} {variant} failed: {result['error']}")
        return result
    manifest = artifacts.accuracy_figures(folder)
    result.update(
        backend=backend,
        folder=str(folder),
        precision=manifest.pop("precision"),
        accuracy=manifest,
        disk_bytes=artifacts.disk_bytes(folder if backend != "torch" else model["checkpoint"]),
        streamed_weight_bytes=fp32_bytes
        if backend == "torch"
        else floor.streamed_weight_bytes(folder)["streamed_bytes"],
    )
    if backend == "torch":
        result["precision"] = "fp32"
        result["disk_note"] = "the checkpoint's model.safetensors"
    return result


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a declared dependency; without it, run silently
        enabled = False
    if not enabled:

        class _Silent:
            def update(self, n=1):
                pass

            def set_description(self, s):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, file=sys.stderr, unit="variant", leave=True)
