"""The interface every backend implements (ONNX Runtime, TensorRT, the torch reference) and the checks they share.
In: nothing but the IO table and manifests. Out: `Session` and `KVCacheLike` (typing.Protocol: structural, nothing
subclasses them), `Closable` (the defaults), `check_feeds`, `check_export`, `host_array`. No backend imports another;
each imports this module (Polygraphy's runner interface plays the same part).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from glm_runtime.config import ConfigError, GLMConfig
from glm_runtime.errors import GLMXError
from glm_runtime.iotable import accepted_tables
from glm_runtime.manifest import Manifest, ManifestError, check_complete

# OrtValue.data_type() strings -> numpy names, for feeds that already live on a device
IntsLike = Sequence[int] | np.ndarray  # per-row counts, slots or row indices: a list or an int array

ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(int32)": "int32",
    "tensor(double)": "float64",
}


class BackendError(GLMXError, RuntimeError):
    """A backend that cannot run here: its package or provider is missing; the message says what to install."""


class FeedError(GLMXError, ValueError):
    """A feed does not match the graph's IO table: unknown or missing name, wrong dtype, rank or shape."""


class Session(Protocol):
    """What every backend gives (ONNX Runtime, TensorRT, the torch reference): the generation loop, the
    comparison harness (glm_export.compare) and the server use only this.

    io: the IO table (iotable.io_table), inputs/outputs its two lists; config: the GLMConfig; precision: the
    manifest's precision; kv_dtype: the dtype of past/present. run(feeds) takes the IO table's names and returns
    {"logits": [B, T', V] float32 numpy, "present.{i}.key|value": this call's K/V [B, n, T, d]}; new_cache(batch,
    capacity) gives the KV cache that run's presents belong in (host numpy or device buffers). limits: what one
    call may hold ({} when only memory bounds it; a TensorRT engine: max_batch, max_context, max_new_tokens,
    max_past); fits(batch, seq, past) says whether one call of that shape runs (an engine: some profile takes it).
    folder / providers: where it came from and ONNX Runtime's providers, for the records that name a session;
    tokenizer: the tokenizer the session's source decided (the torch reference on a checkpoint), else None;
    tokenizer_path / tokenizer_record: the tokenizer file that belongs to the model and its manifest entry (kind,
    options), for open_model to load; None / {} when the artifact names none.
    prefix: a P-tuning v2 prefix (glm_runtime.prefix.Prefix) the artifact carries, None without one: the forward
    phases (runtime/steps.py) put it in front of every row; run itself feeds only what it is given.
    """

    io: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    config: GLMConfig
    precision: str
    kv_dtype: np.dtype
    limits: Mapping[str, int]
    tokenizer: Any
    tokenizer_path: Path | None
    tokenizer_record: Mapping[str, Any]
    folder: Path | None  # the artifact the session opened (None: built in memory)
    providers: Sequence[Any]  # ONNX Runtime's execution providers, first choice first (other backends: none)
    prefix: Any  # glm_runtime.prefix.Prefix | None

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...

    def new_cache(self, batch: int, capacity: int) -> KVCacheLike: ...

    def fits(self, batch: int, seq: int, past: int) -> bool: ...

    def close(self) -> None: ...

    def __enter__(self) -> Session: ...

    def __exit__(self, *exc: Any) -> None: ...


class KVCacheLike(Protocol):
    """What a session's KV cache gives the forward phases (runtime/steps.py) and the engine: a host cache
    (kvcache.KVCache), ONNX Runtime's device cache (kvcache.DeviceKVCache) or TensorRT's (trt_memory).

    batch rows of capacity slots; filled[b]: slots row b holds; visible: [batch, capacity] bool, the slots each
    row attends to; sliceable: a call may feed the first rows alone (host memory) or must feed every row;
    prefix_slots: the first slots of every row that hold a P-tuning prefix (hold_prefix; 0 without one)."""

    batch: int
    filled: np.ndarray
    visible: np.ndarray
    sliceable: bool
    prefix_slots: int

    @property
    def capacity(self) -> int: ...

    def feeds(self, width: int | None = None) -> dict[str, Any]: ...

    def append(self, outputs: Mapping[str, Any], counts: IntsLike) -> None: ...

    def load_rows(self, rows: IntsLike, outputs: Mapping[str, Any], lengths: IntsLike) -> None: ...

    def reserve(self, needed: int) -> None: ...

    def reorder(self, index: IntsLike) -> None: ...

    def free_rows(self, rows: IntsLike) -> None: ...

    def hold_prefix(self, prefix: Any) -> None: ...

    def truncate(self, filled: IntsLike) -> None: ...


