"""Optimize an exported GLM folder offline, keeping the graph standard ONNX that TensorRT can parse.

In: a glmx ONNX folder and a level. "fuse" (default): glmx's own rewrite, each written-out GeLU subgraph
becomes one standard `Gelu` node (opset raised to 20); "basic" / "extended": ONNX Runtime's offline optimizer.
Out: a new folder re-checked on the exporter's parity cases against the torch reference rebuilt from the
graph's own weights, and against its parent on held-out text; the manifest records what changed.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from glm_export.compare import BudgetError
from glm_export.derive import child_manifest, judge_child, op_histogram, read_parent, save_graph, trt_findings
from glm_export.onnx_graph import MAX_OPSET
from glm_runtime.errors import GLMXError
from glm_runtime.manifest import DATA_FILE, MODEL_FILE, claims_output, staged_folder, write_manifest
from glm_runtime.session import quiet_options

LEVELS = ("fuse", "basic", "extended")
STANDARD_DOMAINS = ("", "ai.onnx")
GELU_OPSET = 20  # the first opset with a standard Gelu op
ORT_LEVEL_MAX_BYTES = 2**31  # ONNX Runtime's optimizer holds the whole model: larger parents use "fuse"
assert GELU_OPSET <= MAX_OPSET
CONST_RTOL = 1e-3  # GeLU constants are matched within fp16 rounding (0.044715 is stored as 0.04471 in fp16)
GELU_A, GELU_K, SQRT2 = 0.044715, 0.7978845608028654, float(np.sqrt(2.0))


class OptimizeError(GLMXError, ValueError):
    """The optimized graph is unusable here: non-standard ops, TensorRT findings, or a parity miss."""


# ---------------------------------------------------------------- ONNX Runtime levels (basic, extended)


def ort_optimize(src: Path, dst: Path, level: str) -> None:
    """Let ONNX Runtime fold constants and drop redundant nodes (basic), or also fuse (extended), to a file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), quiet_options(opts), providers=["CPUExecutionProvider"])


def nonstandard_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


# ---------------------------------------------------------------- glmx level (fuse): GeLU subgraphs -> Gelu


class GraphIndex:
    """Who produces and who reads each tensor, and the scalar constants (initializers that are not inputs)."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for name in set(n.input):
                self.readers.setdefault(name, []).append(n)
        overridable = {i.name for i in graph.input}  # an initializer that is also an input may be fed
        self.scalars = {
            t.name: float(numpy_helper.to_array(t).reshape(-1)[0])
            for t in graph.initializer
            if t.name not in overridable
            and np.prod(t.dims, dtype=np.int64) == 1
            and t.data_type
            in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
        }
        self.outputs = {o.name for o in graph.output}

    def node(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        """The standard-domain `op_type` node that writes `tensor`, or None."""
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op_type and n.domain in STANDARD_DOMAINS else None

    def operand(self, node: onnx.NodeProto | None, value: float, commutative: bool = True) -> str | None:
        """For a binary node with one input a scalar constant ~= value: the other input, else None."""
        if node is None or len(node.input) != 2:
            return None
        a, b = node.input
        for const, other in ((b, a), (a, b)) if commutative else ((b, a),):
            v = self.scalars.get(const)
            if v is not None and np.isclose(v, value, rtol=CONST_RTOL, atol=0.0):
                return other
        return None


@dataclass
class GeluMatch:
    x: str  # the GeLU's input
    out: onnx.NodeProto  # the final Mul, whose output the Gelu node takes over
    nodes: list[onnx.NodeProto]  # every node of the subgraph, `out` included
    approximate: str  # "tanh" | "none" (erf)


# tanh: x2 = Mul(x, x); ax2 = Mul(x2, a); in = Add(1, ax2); xin = Mul(x, in); arg = Mul(xin, k); t = Tanh(arg)
# erf:  d = Div(x, sqrt 2); t = Erf(d)
# both: out = Mul(Mul(x, 0.5), Add(t, 1))       (operands of Mul and Add in either order)
def _tanh_arg(ix: GraphIndex, arg: str, x: str) -> list[onnx.NodeProto] | None:
    """The nodes making arg = k * x * (1 + a * x * x) from x, or None."""
    arg_n = ix.node(arg, "Mul")
    xin_n = ix.node(ix.operand(arg_n, GELU_K) or "", "Mul")
    if xin_n is None or x not in xin_n.input:
        return None
    inner = xin_n.input[1] if xin_n.input[0] == x else xin_n.input[0]
    inner_n = ix.node(inner, "Add")
    ax2_n = ix.node(ix.operand(inner_n, 1.0) or "", "Mul")
    x2_n = ix.node(ix.operand(ax2_n, GELU_A) or "", "Mul")
    if x2_n is None or list(x2_n.input) != [x, x]:
        return None
    return [x2_n, ax2_n, inner_n, xin_n, arg_n]


def _erf_arg(ix: GraphIndex, arg: str, x: str) -> list[onnx.NodeProto] | None:
    """The node making arg = x / sqrt 2 (a Div, or a Mul by 1/sqrt 2) from x, or None."""
    div, mul = ix.node(arg, "Div"), ix.node(arg, "Mul")
    if div is not None and ix.operand(div, SQRT2, commutative=False) == x:
        return [div]
    if mul is not None and ix.operand(mul, 1.0 / SQRT2) == x:
        return [mul]
    return None


def match_gelu(ix: GraphIndex, out: onnx.NodeProto) -> GeluMatch | None:
    """The GeLU subgraph ending at `out` (a Mul), when its intermediate tensors are read nowhere else."""
    if out.op_type != "Mul" or out.domain not in STANDARD_DOMAINS or len(out.input) != 2:
        return None
    for half, plus in itertools.permutations(out.input):
        half_n, plus_n = ix.node(half, "Mul"), ix.node(plus, "Add")
        x, t = ix.operand(half_n, 0.5), ix.operand(plus_n, 1.0)
        if x is None or t is None:
            continue
        for act, approximate, inner in (("Tanh", "tanh", _tanh_arg), ("Erf", "none", _erf_arg)):
            act_n = ix.node(t, act)
            body = act_n and inner(ix, act_n.input[0], x)
            if body:
                match = GeluMatch(x, out, body + [act_n, half_n, plus_n, out], approximate)
                return match if _self_contained(ix, match) else None
    return None


def _key(node: onnx.NodeProto) -> tuple[str, ...]:
    """A node's identity: its output names (each tensor is written once in an ONNX graph)."""
    return tuple(node.output)


