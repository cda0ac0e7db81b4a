"""Weights read one tensor at a time: what lets glmx export and quantize a model larger than its memory.

In: checkpoint files (safetensors, torch pickles, Megatron shards) or an exported ONNX folder. Out: `Weights`, a
read-only mapping name -> numpy array whose shapes and dtypes are known from the files' headers and whose data is
read only when a tensor is asked for, once, and dropped by the caller after use. Nothing here holds a model.

Why not one memory map of the whole file: every page of a mapping that was touched counts in the process's
resident set until the file is unmapped, so mapping a 20 GB checkpoint and touching each tensor in turn ends with
20 GB resident. A safetensors tensor is therefore read with one `readinto` at its header offset into its own
array; a pickled one (torch.load(mmap=True, weights_only=True)) is mapped by torch and copied out, and its
touched pages stay mapped until the file is closed (file-backed, reclaimable; the scale benchmark reports it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.errors import GLMXError

SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bfloat16",
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightsError(GLMXError, ValueError):
    """A weight file cannot be read: truncated, corrupt, or a tensor holding NaN or inf."""


class Entry:
    """One tensor: its shape, its dtype in the file ('bfloat16' for bf16), and how to read it."""

    __slots__ = ("shape", "dtype", "read", "where")

    def __init__(self, shape: Sequence[int], dtype: Any, read: Callable[[], np.ndarray], where: str):
        self.shape, self.dtype, self.read, self.where = tuple(int(s) for s in shape), dtype, read, where

    @property
    def nbytes(self) -> int:
        itemsize = 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize


class Weights(Mapping):
    """name -> numpy array, read from the files on each access (callers keep what they need, once).

    Float tensors are checked for NaN / inf as they are read: the error names the tensor and the file.
    bf16 tensors are returned as float32 (numpy has no bf16).
    """

    error: type = WeightsError  # what a bad tensor raises (glm_export.checkpoint sets CheckpointError)

    def __init__(self, entries: Mapping[str, Entry], files: Sequence[Path] = (), closers: Sequence = ()):
        self._entries = dict(entries)
        self.files = tuple(files)
        self._closers = list(closers)

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        array = entry.read()
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                bad = int(array.size - np.count_nonzero(finite))
                raise self.error(
                    f"{entry.where}: {key} holds {bad} NaN or inf value(s) of {array.size}: the "
                    f"checkpoint is corrupt or its training diverged; use an earlier checkpoint"
                )
        return array

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: str) -> Entry:
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype_name(self, key: str) -> str:
        d = self._entries[key].dtype
        return d if isinstance(d, str) else np.dtype(d).name

    def numel(self) -> int:
        """Values in all tensors (from the headers; nothing is read)."""
        return sum(int(np.prod(e.shape, dtype=np.int64)) for e in self._entries.values())

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def largest(self) -> int:
        return max((e.nbytes for e in self._entries.values()), default=0)

    def renamed(self, names: Mapping[str, str]) -> Weights:
        """A view under new names (old -> new); keys not in `names` are dropped."""
        view = Weights({new: self._entries[old] for old, new in names.items()}, self.files, self._closers)
        view.error = self.error
        return view

    def mapped(self, keys: Sequence[str], fn: Callable[[np.ndarray], np.ndarray]) -> Weights:
        """A view where each of `keys` is read through fn (same shape and dtype, e.g. a row reordering)."""
        entries = dict(self._entries)
        for key in keys:
            e = entries[key]
            entries[key] = Entry(e.shape, e.dtype, (lambda e=e: fn(e.read())), e.where)
        view = Weights(entries, self.files, self._closers)
        view.error = self.error
        return view

    def derived(self, new: Mapping[str, tuple[Sequence[int], Any, Callable[[], np.ndarray]]]) -> Weights:
        """A view with these entries (name -> (shape, dtype, read)) added or replaced, e.g. a dequantized weight."""
        entries = dict(self._entries)
        where = self.files[0] if self.files else "the model"
        for key, (shape, dtype, read) in new.items():
            entries[key] = Entry(shape, dtype, read, self._entries[key].where if key in self._entries else str(where))
        view = Weights(entries, self.files, self._closers)
        view.error = self.error
        return view

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    @classmethod
    def merged(cls, parts: Sequence[Weights]) -> Weights:
        entries: dict[str, Entry] = {}
        for part in parts:
            entries.update(part._entries)
        return cls(entries, [f for p in parts for f in p.files], [c for p in parts for c in p._closers])

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], where: str = "the model") -> Weights:
        """In-memory tensors (a state dict of torch tensors or numpy arrays) behind the same interface."""
        entries = {}
        for name, value in arrays.items():
            entries[name] = Entry(tuple(value.shape), dtype_of(value), (lambda v=value: to_numpy(v)), where)
        return cls(entries)


def dtype_of(value: Any) -> Any:
    if hasattr(value, "numpy"):  # a torch tensor
        import torch

        return "bfloat16" if value.dtype == torch.bfloat16 else np.dtype(str(value.dtype).replace("torch.", ""))
    return np.asarray(value).dtype


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "numpy"):
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy().copy()  # a copy: never a view into a mapped file or a live module
    return np.asarray(value)


# ---------------------------------------------------------------- safetensors: the header, then one read per tensor


def read_safetensors(path: Path) -> Weights:
    """Every tensor of a .safetensors file, read on access with one readinto at its offset (format: 8-byte
    little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            size = path.stat().st_size
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file's {size} bytes")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise WeightsError(
            f"cannot read {path}: the file is truncated or corrupt ({type(exc).__name__}: {exc}); "
            f"re-download or re-save it"
        ) from None
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(s) for s in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(
                f"cannot read {path}: tensor {name!r} has an unsupported or malformed header entry {info}"
            ) from None
        entry = Entry(shape, dtype, lambda: None, str(path))
        if entry.nbytes != end - begin or base + end > size:
            raise WeightsError(
                f"cannot read {path}: the file is truncated or corrupt (tensor {name!r} "
                f"{info['dtype']} {shape} does not fit bytes {begin}..{end} of the {size - base} "
                f"after the header); re-download or re-save it"
            )
        entry.read = lambda p=path, o=base + begin, e=entry: _read_range(p, o, e)
        entries[name] = entry
    return Weights(entries, [path])


