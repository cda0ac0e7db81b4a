"""One model in 1, 2 and 4 pipeline stages on a local Ray (glm_runtime.pipeline), against the same model in one
process: what a stage holds and what the pipeline costs, not speed (every stage shares this machine's cores).

    python -m glmx_benchmarks.pipeline_stages [--model DIR] [--stages 1,2,4] [--max-new-tokens 16] [--requests 8]

Per stage count: each stage actor's weight bytes and peak RSS (getrusage in the actor, after the runs), decode
ms/token at batch 1 (one request, the engine's decode time over its decode calls), new tokens/s with `--requests`
requests at once (rows = requests), and the per-boundary transfer cost: a Ray actor call carrying one hidden vector
(fp32 [1, 1, h], and [8, 1, h] for 8 rows) and an empty call, medians of 50. The single-process numbers
are the same engine on one ONNX Runtime session. Writes benchmarks/results/pipeline.{json,md} (or --out DIR,
--name STEM).
Nothing else may share the cores while it runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glm_runtime.generate import fill_blanks
from glm_runtime.session import open_model
from glmx_benchmarks.machine import cpu_facts
from glmx_benchmarks.report import save_record

PROMPT = "The capital of France is [MASK]."
PROMPTS = [
    "The capital of France is [MASK].",
    "He went to the [MASK] and bought [MASK] for dinner.",
    "Once upon a time [gMASK]",
    "The [sMASK] was very good.",
]
RESULTS = Path(__file__).resolve().parent / "results"


def measure(session, tok, budget: int, requests: int) -> dict:
    """Decode ms/token at batch 1 and new tokens/s with `requests` at once (rows = requests), on any session."""
    fill_blanks(session, tok, [PROMPT], max_new_tokens=2)  # warm: first calls allocate
    (alone,) = fill_blanks(session, tok, [PROMPT], max_new_tokens=budget)
    t = alone.timings
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    results = fill_blanks(session, tok, prompts, max_new_tokens=budget)
    wall = time.perf_counter() - t0
    return {
        "decode_ms_per_token": 1000 * t["decode_s"] / max(t["decode_steps"], 1),
        "tokens_per_s": sum(r.timings["new_tokens"] for r in results) / wall,
        "requests": requests,
    }


def boundary_cost(session, hidden: int) -> dict:
    """A Ray actor call carrying one hidden vector per row to the last stage, and an empty one (medians of 50):
    what one stage boundary costs a micro-batch (the call's latency; the bytes are a small part of it)."""
    import ray

    handle = session.stages.handles[-1]

    def median_call(x) -> float:
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            ray.get(handle.echo.remote(x), timeout=60)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    empty = median_call(np.zeros((0,), np.float32))
    out = {"empty_call_ms": 1000 * empty}
    for rows in (1, 8):
        x = np.random.default_rng(0).standard_normal((rows, 1, hidden)).astype(np.float32)
        out[f"rows_{rows}_ms"] = 1000 * median_call(x)
        out[f"rows_{rows}_bytes"] = int(x.nbytes)
    return out


def pipeline_level(model, stages: int, budget: int, requests: int, root: Path, stage_cpus: float = 1.0) -> dict:
    from glm_runtime.pipeline import open_pipeline

    session, tok = open_pipeline(
        model, stages, stage_root=root, name=f"bench-{os.getpid()}-{stages}", stage_cpus=stage_cpus
    )
    try:
        entry = measure(session, tok, budget, requests)
        entry["boundary"] = boundary_cost(session, session.config.hidden_size)
        session.probe(60)
        entry["stages"] = [
            {k: info[k] for k in ("stage", "layers", "weights_bytes", "peak_rss_bytes")} for info in session.info
        ]
    finally:
        session.close()
    return entry


def table(record: dict) -> str:
    lines = [
        "# A model in pipeline stages (Ray, one machine)",
        "",
        f"`{record['command']}` on {record['date']}; CPU {record['machine']['cpu']} "
        f"({' '.join(record['machine']['flags'])}); model {record['model']} ({record['layers']} layers, hidden "
        f"{record['hidden']}); max_new_tokens {record['max_new_tokens']}; each stage actor reserves "
        f"{record.get('stage_cpus', 1.0):g} CPU and runs ONNX Runtime on that many threads (the one-process row: "
        f"ONNX Runtime's default, all {os.cpu_count()} cores). Every stage shares this machine's cores: "
        "the point is memory per stage and the pipeline's overhead, not speed.",
        "",
        "| stages | decode ms/token (batch 1) | tokens/s (8 at once) | boundary call, 1 row / 8 rows (ms) | "
        "per stage: layers, weights MiB, peak RSS MiB |",
        "|---|---:|---:|---:|---|",
    ]
    one = record["single_process"]
    lines.append(
        f"| one process, no Ray | {one['decode_ms_per_token']:.1f} | {one['tokens_per_s']:.1f} | - | "
        f"all, {record['weights_bytes'] / 2**20:.1f} MiB, {one['peak_rss_bytes'] / 2**20:.0f} |"
    )
    for n, e in record["pipelines"].items():
        cost = e["boundary"]
        per = "; ".join(
            f"{a}-{b - 1}: {s['weights_bytes'] / 2**20:.1f}, {s['peak_rss_bytes'] / 2**20:.0f}"
            for s in e["stages"]
            for a, b in [s["layers"]]
        )
        lines.append(
            f"| {n} | {e['decode_ms_per_token']:.1f} | {e['tokens_per_s']:.1f} | "
            f"{cost['rows_1_ms']:.2f} / {cost['rows_8_ms']:.2f} (empty call {cost['empty_call_ms']:.2f}) | {per} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported ONNX folder (default: the bundled model)")
    parser.add_argument("--stages", default="1,2,4", help="stage counts, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="pipeline", help="the results' file stem (one per model measured)")
    parser.add_argument(
        "--stage-cpus",
        type=float,
        default=1.0,
        help="CPUs each stage reserves, and its ONNX Runtime threads (the one-process row uses ONNX Runtime's default)",
    )
    args = parser.parse_args(argv)
    import ray

    from glm_runtime.stage_worker import peak_rss_bytes

    counts = [int(n) for n in args.stages.split(",")]
    session, tok = open_model(args.model)
    record = {
        "command": "python -m glmx_benchmarks.pipeline_stages " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": cpu_facts(),
        "model": args.model or "bundled",
        "layers": session.config.num_layers,
        "hidden": session.config.hidden_size,
        "max_new_tokens": args.max_new_tokens,
        "stage_cpus": args.stage_cpus,
        "single_process": measure(session, tok, args.max_new_tokens, args.requests),
        "pipelines": {},
    }
    record["single_process"]["peak_rss_bytes"] = peak_rss_bytes()
    session.close()
    from glm_runtime.stages import parent_facts

    folder = Path(args.model) if args.model else None
    if folder is None:
        from glm_runtime.session import default_model

        folder = default_model()
    record["weights_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
    record["parent"] = parent_facts(folder)
    cpus = int(max(counts) * args.stage_cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory(prefix="glmx-stages-") as root:
            for n in counts:
                print(f"{n} stage(s) ...", flush=True)
                record["pipelines"][str(n)] = pipeline_level(
                    args.model, n, args.max_new_tokens, args.requests, Path(root), args.stage_cpus
                )
    finally:
        ray.shutdown()
    save_record(args.out, args.name, record, table(record))


if __name__ == "__main__":
    main()
