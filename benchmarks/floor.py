"""The hardware floor: memory bandwidth and matmul rate measured in the same run, and what a model must move.

In: a GLMConfig and an exported ONNX folder. Out: bandwidth (bytes/s), GEMM rate (FLOP/s) on the model's own
shapes, bytes read per decoded token, FLOPs of a context pass; floor time = bytes / bandwidth or FLOPs / rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


GEMV_ROWS = 4096  # K of the read kernel's weight matrix: a hidden size of the order of the models benchmarked


def gemv_weights(megabytes: int, rows: int = GEMV_ROWS, seed: int = 0) -> np.ndarray:
    """In: a size in MiB. Out: a random float32 weight matrix (rows, N) of at least that many bytes."""
    cols = max(1, -(-megabytes * 2**20 // (4 * rows)))  # ceil
    return np.random.default_rng(seed).random((rows, cols), dtype=np.float32) - 0.5


def _gemv_model_bytes(weights: np.ndarray) -> bytes:
    """A serialized ONNX graph y[1, N] = x[1, K] @ W[K, N], with W an initializer (as in an exported model)."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "gemv_read_kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weights, "weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def ort_gemv(weights: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """In: W (K, N) float32 and a thread count. Out: f(x[1, K]) -> x @ W (1, N), computed by an ONNX Runtime CPU
    session with intra_op_num_threads = threads, inter_op_num_threads = 1, the benchmark's settings. Each call
    streams all of W, the way a decode step streams a layer's weights."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(_gemv_model_bytes(weights), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["y"], {"x": x})[0]


def measure_bandwidth(megabytes: int = 256, threads: int = 2, repeats: int = 7) -> dict[str, Any]:
    """In: an array size in MiB (far beyond cache), the benchmark's thread count. Out: read bandwidth (bytes/s)
    of several read kernels, `read_bytes_per_s` = the max over them, and copy bandwidth (bytes read + written).

    Read kernels: numpy float32 sum on one thread and split over `threads` threads (numpy releases the GIL inside
    reductions), and an ONNX Runtime fp32 MatMul [1, K] x [K, N] on `threads` threads (bytes read = W's bytes).
    The max is taken so the decode floor stays a lower bound on time whichever kernel streams best here.
    Each rate is the median of `repeats` timed calls after one warm-up."""
    n = megabytes * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    parts = np.array_split(a, threads)

    def parallel_sum() -> None:
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    kernels = {"numpy_sum_1_thread": a.nbytes / median_seconds(lambda: a.sum(), repeats)}
    if threads > 1:
        kernels["numpy_sum_threads"] = a.nbytes / median_seconds(parallel_sum, repeats)
    b = np.empty_like(a)
    copy = 2 * a.nbytes / median_seconds(lambda: np.copyto(b, a), repeats)
    a = b = parts = None  # free the buffers (the closures above are not called again)
    weights = gemv_weights(megabytes)
    gemv = ort_gemv(weights, threads)
    x = np.ones((1, weights.shape[0]), dtype=np.float32)
    kernels["ort_gemv"] = weights.nbytes / median_seconds(lambda: gemv(x), repeats)
    best = max(kernels, key=kernels.get)
    sum_split = f" (numpy_sum_threads: split over {threads} threads)" if threads > 1 else ""
    return {
        "read_bytes_per_s": kernels[best],
        "read_kernel": best,
        "read_kernels": kernels,
        "read_1_thread_bytes_per_s": kernels["numpy_sum_1_thread"],
        "read_threads": threads,
        "copy_bytes_per_s": copy,
        "array_bytes": int(n * 4),
        "gemv_weight_shape": list(weights.shape),
        "repeats": repeats,
        "method": (
            f"read = max over read kernels {sorted(kernels)}, won by {best}: numpy_sum_* = numpy "
            f"float32 sum{sum_split}, ort_gemv = ONNX Runtime fp32 MatMul [1,K]x[K,N] on {threads} intra-op "
            f"thread(s), bytes = weight bytes; copy = numpy copyto (read + write); medians of {repeats}"
        ),
    }


