"""P-tuning v2 prefixes (chatglm_v1_spec.md 8): the per-layer keys and values a P-tuning checkpoint puts in front
of every sequence, computed once at export, stored in the artifact as one file and loaded hash-checked.

In: an artifact folder whose manifest records `extra["ptuning"]` (written by glm_export.ptuning). Out: a `Prefix`:
per layer raw (key, value) [1, H, P, d] in the cache dtype. They sit in every row's first P cache slots, visible to
every token, at no position (the real tokens still start at 0) and never rotated. Numpy alone.

File: prefix.safetensors, one float32 tensor "prefix" [L, 2, H, P, d] (layer i's key is [i, 0], its value [i, 1]).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.files import atomic_path
from glm_runtime.manifest import MANIFEST_NAME, ManifestError

PREFIX_FILE = "prefix.safetensors"
TENSOR = "prefix"
RECORD = "ptuning"  # the manifest's extra key: {file, sha256, pre_seq_len, prefix_projection, source, ...}


@dataclass(frozen=True)
class Prefix:
    """The prefix of every sequence: kv [L, 2, H, P, d] in the cache dtype (layer i: key kv[i, 0], value kv[i, 1])."""

    kv: np.ndarray

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer i's (key, value), each [1, H, P, d]."""
        return self.kv[i, 0][None], self.kv[i, 1][None]

    def rows(self, names: Sequence[tuple[str, str]], batch: int) -> dict[str, np.ndarray]:
        """{key name: [batch, H, P, d], value name: ...} per layer for `names` (past_* or present_* pairs): what a
        context pass feeds as past_key_values, or what a cache stores in its first slots (broadcast views)."""
        out = {}
        for i, (kn, vn) in enumerate(names):
            k, v = self.layer(i)
            out[kn] = np.broadcast_to(k, (batch, *k.shape[1:]))
            out[vn] = np.broadcast_to(v, (batch, *v.shape[1:]))
        return out


def prefix_length(session: Any) -> int:
    """P of a session's prefix (0 without one): the cache slots in front of every row."""
    prefix = getattr(session, "prefix", None)
    return 0 if prefix is None else prefix.length


# ---------------------------------------------------------------- the file


def write_prefix_file(path: Path, kv: np.ndarray, metadata: Mapping[str, str] | None = None) -> str:
    """prefix.safetensors (the one float32 tensor, 8-aligned header), written atomically; returns its sha256."""
    kv = np.ascontiguousarray(kv, dtype="<f4")
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise ValueError(f"a prefix is [L, 2, H, P, d], got {list(kv.shape)}")
    header = {
        "__metadata__": dict(metadata or {}),
        TENSOR: {"dtype": "F32", "shape": list(kv.shape), "data_offsets": [0, kv.nbytes]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + kv.tobytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def parse_prefix_file(data: bytes, where: str) -> np.ndarray:
    """The tensor of a prefix file's bytes, float32 [L, 2, H, P, d]; ManifestError naming `where` if malformed."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        entry = header[TENSOR]
        lo, hi = (int(x) for x in entry["data_offsets"])
        shape = [int(s) for s in entry["shape"]]
        if entry["dtype"] != "F32" or len(shape) != 5 or shape[1] != 2 or hi - lo != 4 * int(np.prod(shape)):
            raise ValueError(f"{entry['dtype']} {shape}, expected F32 [L, 2, H, P, d]")
        body = data[8 + size + lo : 8 + size + hi]
        if len(body) != hi - lo:
            raise ValueError("truncated")
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise ManifestError(f"{where} is not a glmx prefix file ({exc}); re-export with --ptuning") from None
    return np.frombuffer(body, dtype="<f4").reshape(shape)


def load_prefix(folder: Path, manifest: Any, config: Any, dtype: Any) -> Prefix | None:
    """The artifact's prefix (None when its manifest records none), its bytes checked against the manifest's
    sha256 as they are read (whatever verify said for the rest) and its shape against the config."""
    record = (manifest.extra or {}).get(RECORD)
    if not record:
        return None
    name = record.get("file", PREFIX_FILE)
    where = Path(folder) / name
    expected = manifest.files.get(name)
    if expected is None:
        raise ManifestError(f"{Path(folder) / MANIFEST_NAME} records a P-tuning prefix {name!r} but does not hash it")
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{where}, the P-tuning prefix its manifest records, cannot be read ({exc})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ManifestError(
            f"{where} does not match its manifest (sha256 {actual[:12]}... != {expected[:12]}...): the P-tuning "
            f"prefix was modified or corrupted; re-export with --ptuning"
        )
    kv = parse_prefix_file(data, str(where))
    want = (config.num_layers, 2, config.num_attention_heads, int(record["pre_seq_len"]), config.head_dim)
    if tuple(kv.shape) != want:
        raise ManifestError(f"{where} holds a prefix {list(kv.shape)} but the model takes {list(want)}; re-export")
    return Prefix(kv.astype(dtype))
