"""One model across processes or machines: its stages (runtime/stages.py) as Ray actors, one session in front.
In: an exported ONNX folder, a stage count, a Ray address (None: a local Ray on this machine; "auto"; "ray://...").
Out: `open_pipeline` -> (PipelineSession, tokenizer). The session is the ordinary session interface (run(feeds) ->
logits and presents, new_cache), so the engine, streaming, metrics and the HTTP API run on it unchanged.

    driver: run(feeds) --rows split in micro-batches--> stage 0 --x [b, T, h] fp32--> stage 1 --> ... --> logits
            new_cache(...) -> PipelineCache: the slot map here, the K/V rows in each stage (its layers only)

Micro-batch m enters stage k + 1 while micro-batch m + 1 runs on stage k: every actor call is submitted at once and
Ray starts each as its input (an object ref) is ready, so the stages work at the same time. Presents never leave
their stage: the cache's append / load_rows name the run they came from. Every wait has a timeout; a stage that
dies fails the call with one line (PipelineError) and `broken` says why until `recover` finds every stage back.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.backend import Closable, check_export, check_feeds
from glm_runtime.iotable import kv_dtype, past_names
from glm_runtime.kvcache import SlotCache
from glm_runtime.manifest import ManifestError, load_manifest
from glm_runtime.stage_runners import LocalStages, PipelineError, connect_ray, layer_span, ray_stages
from glm_runtime.stage_worker import StageWorker
from glm_runtime.stages import cut_stages, default_stage_root, stage_ranges

__all__ = ["PipelineError", "PipelineSession", "PipelineCache", "connect_ray", "open_pipeline"]


class CacheRows:
    """A past feed that stays in the stages: rows 0..width-1 of cache `cid` (PipelineCache.feeds)."""

    def __init__(self, cid: str, width: int, epoch: int):
        self.cid, self.width, self.epoch = cid, width, epoch


class RemotePresent:
    """A present.* output left in its stage; .numpy() fetches it (beam search's repeat, cloze scoring)."""

    def __init__(self, session: PipelineSession, run: int, stage: int, name: str):
        self.session, self.run, self.stage, self.name = session, run, stage, name

    def numpy(self) -> np.ndarray:
        return self.session.fetch(self.run, self.stage)[self.name]


# ---------------------------------------------------------------- the session


class PipelineSession(Closable):
    """The exported model in `folder`, run as `stages` (LocalStages or RayStages). See the module docstring."""

    def __init__(self, folder: Path, stages: Any, ranges: Sequence[tuple[int, int]], info: Sequence[Mapping]):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, kind="onnx")
        self.config, self.tokenizer_path = check_export(self.folder, self.manifest)
        if self.manifest.extra.get("prefix"):
            raise ManifestError(f"{folder} carries a P-tuning prefix, which pipeline stages do not take yet")
        self.tokenizer_record = self.manifest.tokenizer
        self.io = self.manifest.io
        self.inputs, self.outputs = self.io["inputs"], self.io["outputs"]
        self.precision = self.manifest.precision
        self.kv_dtype = np.dtype(kv_dtype(self.precision))
        self.stages, self.ranges, self.info = stages, list(ranges), list(info)
        self.broken: str | None = None  # why the pipeline cannot run (a stage died), until recover()
        self.epoch = 0  # recover() counts up: the caches of an earlier epoch are gone from the stages
        self._runs = itertools.count()
        self._fetched: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._pending: list[tuple[Any, int]] = []  # (ref, expected capacity) of deferred cache operations

    def _wait(self, refs: list[Any], what: str) -> list[Any]:
        """The results of refs, with the cache operations deferred since the last wait (each answers its stage's
        cache capacity, which must be the driver's): one round trip where the engine made several calls."""
        if self.broken is not None:
            raise PipelineError(self.broken)
        pending, self._pending = self._pending, []
        try:
            got = self.stages.wait([ref for ref, _ in pending] + list(refs), what)
        except PipelineError as exc:
            self.broken = str(exc)
            raise
        wrong = [(cap, want) for cap, (_, want) in zip(got, pending) if cap != want]
        if wrong:
            self.broken = f"a stage's cache holds {wrong[0][0]} slots where the driver's slot map says {wrong[0][1]}"
            raise PipelineError(self.broken)
        return got[len(pending) :]

    def defer(self, refs: list[Any], capacity: int) -> None:
        """Cache operations whose answers (each stage cache's capacity, expected: `capacity`) the next wait checks:
        Ray runs an actor's calls in the order they were made, so the next forward pass sees them done."""
        self._pending += [(ref, capacity) for ref in refs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self._check_open()
        if self.broken is not None:
            raise PipelineError(self.broken)
        names = past_names(self.io)
        first = feeds.get(names[0][0])
        if isinstance(first, CacheRows) and first.epoch != self.epoch:  # an engine from before a restart
            raise PipelineError("this cache was in the stages before one of them restarted; it is gone")
        if isinstance(first, CacheRows):
            plain = [e for e in self.inputs if not e["name"].startswith("past_key_values.")]
            check_feeds({k: v for k, v in feeds.items() if not isinstance(v, CacheRows)}, plain)
        else:
            check_feeds(feeds, self.inputs)
        batch = feeds["input_ids"].shape[0]
        run = next(self._runs)
        bounds = np.linspace(0, batch, min(len(self.ranges), batch) + 1).round().astype(int)
        last = []
        for part, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            a, b = int(a), int(b)
            x = None
            for k, (start, stop) in enumerate(self.ranges):
                mine = {n: v[a:b] for n, v in feeds.items() if n in ("position_ids", "attention_mask")}
                if k == 0:
                    mine["input_ids"] = feeds["input_ids"][a:b]
                if k == len(self.ranges) - 1 and "logits_start" in feeds:
                    mine["logits_start"] = feeds["logits_start"]
                if isinstance(first, CacheRows):
                    past: Any = ("cache", first.cid)
                else:
                    past = {n: feeds[n][a:b] for pair in names[start:stop] for n in pair}
                x = self.stages.submit(k, "forward", run, part, (a, b), mine, past, x)
            last.append(x)
        logits = np.concatenate(self._wait(last, "a forward pass"), axis=0)
        out: dict[str, Any] = {"logits": logits}
        for k, (start, stop) in enumerate(self.ranges):
            for i in range(start, stop):
                for name in (f"present.{i}.key", f"present.{i}.value"):
                    out[name] = RemotePresent(self, run, k, name)
        return out

    def fetch(self, run: int, k: int) -> dict[str, np.ndarray]:
        key = (run, k)
        if key not in self._fetched:
            self._fetched = {key: self._wait([self.stages.submit(k, "fetch", run)], "fetching presents")[0]}
        return self._fetched[key]

    def new_cache(self, batch: int, capacity: int) -> PipelineCache:
        return PipelineCache(self, batch, capacity)

    def to_all(self, method: str, *args: Any, what: str = "") -> list[Any]:
        """One call on every stage, waited for."""
        return self._wait([self.stages.submit(k, method, *args) for k in range(len(self.ranges))], what or method)

    def probe(self, timeout: float = 2.0) -> str | None:
        """None when every stage answers a ping within `timeout` (a restarted one once it has reloaded its
        layers), else why not: "died" (Ray says the actor died or is restarting) or "slow" (no answer yet)."""
        try:
            self.info = self.stages.ping(timeout)
            return None
        except PipelineError as exc:
            return "slow" if "did not answer" in str(exc) else "died"
        except Exception:  # noqa: BLE001 - an actor still restarting answers with Ray's own errors
            return "died"

    def recover(self) -> None:
        """After every stage answers again: each forgets its caches and runs, and the pipeline runs again."""
        self.broken = None
        self._fetched, self._pending = {}, []
        self.epoch += 1
        self.to_all("reset", what="a reset")

    def close(self) -> None:
        """Stop the stages (Ray actors end; in-process ones are dropped); the session refuses to run after."""
        self.broken = "the pipeline was closed"
        if hasattr(self.stages, "close"):
            self.stages.close()
        super().close()


class PipelineCache(SlotCache):
    """The engine's KV cache of a pipeline: the slot map (visible, filled) here, the keys and values in each stage
    (stage_worker.stage_cache over its layers), every method applied to both so they stay in step."""

    sliceable = True

    def __init__(self, session: PipelineSession, batch: int, capacity: int):
        c = session.config
        self.session, self.cid, self.epoch = session, uuid.uuid4().hex, session.epoch
        super().__init__(session.io, batch, c.num_attention_heads, c.head_dim, capacity, session.kv_dtype)
        self._remote("cache_new", batch, self.capacity)

    def _alloc(self, capacity: int) -> Any:
        return None  # the buffers live in the stages

    @property
    def live(self) -> bool:
        """The stages hold this cache: the pipeline is not broken and was not reset since it was opened."""
        return self.session.broken is None and self.epoch == self.session.epoch

    def _remote(self, op: str, *args: Any, per_stage: list[Any] | None = None) -> None:
        """One cache method on every stage, deferred to the session's next wait (skipped once the pipeline is broken
        or was reset since this cache was opened: only the slot map is kept). Called after the slot map changed:
        each stage's answer must be its capacity. per_stage: each stage's own first argument (its layers' arrays)."""
        if not self.live:
            return
        if op == "cache_new":
            self.session.to_all(op, self.cid, *args, what="opening a cache")
            return
        stages = self.session.stages
        refs = [
            stages.submit(k, "cache_op", self.cid, op, *((per_stage[k],) if per_stage else ()), *args)
            for k in range(len(self.session.ranges))
        ]
        self.session.defer(refs, self.capacity)

    def _grow(self, needed: int) -> None:
        if needed > self.capacity:
            self._grow_slot_map(max(int(needed), 2 * self.capacity))  # KVCache.reserve's rule, which each stage runs

    def _given(self, outputs: Mapping[str, Any]) -> Any:
        """The run id when every present is still in its stage (RemotePresent), else the arrays by stage."""
        first = outputs[self.present[0][0]]
        if isinstance(first, RemotePresent):
            return first.run
        from glm_runtime.backend import host_array

        return {n: host_array(outputs[n]) for pair in self.present for n in pair}

    def feeds(self, width: int | None = None) -> dict[str, Any]:
        rows = CacheRows(self.cid, self.batch if width is None else width, self.epoch)
        return {name: rows for pair in self.past for name in pair}

    def reserve(self, needed: int) -> None:
        self._grow(needed)
        self._remote("reserve", needed)

    def append(self, outputs: Mapping[str, Any], counts: Any) -> None:
        counts = self._counts(counts)
        self._grow(int((self.filled + counts).max()))
        self._mark_appended(counts)
        self._send_outputs("append", outputs, counts)

    def _send_outputs(self, op: str, outputs: Mapping[str, Any], *args: Any) -> None:
        """op (append: outputs, counts; load_rows: rows, outputs, lengths) on every stage, the outputs named by their
        run (they are in the stages) or, host arrays, each stage given its own layers'."""
        given = self._given(outputs)
        if isinstance(given, dict):
            per_stage = [{n: given[n] for n in self._names(k)} for k in range(len(self.session.ranges))]
        if op == "append":
            if isinstance(given, dict):
                self._remote(op, *args, per_stage=per_stage)
            else:
                self._remote(op, given, *args)
            return
        rows, lengths = args
        if isinstance(given, dict):  # load_rows(rows, outputs, lengths): the outputs second
            self._remote_load(rows, lengths, per_stage)
        else:
            self._remote(op, rows, given, lengths)

    def _remote_load(self, rows: Any, lengths: Any, per_stage: list[Any]) -> None:
        if not self.live:
            return
        stages = self.session.stages
        refs = [
            stages.submit(k, "cache_op", self.cid, "load_rows", rows, per_stage[k], lengths)
            for k in range(len(self.session.ranges))
        ]
        self.session.defer(refs, self.capacity)

    def _names(self, k: int) -> list[str]:
        start, stop = self.session.ranges[k]
        return [n for pair in self.present[start:stop] for n in pair]

    def load_rows(self, rows: Any, outputs: Mapping[str, Any], lengths: Any) -> None:
        rows, lengths = np.asarray(rows, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        SlotCache.truncate(self, np.where(np.isin(np.arange(self.batch), rows), self.prefix_slots, self.filled))
        self._grow(self.prefix_slots + int(lengths.max()))
        counts = np.zeros(self.batch, dtype=np.int64)
        counts[rows] = lengths
        self._mark_appended(counts)
        self._send_outputs("load_rows", outputs, rows, lengths)

    def truncate(self, filled: Any) -> None:
        SlotCache.truncate(self, filled)
        self._remote("truncate", np.asarray(filled, dtype=np.int64))

    def free_rows(self, rows: Any) -> None:
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        filled = self.filled.copy()
        filled[rows] = self.prefix_slots
        SlotCache.truncate(self, filled)
        self._remote("free_rows", rows)

    def reorder(self, index: Any) -> None:
        index = np.asarray(index, dtype=np.int64)
        if (index == np.arange(self.batch)).all():
            return
        self._reorder_slots(index)
        self._remote("reorder", index)

    def hold_prefix(self, prefix: Any) -> None:
        raise PipelineError("pipeline stages do not take a P-tuning prefix yet")

    def __del__(self) -> None:
        try:
            if self.live:
                for k in range(len(self.session.ranges)):
                    self.session.stages.submit(k, "cache_drop", self.cid)  # not waited for: best effort
        except Exception:  # noqa: BLE001 - interpreter shutdown or a dead stage: nothing to free
            pass


# ---------------------------------------------------------------- opening a pipeline


def open_pipeline(
    model: str | Path | None = None,
    stages: int | Sequence[int] = 2,
    address: str | None = None,
    *,
    stage_root: str | Path | None = None,
    in_process: bool = False,
    stage_cpus: float = 1.0,
    timeout: float = 120.0,
    load_timeout: float = 600.0,
    max_restarts: int = 8,
    name: str | None = None,
    log=None,
) -> tuple[PipelineSession, Any]:
    """(session, tokenizer) of the exported model in `model` (None: the bundled model) cut in `stages` stages
    (a count, split as evenly as it goes, or each stage's number of layers).

    address: None starts a local Ray on this machine (or joins the one this process already has), "auto" the
    cluster `ray start` made here, "ray://host:10001" a remote one. Stages are placed by a placement group:
    STRICT_SPREAD (one per node) when the cluster has at least `stages` nodes, else PACK (together, e.g. one
    machine). in_process: no Ray, the stages are objects in this process (tests). stage_cpus: CPUs each stage
    reserves (its ONNX Runtime threads); timeout: seconds any call may take; name: the actors' name prefix
    (namespace "glmx"; stage k is f"{name}-stage-{k}")."""
    from glm_runtime.session import default_model, session_tokenizer

    folder = Path(model) if model is not None else default_model()
    manifest = load_manifest(folder, kind="onnx")
    num_layers = int(manifest.config["num_layers"])
    ranges = stage_ranges(num_layers, stages)
    # resolved here, not in each actor: a Ray worker does not see this process's environment (GLMX_STAGE_CACHE)
    root = Path(stage_root) if stage_root is not None else default_stage_root()
    cut_stages(folder, stages, root, log)  # here first: the actors on this machine find them cut
    split = [b - a for a, b in ranges]
    if in_process:
        workers = [StageWorker(str(folder), split, k, str(root) if root else None) for k in range(len(split))]
        runner: Any = LocalStages(workers)
        info = runner.ping(timeout)
    else:
        runner, info = ray_stages(folder, ranges, address, root, stage_cpus, timeout, load_timeout, max_restarts, name)
    session = PipelineSession(folder, runner, ranges, info)
    if log is not None:
        for k, entry in enumerate(info):
            log(
                f"glmx: stage {k}: {layer_span(*entry['layers'])}, "
                f"{entry['weights_bytes'] / 2**20:.1f} MiB of weights, pid {entry['pid']}"
            )
    return session, session_tokenizer(session, folder)
