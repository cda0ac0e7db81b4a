"""Files as glmx writes and reads them: atomic writes (a temp file, fsync, rename: nothing half written) and
sha256 hashes, plus the tool versions a manifest records. No glmx import: glm_runtime.manifest builds on it (and
re-exports these names, which the stages import from there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- atomic file writing


def current_umask() -> int:
    """The process umask (read without changing it: set and restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same folder; on success fsync it and rename it over `path`.

    A crash or exception leaves `path` as it was (absent or the old version), never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; an artifact is as readable as any new file
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- hashing

_HASHED: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> digest, for files hashed earlier in this process


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256. A file this process hashed before and that has not changed since (same inode, size and
    modification time) is not read again: a stage writes its manifest twice (before and after its check), and a
    GLM-10B data file is 20 GB."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHED:
        return _HASHED[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def tool_versions(*modules: str) -> dict[str, str]:
    """Versions of python, numpy and the named modules: the imported module's own, else the installed
    distribution's (read from its metadata: nothing is imported here, so recording torch's version does not cost
    its multi-second import)."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "glmx": _glmx_version()}
    for name in ("numpy", *modules):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            versions[name] = str(module.__version__)
            continue
        for dist in (name, f"{name}-gpu"):  # onnxruntime-gpu provides the module onnxruntime
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _glmx_version() -> str:
    from glm_runtime import __version__

    return __version__
