"""Quantize an exported fp32 GLM folder: int8-dynamic, int4-weight, qdq-int8 (explicit Q/DQ for TensorRT), fp16.

In: a glmx ONNX folder (precision fp32), a scheme, and for qdq-int8 real calibration text (or prepared feeds).
Out: a new folder (model.onnx + tokenizer + manifest of kind "onnx", precision = the scheme, the parent's IO
table) whose manifest records the scheme, its settings, the parent and the accuracy report; a budget miss
writes nothing unless accept_loss=True.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from glm_export.compare import BudgetError, blank_calls, heldout_text, run_calls, strip_provenance, \
    text_windows
from glm_export.derive import child_manifest, judge_child, op_histogram, read_parent, save_graph, trt_findings
from glm_runtime.errors import GLMXError
from glm_runtime.iotable import io_table, required_inputs
from glm_runtime.manifest import claims_output, sha256_file, staged_folder, write_manifest

SCHEMES = ("int8-dynamic", "int4-weight", "qdq-int8", "fp16")
# Roles that may stay fp32. "embedding": the word-embedding Gather (never quantized: only MatMul weights are);
# "head": the tied output head. Keeping the head fp32 is the default: see BUDGETS and the measured figures.
KEEP_FP32 = ("embedding", "head", "first-layer", "last-layer")  # roles; node names may be given too
LAYER_NODE = re.compile(r"/transformer\.layers\.(\d+)\.")
# What stays fp32 unless the caller says otherwise. The embedding is a Gather (never quantized) and the tied
# head is the most sensitive matrix (quantizing it cost the bundled model 1-3 points of top-1). The int8
# activation schemes also keep layer 0: in the bundled model (trained with pretrain's "local" position init) it
# holds the neighbour-attention heads on a large sinusoidal table, and per-tensor int8 activations there cost
# 2-3 points of top-1 (0.964 -> 0.995 int8-dynamic, 0.973 -> 0.998 qdq-int8; benchmarks/quantization.py); on a
# 24-layer model that is 1/24 of the weights.
DEFAULT_KEEP_FP32 = {"int8-dynamic": ("embedding", "head", "first-layer"),
                     "qdq-int8": ("embedding", "head", "first-layer")}
DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL = 32, 4  # int4-weight: weights per scale, MatMulNBits compute level


def default_keep_fp32(scheme: str) -> tuple[str, ...]:
    """What `scheme` leaves fp32 when the caller names nothing: DEFAULT_KEEP_FP32, else embedding and head."""
    return DEFAULT_KEEP_FP32.get(scheme, ("embedding", "head"))
MIN_CALIBRATION_TOKENS = 256  # fewer real tokens than this gives scales from a handful of activations
MIN_CALIBRATION_CALLS = 8
CALIBRATION_WINDOW = 32  # tokens per calibration window: half context pass, half span (multi-token + decode steps)


logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # per-node INFO chatter


class QuantizeError(GLMXError, ValueError):
    """A quantization request that cannot be honoured (bad scheme, no or unusable calibration data, ...)."""


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


def excluded_nodes(model: onnx.ModelProto, keep_fp32: Sequence[str]) -> list[str]:
    """Node names the quantizer must leave alone: roles from KEEP_FP32 plus any node names given."""
    if "embedding" not in keep_fp32:
        raise QuantizeError("the embedding Gather always stays fp32 (only MatMul weights are quantized); keep "
                            "'embedding' in keep_fp32")
    names = {n.name for n in model.graph.node}
    unknown = [k for k in keep_fp32 if k not in KEEP_FP32 and k not in names]
    if unknown:
        raise QuantizeError(f"--keep-fp32 {unknown[0]!r} is neither a role ({', '.join(KEEP_FP32)}) nor a node name "
                            f"of the graph; pass one of those roles, or a node name as model.onnx spells it")
    out = [k for k in keep_fp32 if k in names]
    if "head" in keep_fp32:
        out.append(head_node(model).name)
    layers = sorted({int(m.group(1)) for n in model.graph.node if (m := LAYER_NODE.match(n.name))})
    consts = {t.name for t in model.graph.initializer}
    for role, index in (("first-layer", layers[:1]), ("last-layer", layers[-1:])):
        if role in keep_fp32 and index:  # the layer's weight MatMuls (QKV, dense, h->4h, 4h->h)
            out += [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts
                    and n.name.startswith(f"/transformer.layers.{index[0]}.")]
    # attention's Q.K^T and probs.V multiply two activations: they stay fp32 in every scheme (FIELD: fp16/int8
    # overflow and accuracy loss start in the scores), and so do the KV cache tensors that feed them
    out += [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]
    return out


# ---------------------------------------------------------------- calibration

class FeedReader:
    """onnxruntime CalibrationDataReader over prepared feed dicts (get_next -> feeds or None)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.feeds, self.pos = list(feeds), 0

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return dict(self.feeds[self.pos - 1])

    def rewind(self) -> None:
        self.pos = 0