def _self_contained(ix: GraphIndex, match: GeluMatch) -> bool:
    """Removing the subgraph loses nothing: its inner tensors are neither graph outputs nor read outside."""
    inside = {_key(n) for n in match.nodes}
    inner = [o for n in match.nodes if _key(n) != _key(match.out) for o in n.output]
    return all(o not in ix.outputs and all(_key(r) in inside for r in ix.readers.get(o, [])) for o in inner)


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model at default-domain opset >= target (onnx's version converter: e.g. ReduceMax's axes become an
    input at 18), with the IR version that opset needs."""
    current = default_opset(model)
    if current >= target:
        return model
    from onnx import version_converter

    try:
        model = version_converter.convert_version(model, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors / ConvertErrors
        raise OptimizeError(
            f"onnx's version converter cannot take this graph from opset {current} to "
            f"{target} (Gelu needs {GELU_OPSET}): {exc}"
        ) from None
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, subgraphs (If / Loop bodies) included."""
    used = set()
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                used |= _used_names(g)
    return used


def drop_unused(graph: onnx.GraphProto) -> list[str]:
    """Remove initializers no node reads, except graph inputs' (optional inputs such as logits_start), and
    value_info of tensors no node writes any more; returns the initializers removed."""
    keep = _used_names(graph) | {i.name for i in graph.input} | {o.name for o in graph.output}
    dead = [t.name for t in graph.initializer if t.name not in keep]
    kept = [t for t in graph.initializer if t.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    written = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in written]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return dead


