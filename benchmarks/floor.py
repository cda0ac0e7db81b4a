"""The hardware floor: memory bandwidth and matmul rate measured in the same run, and what a model must move.

In: a GLMConfig and an exported ONNX folder. Out: bandwidth (bytes/s), GEMM rate (FLOP/s) on the model's own
shapes, bytes read per decoded token, FLOPs of a context pass; floor time = bytes / bandwidth or FLOPs / rate.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_bandwidth(megabytes: int = 256, threads: int = 2, repeats: int = 7) -> dict[str, Any]:
    """Read bandwidth (sum of a float32 array far larger than cache, split over `threads` threads: numpy
    releases the GIL inside reductions) and copy bandwidth (bytes read + written). Medians of `repeats`."""
    n = megabytes * 2 ** 20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    parts = np.array_split(a, threads)

    def parallel_sum() -> None:
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    read_1 = a.nbytes / _median_seconds(lambda: a.sum(), repeats)
    read_n = a.nbytes / _median_seconds(parallel_sum, repeats) if threads > 1 else read_1
    copy = 2 * a.nbytes / _median_seconds(lambda: np.copyto(b, a), repeats)
    return {"read_bytes_per_s": max(read_1, read_n), "read_1_thread_bytes_per_s": read_1,
            "read_threads": threads, "copy_bytes_per_s": copy, "array_bytes": int(a.nbytes),
            "repeats": repeats, "method": "numpy float32 sum (read) and copyto (read + write), median"}


def gemm_shapes(config: Any, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul in one context pass of `tokens` tokens at batch 1 (per layer x L, + head)."""
    h, V, L = config.hidden_size, config.vocab_size, config.num_layers
    layer = [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, 4 * h), (tokens, 4 * h, h)]
    return layer * L + [(tokens, h, V)]


def context_flops(config: Any, tokens: int) -> float:
    """FLOPs of a context pass: weight matmuls (2 M K N each), QK^T and PV (2 x 2 T^2 h per layer), the head
    over every position (the graph computes logits for all T)."""
    gemms = sum(2.0 * m * k * n for m, k, n in gemm_shapes(config, tokens))
    attention = 4.0 * tokens * tokens * config.hidden_size * config.num_layers
    return gemms + attention


def measure_matmul(config: Any, tokens: int = 128, repeats: int = 5) -> dict[str, Any]:
    """fp32 GEMM rate of numpy's BLAS on the model's distinct shapes at `tokens` rows (FLOP/s, aggregate)."""
    rng = np.random.default_rng(0)
    shapes = sorted(set(gemm_shapes(config, tokens)))
    per_shape, total_flops, total_s = {}, 0.0, 0.0
    for m, k, n in shapes:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        seconds = _median_seconds(lambda: np.matmul(x, w, out=out), repeats)
        flops = 2.0 * m * k * n
        per_shape[f"{m}x{k}x{n}"] = flops / seconds
        count = gemm_shapes(config, tokens).count((m, k, n))
        total_flops += flops * count
        total_s += seconds * count
    return {"flops_per_s": total_flops / total_s, "per_shape_flops_per_s": per_shape, "tokens": tokens,
            "repeats": repeats, "method": "numpy fp32 matmul on the model's shapes, time-weighted by use"}


def streamed_weight_bytes(onnx_folder: str | Path) -> dict[str, int]:
    """Bytes of initializers read in full per forward call (everything except tables only gathered from).

    Read from the graph itself, so a quantized model counts its int8 / int4 weights and their scales, and a
    head kept in fp32 counts at fp32.
    """
    import onnx
    from onnx import helper

    from glm_runtime.manifest import load_manifest
    folder = Path(onnx_folder)
    manifest = load_manifest(folder, kind="onnx", verify=False)
    model = onnx.load(str(folder / manifest.extra.get("model_file", "model.onnx")), load_external_data=False)
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


def decode_floor_s(weight_bytes: int, config: Any, past: int, batch: int, bandwidth: float,
                   kv_itemsize: int = 4) -> float:
    """Lower bound for one decode step: every streamed weight and every cached K/V read once."""
    return (weight_bytes + kv_bytes(config, past, batch, kv_itemsize)) / bandwidth
