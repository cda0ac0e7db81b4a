"""Renders benchmark results: results.json, a Markdown report, the README's performance table, PNG plots.

In: the results dict of bench.run_benchmarks (or results.json). Out: files under an output folder, and
`readme_table(results)` -> the Markdown table the project README shows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from glm_runtime.manifest import atomic_write_json, atomic_write_text

MB = 2**20


def save_record(out_dir: Path, stem: str, record: Mapping[str, Any], markdown: str) -> None:
    """A stand-alone benchmark's results: out_dir/STEM.json (the record) and out_dir/STEM.md (its report), each
    written atomically (a killed run leaves the last complete file); the report is printed too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", markdown + "\n")
    print(markdown)


def _order(name: str) -> tuple[int, str]:
    """Variants in artifacts.VARIANTS' order (torch first), whatever order results.json stored them in."""
    from glmx_benchmarks.artifacts import VARIANTS

    names = list(VARIANTS)
    return (names.index(name) if name in names else len(names), name)


def _measured(model: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in sorted(model.get("variants", {}).items(), key=lambda kv: _order(kv[0]))
        if "error" not in v and "skipped" not in v
    }


def _ms(fig: Mapping[str, Any] | None) -> str:
    return "-" if not fig else f"{fig['median'] * 1e3:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_acc(acc: Mapping[str, Any]) -> str:
    if acc.get("top1_agreement") is not None:
        return f"{acc['top1_agreement']:.3f}"
    return acc.get("parity", "-")


def readme_table(results: Mapping[str, Any], model_name: str | None = None) -> str:
    """The README's performance table for one model (default: glm-large-shape when measured, else the first)."""
    models = results["models"]
    if model_name is None:
        model_name = "glm-large-shape" if _measured(models.get("glm-large-shape", {})) else next(iter(models))
    model = models[model_name]
    grid = results["grid"]
    past, batch = str(grid["batch_past"]), str(max(grid["batches"]))
    context = "128" if 128 in grid["contexts"] else str(max(grid["contexts"]))
    lines = [
        f"Model `{model_name}`, batch 1 unless noted, {results['machine']['threads_used']} threads on "
        f"{results['machine']['cpu']} (medians; speed-ups vs torch eager fp32 measured in the same run).",
        "",
        f"| backend | decode ms (past {past}) | vs floor | speed-up | context {context} ms | speed-up | "
        f"batch-{batch} tok/s | speed-up | peak RSS MB | disk MB | top-1 vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in _measured(model).items():
        d, c, b = v["decode"].get(past), v["context"].get(context), v["batch"].get(batch)
        lines.append(
            f"| {name} | {_ms(d)} | {_x(d and d.get('vs_floor'))} | {_x(d and d.get('speedup_vs_torch'))} "
            f"| {_ms(c)} | {_x(c and c.get('speedup_vs_torch'))} | "
            f"{'-' if not b else format(b['tokens_per_s'], '.1f')} | {_x(b and b.get('speedup_vs_torch'))} "
            f"| {v['peak_rss_bytes'] / MB:.0f} | {v['disk_bytes'] / MB:.0f} | {_fmt_acc(v['accuracy'])} |"
        )
    skipped = {k: v.get("skipped") or v.get("error") for k, v in model["variants"].items() if k not in _measured(model)}
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} |||||||||| ")
    return "\n".join(lines)


