"""Why a quantized decode step misses its bandwidth floor: each weight format's matmul kernel alone, at the
model's decode shapes (one token through every layer's four matmuls), against the read bandwidth measured in the
same run; and, given an exported folder, what attention over the cache adds to a decode step.

    python -m glmx_benchmarks.kernel_rates [--model glm-large-shape] [--threads 1 2] [--folder FOLDER] [--past 128]

Out (stdout, Markdown): per format and thread count, the median time of all layers' matmuls, the weight bytes
they read, the rate and its share of the read bandwidth. A kernel that reads at less than the bandwidth is bound
by its own arithmetic (dequantizing, quantizing the activation), which a faster thread count shows. With
--folder: the runtime's decode step at past 0 and at --past, so attention's cost is their difference.
The kernel-limited floor of a path = its layers at the kernel's rate + the fp32 head and the K/V at bandwidth.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from glmx_benchmarks.floor import median_seconds

FORMATS = ("fp32", "int8-dynamic", "int4-weight")


def layer_shapes(config: Any) -> list[tuple[int, int]]:
    """(K, N) of one layer's four weight matmuls: query_key_value, dense, h->4h (2 x inner for a GeGLU), 4h->h."""
    h = config.hidden_size
    return [(h, 3 * h), (h, h), (h, config.mlp_in_size), (config.inner_size, h)]


def matmul_graph(config: Any, seed: int = 0) -> Any:
    """Every layer's four MatMuls on one token (inputs x [1,1,h] and x4 [1,1,4h]), weights N(0, 0.02)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h = config.hidden_size
    nodes, weights, outputs = [], [], []
    for layer in range(config.num_layers):
        for k, (rows, cols) in enumerate(layer_shapes(config)):
            w = f"w{layer}_{k}"
            weights.append(numpy_helper.from_array((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), w))
            nodes.append(
                helper.make_node(
                    "MatMul", ["x" if k < 3 else "x4", w], [f"y{layer}_{k}"], name=f"/layers.{layer}/MatMul{k}"
                )
            )
            outputs.append(helper.make_tensor_value_info(f"y{layer}_{k}", TensorProto.FLOAT, [1, 1, cols]))
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, h]),
        helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, config.inner_size]),
    ]
    graph = helper.make_graph(nodes, "decode_matmuls", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantized(model: Any, fmt: str, tmp: Path) -> Any:
    """The graph in weight format `fmt`, made with glmx's own recipe for that scheme (glm_export.quantize)."""
    import onnx
    from onnx import helper, numpy_helper

    from glm_export.nbits import CONTRIB, NBits
    from glm_export.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, int8_dynamic_file

    if fmt == "fp32":
        return model
    if fmt == "int8-dynamic":
        onnx.save(model, tmp / "fp32.onnx")
        int8_dynamic_file(tmp / "fp32.onnx", tmp / "int8.onnx")
        return onnx.load(tmp / "int8.onnx")
    # int4-weight: each MatMul as the MatMulNBits node glm_export.nbits.NBits writes for the scheme
    nbits = NBits(4, DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL, keep=lambda prefix: False)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes, inits = [], []
    for node in model.graph.node:
        w = weights[node.input[1]]
        packed, scales = nbits.pack(w)
        inits += [
            numpy_helper.from_array(packed, f"{node.input[1]}.Q4"),
            numpy_helper.from_array(scales, f"{node.input[1]}.scales"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{node.input[1]}.Q4", f"{node.input[1]}.scales"],
                list(node.output),
                name=f"{node.name}_Q4",
                domain=CONTRIB,
                K=w.shape[0],
                N=w.shape[1],
                bits=4,
                block_size=DEFAULT_BLOCK_SIZE,
                accuracy_level=DEFAULT_ACCURACY_LEVEL,
            )
        )
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input), list(model.graph.output), inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import) + [helper.make_opsetid(CONTRIB, 1)])


