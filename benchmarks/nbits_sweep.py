"""The 4-bit weight stream's kernel-level choices, timed on one token through every layer's four matmuls of a
model's shape (glmx_benchmarks.kernel_rates' graph): MatMulNBits block size 32 / 64 / 128, accuracy level 0 / 1 / 4
(fp32 products / fp32 / int8 products), symmetric or with zero points. Interleaved rounds, medians.

    python -m glmx_benchmarks.nbits_sweep [--model glm-large-shape] [--threads 2] [--rounds 5] [--repeats 15]

Out: benchmarks/results/nbits_sweep.{json,md} with the installed onnxruntime's version and the CPU flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from glmx_benchmarks.kernel_rates import kernel_rate, matmul_graph
from glmx_benchmarks.report import save_record

RESULTS = Path(__file__).resolve().parent / "results"


def nbits_graph(model, bits: int, block: int, level: int, symmetric: bool):
    """Each MatMul of `model` as a MatMulNBits packed by ONNX Runtime's own quantize_matmul_{4,8}bits."""
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    from glm_export.onnx_graph import CONTRIB

    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes, inits = [], []
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    for node in model.graph.node:
        w = weights[node.input[1]].astype(np.float32)
        K, N = w.shape
        blocks = -(-K // block)
        packed = np.zeros((N, blocks, block * bits // 8), dtype=np.uint8)
        scales = np.zeros((N, blocks), dtype=np.float32)
        zp = np.zeros((N, -(-blocks * bits // 8)), dtype=np.uint8)
        quantize(packed, w, scales, zp, block, N, K, symmetric)
        name = node.input[1]
        inits += [
            numpy_helper.from_array(packed, f"{name}.Q"),
            numpy_helper.from_array(scales.reshape(-1), f"{name}.scales"),
        ]
        inputs = [node.input[0], f"{name}.Q", f"{name}.scales"]
        if not symmetric:
            inits.append(numpy_helper.from_array(zp.reshape(-1), f"{name}.zp"))
            inputs.append(f"{name}.zp")
        attrs = dict(K=K, N=N, bits=bits, block_size=block)
        if level:
            attrs["accuracy_level"] = level
        nodes.append(
            helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name + "_Q", domain=CONTRIB, **attrs)
        )
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input), list(model.graph.output), inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import) + [helper.make_opsetid(CONTRIB, 1)])


def sweep_config(model: str, layers: int | None):
    """A benchmark model's config (artifacts.model_config) or a runtime preset's, cut to `layers` layers: the
    kernels' rates do not depend on how many layers are timed, and a 6B model's fp32 matmuls do not fit whole."""
    from glm_runtime.config import get_preset
    from glmx_benchmarks.artifacts import MODELS, model_config

    config = model_config(model) if model in MODELS else get_preset(model)
    return config if layers is None else config.replace(num_layers=layers)


def grid(bits: int) -> list[tuple[int, int, int, bool]]:
    """(bits, block, accuracy level, symmetric) to time: the 4-bit choices (and the 8-bit recipe's two), or the
    8-bit stream's choices (and the 4-bit recipe's two beside them)."""
    if bits == 4:
        settings = [(4, b, lvl, sym) for b in (32, 64, 128) for lvl in (0, 1, 4) for sym in (True, False)]
        return settings + [(8, 32, 4, True), (8, 128, 4, True)]
    return [(8, b, lvl, True) for b in (32, 64, 128) for lvl in (0, 1, 4)] + [(4, 32, 4, True), (4, 128, 4, True)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="glm-large-shape", help="a benchmark model (glm-large-shape, tiny) or a preset")
    ap.add_argument("--layers", type=int, default=None, help="time this many of its layers [default: all]")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="the grid: 4-bit (default) or 8-bit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import onnxruntime

    config = sweep_config(args.model, args.layers)
    base = matmul_graph(config)
    settings = grid(args.bits)
    graphs = {s: nbits_graph(base, *s) for s in settings}
    nbytes = {s: sum(t.raw_data.__len__() or 0 for t in g.graph.initializer) for s, g in graphs.items()}
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    times[("fp32",)] = []
    for r in range(args.rounds):  # interleaved: every setting once per round
        times[("fp32",)].append(kernel_rate(base, args.threads, args.repeats))
        for s in settings:
            times[s].append(kernel_rate(graphs[s], args.threads, args.repeats))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    fp32 = statistics.median(times[("fp32",)])
    rows = []
    for s in settings:
        t = statistics.median(times[s])
        bits, block, level, sym = s
        rows.append(
            {
                "bits": bits,
                "block_size": block,
                "accuracy_level": level,
                "symmetric": sym,
                "ms": 1000 * t,
                "weight_mb": nbytes[s] / 1e6,
                "gb_per_s": nbytes[s] / t / 1e9,
                "vs_fp32": fp32 / t,
                "rounds_ms": [1000 * x for x in times[s]],
            }
        )
    from glmx_benchmarks.machine import cpu_facts

    cpu = cpu_facts()["flags"]
    record = {
        "command": "python -m glmx_benchmarks.nbits_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "onnxruntime": onnxruntime.__version__,
        "model": args.model,
        "layers": config.num_layers,
        "threads": args.threads,
        "fp32_ms": 1000 * fp32,
        "cpu_flags": [f for f in cpu if f.startswith(("avx", "amx", "fma"))],
        "rows": rows,
    }
    lines = [
        f"# MatMulNBits settings: one token through {config.num_layers} layers' matmuls ({args.model}, "
        f"{args.threads} threads)",
        "",
        f"`{record['command']}` on {record['date']}, onnxruntime {record['onnxruntime']}, median of "
        f"{args.rounds} interleaved rounds; fp32 MatMul: {1000 * fp32:.2f} ms. CPU flags: "
        f"{' '.join(record['cpu_flags'])}",
        "",
        "| bits | block | accuracy level | zero points | ms | weight MB | GB/s | vs fp32 |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["ms"]):
        lines.append(
            f"| {r['bits']} | {r['block_size']} | {r['accuracy_level']} | "
            f"{'no' if r['symmetric'] else 'yes'} | {r['ms']:.2f} | {r['weight_mb']:.0f} | "
            f"{r['gb_per_s']:.1f} | {r['vs_fp32']:.2f}x |"
        )
    plain = args.model == "glm-large-shape" and args.bits == 4
    name = "nbits_sweep" if plain else f"nbits_sweep_{args.model}_{args.bits}"
    save_record(args.out, name, record, "\n".join(lines))


if __name__ == "__main__":
    main()
