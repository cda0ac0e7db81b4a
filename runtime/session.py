"""Sessions: one small interface, `run(feeds) -> outputs` plus IO metadata, over backends picked by a dict.
In: an exported folder (model.onnx + tokenizer + manifest.json) and a backend name; feeds named by the IO table.
Out: a session that checks every feed where it enters; `open_model` pairs it with its tokenizer."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.backend import (  # noqa: F401 - the session interface, importable from here too
    ORT_TYPES,
    BackendError,
    Closable,
    FeedError,
    KVCacheLike,
    Session,
    check_export,
    check_feeds,
    host_array,
)
from glm_runtime.config import GLMConfig
from glm_runtime.errors import EXPORT_EXTRA_HINT
from glm_runtime.iotable import kv_dtype, required_inputs
from glm_runtime.manifest import MANIFEST_NAME, MODEL_FILE, ManifestError, load_manifest
from glm_runtime.onnx_facts import graph_facts, precision_problem
from glm_runtime.prefix import load_prefix

CPU_PROVIDERS = ("CPUExecutionProvider",)
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def quiet_options(options: Any = None) -> Any:
    """Session options that log errors only, unless the caller set a level: onnxruntime warns on every load
    that logits_start (an optional input, i.e. a graph input backed by an initializer) is not a constant,
    which is the point of it. Returns `options` (set in place) or new SessionOptions."""
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    if options.log_severity_level < 0:  # unset: the environment's default, warnings
        options.log_severity_level = 3
    return options


def _check_graph_types(model_file: Path, graph: Sequence[Any], table: Mapping[str, Mapping[str, Any]]) -> None:
    """The graph's own element types and fixed sizes (heads, head width, vocabulary) must be the manifest's: a
    manifest that describes another model (another precision, heads or V) is refused before any call."""
    for node in graph:
        entry = table.get(node.name)
        if entry is None:
            continue
        dtype = ORT_TYPES.get(node.type, node.type)
        if dtype != entry["dtype"]:
            raise ManifestError(
                f"{model_file}: {node.name} is {dtype} in the graph but {entry['dtype']} in the "
                f"manifest (precision {entry['dtype']!r} does not describe this graph); re-export"
            )
        for axis, (size, want) in enumerate(zip(node.shape, entry["shape"])):  # symbolic dims are strings
            if isinstance(want, int) and isinstance(size, int) and size != want:
                raise ManifestError(
                    f"{model_file}: {node.name} has size {size} on axis {axis} in the graph but "
                    f"{want} in the manifest's config (heads, head width or "
                    f"vocabulary differ); the manifest is from another model, re-export"
                )


POSITION_TABLES = ("transformer.position_embeddings.weight", "transformer.block_position_embeddings.weight")


def check_graph(model_file: Path, precision: str, config: GLMConfig) -> None:
    """What the manifest says of the graph, held against the graph before ONNX Runtime loads it, in one read of
    its protobuf (glm_runtime.onnx_facts, without onnx):
    - its ops and weights must be of the manifest's precision: an fp32 graph recorded as int4-weight, or a
      quantized one as fp32, is refused;
    - the config's max_sequence_length P must be the graph's: both position tables have P + 1 rows (docs/glm.md
      1.1). Every length check (a prompt too long, a TensorRT profile) trusts P; a manifest that claims more than
      the graph holds would let a position past the table reach ONNX Runtime's Gather."""
    try:
        facts = graph_facts(model_file)
    except ValueError as exc:  # GraphReadError, or an empty file (mmap)
        raise ManifestError(f"{model_file} cannot be read as an ONNX graph ({exc}); re-export the model") from None
    problem = precision_problem(facts, precision)
    if problem is not None:
        raise ManifestError(
            f"{model_file}: {problem} as its manifest says: the manifest was edited or belongs to another "
            f"model; re-run the stage that wrote the folder"
        )
    for name in POSITION_TABLES:
        dims = facts.initializers.get(name)
        if dims and dims[0] != config.max_sequence_length + 1:
            raise ManifestError(
                f"{model_file.parent}/manifest.json: max_sequence_length {config.max_sequence_length} disagrees "
                f"with the graph, whose {name} has {dims[0]} rows (max_sequence_length {dims[0] - 1}); the manifest "
                f"was edited or is from another model: re-export it"
            )


