"""One pipeline stage at work: its piece of the graph on ONNX Runtime and its layers' KV caches.
In: a stage folder (runtime/stages.py; cut here first when this node has none), calls from the driver
(runtime/pipeline.py). Out: the boundary tensor [B, T, h] fp32 (or the logits, last stage) of each micro-batch, and
its layers' presents, kept here until the driver's cache stores them (append / load_rows) or asks for them.

The same class runs in-process (tests, one machine without Ray) or as a Ray actor (pipeline.py wraps it with
ray.remote; Ray restarts it when it dies, and __init__ then loads the layers again).
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.iotable import KV_PATTERNS, kv_names
from glm_runtime.kvcache import KVCache
from glm_runtime.stages import STAGE_MODEL, ensure_stage, read_stage

KEEP_RUNS = 8  # the presents of this many recent runs are kept for the driver's cache (a run is stored at once)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux: ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def stage_cache(layers: range, batch: int, heads: int, head_dim: int, capacity: int, dtype: Any) -> KVCache:
    """A host KVCache over these layers only, under their own names (present.{i}.*, past_key_values.{i}.*)."""
    table = {"num_layers": len(layers), "kv_patterns": KV_PATTERNS}
    cache = KVCache(table, batch, heads, head_dim, capacity, dtype)
    cache.past = [kv_names("past", i) for i in layers]
    cache.present = [kv_names("present", i) for i in layers]
    return cache


class StageWorker:
    """Stage k of a model cut in `stages`: open(...) loads its piece; forward runs a micro-batch; the cache_*
    methods keep its layers' KV caches in step with the driver's slot map."""

    def __init__(self, model_folder: str, stages: Any, k: int, root: str | None, threads: int = 0):
        import onnxruntime as ort

        from glm_runtime.session import quiet_options

        self.folder = ensure_stage(Path(model_folder), stages, k, Path(root) if root else None)
        self.record = read_stage(self.folder, verify=True)  # the bytes this stage runs are the bytes it was cut to
        start, stop = self.record["layers"]
        self.layers = range(start, stop)
        self.k, self.stages = k, self.record["stages"]
        options = quiet_options()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / STAGE_MODEL), options, providers=["CPUExecutionProvider"])
        self.wanted = {v.name for v in self.session.get_inputs()}
        self.wanted |= {v.name for v in self.session.get_overridable_initializers()}
        self.output_names = [v.name for v in self.session.get_outputs()]
        past = self.session.get_inputs()[[v.name for v in self.session.get_inputs()].index(kv_names("past", start)[0])]
        self.kv_dtype = np.dtype(np.float16 if past.type == "tensor(float16)" else np.float32)
        self.heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.caches: dict[Any, KVCache] = {}
        self.presents: OrderedDict[Any, dict[int, dict[str, np.ndarray]]] = OrderedDict()

    def ping(self) -> dict[str, Any]:
        """Alive and loaded: its index, layers, weight bytes, pid and peak RSS."""
        return {
            "stage": self.k,
            "layers": [self.layers.start, self.layers.stop],
            "weights_bytes": self.record["weights_bytes"],
            "pid": os.getpid(),
            "folder": str(self.folder),
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def echo(self, x: np.ndarray) -> int:
        """Receive an array and answer its size: the cost of moving a boundary tensor here (benchmarks)."""
        return int(x.nbytes)

    # ------------------------------------------------------------ the forward pass of one micro-batch

    def forward(
        self, run: Any, part: int, rows: tuple[int, int], feeds: Mapping[str, Any], past: Any, x: Any = None
    ) -> np.ndarray:
        """Rows rows[0]..rows[1]-1 of one call: feeds (input_ids on stage 0, position_ids, attention_mask,
        logits_start), x the previous stage's boundary tensor, past ("cache", id) for this stage's cache rows, or
        {name: array} given. Returns this stage's boundary tensor (the last stage: the logits)."""
        a, b = rows
        full = {name: value for name, value in feeds.items() if name in self.wanted}
        if x is not None:
            full[self.session.get_inputs()[0].name] = x
        if isinstance(past, tuple):
            cache = self.caches[past[1]]
            for (kn, vn), key, value in zip(cache.past, cache.keys, cache.values):
                full[kn], full[vn] = key[a:b], value[a:b]
        else:
            full.update(past)  # this stage's layers' past, given by the caller
        out = dict(zip(self.output_names, self.session.run(self.output_names, full)))
        self.presents.setdefault(run, {})[part] = {n: v for n, v in out.items() if n.startswith("present.")}
        while len(self.presents) > KEEP_RUNS:
            self.presents.popitem(last=False)
        return out[self.output_names[0]]

    def fetch(self, run: Any) -> dict[str, np.ndarray]:
        """This stage's presents of one run, the micro-batches joined in row order."""
        parts = self.presents[run]
        return {name: np.concatenate([parts[p][name] for p in sorted(parts)], axis=0) for name in parts[0]}

    # ------------------------------------------------------------ its caches (the driver's PipelineCache mirrors)

    def cache_new(self, cid: Any, batch: int, capacity: int) -> None:
        self.caches[cid] = stage_cache(self.layers, batch, self.heads, self.head_dim, capacity, self.kv_dtype)

    def cache_drop(self, cid: Any) -> None:
        self.caches.pop(cid, None)

    def reset(self) -> None:
        """Forget every cache and run (the driver starts over after a stage was restarted)."""
        self.caches.clear()
        self.presents.clear()

    def _outputs(self, outputs: Any) -> Mapping[str, Any]:
        return self.fetch(outputs) if not isinstance(outputs, Mapping) else outputs

    def cache_op(self, cid: Any, op: str, *args: Any) -> int:
        """One KVCache method on cache cid; outputs (append, load_rows) are a run id or {name: array}.
        Returns the cache's capacity (the driver's slot map checks it keeps in step)."""
        cache = self.caches[cid]
        if op == "append":
            cache.append(self._outputs(args[0]), args[1])
        elif op == "load_rows":
            cache.load_rows(args[0], self._outputs(args[1]), args[2])
        else:
            getattr(cache, op)(*args)
        return cache.capacity