def calibration_feeds(parent: Any, tok: Any, text: str, source: str) -> list[dict[str, np.ndarray]]:
    """Real text through the model's own IO (glm_export.compare's calls on the parent session): per window, a
    context pass (past empty), a multi-token span call and two single-token decode steps (past non-empty),
    each past made by the fp32 parent itself."""
    chunks = text_windows(tok, text, parent.config.vocab_size, CALIBRATION_WINDOW, 64)
    tokens = len(chunks) * CALIBRATION_WINDOW
    if tokens < MIN_CALIBRATION_TOKENS:
        raise QuantizeError(f"calibration text {source} gives {tokens} tokens in whole windows; qdq-int8 needs at "
                            f"least {MIN_CALIBRATION_TOKENS} tokens of real text (pass a longer --calibration file)")
    feeds: list[dict[str, np.ndarray]] = []
    for chunk in chunks:
        (context, span), _ = blank_calls(tok, chunk)
        t = span.input_ids.shape[1]
        pieces = [(0, t - 2), (t - 2, t - 1), (t - 1, t)]  # a multi-token chunk, then two decode steps
        calls = [context] + [type(span)(span.input_ids[:, lo:hi], span.position_ids[:, :, lo:hi],
                                        span.block[:, lo:hi, lo:hi], span.keep[:, lo:hi]) for lo, hi in pieces]
        run_calls(parent, calls, record=feeds)
    return feeds


def check_calibration_feeds(feeds: Sequence[Mapping[str, Any]], io: Mapping[str, Any]) -> None:
    """Every feed must match the IO table (names, dtypes, ranks, fixed dims, total = past + seq), and the set
    must cover both a context pass (past 0) and a decode step (past > 0)."""
    if len(feeds) < MIN_CALIBRATION_CALLS:
        raise QuantizeError(f"calibration has {len(feeds)} feeds; qdq-int8 needs at least {MIN_CALIBRATION_CALLS} "
                            f"(context passes and decode steps of real text)")
    entries = {e["name"]: e for e in io["inputs"]}
    required = {e["name"] for e in required_inputs(io)}  # logits_start is optional
    pasts = set()
    for k, feed in enumerate(feeds):
        if not required <= set(feed) <= set(entries):
            diff = sorted((required - set(feed)) | (set(feed) - set(entries)))
            raise QuantizeError(f"calibration feed {k}: names differ from the graph inputs at {diff[:3]}")
        dims: dict[str, int] = {}
        for name, entry in entries.items():
            if name not in feed:
                continue
            value = np.asarray(feed[name])
            if value.dtype.name != entry["dtype"] or value.ndim != len(entry["shape"]):
                raise QuantizeError(f"calibration feed {k}: {name} is {value.dtype.name} of shape {list(value.shape)}, "
                                    f"the graph takes {entry['dtype']} {entry['shape']}")
            for want, got in zip(entry["shape"], value.shape):
                if isinstance(want, int) and want != got or dims.setdefault(str(want), got) != got:
                    raise QuantizeError(f"calibration feed {k}: {name} has shape {list(value.shape)}, which does "
                                        f"not fit {entry['shape']} (dims so far {dims})")
        if dims["total_seq"] != dims["past_seq"] + dims["seq"]:
            raise QuantizeError(f"calibration feed {k}: attention_mask covers {dims['total_seq']} keys, not "
                                f"past {dims['past_seq']} + seq {dims['seq']}")
        pasts.add(dims["past_seq"] > 0)
    if pasts != {False, True}:
        raise QuantizeError("calibration feeds must include context passes (past_seq 0) and decode steps "
                            "(past_seq > 0), so the scales cover both shapes")


