"""What the derived stages share (optimize, quantize): reading the parent folder, writing the child's graph
(external data past protobuf's 2 GB, as export does), and judging the child against its parent.

In: a parent glmx ONNX folder and a staged child folder holding model.onnx. Out: the child's tokenizer copied,
its manifest written with the parity record of glm_export.compare (one shape for every stage).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from glm_export.external_data import PROTOBUF_LIMIT
from glm_runtime.errors import GLMXError
from glm_runtime.manifest import (
    DATA_FILE,
    MANIFEST_NAME,
    MODEL_FILE,
    Manifest,
    ManifestError,
    load_manifest,
    parity_pending,
    sha256_file,
    tokenizer_file_names,
    write_manifest,
)


class DeriveError(GLMXError, ValueError):
    """The parent folder cannot be derived from (no tokenizer to judge the child with, wrong kind)."""


class QuantizeError(GLMXError, ValueError):
    """A quantization request that cannot be honoured (bad scheme, no or unusable calibration data, ...)."""


class StageError(GLMXError, RuntimeError):
    """A stage cannot start: its output would not fit on the disk, or its --check is unknown."""


# ---------------------------------------------------------------- before any stage writes (export, optimize, quantize)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing when the output's file system cannot hold `needed` bytes (plus 1% and 64 MiB)."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = needed // 100 + 2**26
    if free < needed + margin:
        raise StageError(
            f"{what} needs about {(needed + margin) / 1e9:.2f} GB on {probe}, which has "
            f"{free / 1e9:.2f} GB free; free some space or write elsewhere (-o)"
        )


CHECKS = ("auto", "whole", "piecewise")
# auto: a model whose fp32 weights fit in this many bytes is checked whole (torch and ONNX Runtime each hold it
# once, ~3x this); larger ones one layer at a time (glm_export.pieces), so the check stays within the export's
# memory goal of about 1 GB plus a few of the largest tensor (benchmarks/results/scale.md measures it).
WHOLE_CHECK_MAX_BYTES = 256 * 2**20


def check_method(check: str, weights: Any) -> str:
    """ "whole" or "piecewise" for a --check value and the weights (glm_export.weights.Weights) to be checked."""
    if check not in CHECKS:
        raise StageError(f"check must be one of {CHECKS}, got {check!r}")
    if check != "auto":
        return check
    return "whole" if weights.numel() * 4 <= WHOLE_CHECK_MAX_BYTES else "piecewise"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def trt_findings(path: Path) -> list[str] | None:
    """check_trt's findings as strings (empty = TensorRT's parser reads every node); None when the checker
    (glm_export.trt_check) is not installed, recorded as "not checked" rather than passed."""
    try:
        from glm_export.trt_check import check_trt
    except ImportError:
        return None
    return [str(f) for f in check_trt(path)]


def read_parent(src_dir: Path) -> tuple[Manifest, Path, Any]:
    """(manifest, model file, tokenizer) of a parent ONNX folder; the tokenizer is what the child is judged with."""
    from glm_runtime.tokenizer import TokenizerError
    from glm_runtime.tokenizer_folder import load_recorded_tokenizer

    manifest = load_manifest(src_dir, kind="onnx")
    if not manifest.tokenizer.get("file"):
        raise DeriveError(
            f"{src_dir} carries no tokenizer, and a derived artifact is judged against its parent on "
            f"held-out text; re-export it with its tokenizer (glmx export --tokenizer FILE)"
        )
    try:
        tok = load_recorded_tokenizer(src_dir, manifest.tokenizer)
    except TokenizerError as exc:
        raise ManifestError(str(exc)) from None
    return manifest, src_dir / manifest.extra.get("model_file", MODEL_FILE), tok


def save_graph(model: onnx.ModelProto, folder: Path) -> str | None:
    """model.onnx into `folder`, its weights in model.onnx.data when the graph passes ~2 GB; -> the data file."""
    external = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save(
        model,
        folder / MODEL_FILE,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    return DATA_FILE if external else None


def child_manifest(
    parent: Manifest, src_dir: Path, stage: Path, *, precision: str, io: dict[str, Any], extra: dict[str, Any]
) -> Manifest:
    """The child's manifest (config, tokenizer and IO from the parent), with the parent's tokenizer files copied,
    and its P-tuning prefix (glm_runtime.prefix: the file and its record) when it has one."""
    from glm_runtime.manifest import tool_versions

    for name in tokenizer_file_names(parent.tokenizer):  # vocab.json + merges.txt for a BPE pair
        shutil.copy2(src_dir / name, stage / name)
    ptuning = parent.extra.get("ptuning")
    if ptuning:  # the same bytes (the parent's hash checked them), hashed again in the child's manifest
        shutil.copy2(src_dir / ptuning["file"], stage / ptuning["file"])
        extra = {**extra, "ptuning": ptuning}
    return Manifest(
        kind="onnx",
        config=parent.config,
        precision=precision,
        tokenizer=parent.tokenizer,
        io=io,
        parity=parity_pending(),  # until judge_child's record replaces it
        versions=tool_versions("onnx", "onnxruntime"),
        extra=extra,
        parent={"path": str(src_dir), "manifest_sha256": sha256_file(src_dir / MANIFEST_NAME)},
    )


def judge_child(
    stage: Path,
    src_dir: Path,
    child: Manifest,
    tok: Any,
    *,
    stage_name: str,
    scheme: str,
    eval_text: str | None,
    method: str = "whole",
    log=None,
):
    """Write the child's manifest, then compare child and parent (GLM's cases, then held-out text in the model's
    language): as two whole ONNX Runtime sessions, or one layer at a time (method "piecewise",
    glm_export.pieces; no greedy fills then). -> the Comparison; the caller decides what a miss means."""
    from glm_export.compare import compare_artifact, judge_text, text_to_judge

    write_manifest(stage, child)
    if method != "piecewise":
        from glm_runtime.session import OnnxRuntimeSession

        # read_parent verified the parent's hashes at the start of this stage; hashing its GBs again gains nothing
        child_session, parent = OnnxRuntimeSession(stage, staging=True), OnnxRuntimeSession(src_dir, verify=False)
        return compare_artifact(child_session, parent, tok, stage=stage_name, scheme=scheme, text=eval_text)
    from glm_export.pieces import OnnxLayers, compare_with_text_by_layer
    from glm_export.progress import Progress
    from glm_runtime.config import GLMConfig
    from glm_runtime.prefix import load_prefix

    say = log or (lambda msg: None)
    parent_manifest = load_manifest(src_dir, kind="onnx", verify=False)
    cfg = GLMConfig.from_dict(child.config)
    candidate = OnnxLayers(
        stage / MODEL_FILE,
        cfg,
        child.precision,
        "the artifact being written",
        prefix=load_prefix(stage, child, cfg, np.float32),
    )
    reference = OnnxLayers(
        src_dir / parent_manifest.extra.get("model_file", MODEL_FILE),
        cfg,
        parent_manifest.precision,
        str(src_dir),
        prefix=load_prefix(src_dir, parent_manifest, cfg, np.float32),
    )
    eval_text, source = text_to_judge(tok.kind, eval_text)
    bar = Progress(f"{stage_name}: checked layers (GLM's cases and held-out text)", cfg.num_layers, say)
    try:
        result, figures = compare_with_text_by_layer(
            candidate,
            reference,
            tok,
            eval_text,
            stage=stage_name,
            language=source["language"],
            log=lambda i, n: bar.update(i),
        )
    finally:
        bar.close()
    judge_text(result, scheme, figures, source)
    say(result.table())
    return result
