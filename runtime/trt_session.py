"""TensorRT backend: runs a glmx engine folder with the same interface as the ONNX Runtime session.

In: an engine folder (model.engine + manifest of kind "engine", written by `glmx build-engine`) and feeds named
by the IO table. Out: `run(feeds) -> outputs`, and `new_cache()`, a KV cache whose buffers stay on the GPU.
tensorrt and cuda-python are imported only when a session is opened; this module itself needs numpy alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from glm_runtime.errors import GLMXError
from glm_runtime.iotable import past_names, present_names
from glm_runtime.kvcache import _SlotCache
from glm_runtime.manifest import Manifest, ManifestError, load_manifest
from glm_runtime.session import Closable

ENGINE_FILE = "model.engine"
INSTALL_HINT = ("pip install 'glmx[gpu]' on a machine with an NVIDIA GPU and its driver (the tensorrt wheels fetch "
                "NVIDIA's libraries from pypi.nvidia.com at install time); the ONNX Runtime backend needs neither")
# Which build option widens each symbolic dim, for "rebuild with ..." hints.
_DIM_OPTION = {"batch": "--max-batch", "seq": "--max-context", "past_seq": "--max-context / --max-new-tokens",
               "total_seq": "--max-context / --max-new-tokens"}


class TensorRTError(GLMXError, RuntimeError):
    """TensorRT or CUDA is missing, the engine does not fit this machine, or a call cannot run on it."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTError(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from None
    return tensorrt


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


# ---------------------------------------------------------------- profiles (pure python)

@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (min, opt, max) of every symbolic dim and of every input's shape."""
    name: str  # "context" (prompt pass) or "decode" (one token per row)
    dims: Mapping[str, tuple[int, int, int]]  # batch, seq, past_seq, total_seq (= past_seq + seq)
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()},
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        return cls(name=data["name"], dims={k: tuple(v) for k, v in data["dims"].items()},
                   shapes={k: tuple(tuple(s) for s in v) for k, v in data["shapes"].items()})

    def misfits(self, dims: Mapping[str, int]) -> list[str]:
        """Why `dims` do not fit this profile ("seq=300 not in 1..256"); empty when they fit."""
        return [f"{k}={dims[k]} not in {lo}..{hi}" for k, (lo, _, hi) in self.dims.items()
                if k in dims and not lo <= dims[k] <= hi]


def select_profile(profiles: Sequence[Profile], dims: Mapping[str, int]) -> int:
    """Index of the profile for a call: "decode" for one token per row, else the first profile that fits."""
    order = list(range(len(profiles)))
    if dims.get("seq") == 1:  # one token per row: the decode profile's kernels were tuned for exactly that
        order.sort(key=lambda i: profiles[i].name != "decode")
    for i in order:
        if not profiles[i].misfits(dims):
            return i
    closest = profiles[order[0]]
    bad = closest.misfits(dims)
    options = sorted({_DIM_OPTION[b.split("=")[0]] for b in bad})
    raise TensorRTError(f"this call does not fit the engine's {closest.name} profile ({'; '.join(bad)}): "
                        f"rebuild the engine with a larger {' and '.join(options)}")


def feed_dims(io: Mapping[str, Any], feeds: Mapping[str, Any]) -> dict[str, int]:
    """Check feeds (numpy or DeviceArrays) with the one checker every backend uses (check_feeds, FeedError)."""
    from glm_runtime.session import check_feeds
    return check_feeds(feeds, io["inputs"])


# ---------------------------------------------------------------- what an engine manifest must say

@dataclass(frozen=True)
class EngineInfo:
    trt_version: str
    gpu_name: str
    compute_capability: str
    profiles: tuple[Profile, ...]
    limits: Mapping[str, int]  # max_batch, max_context, max_new_tokens, max_past

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "EngineInfo":
        extra = manifest.extra
        try:
            return cls(trt_version=str(extra["tensorrt"]["version"]), gpu_name=str(extra["gpu"]["name"]),
                       compute_capability=str(extra["gpu"]["compute_capability"]),
                       profiles=tuple(Profile.from_dict(p) for p in extra["profiles"]), limits=dict(extra["limits"]))
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"engine manifest lacks {exc} (tensorrt.version, gpu.name, gpu.compute_capability, "
                                f"profiles and limits are required): rebuild it with glmx build-engine") from None


