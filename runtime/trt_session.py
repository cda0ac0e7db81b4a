"""TensorRT backend: runs a glmx engine folder with the same interface as the ONNX Runtime session.

In: an engine folder (model.engine + manifest of kind "engine", written by `glmx build-engine`) and feeds named
by the IO table. Out: `run(feeds) -> outputs`, and `new_cache()`, a KV cache whose buffers stay on the GPU.
tensorrt and cuda-python are imported only when a session is opened; this module itself needs numpy alone.
Device memory (cuda-python calls, DeviceArray, the device-resident KV cache) is runtime/trt_memory.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.backend import Closable, check_export, check_feeds
from glm_runtime.iotable import past_names, present_names
from glm_runtime.manifest import ENGINE_FILE, Manifest, ManifestError, load_manifest
from glm_runtime.prefix import load_prefix
from glm_runtime.trt_memory import (  # noqa: F401 (TensorRTError, gpu_identity, import_cudart: this module's API too)
    INSTALL_HINT,
    Cuda,
    DeviceArray,
    TensorRTError,
    TensorRTKVCache,
    gpu_identity,
    import_cudart,
)

# Which build option widens each symbolic dim, for "rebuild with ..." hints.
_DIM_OPTION = {
    "batch": "--max-batch",
    "seq": "--max-context",
    "past_seq": "--max-context / --max-new-tokens",
    "total_seq": "--max-context / --max-new-tokens",
}


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTError(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from None
    return tensorrt


# ---------------------------------------------------------------- profiles (pure python)


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (min, opt, max) of every symbolic dim and of every input's shape."""

    name: str  # "context" (prompt pass) or "decode" (one token per row)
    dims: Mapping[str, tuple[int, int, int]]  # batch, seq, past_seq, total_seq (= past_seq + seq)
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dims": {k: list(v) for k, v in self.dims.items()},
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        return cls(
            name=data["name"],
            dims={k: tuple(v) for k, v in data["dims"].items()},
            shapes={k: (tuple(v[0]), tuple(v[1]), tuple(v[2])) for k, v in data["shapes"].items()},
        )

    def misfits(self, dims: Mapping[str, int]) -> list[str]:
        """Why `dims` do not fit this profile ("seq=300 not in 1..256"); empty when they fit."""
        return [
            f"{k}={dims[k]} not in {lo}..{hi}"
            for k, (lo, _, hi) in self.dims.items()
            if k in dims and not lo <= dims[k] <= hi
        ]


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
    raise TensorRTError(
        f"this call does not fit the engine's {closest.name} profile ({'; '.join(bad)}): "
        f"rebuild the engine with a larger {' and '.join(options)}"
    )


