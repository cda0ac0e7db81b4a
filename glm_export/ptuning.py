"""A P-tuning v2 fine-tune of ChatGLM-6B (chatglm_v1_spec.md 8) read, checked against its base and turned into
the per-layer prefix keys and values once, for `glmx export --ptuning DIR`.

In: the official ptuning/main.py output folder (config.json with pre_seq_len and prefix_projection; pytorch_model.bin
or model.safetensors holding only `transformer.prefix_encoder.*`) and the base's GLMConfig. Out: a `PTuning` whose
prefix is PrefixEncoder(arange(P)) viewed [P, 2L, H, d] (layer i: key = slice 2i, value = slice 2i+1), computed in
float64 and kept float32 as the official loader keeps the encoder; `write_ptuning_prefix` stores it in an artifact
folder (glm_runtime.prefix's file) and returns the manifest record. Whatever does not fit is one line, before any
output is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.config import GLMConfig
from glm_runtime.errors import GLMXError
from glm_runtime.files import sha256_file
from glm_runtime.prefix import PREFIX_FILE, Prefix, write_prefix_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what the official trainer (or a re-save) writes
ENCODER = "transformer.prefix_encoder."


class PTuningError(GLMXError, ValueError):
    """A P-tuning checkpoint that cannot be read or does not fit the base model it is exported with."""


@dataclass(frozen=True)
class PTuning:
    """A checked P-tuning checkpoint: its prefix (float32) and what the manifest records of it."""

    prefix: Prefix
    pre_seq_len: int
    prefix_projection: bool
    folder: Path
    files: dict[str, str]  # file name -> sha256 of what was read (config.json, the weights)
    dtype: str  # the stored encoder's dtype


def _config(folder: Path) -> tuple[dict[str, Any], int, bool]:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PTuningError(f"P-tuning checkpoint {folder}: cannot read its config.json ({exc})") from None
    P, projection = data.get("pre_seq_len"), data.get("prefix_projection", False)
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise PTuningError(
            f"P-tuning checkpoint {path}: pre_seq_len is {P!r}, not a positive integer (a P-tuning v2 output of "
            f"ptuning/main.py sets it, e.g. 128)"
        )
    if not isinstance(projection, bool):
        raise PTuningError(f"P-tuning checkpoint {path}: prefix_projection is {projection!r}, not true or false")
    return data, P, projection


def _weights(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The encoder's tensors as numpy, under names without the `transformer.prefix_encoder.` front."""
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise PTuningError(f"P-tuning checkpoint {folder} has none of {list(WEIGHT_FILES)}")
    path = found[0]
    try:
        if path.suffix == ".safetensors":
            from glm_export.weights import read_safetensors

            raw = read_safetensors(path)
            sd = {k: np.asarray(raw[k]) for k in raw}
        else:
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            sd = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in loaded.items()}
    except Exception as exc:  # noqa: BLE001 - torch.load / safetensors raise bare Exceptions on a malformed file
        raise PTuningError(f"P-tuning checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    strip = {k: k[len("transformer.") :] if k.startswith("transformer.") else k for k in sd}
    other = sorted(k for k, short in strip.items() if not short.startswith("prefix_encoder."))
    if other:
        raise PTuningError(
            f"P-tuning checkpoint {path} holds {len(other)} tensors besides {ENCODER}* ({', '.join(other[:3])}"
            f"{' ...' if len(other) > 3 else ''}): a P-tuning v2 output holds the prefix encoder alone"
        )
    return path, {strip[k][len("prefix_encoder.") :]: v for k, v in sd.items()}


def _check_shapes(path: Path, sd: dict[str, np.ndarray], cfg: GLMConfig, P: int, projection: bool) -> None:
    L, h = cfg.num_layers, cfg.hidden_size
    wide = 2 * L * h
    expected = {"embedding.weight": (P, h if projection else wide)}
    if projection:
        expected.update({"trans.0.weight": (h, h), "trans.0.bias": (h,), "trans.2.weight": (wide, h)})
        expected["trans.2.bias"] = (wide,)
    names = sorted(set(sd) ^ set(expected))
    if names:
        raise PTuningError(
            f"P-tuning checkpoint {path}: prefix_projection {str(projection).lower()} takes "
            f"{sorted(ENCODER + k for k in expected)}, but the file {'lacks' if names[0] in expected else 'also holds'}"
            f" {ENCODER}{names[0]}"
        )
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise PTuningError(
                f"P-tuning checkpoint {path}: {ENCODER}{name} is {list(sd[name].shape)}, but pre_seq_len {P} and the "
                f"base (L={L}, h={h}, so 2*L*h = {wide}) take {list(shape)}: the fine-tune does not fit this base"
            )
        if not np.isfinite(sd[name]).all():
            raise PTuningError(f"P-tuning checkpoint {path}: {ENCODER}{name} holds NaN or inf")


def prefix_kv(sd: dict[str, np.ndarray], cfg: GLMConfig, P: int, projection: bool) -> np.ndarray:
    """PrefixEncoder(arange(P)) (spec 8) -> [L, 2, H, P, d] float32; the arithmetic in float64."""
    x = np.asarray(sd["embedding.weight"], np.float64)[:P]  # [P, h] or [P, 2Lh]
    if projection:  # Linear h->h, Tanh, Linear h->2Lh
        x = np.tanh(x @ np.asarray(sd["trans.0.weight"], np.float64).T + np.asarray(sd["trans.0.bias"], np.float64))
        x = x @ np.asarray(sd["trans.2.weight"], np.float64).T + np.asarray(sd["trans.2.bias"], np.float64)
    L, H, d = cfg.num_layers, cfg.num_attention_heads, cfg.head_dim
    kv = x.reshape(P, L, 2, H, d)  # the official view [P, 2L, H, d]: slice 2i is layer i's key, 2i+1 its value
    return np.ascontiguousarray(kv.transpose(1, 2, 3, 0, 4), dtype=np.float32)  # [L, 2, H, P, d]


def read_ptuning(folder: str | Path, config: GLMConfig) -> PTuning:
    """The checkpoint in `folder`, checked against the base's config (sizes, keys, shapes), its prefix computed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PTuningError(f"P-tuning checkpoint {folder} is not a folder (ptuning/main.py writes checkpoint-N/)")
    if not config.arch.rotary:
        raise PTuningError(f"--ptuning is ChatGLM-6B's P-tuning v2; {config.arch.title} has no prefix encoder")
    data, P, projection = _config(folder)
    for key, base in (
        ("num_layers", config.num_layers),
        ("hidden_size", config.hidden_size),
        ("num_attention_heads", config.num_attention_heads),
    ):
        if key in data and data[key] != base:
            raise PTuningError(
                f"P-tuning checkpoint {folder / 'config.json'}: {key} {data[key]} but the base has {base}: it was "
                f"trained on another model"
            )
    path, sd = _weights(folder)
    _check_shapes(path, sd, config, P, projection)
    dtype = str(sd["embedding.weight"].dtype)
    files = {name: sha256_file(folder / name) for name in ("config.json", path.name)}
    return PTuning(Prefix(prefix_kv(sd, config, P, projection)), P, projection, folder, files, dtype)


def write_ptuning_prefix(folder: Path, tuned: PTuning) -> dict[str, Any]:
    """The prefix file in an artifact folder (atomically) -> the manifest's extra["ptuning"] record."""
    sha = write_prefix_file(
        folder / PREFIX_FILE, tuned.prefix.kv, {"pre_seq_len": str(tuned.pre_seq_len), "format": "glmx-prefix/1"}
    )
    return {
        "file": PREFIX_FILE,
        "sha256": sha,
        "source": str(tuned.folder.resolve()),
        "source_files": tuned.files,
        "source_dtype": tuned.dtype,
        "pre_seq_len": tuned.pre_seq_len,
        "prefix_projection": tuned.prefix_projection,
        "layout": "[L, 2, H, P, d] float32: layer i's key [i, 0], value [i, 1]; raw keys (no rotary), at no "
        "position, visible to every token, in every row's first P cache slots",
        "computed": "PrefixEncoder(arange(P)) once, in float64, stored float32 (the official loader keeps the "
        "encoder fp32)",
    }
