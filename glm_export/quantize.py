"""Quantize an exported fp32 GLM folder: int8-dynamic, int4-weight, qdq-int8 (explicit Q/DQ for TensorRT), fp16.

In: a glmx ONNX folder (precision fp32), a scheme, and for qdq-int8 real calibration text (or prepared feeds).
Out: a new folder (model.onnx + tokenizer + manifest of kind "onnx", precision = the scheme, the parent's IO
table) whose manifest records the scheme, its settings, the parent and the accuracy report; a budget miss
writes nothing unless accept_loss=True.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from glm_export.calibration import FeedReader, calibration_data
from glm_export.compare import BudgetError
from glm_export.derive import (
    QuantizeError,
    child_manifest,
    judge_child,
    op_histogram,
    read_parent,
    save_graph,
    trt_findings,
)
from glm_runtime.iotable import io_table
from glm_runtime.manifest import DATA_FILE, MODEL_FILE, claims_output, staged_folder, write_manifest

SCHEMES = ("int8-dynamic", "int4-weight", "int8-weight", "qdq-int8", "fp16")
# Roles that may stay fp32. "embedding": the word-embedding Gather (never quantized: only MatMul weights are);
# "head": the tied output head. int4-weight and int8-weight quantize it by default to 8-bit blocks (an untied
# copy; the Gather keeps the float table): that head keeps both recipes within their budgets on the bundled model
# (an int4 head misses), and it is 52-58 MB instead of 206 MB at GLM-Large's vocabulary (README's quantization
# table, benchmarks/results/quantization_bundled.json).
KEEP_FP32 = ("embedding", "head", "first-layer", "last-layer")  # roles; node names may be given too
LAYER_NODE = re.compile(r"/transformer\.layers\.(\d+)\.")
# What stays fp32 unless the caller says otherwise. The embedding is a Gather (never quantized) and the tied
# head is the most sensitive matrix (the "-head" rows of benchmarks/results/quantization_bundled.json quantize it
# too and lose top-1). The int8 activation schemes also keep layer 0: in the bundled model (trained with
# pretrain's "local" position init) it holds the neighbour-attention heads on a large sinusoidal table, where
# per-tensor int8 activations lose top-1 (the "first layer int8 too" rows of the same file); on a 24-layer model
# that is 1/24 of the weights.
DEFAULT_KEEP_FP32 = {
    "int8-dynamic": ("embedding", "head", "first-layer"),
    "qdq-int8": ("embedding", "head", "first-layer"),
    "int4-weight": ("embedding",),
    "int8-weight": ("embedding",),
}
# int4-weight / int8-weight: weights per scale and MatMulNBits' compute level (4: int8 products). Per role: the
# attention matmuls in blocks of 32, the MLP's (2/3 of a layer's weights) in blocks of 128, which the kernel reads
# faster (results/nbits_sweep.md) and which keep the bundled model within budget, where the attention matmuls in
# blocks of 128 do not (README's quantization table); the head 8-bit, in blocks of 128 for int4-weight and 32
# for int8-weight (blocks of 128 miss int8-weight's budget).
DEFAULT_BLOCK_SIZE, DEFAULT_MLP_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL = 32, 128, 4
DEFAULT_HEAD_BITS = 8
DEFAULT_HEAD_BLOCK_SIZE = {"int4-weight": 128, "int8-weight": 32}


def default_keep_fp32(scheme: str) -> tuple[str, ...]:
    """What `scheme` leaves fp32 when the caller names nothing: DEFAULT_KEEP_FP32; fp16 nothing (every weight is
    fp16: --keep-fp32 does not apply to it)."""
    return DEFAULT_KEEP_FP32.get(scheme, ())


logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # per-node INFO chatter


# ---------------------------------------------------------------- graph helpers


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name: the quantizers exclude nodes by name."""
    seen: set[str] = set()
    for k, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{k}"
        seen.add(node.name)
    return model


