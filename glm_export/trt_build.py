"""Build a TensorRT engine folder from a glmx ONNX folder, strongly typed: precision comes from the graph itself.

In: an ONNX folder (manifest kind "onnx") and shape limits (batch, context, new tokens). Out: an engine folder with
model.engine, the tokenizer and a manifest (kind "engine": TensorRT version, GPU, profiles, parity against the ONNX).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.config import GLMConfig
from glm_runtime.errors import GLMXError
from glm_runtime.iotable import accepted_tables, io_table, kv_dtype, without_optional_inputs
from glm_runtime.manifest import (
    ENGINE_FILE,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    atomic_write_bytes,
    claims_output,
    load_manifest,
    sha256_file,
    staged_folder,
    tokenizer_file_names,
    tool_versions,
    write_manifest,
)
from glm_runtime.prefix import load_prefix
from glm_runtime.trt_session import EngineInfo, Profile, TensorRTSession, gpu_identity, import_tensorrt

DEFAULT_MAX_NEW_TOKENS = 64


class EngineBuildError(GLMXError, ValueError):
    """The limits, the graph or the build itself cannot give a valid engine; the message says what to change."""


def default_timing_cache() -> Path:
    """~/.cache/glmx/trt_timing.cache ($XDG_CACHE_HOME/glmx/... when that is set): shared by every build."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "glmx" / "trt_timing.cache"


# ---------------------------------------------------------------- optimization profiles (pure python)


def engine_io(io: Mapping[str, Any]) -> dict[str, Any]:
    """The IO table of an engine built from a graph with this table: optional inputs (a graph input backed by
    an initializer, e.g. logits_start) are constants to TensorRT's ONNX parser, so the engine lacks them and
    always returns the logits of every position."""
    return without_optional_inputs(io)


def _config_and_io(source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(source, Manifest):
        return dict(source.config), engine_io(source.io or io_table(source.config, source.precision))
    config = source.to_dict() if isinstance(source, GLMConfig) else dict(source)
    return config, engine_io(io_table(config))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineBuildError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def resolve_limits(
    config: Mapping[str, Any], *, max_batch: int, max_context: int | None, max_new_tokens: int, prefix: int = 0
) -> dict[str, int]:
    """Check the limits against the model: context + new tokens must fit its max_sequence_length P. prefix: the
    slots of a P-tuning prefix (glm_runtime.prefix) in front of every row: they take no position, but cache slots."""
    P = int(config["max_sequence_length"])
    _positive_int("max_batch", max_batch)
    _positive_int("max_new_tokens", max_new_tokens)
    if max_context is None:
        if max_new_tokens >= P:
            raise EngineBuildError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in this model's "
                f"max_sequence_length {P}: lower --max-new-tokens"
            )
        max_context = P - max_new_tokens
    _positive_int("max_context", max_context)
    if max_context + max_new_tokens > P:
        raise EngineBuildError(
            f"max_context {max_context} + max_new_tokens {max_new_tokens} = {max_context + max_new_tokens} exceeds "
            f"the model's max_sequence_length {P} (its position tables and training length): lower --max-context "
            f"or --max-new-tokens so that they sum to at most {P}"
        )
    return {
        "max_batch": max_batch,
        "max_context": max_context,
        "max_new_tokens": max_new_tokens,
        "max_past": prefix + max_context + max_new_tokens,
        "max_sequence_length": P,
        **({"prefix_slots": prefix} if prefix else {}),
    }


def _shape(spec: list[Any], dims: Mapping[str, tuple[int, int, int]], k: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d][k] for d in spec)