def fuse_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Replace every written-out GeLU subgraph by one standard Gelu node on the same input and output names.

    Out: (model at opset >= 20 when anything was fused, record {"gelu_fused", "approximate", "opset",
    "initializers_removed"}). A graph with nothing to fuse comes back unchanged.
    """
    opset = default_opset(model)
    if not _find_gelus(model):
        return model, {"gelu_fused": 0, "approximate": [], "opset": [opset, opset], "initializers_removed": []}
    model = raise_opset(model, GELU_OPSET)  # before the rewrite: the converter does not know Gelu below 20
    matches = _find_gelus(model)
    final = {_key(m.out): m for m in matches}
    dropped = {_key(n) for m in matches for n in m.nodes}
    nodes = []
    for n in model.graph.node:
        m = final.get(_key(n))
        if m is not None:  # at the final Mul's place: x is written before, its readers come after
            name = n.name[: -len("/out")] if n.name.endswith("/out") else n.name or m.out.output[0]
            nodes.append(
                helper.make_node("Gelu", [m.x], list(n.output), name=f"{name}/Gelu", approximate=m.approximate)
            )
        elif _key(n) not in dropped:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    removed = drop_unused(model.graph)
    return model, {
        "gelu_fused": len(matches),
        "approximate": sorted({m.approximate for m in matches}),
        "opset": [opset, default_opset(model)],
        "initializers_removed": sorted(removed),
    }


def _find_gelus(model: onnx.ModelProto) -> list[GeluMatch]:
    ix = GraphIndex(model.graph)
    return [m for n in model.graph.node if (m := match_gelu(ix, n)) is not None]


# ---------------------------------------------------------------- the stage


def optimized_graph(src_model: Path, level: str, num_layers: int, tmp: Path) -> tuple[onnx.ModelProto, dict]:
    """(the graph at `level`, what the level did). "fuse" must leave one Gelu per layer; ORT levels must leave
    only standard ops. "fuse" runs no ORT pass: on glmx graphs basic changes nothing in fp32, and in fp16 it
    saves CPU-only rewrites (Casts to fp32 around ops without an fp16 CPU kernel, Gelu's function body inlined)."""
    if level == "fuse":  # a graph-only rewrite: the weights stay in the parent's data file, never loaded
        model, rewrites = fuse_gelu(onnx.load(src_model, load_external_data=False))
        gelus = sum(n.op_type == "Gelu" for n in model.graph.node)
        if gelus != num_layers:
            raise OptimizeError(
                f"fuse found {gelus} GeLU subgraphs (or Gelu nodes) for {num_layers} layers: the "
                f"graph is not in the form glm_export.onnx_graph writes; use level='basic'"
            )
        return model, {"tool": "glmx GeLU fusion (glm_export.optimize.fuse_gelu)", "rewrites": rewrites}
    ort_optimize(src_model, tmp / MODEL_FILE, level)
    model = onnx.load(tmp / MODEL_FILE)
    odd = nonstandard_ops(model)
    if odd:
        raise OptimizeError(
            f"the {level} level produced non-standard ops {odd}, which TensorRT's ONNX parser "
            f"does not read; use level='fuse' or 'basic'"
        )
    # ORT declares its contrib domain even when no node uses it; keep only the standard opset
    kept = [o for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model, {"tool": "onnxruntime offline graph optimization"}


@claims_output(lambda a: [a["src_dir"]])
def optimize_onnx(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    level: str = "fuse",
    overwrite: bool = False,
    eval_text: str | None = None,
    check: str = "auto",
    log=None,
) -> Path:
    """Write `out_dir` = `src_dir` optimized at `level`; refuses (writes nothing) a graph TensorRT could not parse,
    or one that misses its precision's tolerance against the parent on GLM's cases or the "optimized" budget on
    held-out text in the model's language (glm_export.compare)."""
    if level not in LEVELS:
        raise OptimizeError(
            f"level must be one of {LEVELS}, got {level!r} (ORT's 'all' level writes "
            f"CPU-only contrib ops that TensorRT cannot parse)"
        )
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest, src_model, tok = read_parent(src_dir)
    if manifest.precision not in ("fp32", "fp16"):
        raise OptimizeError(
            f"{src_dir} is an artifact of precision {manifest.precision}; optimize the fp32 (or fp16) export, "
            f"then quantize the optimized folder"
        )
    parent_bytes = sum(p.stat().st_size for p in src_dir.glob(f"{MODEL_FILE}*"))
    if level != "fuse" and parent_bytes > ORT_LEVEL_MAX_BYTES:
        raise OptimizeError(
            f"level {level} runs ONNX Runtime's optimizer, which holds the whole "
            f"{parent_bytes / 1e9:.1f} GB model in memory; use --level fuse (a graph-only rewrite)"
        )
    from glm_export.derive import check_free_space, check_method
    from glm_export.weights import read_onnx_weights

    check_free_space(out_dir.parent, parent_bytes, f"the optimized copy of {src_dir}")
    method = check_method(check, read_onnx_weights(src_model))
    with staged_folder(out_dir, overwrite=overwrite) as stage, tempfile.TemporaryDirectory() as tmp:
        optimized, record = optimized_graph(src_model, level, int(manifest.config["num_layers"]), Path(tmp))
        if level == "fuse" and any(t.data_location == onnx.TensorProto.EXTERNAL for t in optimized.graph.initializer):
            # the same tensors at the same offsets: the parent's data file, copied in blocks, serves the child
            shutil.copyfile(src_dir / DATA_FILE, stage / DATA_FILE)
            (stage / MODEL_FILE).write_bytes(optimized.SerializeToString())
            onnx.checker.check_model(str(stage / MODEL_FILE), full_check=True)
            data_file = DATA_FILE
        else:
            onnx.checker.check_model(optimized, full_check=True)
            data_file = save_graph(optimized, stage)
        findings = trt_findings(stage / MODEL_FILE)
        if findings:
            raise OptimizeError(f"the {level}-optimized graph would not parse in TensorRT: {findings[:3]}")
        extra = dict(
            manifest.extra,
            model_file=MODEL_FILE,
            external_data=data_file,
            optimization={
                "level": level,
                **record,
                "ops": op_histogram(optimized),
                "ops_parent": op_histogram(onnx.load(src_model, load_external_data=False)),
                "trt_findings": findings,
                "bytes": (stage / MODEL_FILE).stat().st_size,
            },
        )
        child = child_manifest(manifest, src_dir, stage, precision=manifest.precision, io=manifest.io, extra=extra)
        scheme = "optimized-fp16" if manifest.precision == "fp16" else "optimized"
        result = judge_child(
            stage,
            src_dir,
            child,
            tok,
            stage_name="optimize",
            scheme=scheme,
            eval_text=eval_text,
            method=method,
            log=log,
        )
        if not result.passed:
            raise BudgetError(
                f"the {level}-optimized graph drifts from its parent: {'; '.join(result.failures)}; nothing was written"
            )
        child.parity = result.to_dict()
        write_manifest(stage, child)
    return out_dir