def weight_bytes(model: Any) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def kernel_rate(model: Any, threads: int, repeats: int) -> float:
    """Median seconds of one run of the graph on ONNX Runtime's CPU provider with `threads` intra-op threads."""
    import onnxruntime as ort

    from glm_runtime.session import quiet_options

    options = quiet_options(ort.SessionOptions())
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    h, inner = (int(i.shape[-1]) for i in session.get_inputs())
    feeds = {
        "x": rng.standard_normal((1, 1, h)).astype(np.float32),
        "x4": rng.standard_normal((1, 1, inner)).astype(np.float32),
    }
    return median_seconds(lambda: session.run(None, feeds), repeats)


def decode_by_past(folder: str, threads: int, past: int, repeats: int) -> dict[int, float]:
    """The runtime's decode step (batch 1) at past 0 and at `past`: median seconds each."""
    import onnxruntime as ort

    from glm_runtime import masks
    from glm_runtime.session import open_session
    from glm_runtime.steps import decode_step
    from glmx_benchmarks.worker import fill_cache

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = open_session(folder, "onnxruntime", session_options=options)
    out = {}
    for p in (0, past):
        cache = fill_cache(session, 1, p, np.random.default_rng(0))
        positions = masks.decode_positions([max(p // 2, 0)], [1])

        def step() -> None:
            decode_step(session, cache, [500], positions, [True])  # noqa: B023 - called within this iteration
            cache.truncate([p])  # noqa: B023 - called within this iteration

        out[p] = median_seconds(step, repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    from glmx_benchmarks import floor
    from glmx_benchmarks.artifacts import model_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="glm-large-shape", help="a benchmark model's shape (default glm-large-shape)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--folder", help="an exported ONNX folder: also time its decode step at past 0 and --past")
    ap.add_argument("--past", type=int, default=128)
    args = ap.parse_args(argv)
    config = model_config(args.model)
    bw = floor.measure_bandwidth(megabytes=512, threads=max(args.threads))["read_bytes_per_s"]
    base = matmul_graph(config)
    print(f"# Matmul kernels at decode shape: {args.model} ({config.num_layers} layers x 4 matmuls, one token)\n")
    print(f"Read bandwidth, same run: {bw / 1e9:.1f} GB/s ({max(args.threads)} threads).\n")
    print("| format | threads | ms (all layers) | weight MB | GB/s | share of bandwidth |")
    print("|---|---:|---:|---:|---:|---:|")
    rates: dict[tuple[str, int], float] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            model = quantized(base, fmt, Path(tmp))
            nbytes = weight_bytes(model)
            for threads in args.threads:
                s = kernel_rate(model, threads, args.repeats)
                rates[(fmt, threads)] = nbytes / s
                print(
                    f"| {fmt} | {threads} | {s * 1e3:.2f} | {nbytes / 1e6:.1f} | {nbytes / s / 1e9:.1f} | "
                    f"{nbytes / s / bw:.2f} |"
                )
            if fmt != "fp32":
                head = config.vocab_size * config.hidden_size * 4
                kv = floor.kv_bytes(config, args.past, 1)
                bound = nbytes / rates[(fmt, max(args.threads))] + (head + kv) / bw
                notes.append(
                    f"- {fmt}: kernel-limited decode at past {args.past} (layers at this kernel's rate, "
                    f"fp32 head and K/V at bandwidth) = {bound * 1e3:.1f} ms = "
                    f"{bound / ((nbytes + head + kv) / bw):.2f}x its bandwidth floor"
                )
    print("\n" + "\n".join(notes))
    if args.folder:
        t = decode_by_past(args.folder, max(args.threads), args.past, args.repeats)
        kv, extra = floor.kv_bytes(config, args.past, 1), t[args.past] - t[0]
        cost = (
            f"adds {extra * 1e3:.2f} ms ({kv / extra / 1e9:.1f} GB/s)"
            if extra > 0
            else "adds less than this run's noise"
        )
        print(
            f"\nDecode step of {args.folder}: past 0 {t[0] * 1e3:.2f} ms, past {args.past} "
            f"{t[args.past] * 1e3:.2f} ms: attention over {kv / 1e6:.1f} MB of K/V {cost}; at bandwidth "
            f"{kv / bw * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
