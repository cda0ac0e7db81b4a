"""Device memory for the TensorRT backend: the few cuda-python runtime calls it needs (`Cuda`), typed views of
device memory (`DeviceArray`), and the KV cache whose buffers stay on the GPU (`TensorRTKVCache`).
In: a TensorRT session (its stream, its engine's max past). Out: buffers the engine reads and writes in place.
cuda-python is imported only when a device is first used; this module itself needs numpy alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from glm_runtime.backend import IntsLike
from glm_runtime.errors import GLMXError
from glm_runtime.kvcache import SlotCache

INSTALL_HINT = (
    "pip install 'glmx[gpu]' on a machine with an NVIDIA GPU and its driver (the tensorrt wheels fetch "
    "NVIDIA's libraries from pypi.nvidia.com at install time); the ONNX Runtime backend needs neither"
)


class TensorRTError(GLMXError, RuntimeError):
    """TensorRT or CUDA is missing, the engine does not fit this machine, or a call cannot run on it."""


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise TensorRTError(f"cuda-python is not installed ({exc}): {INSTALL_HINT}") from None
    return cudart


def _cuda_call(cudart: Any, result: Any) -> Any:
    """cuda-python returns (err, *values); raise on err, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        described = cudart.cudaGetErrorString(err)
        text = described[1].decode() if isinstance(described, tuple) else str(described)
        raise TensorRTError(f"CUDA error {int(err)} ({text})")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(name, "major.minor" compute capability) of a CUDA device, read through cuda-python's runtime API."""
    cudart = import_cudart()
    props = _cuda_call(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.split("\x00")[0].strip(), f"{props.major}.{props.minor}"


# ---------------------------------------------------------------- device memory


class DeviceArray:
    """A typed view of device memory [shape] (cuda pointer `ptr`). np.asarray(x) copies it to the host.

    Outputs of `run` live in the session's scratch buffers: they are valid until its next call (checked).
    """

    def __init__(self, cuda: Cuda, ptr: int, shape: IntsLike, dtype: Any, owner: Any = None, epoch: int = -1):
        self._cuda, self._ptr, self.shape, self.dtype = cuda, ptr, tuple(int(s) for s in shape), np.dtype(dtype)
        self._owner, self._epoch = owner, epoch  # owner: the session whose scratch holds it (None: owned here)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ptr(self) -> int:
        if self._owner is not None and self._owner._epoch != self._epoch:
            raise TensorRTError(
                "this output was overwritten by a later run(); copy it with np.asarray() first, "
                "or keep K/V in session.new_cache()"
            )
        return self._ptr

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self._cuda.copy(out.ctypes.data, self.ptr, self.nbytes, "d2h")
        self._cuda.synchronize()
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)


class Cuda:
    """The few cuda-python runtime calls the session needs, on one stream of one device."""

    def __init__(self, device: int = 0):
        self.rt = import_cudart()
        _cuda_call(self.rt, self.rt.cudaSetDevice(device))
        self.stream = _cuda_call(self.rt, self.rt.cudaStreamCreate())
        self.handle = int(self.stream)  # what TensorRT's *_async calls take
        kinds = self.rt.cudaMemcpyKind
        self._kinds = {
            "h2d": kinds.cudaMemcpyHostToDevice,
            "d2h": kinds.cudaMemcpyDeviceToHost,
            "d2d": kinds.cudaMemcpyDeviceToDevice,
        }

    def malloc(self, nbytes: int, zero: bool = False) -> int:
        ptr = int(_cuda_call(self.rt, self.rt.cudaMalloc(max(int(nbytes), 256))))  # never null, even if empty
        if zero:
            _cuda_call(self.rt, self.rt.cudaMemsetAsync(ptr, 0, max(int(nbytes), 256), self.stream))
        return ptr

    def free(self, ptr: int) -> None:
        _cuda_call(self.rt, self.rt.cudaFree(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        if nbytes:
            _cuda_call(self.rt, self.rt.cudaMemcpyAsync(dst, src, nbytes, self._kinds[kind], self.stream))

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: str) -> None:
        """`height` rows of `width` bytes; rows start every dpitch / spitch bytes (a strided slot write)."""
        if width and height:
            _cuda_call(
                self.rt,
                self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, self._kinds[kind], self.stream),
            )

    def synchronize(self) -> None:
        _cuda_call(self.rt, self.rt.cudaStreamSynchronize(self.stream))


# ---------------------------------------------------------------- the device-resident KV cache


