"""glmx_benchmarks.kernel_rates: the graphs it times compute what a decode step's matmuls compute, in each format."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("onnx")  # the export extra: a runtime-only install skips this module
from onnx import numpy_helper

from glmx_benchmarks import kernel_rates
from glmx_benchmarks.artifacts import model_config


@pytest.fixture(scope="module")
def tiny():
    config = model_config("tiny").replace(hidden_size=256, num_attention_heads=4)  # 2 layers, blocks to quantize
    return config, kernel_rates.matmul_graph(config)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_fp32_graph_is_every_layer_matmul_of_one_token(tiny):
    config, model = tiny
    h = config.hidden_size
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [w.shape for w in (weights[f"w0_{k}"] for k in range(4))] == kernel_rates.layer_shapes(config)
    assert len(weights) == 4 * config.num_layers
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((1, 1, h)).astype(np.float32),
        "x4": rng.standard_normal((1, 1, 4 * h)).astype(np.float32),
    }
    out = _run(model, feeds)
    want = feeds["x4"] @ weights[f"w{config.num_layers - 1}_3"]
    np.testing.assert_allclose(out[-1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fmt, op, rel_err", [("int8-dynamic", "MatMulInteger", 0.10), ("int4-weight", "MatMulNBits", 0.15)]
)
def test_quantized_graphs_use_the_schemes_kernel_and_stay_close(tiny, tmp_path, fmt, op, rel_err):
    """Relative error of the outputs against fp32: int8 per-channel weights and uint8 per-tensor activations within 10%,
    int4 blocks of 32 within 15% (both far above what a wrong graph or wrong weights would give, ~100%)."""
    config, model = tiny
    q = kernel_rates.quantized(model, fmt, tmp_path)
    assert any(n.op_type == op for n in q.graph.node)
    assert kernel_rates.weight_bytes(q) < kernel_rates.weight_bytes(model) / (3 if fmt == "int8-dynamic" else 5)
    rng = np.random.default_rng(1)
    h = config.hidden_size
    feeds = {
        "x": rng.standard_normal((1, 1, h)).astype(np.float32),
        "x4": rng.standard_normal((1, 1, 4 * h)).astype(np.float32),
    }
    got, want = (np.concatenate([y.ravel() for y in _run(m, feeds)]) for m in (q, model))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < rel_err


def test_kernel_rate_times_a_session(tiny):
    assert 0 < kernel_rates.kernel_rate(tiny[1], threads=1, repeats=3) < 5.0