def head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The MatMul/Gemm that makes the logits: walk back from the `logits` output through shape-only nodes."""
    producer = {o: n for n in model.graph.node for o in n.output}
    todo, seen = ["logits"], set()
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger"):
            return node
        todo.append(node.input[0])  # Reshape / Cast / Add: follow the data input
    raise QuantizeError("cannot find the output head (a MatMul or Gemm feeding `logits`) in the graph")


# y [B*T,h] - Gemm(transB=1, E [V,h]) -> [B*T,V]    becomes    y - MatMul(E_T [h,V]) -> [B*T,V]
# The quantizers take MatMul with a constant B only; E_T is a second (transposed) copy of the tied table,
# which the quantizer then replaces by its int8/int4 version, while the embedding Gather keeps fp32 E.
def head_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    head = head_node(model)
    if head.op_type == "MatMul":
        return model
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    if len(head.input) > 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        raise QuantizeError(f"head {head.name} is a Gemm with bias/transA/alpha; only Gemm(transB) is rewritten")
    inits = {t.name: t for t in model.graph.initializer}
    table = numpy_helper.to_array(inits[head.input[1]])
    weight = table.T if attrs.get("transB", 0) else table
    name = f"{head.input[1]}.T"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
    new = helper.make_node("MatMul", [head.input[0], name], list(head.output), name=head.name)
    nodes = [new if n is head else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def check_keep_fp32(keep_fp32: Sequence[str], node_names: set[str]) -> None:
    """Every name is a role (KEEP_FP32) or a node of the graph, said first; then the embedding rule."""
    unknown = [k for k in keep_fp32 if k not in KEEP_FP32 and k not in node_names]
    if unknown:
        raise QuantizeError(
            f"--keep-fp32 {unknown[0]!r} is neither a role ({', '.join(KEEP_FP32)}) nor a node name "
            f"of the graph; pass one of those roles, or a node name as model.onnx spells it"
        )
    if "embedding" not in keep_fp32:
        raise QuantizeError(
            "the embedding Gather always stays fp32 (only MatMul weights are quantized); keep 'embedding' in keep_fp32"
        )


def excluded_nodes(model: onnx.ModelProto, keep_fp32: Sequence[str]) -> list[str]:
    """Node names the quantizer must leave alone: roles from KEEP_FP32 plus any node names given."""
    names = {n.name for n in model.graph.node}
    check_keep_fp32(keep_fp32, names)
    out = [k for k in keep_fp32 if k in names]
    if "head" in keep_fp32:
        out.append(head_node(model).name)
    layers = sorted({int(m.group(1)) for n in model.graph.node if (m := LAYER_NODE.match(n.name))})
    consts = {t.name for t in model.graph.initializer}
    for role, index in (("first-layer", layers[:1]), ("last-layer", layers[-1:])):
        if role in keep_fp32 and index:  # the layer's weight MatMuls (QKV, dense, h->4h, 4h->h)
            out += [
                n.name
                for n in model.graph.node
                if n.op_type == "MatMul"
                and n.input[1] in consts
                and n.name.startswith(f"/transformer.layers.{index[0]}.")
            ]
    # attention's Q.K^T and probs.V multiply two activations: they stay fp32 in every scheme (FIELD: fp16/int8
    # overflow and accuracy loss start in the scores), and so do the KV cache tensors that feed them
    out += [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]
    return out


# ---------------------------------------------------------------- the schemes


class _QuietQuantizer(logging.Filter):
    """Drops ONNX Runtime's quantizer advice on the root logger ("Please consider to run pre-processing before
    quantization"): glmx's graphs are shape-inferred already, and the line is not the user's to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizers without their advice line (root logger) and with its C++ warnings off (the
    calibration session warns that logits_start, an optional input, is not a constant: the point of it)."""
    import onnxruntime

    quiet = _QuietQuantizer()
    root = logging.getLogger()
    root.addFilter(quiet)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        onnxruntime.set_default_logger_severity(2)


def int8_dynamic_file(src: Path, dst: Path, exclude: Sequence[str] = ()) -> None:
    """glmx's int8-dynamic recipe on a graph file: MatMuls with constant weights, int8 per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_quantizer():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            extra_options={"MatMulConstBOnly": True},
        )  # attention's activation x activation stays fp32


