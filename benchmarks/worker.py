"""Measures one backend on one artifact, in its own process so peak resident memory belongs to it alone.

In: a JSON spec (backend, folder, threads, contexts, pasts, batches, timing budget) as argv[1].
Out: one JSON line on stdout: load time, context-pass and decode timings (every sample), peak RSS.
Run as `python -m glmx_benchmarks.worker SPEC`; bench.py starts it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported when measuring starts: the worker's memory is the backend's
    from glm_runtime.session import Session


def timed(fn: Callable[[], Any], budget: dict[str, float]) -> dict[str, Any]:
    """Warm up, then repeat until at least min_n samples and min_s seconds (cap max_n / max_s, never < 3).

    -> {"median", "p90", "n", "warmup", "samples"} in seconds.
    """
    start, warmup = time.perf_counter(), 0
    while warmup < budget["warmup"]:
        fn()
        warmup += 1
        if time.perf_counter() - start > budget["max_s"] / 2:  # a slow call is warm after one run
            break
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        n = len(samples)
        if (
            n >= budget["max_n"]
            or (n >= budget["min_n"] and elapsed >= budget["min_s"])
            or (n >= 3 and elapsed >= budget["max_s"])
        ):
            break
    return {
        "median": float(np.median(samples)),
        "p90": float(np.percentile(samples, 90)),
        "n": len(samples),
        "warmup": warmup,
        "samples": samples,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the current address space; ru_maxrss would carry
    the parent's high-water mark across fork + exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_backend(backend: str, folder: str, threads: int) -> Any:
    from glm_runtime.session import open_session

    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        # GLM's own forward computes the head at every position: the reference as users run it today
        return open_session(folder, "torch", logits_start=False)
    if backend.startswith("onnxruntime"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return open_session(folder, backend, session_options=options)
    return open_session(folder, backend)


def fill_cache(session: Session, batch: int, past: int, rng: np.random.Generator) -> Any:
    """A preallocated cache of past + 1 slots: `past` filled with random K/V, one free slot for the new token."""
    cache = session.new_cache(batch, past + 1)
    for store in (cache.keys, cache.values):
        for buf in store:
            buf[:, :, :past] = rng.standard_normal(buf[:, :, :past].shape, dtype=np.float32) * 0.5
    cache.visible[:, :past] = True
    cache.filled[:] = past
    return cache


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from glm_runtime import masks
    from glm_runtime.steps import context_pass, decode_step

    budget = spec["budget"]

    def say(msg: str) -> None:
        if spec.get("progress"):
            print(f"  {spec['backend']}: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    session = open_backend(spec["backend"], spec["folder"], spec["threads"])
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_bytes()
    config = session.config
    rng = np.random.default_rng(0)
    vocab = min(config.vocab_size, 30000)
    out: dict[str, Any] = {"load_s": load_s, "context": {}, "decode": {}, "batch": {}}

    def decode_timing(batch: int, past: int) -> dict[str, Any]:
        cache = fill_cache(session, batch, past, rng)
        tokens = rng.integers(100, vocab, size=batch).tolist()
        positions = masks.decode_positions([past // 2] * batch, [1] * batch)
        store = [True] * batch

        def one_step() -> None:  # the runtime's own step: run + in-place cache write; then forget the token
            decode_step(session, cache, tokens, positions, store)
            cache.truncate([past] * batch)

        return timed(one_step, budget)

    def context_timing(context: int) -> dict[str, Any]:
        ids = rng.integers(100, vocab, size=context).tolist()
        cache = session.new_cache(1, context)

        def one_context_pass() -> None:
            cache.truncate([0])
            context_pass(session, cache, [ids], pad_id=0)

        return timed(one_context_pass, budget)

    # Most important first, so a variant that runs out of its time still has the figures the targets use.
    jobs = [("decode", str(p), lambda p=p: decode_timing(1, p)) for p in spec["pasts"]]
    jobs += [("batch", str(b), lambda b=b: decode_timing(b, spec["batch_past"])) for b in spec["batches"]]
    jobs += [
        ("context", str(c), lambda c=c: context_timing(c))
        for c in sorted(spec["contexts"], key=lambda c: (c != spec.get("first_context"), c))
    ]
    out["not_measured"] = []
    for section, key, job in jobs:
        if time.perf_counter() - t0 > spec.get("deadline_s", float("inf")):
            out["not_measured"].append(f"{section} {key}")
            continue
        figure = job()
        if section == "batch":
            figure["tokens_per_s"] = int(key) / figure["median"]
        out[section][key] = figure
        say(f"{section} {key}: {figure['median'] * 1e3:.2f} ms")
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["rss_after_load_bytes"] = rss_after_load
    out["pid"] = os.getpid()
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = measure(spec)
    except Exception as exc:  # reported to the parent as a skip with its reason, never a crash of the run  # noqa: BLE001 - a variant that fails is recorded with its reason, not raised
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print("BENCH-RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
