"""The GLM forward pass (docs/glm.md 1.2-1.3) as a hand-built ONNX graph, one function per subgraph; what differs
between architectures (learned or rotary positions, pre-LN or alpha residual, the mask value) is read from
config.arch (glm_runtime.architecture), ChatGLM-6B's facts from ../shared/chatglm_v1_spec.md ("spec").

In: a GLMConfig, the official-name weights as numpy arrays, a float type ("fp32" | "fp16": the dtype of its float
weights, cache and logits; a manifest's `precision` names the whole artifact format, e.g. "int4-weight", whose
graph is fp32) and an opset.
Out: an onnx.ModelProto whose inputs and outputs are exactly glm_runtime.iotable.io_table(config, float_type).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from glm_export.nbits import CONTRIB, NBits
from glm_export.onnx_rotary import apply_rotary, rotary_tables
from glm_runtime.config import GLMConfig
from glm_runtime.iotable import LOGITS_START, io_table, kv_names

EMBED_OUTPUT = "/embed/add_block/out"  # the residual stream's first tensor, in every architecture (glm_export.pieces)
MASK_FILL = 65504.0  # masked scores become -65504 (the fp16 minimum), never -inf (docs/glm.md 1.3, 9.5)
INT64_MAX = np.iinfo(np.int64).max
ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
}
MIN_OPSET = 17  # LayerNormalization
MAX_OPSET = 24  # the newest opset TensorRT 10.15's parser reads (glm_export/data/trt_onnx_support.json)

AddWeight = Callable[[str, np.ndarray], TensorProto]  # how an initializer is stored (inline or external data)


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output name(s) of the node it adds."""

    def __init__(self, opset: int, add_weight: AddWeight, weight_dtype: np.dtype, nbits: NBits | None = None):
        self.opset = opset
        self.nbits = nbits  # MatMul weights as MatMulNBits (quantize's int4-weight / int8-weight)
        self.contrib = False  # whether a com.microsoft op was used (the model then imports that domain)
        self.add_weight = add_weight
        self.wdtype = np.dtype(weight_dtype)  # dtype of the big matrices (and of the KV cache)
        self.wtype = helper.np_dtype_to_tensor_dtype(self.wdtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._used: Counter[str] = Counter()
        self._consts: dict[tuple, str] = {}  # (tag, dtype, shape, bytes) -> name: one initializer per constant

    @property
    def fp16(self) -> bool:
        return self.wdtype == np.float16

    def _unique(self, name: str) -> str:
        self._used[name] += 1
        return name if self._used[name] == 1 else f"{name}_{self._used[name] - 1}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        outputs: Sequence[str] | None = None,
        n_out: int = 1,
        **attrs,
    ) -> str | list[str]:
        node_name = self._unique(name)
        outputs = (
            list(outputs)
            if outputs is not None
            else [f"{node_name}/out" if n_out == 1 else f"{node_name}/out{k}" for k in range(n_out)]
        )
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=node_name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.add_weight(name, np.ascontiguousarray(array)))
        return name

    def const(self, tag: str, value, dtype=np.int64) -> str:
        """A small constant (shape vector, scalar), stored inline once and shared by every node that uses it."""
        array = np.asarray(value, dtype=dtype)
        key = (tag, array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = name = self._unique(f"const/{tag}")
            self.initializers.append(numpy_helper.from_array(array, name))
        return self._consts[key]

    def cast(self, x: str, to: int, name: str) -> str:
        return self.op("Cast", [x], name, to=to)

    def to_float(self, x: str, name: str) -> str:
        """fp16 graph: Cast into an fp32 island; fp32 graph: no node."""
        return self.cast(x, TensorProto.FLOAT, f"{name}/to_fp32") if self.fp16 else x

    def to_weight_dtype(self, x: str, name: str) -> str:
        return self.cast(x, self.wtype, f"{name}/to_fp16") if self.fp16 else x


def _linear_weights(b: GraphBuilder, W: Mapping[str, np.ndarray], prefix: str) -> tuple[str, str]:
    """nn.Linear weight [out, in] stored transposed as `<name>.T` [in, out], so the graph is MatMul + Add."""
    w = b.weight(f"{prefix}.weight.T", W[f"{prefix}.weight"].T.astype(b.wdtype))
    bias = b.weight(f"{prefix}.bias", W[f"{prefix}.bias"].astype(b.wdtype))
    return w, bias


def linear(b: GraphBuilder, x: str, W: Mapping[str, np.ndarray], prefix: str) -> str:
    """x [B,T,in] (weight dtype) -> MatMul(W.T [in,out]) -> Add(bias) -> [B,T,out] (weight dtype).
    With b.nbits (and the prefix not kept): one MatMulNBits over the packed W.T, the bias its own input."""
    if b.nbits is not None and not b.nbits.keep(prefix):
        return nbits_linear(b, x, W, prefix, fuse_bias=True)
    w, bias = _linear_weights(b, W, prefix)
    return b.op("Add", [b.op("MatMul", [x, w], f"/{prefix}/MatMul"), bias], f"/{prefix}/Add")


def nbits_linear(
    b: GraphBuilder, x: str, W: Mapping[str, np.ndarray], prefix: str, fuse_bias: bool
) -> str | tuple[str, str]:
    """MatMulNBits over the packed W.T; fuse_bias: the bias as its input 5 (-> output), else (output, bias name)
    for a consumer that takes the bias itself (FastGelu / BiasGelu)."""
    bias = b.weight(f"{prefix}.bias", W[f"{prefix}.bias"].astype(b.wdtype))
    released = b.nbits.released
    if released is not None and prefix in released:  # a published int checkpoint's integers, as they are
        packed, scales, shape = released.packed(prefix)
        mm = b.nbits.node(
            b,
            x,
            packed,
            scales,
            shape,
            f"{prefix}.weight.T",
            f"/{prefix}/MatMul_Q{shape[2]}",
            bias if fuse_bias else None,
        )
        return mm if fuse_bias else (mm, bias)
    w_kn = np.asarray(W[f"{prefix}.weight"], dtype=np.float32).T  # [in, out] = [K, N]
    mm = b.nbits.matmul(
        b,
        x,
        w_kn,
        f"{prefix}.weight.T",
        f"/{prefix}/MatMul_Q{b.nbits.bits}",
        block_size=b.nbits.block_size_for(prefix),
        bias=bias if fuse_bias else None,
    )
    return mm if fuse_bias else (mm, bias)


# input_ids [B,T] ----------------------- Gather(word_embeddings [V,h]) ---- Cast* --.
# position_ids [B,2,T] -+- Gather(0,axis 1) -> pos [B,T] -- Gather(position table) -- Cast* -- Add -- Add -> x
#                       `- Gather(1,axis 1) -> blk [B,T] -- Gather(block table) ----- Cast* ---------'
# x: [B,T,h] fp32, the residual stream (fp32 in both float types).   * fp16 graphs only
# A rotary architecture (ChatGLM-6B) adds no tables: x is the word embedding alone, and the positions go to
# glm_export.onnx_rotary.
def embeddings(b: GraphBuilder, W: Mapping[str, np.ndarray], cfg: GLMConfig) -> tuple[str, str]:
    """Returns (x [B,T,h] fp32, name of the word-embedding initializer, reused by the tied head)."""
    table = b.weight("word_embeddings.weight", W["word_embeddings.weight"].astype(b.wdtype))
    if not cfg.position_tables:
        word = b.to_float(b.op("Gather", [table, "input_ids"], "/embed/word"), "/embed/word")
        return b.op("Identity", [word], "/embed/output", outputs=[EMBED_OUTPUT]), table
    pos_table = b.weight(
        "transformer.position_embeddings.weight", W["transformer.position_embeddings.weight"].astype(b.wdtype)
    )
    blk_table = b.weight(
        "transformer.block_position_embeddings.weight",
        W["transformer.block_position_embeddings.weight"].astype(b.wdtype),
    )
    pos = b.op("Gather", ["position_ids", b.const("zero", 0)], "/embed/position_row", axis=1)  # [B,T]
    blk = b.op("Gather", ["position_ids", b.const("one", 1)], "/embed/block_row", axis=1)  # [B,T]
    word = b.to_float(b.op("Gather", [table, "input_ids"], "/embed/word"), "/embed/word")
    pos_e = b.to_float(b.op("Gather", [pos_table, pos], "/embed/position"), "/embed/position")
    blk_e = b.to_float(b.op("Gather", [blk_table, blk], "/embed/block"), "/embed/block")
    x = b.op(
        "Add", [b.op("Add", [word, pos_e], "/embed/add_position"), blk_e], "/embed/add_block", outputs=[EMBED_OUTPUT]
    )
    return x, table


def layer_norm(b: GraphBuilder, x: str, W: Mapping[str, np.ndarray], prefix: str, eps: float) -> str:
    """LayerNormalization over the last axis, always in fp32 (its scale and bias stay fp32)."""
    scale = b.weight(f"{prefix}.weight", W[f"{prefix}.weight"].astype(np.float32))
    bias = b.weight(f"{prefix}.bias", W[f"{prefix}.bias"].astype(np.float32))
    return b.op("LayerNormalization", [x, scale, bias], f"/{prefix}/LayerNorm", axis=-1, epsilon=eps)


def _heads(b: GraphBuilder, x: str, n: int, d: int, name: str, output: str | None = None) -> str:
    """[B,T,h] -> Reshape [B,T,n,d] -> Transpose -> [B,n,T,d] (head j owns features j*d..(j+1)*d)."""
    r = b.op("Reshape", [x, b.const("heads_shape", [0, 0, n, d])], f"{name}/Reshape")
    return b.op("Transpose", [r], f"{name}/Transpose", outputs=[output] if output else None, perm=[0, 2, 1, 3])


# a [B,T,h] (LN output, fp32) -Cast*- MatMul/Add(W_qkv) -> [B,T,3h] -Split-> q | k | v   ([Q;K;V] blocks)
#   q -> heads -Cast*- Div(s*sqrt d) -> q' [B,n,T,d] fp32      (scaling Q == the original's K / sqrt d)
#   k -> heads = present.i.key   [B,n,T,d]   (this call's keys only, un-scaled)
#   v -> heads = present.i.value [B,n,T,d]
#   past.key [B,n,P,d]  -Cast*- Transpose - MatMul(q', .) -> s_past [B,n,T,P] --.
#   present.i.key       -Cast*- Transpose - MatMul(q', .) -> s_new  [B,n,T,T] --+- Concat(axis 3)
#       -> scores [B,n,T,P+T] fp32 - Where(attention_mask [B,1,T,P+T], scores, -65504) - Softmax -Cast*- probs
#   probs - Slice[..., :P] - MatMul(., past.value) --.
#   probs - Slice[..., P:] - MatMul(., value) -------+- Add -> ctx [B,n,T,d] - Transpose/Reshape [B,T,h] - dense
# Past and new keys/values are never concatenated, so a decode step copies no cache.
# * fp16 graphs: the QK product, masking and softmax are an fp32 island; K/V and the matmuls with V fp16.
# Rotary architectures: q and k are rotated right after the heads are split (glm_export.onnx_rotary), so present.i.key
# holds rotated keys and a cached slot can sit anywhere the mask allows; the masked score is
# arch.mask_value(i) (ChatGLM: -10000 x (i+1)).
def self_attention(
    b: GraphBuilder,
    a: str,
    W: Mapping[str, np.ndarray],
    i: int,
    cfg: GLMConfig,
    past_len: str,
    rot: tuple[str, str] | None = None,
) -> str:
    prefix = f"transformer.layers.{i}.attention"
    n, d, h = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    qkv = linear(b, b.to_weight_dtype(a, f"/{prefix}"), W, f"{prefix}.query_key_value")  # [B,T,3h]
    if b.opset >= 18:
        q, k, v = b.op("Split", [qkv], f"/{prefix}/Split", n_out=3, axis=-1, num_outputs=3)
    else:
        q, k, v = b.op("Split", [qkv, b.const("qkv_split", [h, h, h])], f"/{prefix}/Split", n_out=3, axis=-1)
    present_k, present_v = kv_names("present", i)
    q = _heads(b, q, n, d, f"/{prefix}/q")
    if rot is None:
        k = _heads(b, k, n, d, f"/{prefix}/k", output=present_k)  # un-scaled K (docs/glm.md 1.3)
    else:
        parts = cfg.arch.rotary_streams
        q = apply_rotary(b, q, rot, d, f"/{prefix}/q/rotary", parts=parts)
        k = _heads(b, k, n, d, f"/{prefix}/k")
        k = apply_rotary(b, k, rot, d, f"/{prefix}/k/rotary", output=present_k, parts=parts)
    v = _heads(b, v, n, d, f"/{prefix}/v", output=present_v)
    past_k, past_v = kv_names("past", i)

    s = cfg.attention_scale
    # Q/(s*sqrt d) . K^T == (Q/sqrt s).(K/sqrt(d s))^T of the original; for s = 1 and d a power of 4
    # (16, 64) the division is by a power of two, so it is exact.
    q = b.op(
        "Div", [b.to_float(q, f"/{prefix}/q"), b.const("qk_scale", s * math.sqrt(d), np.float32)], f"/{prefix}/scale_q"
    )
    kt_past = b.op("Transpose", [b.to_float(past_k, f"/{prefix}/past_k")], f"/{prefix}/past_k/T", perm=[0, 1, 3, 2])
    kt_new = b.op("Transpose", [b.to_float(k, f"/{prefix}/k")], f"/{prefix}/k/T", perm=[0, 1, 3, 2])
    scores = b.op(
        "Concat",
        [b.op("MatMul", [q, kt_past], f"/{prefix}/scores_past"), b.op("MatMul", [q, kt_new], f"/{prefix}/scores_new")],
        f"/{prefix}/scores",
        axis=3,
    )  # [B,n,T,P+T] fp32
    scores = _mask_scores(b, scores, s, f"/{prefix}", cfg.arch.mask_value(i))
    probs = b.to_weight_dtype(b.op("Softmax", [scores], f"/{prefix}/Softmax", axis=-1), f"/{prefix}/probs")
    axis3 = b.const("axis3", [3])
    p_past = b.op("Slice", [probs, b.const("start0", [0]), past_len, axis3], f"/{prefix}/probs_past")
    p_new = b.op("Slice", [probs, past_len, b.const("end", [INT64_MAX]), axis3], f"/{prefix}/probs_new")
    ctx = b.op(
        "Add",
        [b.op("MatMul", [p_past, past_v], f"/{prefix}/ctx_past"), b.op("MatMul", [p_new, v], f"/{prefix}/ctx_new")],
        f"/{prefix}/ctx",
    )  # [B,n,T,d]
    ctx = b.op("Transpose", [ctx], f"/{prefix}/ctx/Transpose", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.const("merge_heads", [0, 0, h])], f"/{prefix}/ctx/Reshape")  # [B,T,h]
    return linear(b, ctx, W, f"{prefix}.dense")