def compute_profiles(
    manifest_or_config: Any,
    *,
    max_batch: int,
    max_context: int | None,
    max_new_tokens: int,
    opt_batch: int = 1,
    opt_context: int | None = None,
    prefix: int = 0,
) -> list[Profile]:
    """Two profiles over the IO table: "context" (prompt pass) and "decode" (one token per row).

    max_batch counts rows per call (prompts x beams). The KV cache holds up to max_past = max_context +
    max_new_tokens slots and is passed whole (unused slots masked), so past_seq spans 0..max_past in both.
    The prompt pass usually runs with an empty past (opt 0); decode steps with a cache sized for one prompt.
    prefix: a P-tuning prefix's slots, in every past (the prompt pass's opt past is then P; max_past grows by P).
    """
    config, io = _config_and_io(manifest_or_config)
    limits = resolve_limits(
        config, max_batch=max_batch, max_context=max_context, max_new_tokens=max_new_tokens, prefix=prefix
    )
    max_batch, max_context, max_past = limits["max_batch"], limits["max_context"], limits["max_past"]
    if not 1 <= _positive_int("opt_batch", opt_batch) <= max_batch:
        raise EngineBuildError(f"opt_batch {opt_batch} must lie in 1..max_batch {max_batch}")
    opt_context = min(max_context, 128) if opt_context is None else _positive_int("opt_context", opt_context)
    if opt_context > max_context:
        raise EngineBuildError(f"opt_context {opt_context} must lie in 1..max_context {max_context}")
    opt_past = min(max_past, prefix + opt_context + limits["max_new_tokens"])

    def dims(seq: tuple[int, int, int], past: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
        total = tuple(s + p for s, p in zip(seq, past))  # attention_mask's last dim = past_seq + seq
        return {"batch": (1, opt_batch, max_batch), "seq": seq, "past_seq": past, "total_seq": total}

    profiles = []
    for name, d in (
        ("context", dims((1, opt_context, max_context), (0, prefix, max_past))),
        ("decode", dims((1, 1, 1), (0, opt_past, max_past))),
    ):
        shapes = {s["name"]: tuple(_shape(s["shape"], d, k) for k in range(3)) for s in io["inputs"]}
        profiles.append(Profile(name=name, dims=d, shapes=shapes))
    return profiles


# ---------------------------------------------------------------- the ONNX parent


def onnx_model_file(folder: Path, manifest: Manifest) -> Path:
    """The graph of an ONNX folder: manifest.extra["model_file"], else its only *.onnx file."""
    name = manifest.extra.get("model_file")
    candidates = [name] if name else [f for f in manifest.files if f.endswith(".onnx")]
    if len(candidates) != 1:
        raise ManifestError(
            f"{folder} lists {len(candidates)} .onnx files {candidates}; expected exactly one "
            f"(or extra.model_file in its manifest)"
        )
    return folder / candidates[0]


def check_graph_for_trt(onnx_file: Path) -> str:
    """Refuse a graph with ops / dtypes / attributes TensorRT's ONNX parser does not take (glm_export.trt_check)."""
    try:
        from glm_export.trt_check import check_trt
    except ImportError as exc:
        return f"not pre-checked (glm_export.trt_check unavailable: {exc}); TensorRT's parser is the only check"
    problems = check_trt(onnx_file)
    if problems:
        listed = "\n  ".join(str(p) for p in problems)
        raise EngineBuildError(
            f"{onnx_file.name} has nodes TensorRT's ONNX parser cannot take (nothing was "
            f"built; export a graph without them, e.g. Q/DQ instead of dynamic int8):\n  {listed}"
        )
    return "passed glm_export.trt_check"


# ---------------------------------------------------------------- TensorRT build (needs a GPU)


def _network_flags(trt: Any) -> int:
    # TensorRT 10 builds weakly typed networks unless asked; TensorRT 11 removed weak typing (BuilderFlag.FP16
    # is gone) and keeps STRONGLY_TYPED only as an ignored, deprecated flag, so it is not passed there.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or not hasattr(trt.BuilderFlag, "FP16"):
        return 0
    return 1 << int(flag)


def _parser_errors(parser: Any) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else ""  # node names: TensorRT >= 8.6
        op = err.node_operator() if hasattr(err, "node_operator") else "?"
        lines.append(f"  node {name or '#' + str(err.node())} ({op}): {err.desc()}")
    return "\n".join(lines) or "  (the parser gave no details; run with a verbose TensorRT log)"


def _check_network_io(trt: Any, network: Any, io: Mapping[str, Any]) -> None:
    """The parsed network must have exactly the IO table's tensors and dtypes (strong typing keeps them)."""
    for kind, count, get in (
        ("inputs", network.num_inputs, network.get_input),
        ("outputs", network.num_outputs, network.get_output),
    ):
        got = {get(i).name: np.dtype(trt.nptype(get(i).dtype)).name for i in range(count)}
        want = {s["name"]: np.dtype(s["dtype"]).name for s in io[kind]}
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))
            raise EngineBuildError(f"the graph's {kind} differ from its manifest's IO table: {diff}")


