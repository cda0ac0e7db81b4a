"""The published chatglm-6b-int8 / chatglm-6b-int4 linears, read as they are stored and re-packed for MatMulNBits.

In: one quantized linear of a released checkpoint (/work/shared/chatglm_v1_spec.md section 2): `<name>.weight`
int8 [out, in*bits/8] and `<name>.weight_scale` fp16 [out]; symmetric per output row, W ~ q * scale[row]; int4
packs two values a byte, the HIGH nibble the even (first) column and the LOW nibble the odd one, both signed.
Out: ONNX Runtime's MatMulNBits initializers (packed uint8 [N, K/block, block*bits/8], scales float32
[N * K/block]) holding the same integers bit for bit: no float weights in between and no re-quantization.

MatMulNBits' layout, verified with onnxruntime 1.23 (tests/test_hf_quantized.py checks it on every run): with no
zero_points input the stored value is q + 2^(bits-1) (q + 8 as an unsigned nibble for 4 bits, q + 128 as a byte
for 8 bits), and in a 4-bit byte the LOW nibble is the even (first) element along K and the HIGH nibble the odd
one; its own quantizer (quantize_matmul_4bits / _8bits) writes the same bytes. So an int4 byte is the released
byte with its nibbles swapped and each nibble's top bit flipped (x ^ 0x88), an int8 byte the released one ^ 0x80.

block_size: the CPU kernel takes any power of two >= 16 (refused below 16; tried up to 32768, exact). The CUDA
kernel's dequantize step computes 256 threads * 8 (4-bit) or * 4 (8-bit) elements / block_size blocks a thread
block, which is 0 above 2048 (4-bit) / 1024 (8-bit): read in the source, not run here. By default a row is one
block up to that portable limit and otherwise split into blocks of the limit, the row's one scale repeated in each
(still exact); max_block_size raises it (e.g. to K: one block a row, for the CPU only).
"""

from __future__ import annotations

import numpy as np

from glm_runtime.errors import GLMXError

# the largest block_size both ONNX Runtime kernels take (CPU: no limit found; CUDA: see the module docstring)
PORTABLE_MAX_BLOCK = {4: 2048, 8: 1024}
MIN_BLOCK = 16  # MatMulNBits refuses a block_size under 16 or not a power of two


class QuantizedCheckpointError(GLMXError, ValueError):
    """A quantized linear of a released checkpoint whose arrays do not have the published layout."""


