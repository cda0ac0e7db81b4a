"""What a session checks of an ONNX graph before ONNX Runtime loads it, read from model.onnx's protobuf without
the onnx package: its ops and weights against the manifest's precision, its initializers' shapes against the
manifest's config (the position tables' rows against max_sequence_length): session.check_graph.

In: a model.onnx (ModelProto; its weights inline or in external data). Out: `graph_facts` (op types, MatMulNBits bit
widths, whether float16 weights are there, every initializer's dims) and `precision_problem`,
one line saying why the graph is not of a precision (None when it is).

ONNX Runtime's session lists no ops, and onnx is optional in the runtime, so this reads the few fields it needs
from the protobuf wire format itself (ModelProto.graph = 7; GraphProto.node = 1, initializer = 5; NodeProto
op_type = 4, attribute = 5; AttributeProto name = 1, i = 3, t = 5; TensorProto dims = 1, data_type = 2, name = 8),
over a memory map: inline weights (raw_data) are skipped by their length, never read.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

FLOAT16 = 10  # TensorProto.DataType.FLOAT16
QUANT_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear")


class GraphReadError(ValueError):
    """model.onnx is not a protobuf this reader can walk (truncated, or not ONNX)."""


def _varint(buf: mmap.mmap | bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, end) of each field of the message buf[start:end]: a varint's value (wire
    type 0), or a length-delimited field's start offset (wire type 2; `end` is its end); fixed-width fields are
    skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, wire, value, i
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > end:
                raise GraphReadError("a field runs past the end of its message")
            yield number, wire, i, i + length
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise GraphReadError(f"wire type {wire} is not used by ONNX")


@dataclass
class GraphFacts:
    ops: set[str] = field(default_factory=set)  # op types of the main graph's nodes
    nbits: set[int] = field(default_factory=set)  # the `bits` of its MatMulNBits nodes
    float16: bool = False  # a float16 initializer (or Constant) is there
    initializers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> dims


def _node(buf: mmap.mmap, start: int, end: int, facts: GraphFacts) -> None:
    op, bits = "", 4  # MatMulNBits' bits default to 4
    for number, _, value, stop in _fields(buf, start, end):
        if number == 4:
            op = bytes(buf[value:stop]).decode("utf-8", "replace")
        elif number == 5:  # an attribute: bits, or a Constant's tensor
            name, ints = "", None
            for a_number, _, a_value, a_stop in _fields(buf, value, stop):
                if a_number == 1:
                    name = bytes(buf[a_value:a_stop]).decode("utf-8", "replace")
                elif a_number == 3:
                    ints = a_value
                elif a_number == 5:
                    _tensor(buf, a_value, a_stop, facts)
            if name == "bits" and ints is not None:
                bits = ints
    facts.ops.add(op)
    if op == "MatMulNBits":
        facts.nbits.add(bits)


def _tensor(buf: mmap.mmap, start: int, end: int, facts: GraphFacts, initializer: bool = False) -> None:
    name, dims = "", []
    for number, wire, value, stop in _fields(buf, start, end):
        if number == 2 and value == FLOAT16:
            facts.float16 = True
        elif number == 1 and wire == 0:  # dims, one varint each
            dims.append(value)
        elif number == 1:  # dims, packed
            i = value
            while i < stop:
                d, i = _varint(buf, i)
                dims.append(d)
        elif number == 8:
            name = bytes(buf[value:stop]).decode("utf-8", "replace")
    if initializer:
        facts.initializers[name] = tuple(dims)


def graph_facts(model_file: str | os.PathLike) -> GraphFacts:
    """The op types, MatMulNBits widths and float16 weights of a model.onnx's main graph."""
    facts = GraphFacts()
    with open(model_file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            for number, _, start, end in _fields(buf, 0, len(buf)):
                if number != 7:
                    continue
                for g_number, _, g_start, g_end in _fields(buf, start, end):
                    if g_number == 1:
                        _node(buf, g_start, g_end, facts)
                    elif g_number == 5:
                        _tensor(buf, g_start, g_end, facts, initializer=True)
        except IndexError:
            raise GraphReadError("the file ends inside a field") from None
    return facts


def precision_problem(facts: GraphFacts, precision: str) -> str | None:
    """Why a graph with these facts is not of `precision` (the manifest's), or None. int4-weight / int8-weight:
    MatMulNBits of 4 / 8 bits; int8-dynamic: DynamicQuantizeLinear and MatMulInteger; qdq-int8: QuantizeLinear and
    DequantizeLinear; fp16: float16 weights and no quantized op; fp32: neither quantized ops nor float16 weights."""
    quant = sorted(op for op in QUANT_OPS if op in facts.ops)
    wants = {
        "int4-weight": ("MatMulNBits with bits=4", 4 in facts.nbits),
        "int8-weight": ("MatMulNBits with bits=8", 8 in facts.nbits),
        "int8-dynamic": (
            "DynamicQuantizeLinear and MatMulInteger",
            {"DynamicQuantizeLinear", "MatMulInteger"} <= facts.ops,
        ),
        "qdq-int8": ("QuantizeLinear and DequantizeLinear", {"QuantizeLinear", "DequantizeLinear"} <= facts.ops),
        "fp16": ("float16 weights", facts.float16),
    }
    if precision in wants:
        what, present = wants[precision]
        if not present:
            has = f" (it has {', '.join(quant)})" if quant else ""
            return f"the graph has no {what}, so it is not {precision}{has}"
        if precision == "fp16" and quant:
            return f"the graph has {', '.join(quant)}, so it is not fp16"
        return None
    if precision == "fp32" and (quant or facts.float16):
        found = quant + (["float16 weights"] if facts.float16 else [])
        return f"the graph has {', '.join(found)}, so it is not fp32"
    return None