# attention_scale s = 1:  Where(mask, scores, -65504)      (== scores*mask - 65504*(1-mask) for finite scores)
# s > 1 (docs/glm.md 1.3):       m = scores*mask;  t = (m - ReduceMax(m, axis 3)) * s;  Where(mask, t, t - 65504)
def _mask_scores(b: GraphBuilder, scores: str, s: float, name: str, value: float = -MASK_FILL) -> str:
    fill = b.const("mask_fill", value, np.float32)
    if s == 1.0:
        return b.op("Where", ["attention_mask", scores, fill], f"{name}/mask")
    zero = b.const("zero_f", 0.0, np.float32)
    m = b.op("Where", ["attention_mask", scores, zero], f"{name}/mask_mul")
    if b.opset >= 18:
        mx = b.op("ReduceMax", [m, b.const("axes_last", [-1])], f"{name}/row_max", keepdims=1)
    else:
        mx = b.op("ReduceMax", [m], f"{name}/row_max", axes=[-1], keepdims=1)
    t = b.op("Mul", [b.op("Sub", [m, mx], f"{name}/shift"), b.const("scale_s", s, np.float32)], f"{name}/times_s")
    return b.op("Where", ["attention_mask", t, b.op("Add", [t, fill], f"{name}/fill")], f"{name}/mask")