def _detail(title: str, model: Mapping[str, Any], section: str, keys: list, unit: str) -> list[str]:
    lines = [
        f"#### {title}",
        "",
        "| variant | " + " | ".join(f"{unit} {k}" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, v in _measured(model).items():
        cells = []
        for k in keys:
            f = v[section].get(str(k))
            cells.append(
                "-"
                if not f
                else f"{f['median'] * 1e3:.2f} / {f['p90'] * 1e3:.2f} ms (n={f['n']}, "
                f"{_x(f.get('speedup_vs_torch'))} torch, {_x(f.get('vs_floor'))} floor)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def budget_lines(model: Mapping[str, Any]) -> list[str]:
    """Which variants the targets count: those whose recipe keeps the bundled model within its budget."""
    status = model.get("budget_status")
    if not status:
        return []
    out = [
        f"- {name}: {'counted' if s['within_budget'] else 'not counted'} ({s['why']})"
        for name, s in sorted(status.items(), key=lambda kv: _order(kv[0]))
        if name != "torch-fp32"
    ]
    return (
        [
            "Paths the targets count: the bundled model's artifact of the same recipe must be within its "
            "accuracy budget (glm_export.compare.BUDGETS; this model's own weights are random):",
            "",
        ]
        + out
        + [""]
    )


def targets_lines(model: Mapping[str, Any]) -> list[str]:
    lines = []
    for t in model.get("targets", {}).values():
        if t["met"] is None:
            lines.append(f"- {t['label']} {t['goal']}: not measured ({t.get('note', '')})")
            continue
        verdict = "MET" if t["met"] else "MISSED"
        how = f"with {t['margin']:.2f}x to spare" if t["met"] else f"short by a factor {1 / t['margin']:.2f}"
        lines.append(f"- {t['label']} {t['goal']}: **{verdict}** by {t['variant']}: {t['value']:.2f} ({how})")
    return lines


def rounds_lines(model: Mapping[str, Any], rounds: int) -> list[str]:
    """The targets over repeated rounds: each round's ratio (and the variant that gave it), median, range."""
    summary = model.get("target_rounds")
    if not summary:
        return []
    lines = [
        f"#### Targets over {rounds} rounds",
        "",
        "Round 1 is the full pass above; later rounds re-measure only these figures, variants in rotated "
        "order, each ratio against torch measured in the same round. The spread is this machine's noise.",
        "",
        "| target | goal | per round (best variant) | median | range | verdict |",
        "|---|---|---|---:|---|---|",
    ]
    for t in summary.values():
        if t["verdict"] == "not measured":
            lines.append(f"| {t['label']} | {t['goal']} | - | - | - | not measured |")
            continue
        per = ", ".join(f"{r['value']:.2f} ({r['variant']})" for r in t["rounds"])
        lines.append(
            f"| {t['label']} | {t['goal']} | {per} | {t['median']:.2f} | {t['min']:.2f}-{t['max']:.2f} | "
            f"{t['verdict']} |"
        )
    return lines + [""]


def render_markdown(results: Mapping[str, Any]) -> str:
    m, fl = results["machine"], results["floor"]
    bw = fl["bandwidth"]
    lines = [
        "# glmx benchmark results",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads_used']} threads used), {m['platform']}; "
        f"load average at start {m['load_average_start'][0]:.2f}, at end {m['load_average_end'][0]:.2f}; "
        f"{m['date_utc']}.",
        "",
        "CPU flags: " + (" ".join(m.get("cpu_flags") or []) or "not read (no lscpu)"),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        f"Floor: read bandwidth {bw['read_bytes_per_s'] / 1e9:.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:.1f} "
        f"GB/s); fp32 GEMM rate "
        + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.0f} GFLOP/s" for k, v in fl["matmul"].items())
        + ". "
        "Decode floor = (weight bytes read per token + cached K/V bytes) / read bandwidth; context floor = "
        "FLOPs / GEMM rate.",
        "",
        "Each cell: median / p90 (n samples), speed-up vs torch eager fp32 from the same run, ratio to the floor.",
        "",
        "torch eager fp32 runs GLM's own forward, which computes the output head at every position of a "
        "context pass (as users run it today); the ONNX Runtime variants run glmx's runtime, which asks the "
        "graph for the one position it samples from (`logits_start`). Each context-pass floor counts the head "
        "rows its backend computes.",
        "",
    ]
    grid = results["grid"]
    for name, model in results["models"].items():
        lines += [f"## {name}", ""]
        if model.get("skipped"):
            lines += [f"Skipped: {model['skipped']}", ""]
            continue
        if model.get("random_weights"):
            lines += [
                "Random weights (speed does not depend on weight values; accuracy figures are not "
                "meaningful for them).",
                "",
            ]
        lines += [readme_table(results, name), ""]
        lines += _detail("Context pass (time to first token), batch 1", model, "context", grid["contexts"], "ctx")
        lines += _detail("Decode latency per token, batch 1", model, "decode", grid["pasts"], "past")
        lines += _detail(f"Decode step at past {grid['batch_past']} by batch", model, "batch", grid["batches"], "batch")
        gaps = [f"{k}: {', '.join(v['not_measured'])}" for k, v in _measured(model).items() if v.get("not_measured")]
        if gaps:
            lines += ["Left out when a backend passed its time budget: " + "; ".join(gaps) + ".", ""]
        lines += ["#### Targets", ""] + ([model["targets_note"], ""] if model.get("targets_note") else [])
        lines += budget_lines(model) + targets_lines(model) + [""]
        lines += rounds_lines(model, grid.get("rounds", 1))
    return "\n".join(lines)


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[str]:
    """latency vs past length, throughput vs batch, context time vs length: one PNG each per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model_name, model in results["models"].items():
        variants = _measured(model)
        if not variants:
            continue
        for section, xlabel, ylabel, value in (
            ("decode", "past length (tokens)", "decode latency per token, ms (median)", lambda f: f["median"] * 1e3),
            ("batch", "batch size", "tokens / s", lambda f: f["tokens_per_s"]),
            ("context", "context length (tokens)", "context pass, ms (median)", lambda f: f["median"] * 1e3),
        ):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for name, v in variants.items():
                xs = sorted(int(k) for k in v[section])
                ax.plot(xs, [value(v[section][str(x)]) for x in xs], marker="o", label=name)
            if section == "decode":
                best = min(variants.values(), key=lambda v: v["streamed_weight_bytes"])
                xs = sorted(int(k) for k in best["decode"])
                ax.plot(
                    xs,
                    [best["decode"][str(x)]["floor_s"] * 1e3 for x in xs],
                    "k--",
                    label=f"bandwidth floor ({best['precision']})",
                )
            ax.set_yscale("log")  # backends differ by orders of magnitude
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model_name}: {section}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = out_dir / f"{model_name}-{section}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path.name)
    return written


def write_all(
    results: dict[str, Any],
    out_dir: Path,
    plots: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = []
    if plots:
        try:
            results["plots"] = write_plots(results, out_dir)
        except ImportError:
            results["plots_note"] = "matplotlib is not installed (pip install 'glmx[dev]'): no plots"
            log(f"bench: {results['plots_note']}")
    atomic_write_json(out_dir / "results.json", results)
    markdown = render_markdown(results)
    atomic_write_text(out_dir / "results.md", markdown + "\n")
    readme = [
        "# Benchmark results",
        "",
        "Made by:",
        "",
        "```",
        results["command"],
        "```",
        "",
        "Files: `results.json` (machine, versions, every sample), `results.md` (all tables), "
        + ", ".join(f"`{p}`" for p in results["plots"])
        + ".",
        "",
        readme_table(results),
        "",
    ]
    atomic_write_text(out_dir / "README.md", "\n".join(readme))
    log(f"bench: wrote {out_dir}/results.json, results.md, README.md and {len(results['plots'])} plots")


def print_readme_table(results_json: str | Path) -> None:
    """Print the README's performance table from a results.json (the lead pastes it)."""
    print(readme_table(json.loads(Path(results_json).read_text())))
