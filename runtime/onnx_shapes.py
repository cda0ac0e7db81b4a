"""The shapes of named initializers of an ONNX file, read from its protobuf wire format without the onnx package
(the runtime does not depend on it) and without reading any tensor's data: what a session checks the manifest's
config against (backend.check_export: the position tables' rows against max_sequence_length).

In: a model.onnx path and the initializer names wanted. Out: {name: dims} of those found; {} where the file cannot be
read this way (the session's own load then says what is wrong). Field numbers are onnx.proto's: ModelProto.graph 7,
GraphProto.initializer 5, TensorProto.dims 1 and name 8.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_DIMS, TENSOR_NAME = 7, 5, 1, 8
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field, wire type, value or start, end) of each field of one message; a length-delimited field's bytes
    are buf[start:end] (not read: a tensor's data is skipped)."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, i = _varint(buf, i)
            yield field, wire, value, i
        elif wire == LENGTH:
            n, i = _varint(buf, i)
            yield field, wire, i, i + n
            i += n
        elif wire in (FIXED64, FIXED32):
            i += 8 if wire == FIXED64 else 4
        else:
            raise ValueError(f"wire type {wire} (groups) does not occur in an ONNX model")
    if i != end:
        raise ValueError("a field runs past the end of its message")


def _tensor(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int, ...]]:
    name, dims = "", []
    for field, wire, a, b in _fields(buf, start, end):
        if field == TENSOR_NAME and wire == LENGTH:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == TENSOR_DIMS and wire == VARINT:
            dims.append(a)
        elif field == TENSOR_DIMS and wire == LENGTH:  # packed
            i = a
            while i < b:
                d, i = _varint(buf, i)
                dims.append(d)
    return name, tuple(dims)


def initializer_shapes(model_file: str | os.PathLike, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """{name: dims} of the wanted initializers found in the graph (with or without external data)."""
    wanted, found = set(names), {}
    try:
        with open(model_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            buf = memoryview(data)
            try:
                for field, wire, a, b in _fields(buf, 0, len(buf)):
                    if field != MODEL_GRAPH or wire != LENGTH:
                        continue
                    for g_field, g_wire, ga, gb in _fields(buf, a, b):
                        if g_field == GRAPH_INITIALIZER and g_wire == LENGTH:
                            name, dims = _tensor(buf, ga, gb)
                            if name in wanted:
                                found[name] = dims
            finally:
                buf.release()
    except (OSError, ValueError, IndexError):
        return {}  # unreadable, empty (mmap of 0 bytes) or not a protobuf: nothing can be said from here
    return found