# b [B,T,h] (LN output, fp32) -Cast*- MatMul/Add(h->4h) - GeLU - MatMul/Add(4h->h) -> [B,T,h] (weight dtype)
# An NBits graph (ONNX Runtime only already) takes h->4h's bias and the GeLU in one contrib node: FastGelu
# (tanh: the same formula as gelu() below) or BiasGelu (erf); standard graphs write GeLU out (TensorRT parses it).
# GeGLU (GLM-130B, spec 3): MatMul/Add(h->2i) -> [B,T,2i] - Split -> value | gate - Mul(value, GeLU(gate)) -> [B,T,i]
#   - MatMul/Add(i->h); an NBits graph fuses the bias into its MatMulNBits and writes the GeLU out.
def mlp(b: GraphBuilder, x: str, W: Mapping[str, np.ndarray], i: int, cfg: GLMConfig) -> str:
    prefix = f"transformer.layers.{i}.mlp"
    up, gelu_kind = f"{prefix}.dense_h_to_4h", cfg.gelu
    if cfg.arch.mlp == "geglu":
        u = linear(b, b.to_weight_dtype(x, f"/{prefix}"), W, up)  # [B,T,2i]
        inner = cfg.inner_size
        if b.opset >= 18:
            value, gate = b.op("Split", [u], f"/{prefix}/Split", n_out=2, axis=-1, num_outputs=2)
        else:
            value, gate = b.op("Split", [u, b.const("glu_split", [inner, inner])], f"/{prefix}/Split", n_out=2, axis=-1)
        act = b.op("Mul", [value, gelu(b, gate, gelu_kind, f"/{prefix}/gelu")], f"/{prefix}/glu")
    elif b.nbits is not None and not b.nbits.keep(up):
        mm, bias = nbits_linear(b, b.to_weight_dtype(x, f"/{prefix}"), W, up, fuse_bias=False)
        act = b.op("FastGelu" if gelu_kind == "tanh" else "BiasGelu", [mm, bias], f"/{prefix}/gelu", domain=CONTRIB)
    else:
        act = gelu(b, linear(b, b.to_weight_dtype(x, f"/{prefix}"), W, up), gelu_kind, f"/{prefix}/gelu")
    return linear(b, act, W, f"{prefix}.dense_4h_to_h")


