"""The bundled model's quantization table: every scheme made with `glmx`, its accuracy read from its manifest.

In: an fp32 ONNX folder (default: the bundled model), a work folder for the artifacts.
Out: benchmarks/results/quantization_bundled.json (the commands, budgets, and per artifact: accuracy figures
against its parent, size, op counts) and the Markdown table README shows, printed.

    python -m glmx_benchmarks.quantization [--model DIR] [--work DIR] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "runtime/bundled/glmx-small-onnx"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quantization_bundled.json"
# (row name, glmx arguments); $MODEL and $OUT are replaced. "-head" rows quantize the tied output head too;
# rows without --keep-fp32 take the scheme's default (glm_export.quantize.DEFAULT_KEEP_FP32).
COMMANDS = [
    ("fp16", "quantize $MODEL -o $OUT/fp16 --scheme fp16"),
    ("int8-dynamic", "quantize $MODEL -o $OUT/int8-dynamic --scheme int8-dynamic"),
    (
        "int8-dynamic, first layer int8 too",
        "quantize $MODEL -o $OUT/int8-dynamic-all-layers --scheme int8-dynamic --keep-fp32 embedding --keep-fp32 head",
    ),
    (
        "int8-dynamic-head",
        "quantize $MODEL -o $OUT/int8-dynamic-head --scheme int8-dynamic --keep-fp32 embedding --keep-fp32 first-layer",
    ),
    ("qdq-int8", "quantize $MODEL -o $OUT/qdq-int8 --scheme qdq-int8"),
    (
        "qdq-int8, first layer int8 too",
        "quantize $MODEL -o $OUT/qdq-int8-all-layers --scheme qdq-int8 --keep-fp32 embedding --keep-fp32 head",
    ),
    (
        "qdq-int8-head",
        "quantize $MODEL -o $OUT/qdq-int8-head --scheme qdq-int8 --keep-fp32 embedding --keep-fp32 first-layer",
    ),
    ("int4-weight", "quantize $MODEL -o $OUT/int4-weight --scheme int4-weight"),
    (
        "int4-weight, every matmul in blocks of 32 (the default before)",
        "quantize $MODEL -o $OUT/int4-weight-blocks-32 --scheme int4-weight --block-size 32 --head-block-size 32",
    ),
    (
        "int4-weight, layers in blocks of 64",
        "quantize $MODEL -o $OUT/int4-weight-blocks-64 --scheme int4-weight --block-size 64",
    ),
    (
        "int4-weight, layers in blocks of 128",
        "quantize $MODEL -o $OUT/int4-weight-blocks-128 --scheme int4-weight --block-size 128",
    ),
    (
        "int4-weight, head fp32",
        "quantize $MODEL -o $OUT/int4-weight-head-fp32 --scheme int4-weight --keep-fp32 embedding --keep-fp32 head",
    ),
    ("int4-weight, head int4 too", "quantize $MODEL -o $OUT/int4-weight-head4 --scheme int4-weight --head-bits 4"),
    ("int8-weight", "quantize $MODEL -o $OUT/int8-weight --scheme int8-weight"),
    (
        "int8-weight, every matmul in blocks of 32 (the default before)",
        "quantize $MODEL -o $OUT/int8-weight-blocks-32 --scheme int8-weight --block-size 32",
    ),
    (
        "int8-weight, head fp32",
        "quantize $MODEL -o $OUT/int8-weight-head-fp32 --scheme int8-weight --keep-fp32 embedding --keep-fp32 head",
    ),
    (
        "int8-weight, head 8-bit blocks of 128",
        "quantize $MODEL -o $OUT/int8-weight-head8-128 --scheme int8-weight --head-block-size 128",
    ),
    ("optimized", "optimize $MODEL -o $OUT/optimized"),
    ("optimized+int8-dynamic", "quantize $OUT/optimized -o $OUT/optimized-int8-dynamic --scheme int8-dynamic"),
]
# every row is written even when it misses its budget, so the table can show the miss
COMMON = "--accept-loss --overwrite"
FIGURES = (
    "max_logit_diff",
    "top1_agreement",
    "fill_agreement",
    "fill_token_agreement",
    "ppl_reference",
    "ppl_candidate",
    "ppl_change",
    "positions",
    "fill_prompts",
    "fill_method",
    "within_budget",
    "misses",
)


def command_line(args: str, model: str, out: str) -> str:
    line = f"glmx {args.replace('$MODEL', model).replace('$OUT', out)}"
    return f"{line} --overwrite" if line.startswith("glmx optimize") else f"{line} {COMMON}"


def artifact_row(folder: Path) -> dict[str, Any]:
    """Figures of one written folder, from its manifest (accuracy vs its parent) and its files."""
    import onnx

    from glm_export.derive import op_histogram
    from glm_runtime.manifest import MODEL_FILE, load_manifest

    manifest = load_manifest(folder)
    acc = (manifest.parity or {}).get("text") or {}
    model = onnx.load(str(folder / manifest.extra.get("model_file", MODEL_FILE)), load_external_data=False)
    quant = manifest.extra.get("quantization") or {}
    return {
        "precision": manifest.precision,
        "keep_fp32": quant.get("keep_fp32"),
        "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model")),
        **{k: acc.get(k) for k in FIGURES},
        "budget": acc.get("budget"),
        "ops": op_histogram(model),
    }


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| artifact | top-1 agreement | greedy fills identical | Part B ppl change | budget (top-1) | within |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        fills = f"{round(r['fill_agreement'] * r['fill_prompts'])}/{r['fill_prompts']}"
        budget = (r.get("budget") or {}).get("top1")
        within = {True: "yes", False: "**no**", None: "-"}[r["within_budget"]]
        lines.append(
            f"| {name} | {r['top1_agreement']:.4f} | {fills} | {100 * r['ppl_change']:+.2f}% | >= {budget} | {within} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="fp32 ONNX folder [%(default)s]")
    ap.add_argument("--work", default="/tmp/glmx-quantization", help="where the artifacts go [%(default)s]")
    ap.add_argument("-o", "--out", default=str(DEFAULT_OUT), help="JSON to write [%(default)s]")
    args = ap.parse_args(argv)
    from glm_export.compare import BUDGETS
    from glm_runtime.manifest import atomic_path, load_manifest

    glmx = [sys.executable, "-m", "glm_export.cli"]
    commands, rows = [], {}
    for name, template in COMMANDS:
        line = command_line(template, args.model, args.work)
        commands.append(line)
        print(f"[{name}] {line}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        argv = shlex.split(line)[1:]
        subprocess.run(glmx + argv, check=True, cwd=ROOT)
        rows[name] = dict(artifact_row(ROOT / argv[argv.index("-o") + 1]), seconds=round(time.perf_counter() - t0, 1))
    parent = load_manifest(ROOT / args.model)  # an absolute path replaces ROOT
    result = {
        "model": args.model,
        "parent_config": parent.config,
        "parent_files": parent.files,
        "budgets": BUDGETS,
        "commands": commands,
        "reproduce": "python -m glmx_benchmarks.quantization",
        "eval_text": "glm_export/data/calibration.txt, odd documents (held-out text)",
        "calibration": "glm_export/data/calibration.txt, even documents (qdq-int8 only)",
        "how": "each command writes a folder whose manifest.json holds parity.text "
        "(glm_export.compare.compare_on_text against its parent); rows copy those figures, "
        "file sizes and op counts; '-head' rows quantize the tied output head too",
        "results": rows,
    }
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(markdown(rows))


if __name__ == "__main__":
    main()
