"""An exported graph cut into pipeline stages: N contiguous layer ranges, each a folder of its own.
In: an exported ONNX folder (model.onnx and its weights), a stage count. Out: per stage a folder with stage.onnx,
its own weights file stage.onnx.data (only the initializers its nodes read) and stage.json (the parent's hashes,
the layer range, the files' sha256), written atomically and cached by the parent's sha256 (cut once, then reused).

Stage 0: the embedding and its layers; a middle stage: its layers; the last: its layers, the final LayerNorm and the
head. A boundary is the residual stream's fp32 tensor [B, T, h] (glm_export.onnx_graph names it), which is what
crosses between stages. The generic cut (`cut_graph`) is glm_export.pieces' too. Needs the `onnx` package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from glm_runtime.errors import GLMXError
from glm_runtime.files import sha256_file
from glm_runtime.iotable import kv_names
from glm_runtime.manifest import MODEL_FILE, load_manifest

EMBED_OUTPUT = "/embed/add_block/out"  # glm_export.onnx_graph.EMBED_OUTPUT: the residual stream's first tensor
STAGE_SCHEMA = "glmx-stage/1"
STAGE_MODEL, STAGE_DATA, STAGE_RECORD = "stage.onnx", "stage.onnx.data", "stage.json"
ALIGN = 4096  # each external tensor starts 4 KiB-aligned, as glm_export.external_data writes them
ONNX_HINT = "cutting a graph into stages needs the onnx package: pip install 'glmx[serve-ray]'"


class StageError(GLMXError, ValueError):
    """A model that cannot be cut into the stages asked for, or a stage folder that is not what it says."""


def layer_output(i: int) -> str:
    """Layer i's output on the residual stream (glm_export.onnx_graph's name for it)."""
    return f"/transformer.layers.{i}/residual_mlp/out"


def stage_ranges(num_layers: int, stages: int | Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each stage's layers, contiguous. stages: a count (as even as they go, the larger ranges
    first) or each stage's number of layers (e.g. fewer on the stage that also holds the embedding table)."""
    if isinstance(stages, bool) or not isinstance(stages, (int, list, tuple)):
        raise StageError(f"stages must be a number of stages or each stage's layers, got {stages!r}")
    if not isinstance(stages, int):
        counts = list(stages)
        if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise StageError(f"each stage needs a whole number of layers >= 1, got {counts}")
        if sum(counts) != num_layers:
            raise StageError(f"the stages' layers {counts} add up to {sum(counts)}, not the model's {num_layers}")
    elif not 1 <= stages <= num_layers:
        raise StageError(f"stages must be between 1 and the model's {num_layers} layers, got {stages!r}")
    else:
        base, extra = divmod(num_layers, stages)
        counts = [base + (1 if k < extra else 0) for k in range(stages)]
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return ranges


def cut_graph(model: Any, inputs: Sequence[str], outputs: Sequence[str], hidden: int, rename=None) -> Any:
    """A ModelProto of the nodes between `inputs` (residual-stream boundaries or graph inputs) and `outputs`, with
    the initializers those nodes read (as the parent holds them: inline or pointing into its data file).
    rename {old: new}: node inputs renamed in the piece (its nodes are copies; the parent is left as it is)."""
    from onnx import NodeProto, TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {v.name: v for v in g.input}
    graph_outputs = {v.name: v for v in g.output}
    rename = dict(rename or {})
    stop = set(inputs) | set(inits)
    nodes, seen, taken, todo = [], set(), set(), list(outputs)
    while todo:
        name = todo.pop()
        if name in seen or name in stop or name == "":
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None:
            if name in graph_inputs:
                stop.add(name)
                continue
            raise StageError(f"tensor {name!r} has no producer in the graph")
        if id(node) not in taken:
            taken.add(id(node))
            nodes.append(node)
        todo.extend(node.input)
    order = {id(n): k for k, n in enumerate(g.node)}
    nodes.sort(key=lambda n: order[id(n)])
    if rename:
        copies = []
        for node in nodes:
            copy = NodeProto()
            copy.CopyFrom(node)
            for k, name in enumerate(copy.input):
                copy.input[k] = rename.get(name, name)
            copies.append(copy)
        nodes = copies
    used = {i for n in nodes for i in n.input}
    ins = []
    for name in list(inputs) + sorted(used & set(graph_inputs) - set(inputs)):
        if name in graph_inputs:
            ins.append(graph_inputs[name])
        else:  # a residual-stream boundary: fp32 [B, T, h] in every precision
            ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", hidden]))
    boundary: list[str | int] = ["batch", "seq", hidden]
    outs = [
        graph_outputs[o] if o in graph_outputs else helper.make_tensor_value_info(o, TensorProto.FLOAT, boundary)
        for o in outputs
    ]
    piece_inits = [inits[n] for n in sorted(used) if n in inits]
    graph = helper.make_graph(nodes, "glm_piece", ins, outs, initializer=piece_inits)
    piece = helper.make_model(graph, opset_imports=list(model.opset_import))
    piece.ir_version = model.ir_version
    return piece