# tanh (docs/glm.md 1.2): 0.5*x*(1 + Tanh(0.7978845608028654 * x * (1 + 0.044715*x*x)))
# erf  (HF):       0.5*x*(1 + Erf(x / sqrt 2))
# Written out with Mul/Add/Tanh/Erf so every opset >= 17 and TensorRT parse it; x*x (not x^3) keeps fp16
# finite up to |x| = 256.
def gelu(b: GraphBuilder, x: str, kind: str, name: str) -> str:
    def c(tag: str, value: float) -> str:
        return b.const(tag, value, b.wdtype)

    if kind == "tanh":
        inner = b.op(
            "Add",
            [c("one_w", 1.0), b.op("Mul", [b.op("Mul", [x, x], f"{name}/x2"), c("gelu_a", 0.044715)], f"{name}/ax2")],
            f"{name}/1+ax2",
        )
        inner = b.op(
            "Mul", [b.op("Mul", [x, inner], f"{name}/x(1+ax2)"), c("gelu_k", 0.7978845608028654)], f"{name}/arg"
        )
        t = b.op("Tanh", [inner], f"{name}/Tanh")
    else:
        t = b.op("Erf", [b.op("Div", [x, c("sqrt2", math.sqrt(2.0))], f"{name}/x/sqrt2")], f"{name}/Erf")
    half_x = b.op("Mul", [x, c("half", 0.5)], f"{name}/half_x")
    return b.op("Mul", [half_x, b.op("Add", [t, c("one_w", 1.0)], f"{name}/1+t")], f"{name}/out")