def check_engine_compatibility(info: EngineInfo, trt_version: str, gpu_name: str, compute_capability: str,
                               strict_gpu: bool = True) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU; the message gives every reason."""
    reasons = []
    if info.trt_version != trt_version:
        reasons.append(f"it was built by TensorRT {info.trt_version} and this machine has TensorRT {trt_version} "
                       f"(an engine loads only in the TensorRT version that built it)")
    if info.compute_capability != compute_capability:
        reasons.append(f"it was built for compute capability {info.compute_capability} ({info.gpu_name}) and this "
                       f"GPU is {compute_capability} ({gpu_name})")
    elif strict_gpu and info.gpu_name != gpu_name:
        reasons.append(f"it was built on a {info.gpu_name} and this GPU is a {gpu_name} (same compute capability: "
                       f"pass strict_gpu=False to accept it at your own risk)")
    if reasons:
        raise TensorRTError("cannot use this engine: " + "; ".join(reasons) + ". Rebuild it on this machine with "
                            "glmx build-engine")


# ---------------------------------------------------------------- device memory

class DeviceArray:
    """A typed view of device memory [shape] (cuda pointer `ptr`). np.asarray(x) copies it to the host.

    Outputs of `run` live in the session's scratch buffers: they are valid until its next call (checked).
    """

    def __init__(self, cuda: "_Cuda", ptr: int, shape: Sequence[int], dtype: Any, owner: Any = None, epoch: int = -1):
        self._cuda, self._ptr, self.shape, self.dtype = cuda, ptr, tuple(int(s) for s in shape), np.dtype(dtype)
        self._owner, self._epoch = owner, epoch  # owner: the session whose scratch holds it (None: owned here)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ptr(self) -> int:
        if self._owner is not None and self._owner._epoch != self._epoch:
            raise TensorRTError("this output was overwritten by a later run(); copy it with np.asarray() first, "
                                "or keep K/V in session.new_cache()")
        return self._ptr

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self._cuda.copy(out.ctypes.data, self.ptr, self.nbytes, "d2h")
        self._cuda.synchronize()
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)


class _Cuda:
    """The few cuda-python runtime calls the session needs, on one stream of one device."""

    def __init__(self, device: int = 0):
        self.rt = import_cudart()
        _cuda_call(self.rt, self.rt.cudaSetDevice(device))
        self.stream = _cuda_call(self.rt, self.rt.cudaStreamCreate())
        self.handle = int(self.stream)  # what TensorRT's *_async calls take
        kinds = self.rt.cudaMemcpyKind
        self._kinds = {"h2d": kinds.cudaMemcpyHostToDevice, "d2h": kinds.cudaMemcpyDeviceToHost,
                       "d2d": kinds.cudaMemcpyDeviceToDevice}

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
            _cuda_call(self.rt, self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                                          self._kinds[kind], self.stream))

    def synchronize(self) -> None:
        _cuda_call(self.rt, self.rt.cudaStreamSynchronize(self.stream))


# ---------------------------------------------------------------- the session

class TensorRTSession(Closable):
    """run(feeds) -> outputs over a TensorRT engine, plus `inputs` / `outputs` metadata from the IO table.

    Outputs: logits as numpy; present.* as DeviceArray (on the GPU; np.asarray copies them) unless
    host_outputs=True. Feeds may be numpy or DeviceArray (what TensorRTKVCache.feeds() gives: bound, not copied).
    One execution context per optimization profile; a call goes to "decode" when seq == 1, else "context".
    """
    backend = "tensorrt"

    def __init__(self, folder: str | Path, *, device: int = 0, strict_gpu: bool = True):
        from glm_runtime.session import check_export
        folder = Path(folder)
        manifest = load_manifest(folder, kind="engine")
        info = EngineInfo.from_manifest(manifest)
        config, tokenizer_path = check_export(folder, manifest)  # config, IO table, tokenizer entry agree
        trt = import_tensorrt()
        gpu_name, capability = gpu_identity(device)
        check_engine_compatibility(info, str(trt.__version__), gpu_name, capability, strict_gpu=strict_gpu)
        self.folder, self.tokenizer_path = folder, tokenizer_path
        self._open(trt, (folder / ENGINE_FILE).read_bytes(), manifest, info, config, device)

    @classmethod
    def from_plan(cls, plan: Any, manifest: Manifest, info: EngineInfo, device: int = 0) -> "TensorRTSession":
        """A session over engine bytes not yet in a folder (the builder's parity check before it writes one)."""
        from glm_runtime.config import GLMConfig
        self = cls.__new__(cls)
        self.folder, self.tokenizer_path = None, None
        self._open(import_tensorrt(), plan, manifest, info, GLMConfig.from_dict(manifest.config), device)
        return self

    def _open(self, trt: Any, plan: Any, manifest: Manifest, info: EngineInfo, config: Any, device: int) -> None:
        self.manifest, self.info, self.io, self.config = manifest, info, manifest.io, config
        self.precision = manifest.precision
        self.profiles = list(info.profiles)
        self._trt, self._cuda = trt, _Cuda(device)
        self._past = {n for pair in past_names(self.io) for n in pair}
        self._present = {n for pair in present_names(self.io) for n in pair}
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise TensorRTError("TensorRT could not deserialize the engine (see its log above): rebuild it with "
                                "glmx build-engine")
        self._check_engine_io()
        self._contexts = []
        for index in range(len(self.profiles)):
            context = self._engine.create_execution_context()
            if context is None or not context.set_optimization_profile_async(index, self._cuda.handle):
                raise TensorRTError(f"TensorRT could not create an execution context for profile {index}")
            self._contexts.append(context)
        self._cuda.synchronize()
        self._scratch: dict[str, tuple[int, int]] = {}  # key -> (ptr, capacity in bytes), grown on demand
        self._epoch = 0

    def _check_engine_io(self) -> None:
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        wanted = {s["name"]: s for s in self.io["inputs"] + self.io["outputs"]}
        if sorted(names) != sorted(wanted) or engine.num_optimization_profiles != len(self.profiles):
            raise TensorRTError(f"the engine's tensors {sorted(names)} / {engine.num_optimization_profiles} profiles "
                                f"do not match its manifest ({sorted(wanted)} / {len(self.profiles)})")
        for name in names:
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            spec = wanted[name]
            if is_input != any(s["name"] == name for s in self.io["inputs"]) or dtype != np.dtype(spec["dtype"]):
                raise TensorRTError(f"engine tensor {name} is {dtype} {'input' if is_input else 'output'}, the "
                                    f"manifest says {spec['dtype']}")

    # metadata, as in the ONNX Runtime session
    @property
    def inputs(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.io["inputs"]]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.io["outputs"]]

    @property
    def kv_dtype(self) -> np.dtype:
        return np.dtype(next(s["dtype"] for s in self.io["inputs"] if s["name"] in self._past))

    @property
    def max_past(self) -> int:
        return max(p.dims["past_seq"][2] for p in self.profiles)

    def _buffer(self, key: str, nbytes: int) -> int:
        ptr, capacity = self._scratch.get(key, (0, 0))
        if nbytes > capacity or not ptr:  # an empty tensor (past_seq 0) still gets a real address
            if ptr:
                self._cuda.synchronize()  # the old buffer may still be read by queued work
                self._cuda.free(ptr)
            capacity = max(nbytes, 2 * capacity, 256)
            ptr = self._cuda.malloc(capacity)
            self._scratch[key] = (ptr, capacity)
        return ptr

    def run(self, feeds: Mapping[str, Any], *, host_outputs: bool = False) -> dict[str, Any]:
        dims = feed_dims(self.io, feeds)
        context = self._contexts[select_profile(self.profiles, dims)]
        self._epoch += 1  # DeviceArrays handed out by the previous call are now stale
        keep = []  # host arrays stay referenced until the stream is synchronized
        for spec in self.io["inputs"]:
            name, value = spec["name"], feeds[spec["name"]]
            if isinstance(value, DeviceArray):
                ptr = value.ptr
            else:
                host = np.ascontiguousarray(value)
                keep.append(host)
                ptr = self._buffer("in:" + name, host.nbytes)
                self._cuda.copy(ptr, host.ctypes.data, host.nbytes, "h2d")
            if not context.set_input_shape(name, tuple(int(s) for s in value.shape)):
                raise TensorRTError(f"TensorRT refused shape {list(value.shape)} for input {name}")
            context.set_tensor_address(name, ptr)
        results: dict[str, Any] = {}
        for spec in self.io["outputs"]:
            name = spec["name"]
            shape = tuple(int(s) for s in context.get_tensor_shape(name))
            dtype = np.dtype(spec["dtype"])
            ptr = self._buffer("out:" + name, math.prod(shape) * dtype.itemsize)
            context.set_tensor_address(name, ptr)
            results[name] = DeviceArray(self._cuda, ptr, shape, dtype, owner=self, epoch=self._epoch)
        if not context.execute_async_v3(self._cuda.handle):
            raise TensorRTError(f"TensorRT failed to run the engine on {dims} (see its log above)")
        for name, value in results.items():
            if host_outputs or name not in self._present:
                results[name] = value.numpy()
        self._cuda.synchronize()
        del keep
        return results

    def new_cache(self, batch: int, capacity: int) -> "TensorRTKVCache":
        return TensorRTKVCache(self, batch, capacity)

    def close(self) -> None:
        for ptr, _ in self._scratch.values():
            self._cuda.free(ptr)
        self._scratch.clear()
        self._contexts = []
        super().close()


