"""Static check of an ONNX graph against TensorRT's ONNX parser support list (no TensorRT needed).

In: an ONNX file (or a folder holding model.onnx). Out: one Finding per node whose op, tensor dtype or
attribute/input combination the parser does not support, per glm_export/data/trt_onnx_support.json
(onnx-tensorrt docs/operators.md for TensorRT 10.15; the file records its source).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, shape_inference

from glm_runtime.manifest import MODEL_FILE

SUPPORT_FILE = Path(__file__).resolve().parent / "data" / "trt_onnx_support.json"
INDEX_TYPES = ("INT32", "INT64")


@dataclass(frozen=True)
class Finding:
    node: str  # node name (or "<model>" for model-level facts)
    op: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.problem}"


@lru_cache(maxsize=1)
def support_list() -> dict[str, Any]:
    return json.loads(SUPPORT_FILE.read_text(encoding="utf-8"))


def _type_name(elem_type: int) -> str:
    """ONNX element type -> the document's type name (FP32, INT64, ...); unknown ones keep their ONNX name."""
    onnx_name = TensorProto.DataType.Name(elem_type)
    return support_list()["dtypes"]["names"].get(onnx_name, onnx_name)


class _Graph:
    """Tensor facts of one (sub)graph: dtype and rank per name, and which names are build-time constants."""

    def __init__(self, graph: onnx.GraphProto, outer: _Graph | None = None):
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.ranks: dict[str, int] = dict(outer.ranks) if outer else {}
        self.consts: dict[str, Any] = dict(outer.consts) if outer else {}  # name -> TensorProto (or None)
        for v in list(graph.input) + list(graph.value_info) + list(graph.output):
            t = v.type.tensor_type
            if t.elem_type:
                self.types[v.name] = t.elem_type
            if t.HasField("shape"):
                self.ranks[v.name] = len(t.shape.dim)
        for init in graph.initializer:
            self.types[init.name], self.ranks[init.name] = init.data_type, len(init.dims)
            self.consts[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                self.consts[node.output[0]] = value
                if value is not None:
                    self.types[node.output[0]], self.ranks[node.output[0]] = value.data_type, len(value.dims)


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _given(names, k: int) -> bool:
    return k < len(names) and names[k] != ""


def _check_node(node: onnx.NodeProto, g: _Graph, rules: dict[str, Any]) -> Iterator[str]:
    """Problems of one default-domain node (empty when the parser supports it)."""
    spec = rules["ops"].get(node.op_type)
    if spec is None:
        yield f"op {node.op_type} is not in TensorRT's ONNX operator list"
        return
    if not spec["supported"]:
        yield f"op {node.op_type} is not supported by TensorRT's ONNX parser" + (
            f" ({spec['note']})" if "note" in spec else ""
        )
        return
    types = spec["types"]
    n_in, n_out = range(len(node.input)), range(len(node.output))
    groups = [
        (node.input, spec.get("data_inputs", list(n_in)), types, "input"),
        (node.output, spec.get("data_outputs", list(n_out)), spec.get("output_types", types), "output"),
        (node.input, spec.get("index_inputs", []), INDEX_TYPES, "index input"),
        (node.output, spec.get("index_outputs", []), INDEX_TYPES, "index output"),
        (node.input, spec.get("int64_inputs", []), ("INT64",), "input"),
        (node.input, spec.get("bool_inputs", []), ("BOOL",), "condition input"),
        (node.output, spec.get("bool_outputs", []), ("BOOL",), "output"),
    ]
    for names, positions, allowed, what in groups:
        for k in positions:
            if _given(names, k) and names[k] in g.types:
                t = _type_name(g.types[names[k]])
                if t not in allowed:
                    yield f"{what} {k} '{names[k]}' is {t}; TensorRT supports {', '.join(allowed)} here"
    for k in spec.get("const_inputs", []):
        if _given(node.input, k) and node.input[k] not in g.consts:
            yield f"input {k} '{node.input[k]}' must be a build-time constant (initializer or Constant)"
    for k in spec.get("zero_inputs", []):
        if _given(node.input, k):
            value = g.consts.get(node.input[k])
            if value is None or np.any(numpy_helper.to_array(value) != 0):
                yield f"input {k} '{node.input[k]}' must be a constant zero (False)"
    for k in spec.get("absent_inputs", []):
        if _given(node.input, k):
            yield f"input {k} '{node.input[k]}' is not supported by TensorRT ({spec.get('note', '')})"
    for k in spec.get("absent_outputs", []):
        if _given(node.output, k):
            yield f"output {k} '{node.output[k]}' is not supported by TensorRT ({spec.get('note', '')})"
    for name in spec.get("absent_attrs", []):
        if _attr(node, name) is not None:
            yield f"attribute {name!r} is not supported by TensorRT"
    for name, value in spec.get("required_attrs", {}).items():
        got = _attr(node, name)
        if got is not None and got != value:
            yield f"attribute {name}={got!r} is not supported (TensorRT needs {value!r})"
    for name, values in spec.get("allowed_attrs", {}).items():
        got = _attr(node, name)
        got = got.decode() if isinstance(got, bytes) else got
        if got is not None and got not in values:
            yield f"attribute {name}={got!r} is not supported (TensorRT allows {values})"
    for name in spec.get("ones_attrs", []):
        got = _attr(node, name)
        if got and any(x != 1 for x in got):
            yield f"attribute {name}={list(got)} is not supported (must be empty or all ones)"
    for k, rank in spec.get("rank_inputs", {}).items():
        k = int(k)
        if _given(node.input, k) and g.ranks.get(node.input[k], rank) != rank:
            yield f"input {k} '{node.input[k]}' has rank {g.ranks[node.input[k]]}; TensorRT needs rank {rank}"


def _check_graph(graph: onnx.GraphProto, rules: dict[str, Any], outer: _Graph | None = None) -> Iterator[Finding]:
    g = _Graph(graph, outer)
    for node in graph.node:
        label = node.name or (node.output[0] if node.output else "<unnamed>")
        if node.domain not in ("", "ai.onnx"):
            yield Finding(
                label,
                f"{node.domain}.{node.op_type}",
                f"custom-domain op {node.op_type} (domain {node.domain!r}) is not an ONNX operator; "
                f"TensorRT parses it only through a plugin of that name",
            )
            continue
        for problem in _check_node(node, g, rules):
            yield Finding(label, node.op_type, problem)
        for a in node.attribute:  # If / Loop / Scan bodies
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _check_graph(sub, rules, g)


def check_trt(onnx_path: str | Path) -> list[Finding]:
    """Every node (and model-level fact) TensorRT's ONNX parser does not support; empty means all parse."""
    path = Path(onnx_path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass an .onnx file or a folder holding {MODEL_FILE}")
    model = onnx.load(str(path), load_external_data=False)  # types and shapes only; weights are not needed
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  an uninferable graph still gets the op and declared-type checks
        pass
    rules = support_list()
    findings = []
    lo, hi = rules["opset"]["min"], rules["opset"]["max"]
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            findings.append(
                Finding(
                    "<model>", "opset", f"default-domain opset {imp.version} is outside the parser's range [{lo}, {hi}]"
                )
            )
    for v in model.graph.input:
        t = _type_name(v.type.tensor_type.elem_type)
        if t not in ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8", "INT8", "FP8"):
            findings.append(Finding("<model>", "input", f"graph input '{v.name}' is {t}, not a TensorRT type"))
    findings.extend(_check_graph(model.graph, rules))
    return findings