def transformer_layer(
    b: GraphBuilder,
    x: str,
    W: Mapping[str, np.ndarray],
    i: int,
    cfg: GLMConfig,
    past_len: str,
    rot: tuple[str, str] | None = None,
) -> str:
    """Pre-LN block (docs/glm.md 1.2): x + Attn(LN_in(x)), then + MLP(LN_post(.)); residual stream fp32.
    alpha-ln (ChatGLM-6B, spec 3): a = LN_in(x); h = alpha*a + Attn(a); c = LN_post(h); alpha*c + MLP(c)."""
    p, eps = f"transformer.layers.{i}", cfg.layernorm_epsilon
    a = layer_norm(b, x, W, f"{p}.input_layernorm", eps)
    attn = b.to_float(self_attention(b, a, W, i, cfg, past_len, rot), f"/{p}/attn")
    if cfg.arch.residual == "pre-ln":
        x = b.op("Add", [x, attn], f"/{p}/residual_attn")
        out = mlp(b, layer_norm(b, x, W, f"{p}.post_attention_layernorm", eps), W, i, cfg)
        return b.op("Add", [x, b.to_float(out, f"/{p}/mlp")], f"/{p}/residual_mlp")
    alpha = b.const("alpha", cfg.arch.alpha(cfg.num_layers), np.float32)
    h = b.op("Add", [b.op("Mul", [a, alpha], f"/{p}/alpha_a"), attn], f"/{p}/residual_attn")
    c = layer_norm(b, h, W, f"{p}.post_attention_layernorm", eps)
    out = b.to_float(mlp(b, c, W, i, cfg), f"/{p}/mlp")
    return b.op("Add", [b.op("Mul", [c, alpha], f"/{p}/alpha_c"), out], f"/{p}/residual_mlp")


