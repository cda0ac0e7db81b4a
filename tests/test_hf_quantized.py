"""glm_export.hf_quantized: the released chatglm-6b-int8/-int4 layout, and its integers carried into ONNX Runtime's
MatMulNBits bit for bit (offset, nibble order and block split checked against onnxruntime itself)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from glm_export.hf_quantized import (
    QuantizedCheckpointError,
    check_layout,
    dequantize,
    pack_int4,
    quantize_rows,
    to_matmulnbits,
    unpack_int4,
)
from glm_runtime.errors import GLMXError

U = 2.0**-24  # float32's unit roundoff


def released(bits: int, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight, scale, q) of a released-format linear made by the Hugging Face recipe from random float weights."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.2, (n, 1))).astype(np.float16)
    weight, scale = quantize_rows(w, bits)
    q = unpack_int4(weight) if bits == 4 else weight
    return weight, scale, q


def matmulnbits_session(packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int):
    """A one-node graph Y = A @ W.T with W as MatMulNBits (no zero_points: the implied one), on the CPU."""
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block
    )
    graph = helper.make_graph(
        [node],
        "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def decode_matmulnbits(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' integers, read independently of the module: low nibble first (4 bits), minus 2^(bits-1)."""
    flat = packed.reshape(packed.shape[0], -1).astype(np.int16)
    if bits == 4:
        flat = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(flat.shape[0], -1)
    return (flat - (1 << (bits - 1)))[:, :k]


def test_pack_unpack_round_trip_covers_the_whole_signed_range():
    rng = np.random.default_rng(1)
    q = rng.permutation(np.tile(np.arange(-8, 8), 24)).reshape(3, 128).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.int8 and packed.shape == (3, 64)
    assert np.array_equal(unpack_int4(packed), q)
    assert np.array_equal(pack_int4(unpack_int4(packed)), packed)
    # the published order: high nibble = the even column; -8 is 0x8, 7 is 0x7, -1 is 0xF
    assert pack_int4(np.array([[-8, 7], [7, -8], [-1, 0]])).view(np.uint8).ravel().tolist() == [0x87, 0x78, 0xF0]