def _int8_dynamic(model: onnx.ModelProto, src: Path, dst: Path, exclude: list[str], **_) -> dict[str, Any]:
    head = head_node(model)
    kept_gemm = head.name in exclude and head.op_type == "Gemm"
    onnx.save(model, src)
    # the dynamic quantizer turns every Gemm into MatMul "<name>_MatMul" first, so exclude that name too
    int8_dynamic_file(src, dst, exclude + [f"{n}_MatMul" for n in exclude])
    if kept_gemm:
        onnx.save(restore_gemm(onnx.load(dst), head), dst)
    return {"weights": "int8 symmetric per output channel", "activations": "uint8 dynamic per tensor"}


def restore_gemm(model: onnx.ModelProto, head: onnx.NodeProto) -> onnx.ModelProto:
    """Put the fp32 tied head back as the exporter wrote it: the quantizer's Gemm->MatMul rewrite left a
    transposed fp32 copy of the [V,h] table beside the one the embedding Gather reads."""
    nodes = list(model.graph.node)
    k, mm = next((k, n) for k, n in enumerate(nodes) if n.name == f"{head.name}_MatMul")
    copy_name = mm.input[1]
    nodes[k] = head
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(copy_name in n.input for n in nodes):
        kept = [t for t in model.graph.initializer if t.name != copy_name]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def _qdq_int8(
    model: onnx.ModelProto, src: Path, dst: Path, exclude: list[str], *, feeds: list[dict], **_
) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    onnx.save(model, src)
    with quiet_quantizer():
        quantize_static(
            str(src),
            str(dst),
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,  # TensorRT: zero point 0
                "MatMulConstBOnly": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )  # Q/DQ on inputs only
    return {"weights": "int8 symmetric per output channel (axis 1)", "activations": "int8 symmetric, MinMax"}


_SCHEMES = {"int8-dynamic": _int8_dynamic, "qdq-int8": _qdq_int8}  # the whole-model ones (ONNX Runtime's)

# ---------------------------------------------------------------- streamed schemes: the graph rebuilt tensor by tensor

# These are rebuilt by glmx's own graph builder from the parent's weights, read one tensor at a time from its
# external data and written to the child's as they are made: memory stays near the largest tensor, whatever the
# model's size. int8-dynamic and qdq-int8 run ONNX Runtime's quantizers, which hold the whole model (twice).
STREAMED = ("int4-weight", "int8-weight", "fp16")
NBITS = {"int4-weight": 4, "int8-weight": 8}