# y [B,T,h] - Slice(logits_start.., axis 1) -> [B,T',h] -Cast*- Reshape [B*T',h]
#   - Gemm(transB=1, word_embeddings [V,h]) -> [B*T',V] - Reshape [B,T',V] -Cast*-> logits
# The tied head reads the SAME initializer as the embedding Gather: the [V,h] matrix is stored once.
# logits_start is an optional input (a graph input with an initializer of the same name, value [0]).
def lm_head(
    b: GraphBuilder, y: str, table: str, vocab: int, hidden: int, W: Mapping[str, np.ndarray] | None = None
) -> str:
    y = b.op("Slice", [y, LOGITS_START, b.const("end", [INT64_MAX]), b.const("axis1", [1])], "/lm_head/rows")
    if b.nbits is not None and b.nbits.head:  # an untied, quantized copy of the table: [B,T',h] -> [B,T',V]
        w_kn = np.asarray(W["word_embeddings.weight"], dtype=np.float32).T  # [h, V]
        nb = b.nbits
        logits = nb.matmul(
            b,
            y,
            w_kn,
            "lm_head.weight.T",
            f"/lm_head/MatMul_Q{nb.head_bits}",
            bits=nb.head_bits,
            block_size=nb.head_block_size,
        )
        return b.op("Identity", [logits], "/lm_head/logits", outputs=["logits"])
    flat = b.op("Reshape", [b.to_weight_dtype(y, "/lm_head"), b.const("flat", [-1, hidden])], "/lm_head/flatten")
    scores = b.op("Gemm", [flat, table], "/lm_head/Gemm", transB=1)
    out_shape = b.op(
        "Concat",
        [b.op("Shape", [y], "/lm_head/batch_rows", start=0, end=2), b.const("vocab", [vocab])],
        "/lm_head/shape",
        axis=0,
    )
    if b.fp16:
        logits = b.op("Reshape", [scores, out_shape], "/lm_head/unflatten")
        return b.op("Cast", [logits], "/lm_head/to_fp32", outputs=["logits"], to=TensorProto.FLOAT)
    return b.op("Reshape", [scores, out_shape], "/lm_head/unflatten", outputs=["logits"])


