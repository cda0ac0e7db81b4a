"""Manifests and atomic writes: every artifact glmx writes describes itself and is checked on load.

In: a folder of files (checkpoint, ONNX model, engine) and what produced them.
Out: `manifest.json` beside them (schema, kind, config, tokenizer, precision, IO table, parity, sha256 of
every file, tool versions), written last and atomically; `load_manifest` refuses a tampered folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_runtime.errors import GLMXError
from glm_runtime.files import (  # noqa: F401 - atomic writes and hashes, importable from here too (the stages do)
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    fsync_dir,
    sha256_file,
    tool_versions,
)
from glm_runtime.parity import parity_problem

# The file names of glmx's artifact folders, declared once: every stage that writes or reads one names it here.
MANIFEST_NAME = "manifest.json"  # every artifact's manifest
MODEL_FILE = "model.onnx"  # an onnx folder's graph
DATA_FILE = "model.onnx.data"  # its weights, when they live outside the graph (streamed, or past protobuf's 2 GiB)
ENGINE_FILE = "model.engine"  # an engine folder's serialized TensorRT engine
WEIGHTS_FILE = "model.safetensors"  # a glmx checkpoint's weights
CONFIG_FILE = "config.json"  # a checkpoint's Hugging Face config (glm_export.hf_config)
SCHEMA = "glmx.manifest/1"
ARTIFACT_KINDS = ("checkpoint", "onnx", "engine")


class ManifestError(GLMXError, RuntimeError):
    """An artifact folder is missing, incomplete, tampered with, or not what the caller expected."""


class OutputError(ManifestError, FileExistsError):
    """An output folder that must not be written: the input itself, a folder of the user's, or one being written
    (a FileExistsError too, for callers that catch that)."""


STAGING_SUFFIX = ".partial"
# The marker glmx writes first into every staging folder it makes (and into an old OUT before moving it aside):
# leftovers of killed writers are recognised by it, never by their name alone.
STAGING_MARKER = ".glmx-staging"
_CLAIMS: dict[Path, int] = {}  # output folders this process holds the lock of -> nesting depth


def _lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _mark_staging(folder: Path, what: str) -> None:
    """Write the staging marker into `folder` (who made it, when): the first file of every staging folder."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (folder / STAGING_MARKER).write_text(f"glmx {what}: pid {os.getpid()} on {platform.node()} at {stamp}\n")


def _named_like_staging(out_dir: Path) -> list[Path]:
    """Folders beside OUT named as OUT's staging folders are (.OUT.*.partial, .OUT.*.old), marked or not."""
    if not out_dir.parent.is_dir():
        return []
    found = [*out_dir.parent.glob(f".{out_dir.name}.*{STAGING_SUFFIX}"), *out_dir.parent.glob(f".{out_dir.name}.*.old")]
    return sorted(p for p in found if p.is_dir() and not p.is_symlink())


def staging_folders(out_dir: Path) -> list[Path]:
    """Hidden staging folders of `out_dir` left by writes that never finished (a kill, a power cut): those named
    like OUT's staging folders that carry glmx's STAGING_MARKER. A same-named folder without it is not glmx's."""
    return [p for p in _named_like_staging(out_dir) if (p / STAGING_MARKER).is_file()]


def is_staging_name(name: str) -> bool:
    """Whether a folder name is one staging uses (`.OUT.XXXX.partial`, `.OUT.XXXX.old`): no loader opens such a
    folder, so no stage writes one."""
    return name.startswith(".") and name.endswith((STAGING_SUFFIX, ".old"))


