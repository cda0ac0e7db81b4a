"""Export stage: a GLM (model object or checkpoint folder) -> a checked ONNX folder with its manifest.

In: a GLMModel or a checkpoint folder, a precision and an output folder. Out: out_dir/ with model.onnx
(+ model.onnx.data when large), the tokenizer if given, and manifest.json (IO table, parity figures), written
through staged_folder so a failed export leaves nothing behind. `load_onnx_model` checks such a folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from glm_export.derive import CHECKS, check_free_space, check_method
from glm_export.external_data import PROTOBUF_LIMIT, STREAM_THRESHOLD, ExternalData
from glm_export.onnx_graph import MAX_OPSET, MIN_OPSET, build_model
from glm_export.progress import Progress
from glm_export.ptuning import read_ptuning, write_ptuning_prefix
from glm_export.weights import Weights
from glm_runtime.config import ConfigError, GLMConfig
from glm_runtime.errors import GLMXError
from glm_runtime.iotable import PRECISIONS, accepted_tables, io_table
from glm_runtime.manifest import (
    DATA_FILE,
    MANIFEST_NAME,
    MODEL_FILE,
    Manifest,
    ManifestError,
    claims_output,
    load_manifest,
    parity_pending,
    sha256_file,
    staged_folder,
    tool_versions,
    write_manifest,
)
from glm_runtime.prefix import PREFIX_FILE, load_prefix
from glm_runtime.tokenizer import TokenizerError, tokenizer_entry
from glm_runtime.tokenizer_folder import resolve_tokenizer

DEFAULT_OPSET = 17
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "bundled" / "glmx-small"

Log = Callable[[str], None]


class ExportError(GLMXError, RuntimeError):
    """The export cannot start or finish: a bad argument, a missing input, or a graph that fails its checks."""


def default_checkpoint() -> Path:
    """The bundled model, resolved only when asked for (it is produced by the pretraining stage)."""
    if not (BUNDLED_CHECKPOINT / MANIFEST_NAME).is_file():
        raise ExportError(
            f"the bundled model {BUNDLED_CHECKPOINT} is not present in this install; pass a "
            f"CHECKPOINT folder (glmx export CHECKPOINT -o OUT)"
        )
    return BUNDLED_CHECKPOINT


def _weight_bytes(weights: Weights, precision: str) -> int:
    """The graph's weight bytes: fp16 MatMul weights and tables in fp16, LayerNorms fp32 (onnx_graph)."""
    itemsize = 2 if precision == "fp16" else 4
    return weights.numel() * itemsize


# ------------------------------------------------------------------ the source: model object or checkpoint folder


class _Source:
    """What is exported: its config, its weights (read one tensor at a time from a checkpoint folder, or the
    tensors of a model object), its tokenizer, and where they came from (a checkpoint folder, its notes)."""

    def __init__(
        self,
        config: GLMConfig,
        weights: Weights,
        folder: Path | None = None,
        tokenizer: Any = None,
        notes: Sequence[str] = (),
        layout: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer_replaced: dict[str, Any] | None = None,
        released: Any = None,
        lora: dict[str, Any] | None = None,
    ):
        self.config, self.weights, self.model = config, weights, model
        self.folder, self.tokenizer = folder, tokenizer
        self.notes, self.layout = list(notes), layout
        self.tokenizer_replaced = tokenizer_replaced  # the checkpoint's own tokenizer and --tokenizer's, both hashed
        self.released = released  # a chatglm-6b-int4 / -int8 folder's integers (glm_export.nbits.Released)
        self.lora = lora  # the record of a LoRA adapter merged into the weights (glm_export.lora)

    def reference_model(self) -> torch.nn.Module:
        """The whole fp32 torch model, for the whole-graph check of a small export."""
        if self.model is not None:
            return self.model
        from glm_export.checkpoint import model_from_weights

        return model_from_weights(self.config, self.weights, torch.float32)