def _value_info(entry: Mapping) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(entry["name"], ONNX_DTYPES[entry["dtype"]], list(entry["shape"]))


def build_model(
    config: GLMConfig,
    weights: Mapping[str, np.ndarray],
    float_type: str,
    opset: int,
    add_weight: AddWeight | None = None,
    progress=None,
    nbits: NBits | None = None,
) -> onnx.ModelProto:
    """The whole graph: embeddings -> L layers -> final LN -> tied head, IO exactly io_table(config, float_type).
    weights: read once each, in graph order (a glm_export.weights.Weights reads them from disk as asked);
    add_weight: where each initializer goes (ExternalData streams it to disk); progress(i): after layer i;
    nbits: MatMul weights as MatMulNBits (an fp32 graph only)."""
    if float_type not in ("fp32", "fp16"):
        raise ValueError(f"float_type is fp32 or fp16, got {float_type!r}")
    if nbits is not None and float_type != "fp32":
        raise ValueError("MatMulNBits weights go into an fp32 graph (fp32 activations and cache)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (LayerNormalization needs 17; TensorRT "
            f"10.x parses up to {MAX_OPSET}), got {opset}"
        )
    table = io_table(config, float_type)
    wdtype = np.float16 if float_type == "fp16" else np.float32
    b = GraphBuilder(opset, add_weight or (lambda name, a: numpy_helper.from_array(a, name)), wdtype, nbits)
    x, word_table = embeddings(b, weights, config)
    rot = rotary_tables(b, config) if config.arch.rotary else None
    # P = past_seq, shared by all layers: [1] int64, used to split the probabilities into past | new
    past_len = b.op(
        "Gather", [b.op("Shape", [kv_names("past", 0)[0]], "/past_shape"), b.const("axis2", [2])], "/past_len"
    )
    for i in range(config.num_layers):
        x = transformer_layer(b, x, weights, i, config, past_len, rot)
        if progress is not None:
            progress(i + 1)
    y = layer_norm(b, x, weights, "transformer.final_layernorm", config.layernorm_epsilon)
    lm_head(b, y, word_table, config.vocab_size, config.hidden_size, weights)
    defaults = [
        numpy_helper.from_array(np.asarray(e["default"], dtype=e["dtype"]), e["name"])
        for e in table["inputs"]
        if "default" in e
    ]
    graph = helper.make_graph(
        b.nodes,
        "glm",
        [_value_info(e) for e in table["inputs"]],
        [_value_info(e) for e in table["outputs"]],
        initializer=b.initializers + defaults,
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(CONTRIB, 1)] if b.contrib else [])
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="glmx",
        doc_string=f"GLM {config.name} ({float_type}), cache semantics present-is-new",
    )
    # the oldest IR that carries this opset, so older runtimes and TensorRT parsers accept the file
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model