def not_an_artifact(folder: Path) -> str | None:
    """Why `folder` (existing, not empty) is not a glmx artifact folder, or None when its manifest.json is a glmx
    manifest sealed by glmx (schema, kind and its own self-hash): only such a folder is ever replaced."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return f"holds files but no glmx {MANIFEST_NAME}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return f"holds a {MANIFEST_NAME} that is not a glmx manifest (not JSON)"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("kind") not in ARTIFACT_KINDS:
        return f"holds a {MANIFEST_NAME} that is not a glmx manifest (no schema {SCHEMA!r} and artifact kind)"
    if data.get(SELF_HASH) != _body_sha256(data):
        return (
            f"holds a {MANIFEST_NAME} whose self-hash ({SELF_HASH}) does not match its body (edited, or not "
            f"written by glmx)"
        )
    return None


def check_output(out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Any = ()) -> Path:
    """Refuse an output folder that would lose data, before any work: a symlink (followed or dangling); a name
    only staging folders have; OUT equal to, inside or above an input; an existing OUT without --overwrite; with
    --overwrite, anything but an empty folder or a glmx artifact (a folder whose manifest.json is a glmx manifest
    with a valid self-hash). Returns OUT resolved."""
    given = Path(out_dir)
    if given.is_symlink():
        raise OutputError(
            f"{out_dir} is a symbolic link (to {os.readlink(given)}): glmx writes a real folder and never "
            f"replaces a link; pass the folder itself, or choose another -o"
        )
    out = given.resolve()
    if is_staging_name(out.name):
        raise OutputError(
            f"{out_dir} is named like a staging folder (.NAME.*{STAGING_SUFFIX} / .NAME.*.old), which no loader "
            f"opens; choose a name without that leading '.' and suffix (-o OUT)"
        )
    for item in inputs or ():
        if item is None:
            continue
        src = Path(item).resolve()
        if out == src or src in out.parents:
            raise OutputError(
                f"output {out_dir} is {'the input' if out == src else 'inside the input'} {item}: "
                f"write the artifact to a new folder beside it (-o OTHER)"
            )
        if out in src.parents:
            raise OutputError(
                f"output {out_dir} contains the input {item}: replacing it would delete the input; "
                f"write to a new folder (-o OTHER)"
            )
    if out == Path.cwd().resolve() or out == Path(out.anchor):
        raise OutputError(f"output {out_dir} is the current folder or a root: name a new folder (-o OUT)")
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
        if not out.is_dir():
            raise OutputError(f"{out_dir} is a file or a link, not an artifact folder; refusing to replace it")
        why = not_an_artifact(out) if any(p.name != STAGING_MARKER for p in out.iterdir()) else None
        if why is not None:
            raise OutputError(
                f"{out_dir} {why}: it is not a glmx artifact, and --overwrite replaces only those (or an "
                f"empty folder); choose another -o"
            )
    return out


@contextlib.contextmanager
def claim_output(
    out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Any = (), log: Any = None
) -> Iterator[Path]:
    """Hold OUT for this writer for the whole stage: check_output, then a lock beside OUT (a second writer fails
    at once, naming the first), then remove staging folders that killed writers left (said through `log`).
    Re-entrant within one process, so staged_folder inside a claimed stage does not lock twice."""
    out = check_output(out_dir, overwrite=overwrite, inputs=inputs)
    if out in _CLAIMS:
        _CLAIMS[out] += 1
        try:
            yield out
        finally:
            _CLAIMS[out] -= 1
        return
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(out)
    fh = open(lock, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise OutputError(
                f"{out_dir} is being written by {holder}; wait for it to finish or choose another -o"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"glmx pid {os.getpid()} on {platform.node()}")
        fh.flush()
        say = log if log is not None else (lambda msg: None)
        for stale in _named_like_staging(out):  # the lock is ours: no live writer owns these
            if not (stale / STAGING_MARKER).is_file():
                say(
                    f"left {stale.name} alone: it is named like a staging folder of {out.name} but carries no "
                    f"{STAGING_MARKER} marker, so glmx did not make it (remove it yourself if it is not yours)"
                )
                continue
            shutil.rmtree(stale, ignore_errors=True)
            say(f"removed {stale.name}, left by an earlier write to {out.name} that did not finish")
        with contextlib.suppress(OSError):  # a marker left in OUT by a write killed just after its last rename
            (out / STAGING_MARKER).unlink()
        _CLAIMS[out] = 1
        try:
            yield out
        finally:
            del _CLAIMS[out]
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        fh.close()  # releases the flock; a killed process's lock is released by the kernel the same way


def claims_output(inputs: Any) -> Any:
    """Decorator for a stage function with `out_dir` and `overwrite` arguments: it holds OUT (claim_output) from
    its first line to its last, so a refused OUT costs no work and a second writer fails at once.
    inputs(arguments) -> the paths the stage reads (OUT may not be, contain, or sit inside any of them)."""
    import functools
    import inspect

    def wrap(fn: Any) -> Any:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def stage(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            paths = [x for x in inputs(a) if isinstance(x, (str, os.PathLike))]
            log = a.get("log") or (lambda msg: print(msg, file=sys.stderr))
            with claim_output(a["out_dir"], overwrite=bool(a.get("overwrite")), inputs=paths, log=log):
                return fn(*args, **kwargs)

        return stage

    return wrap


@contextlib.contextmanager
def staged_folder(
    out_dir: str | os.PathLike, overwrite: bool = False, inputs: Any = (), log: Any = None
) -> Iterator[Path]:
    """Build a whole artifact folder in a hidden sibling, then move it into place.

    The caller writes every file (manifest last) into the yielded folder. On failure nothing appears at
    `out_dir`; an existing `out_dir` is replaced only with overwrite=True, only if it is a glmx artifact (or
    empty), and only after success. Claims OUT (claim_output) unless the caller already did. A staging folder
    is never loadable (load_manifest refuses *.partial folders).
    """
    out_dir = Path(out_dir)
    with claim_output(out_dir, overwrite=overwrite, inputs=inputs, log=log):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=STAGING_SUFFIX, dir=out_dir.parent))
        try:
            _mark_staging(stage, f"staging folder of {out_dir.name}")  # first: a killed write's folder is known
            os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes 0700
            yield stage
            for path in stage.rglob("*"):  # some writers (safetensors) make 0600 files; an artifact is shareable
                if path.is_file() and not path.is_symlink():
                    os.chmod(path, 0o666 & ~current_umask())
            fsync_dir(stage)
            check_output(out_dir, overwrite=overwrite)  # nothing else may have appeared at OUT meanwhile
            if out_dir.exists():
                trash = stage.with_suffix(".old")
                _mark_staging(out_dir, f"old {out_dir.name}, being replaced")  # marked before it is moved aside
                os.replace(out_dir, trash)
                os.replace(stage, out_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(stage, out_dir)
            (out_dir / STAGING_MARKER).unlink()
            fsync_dir(out_dir.parent)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    kind: str  # checkpoint | onnx | engine
    config: dict[str, Any]
    precision: str = "fp32"
    # {"file", "sha256", "files": {name: sha256} (all of them: vocab.json + merges.txt), "kind", ...}
    tokenizer: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256
    io: dict[str, Any] = field(default_factory=dict)  # IO table and KV name patterns (ONNX / engine)
    parity: dict[str, Any] = field(default_factory=dict)  # figures against the parent artifact
    versions: dict[str, str] = field(default_factory=dict)
    parent: dict[str, Any] = field(default_factory=dict)  # {"path", "manifest_sha256"} of what it came from
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific facts (profiles, training recipe, ...)
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "schema",
                "kind",
                "precision",
                "config",
                "tokenizer",
                "files",
                "io",
                "parity",
                "versions",
                "parent",
                "extra",
            )
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if data.get("schema") != SCHEMA:
            raise ManifestError(f"unsupported manifest schema {data.get('schema')!r}; this glmx reads {SCHEMA!r}")
        if data.get("kind") not in ARTIFACT_KINDS:
            raise ManifestError(f"manifest kind {data.get('kind')!r} is not one of {ARTIFACT_KINDS}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Manifest:
    """Hash every file in `folder` (recursively, except the manifest) into the manifest, then write it last."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not path.name.startswith("."):
            files[rel] = sha256_file(path)
    manifest.files = files
    _seal(folder, manifest.to_dict())
    return manifest