def gemm_shapes(config: Any, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul in one context pass of `tokens` tokens at batch 1 (per layer x L, + head)."""
    h, V, L = config.hidden_size, config.vocab_size, config.num_layers
    up, inner = config.mlp_in_size, config.inner_size  # 4h and 4h; GLM-130B's GeGLU: 2 x inner and inner
    layer = [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, up), (tokens, inner, h)]
    return layer * L + [(tokens, h, V)]


def context_flops(config: Any, tokens: int, head_rows: int | None = None) -> float:
    """FLOPs of a context pass: weight matmuls (2 M K N each), QK^T and PV (2 x 2 T^2 h per layer), and the
    head over `head_rows` positions (default every one; glmx's runtime asks for 1 through logits_start)."""
    head_rows = tokens if head_rows is None else head_rows
    gemms = sum(2.0 * m * k * n for m, k, n in gemm_shapes(config, tokens)[:-1])
    head = 2.0 * head_rows * config.hidden_size * config.vocab_size
    attention = 4.0 * tokens * tokens * config.hidden_size * config.num_layers
    return gemms + head + attention


def measure_matmul(config: Any, tokens: int = 128, repeats: int = 5) -> dict[str, Any]:
    """fp32 GEMM rate of numpy's BLAS on the model's distinct shapes at `tokens` rows (FLOP/s, aggregate)."""
    rng = np.random.default_rng(0)
    shapes = sorted(set(gemm_shapes(config, tokens)))
    per_shape, total_flops, total_s = {}, 0.0, 0.0
    for m, k, n in shapes:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        seconds = median_seconds(lambda: np.matmul(x, w, out=out), repeats)  # noqa: B023 - called within this iteration
        flops = 2.0 * m * k * n
        per_shape[f"{m}x{k}x{n}"] = flops / seconds
        count = gemm_shapes(config, tokens).count((m, k, n))
        total_flops += flops * count
        total_s += seconds * count
    return {
        "flops_per_s": total_flops / total_s,
        "per_shape_flops_per_s": per_shape,
        "tokens": tokens,
        "repeats": repeats,
        "method": "numpy fp32 matmul on the model's shapes, time-weighted by use",
    }


def streamed_weight_bytes(onnx_folder: str | Path) -> dict[str, int]:
    """Bytes of initializers read in full per forward call (everything except tables only gathered from).

    Read from the graph itself, so a quantized model counts its int8 / int4 weights and their scales, and a
    head kept in fp32 counts at fp32.
    """
    import onnx
    from onnx import helper

    from glm_runtime.manifest import MODEL_FILE, load_manifest

    folder = Path(onnx_folder)
    manifest = load_manifest(folder, kind="onnx", verify=False)
    model = onnx.load(str(folder / manifest.extra.get("model_file", MODEL_FILE)), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    streamed = gathered = 0
    for init in model.graph.initializer:
        size = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            nbytes = (size + 1) // 2  # two 4-bit values per byte
        else:
            nbytes = size * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather"}:
            gathered += nbytes
        else:
            streamed += nbytes
    return {"streamed_bytes": streamed, "gathered_bytes": gathered}


def kv_bytes(config: Any, past: int, batch: int, itemsize: int = 4) -> int:
    """Bytes of cached keys and values a decode step reads at `past` slots."""
    return 2 * config.num_layers * batch * past * config.hidden_size * itemsize


def decode_floor_s(
    weight_bytes: int, config: Any, past: int, batch: int, bandwidth: float, kv_itemsize: int = 4
) -> float:
    """Lower bound for one decode step: every streamed weight and every cached K/V read once."""
    return (weight_bytes + kv_bytes(config, past, batch, kv_itemsize)) / bandwidth