def _read_range(path: Path, offset: int, entry: Entry) -> np.ndarray:
    raw = np.empty(entry.nbytes, dtype=np.uint8)
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(memoryview(raw)) != entry.nbytes:
            raise WeightsError(f"{path} ended inside a tensor: the file is truncated; re-download it")
    if entry.dtype == "bfloat16":  # bf16 is the top half of an fp32
        wide = np.zeros(raw.size // 2, dtype=np.uint32)
        wide[:] = raw.view("<u2")
        return (wide << 16).view(np.float32).reshape(entry.shape)
    return raw.view(np.dtype(entry.dtype).newbyteorder("<")).reshape(entry.shape).astype(entry.dtype, copy=False)


# ---------------------------------------------------------------- an exported ONNX folder's initializers


def read_onnx_weights(model_path: Path, graph: Any | None = None) -> Weights:
    """The initializers of an ONNX file (loaded without its external data), read on access: external ones from
    their data file at their offset, inline ones from the graph. Names are the graph's own."""
    import onnx
    from onnx import numpy_helper

    if graph is None:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    folder = model_path.parent
    entries = {}
    for t in graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            entry = Entry(t.dims, dtype, lambda: None, str(folder / info["location"]))
            entry.read = lambda p=folder / info["location"], o=int(info.get("offset", 0)), e=entry: _read_range(p, o, e)  # noqa: B008 - the defaults bind this tensor's file and offset now
        else:
            entry = Entry(t.dims, dtype, (lambda t=t: numpy_helper.to_array(t)), str(model_path))
        entries[t.name] = entry
    return Weights(entries, [model_path])


def official_weights(graph_weights: Weights) -> Weights:
    """A glmx graph's weights under the checkpoint's official names: `<name>.weight.T` [in, out] is returned as
    `<name>.weight` [out, in] (a transposed view, no copy); graph constants are left out."""
    entries = {}
    for name in graph_weights:
        if name.startswith("const/") or name == "logits_start":
            continue
        e = graph_weights.entry(name)
        if name.endswith(".weight.T"):
            entries[name[:-2]] = Entry(e.shape[::-1], e.dtype, (lambda e=e: e.read().T), e.where)
        else:
            entries[name] = e
    return Weights(entries, graph_weights.files)


# ---------------------------------------------------------------- writing safetensors tensor by tensor

_SAFETENSORS_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even as torch rounds."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(
    path: Path,
    tensors: Sequence[tuple[str, Sequence[int], str]],
    make: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """A .safetensors file written one tensor at a time: the header from (name, shape, dtype name) first, then
    make(name) for each in order, converted to its dtype ('bfloat16' from float32 values)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in tensors:
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": [int(x) for x in shape],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape, dtype in tensors:
            value = np.asarray(make(name))
            if tuple(value.shape) != tuple(int(x) for x in shape):
                raise WeightsError(f"{name}: made a {list(value.shape)} tensor for a {list(shape)} header entry")
            data = (
                to_bf16_bits(value)
                if dtype == "bfloat16"
                else np.ascontiguousarray(value, dtype=np.dtype(dtype).newbyteorder("<"))
            )
            fh.write(memoryview(data).cast("B"))