class Closable:
    """`with open_session(...) as session:` for every backend; close() frees what the session holds (device
    buffers, the native session) and a closed session refuses to run. Also the defaults of a session that only
    memory bounds: no limits, every call shape fits, no tokenizer of its own."""

    closed = False
    limits: Mapping[str, int] = MappingProxyType({})
    tokenizer: Any = None
    tokenizer_path: Path | None = None
    tokenizer_record: Mapping[str, Any] = MappingProxyType({})
    folder: Path | None = None
    providers: Sequence[Any] = ()
    prefix: Any = None  # a P-tuning prefix (glm_runtime.prefix.Prefix), loaded by the session that has one

    def fits(self, batch: int, seq: int, past: int) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ManifestError("this session was closed; open the model again (open_session / open_model)")

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- feed checking (shared by every backend)


def _dtype_and_shape(value: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(value, np.ndarray):
        return value.dtype.name, tuple(value.shape)
    if hasattr(value, "data_type") and callable(getattr(value, "shape", None)):  # onnxruntime.OrtValue
        return ORT_TYPES.get(value.data_type(), value.data_type()), tuple(value.shape())
    if hasattr(value, "dtype") and isinstance(getattr(value, "shape", None), tuple):  # a device array (TensorRT)
        return np.dtype(value.dtype).name, tuple(value.shape)
    raise FeedError(
        f"a feed must be a numpy array, an onnxruntime OrtValue or a device array with .dtype and "
        f".shape, got {type(value).__name__}"
    )


def host_array(value: Any) -> np.ndarray:
    """A backend's output as a host numpy array (an OrtValue, a TensorRT DeviceArray or numpy itself)."""
    return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)


def check_feeds(feeds: Mapping[str, Any], inputs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Check names, dtypes, ranks and shapes against the IO table; returns the bound symbolic dims.

    Symbolic dims must agree across inputs (one `batch`), and total_seq must equal past_seq + seq.
    """
    expected = {entry["name"]: entry for entry in inputs}
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise FeedError(f"unknown input {unknown[0]!r}; the graph takes {sorted(expected)}")
    missing = [name for name, entry in expected.items() if name not in feeds and "default" not in entry]
    if missing:
        raise FeedError(f"missing input {missing[0]!r} (the graph needs all of {sorted(expected)})")
    dims: dict[str, int] = {}
    for name, entry in expected.items():
        if name not in feeds:
            continue  # an optional input left at its default
        dtype, shape = _dtype_and_shape(feeds[name])
        want = entry["shape"]
        if dtype != entry["dtype"]:
            raise FeedError(f"input {name!r} must be {entry['dtype']}, got {dtype}")
        if len(shape) != len(want):
            raise FeedError(f"input {name!r} must have rank {len(want)} {want}, got shape {list(shape)}")
        for axis, (size, dim) in enumerate(zip(shape, want)):
            if isinstance(dim, int):
                if size != dim:
                    raise FeedError(
                        f"input {name!r} must have size {dim} on axis {axis} (shape {want}), got shape {list(shape)}"
                    )
            elif dims.setdefault(dim, size) != size:
                raise FeedError(
                    f"input {name!r} has {dim}={size} on axis {axis}, but another input set "
                    f"{dim}={dims[dim]}; every input must agree"
                )
    if {"seq", "past_seq", "total_seq"} <= set(dims) and dims["total_seq"] != dims["past_seq"] + dims["seq"]:
        raise FeedError(
            f"input 'attention_mask' must have past_seq + seq = {dims['past_seq']} + {dims['seq']} "
            f"columns, got {dims['total_seq']}"
        )
    return dims


def check_export(folder: Path, manifest: Manifest, staging: bool = False) -> tuple[GLMConfig, Path | None]:
    """The manifest's parts must agree: config parses, IO table is the config's, tokenizer file is hashed, every
    file the artifact reads is hashed and the parity record is there (manifest.check_complete)."""
    check_complete(folder, manifest, staging=staging)
    try:
        config = GLMConfig.from_dict(manifest.config)
    except ConfigError as exc:
        raise ManifestError(f"{folder}/manifest.json has an invalid config: {exc}") from None
    if not manifest.io:
        raise ManifestError(f"{folder}/manifest.json has no IO table; re-export the model")
    tables = accepted_tables(config, manifest.precision)
    for key in ("inputs", "outputs", "kv_patterns"):
        if all(manifest.io.get(key) != expected[key] for expected in tables):
            raise ManifestError(
                f"{folder}/manifest.json: the IO table's {key} do not match its config "
                f"({config.num_layers} layers, {config.num_attention_heads} heads, precision "
                f"{manifest.precision}); the manifest was edited or is from another model"
            )
    tokenizer_path = None
    name = manifest.tokenizer.get("file")
    if name:
        tokenizer_path = folder / name
        if name not in manifest.files:
            raise ManifestError(f"{folder}/manifest.json names tokenizer {name!r} but does not hash it")
        sha = manifest.tokenizer.get("sha256")
        if sha and sha != manifest.files[name]:
            raise ManifestError(
                f"{folder}/manifest.json: tokenizer {name!r} has sha256 {sha[:12]}... in its "
                f"tokenizer entry but {manifest.files[name][:12]}... in its file list"
            )
    return config, tokenizer_path
