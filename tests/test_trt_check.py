"""The TensorRT ONNX-parser check: exported graphs pass, planted unsupported nodes are found and named."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper

from glm_export.model import GLMModel
from glm_export.onnx_graph import build_model
from glm_export.trt_check import check_trt, support_list
from glm_runtime.config import get_preset


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The exporter's graphs (fp32 / fp16, opset 17 / 18, both GeLUs, attention_scale 2) as files."""
    root = tmp_path_factory.mktemp("trt")
    config = get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    weights = {k: v.numpy() for k, v in GLMModel(config).state_dict().items()}
    out = {}
    for name, cfg, precision, opset in (
        ("fp32", config, "fp32", 17),
        ("fp16", config, "fp16", 17),
        ("variant", config.replace(gelu="erf", attention_scale=2.0), "fp16", 18),
    ):
        path = root / f"{name}.onnx"
        onnx.save(build_model(cfg, weights, precision, opset), str(path))
        out[name] = path
    return out


@pytest.mark.parametrize("name", ["fp32", "fp16", "variant"])
def test_exported_graphs_have_no_findings(graphs, name):
    assert check_trt(graphs[name]) == []


def _planted(path, tmp_path, *nodes, opsets=()):
    model = onnx.load(str(path))
    model.graph.node.extend(nodes)
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets)
    out = tmp_path / "planted.onnx"
    onnx.save(model, str(out))
    return check_trt(out)


@pytest.mark.parametrize(
    "node, opsets, expected",
    [
        (
            helper.make_node("Cast", ["logits"], ["l64"], name="planted", to=TensorProto.DOUBLE),
            (),
            "planted (Cast): output 0 'l64' is DOUBLE; "
            "TensorRT supports FP32, FP16, BF16, INT32, INT64, UINT8, BOOL here",
        ),
        (
            helper.make_node("MatMulNBits", ["logits", "logits"], ["q"], name="planted", domain="com.microsoft"),
            (("com.microsoft", 1),),
            "planted (com.microsoft.MatMulNBits): custom-domain op MatMulNBits",
        ),
        (
            helper.make_node("MatMulInteger", ["input_ids", "input_ids"], ["mi"], name="planted"),
            (),
            "planted (MatMulInteger): op MatMulInteger is not supported by TensorRT's ONNX parser",
        ),
        (
            helper.make_node("DynamicQuantizeLinear", ["logits"], ["y", "s", "z"], name="planted"),
            (),
            "planted (DynamicQuantizeLinear): op DynamicQuantizeLinear is not supported",
        ),
    ],
)
def test_planted_unsupported_node_is_found_and_named(graphs, tmp_path, node, opsets, expected):
    findings = _planted(graphs["fp16"], tmp_path, node, opsets=opsets)
    assert len(findings) == 1, findings
    assert str(findings[0]).startswith(expected)


def _tiny_graph(tmp_path, nodes, inits=(), opset=17, in_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", in_type, [2, 4])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.UNDEFINED, None)],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return [str(f) for f in check_trt(path)]


def test_attribute_and_input_restrictions(tmp_path):
    ln = [numpy_helper.from_array(np.ones(4, np.float32), "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    found = _tiny_graph(
        tmp_path, [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "mean"], name="ln")], ln
    )
    assert found == [
        "ln (LayerNormalization): output 1 'mean' is not supported by TensorRT (only the first output `Y` is supported)"
    ]
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    found = _tiny_graph(tmp_path, [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0)], [k])
    assert found == ["topk (TopK): attribute sorted=0 is not supported (TensorRT needs 1)"]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    found = _tiny_graph(
        tmp_path,
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Slice", ["s", "axes", "axes"], ["ax"], name="slice"),
            helper.make_node("Unsqueeze", ["x", "ax"], ["y"], name="unsq"),
        ],
        [axes],
    )
    assert found == ["unsq (Unsqueeze): input 1 'ax' must be a build-time constant (initializer or Constant)"]


def test_quantize_dequantize_zero_points(tmp_path):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zp")
    three = numpy_helper.from_array(np.array(3, np.int8), "zp3")
    ok = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq"),
    ]
    assert _tiny_graph(tmp_path, ok, [scale, zero]) == []
    bad = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp3"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp3"], ["y"], name="dq"),
    ]
    assert _tiny_graph(tmp_path, bad, [scale, three]) == [
        "q (QuantizeLinear): input 2 'zp3' must be a constant zero (False)",
        "dq (DequantizeLinear): input 2 'zp3' must be a constant zero (False)",
    ]
    # int8 outside Q/DQ: TensorRT's quantized types come only from quantizing a wider float
    found = _tiny_graph(tmp_path, ok[:1] + [helper.make_node("Relu", ["q"], ["y"], name="relu")], [scale, zero])
    assert found == [
        "relu (Relu): input 0 'q' is INT8; TensorRT supports FP32, FP16, BF16, INT32, INT64 here",
        "relu (Relu): output 0 'y' is INT8; TensorRT supports FP32, FP16, BF16, INT32, INT64 here",
    ]


def test_float64_input_and_opset_range(tmp_path):
    found = _tiny_graph(
        tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")], opset=8, in_type=TensorProto.DOUBLE
    )
    assert found[0] == "<model> (opset): default-domain opset 8 is outside the parser's range [9, 24]"
    assert "<model> (input): graph input 'x' is DOUBLE, not a TensorRT type" in found
    assert "relu (Relu): input 0 'x' is DOUBLE; TensorRT supports FP32, FP16, BF16, INT32, INT64 here" in found


def test_support_list_states_its_source():
    data = support_list()
    assert data["source"]["tensorrt_version"].startswith("10.")
    assert "onnx-tensorrt" in data["source"]["document"] and data["opset"] == {"min": 9, "max": 24}
    ops = data["ops"]
    for op in (
        "Gather",
        "MatMul",
        "Gemm",
        "Add",
        "Mul",
        "Sub",
        "Div",
        "Softmax",
        "LayerNormalization",
        "Cast",
        "Concat",
        "Reshape",
        "Transpose",
        "Where",
        "Tanh",
        "Erf",
        "Pow",
        "Shape",
        "Slice",
        "Split",
        "Unsqueeze",
        "QuantizeLinear",
        "DequantizeLinear",
        "Gelu",
        "Attention",
        "ReduceMax",
    ):
        assert ops[op]["supported"], op
    for op in ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "ConvInteger"):
        assert not ops[op]["supported"], op
    assert "MatMulNBits" not in ops  # a com.microsoft op: never in the ONNX operator list
    assert "DOUBLE" not in {t for o in ops.values() for t in o.get("types", [])}
    assert ops["Where"]["bool_inputs"] == [0] and "BOOL" in ops["Not"]["types"] and "INT64" in ops["Gather"]["types"]


def test_cli_check_trt_exit_status(graphs, tmp_path):
    from click.testing import CliRunner

    from glm_export.cli import main

    ok = CliRunner().invoke(main, ["check-trt", str(graphs["fp16"])])
    assert ok.exit_code == 0 and "ok: every node is supported by TensorRT 10." in ok.output
    _planted(
        graphs["fp32"],
        tmp_path,
        helper.make_node("MatMulInteger", ["input_ids", "input_ids"], ["mi"], name="planted_mmi"),
    )
    bad = CliRunner().invoke(main, ["check-trt", str(tmp_path / "planted.onnx")])
    assert bad.exit_code == 1
    assert "planted_mmi (MatMulInteger)" in bad.output and "1 finding(s)" in bad.output
