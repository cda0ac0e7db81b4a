"""MatMul weights as ONNX Runtime's MatMulNBits (contrib op): how glm_export.onnx_graph stores a quantized linear.
In: float weights [K, N] (quantized here by ONNX Runtime's own routine). Out: packed blocks, scales, the node."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

CONTRIB = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits)


class Released:
    """The integers of a published int4 / int8 checkpoint (chatglm-6b-int4 / -int8): per linear (glmx's name
    prefix) a reader of (weight int8 [out, in * bits / 8], scale fp16 [out]) in glmx's row order."""

    def __init__(self, bits: int, readers: Mapping[str, Callable[[], tuple[np.ndarray, np.ndarray]]]):
        self.bits, self.readers = bits, dict(readers)

    def __contains__(self, prefix: object) -> bool:
        return prefix in self.readers

    def packed(self, prefix: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
        """MatMulNBits' (packed, scales, (K, N, bits, block_size)) of one linear, re-packed without float weights."""
        from glm_export.hf_quantized import to_matmulnbits

        weight, scale = self.readers[prefix]()
        packed, scales, block = to_matmulnbits(weight, scale, self.bits)
        N, K = weight.shape[0], weight.shape[1] * 8 // self.bits
        return packed, scales, (K, N, self.bits, block)


class NBits:
    """MatMul weights stored as ONNX Runtime's MatMulNBits: `bits` (4 or 8) symmetric blocks of `block_size`
    along K, quantized by ONNX Runtime's own C++ routine (quantize_matmul_4bits / _8bits, the one its
    MatMulNBitsQuantizer calls), so the packing is exactly what the kernel reads. `keep(prefix)`: leave that
    linear as a float MatMul. `head`: the tied head as a MatMulNBits of the table's transposed copy, in its own
    format (head_bits, head_block_size; default: the layers' own). mlp_block_size: the block of the MLP's two
    matmuls (2/3 of a layer's weights; default: block_size)."""

    def __init__(
        self,
        bits: int,
        block_size: int,
        accuracy_level: int,
        keep: Callable[[str], bool],
        head: bool = False,
        head_bits: int | None = None,
        head_block_size: int | None = None,
        mlp_block_size: int | None = None,
        released: Released | None = None,
    ):
        for value in (bits, head_bits):
            if value is not None and value not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, got {value}")
        self.bits, self.block_size, self.accuracy_level, self.keep, self.head = (
            bits,
            block_size,
            accuracy_level,
            keep,
            head,
        )
        self.head_bits = bits if head_bits is None else head_bits
        self.head_block_size = block_size if head_block_size is None else head_block_size
        self.mlp_block_size = block_size if mlp_block_size is None else mlp_block_size
        self.released = released  # a published int4/int8 checkpoint's integers, carried over bit for bit

    def block_size_for(self, prefix: str) -> int:
        """The block size of the linear `prefix` (transformer.layers.i.{attention,mlp}.*)."""
        return self.mlp_block_size if ".mlp." in prefix else self.block_size

    def pack(
        self, w_kn: np.ndarray, bits: int | None = None, block_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """[K, N] float -> (packed uint8 [N, K/block, block*bits/8], scales float32 [N * K/block])."""
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

        bits, block_size = bits or self.bits, block_size or self.block_size
        K, N = w_kn.shape
        blocks = -(-K // block_size)
        w = np.zeros((blocks * block_size, N), dtype=np.float32)
        w[:K] = w_kn
        packed = np.zeros((N, blocks, block_size * bits // 8), dtype=np.uint8)
        scales = np.zeros((N, blocks), dtype=np.float32)
        zero_points = np.zeros((N, -(-blocks * bits // 8)), dtype=np.uint8)  # unused: symmetric
        quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
        quantize(packed, w, scales, zero_points, block_size, N, w.shape[0], True)
        return packed, scales.reshape(-1)

    def matmul(
        self,
        b: Any,  # glm_export.onnx_graph.GraphBuilder
        x: str,
        w_kn: np.ndarray,
        name: str,
        node: str,
        bits: int | None = None,
        block_size: int | None = None,
        bias: str | None = None,
    ) -> str:
        """x @ w_kn (+ bias, MatMulNBits' own optional input 5: no separate Add node)."""
        bits, block_size = bits or self.bits, block_size or self.block_size
        K, N = w_kn.shape
        packed, scales = self.pack(w_kn, bits, block_size)
        return self.node(b, x, packed, scales, (K, N, bits, block_size), name, node, bias)

    def node(
        self,
        b: Any,  # glm_export.onnx_graph.GraphBuilder
        x: str,
        packed: np.ndarray,
        scales: np.ndarray,
        shape: tuple[int, int, int, int],
        name: str,
        node: str,
        bias: str | None = None,
    ) -> str:
        """The MatMulNBits node of already packed weights; shape = (K, N, bits, block_size)."""
        K, N, bits, block_size = shape
        q = b.weight(f"{name}.Q{bits}", packed)
        sc = b.weight(f"{name}.scales", scales)
        attrs = {"K": K, "N": N, "bits": bits, "block_size": block_size}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        b.contrib = True
        inputs = [x, q, sc] if bias is None else [x, q, sc, "", "", bias]  # zero_points, g_idx absent
        return b.op("MatMulNBits", inputs, node, domain=CONTRIB, **attrs)
