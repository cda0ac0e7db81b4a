"""The preallocated KV cache fed back as `past_key_values.*`: host numpy (`KVCache`) or device OrtValues.
In: each call's `present.*` [B, n, T, d] (only that call's tokens, "present-is-new", see iotable.py).
Out: buffers [B, n, capacity, d] written in place at each row's next slots, and the slot map `visible`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from glm_runtime.backend import IntsLike, host_array
from glm_runtime.iotable import past_names, present_names


class SlotCache:
    """What every cache shares: the KV names, the slot map `visible` [B, capacity] and `filled[b]` (row b's next
    free slot). Subclasses own the buffers: `_alloc(capacity)`, `reserve`, `append`, `reorder`."""

    def __init__(self, io: Mapping[str, Any], batch: int, heads: int, head_dim: int, capacity: int, dtype: Any):
        self.past = past_names(io)  # [(key name, value name)] per layer
        self.present = present_names(io)
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.dtype = np.dtype(dtype)
        capacity = max(int(capacity), 1)
        self.keys = [self._alloc(capacity) for _ in self.past]
        self.values = [self._alloc(capacity) for _ in self.past]
        self.visible: np.ndarray = np.zeros((batch, capacity), dtype=bool)  # which slots each row attends to
        self.filled: np.ndarray = np.zeros(batch, dtype=np.int64)
        self.grown = 0  # how many times the buffers were reallocated (tests check amortisation)
        self.prefix_slots = 0  # P-tuning: every row's first slots hold the prefix (hold_prefix)

    def append(self, outputs: Mapping[str, Any], counts: IntsLike) -> None:
        raise NotImplementedError  # each cache stores into its own buffers

    def _alloc(self, capacity: int) -> Any:
        raise NotImplementedError

    def _reorder_slots(self, order: np.ndarray) -> None:
        """The slot map follows the buffers' rows: row b is now what row order[b] was."""
        self.visible = self.visible[order]
        self.filled = self.filled[order]

    @property
    def capacity(self) -> int:
        return self.visible.shape[1]

    def _grow_slot_map(self, new_cap: int) -> None:
        visible = np.zeros((self.batch, new_cap), dtype=bool)
        visible[:, : self.capacity] = self.visible
        self.visible = visible
        self.grown += 1

    def _mark_appended(self, counts: np.ndarray) -> None:
        """After the buffers took counts[b] new tokens of row b at its next slots: make those slots visible."""
        for b in np.flatnonzero(counts):
            self.visible[b, self.filled[b] : self.filled[b] + counts[b]] = True
        self.filled += counts

    sliceable = False  # whether feeds(width) can hand the first `width` rows alone (host numpy: a free view)

    def feeds(self, width: int | None = None) -> dict[str, Any]:
        """past_key_values.* for a call over rows 0..width-1 (all rows when None; only a sliceable cache can
        give fewer: the engine keeps its running rows packed at the front so that the view costs nothing)."""
        if width is not None and width != self.batch and not self.sliceable:
            raise ValueError(f"this cache feeds all {self.batch} rows; it cannot give the first {width} alone")
        out = {}
        for (kn, vn), k, v in zip(self.past, self.keys, self.values):
            out[kn], out[vn] = (k, v) if width is None or width == self.batch else (k[:width], v[:width])
        return out

    def _counts(self, counts: IntsLike) -> np.ndarray:
        """counts per row as int64 [B]; a call over the first rows only (feeds(width)) leaves the rest at 0."""
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if counts.size < self.batch:
            counts = np.concatenate([counts, np.zeros(self.batch - counts.size, dtype=np.int64)])
        return counts

    def hold_prefix(self, prefix: Any) -> None:
        """P-tuning v2 (glm_runtime.prefix): every row's first P slots hold the prefix keys and values, visible to
        every token; a freed row keeps them, so a row that joins later sees them too. Only on an empty cache."""
        if self.filled.any():
            raise ValueError("the prefix goes into an empty cache, before any token")
        self.append(prefix.rows(self.present, self.batch), [prefix.length] * self.batch)
        self.prefix_slots = prefix.length

    def free_rows(self, rows: IntsLike) -> None:
        """Forget everything rows hold (a finished or cancelled request): their next slot is the first after the
        prefix again (0 without one)."""
        filled = self.filled.copy()
        filled[np.asarray(rows, dtype=np.int64)] = self.prefix_slots
        self.truncate(filled)

    def load_rows(self, rows: IntsLike, outputs: Mapping[str, Any], lengths: IntsLike) -> None:
        """Rows rows[i] start over with the first lengths[i] tokens of row i of a separate call's present.*
        (a context pass over just the admitted requests). Generic path: pad the outputs to every row on the host
        and append; rows not named keep their slots (the padding lands in free slots nobody sees)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.free_rows(rows)
        counts = np.zeros(self.batch, dtype=np.int64)
        counts[rows] = np.asarray(lengths, dtype=np.int64)
        padded = {}
        for kn, vn in self.present:
            for name in (kn, vn):
                new = host_array(outputs[name])
                full = np.zeros((self.batch, *new.shape[1:]), dtype=self.dtype)
                full[rows] = new[: len(rows)]
                padded[name] = full
        self.append(padded, counts)

    def truncate(self, filled: IntsLike) -> None:
        """Forget every slot at or after filled[b] (the buffers keep their old bytes; the mask hides them)."""
        filled = np.asarray(filled, dtype=np.int64)
        self.visible &= np.arange(self.capacity)[None, :] < filled[:, None]
        self.filled = filled.copy()


class KVCache(SlotCache):
    """Host cache: keys[l], values[l] are numpy [B, n, capacity, d]."""

    sliceable = True

    def _alloc(self, capacity: int) -> np.ndarray:
        return np.zeros((self.batch, self.heads, capacity, self.head_dim), dtype=self.dtype)

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots per row; grows to max(needed, 2 x capacity) so growth is amortised."""
        if needed <= self.capacity:
            return
        new_cap = max(int(needed), 2 * self.capacity)
        used = int(self.filled.max())
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                buf = self._alloc(new_cap)
                buf[:, :, :used] = old[:, :, :used]
                store[i] = buf
        self._grow_slot_map(new_cap)

    def append(self, outputs: Mapping[str, Any], counts: IntsLike) -> None:
        """Store the first counts[b] of this call's T tokens of row b at its next slots, and mark them visible.

        Rows with count 0 (finished rows fed a dummy token) keep their cache unchanged. A call over the first
        rows only (feeds(width)) gives counts and outputs for those rows.
        """
        counts = self._counts(counts)
        self.reserve(int((self.filled + counts).max()))
        rows = np.flatnonzero(counts)
        T = np.asarray(outputs[self.present[0][0]]).shape[2]
        for (kn, vn), k, v in zip(self.present, self.keys, self.values):
            nk, nv = np.asarray(outputs[kn]), np.asarray(outputs[vn])  # [B, n, T, d]
            if T == 1:  # the decode step: one fancy-indexed write per layer, no loop over rows
                k[rows, :, self.filled[rows]] = nk[rows, :, 0]
                v[rows, :, self.filled[rows]] = nv[rows, :, 0]
            else:
                for b in rows:
                    f, c = self.filled[b], counts[b]
                    k[b, :, f : f + c] = nk[b, :, :c]
                    v[b, :, f : f + c] = nv[b, :, :c]
        self._mark_appended(counts)

    def load_rows(self, rows: IntsLike, outputs: Mapping[str, Any], lengths: IntsLike) -> None:
        """As SlotCache.load_rows, written straight into the named rows (no padding)."""
        rows, lengths = np.asarray(rows, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        self.free_rows(rows)
        p = self.prefix_slots  # the context goes after the prefix
        self.reserve(p + int(lengths.max()))
        for (kn, vn), k, v in zip(self.present, self.keys, self.values):
            nk, nv = np.asarray(outputs[kn]), np.asarray(outputs[vn])
            for i, (r, n) in enumerate(zip(rows, lengths)):
                k[r, :, p : p + n] = nk[i, :, :n]
                v[r, :, p : p + n] = nv[i, :, :n]
        counts = np.zeros(self.batch, dtype=np.int64)
        counts[rows] = lengths
        self._mark_appended(counts)

    def reorder(self, index: IntsLike) -> None:
        """Beam search: row b becomes a copy of row index[b]. Only changed rows and used slots are copied."""
        index = np.asarray(index, dtype=np.int64)
        changed = np.flatnonzero(index != np.arange(self.batch))
        if changed.size == 0:
            return
        used = int(self.filled.max())
        src = index[changed]
        for store in (self.keys, self.values):
            for buf in store:
                buf[changed, :, :used] = buf[src, :, :used]  # the right side is gathered before writing
        self.visible[changed] = self.visible[src]
        self.filled[changed] = self.filled[src]


# ---------------------------------------------------------------- device cache (CUDA IO binding)

_SCATTER_OPSET = 17


def _scatter_model(elem_type: int) -> bytes:
    """cache [B,n,cap,d], new [B,n,T,d], slots [B,T] -> cache with new written at slots (in place when bound so).

    slots -Unsqueeze(1,3)-> [B,1,T,1] -Expand(shape(new))-> idx [B,n,T,d]
    ScatterElements(cache, idx, new, axis=2) -> out
    """
    try:
        from onnx import TensorProto, helper
    except ImportError:
        from glm_runtime.errors import GLMXError

        raise GLMXError(
            "the device-resident KV cache builds a small scatter graph with the `onnx` package: pip install onnx"
        ) from None
    nodes = [
        helper.make_node("Unsqueeze", ["slots", "axes"], ["slots4"]),
        helper.make_node("Shape", ["new"], ["new_shape"]),
        helper.make_node("Expand", ["slots4", "new_shape"], ["index"]),
        helper.make_node("ScatterElements", ["cache", "index", "new"], ["out"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "glmx_kv_write",
        [
            helper.make_tensor_value_info("cache", elem_type, ["B", "n", "cap", "d"]),
            helper.make_tensor_value_info("new", elem_type, ["B", "n", "T", "d"]),
            helper.make_tensor_value_info("slots", TensorProto.INT64, ["B", "T"]),
        ],
        [helper.make_tensor_value_info("out", elem_type, ["B", "n", "cap", "d"])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _SCATTER_OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


class DeviceKVCache(SlotCache):
    """Cache whose buffers are OrtValues on `device` (e.g. "cuda", 0); same methods as KVCache.

    New K/V arrive as device OrtValues (the session binds `present.*` outputs to the device) and are scattered
    into the buffers by a one-node graph whose output is bound to the buffer itself, so nothing crosses to
    the host. Beam reorders (beam search only) gather rows through the host.
    """

    def __init__(
        self,
        io: Mapping[str, Any],
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype: Any,
        device: tuple[str, int],
        providers: Sequence[Any],
    ):
        import onnxruntime as ort

        self._ort = ort
        self.device = device
        elem = 10 if np.dtype(dtype) == np.float16 else 1  # onnx.TensorProto.FLOAT16 / FLOAT
        self._writer = ort.InferenceSession(_scatter_model(elem), providers=list(providers))
        super().__init__(io, batch, heads, head_dim, capacity, dtype)  # allocates through _alloc

    def _alloc(self, capacity: int, host: np.ndarray | None = None):
        if host is None:
            host = np.zeros((self.batch, self.heads, capacity, self.head_dim), dtype=self.dtype)
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), *self.device)

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(int(needed), 2 * self.capacity)
        for store in (self.keys, self.values):  # rare (geometric): a round trip through the host is fine
            for i, old in enumerate(store):
                host = np.zeros((self.batch, self.heads, new_cap, self.head_dim), dtype=self.dtype)
                host[:, :, : self.capacity] = old.numpy()
                store[i] = self._alloc(new_cap, host)
        self._grow_slot_map(new_cap)

    def _write(self, buf, new, slots: np.ndarray) -> None:
        binding = self._writer.io_binding()
        binding.bind_ortvalue_input("cache", buf)
        if isinstance(new, np.ndarray):
            binding.bind_cpu_input("new", np.ascontiguousarray(new))
        else:
            binding.bind_ortvalue_input("new", new)
        binding.bind_cpu_input("slots", slots)
        binding.bind_ortvalue_output("out", buf)  # in place: ScatterElements skips its copy when out is cache
        self._writer.run_with_iobinding(binding)

    def append(self, outputs: Mapping[str, Any], counts: IntsLike) -> None:
        counts = self._counts(counts)
        first = outputs[self.present[0][0]]
        T = first.shape[2] if isinstance(first, np.ndarray) else first.shape()[2]
        # Every row writes all T tokens at its next free slots (one scatter per buffer, no loop over rows):
        # tokens beyond counts[b], and the dummy token of a finished row (count 0), land in free slots that
        # stay invisible and are overwritten later.
        self.reserve(int(self.filled.max()) + T)
        slots = self.filled[:, None] + np.arange(T, dtype=np.int64)[None, :]
        for (kn, vn), k, v in zip(self.present, self.keys, self.values):
            self._write(k, outputs[kn], slots)
            self._write(v, outputs[vn], slots)
        self._mark_appended(counts)

    def reorder(self, index: IntsLike) -> None:
        index = np.asarray(index, dtype=np.int64)
        if (index == np.arange(self.batch)).all():
            return
        for store in (self.keys, self.values):  # gather rows through the host: beam search only
            for i, buf in enumerate(store):
                store[i] = self._alloc(self.capacity, buf.numpy()[index])
        self.visible = self.visible[index]
        self.filled = self.filled[index]


def host_cache(session: Any, batch: int, capacity: int) -> KVCache:
    """A host KVCache shaped for `session` (its IO table, heads, head width and K/V dtype): what a session whose
    run returns numpy presents gives from its new_cache."""
    config = session.config
    return KVCache(session.io, batch, config.num_attention_heads, config.head_dim, capacity, session.kv_dtype)