class OnnxRuntimeSession(Closable):
    """An exported GLM on ONNX Runtime. `run(feeds)` -> {"logits": [B,T',V] float32, "present.{i}.*": ...}.

    T' = T - logits_start (iotable.LOGITS_START; all T positions when it is not fed).

    With a CUDA provider (or io_binding=True) outputs are bound through IO binding: logits come back to the
    host, `present.*` stay on the device as OrtValues (`device` says where), and the generation loop keeps its
    cache there too (kvcache.DeviceKVCache).
    """

    def __init__(
        self,
        folder: str | Path,
        providers: Sequence[Any] = CPU_PROVIDERS,
        verify: bool = True,
        io_binding: bool | None = None,
        session_options: Any = None,
        staging: bool = False,
    ):
        import onnxruntime as ort  # deferred: the runtime package imports without it

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, kind="onnx", verify=verify, staging=staging)
        self.config, self.tokenizer_path = check_export(self.folder, self.manifest, staging=staging)
        self.tokenizer_record = self.manifest.tokenizer
        self.io = self.manifest.io
        self.inputs, self.outputs = self.io["inputs"], self.io["outputs"]
        self.precision = self.manifest.precision
        self.kv_dtype = np.dtype(kv_dtype(self.precision))
        self.prefix = load_prefix(self.folder, self.manifest, self.config, self.kv_dtype)  # P-tuning, or None
        model_file = self.folder / self.manifest.extra.get("model_file", MODEL_FILE)
        if not model_file.is_file():
            raise ManifestError(f"{model_file} is missing; re-export the model")
        check_graph(model_file, self.precision, self.config)
        names = [p if isinstance(p, str) else p[0] for p in providers]
        absent = [p for p in names if p not in ort.get_available_providers()]
        if absent:
            raise BackendError(
                f"ONNX Runtime provider {absent[0]} is not available here (available: "
                f"{ort.get_available_providers()}); for CUDA install onnxruntime-gpu on a machine "
                f"with an NVIDIA GPU, or use backend 'onnxruntime'"
            )
        self.providers = list(providers)
        from glm_runtime.memory import large_buffers_to_os

        large_buffers_to_os()  # the originals ONNX Runtime drops after pre-packing go back to the OS
        self._session = ort.InferenceSession(str(model_file), quiet_options(session_options), providers=self.providers)
        graph_in = {i.name for i in self._session.get_inputs()}
        graph_in |= {i.name for i in self._session.get_overridable_initializers()}  # optional inputs
        graph_out = {o.name for o in self._session.get_outputs()}
        table_in, table_out = {e["name"] for e in self.inputs}, {e["name"] for e in self.outputs}
        if graph_in != table_in or graph_out != table_out:
            diff = sorted((graph_in ^ table_in) | (graph_out ^ table_out))
            raise ManifestError(
                f"{model_file}: graph inputs/outputs differ from the manifest's IO table at "
                f"{diff[:4]}; re-export the model"
            )
        _check_graph_types(
            model_file,
            [*self._session.get_inputs(), *self._session.get_outputs()],
            {e["name"]: e for e in [*self.inputs, *self.outputs]},
        )
        cuda = "CUDAExecutionProvider" in names
        self.io_binding = cuda if io_binding is None else bool(io_binding)
        self.device = (("cuda" if cuda else "cpu"), 0) if self.io_binding else None
        if self.io_binding:  # IO binding cannot bind an initializer-backed input: these calls take the default
            self.inputs = required_inputs(self.io)

    def new_cache(self, batch: int, capacity: int) -> Any:
        """A KV cache in the memory `run` returns present.* in: numpy, or OrtValues on self.device."""
        from glm_runtime.kvcache import DeviceKVCache, KVCache

        c = self.config
        args = (self.io, batch, c.num_attention_heads, c.head_dim, capacity, self.kv_dtype)
        return (
            KVCache(*args)
            if self.device is None
            else DeviceKVCache(*args, device=self.device, providers=self.providers)
        )

    def close(self) -> None:
        self._session = None  # the native session and its weights go with the last reference
        super().close()

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self._check_open()
        check_feeds(feeds, self.inputs)
        if not self.io_binding:
            names = [o["name"] for o in self.outputs]
            return dict(zip(names, self._session.run(names, dict(feeds))))
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        names = [o["name"] for o in self.outputs]
        assert self.device is not None  # IO binding: the device the cache lives on
        for name in names:
            if name == "logits":
                binding.bind_output(name, "cpu")  # sampling happens on the host
            else:
                binding.bind_output(name, self.device[0], self.device[1])  # the cache never leaves the device
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        out = dict(zip(names, values))
        out["logits"] = out["logits"].numpy()
        return out


# ---------------------------------------------------------------- backend registry