def _calibration(parent: Any, tok: Any, calibration) -> tuple[list[dict], dict[str, Any]]:
    if calibration is None:
        text, record = heldout_text(tok.kind, half=0)  # the half the accuracy report never reads
        feeds = calibration_feeds(parent, tok, text, record["source"])
    elif isinstance(calibration, (str, Path)):
        path = Path(calibration)
        if not path.is_file():
            raise QuantizeError(f"calibration file {path} does not exist; pass a text file of real text")
        try:
            text = strip_provenance(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise QuantizeError(f"calibration file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                f"save it as UTF-8") from None
        if not text.strip():
            raise QuantizeError(f"calibration file {path} is empty: qdq-int8 will not invent scales without data")
        feeds = calibration_feeds(parent, tok, text, str(path))
        record = {"source": str(path), "sha256": sha256_file(path)}
    else:
        feeds = list(calibration)
        record = {"source": "feeds given by the caller"}
    if not feeds:
        raise QuantizeError("no calibration data: qdq-int8 needs real text (a file) or feeds, never random scales")
    check_calibration_feeds(feeds, parent.io)
    record.update(calls=len(feeds), tokens=int(sum(f["input_ids"].size for f in feeds)))
    return feeds, record


# ---------------------------------------------------------------- the schemes

def int8_dynamic_file(src: Path, dst: Path, exclude: Sequence[str] = ()) -> None:
    """glmx's int8-dynamic recipe on a graph file: MatMuls with constant weights, int8 per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                     extra_options={"MatMulConstBOnly": True})  # attention's activation x activation stays fp32


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


def _int4_weight(model: onnx.ModelProto, src: Path, dst: Path, exclude: list[str], *, block_size: int,
                 accuracy_level: int, **_) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizeError(f"accuracy_level must be 0..4 (MatMulNBits), got {accuracy_level}")
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
    q.process()
    onnx.save(q.model.model, dst)
    return {"weights": f"int4 symmetric, blocks of {block_size}", "accuracy_level": accuracy_level}


def _qdq_int8(model: onnx.ModelProto, src: Path, dst: Path, exclude: list[str], *, feeds: list[dict],
              **_) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    onnx.save(model, src)
    quantize_static(str(src), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,  # TensorRT: zero point 0
                                   "MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                   "OpTypesToExcludeOutputQuantization": ["MatMul"]})  # Q/DQ on inputs only
    return {"weights": "int8 symmetric per output channel (axis 1)", "activations": "int8 symmetric, MinMax"}


def graph_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Official-name weights back from an fp32 glmx graph (MatMul weights are stored as `<name>.T`)."""
    out = {}
    for t in model.graph.initializer:
        if t.name.startswith("const/"):
            continue
        a = numpy_helper.to_array(t)
        out[t.name[:-2] if t.name.endswith(".weight.T") else t.name] = a.T if t.name.endswith(".weight.T") else a
    return out


def _fp16(model: onnx.ModelProto, src: Path, dst: Path, exclude: list[str], *, config, **_) -> dict[str, Any]:
    """fp16 is the exporter's own fp16 graph (LayerNorm, QK/mask/softmax in fp32 islands), rebuilt from the
    parent's weights, so there is one fp16 recipe in glmx."""
    from glm_export.onnx_graph import build_model
    from glm_runtime.config import GLMConfig
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    onnx.save(build_model(GLMConfig.from_dict(config), graph_weights(model), "fp16", opset), dst)
    # judged like every child: against the fp32 parent with the fp16 tolerance on GLM's cases (glm_export.compare)
    return {"weights": "fp16", "recipe": "glm_export.onnx_graph.build_model(precision='fp16')"}


_SCHEMES = {"int8-dynamic": _int8_dynamic, "int4-weight": _int4_weight, "qdq-int8": _qdq_int8, "fp16": _fp16}


# ---------------------------------------------------------------- the stage

@claims_output(lambda a: [a["src_dir"], a["calibration"]])
def quantize_onnx(src_dir: str | Path, out_dir: str | Path, *, scheme: str, calibration=None,
                  block_size: int | None = None, accuracy_level: int | None = None,
                  keep_fp32: Sequence[str] | None = None, accept_loss: bool = False, overwrite: bool = False,
                  eval_text: str | None = None) -> Path:
    """Write `out_dir` = `src_dir` quantized by `scheme`, checked against its parent (glm_export.compare: GLM's
    cases, then held-out text in the model's language against BUDGETS[scheme]).

    keep_fp32: roles (KEEP_FP32) and node names left fp32; None = DEFAULT_KEEP_FP32 of the scheme, else
    embedding and head.
    calibration (qdq-int8 only): None = the bundled held-out text's calibration half in the model's language,
    a text file path, or a list of feed dicts in the graph's IO. eval_text: held-out text for the report
    (default: the bundled text's other half).
    """
    from glm_runtime.session import OnnxRuntimeSession
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if calibration is not None and scheme != "qdq-int8":
        raise QuantizeError(f"calibration data is only used by qdq-int8, not {scheme}; drop --calibration")
    for name, value in (("block-size", block_size), ("accuracy-level", accuracy_level)):
        if value is not None and scheme != "int4-weight":
            raise QuantizeError(f"--{name} applies to --scheme int4-weight, not {scheme}; drop it")
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    accuracy_level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest, src_model, tok = read_parent(src_dir)
    if manifest.precision != "fp32":
        raise QuantizeError(f"{src_dir} has precision {manifest.precision!r}; quantize the fp32 export it came from "
                            f"({manifest.parent.get('path', 'its parent')})")
    # read_parent verified the parent's hashes just now
    feeds, calib_record = ([], None) if scheme != "qdq-int8" else \
        _calibration(OnnxRuntimeSession(src_dir, verify=False), tok, calibration)
    model = _named(onnx.load(src_model))
    keep_fp32 = default_keep_fp32(scheme) if keep_fp32 is None else tuple(keep_fp32)
    if scheme != "fp16" and "head" not in keep_fp32:
        model = head_as_matmul(model)
    exclude = excluded_nodes(model, keep_fp32) if scheme != "fp16" else []
    with staged_folder(out_dir, overwrite=overwrite) as stage, tempfile.TemporaryDirectory() as tmp:
        settings = _SCHEMES[scheme](model, Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", exclude,
                                    block_size=block_size, accuracy_level=accuracy_level, feeds=feeds,
                                    config=manifest.config)
        quantized = onnx.load(Path(tmp) / "out.onnx")
        data_file = save_graph(quantized, stage)
        findings = trt_findings(stage / "model.onnx")  # int8-dynamic / int4 are ONNX Runtime-only: recorded
        if findings and scheme in ("qdq-int8", "fp16"):
            raise QuantizeError(f"{scheme} graph would not parse in TensorRT: {findings[:3]}")
        extra = dict(manifest.extra, model_file="model.onnx", external_data=data_file)
        extra["quantization"] = {"scheme": scheme, "keep_fp32": list(keep_fp32), "excluded_nodes": exclude,
                                 "block_size": block_size if scheme == "int4-weight" else None,
                                 "accuracy_level": accuracy_level if scheme == "int4-weight" else None,
                                 "calibration": calib_record, "ops": op_histogram(quantized),
                                 "trt_findings": None if findings is None else findings[:10],
                                 "trt_finding_count": None if findings is None else len(findings),
                                 "accept_loss": accept_loss, **settings}
        precision = "fp16" if scheme == "fp16" else scheme
        child = child_manifest(manifest, src_dir, stage, precision=precision,
                               io=io_table(manifest.config, "fp16" if scheme == "fp16" else manifest.precision),
                               extra=extra)
        result = judge_child(stage, src_dir, child, tok, stage_name="quantize", scheme=scheme, eval_text=eval_text)
        structural = [f for f in result.failures if not f.startswith("text: ")]
        misses = result.text["misses"]
        if structural or (misses and not accept_loss):
            raise BudgetError(
                f"{scheme} of {src_dir} misses its accuracy budget: {'; '.join(structural + misses)} (max logit "
                f"diff {result.text['max_logit_diff']:.4g} over {result.text['positions']} positions of "
                f"{result.text['language']} text); nothing was written. Keep more layers in fp32 (--keep-fp32), use "
                f"another scheme, or pass --accept-loss to write it anyway with the loss recorded")
        child.parity = dict(result.to_dict(), accept_loss=accept_loss)
        write_manifest(stage, child)
    return out_dir