# A staged manifest's parity record until the stage's checks end (then their record replaces it). No loader takes
# it: a copy of a staging folder killed during its check says so instead of passing for a deliberate --no-validate.
PARITY_PENDING = {"pending": True, "note": "written before the stage's checks ended; their record replaces this"}


def parity_pending() -> dict[str, Any]:
    """A fresh PARITY_PENDING record for a staged manifest."""
    return dict(PARITY_PENDING)


SELF_HASH = "manifest_sha256"  # the sha256 of the manifest's own body (every other key), so edits are seen


def _body_sha256(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _seal(folder: Path, data: Mapping[str, Any]) -> None:
    """Write manifest.json with the hash of its own body (tests use this to plant edits the hash cannot see)."""
    atomic_write_json(Path(folder) / MANIFEST_NAME, {**data, SELF_HASH: _body_sha256(data)})


def load_manifest(
    folder: str | os.PathLike, kind: str | None = None, verify: bool = True, staging: bool = False
) -> Manifest:
    """Read and check `folder/manifest.json`: schema, kind, and (verify=True) every file's sha256.
    staging=True: the stage that is writing the folder checks its own staged artifact."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not staging and is_staging_name(folder.name):
        raise ManifestError(
            f"{folder} is the staging folder of a write that did not finish (killed or failed); it "
            f"is never loadable: run the stage again (it removes the folder)"
        )
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: not a glmx artifact folder, or an interrupted write")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is corrupt (not a JSON object)")
    if SELF_HASH not in data:
        raise ManifestError(
            f"{path} carries no self-hash ({SELF_HASH}): it was written by an older glmx or "
            f"edited by hand; re-run the stage that wrote the folder"
        )
    if data[SELF_HASH] != _body_sha256(data):
        raise ManifestError(
            f"{path} was edited after it was written (its {SELF_HASH} does not match its body); "
            f"parity figures, flags and hashes in it cannot be trusted: re-run the stage that wrote it"
        )
    manifest = Manifest.from_dict(data)
    if kind is not None and manifest.kind != kind:
        raise ManifestError(f"{folder} holds a {manifest.kind!r} artifact, expected {kind!r}")
    if not staging and isinstance(manifest.parity, Mapping) and manifest.parity.get("pending"):
        raise ManifestError(
            f"{path}: its parity check is pending: the stage that wrote it was stopped before its checks ended "
            f"(this is a copy of its staging folder), so nothing vouches for it; re-run the stage"
        )
    problem = None if staging else parity_problem(manifest.kind, manifest.precision, manifest.parity, manifest.extra)
    if problem is not None:
        raise ManifestError(f"{path}: {problem}")
    if verify:
        verify_files(folder, manifest)
    return manifest


def tokenizer_file_names(entry: Mapping[str, Any]) -> list[str]:
    """Names of every file a manifest's tokenizer entry records: its "files" (vocab.json + merges.txt for a
    byte-level BPE), or the single "file" of manifests written before "files" existed; [] for none."""
    names = list(entry.get("files") or ())
    main = entry.get("file")
    return names if main in names or not main else [main, *names]


# files an artifact may read: an unlisted one beside the manifest is refused rather than silently used
ARTIFACT_SUFFIXES = (".onnx", ".data", ".engine", ".plan", ".safetensors", ".bin", ".pt", ".json", ".txt", ".model")


def required_files(manifest: Manifest) -> list[str]:
    """The files the artifact itself reads (graph and its external data, engine, weights, P-tuning prefix,
    tokenizer)."""
    extra = manifest.extra or {}
    by_kind: dict[str, list[Any]] = {
        "onnx": [extra.get("model_file") or MODEL_FILE, extra.get("external_data")],
        "engine": [extra.get("engine_file") or ENGINE_FILE],
        "checkpoint": [WEIGHTS_FILE, CONFIG_FILE],
    }
    names = by_kind.get(manifest.kind, [])
    ptuning = extra.get("ptuning") or {}  # a P-tuning prefix (glm_runtime.prefix): onnx and engine folders
    names.append(ptuning.get("file"))
    return [n for n in names if n] + tokenizer_file_names(manifest.tokenizer)


def check_complete(folder: str | os.PathLike, manifest: Manifest, staging: bool = False) -> None:
    """What a loader of a model artifact requires beyond the hashes: every file the artifact reads is hashed, no
    unlisted model or tokenizer file lies beside them, and (except for the stage still writing it) the parity
    record against its parent is there."""
    folder = Path(folder)
    where = folder / MANIFEST_NAME
    for name in required_files(manifest):
        if name not in manifest.files:
            raise ManifestError(
                f"{where} does not hash {name}, which the artifact reads: the manifest was edited "
                f"or is from another folder; re-run the stage that wrote it"
            )
    for path in sorted(folder.iterdir()):
        if (
            path.is_file()
            and path.name != MANIFEST_NAME
            and not path.name.startswith(".")
            and path.suffix in ARTIFACT_SUFFIXES
            and path.name not in manifest.files
        ):
            raise ManifestError(
                f"{path} is in the artifact folder but not in its manifest: remove it, or re-run "
                f"the stage that wrote the folder"
            )
    if not staging and manifest.kind in ("onnx", "engine") and not manifest.parity:
        raise ManifestError(
            f"{where} has no parity record: the stage that wrote it never checked it against "
            f"its parent (or it was removed); re-run that stage"
        )


def verify_files(folder: str | os.PathLike, manifest: Manifest) -> None:
    folder = Path(folder)
    if not manifest.files:
        raise ManifestError(f"{folder / MANIFEST_NAME} lists no files")
    recorded = manifest.tokenizer.get("files")
    for name in tokenizer_file_names(manifest.tokenizer):  # no tokenizer file may escape the hash check
        if name not in manifest.files:
            raise ManifestError(
                f"{folder / MANIFEST_NAME} names tokenizer file {name!r} but does not hash it; "
                f"the manifest was edited or the stage that wrote it did not copy the file"
            )
        if isinstance(recorded, Mapping) and recorded.get(name) not in (None, manifest.files[name]):
            raise ManifestError(
                f"{folder / MANIFEST_NAME}: tokenizer file {name!r} has one sha256 in its "
                f"tokenizer entry and another in its file list; the manifest was edited"
            )
    for rel, expected in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(
                f"{path} does not match its manifest (sha256 {actual[:12]}... != {expected[:12]}...): "
                f"the file was modified or corrupted; re-run the stage that wrote it"
            )
