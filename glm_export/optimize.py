"""Optimize an exported GLM folder offline with ONNX Runtime's graph optimizer, keeping TensorRT parseable.

In: a glmx ONNX folder. Out: a new folder whose model.onnx is ORT's basic-level (or extended, when it still
uses only standard ops and passes check_trt) optimized graph, re-checked on the exporter's parity cases against
the torch reference rebuilt from the parent's own weights, and against the parent on held-out text.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx

from glm_export import accuracy
from glm_export.quantize import DEFAULT_CALIBRATION, graph_weights, op_histogram, trt_findings
from glm_runtime.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file, staged_folder, \
    tool_versions, write_manifest

LEVELS = ("basic", "extended")
STANDARD_DOMAINS = ("", "ai.onnx")


class OptimizeError(ValueError):
    """The optimized graph is unusable here: non-standard ops, TensorRT findings, or a parity miss."""


def ort_optimize(src: Path, dst: Path, level: str) -> None:
    """Let ONNX Runtime fold constants and drop redundant nodes (basic), or also fuse (extended), to a file."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def nonstandard_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def reference_from_graph(model: onnx.ModelProto, config: dict):
    """The torch reference GLMModel holding exactly the graph's weights (for the exporter's parity cases)."""
    import torch
    from glm_export.model import GLMModel
    from glm_runtime.config import GLMConfig
    ref = GLMModel(GLMConfig.from_dict(config)).eval()
    state = {k: torch.from_numpy(v.copy()).float() for k, v in graph_weights(model).items()}
    ref.load_state_dict(state, strict=True)
    return ref


def optimize_onnx(src_dir: str | Path, out_dir: str | Path, *, level: str = "basic", overwrite: bool = False,
                  eval_text: str | None = None) -> Path:
    """Write `out_dir` = `src_dir` optimized at `level`; refuses a graph TensorRT could not parse or that
    misses the parity tolerance of its precision or the "optimized" accuracy budget."""
    from glm_export.parity import ParityError, check_parity
    if level not in LEVELS:
        raise OptimizeError(f"level must be one of {LEVELS}, got {level!r} (ORT's 'all' level writes "
                            f"CPU-only contrib ops that TensorRT cannot parse)")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = load_manifest(src_dir, kind="onnx")
    src_model = src_dir / manifest.extra.get("model_file", "model.onnx")
    if eval_text is None:
        eval_text = accuracy.split_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8"))[1]
    with staged_folder(out_dir, overwrite=overwrite) as stage, tempfile.TemporaryDirectory() as tmp:
        ort_optimize(src_model, Path(tmp) / "model.onnx", level)
        optimized = onnx.load(Path(tmp) / "model.onnx")
        odd = nonstandard_ops(optimized)
        if odd:
            raise OptimizeError(f"the {level} level produced non-standard ops {odd}, which TensorRT's ONNX parser "
                                f"does not read; use level='basic'")
        # ORT declares its contrib domain even when no node uses it; keep only the standard opset
        kept = [o for o in optimized.opset_import if o.domain in STANDARD_DOMAINS]
        del optimized.opset_import[:]
        optimized.opset_import.extend(kept)
        onnx.checker.check_model(optimized, full_check=True)
        onnx.save(optimized, stage / "model.onnx")
        findings = trt_findings(stage / "model.onnx")
        if findings:
            raise OptimizeError(f"the {level}-optimized graph would not parse in TensorRT: {findings[:3]}")
        name = manifest.tokenizer.get("file")
        if name:
            shutil.copy2(src_dir / name, stage / name)
        try:
            report = check_parity(stage / "model.onnx", reference_from_graph(optimized, manifest.config),
                                  manifest.precision)
        except ParityError as exc:
            raise OptimizeError(f"the {level}-optimized graph misses the {manifest.precision} parity tolerance: "
                                f"{exc}") from None
        extra = dict(manifest.extra, model_file="model.onnx", external_data=None,
                     optimization={"level": level, "tool": "onnxruntime offline graph optimization",
                                   "ops": op_histogram(optimized), "ops_parent": op_histogram(onnx.load(src_model)),
                                   "trt_findings": findings, "bytes": (stage / "model.onnx").stat().st_size})
        child = Manifest(kind="onnx", config=manifest.config, precision=manifest.precision,
                         tokenizer=manifest.tokenizer, io=manifest.io, versions=tool_versions("onnx", "onnxruntime"),
                         extra=extra, parity={"reference": report.to_dict()},
                         parent={"path": str(src_dir), "manifest_sha256": sha256_file(src_dir / MANIFEST_NAME)})
        write_manifest(stage, child)
        figures = accuracy.measure_accuracy(src_dir, stage, eval_text)
        misses = accuracy.budget_misses("optimized", figures)
        if misses:
            raise accuracy.BudgetError(f"the {level}-optimized graph drifts from its parent: {'; '.join(misses)}")
        child.parity["accuracy"] = dict(figures, scheme="optimized", budget=accuracy.BUDGETS["optimized"])
        write_manifest(stage, child)
    return out_dir