# The torch reference is an optional plugin, named by string and imported only when asked for, so that
# glm_runtime never imports torch or glm_export on its own.
TORCH_REFERENCE = "glm_export.reference_session"


def _torch_session(folder: str | Path, **options: Any) -> Any:
    try:
        module = importlib.import_module(TORCH_REFERENCE)
    except ImportError as exc:
        raise BackendError(f"backend 'torch' needs the export extra ({exc}): {EXPORT_EXTRA_HINT}") from None
    return module.load_torch_session(folder, **options)


def _tensorrt_session(folder: str | Path, **options: Any) -> Any:
    from glm_runtime.trt_session import TensorRTSession  # tensorrt itself is imported when the session opens

    return TensorRTSession(folder, **options)


BACKENDS: dict[str, Callable[..., Any]] = {
    "onnxruntime": lambda folder, **kw: OnnxRuntimeSession(folder, **kw),
    "onnxruntime-cuda": lambda folder, **kw: OnnxRuntimeSession(folder, providers=CUDA_PROVIDERS, **kw),
    "torch": _torch_session,
    "tensorrt": _tensorrt_session,
}


def open_session(folder: str | Path, backend: str = "onnxruntime", **options: Any) -> Any:
    """A session on `backend` (a key of BACKENDS) for the artifact in `folder`."""
    try:
        make = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    return make(folder, **options)


# The bundled exported model, looked up only when no model folder is given.
BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "glmx-small-onnx"


def default_model() -> Path:
    if not (BUNDLED_MODEL / MANIFEST_NAME).is_file():
        raise ManifestError(
            f"no model folder given and the bundled model {BUNDLED_MODEL} is not in this install; "
            f"pass one (--model DIR), e.g. a folder written by `glmx export`"
        )
    return BUNDLED_MODEL


def _check_backend_fits(folder: Path, backend: str) -> None:
    """A folder of the wrong kind for the backend gets the command that makes the right one."""
    import json

    try:
        kind = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError):
        return  # no readable manifest: the session's own load says what is wrong
    wants = {"tensorrt": "engine", "torch": None}.get(backend, "onnx")
    if wants is None or kind == wants or kind is None:
        return
    if kind == "checkpoint":
        raise ManifestError(
            f"{folder} is a checkpoint folder, not an exported model: export it first (glmx export "
            f"{folder} -o {folder.name}-onnx), or fill from it directly with --backend torch"
        )
    if wants == "engine":
        raise ManifestError(
            f"{folder} is an ONNX folder, and --backend tensorrt runs engines: build one on an NVIDIA "
            f"GPU (glmx build-engine {folder} -o {folder.name}-engine), or use --backend onnxruntime"
        )
    if kind == "engine":
        raise ManifestError(
            f"{folder} is a TensorRT engine folder: fill with --backend tensorrt, or pass the ONNX "
            f"folder it was built from"
        )


def open_model(model: str | Path | None = None, backend: str = "onnxruntime", **options: Any) -> tuple[Any, Any]:
    """(session, tokenizer) for a model folder (None = the bundled model); the two must agree."""
    folder = Path(model) if model is not None else default_model()
    if not folder.is_dir():
        raise ManifestError(f"model folder {folder} does not exist")
    _check_backend_fits(folder, backend)
    session = open_session(folder, backend, **options)
    return session, session_tokenizer(session, folder)


def session_tokenizer(session: Any, folder: Path) -> Any:
    """The tokenizer that belongs to an open session of the model in `folder` (its own, or the manifest's)."""
    from glm_runtime.tokenizer import TokenizerError
    from glm_runtime.tokenizer_folder import load_recorded_tokenizer

    if session.tokenizer is not None:  # decided by the session's source (torch: a checkpoint)
        session.tokenizer.prompt = session.config.arch.prompt
        return session.tokenizer
    entry = session.tokenizer_record
    path = session.tokenizer_path or (folder / entry["file"] if entry.get("file") else None)
    if path is None:
        raise ManifestError(f"{folder} carries no tokenizer; re-export it with one (glmx export --tokenizer FILE)")
    try:
        tokenizer = load_recorded_tokenizer(path.parent, {**entry, "file": path.name})
    except TokenizerError as exc:
        raise ManifestError(str(exc)) from None
    tokenizer.prompt = session.config.arch.prompt  # the model's architecture lays its prompts out
    if tokenizer.vocab_size > session.config.vocab_size:
        raise ManifestError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{session.config.vocab_size} embedding rows; they do not belong together"
        )
    return tokenizer