def nbits_recipe(
    scheme: str,
    keep_fp32: Sequence[str] | None = None,
    *,
    block_size: int | None = None,
    mlp_block_size: int | None = None,
    accuracy_level: int | None = None,
    head_bits: int | None = None,
    head_block_size: int | None = None,
) -> dict[str, Any]:
    """An int4-weight / int8-weight recipe with every default resolved, in the keys the manifest records
    (extra.quantization): keep_fp32, block_size (attention), mlp_block_size, accuracy_level, head ({"bits",
    "block_size"}, or None when the head stays fp32). The one place the defaulting rules live: quantize builds,
    prints and records this, and glmx bench's cache compares a folder's record with it. An explicit block_size
    alone sets the MLP's blocks too (as --block-size says); the head's block default is per scheme."""
    keep_fp32 = default_keep_fp32(scheme) if keep_fp32 is None else tuple(keep_fp32)
    for option, size in (
        ("--block-size", block_size),
        ("--mlp-block-size", mlp_block_size),
        ("--head-block-size", head_block_size),
    ):
        if size is not None and (size < 16 or size & (size - 1)):
            raise QuantizeError(f"{option} must be a power of two >= 16, got {size}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise QuantizeError(f"--accuracy-level must be 0..4 (MatMulNBits), got {accuracy_level}")
    if head_bits not in (None, 4, 8):
        raise QuantizeError(f"--head-bits must be 4 or 8, got {head_bits}")
    if "head" in keep_fp32 and (head_bits is not None or head_block_size is not None):
        raise QuantizeError(
            "--head-bits / --head-block-size set the quantized head's format, but the head is kept "
            "fp32 (--keep-fp32 head); drop one of them"
        )
    head = (
        None
        if "head" in keep_fp32
        else {
            "bits": DEFAULT_HEAD_BITS if head_bits is None else head_bits,
            "block_size": DEFAULT_HEAD_BLOCK_SIZE[scheme] if head_block_size is None else head_block_size,
        }
    )
    return {
        "keep_fp32": keep_fp32,
        "block_size": DEFAULT_BLOCK_SIZE if block_size is None else block_size,
        "mlp_block_size": (
            mlp_block_size
            if mlp_block_size is not None
            else block_size
            if block_size is not None
            else DEFAULT_MLP_BLOCK_SIZE
        ),
        "accuracy_level": DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level,
        "head": head,
    }


ORT_QUANTIZER_MAX_BYTES = 2**31  # parents past this are refused by the whole-model quantizers (memory)


def keep_rule(config: Mapping[str, Any], keep_fp32: Sequence[str], node_names: set[str]):
    """prefix (e.g. 'transformer.layers.3.mlp.dense_h_to_4h') -> whether its MatMul stays float."""
    check_keep_fp32(keep_fp32, node_names)
    last = int(config["num_layers"]) - 1

    def keep(prefix: str) -> bool:
        m = re.match(r"transformer\.layers\.(\d+)\.", prefix)
        layer = int(m.group(1)) if m else None
        return (
            ("first-layer" in keep_fp32 and layer == 0)
            or ("last-layer" in keep_fp32 and layer == last)
            or f"/{prefix}/MatMul" in keep_fp32
        )

    return keep


def plain_export(manifest: Any, src_dir: Path) -> None:
    """The streamed schemes rebuild glmx's own graph: the parent must be an export (fp32 or fp16), not a
    derived artifact whose graph was rewritten."""
    if (
        manifest.extra.get("graph") != "glm_export.onnx_graph (hand-built)"
        or manifest.extra.get("optimization")
        or manifest.extra.get("quantization")
    ):
        raise QuantizeError(
            f"{src_dir} is a derived artifact ({manifest.precision}); quantize the export it came "
            f"from ({manifest.parent.get('path', 'its parent')})"
        )


def rebuild(
    parent: onnx.ModelProto,
    parent_weights: Any,
    stage: Path,
    config: Mapping[str, Any],
    scheme: str,
    keep,
    *,
    head: bool,
    block_size: int,
    accuracy_level: int,
    log,
    head_bits: int | None = None,
    head_block_size: int | None = None,
    mlp_block_size: int | None = None,
) -> tuple[onnx.ModelProto, str | None]:
    """The child graph of a streamed scheme in `stage` (model.onnx [+ model.onnx.data]) from the parent's weights
    (its graph without data, and glm_export.weights.read_onnx_weights of it), read one at a time.
    -> (the child graph without its data, the data file name or None)."""
    from glm_export import derive, external_data
    from glm_export.nbits import NBits
    from glm_export.onnx_graph import build_model
    from glm_export.progress import Progress
    from glm_export.weights import official_weights
    from glm_runtime.config import GLMConfig

    cfg = GLMConfig.from_dict(config)
    opset = next(o.version for o in parent.opset_import if o.domain in ("", "ai.onnx"))
    parent_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in parent.graph.initializer)
    weights = official_weights(parent_weights)
    float_type = "fp16" if scheme == "fp16" else "fp32"  # the graph's; the manifest's precision is the scheme
    nbits = (
        NBits(
            NBITS[scheme],
            block_size,
            accuracy_level,
            keep,
            head=head,
            head_bits=head_bits,
            head_block_size=head_block_size,
            mlp_block_size=mlp_block_size,
        )
        if scheme in NBITS
        else None
    )
    fp32_bytes = weights.numel() * 4
    threshold = min(derive.PROTOBUF_LIMIT, external_data.STREAM_THRESHOLD)  # streamed, as export does
    external = parent_external or fp32_bytes * (0.5 if scheme == "fp16" else 1) > threshold
    store = external_data.ExternalData(stage) if external else None
    bar = Progress(
        f"quantize: {scheme} layers",
        cfg.num_layers,
        log,
        written=(lambda: store.written) if store is not None else None,
    )
    try:
        graph = build_model(cfg, weights, float_type, opset, store, progress=bar.update, nbits=nbits)
    finally:
        bar.close()
        if store is not None:
            store.close()
    (stage / MODEL_FILE).write_bytes(graph.SerializeToString())
    return graph, (DATA_FILE if external else None)