def feed_dims(io: Mapping[str, Any], feeds: Mapping[str, Any]) -> dict[str, int]:
    """Check feeds (numpy or DeviceArrays) with the one checker every backend uses (check_feeds, FeedError)."""
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
    def from_manifest(cls, manifest: Manifest) -> EngineInfo:
        extra = manifest.extra
        try:
            return cls(
                trt_version=str(extra["tensorrt"]["version"]),
                gpu_name=str(extra["gpu"]["name"]),
                compute_capability=str(extra["gpu"]["compute_capability"]),
                profiles=tuple(Profile.from_dict(p) for p in extra["profiles"]),
                limits=dict(extra["limits"]),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(
                f"engine manifest lacks {exc} (tensorrt.version, gpu.name, gpu.compute_capability, "
                f"profiles and limits are required): rebuild it with glmx build-engine"
            ) from None


def check_engine_compatibility(
    info: EngineInfo, trt_version: str, gpu_name: str, compute_capability: str, strict_gpu: bool = True
) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU; the message gives every reason."""
    reasons = []
    if info.trt_version != trt_version:
        reasons.append(
            f"it was built by TensorRT {info.trt_version} and this machine has TensorRT {trt_version} "
            f"(an engine loads only in the TensorRT version that built it)"
        )
    if info.compute_capability != compute_capability:
        reasons.append(
            f"it was built for compute capability {info.compute_capability} ({info.gpu_name}) and this "
            f"GPU is {compute_capability} ({gpu_name})"
        )
    elif strict_gpu and info.gpu_name != gpu_name:
        reasons.append(
            f"it was built on a {info.gpu_name} and this GPU is a {gpu_name} (same compute capability: "
            f"pass strict_gpu=False to accept it at your own risk)"
        )
    if reasons:
        raise TensorRTError(
            "cannot use this engine: " + "; ".join(reasons) + ". Rebuild it on this machine with glmx build-engine"
        )


# ---------------------------------------------------------------- the session


class TensorRTSession(Closable):
    """run(feeds) -> outputs over a TensorRT engine, plus `inputs` / `outputs` metadata from the IO table.

    Outputs: logits as numpy; present.* as DeviceArray (on the GPU; np.asarray copies them) unless
    host_outputs=True. Feeds may be numpy or DeviceArray (what TensorRTKVCache.feeds() gives: bound, not copied).
    One execution context per optimization profile; a call goes to "decode" when seq == 1, else "context".
    """

    backend = "tensorrt"
    folder: Path | None  # None: engine bytes not yet written to a folder (from_plan)

    def __init__(self, folder: str | Path, *, device: int = 0, strict_gpu: bool = True):
        folder = Path(folder)
        manifest = load_manifest(folder, kind="engine")
        info = EngineInfo.from_manifest(manifest)
        config, tokenizer_path = check_export(folder, manifest)  # config, IO table, tokenizer entry agree
        trt = import_tensorrt()
        gpu_name, capability = gpu_identity(device)
        check_engine_compatibility(info, str(trt.__version__), gpu_name, capability, strict_gpu=strict_gpu)
        self.folder, self.tokenizer_path = folder, tokenizer_path
        self._open(trt, (folder / ENGINE_FILE).read_bytes(), manifest, info, config, device)
        self.prefix = load_prefix(folder, manifest, config, self.kv_dtype)  # P-tuning (glm_runtime.prefix), or None

    @classmethod
    def from_plan(
        cls, plan: Any, manifest: Manifest, info: EngineInfo, device: int = 0, prefix: Any = None
    ) -> TensorRTSession:
        """A session over engine bytes not yet in a folder (the builder's parity check before it writes one);
        prefix: the parent's P-tuning prefix (glm_runtime.prefix.Prefix), which the folder will carry."""
        from glm_runtime.config import GLMConfig

        self = cls.__new__(cls)
        self.folder, self.tokenizer_path = None, None
        self._open(import_tensorrt(), plan, manifest, info, GLMConfig.from_dict(manifest.config), device)
        self.prefix = prefix
        return self

    def _open(self, trt: Any, plan: Any, manifest: Manifest, info: EngineInfo, config: Any, device: int) -> None:
        self.manifest, self.info, self.io, self.config = manifest, info, manifest.io, config
        self.tokenizer_record = manifest.tokenizer
        self.precision = manifest.precision
        self.profiles = list(info.profiles)
        self._trt, self._cuda = trt, Cuda(device)
        self._past = {n for pair in past_names(self.io) for n in pair}
        self._present = {n for pair in present_names(self.io) for n in pair}
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise TensorRTError(
                "TensorRT could not deserialize the engine (see its log above): rebuild it with glmx build-engine"
            )
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
            raise TensorRTError(
                f"the engine's tensors {sorted(names)} / {engine.num_optimization_profiles} profiles "
                f"do not match its manifest ({sorted(wanted)} / {len(self.profiles)})"
            )
        for name in names:
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            spec = wanted[name]
            if is_input != any(s["name"] == name for s in self.io["inputs"]) or dtype != np.dtype(spec["dtype"]):
                raise TensorRTError(
                    f"engine tensor {name} is {dtype} {'input' if is_input else 'output'}, the "
                    f"manifest says {spec['dtype']}"
                )

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

    @property
    def limits(self) -> dict[str, int]:
        """The manifest's limits, max_past as the profiles give it (the largest past_seq any profile takes)."""
        return {**self.info.limits, "max_past": self.max_past}

    def fits(self, batch: int, seq: int, past: int) -> bool:
        dims = {"batch": batch, "seq": seq, "past_seq": past, "total_seq": past + seq}
        return any(not profile.misfits(dims) for profile in self.profiles)

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

    def new_cache(self, batch: int, capacity: int) -> TensorRTKVCache:
        return TensorRTKVCache(self, batch, capacity)

    def close(self) -> None:
        for ptr, _ in self._scratch.values():
            self._cuda.free(ptr)
        self._scratch.clear()
        self._contexts = []
        super().close()