def _load_timing_cache(config: Any, path: Path) -> str:
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        ok = cache is not None and config.set_timing_cache(cache, False)  # False: refuse another GPU's timings
    except Exception:  # a corrupt file: TensorRT raises  # noqa: BLE001 - TensorRT raises bare Exceptions; the message names what failed
        ok = False
    if ok:
        return "reused" if blob else "new"
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return "new (the old one came from another TensorRT version or GPU, or was corrupt)"


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if path.is_file():  # another build may have saved since this one loaded: keep its entries as well
        try:
            cache.combine(config.create_timing_cache(path.read_bytes()), False)
        except Exception:  # noqa: BLE001 - TensorRT raises bare Exceptions; the message names what failed
            pass
    atomic_write_bytes(path, bytes(cache.serialize()))


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that also keeps the errors, so the exception can quote them."""
    errors = {trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR}

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in errors:
                self.errors.append(msg)
            if severity in errors or severity == trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

    return Logger()


def _build_plan(
    trt: Any,
    onnx_file: Path,
    io: Mapping[str, Any],
    profiles: list[Profile],
    precision: str,
    workspace_gb: float | None,
    cache_path: Path,
) -> tuple[Any, dict[str, Any]]:
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):  # from the file: external weight data next to it is found
        raise EngineBuildError(f"TensorRT's ONNX parser refused {onnx_file.name}:\n{_parser_errors(parser)}")
    _check_network_io(trt, network, io)
    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and precision == "fp32":
        config.clear_flag(tf32)  # fp32 means fp32: TF32 matmuls round inputs to 10-bit mantissas
    for profile in profiles:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.shapes.items():
            opt.set_shape(name, lo, mid, hi)
        if config.add_optimization_profile(opt) < 0:
            raise EngineBuildError(f"TensorRT refused the {profile.name} profile {profile.dims}")
    cache_state = _load_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT failed to build the engine: " + ("; ".join(logger.errors) or "see its log"))
    _save_timing_cache(config, cache_path)
    facts = {
        "strongly_typed": True,
        "network_flags": _network_flags(trt),
        "tf32": precision != "fp32",
        "workspace_gb": workspace_gb,
        "timing_cache": {"path": str(cache_path), "state": cache_state},
    }
    return plan, facts


# ---------------------------------------------------------------- parity against the ONNX parent


def engine_tolerance(precision: str) -> Any:
    """The precision's row of glm_export.compare.TOLERANCES, the one tolerance table."""
    from glm_export.compare import TOLERANCES

    # qdq-int8: TensorRT runs the same explicit Q/DQ as ONNX Runtime, so only the kernels' float arithmetic
    # differs, as in fp16 (not yet measured on a GPU)
    row = {"qdq-int8": "fp16"}.get(precision, precision)
    if row not in TOLERANCES:
        raise EngineBuildError(
            f"TensorRT engines are built from fp32, fp16 or qdq-int8 ONNX folders, not "
            f"{precision!r} (int8-dynamic and int4-weight use ONNX Runtime-only operators)"
        )
    return TOLERANCES[row]


def measure_parity(session: TensorRTSession, onnx_dir: Path, limits: Mapping[str, int]) -> Any:
    """The engine against ONNX Runtime CPU on its ONNX parent, on GLM's cases that fit the engine's profiles
    (glm_export.compare: one harness for every stage). -> the Comparison."""
    from glm_export.compare import compare_sessions, glm_cases
    from glm_runtime.session import OnnxRuntimeSession

    reference = OnnxRuntimeSession(onnx_dir)
    tokens = limits["max_context"] + limits["max_new_tokens"]
    cases = [
        c
        for c in glm_cases(session.config.vocab_size)
        if c.calls[0].input_ids.shape[0] <= limits["max_batch"]
        and sum(call.input_ids.shape[1] for call in c.calls) <= tokens
        and all(call.input_ids.shape[1] == 1 for call in c.calls[1:])
    ]  # the decode profile: one token
    return compare_sessions(
        session, reference, stage="build-engine", tolerance=engine_tolerance(session.precision), cases=cases
    )  # tolerance given: a qdq-int8 engine is judged on values too


# ---------------------------------------------------------------- the engine folder


def engine_manifest(
    parent: Manifest,
    onnx_dir: Path,
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    profiles: list[Profile],
    limits: Mapping[str, int],
    build: Mapping[str, Any],
) -> Manifest:
    return Manifest(
        kind="engine",
        config=dict(parent.config),
        precision=parent.precision,
        tokenizer=dict(parent.tokenizer),
        io=engine_io(parent.io or io_table(parent.config, parent.precision)),
        versions=tool_versions("tensorrt", "onnxruntime"),
        parent={
            "kind": "onnx",
            "path": str(Path(onnx_dir).resolve()),
            "manifest_sha256": sha256_file(Path(onnx_dir) / MANIFEST_NAME),
        },
        extra={
            "engine_file": ENGINE_FILE,
            "tensorrt": {"version": str(trt_version)},
            "gpu": {"name": gpu_name, "compute_capability": compute_capability},
            "profiles": [p.to_dict() for p in profiles],
            "limits": dict(limits),
            "build": dict(build),
        },
    )