# ---------------------------------------------------------------- the stage


@claims_output(lambda a: [a["src_dir"], a["calibration"]])
def quantize_onnx(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    scheme: str,
    calibration=None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    keep_fp32: Sequence[str] | None = None,
    accept_loss: bool = False,
    overwrite: bool = False,
    eval_text: str | None = None,
    check: str = "auto",
    head_bits: int | None = None,
    head_block_size: int | None = None,
    mlp_block_size: int | None = None,
    log=None,
) -> Path:
    """Write `out_dir` = `src_dir` quantized by `scheme`, checked against its parent (glm_export.compare: GLM's
    cases, then held-out text in the model's language against BUDGETS[scheme]).

    keep_fp32: roles (KEEP_FP32) and node names left fp32; None = DEFAULT_KEEP_FP32 of the scheme. fp16 keeps
    nothing fp32 (every weight is fp16): a non-empty keep_fp32 is refused there.
    calibration (qdq-int8 only): None = the bundled held-out text's calibration half in the model's language,
    a text file path, or a list of feed dicts in the graph's IO. eval_text: held-out text for the report
    (default: the bundled text's other half).
    """
    from glm_runtime.session import OnnxRuntimeSession

    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if calibration is not None and scheme != "qdq-int8":
        raise QuantizeError(f"calibration data is only used by qdq-int8, not {scheme}; drop --calibration")
    if keep_fp32 and scheme not in DEFAULT_KEEP_FP32:  # given, for a scheme that keeps nothing fp32
        raise QuantizeError(
            f"--keep-fp32 does not apply to --scheme {scheme}, which writes every weight {scheme} (its fp32 islands, "
            f"LayerNorm and the attention scores, are fixed); it applies to {', '.join(DEFAULT_KEEP_FP32)}, with the "
            f"roles {', '.join(KEEP_FP32)} or node names: drop --keep-fp32"
        )
    for name, value in (
        ("block-size", block_size),
        ("accuracy-level", accuracy_level),
        ("head-bits", head_bits),
        ("head-block-size", head_block_size),
        ("mlp-block-size", mlp_block_size),
    ):
        if value is not None and scheme not in NBITS:
            raise QuantizeError(f"--{name} applies to --scheme int4-weight or int8-weight, not {scheme}; drop it")
    recipe = (
        nbits_recipe(
            scheme,
            keep_fp32,
            block_size=block_size,
            mlp_block_size=mlp_block_size,
            accuracy_level=accuracy_level,
            head_bits=head_bits,
            head_block_size=head_block_size,
        )
        if scheme in NBITS
        else None
    )  # bad values: nothing read
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest, src_model, tok = read_parent(src_dir)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if scheme in STREAMED:
        plain_export(manifest, src_dir)
        if scheme == "fp16" and manifest.precision != "fp32":
            raise QuantizeError(f"{src_dir} is already {manifest.precision}; fp16 is made from an fp32 export")
        return _quantize_streamed(
            manifest,
            src_dir,
            src_model,
            tok,
            Path(out_dir),
            scheme,
            keep_fp32=keep_fp32,
            recipe=recipe,
            accept_loss=accept_loss,
            overwrite=overwrite,
            eval_text=eval_text,
            check=check,
            say=say,
        )
    if manifest.precision != "fp32":
        raise QuantizeError(
            f"{src_dir} has precision {manifest.precision!r}; {scheme} is made from the fp32 export "
            f"it came from ({manifest.parent.get('path', 'its parent')})"
        )
    parent_bytes = sum(p.stat().st_size for p in src_dir.glob(f"{MODEL_FILE}*"))
    if parent_bytes > ORT_QUANTIZER_MAX_BYTES:
        raise QuantizeError(
            f"{scheme} runs ONNX Runtime's quantizer, which holds the whole {parent_bytes / 1e9:.1f} GB "
            f"model in memory more than once; use --scheme int8-weight or int4-weight, which are "
            f"written one tensor at a time"
        )
    # read_parent verified the parent's hashes just now
    feeds, calib_record = (
        ([], None)
        if scheme != "qdq-int8"
        else calibration_data(OnnxRuntimeSession(src_dir, verify=False), tok, calibration)
    )
    model = _named(onnx.load(src_model))
    keep_fp32 = default_keep_fp32(scheme) if keep_fp32 is None else tuple(keep_fp32)
    if scheme != "fp16" and "head" not in keep_fp32:
        model = head_as_matmul(model)
    exclude = excluded_nodes(model, keep_fp32) if scheme != "fp16" else []
    with staged_folder(out_dir, overwrite=overwrite) as stage, tempfile.TemporaryDirectory() as tmp:
        settings = _SCHEMES[scheme](
            model, Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", exclude, feeds=feeds, config=manifest.config
        )
        quantized = onnx.load(Path(tmp) / "out.onnx")
        data_file = save_graph(quantized, stage)
        findings = trt_findings(stage / MODEL_FILE)  # int8-dynamic / int4 are ONNX Runtime-only: recorded
        if findings and scheme in ("qdq-int8", "fp16"):
            raise QuantizeError(f"{scheme} graph would not parse in TensorRT: {findings[:3]}")
        extra = dict(manifest.extra, model_file=MODEL_FILE, external_data=data_file)
        extra["quantization"] = {
            "scheme": scheme,
            "keep_fp32": list(keep_fp32),
            "excluded_nodes": exclude,
            "block_size": None,
            "accuracy_level": None,  # an NBits scheme's only
            "calibration": calib_record,
            "ops": op_histogram(quantized),
            "trt_findings": None if findings is None else findings[:10],
            "trt_finding_count": None if findings is None else len(findings),
            "accept_loss": accept_loss,
            **settings,
        }
        precision = "fp16" if scheme == "fp16" else scheme
        child = child_manifest(
            manifest,
            src_dir,
            stage,
            precision=precision,
            io=io_table(manifest.config, "fp16" if scheme == "fp16" else manifest.precision),
            extra=extra,
        )
        _judge_and_seal(stage, src_dir, child, tok, scheme, eval_text=eval_text, accept_loss=accept_loss)
    return out_dir