def _bits(bits: int) -> int:
    if bits not in (4, 8):
        raise QuantizedCheckpointError(f"bits must be 4 or 8, got {bits!r}")
    return int(bits)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int [N, K] in [-8, 7], K even -> int8 [N, K/2] in the published layout: a byte's high nibble is column 2j,
    its low nibble column 2j+1 (both two's complement)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 2:
        raise QuantizedCheckpointError(f"pack_int4 needs a 2-D array with an even width, got shape {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise QuantizedCheckpointError(f"pack_int4: values must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    u = q.astype(np.int16) & 0xF
    return ((u[:, 0::2] << 4) | u[:, 1::2]).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """int8 [N, K/2] in the published layout -> int8 [N, K] in [-8, 7] (high nibble = the even column)."""
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype not in (np.int8, np.uint8):
        raise QuantizedCheckpointError(
            f"unpack_int4 needs a 2-D int8 array, got {packed.dtype} of shape {packed.shape}"
        )
    b = packed.view(np.int8)
    q = np.empty((b.shape[0], 2 * b.shape[1]), dtype=np.int8)
    q[:, 0::2] = b >> 4  # arithmetic shift: the high nibble, sign-extended
    low = b & np.int8(0x0F)
    q[:, 1::2] = low - ((low & np.int8(8)) << 1)  # the low nibble 8..15 is -8..-1
    return q


def quantize_rows(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (q int8 [N, K] for 8 bits, or packed int8 [N, K/2] for 4 bits; scale float16 [N]), as the
    Hugging Face code makes a released checkpoint (QuantizedLinear.__init__):
        scale = (max|W_row| / (2^(bits-1) - 1)).half();  q = round(W / scale[:, None]).to(int8)
    computed in w's own dtype as torch's promotion does (a fp16 model divides in fp16, a fp32 one in fp32).
    torch.round rounds half to even, as np.round does. The clip to the signed range changes nothing for finite
    input (|W| / scale <= (2^(bits-1) - 1) * (1 + 2^-11) after the fp16 rounding of the scale); a row of zeros
    (scale 0, where torch would cast 0/0) gives q = 0."""
    bits = _bits(bits)
    w = np.asarray(w)
    if w.ndim != 2 or (bits == 4 and w.shape[1] % 2):
        raise QuantizedCheckpointError(f"quantize_rows needs a 2-D array (even width for int4), got {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float32)
    if not np.all(np.isfinite(w)):
        raise QuantizedCheckpointError("quantize_rows: the weights hold inf or nan")
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], dtype=w.dtype)
    scale = (amax / np.asarray(qmax, dtype=w.dtype)).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale)  # 0 / 1 = 0 for an all-zero row
    q = np.clip(np.round(w / safe[:, None]), -qmax - 1, qmax).astype(np.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def check_layout(
    name: str, weight: np.ndarray, scale: np.ndarray, bits: int, expected_in: int, expected_out: int
) -> None:
    """Raise QuantizedCheckpointError (one line, naming `name`) unless weight is int8 [out, in*bits/8] and scale
    fp16 [out] for a linear of in -> out features."""
    bits = _bits(bits)
    weight, scale = np.asarray(weight), np.asarray(scale)
    where = f"quantized linear {name}"
    if bits == 4 and expected_in % 2:
        raise QuantizedCheckpointError(f"{where}: int4 packs two columns a byte, but in_features is {expected_in}")
    want = (expected_out, expected_in * bits // 8)
    if weight.dtype != np.int8:
        raise QuantizedCheckpointError(f"{where}: weight must be int8 (int{bits} packed), got {weight.dtype}")
    if weight.shape != want:
        raise QuantizedCheckpointError(
            f"{where}: weight must be int8 [out, in*{bits}/8] = {list(want)} for {expected_in} -> {expected_out} "
            f"features, got {list(weight.shape)}"
        )
    if scale.dtype != np.float16:
        raise QuantizedCheckpointError(f"{where}: weight_scale must be float16, got {scale.dtype}")
    if scale.shape != (expected_out,):
        raise QuantizedCheckpointError(
            f"{where}: weight_scale must be [out] = [{expected_out}], got {list(scale.shape)}"
        )


def _shape(weight: np.ndarray, scale: np.ndarray, bits: int) -> tuple[int, int]:
    """(N, K) of a released linear, after check_layout against the sizes its own arrays imply."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise QuantizedCheckpointError(f"quantized weight must be 2-D [out, in*bits/8], got shape {weight.shape}")
    n, k = weight.shape[0], weight.shape[1] * 8 // _bits(bits)
    check_layout("weight", weight, scale, bits, k, n)
    return n, k


def dequantize(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """float32 [N, K]: W = q * scale[row], the scale as float32 of its fp16 value. Exact in float32 (q has at most
    8 significant bits, the fp16 scale 11)."""
    _shape(weight, scale, bits)
    q = unpack_int4(weight) if bits == 4 else np.asarray(weight)
    return q.astype(np.float32) * np.asarray(scale).astype(np.float32)[:, None]


def block_size_for(k: int, bits: int, max_block_size: int | None = None) -> int:
    """The MatMulNBits block along K: K itself (rounded up to a power of two >= 16) up to max_block_size (default
    PORTABLE_MAX_BLOCK[bits]), else max_block_size; the row's tail then pads with zeros."""
    limit = PORTABLE_MAX_BLOCK[_bits(bits)] if max_block_size is None else max_block_size
    if limit < MIN_BLOCK or limit & (limit - 1):
        raise QuantizedCheckpointError(f"max_block_size must be a power of two >= {MIN_BLOCK}, got {limit}")
    return min(limit, max(MIN_BLOCK, 1 << max(k - 1, 0).bit_length()))


def to_matmulnbits(
    weight: np.ndarray, scale: np.ndarray, bits: int, max_block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """A released linear (int8 weight [N, K*bits/8], fp16 scale [N]) -> MatMulNBits' (packed uint8
    [N, K/block, block*bits/8], scales float32 [N * K/block], block_size), no zero_points input (implied
    2^(bits-1)). The bytes are the released ones with MatMulNBits' offset and nibble order (module docstring);
    a K that is not a multiple of the block pads with the zero point (q = 0)."""
    n, k = _shape(weight, scale, bits)
    block = block_size_for(k, bits, max_block_size)
    blocks = -(-k // block)
    raw = np.ascontiguousarray(weight).view(np.uint8)  # [N, K*bits/8]
    if bits == 4:
        stored = (((raw & 0x0F) << 4) | (raw >> 4)) ^ 0x88  # swap the nibbles; +8 on each signed nibble
    else:
        stored = raw ^ 0x80  # +128 on each signed byte
    width = blocks * block * bits // 8
    packed = np.full((n, width), 0x88 if bits == 4 else 0x80, dtype=np.uint8)
    packed[:, : stored.shape[1]] = stored
    scales = np.repeat(np.asarray(scale).astype(np.float32), blocks)  # [N * blocks], row-major (row, block)
    return packed.reshape(n, blocks, block * bits // 8), scales, block