def write_engine_folder(
    out_dir: str | Path, plan: Any, onnx_dir: str | Path, manifest: Manifest, overwrite: bool = False
) -> Path:
    """model.engine + the parent's tokenizer file + manifest (last), staged so a crash leaves nothing valid."""
    out_dir, onnx_dir = Path(out_dir), Path(onnx_dir)
    with staged_folder(out_dir, overwrite=overwrite) as stage:
        (stage / ENGINE_FILE).write_bytes(memoryview(plan))
        for name in tokenizer_file_names(manifest.tokenizer):  # vocab.json + merges.txt for a BPE pair
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(onnx_dir / name, stage / name)
        if manifest.extra.get("ptuning"):  # the parent's P-tuning prefix file, as it is (glm_runtime.prefix)
            shutil.copyfile(onnx_dir / manifest.extra["ptuning"]["file"], stage / manifest.extra["ptuning"]["file"])
        write_manifest(stage, manifest)
    return out_dir


@claims_output(lambda a: [a["onnx_dir"], a["timing_cache"]])
def build_engine(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    max_batch: int = 1,
    max_context: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    workspace_gb: float | None = None,
    timing_cache: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """ONNX folder -> engine folder for the first visible GPU (choose it with CUDA_VISIBLE_DEVICES).

    Checks the folder, limits and graph (glm_export.trt_check) before touching TensorRT; builds strongly
    typed with a "context" and a "decode" profile; measures parity against ONNX Runtime and refuses to write an
    engine that misses its tolerance. max_context defaults to P - max_new_tokens; workspace_gb to TensorRT's
    own limit; timing_cache to default_timing_cache() (read, extended, rewritten atomically).
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    parent = load_manifest(onnx_dir, kind="onnx")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if workspace_gb is not None and not workspace_gb > 0:
        raise EngineBuildError(f"workspace_gb must be > 0, got {workspace_gb!r}")
    if parent.io not in accepted_tables(parent.config, parent.precision):
        raise ManifestError(
            f"{onnx_dir / MANIFEST_NAME}: its IO table does not follow from its config and precision "
            f"{parent.precision!r} (edited, or from another model); re-export the model"
        )
    onnx_file = onnx_model_file(onnx_dir, parent)
    ptuning = parent.extra.get("ptuning") or {}  # a P-tuning prefix: P more cache slots in every profile
    P = int(ptuning.get("pre_seq_len", 0))
    limits = resolve_limits(
        parent.config, max_batch=max_batch, max_context=max_context, max_new_tokens=max_new_tokens, prefix=P
    )
    profiles = compute_profiles(
        parent, max_batch=max_batch, max_context=limits["max_context"], max_new_tokens=max_new_tokens, prefix=P
    )
    engine_tolerance(parent.precision)  # fail before a long build, not after it
    graph_check = check_graph_for_trt(onnx_file)  # static: refuses on any machine, TensorRT or not
    trt = import_tensorrt()
    gpu_name, capability = gpu_identity(0)
    cache_path = Path(timing_cache).expanduser() if timing_cache else default_timing_cache()
    start = time.perf_counter()
    plan, build = _build_plan(
        trt, onnx_file, engine_io(parent.io), profiles, parent.precision, workspace_gb, cache_path
    )
    build.update(seconds=round(time.perf_counter() - start, 1), graph_check=graph_check)
    manifest = engine_manifest(
        parent,
        onnx_dir,
        trt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        profiles=profiles,
        limits=limits,
        build=build,
    )
    if ptuning:
        manifest.extra["ptuning"] = ptuning
    prefix = load_prefix(onnx_dir, parent, GLMConfig.from_dict(parent.config), kv_dtype(parent.precision))
    session = TensorRTSession.from_plan(plan, manifest, EngineInfo.from_manifest(manifest), prefix=prefix)
    try:
        result = measure_parity(session, onnx_dir, limits)
    finally:
        session.close()
    manifest.parity = result.to_dict()
    if not result.passed:
        raise EngineBuildError(
            f"the engine misses its parity budget against the ONNX parent: "
            f"{'; '.join(result.failures[:3])}; nothing was written"
        )
    return write_engine_folder(out_dir, plan, onnx_dir, manifest, overwrite=overwrite)