# ---------------------------------------------------------------- the device-resident KV cache

class TensorRTKVCache(_SlotCache):
    """glm_runtime.kvcache.KVCache's methods (feeds / append / reorder / truncate / reserve, `visible`, `filled`)
    with the buffers [B, n, capacity, d] in GPU memory: the engine reads them in place as past_key_values.*,
    and each call's present.* are copied device to device into each row's next free slots. Nothing about the
    cache crosses to the host per token; `visible` / `filled` (tiny) stay on the host to build masks.

    The generate loop needs no TensorRT code: kvcache.new_cache(session, ...) calls session.new_cache, and each
    step is `out = session.run({..., "attention_mask": masks.decode_mask(cache.visible), **cache.feeds()})`
    then `cache.append(out, counts)` (runtime/steps.py). Capacity never exceeds the engine's max past_seq.
    """

    def __init__(self, session: TensorRTSession, batch: int, capacity: int):
        self._cuda, self.max_capacity = session._cuda, session.max_past
        config = session.config
        super().__init__(session.io, int(batch), config.num_attention_heads, config.head_dim,
                         min(max(int(capacity), 1), self.max_capacity), session.kv_dtype)  # grows up to the max

    def _alloc(self, capacity: int) -> DeviceArray:
        # zeroed: masked slots still enter softmax(.) @ V with weight ~0, and 0 * NaN garbage would be NaN
        shape = (self.batch, self.heads, capacity, self.head_dim)
        return DeviceArray(self._cuda, self._cuda.malloc(math.prod(shape) * self.dtype.itemsize, zero=True),
                           shape, self.dtype)

    def reserve(self, needed: int) -> None:
        """Room for `needed` slots per row; grows geometrically but never past the engine's max past_seq."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise TensorRTError(f"the KV cache needs {needed} slots but the engine was built for at most "
                                f"{self.max_capacity}: rebuild it with a larger --max-context / --max-new-tokens")
        new_cap, old_cap = min(max(needed, 2 * self.capacity), self.max_capacity), self.capacity
        row = self.head_dim * self.dtype.itemsize  # bytes per slot
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(new_cap)  # move the old slots: B*n rows of old_cap slots into rows of new_cap
                self._cuda.copy_2d(new.ptr, new_cap * row, old.ptr, old_cap * row, old_cap * row,
                                   self.batch * self.heads, "d2d")
                self._cuda.synchronize()
                self._cuda.free(old.ptr)
                store[i] = new
        self._grow_slot_map(new_cap)

    def append(self, outputs: Mapping[str, Any], counts: Sequence[int]) -> None:
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
                    self._cuda.copy_2d(buf.ptr + int(self.filled[0]) * row, cap * row, src, T * row,
                                       int(counts[0]) * row, self.batch * n, kind)
                else:
                    for b in map(int, np.flatnonzero(counts)):  # [n, counts[b], d] of row b into its slots
                        self._cuda.copy_2d(buf.ptr + (b * n * cap + int(self.filled[b])) * row, cap * row,
                                           src + b * n * T * row, T * row, int(counts[b]) * row, n, kind)
                if host is not None:
                    self._cuda.synchronize()  # the host array may go away once this returns
        self._mark_appended(counts)

    def reorder(self, index: Sequence[int]) -> None:
        """Beam search: row b becomes a copy of row index[b] (whole rows, device to device, into new buffers)."""
        index = np.asarray(index, dtype=np.int64)
        if (index == np.arange(self.batch)).all():
            return
        row_bytes = self.heads * self.capacity * self.head_dim * self.dtype.itemsize  # one batch row
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(self.capacity)
                for b, src in enumerate(index):
                    self._cuda.copy(new.ptr + b * row_bytes, old.ptr + int(src) * row_bytes, row_bytes, "d2d")
                self._cuda.synchronize()
                self._cuda.free(old.ptr)
                store[i] = new
        self.visible = self.visible[index]
        self.filled = self.filled[index]

    def to_host(self) -> dict[str, np.ndarray]:
        """Every past_key_values.* buffer as numpy (tests and debugging only: this is the slow path)."""
        return {name: value.numpy() for name, value in self.feeds().items()}

    def close(self) -> None:
        self._cuda.synchronize()
        for store in (self.keys, self.values):
            for buf in store:
                self._cuda.free(buf.ptr)
            store.clear()