class TensorRTKVCache(SlotCache):
    """glm_runtime.kvcache.KVCache's methods (feeds / append / reorder / truncate / reserve, `visible`, `filled`)
    with the buffers [B, n, capacity, d] in GPU memory: the engine reads them in place as past_key_values.*,
    and each call's present.* are copied device to device into each row's next free slots. Nothing about the
    cache crosses to the host per token; `visible` / `filled` (tiny) stay on the host to build masks.

    The generate loop needs no TensorRT code: it calls session.new_cache, and each
    step is `out = session.run({..., "attention_mask": masks.decode_mask(cache.visible), **cache.feeds()})`
    then `cache.append(out, counts)` (runtime/steps.py). Capacity never exceeds the engine's max past_seq.
    """

    def __init__(self, session: Any, batch: int, capacity: int):  # a trt_session.TensorRTSession
        self._cuda, self.max_capacity = session._cuda, session.max_past
        config = session.config
        super().__init__(
            session.io,
            int(batch),
            config.num_attention_heads,
            config.head_dim,
            min(max(int(capacity), 1), self.max_capacity),
            session.kv_dtype,
        )  # grows up to the max

    def _alloc(self, capacity: int) -> DeviceArray:
        # zeroed: masked slots still enter softmax(.) @ V with weight ~0, and 0 * NaN garbage would be NaN
        shape = (self.batch, self.heads, capacity, self.head_dim)
        return DeviceArray(
            self._cuda, self._cuda.malloc(math.prod(shape) * self.dtype.itemsize, zero=True), shape, self.dtype
        )

    def reserve(self, needed: int) -> None:
        """Room for `needed` slots per row; grows geometrically but never past the engine's max past_seq."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise TensorRTError(
                f"the KV cache needs {needed} slots but the engine was built for at most "
                f"{self.max_capacity}: rebuild it with a larger --max-context / --max-new-tokens"
            )
        new_cap, old_cap = min(max(needed, 2 * self.capacity), self.max_capacity), self.capacity
        row = self.head_dim * self.dtype.itemsize  # bytes per slot
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(new_cap)  # move the old slots: B*n rows of old_cap slots into rows of new_cap
                self._cuda.copy_2d(
                    new.ptr, new_cap * row, old.ptr, old_cap * row, old_cap * row, self.batch * self.heads, "d2d"
                )
                self._cuda.synchronize()
                self._cuda.free(old.ptr)
                store[i] = new
        self._grow_slot_map(new_cap)

    def append(self, outputs: Mapping[str, Any], counts: IntsLike) -> None:
        """Store the first counts[b] of this call's T tokens of row b at its next slots (device to device when
        present.* are DeviceArrays, else from the host), and mark them visible. Rows with count 0 are untouched."""
        counts = self._counts(counts)
        self.reserve(int((self.filled + counts).max()))
        T = int(outputs[self.present[0][0]].shape[2])
        row, cap, n = self.head_dim * self.dtype.itemsize, self.capacity, self.heads  # row: bytes per slot
        uniform = bool((self.filled == self.filled[0]).all() and (counts == counts[0]).all())
        for (kn, vn), k, v in zip(self.present, self.keys, self.values):
            for new, buf in ((outputs[kn], k), (outputs[vn], v)):
                host = None if isinstance(new, DeviceArray) else np.ascontiguousarray(new, dtype=self.dtype)
                src, kind = (new.ptr, "d2d") if host is None else (host.ctypes.data, "h2d")
                if uniform:  # every row writes the same slots: one strided copy of B*n (row, head) lines
                    self._cuda.copy_2d(
                        buf.ptr + int(self.filled[0]) * row,
                        cap * row,
                        src,
                        T * row,
                        int(counts[0]) * row,
                        self.batch * n,
                        kind,
                    )
                else:
                    for b in map(int, np.flatnonzero(counts)):  # [n, counts[b], d] of row b into its slots
                        self._cuda.copy_2d(
                            buf.ptr + (b * n * cap + int(self.filled[b])) * row,
                            cap * row,
                            src + b * n * T * row,
                            T * row,
                            int(counts[b]) * row,
                            n,
                            kind,
                        )
                if host is not None:
                    self._cuda.synchronize()  # the host array may go away once this returns
        self._mark_appended(counts)

    def reorder(self, index: IntsLike) -> None:
        """Beam search: row b becomes a copy of row index[b] (whole rows, device to device, into new buffers)."""
        order = np.asarray(index, dtype=np.int64)
        if (order == np.arange(self.batch)).all():
            return
        row_bytes = self.heads * self.capacity * self.head_dim * self.dtype.itemsize  # one batch row
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(self.capacity)
                for b, src in enumerate(order):
                    self._cuda.copy(new.ptr + b * row_bytes, old.ptr + int(src) * row_bytes, row_bytes, "d2d")
                self._cuda.synchronize()
                self._cuda.free(old.ptr)
                store[i] = new
        self._reorder_slots(order)

    def to_host(self) -> dict[str, np.ndarray]:
        """Every past_key_values.* buffer as numpy (tests and debugging only: this is the slow path)."""
        return {name: value.numpy() for name, value in self.feeds().items()}

    def close(self) -> None:
        self._cuda.synchronize()
        for store in (self.keys, self.values):
            for buf in store:
                self._cuda.free(buf.ptr)
            store.clear()