def test_quantize_rows_matches_the_hand_computed_recipe():
    # int4, scale max|row|/7: 3.5/7 = 0.5 and 7/7 = 1; W/scale = [7, -2.5, 0.5, 1.5] rounds half to even
    weight, scale = quantize_rows(np.array([[3.5, -1.25, 0.25, 0.75], [-7.0, 3.0, 0.5, -0.5]]), 4)
    assert scale.dtype == np.float16 and scale.tolist() == [0.5, 1.0]
    assert unpack_int4(weight).tolist() == [[7, -2, 0, 2], [-7, 3, 0, 0]]
    assert weight.view(np.uint8).tolist() == [[0x7E, 0x02], [0x93, 0x00]]  # (7,-2)->7|E, (0,2), (-7,3)->9|3
    # int8: 1/127 = 0.0078740..., as fp16 1032 * 2^-17 = 0.00787353515625; 0.3/that = 38.10 -> 38, 1/that = 127.007
    q, scale = quantize_rows(np.array([[1.0, 0.3, 0.0, -0.3]], dtype=np.float32), 8)
    assert scale.tolist() == [1032 * 2.0**-17]
    assert q.dtype == np.int8 and q.tolist() == [[127, 38, 0, -38]]
    assert quantize_rows(np.zeros((2, 4), np.float16), 4)[0].tolist() == [[0, 0], [0, 0]]  # an all-zero row


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 256])
def test_matmulnbits_carries_the_released_integers_exactly(bits, k):
    n = 48
    weight, scale, q = released(bits, n, k, seed=k + bits)
    packed, scales, block = to_matmulnbits(weight, scale, bits)
    assert block == k and packed.shape == (n, 1, k * bits // 8) and packed.dtype == np.uint8
    assert scales.dtype == np.float32 and np.array_equal(scales, scale.astype(np.float32))
    assert np.array_equal(decode_matmulnbits(packed, bits, k), q)  # bit-exact, read independently
    session = matmulnbits_session(packed, scales, k, n, bits, block)
    w = dequantize(weight, scale, bits)
    assert np.array_equal(w, q.astype(np.float64) * scale.astype(np.float64)[:, None])  # exact in float32
    # the identity's rows pick single weights: ONNX Runtime returns every q * scale bit for bit
    assert np.array_equal(session.run(None, {"A": np.eye(k, dtype=np.float32)})[0], w.T)
    # random activations: the dequantized weights are exact, so the only error is float32 accumulation over K,
    # at most gamma_K = K*u/(1-K*u) times sum |x_i w_i| for each of ORT and numpy (Higham, Thm 3.1): 2 gamma_K
    x = np.random.default_rng(7).standard_normal((5, k)).astype(np.float32)
    y = session.run(None, {"A": x})[0]
    bound = 2 * (k * U / (1 - k * U)) * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64))
    assert np.all(np.abs(y.astype(np.float64) - (x @ w.T).astype(np.float64)) <= bound)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_layout_is_the_one_onnxruntime_quantizer_writes(bits):
    """Rows whose extreme is the most negative integer: ONNX Runtime's own symmetric quantizer then picks the
    released scale and writes the same bytes as to_matmulnbits (offset 2^(bits-1), low nibble first)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k, lo = 8, 64, -(1 << (bits - 1))
    rng = np.random.default_rng(3)
    q = rng.integers(lo + 1, -lo, size=(n, k)).astype(np.int8)
    q[np.arange(n), rng.integers(0, k, n)] = lo
    scale = rng.uniform(0.01, 0.1, n).astype(np.float16)
    weight = pack_int4(q) if bits == 4 else q
    packed, scales, block = to_matmulnbits(weight, scale, bits)
    ort_packed = np.zeros_like(packed)
    ort_scales = np.zeros(n, dtype=np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    w_kn = np.ascontiguousarray(dequantize(weight, scale, bits).T)
    quantize(ort_packed, w_kn, ort_scales, np.zeros((n, 1), np.uint8), block, n, k, True)
    assert np.array_equal(ort_scales, scales) and np.array_equal(ort_packed, packed)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_long_row_splits_into_blocks_with_its_scale_repeated(bits):
    n, k = 6, 160  # not a power of two: blocks of 32 (the limit given) with the tail of the last one padded
    weight, scale, q = released(bits, n, k, seed=11)
    packed, scales, block = to_matmulnbits(weight, scale, bits, max_block_size=32)
    assert block == 32 and packed.shape == (n, 5, 32 * bits // 8)
    assert np.array_equal(scales, np.repeat(scale.astype(np.float32), 5))
    assert np.array_equal(decode_matmulnbits(packed, bits, k), q)
    packed, scales, block = to_matmulnbits(weight, scale, bits)  # one block of 256, padded from 160
    assert block == 256 and np.array_equal(decode_matmulnbits(packed, bits, 256)[:, k:], np.zeros((n, 96)))
    session = matmulnbits_session(packed, scales, k, n, bits, block)
    assert np.array_equal(session.run(None, {"A": np.eye(k, dtype=np.float32)})[0], dequantize(weight, scale, bits).T)


def test_the_default_block_is_portable_to_the_cuda_kernel():
    weight, scale, _ = released(8, 2, 4096)
    assert to_matmulnbits(weight, scale, 8)[2] == 1024
    assert to_matmulnbits(weight, scale, 8, max_block_size=4096)[2] == 4096
    weight, scale, _ = released(4, 2, 4096)
    assert to_matmulnbits(weight, scale, 4)[2] == 2048


def _one_line_error(call, *needles: str) -> None:
    with pytest.raises(QuantizedCheckpointError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(s in message for s in needles), message
    assert isinstance(caught.value, GLMXError) and isinstance(caught.value, ValueError)


def test_layout_errors_are_one_line_and_name_the_linear():
    name = "transformer.layers.0.mlp.dense_4h_to_h"
    weight, scale, _ = released(4, 8, 32)
    check_layout(name, weight, scale, 4, 32, 8)  # fits
    _one_line_error(lambda: check_layout(name, weight, scale, 4, 64, 8), name, "[8, 32]", "[8, 16]")
    _one_line_error(lambda: check_layout(name, np.zeros((8, 32), np.int8), scale, 4, 32, 8), "[8, 16]")
    _one_line_error(lambda: check_layout(name, weight.view(np.uint8), scale, 4, 32, 8), "int8", "uint8")
    _one_line_error(lambda: check_layout(name, weight, scale.astype(np.float32), 4, 32, 8), "float16", "float32")
    _one_line_error(lambda: check_layout(name, weight, scale[:7], 4, 32, 8), "[8]", "[7]")
    _one_line_error(lambda: check_layout(name, weight, scale, 4, 31, 8), "31")
    _one_line_error(lambda: check_layout(name, weight, scale, 3, 32, 8), "bits")
    _one_line_error(lambda: to_matmulnbits(weight, scale[:4], 4), "weight_scale")
    _one_line_error(lambda: to_matmulnbits(weight, scale, 4, max_block_size=24), "max_block_size")
    _one_line_error(lambda: pack_int4(np.array([[8, 0]])), "[-8, 7]")
    _one_line_error(lambda: quantize_rows(np.array([[np.inf, 0.0]]), 8), "inf")