def _judge_and_seal(
    stage: Path,
    src_dir: Path,
    child: Any,
    tok: Any,
    scheme: str,
    *,
    eval_text: str | None,
    accept_loss: bool,
    method: str = "whole",
    say=None,
) -> None:
    """Judge the staged child against its parent; a structural miss, or a text miss without accept_loss,
    raises BudgetError (nothing is written); else the parity record goes into the child's manifest."""
    result = judge_child(
        stage, src_dir, child, tok, stage_name="quantize", scheme=scheme, eval_text=eval_text, method=method, log=say
    )
    structural = [f for f in result.failures if not f.startswith("text: ")]
    misses = result.text["misses"]
    if structural or (misses and not accept_loss):
        raise BudgetError(
            f"{scheme} of {src_dir} misses its accuracy budget: {'; '.join(structural + misses)} (max logit "
            f"diff {result.text['max_logit_diff']:.4g} over {result.text['positions']} positions of "
            f"{result.text['language']} text); nothing was written. Keep more layers in fp32 (--keep-fp32), use "
            f"another scheme, or pass --accept-loss to write it anyway with the loss recorded"
        )
    child.parity = dict(result.to_dict(), accept_loss=accept_loss)
    write_manifest(stage, child)


def _quantize_streamed(
    manifest: Any,
    src_dir: Path,
    src_model: Path,
    tok: Any,
    out_dir: Path,
    scheme: str,
    *,
    keep_fp32,
    recipe: dict[str, Any] | None,
    accept_loss: bool,
    overwrite: bool,
    eval_text: str | None,
    check: str,
    say,
) -> Path:
    """recipe: nbits_recipe's for int4-weight / int8-weight, None for fp16."""
    from glm_export.derive import check_free_space, check_method
    from glm_export.weights import read_onnx_weights

    keep_fp32 = recipe["keep_fp32"] if recipe else ()  # fp16: every weight is fp16, none is kept fp32
    r = recipe or {}
    head = r.get("head") or {}  # the quantized head's format; empty when it stays fp32 (or fp16)
    parent_graph = onnx.load(str(src_model), load_external_data=False)
    keep = keep_rule(manifest.config, keep_fp32, {n.name for n in parent_graph.graph.node}) if scheme in NBITS else None
    parent_weights = read_onnx_weights(src_model, parent_graph.graph)
    method = check_method(check, parent_weights)
    fp32_bytes = parent_weights.numel() * 4
    check_free_space(
        out_dir.parent,
        fp32_bytes // (2 if scheme == "fp16" else 4 if scheme == "int8-weight" else 7),
        f"the {scheme} child of {src_dir}",
    )
    say(f"quantize: {scheme} of {src_dir} ({manifest.precision}), rebuilt one tensor at a time; check: {method}")
    if recipe:  # every default resolved
        head_text = "fp32" if r["head"] is None else "{bits}-bit in blocks of {block_size}".format(**r["head"])
        say(
            f"quantize: weights {NBITS[scheme]}-bit, attention in blocks of {r['block_size']}, MLP in blocks of "
            f"{r['mlp_block_size']}; head {head_text}; accuracy level {r['accuracy_level']}; kept fp32: "
            f"{', '.join(keep_fp32)}"
        )
    with staged_folder(out_dir, overwrite=overwrite) as stage:
        graph, data_file = rebuild(
            parent_graph,
            parent_weights,
            stage,
            manifest.config,
            scheme,
            keep,
            head="head" not in keep_fp32,
            block_size=r.get("block_size"),
            accuracy_level=r.get("accuracy_level"),
            log=say,
            head_bits=head.get("bits"),
            head_block_size=head.get("block_size"),
            mlp_block_size=r.get("mlp_block_size"),
        )
        del parent_graph
        ops = op_histogram(graph)
        kept = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".weight.T")]
        del graph
        findings = trt_findings(stage / MODEL_FILE)  # MatMulNBits is ONNX Runtime-only: recorded
        if findings and scheme == "fp16":
            raise QuantizeError(f"{scheme} graph would not parse in TensorRT: {findings[:3]}")
        settings = (
            {"weights": "fp16", "recipe": "glm_export.onnx_graph.build_model(float_type='fp16')"}
            if scheme == "fp16"
            else {
                "weights": f"int{NBITS[scheme]} symmetric, blocks of {r['block_size']} along K (MatMulNBits)"
                + (f", the MLP's in blocks of {r['mlp_block_size']}" if r["mlp_block_size"] != r["block_size"] else ""),
                "packing": f"onnxruntime.capi._pybind_state.quantize_matmul_{NBITS[scheme]}bits",
                "activations": f"fp32 (MatMulNBits accuracy_level {r['accuracy_level']})",
            }
        )
        extra = dict(manifest.extra, model_file=MODEL_FILE, external_data=data_file)
        extra["quantization"] = {
            "scheme": scheme,
            "keep_fp32": list(keep_fp32),
            "excluded_nodes": kept,
            **{k: r.get(k) for k in ("block_size", "mlp_block_size", "accuracy_level", "head")},
            "calibration": None,
            "ops": ops,
            "streamed": True,
            "trt_findings": None if findings is None else findings[:10],
            "trt_finding_count": None if findings is None else len(findings),
            "accept_loss": accept_loss,
            **settings,
        }
        precision = "fp16" if scheme == "fp16" else scheme
        child = child_manifest(
            manifest,
            src_dir,
            stage,
            precision=precision,
            io=io_table(manifest.config, "fp16" if scheme == "fp16" else "fp32"),
            extra=extra,
        )
        _judge_and_seal(
            stage, src_dir, child, tok, scheme, eval_text=eval_text, accept_loss=accept_loss, method=method, say=say
        )
    return out_dir