def stage_io(k: int, ranges: Sequence[tuple[int, int]]) -> tuple[list[str], list[str], dict[str, str]]:
    """Stage k's boundary inputs, its outputs and the renames of its cut: a stage without layer 0 reads the past
    length (past_seq) from its own first layer's past key instead of layer 0's, which it does not hold."""
    start, stop = ranges[k]
    pasts = [name for i in range(start, stop) for name in kv_names("past", i)]
    presents = [name for i in range(start, stop) for name in kv_names("present", i)]
    first = ["input_ids", "position_ids"] if k == 0 else [layer_output(start - 1)]
    last = ["logits"] if k == len(ranges) - 1 else [layer_output(stop - 1)]
    rename = {} if start == 0 else {kv_names("past", 0)[0]: kv_names("past", start)[0]}
    return first + ["attention_mask", *pasts], last + presents, rename


def _tensor_bytes(tensor: Any, parent: Path) -> bytes:
    """An initializer's raw little-endian bytes, read from the parent's data file when it lives there."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        entry = {e.key: e.value for e in tensor.external_data}
        with open(parent / entry["location"], "rb") as fh:
            fh.seek(int(entry.get("offset", 0)))
            return fh.read(int(entry["length"]))
    if tensor.raw_data:
        return bytes(tensor.raw_data)
    array = numpy_helper.to_array(tensor)
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def _externalize(piece: Any, parent: Path, data_path: Path, min_bytes: int = 1024) -> int:
    """Every initializer of `piece` of min_bytes or more into data_path (4 KiB-aligned), the rest inline;
    returns the weight bytes the stage holds."""
    from onnx import TensorProto

    total, offset = 0, 0
    with open(data_path, "wb") as fh:
        for tensor in piece.graph.initializer:
            data = _tensor_bytes(tensor, parent)
            total += len(data)
            del tensor.external_data[:]
            if len(data) < min_bytes:
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = data
                continue
            pad = -offset % ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(data)
            tensor.ClearField("raw_data")
            for key, value in (("location", STAGE_DATA), ("offset", offset), ("length", len(data))):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = TensorProto.EXTERNAL
            offset += len(data)
        fh.flush()
        os.fsync(fh.fileno())
    return total


def default_stage_root() -> Path:
    """Where cut stages are cached: $GLMX_STAGE_CACHE, else ~/.cache/glmx/stages (never the model's folder)."""
    root = os.environ.get("GLMX_STAGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "glmx" / "stages"


def parent_facts(folder: Path) -> dict[str, Any]:
    """What a stage records of its parent: the folder, its manifest's sha256, its graph file and that file's
    sha256 (from the manifest, which open_pipeline verified), the config."""
    manifest = load_manifest(folder, kind="onnx", verify=False)
    model_file = manifest.extra.get("model_file", MODEL_FILE)
    return {
        "folder": str(folder.resolve()),
        "manifest_sha256": sha256_file(folder / "manifest.json"),
        "model_file": model_file,
        "model_sha256": manifest.files[model_file],
        "precision": manifest.precision,
        "num_layers": int(manifest.config["num_layers"]),
        "hidden_size": int(manifest.config["hidden_size"]),
    }


def stage_folder(root: Path, parent: Mapping[str, Any], stages: int | Sequence[int], k: int) -> Path:
    """root/<the parent graph's sha256, 16 digits>-<each stage's layer count>/stage-k."""
    split = "-".join(str(b - a) for a, b in stage_ranges(parent["num_layers"], stages))
    return Path(root) / f"{parent['model_sha256'][:16]}-{split}" / f"stage-{k}"


def read_stage(folder: Path, parent: Mapping[str, Any] | None = None, verify: bool = False) -> dict[str, Any]:
    """stage.json of a stage folder, checked: its schema, its parent's graph hash (when `parent` is given) and,
    with verify, its files' sha256. StageError says what does not hold."""
    try:
        record = json.loads((folder / STAGE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{folder} is not a stage folder ({exc}); cut it again") from None
    if record.get("schema") != STAGE_SCHEMA:
        raise StageError(f"{folder}/{STAGE_RECORD}: schema {record.get('schema')!r}, expected {STAGE_SCHEMA!r}")
    if parent is not None and record["parent"]["model_sha256"] != parent["model_sha256"]:
        raise StageError(f"{folder} was cut from another model (its parent's graph sha256 differs); cut it again")
    for name, sha in record["files"].items():
        path = folder / name
        if not path.is_file() or (verify and sha256_file(path) != sha):
            raise StageError(f"{folder}/{name} is missing or not the file {STAGE_RECORD} hashed; cut it again")
    return record


def cut_stage(
    model_folder: Path, stages: int | Sequence[int], k: int, out: Path, parent: Mapping[str, Any] | None = None
) -> Path:
    """Write stage k of `stages` of the exported model in model_folder to `out` (a new folder, atomically: built
    under a temp name beside it, stage.json last, then renamed into place). Returns `out`."""
    try:
        import onnx
    except ImportError:
        raise StageError(ONNX_HINT) from None
    model_folder = Path(model_folder)
    parent = dict(parent or parent_facts(model_folder))
    ranges = stage_ranges(parent["num_layers"], stages)
    inputs, outputs, rename = stage_io(k, ranges)
    model = onnx.load(str(model_folder / parent["model_file"]), load_external_data=False)  # the graph only
    piece = cut_graph(model, inputs, outputs, parent["hidden_size"], rename)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        weights = _externalize(piece, model_folder, tmp / STAGE_DATA)
        (tmp / STAGE_MODEL).write_bytes(piece.SerializeToString())
        record = {
            "schema": STAGE_SCHEMA,
            "parent": parent,
            "stage": k,
            "stages": len(ranges),
            "layers": list(ranges[k]),
            "embedding": k == 0,
            "head": k == len(ranges) - 1,
            "inputs": [v.name for v in piece.graph.input],
            "outputs": [v.name for v in piece.graph.output],
            "weights_bytes": weights,
            "files": {name: sha256_file(tmp / name) for name in (STAGE_MODEL, STAGE_DATA)},
            "assumptions": [
                "boundaries are the residual stream's fp32 [B, T, h] tensors named by glm_export.onnx_graph",
                "a stage without layer 0 reads past_seq from its first layer's past key (every layer's past has "
                "the same length)",
            ],
        }
        (tmp / STAGE_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if out.exists():  # a stale or broken cut: moved aside, then removed, so `out` is never half-written
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, aside / "stage")
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_stage(model_folder: Path, stages: int | Sequence[int], k: int, root: Path | None = None, log=None) -> Path:
    """Stage k's folder under root (default_stage_root()): the cached cut when it is there and whole, else cut
    now. Each node of a cluster calls this for its own stage, so the model folder must be at the same path there
    (or the stage root on a shared filesystem)."""
    model_folder = Path(model_folder)
    parent = parent_facts(model_folder)
    out = stage_folder(root or default_stage_root(), parent, stages, k)
    try:
        read_stage(out, parent)
        return out
    except StageError:
        pass
    if log is not None:
        log(
            f"glmx: cutting stage {k} of {len(stage_ranges(parent['num_layers'], stages))} of {model_folder} into {out}"
        )
    return cut_stage(model_folder, stages, k, out, parent)


def cut_stages(model_folder: Path, stages: int | Sequence[int], root: Path | None = None, log=None) -> list[Path]:
    """Every stage's folder (cached or cut now)."""
    n = stages if isinstance(stages, int) else len(stages)
    return [ensure_stage(model_folder, stages, k, root, log) for k in range(n)]