def _resolve_source(
    source: torch.nn.Module | str | Path | None, tokenizer_file: Any = None, **load_options: Any
) -> _Source:
    """The model and its tokenizer: a GLMModel (with tokenizer_file if given) or any checkpoint layout, where
    glm_export.checkpoint decides config, GeLU and tokenizer from the folder and the options."""
    if isinstance(source, torch.nn.Module):
        if not isinstance(getattr(source, "config", None), GLMConfig):
            raise ExportError("the model has no GLMConfig `.config`; pass a glm_export.model.GLMModel")
        if any(v is not None for v in load_options.values()):
            raise ExportError(
                f"{sorted(k for k, v in load_options.items() if v is not None)} apply to a checkpoint "
                f"folder, not to a model object"
            )
        tok, notes = None, []
        if tokenizer_file is not None:
            try:
                tok, notes = resolve_tokenizer(tokenizer_file, config=source.config)
            except TokenizerError as exc:
                raise ExportError(str(exc)) from None
            if tok.kind != source.config.tokenizer:
                source.config = source.config.replace(tokenizer=tok.kind)
        weights = Weights.from_arrays(source.state_dict(), "the model object")
        return _Source(source.config, weights, tokenizer=tok, notes=notes, model=source)
    folder = default_checkpoint() if source is None else Path(source)
    if not folder.exists():
        raise ExportError(f"checkpoint {folder} does not exist")
    from glm_export.checkpoint import open_checkpoint  # any layout: glmx, Hugging Face, Megatron

    opened = open_checkpoint(folder, tokenizer=tokenizer_file, **load_options)
    return _Source(
        opened.config,
        opened.weights,
        folder,
        opened.tokenizer,
        opened.notes,
        opened.layout,
        tokenizer_replaced=opened.tokenizer_replaced,
        released=opened.released,
        lora=opened.lora,
    )


# ------------------------------------------------------------------ the entry function


@claims_output(
    lambda a: [
        a["model_or_checkpoint"] if a["model_or_checkpoint"] is not None else BUNDLED_CHECKPOINT,
        a["tokenizer_file"],
        a["config"],
        a["lora"],
        a["ptuning"],
    ]
)
def export_onnx(
    model_or_checkpoint: torch.nn.Module | str | Path | None,
    out_dir: str | Path,
    *,
    precision: str | None = None,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    tokenizer_file: str | Path | None = None,
    config: GLMConfig | str | Path | None = None,
    tokenizer_kind: str | None = None,
    gelu: str | None = None,
    rotary_inv_freq: str | None = None,
    lora: str | Path | None = None,
    ptuning: str | Path | None = None,
    no_tokenizer: bool = False,
    overwrite: bool = False,
    validate: bool = True,
    check: str = "auto",
    log: Log | None = None,
) -> Path:
    """Write out_dir/ = model.onnx [+ model.onnx.data] [+ tokenizer] + manifest.json; returns out_dir.

    config / tokenizer_kind / gelu: for a checkpoint folder, as glm_export.checkpoint.load_checkpoint (a preset
    name or config file; the tokenizer's kind; tanh | erf); what was decided is printed and recorded.
    lora: a PEFT LoRA adapter folder merged into the checkpoint's weights as they are read (glm_export.lora).
    ptuning: a ChatGLM-6B P-tuning v2 output folder (glm_export.ptuning): its prefix keys and values are computed
    once, stored as prefix.safetensors (hashed, recorded) and fed in front of every sequence, parity check included.
    external_data: None = when the weights pass STREAM_THRESHOLD (256 MiB), True = always, False = never.
    The weights are read from the checkpoint one tensor at a time and streamed into the data file as the graph is
    built, so memory does not grow with the number of layers.
    validate: compare with the fp32 torch reference on GLM's cases (glm_export.compare); a miss raises ParityError
    and nothing is written. check: "whole" (one session of each), "piecewise" (one layer at a time,
    glm_export.pieces) or "auto" (whole up to WHOLE_CHECK_MAX_BYTES of fp32 weights).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if precision is not None and precision not in PRECISIONS + RELEASED_PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS + RELEASED_PRECISIONS}, got {precision!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    if check not in CHECKS:
        raise ExportError(f"check must be one of {CHECKS}, got {check!r}")
    source = _resolve_source(
        model_or_checkpoint,
        tokenizer_file,
        config=config,
        tokenizer_kind=tokenizer_kind,
        gelu=gelu,
        rotary_inv_freq=rotary_inv_freq,
        lora=lora,
    )
    checkpoint = source.folder
    config: GLMConfig = source.config
    for note in source.notes:
        say(f"export: {note}")
    precision, nbits = _released_precision(source, precision, say)
    tuned = read_ptuning(ptuning, config) if ptuning is not None else None  # checked before anything is written
    if tuned is not None:
        say(
            f"export: P-tuning v2 prefix of {ptuning}: pre_seq_len {tuned.pre_seq_len}, prefix_projection "
            f"{str(tuned.prefix_projection).lower()}; computed once (float32) into {PREFIX_FILE}"
        )
    if no_tokenizer and tokenizer_file is not None:
        raise ExportError("--no-tokenizer and --tokenizer contradict each other; give one")
    if checkpoint is not None and source.tokenizer is None and not no_tokenizer:
        raise ExportError(
            f"{checkpoint} has no tokenizer beside its weights, and an export without one cannot "
            f"fill text (glmx fill) or be quantized: pass --tokenizer FILE, or --no-tokenizer to "
            f"export the graph alone"
        )
    if no_tokenizer and source.tokenizer is not None:
        say("export: --no-tokenizer: the checkpoint's tokenizer is left out as asked")
        source.tokenizer = None
    size = _weight_bytes(source.weights, precision)
    if external_data is None:
        external_data = size > STREAM_THRESHOLD
    elif not external_data and size > PROTOBUF_LIMIT:
        raise ExportError(
            f"the {precision} weights take {size / 2**30:.1f} GiB, past protobuf's 2 GiB limit for "
            f"one file; export with external data (drop --no-external-data)"
        )
    method = check_method(check, source.weights) if validate else None
    check_free_space(Path(out_dir).parent, size, f"the {precision} export of {config.name}")
    try:
        with staged_folder(out_dir, overwrite=overwrite) as stage:
            say(
                f"export: building the {precision} graph of {config.name} (L={config.num_layers}, "
                f"h={config.hidden_size}, V={config.vocab_size}, opset {opset}, "
                f"{'external data' if external_data else 'inline weights'}, {size / 1e9:.2f} GB of weights)"
            )
            store = ExternalData(stage) if external_data else None
            bar = Progress(
                "export: layers", config.num_layers, say, written=(lambda: store.written) if store is not None else None
            )
            try:
                graph = build_model(
                    config, source.weights, "fp32" if nbits else precision, opset, store, bar.update, nbits
                )
            finally:
                bar.close()
                if store is not None:
                    store.close()
            path = stage / MODEL_FILE
            path.write_bytes(graph.SerializeToString())
            del graph
            say(f"export: checking {MODEL_FILE} with onnx.checker")
            onnx.checker.check_model(str(path), full_check=True)
            tokenizer = tokenizer_entry(source.tokenizer, stage) if source.tokenizer is not None else {}
            ptuning_record = write_ptuning_prefix(stage, tuned) if tuned is not None else None
            parent = {}
            if checkpoint is not None:
                # relative to the exported folder, so a checkout or an installed package that moves both
                # folders together (the bundled model) still finds its parent; absolute on another drive
                try:
                    parent = {"path": os.path.relpath(checkpoint.resolve(), Path(out_dir).resolve())}
                except ValueError:
                    parent = {"path": str(checkpoint.resolve())}
                if (checkpoint / MANIFEST_NAME).is_file():  # a glmx folder; HF / Megatron ones have none
                    parent["manifest_sha256"] = sha256_file(checkpoint / MANIFEST_NAME)
            manifest = Manifest(
                kind="onnx",
                config=config.to_dict(),
                precision=precision,
                tokenizer=tokenizer,
                io=io_table(config, "fp32" if nbits else precision),
                parity=parity_pending() if validate else {"skipped": True},  # pending until checked
                versions=tool_versions("torch", "onnx", "onnxruntime"),
                parent=parent,
                extra={
                    "source": {
                        "layout": source.layout,
                        "notes": source.notes,
                        **({"tokenizer_replaced": source.tokenizer_replaced} if source.tokenizer_replaced else {}),
                    },
                    "model_file": MODEL_FILE,
                    "external_data": DATA_FILE if external_data else None,
                    "opset": opset,
                    "graph": "glm_export.onnx_graph (hand-built)",
                    "architecture": config.arch.describe(config.num_layers, config.rotary_inv_freq),
                    "tied_embedding": "word_embeddings.weight, stored once (Gather + Gemm transB=1)",
                    "fp16_islands": "LayerNorm, QK product, masking, softmax in fp32; residual stream fp32"
                    if precision == "fp16"
                    else None,
                    **({"quantization": _released_record(nbits, precision)} if nbits else {}),
                    **({"lora": source.lora} if source.lora else {}),
                    **({"ptuning": ptuning_record} if ptuning_record else {}),
                },
            )
            write_manifest(stage, manifest)
            if validate:
                prefix = tuned.prefix if tuned is not None else None
                manifest.parity = validate_export(stage, source, precision, method, say, prefix).to_dict()
                write_manifest(stage, manifest)
    except FileExistsError as exc:
        raise ExportError(str(exc)) from None
    say(f"export: wrote {out_dir}")
    return Path(out_dir)


RELEASED_PRECISIONS = ("int4-weight", "int8-weight")  # a published int4 / int8 folder's own integers


def _released_precision(source: _Source, precision: str | None, say: Log) -> tuple[str, Any]:
    """The precision of the export and, for a published int4 / int8 folder exported in its own bits, the NBits
    that carries its integers over (glmx's int4-weight / int8-weight recipe otherwise: head, accuracy level)."""
    released = source.released
    if released is None:
        if precision in RELEASED_PRECISIONS:
            raise ExportError(
                f"--precision {precision} exports a published int4 / int8 checkpoint's own integers; this one is "
                f"float: export fp32 and run glmx quantize --scheme {precision}"
            )
        return precision or "fp32", None
    own = f"int{released.bits}-weight"
    if precision is None or precision == own:
        from glm_export.nbits import NBits
        from glm_export.quantize import nbits_recipe

        r = nbits_recipe(own)
        head = r["head"] or {}
        say(
            f"export: {own}: the folder's int{released.bits} linears carried over bit for bit (one scale per row), "
            f"the head {head.get('bits')}-bit in blocks of {head.get('block_size')} as glmx's {own} recipe"
        )
        nbits = NBits(
            released.bits,
            r["block_size"],
            r["accuracy_level"],
            lambda prefix: False,
            head=bool(head),
            head_bits=head.get("bits"),
            head_block_size=head.get("block_size"),
            released=released,
        )
        return own, nbits
    if precision in RELEASED_PRECISIONS:
        raise ExportError(
            f"the folder's linears are int{released.bits}; --precision {precision} cannot be made from them"
        )
    say(
        f"export: {precision}: the folder's int{released.bits} linears dequantized (q x scale), as the HF code computes"
    )
    return precision, None


def _released_record(nbits: Any, precision: str) -> dict[str, Any]:
    return {
        "scheme": precision,
        "source": f"the checkpoint's own int{nbits.bits} weights and fp16 row scales, re-packed bit for bit",
        "weights": f"int{nbits.bits}, one scale per row (MatMulNBits blocks along the row, the scale repeated)",
        "accuracy_level": nbits.accuracy_level,
        "head": {"bits": nbits.head_bits, "block_size": nbits.head_block_size} if nbits.head else None,
        "keep_fp32": ["embedding"],
        "reference": "the fp32 torch model of the dequantized weights (q x scale)",
    }


def validate_export(
    folder: Path, source: Any, precision: str, method: str = "whole", log: Log | None = None, prefix: Any = None
):
    """The exported folder on ONNX Runtime against the fp32 torch reference (glm_export.compare; one layer at a
    time with method "piecewise", glm_export.pieces); raises ParityError with the table on a miss, returns the
    Comparison otherwise. source: a _Source, or a GLMModel. prefix: the P-tuning prefix as computed (float32), fed
    to the reference as past_key_values with always-visible mask columns; the artifact's side reads it back from
    the folder's own prefix file."""
    from glm_export.compare import ParityError, compare_sessions

    say = log or (lambda msg: print(msg, file=sys.stderr))
    if isinstance(source, torch.nn.Module):
        source = _Source(source.config, Weights.from_arrays(source.state_dict()), model=source)
    if method == "piecewise":
        from glm_export.pieces import OnnxLayers, TorchLayers, compare_by_layer

        cfg = source.config
        say(
            f"export: comparing with the fp32 torch reference one layer at a time ({cfg.num_layers} layers, "
            f"onnxruntime CPU), GLM's cases"
        )
        bar = Progress("export: checked layers", cfg.num_layers, say)
        try:
            result = compare_by_layer(
                OnnxLayers(
                    folder / MODEL_FILE, cfg, precision, "the artifact being written", prefix=_staged_prefix(folder)
                ),
                TorchLayers(cfg, source.weights, "torch reference (GLMModel layers, fp32)", prefix=prefix),
                stage="export",
                log=lambda i, n: bar.update(i),
            )
        finally:
            bar.close()
    else:
        import copy

        from glm_export.reference_session import TorchSession
        from glm_runtime.session import OnnxRuntimeSession

        say("export: comparing with the fp32 torch reference on onnxruntime (CPU), GLM's cases")
        model = source.reference_model()
        ref_model = model if all(p.dtype == torch.float32 for p in model.parameters()) else copy.deepcopy(model).float()
        was_training = ref_model.training
        try:
            result = compare_sessions(
                OnnxRuntimeSession(folder, staging=True), TorchSession(ref_model.eval(), prefix=prefix), stage="export"
            )
        finally:
            ref_model.train(was_training)
    say(result.table())
    if not result.passed:
        raise ParityError(f"{MODEL_FILE} misses its {precision} parity budget\n{result.table()}")
    return result


def _staged_prefix(folder: Path) -> Any:
    """The P-tuning prefix the staged folder's own file holds (glm_runtime.prefix), float32; None without one."""
    manifest = load_manifest(folder, kind="onnx", verify=False, staging=True)
    return load_prefix(folder, manifest, GLMConfig.from_dict(manifest.config), np.float32)


# ------------------------------------------------------------------ loading an exported folder


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """A graph's inputs and outputs in the IO-table format (numpy dtype names, ints and symbolic dims)."""

    def entry(v: onnx.ValueInfoProto) -> dict[str, Any]:
        t = v.type.tensor_type
        return {
            "name": v.name,
            "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name,
            "shape": [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim],
        }

    defaults = {t.name: t for t in model.graph.initializer}  # an input backed by an initializer is optional
    inputs = []
    for v in model.graph.input:
        inputs.append(entry(v))
        if v.name in defaults:
            inputs[-1]["default"] = numpy_helper.to_array(defaults[v.name]).tolist()
    return {"inputs": inputs, "outputs": [entry(v) for v in model.graph.output]}


def _describe(entry: dict[str, Any] | None) -> str:
    return "nothing" if entry is None else f"{entry['name']} {entry['dtype']} {entry['shape']}"


def load_onnx_model(folder: str | Path) -> tuple[Manifest, Path]:
    """Check an exported folder and return (manifest, path of model.onnx).

    Refuses: a file whose sha256 differs from the manifest, a manifest whose IO table does not follow from its
    own config and precision, and a model.onnx whose inputs/outputs differ from the manifest's IO table.
    """
    folder = Path(folder)
    manifest = load_manifest(folder, kind="onnx")
    where = folder / MANIFEST_NAME
    try:
        config = GLMConfig.from_dict(manifest.config)
        expected = next((t for t in accepted_tables(config, manifest.precision) if t == manifest.io), None)
    except (ConfigError, ValueError) as exc:
        raise ManifestError(f"{where} was modified or is corrupt: its config/precision are invalid ({exc})") from None
    if expected is None:
        raise ManifestError(
            f"{where} was modified or is corrupt: its IO table does not follow from its config and "
            f"precision {manifest.precision!r}; re-export the model"
        )
    path = folder / manifest.extra.get("model_file", MODEL_FILE)
    actual = graph_io(onnx.load(str(path), load_external_data=False))
    for kind in ("inputs", "outputs"):
        if actual[kind] != expected[kind]:
            a, e = next((a, e) for a, e in zip_longest(actual[kind], expected[kind]) if a != e)
            raise ManifestError(
                f"{where} does not describe {path.name}: the graph has {_describe(a)} where the "
                f"manifest says {_describe(e)}; the manifest or the model was modified, re-export"
            )
    return manifest, path
