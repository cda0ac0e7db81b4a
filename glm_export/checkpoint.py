"""Checkpoints: load a GLM from glmx's own folder, a Hugging Face folder or Megatron/DeepSpeed shards; save glmx's own.

In: a path in one of three layouts (docs/glm.md 8.1-8.3), optionally a config or preset name.
Out: `LoadedCheckpoint` (reference GLMModel in eval mode, its config, what was found); `save_checkpoint` writes
model.safetensors + config.json (+ tokenizer) + manifest.json atomically.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_export.hf_config import from_hf_dict, to_hf_dict
from glm_export.lora import merge_lora
from glm_export.model import GLMModel
from glm_export.nbits import Released
from glm_export.published import BASE_PREFIXES, to_glmx_names
from glm_export.sat import (
    SatError,
    check_degree,
    config_from_args,
    is_model_args,
    looks_like_sat,
    rank_files,
    read_model_args,
    read_sat,
    write_sat,
)
from glm_export.weights import Entry, Weights, WeightsError, dtype_of, read_safetensors, to_numpy
from glm_runtime.config import GELU_KINDS, PRESETS, ConfigError, GLMConfig, get_preset
from glm_runtime.manifest import (
    CONFIG_FILE,
    MANIFEST_NAME,
    WEIGHTS_FILE,
    Manifest,
    atomic_write_json,
    claims_output,
    load_manifest,
    sha256_file,
    staged_folder,
    tool_versions,
    write_manifest,
)
from glm_runtime.tokenizer import GLMTokenizer, TokenizerError, tokenizer_entry
from glm_runtime.tokenizer_folder import check_fits, load_recorded_tokenizer, resolve_tokenizer

LAYOUTS = ("glmx", "hf", "megatron", "sat")  # sat: GLM-130B's tensor-parallel shards (glm_export.sat)
# Hugging Face weight files, in order of preference (safetensors first: no pickle).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")  # Megatron / DeepSpeed (docs/glm.md 8.1)
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# Tokenizer files looked for beside the weights, first found wins (GLM's vocabularies, docs/glm.md 7); vocab.json
# brings merges.txt along (glm_runtime.tokenizer.tokenizer_files).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "cog-pretrain.model",
    "ice_text.model",  # ChatGLM-6B (chatglm_v1_spec.md 6)
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)
# Beside the base model (under published.BASE_PREFIXES) only these head modules are skipped (docs/glm.md 8.1, 8.2).
HEAD_PREFIXES = ("pool_layer.", "multichoice_head.", "dense.", "out_proj.")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION = {v: k for k, v in DTYPES.items()}
# GeLU when the config does not say (docs/glm.md 1.2): the original training code (Megatron layout) uses the tanh
# approximation, the Hugging Face remote code exact erf. Printed and recorded either way; --gelu overrides.
DEFAULT_GELU = {"hf": "erf", "megatron": "tanh", "sat": "erf"}


class CheckpointError(WeightsError):
    """A checkpoint cannot be read: unknown layout, unreadable file, or weights that do not fit the config."""


@dataclass
class LoadedCheckpoint:
    model: GLMModel  # eval mode, on CPU
    config: GLMConfig
    layout: str  # glmx | hf | megatron
    tokenizer_file: Path | None
    manifest: Manifest | None  # glmx layout only
    source_dtype: torch.dtype  # dtype of the weights in the files
    files: tuple[Path, ...] = ()  # the weight files read
    ignored_keys: tuple[str, ...] = ()  # downstream head weights skipped
    notes: tuple[str, ...] = ()  # what was decided and why: printed by the CLI, recorded in every manifest
    tokenizer: GLMTokenizer | None = None  # the folder's tokenizer, checked against the config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# ---------------------------------------------------------------- reading single files


def _numpy_and_argparse_globals() -> list:
    """Globals that the original's checkpoints pickle besides tensors (numpy RNG state, argparse args).

    They only rebuild arrays, dtypes and a namespace; nothing else is allowed in (weights_only=True).
    """
    import argparse

    import numpy as np

    mm = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype, argparse.Namespace]
    for fn in (mm._reconstruct, mm.scalar):  # files from numpy 1.x name them numpy.core.*
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    allowed += [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", ())]
    return allowed


def _read_pickle(path: Path) -> Any:
    """torch.load with weights_only=True; every failure names the file."""
    try:
        with torch.serialization.safe_globals(_numpy_and_argparse_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(
                f"cannot read {path}: the file is truncated or corrupt ({exc}); re-download or re-save it"
            ) from None
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # legacy format: no listing available  # noqa: BLE001 - torch.load / safetensors raise bare Exceptions on a malformed file
            unsafe = ["(not listable)"]
        raise CheckpointError(
            f"refusing to unpickle {path}: it holds Python objects besides tensors ({', '.join(unsafe)}), "
            f"and glmx loads pickles with weights_only=True so no code runs. If you trust the file, re-save "
            f"only its weights: torch.save({{'module': torch.load(f, weights_only=False)['module']}}, f)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load / safetensors raise bare Exceptions on a malformed file
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc}); re-download or re-save it"
        ) from None


def _read_safetensors(path: Path) -> Weights:
    try:
        return read_safetensors(path)  # the header now, each tensor when it is used (glm_export.weights)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None


def _read_weights(path: Path) -> Weights:
    """One flat state dict from a .safetensors or pickled file, read lazily; checks every value is a tensor."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    sd = _read_pickle(path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, expected a dict of tensors")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path} is not a flat state dict: {bad[:5]} are not tensors")
    return Weights.from_arrays(sd, str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _find_tokenizer(*folders: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
    return None


# ---------------------------------------------------------------- model parallelism (docs/glm.md 1.5, 8.3)


def _mp_rule(key: str) -> str:
    """How a key is split across model-parallel ranks: 'qkv', 'rows', 'cols' or 'replicated'."""
    if key.endswith("attention.query_key_value.weight") or key.endswith("attention.query_key_value.bias"):
        return "qkv"  # ColumnParallel with stride 3: rank r holds [Q_r; K_r; V_r]
    if key.endswith(("word_embeddings.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
        return "rows"  # VocabParallelEmbedding / ColumnParallelLinear
    if key.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return "cols"  # RowParallelLinear (its bias is added once, after the all-reduce)
    return "replicated"  # LayerNorms, row-parallel biases, position tables


def _merge_key(key: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One key of k model-parallel ranks (rank order) as the MP-1 tensor."""
    rule = _mp_rule(key)
    try:
        if rule == "qkv":
            thirds = [p.chunk(3, dim=0) for p in parts]  # per rank: q_r, k_r, v_r
            return torch.cat([t[j] for j in range(3) for t in thirds], dim=0)
        if rule in ("rows", "cols"):
            return torch.cat(list(parts), dim=0 if rule == "rows" else 1)
    except RuntimeError as exc:  # torch.cat on incompatible shapes
        raise CheckpointError(
            f"cannot merge {key} across model-parallel shards: {[list(p.shape) for p in parts]} ({exc})"
        ) from None
    if any(p.shape != parts[0].shape or not torch.equal(p, parts[0]) for p in parts[1:]):
        raise CheckpointError(
            f"{key} should be identical on every model-parallel rank but differs: "
            f"the shards come from different checkpoints"
        )
    return parts[0]


def _check_same_keys(shards: Sequence[Mapping[str, Any]]) -> list[str]:
    if not shards:
        raise CheckpointError("no model-parallel shards to merge")
    keys = list(shards[0])
    for r, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise CheckpointError(f"model-parallel shard {r} has different keys than shard 0: {diff[:5]}")
    return keys


def merge_model_parallel(shards: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge k model-parallel state dicts (rank order) into one MP-1 state dict."""
    return {key: _merge_key(key, [s[key] for s in shards]) for key in _check_same_keys(shards)}


def _merged_lazily(shards: list[Mapping[str, torch.Tensor]], where: str) -> Weights:
    """merge_model_parallel one key at a time, when the key is read (the shards stay memory-mapped)."""
    entries = {}
    for key in _check_same_keys(shards):
        parts = [s[key] for s in shards]
        rule = _mp_rule(key)
        shape = list(parts[0].shape)
        if rule in ("qkv", "rows") and shape:
            shape[0] = sum(p.shape[0] for p in parts)
        elif rule == "cols" and len(shape) > 1:
            shape[1] = sum(p.shape[1] for p in parts)
        read = lambda key=key, parts=parts: to_numpy(_merge_key(key, parts))
        entries[key] = Entry(shape, dtype_of(parts[0]), read, where)
    return Weights(entries)


def split_model_parallel(state_dict: Mapping[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of merge_model_parallel: k rank state dicts as the original's model parallelism holds them."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for key, value in state_dict.items():
        rule = _mp_rule(key)
        dim = 1 if rule == "cols" else 0
        width = value.shape[dim] // (3 if rule == "qkv" else 1)
        if rule != "replicated" and width % k:
            raise CheckpointError(f"cannot split {key} {list(value.shape)} into {k} model-parallel parts")
        for r in range(k):
            if rule == "qkv":
                q, kk, v = (t.chunk(k, dim=0)[r] for t in value.chunk(3, dim=0))
                shards[r][key] = torch.cat([q, kk, v], dim=0).clone()
            elif rule == "replicated":
                shards[r][key] = value.clone()
            else:
                shards[r][key] = value.chunk(k, dim=dim)[r].clone()
    return shards


# ---------------------------------------------------------------- the three layouts


@dataclass
class _Found:
    layout: str
    state_dict: Weights  # read lazily, tensor by tensor
    files: list[Path]
    config: GLMConfig | None = None  # from config.json / manifest
    tokenizer_file: Path | None = None
    manifest: Manifest | None = None
    notes: list[str] = field(default_factory=list)
    config_file: Path | None = None  # where `config` was read from
    gelu_stated: bool = False  # the config file says which GeLU (a glmx-written one does)
    tokenizer_replaced: dict[str, Any] | None = None  # {checkpoint, given: {file, sha256}} when --tokenizer replaced it
    quantization_bit: int = 0  # config.json's (chatglm-6b-int4 / -int8 folders): their linears are integers


def _read_glmx(folder: Path) -> _Found:
    manifest = load_manifest(folder, kind="checkpoint")  # checks the sha256 of every file
    config = GLMConfig.from_dict(manifest.config)
    tok = manifest.tokenizer.get("file")
    return _Found(
        "glmx",
        _read_weights(folder / WEIGHTS_FILE),
        [folder / WEIGHTS_FILE],
        config,
        folder / tok if tok else None,
        manifest,
        config_file=folder / MANIFEST_NAME,
        gelu_stated=True,
    )


def read_config_file(path: str | Path) -> tuple[GLMConfig, bool]:
    """A config file in either form: glmx's GLMConfig JSON, or a Hugging Face config.json (docs/glm.md 8.2).
    -> (config, whether the file states the GeLU kind)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config file {path} does not exist")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    try:
        if "gelu" in data and "hidden_dropout" in data:  # glmx's own form (GLMConfig.to_json)
            return GLMConfig.from_dict(data), True
        config = from_hf_dict(data)
        return config, "gelu" in (data.get("glmx") or {}) or config.arch.gelu_stated
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _read_hf(folder: Path) -> _Found:
    config, gelu_stated = read_config_file(folder / CONFIG_FILE)
    if config.name == "custom":  # the hub's config.json has no name: the folder's (glm-10b, ...) says it
        config = config.replace(name=folder.resolve().name)
    name = next(n for n in HF_WEIGHTS if (folder / n).is_file())
    if name.endswith(".index.json"):  # sharded: {"weight_map": {key: file}}
        weight_map = _read_json(folder / name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / name} has no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = [folder / name]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {folder / name} but missing")
    sd = Weights.merged([_read_weights(path) for path in files])  # shard by shard, tensor by tensor
    found = _Found(
        "hf", sd, files, config, _find_tokenizer(folder), config_file=folder / CONFIG_FILE, gelu_stated=gelu_stated
    )
    bits = _read_json(folder / CONFIG_FILE).get("quantization_bit") or 0
    if bits not in (0, 4, 8):
        raise CheckpointError(f"{folder / CONFIG_FILE} has quantization_bit {bits!r}; the released ones are 4 and 8")
    found.quantization_bit = int(bits)
    return found


def _mp_files(folder: Path) -> list[Path]:
    """mp_rank_XX files of one iteration folder, in rank order, with no rank missing."""
    ranks = {int(m.group(1)): p for p in folder.iterdir() if (m := MP_FILE.match(p.name))}
    if ranks and sorted(ranks) != list(range(len(ranks))):
        raise CheckpointError(
            f"model-parallel shards in {folder} are inconsistent: found ranks {sorted(ranks)}, expected "
            f"mp_rank_00 .. mp_rank_{len(ranks) - 1:02d} with none missing (or extra)"
        )
    return [ranks[r] for r in sorted(ranks)]


def _read_megatron(path: Path) -> _Found:
    notes = []
    if path.is_file():
        if MP_FILE.match(path.name) and len(siblings := _mp_files(path.parent)) > 1:
            raise CheckpointError(
                f"{path} is one of {len(siblings)} model-parallel shards; pass the folder "
                f"{path.parent} so that all of them are merged"
            )
        files, roots = [path], (path.parent, path.parent.parent)
    else:
        tracker = next((path / t for t in TRACKER_FILES if (path / t).is_file()), None)
        folder = path
        if tracker is not None:
            tag = tracker.read_text(encoding="utf-8").strip()  # "release", an iteration, or a DeepSpeed tag
            folder = path / tag
            if not folder.is_dir():
                raise CheckpointError(f"{tracker} names checkpoint {tag!r}, but {folder} does not exist")
            notes.append(f"{tracker.name} -> {tag}")
        files = _mp_files(folder)
        if not files:
            raise CheckpointError(f"{folder} holds no mp_rank_XX_model_states.pt files")
        roots = (folder, folder.parent)  # the iteration folder, then the checkpoint root
    shards = []
    for f in files:
        obj = (
            {k: torch.from_numpy(v) for k, v in _read_weights(f).items()}
            if f.suffix == ".safetensors"
            else _read_pickle(f)
        )
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{f} holds a {type(obj).__name__}, expected a dict with a 'module' entry")
        world = obj.get("mp_world_size")
        if isinstance(world, int) and world != len(files):
            raise CheckpointError(
                f"{f} says mp_world_size={world}, but {len(files)} mp_rank files were found "
                f"beside it: shards are missing or come from different runs"
            )
        if "module" in obj:
            sd = obj["module"]
        elif obj and all(torch.is_tensor(v) for v in obj.values()):
            sd = obj  # a bare state dict
        else:
            raise CheckpointError(
                f"{f} has no 'module' entry (keys: {sorted(map(str, obj))[:8]}): "
                f"not a Megatron/DeepSpeed model-states file"
            )
        bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
        if bad:
            raise CheckpointError(f"{f}: 'module' is not a flat state dict ({bad[:5]} are not tensors)")
        shards.append(dict(sd))
    where = ", ".join(str(f) for f in files[:2]) + (" ..." if len(files) > 2 else "")
    sd = Weights.from_arrays(shards[0], where) if len(shards) == 1 else _merged_lazily(shards, where)
    if len(shards) > 1:
        notes.append(f"merged {len(shards)} model-parallel shards")
    found = _Found("megatron", sd, files, None, _find_tokenizer(*roots), notes=notes)
    beside = next((r / CONFIG_FILE for r in roots if (r / CONFIG_FILE).is_file()), None)
    if beside is not None:  # a config.json beside the shards describes them (HF or glmx form)
        found.config, found.gelu_stated = read_config_file(beside)
        found.config_file = beside
    return found


def _read_sat(path: Path, config: GLMConfig | str | Path | None) -> _Found:
    """GLM-130B's SAT folder (glm_export.sat): its model arguments (a .sh / .json file; or a glmx config, a preset,
    a GLMConfig) first, since no config is beside the shards; then the rank files, merged as each tensor is read."""
    notes: list[str] = []
    tp = None
    if config is None:
        raise CheckpointError(
            f"{path} is a SAT checkpoint (GLM-130B's tensor-parallel shards), which carries no config: pass "
            f"--config FILE, the model arguments it runs with (configs/model_glm_130b.sh or a JSON of them)"
        )
    if isinstance(config, Path) and is_model_args(config):
        cfg, tp = config_from_args(read_model_args(config), config, notes)
        gelu_stated = True
    else:
        found = _Found("sat", Weights({}), [path])
        cfg, gelu_stated = _resolve_config(config, found), found.gelu_stated
        notes += found.notes
    if cfg.architecture != "glm-130b":
        raise CheckpointError(
            f"{path} is a SAT checkpoint of GLM-130B's layout; the given config is {cfg.arch.title}'s"
        )
    files, more = rank_files(path, tp)
    check_degree(cfg, len(files), str(files[0].parent))
    weights = read_sat(files)
    notes += more + [f"merged {len(files)} tensor-parallel rank(s) one tensor at a time (SAT rules, GeGLU halves)"]
    roots = (files[0].parent, path)
    found = _Found("sat", weights, files, cfg, _find_tokenizer(*roots), notes=notes, gelu_stated=gelu_stated)
    found.config_file = config if isinstance(config, Path) else None
    return found


def _detect(path: Path, config: GLMConfig | str | Path | None = None) -> _Found:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir() and (looks_like_sat(path) or (isinstance(config, Path) and is_model_args(config))):
        try:
            return _read_sat(path, config)
        except SatError as exc:
            raise CheckpointError(str(exc)) from None
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _read_glmx(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file() and any((path / n).is_file() for n in HF_WEIGHTS):
        return _read_hf(path)
    if path.is_file() or any((path / t).is_file() for t in TRACKER_FILES) or _mp_files(path):
        return _read_megatron(path)
    found = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(
        f"{path} is not a GLM checkpoint glmx can read; expected one of: "
        f"(glmx) manifest.json + {WEIGHTS_FILE} + {CONFIG_FILE}; "
        f"(hf) {CONFIG_FILE} + one of {', '.join(HF_WEIGHTS)}; "
        f"(megatron) {' or '.join(TRACKER_FILES)} + <iteration|release>/mp_rank_00_model_states.pt, "
        f"or mp_rank_XX_model_states.pt files, or the path of one such file. Found: {found}"
    )


# ---------------------------------------------------------------- keys, config and shapes


def _strip_prefix(sd: Weights) -> tuple[Weights, list[str]]:
    """Official names (docs/glm.md 1.1) from keys with or without a base-model prefix; downstream heads set aside."""
    for prefix in BASE_PREFIXES:
        if any(k.startswith((prefix + "word_embeddings.", prefix + "transformer.")) for k in sd):
            names = {k: k[len(prefix) :] for k in sd if k.startswith(prefix)}
            heads = [k for k in sd if not k.startswith(prefix) and k.startswith(HEAD_PREFIXES)]
            for k in sd:  # anything else stays under its own name and is reported if unexpected
                if not k.startswith(prefix) and k not in heads:
                    if k in names.values():
                        raise CheckpointError(f"{k} appears both with and without the {prefix!r} prefix")
                    names[k] = k
            return sd.renamed(names), heads
    return sd, []


def _sizes(sd: Weights) -> dict[str, int] | None:
    """num_layers, hidden_size, vocab_size, max_sequence_length as the weights' shapes say (None if unknowable)."""
    if "word_embeddings.weight" not in sd or "transformer.position_embeddings.weight" not in sd:
        return None
    emb, pos = sd.shape("word_embeddings.weight"), sd.shape("transformer.position_embeddings.weight")
    if len(emb) != 2 or len(pos) != 2:
        return None
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    return {
        "num_layers": max(layers) + 1 if layers else 0,
        "hidden_size": emb[1],
        "vocab_size": emb[0],
        "max_sequence_length": pos[0] - 1,
    }  # tables have P + 1 rows


def _resolve_config(config: GLMConfig | str | Path | None, found: _Found) -> GLMConfig:
    """The caller's config (a GLMConfig, a preset name, or a config file), then the folder's own config file,
    then a preset whose sizes match the weights. Nothing is guessed: with none of these the load is refused."""
    if isinstance(config, Path):
        cfg, found.gelu_stated = read_config_file(config)
        found.notes.append(f"config: {config} (given)")
        return cfg
    if isinstance(config, str):
        cfg = get_preset(config)
        found.notes.append(f"config: preset {cfg.name} (given)")
        found.gelu_stated = False
        return cfg
    if config is not None:
        found.gelu_stated = True
        return config
    if found.config is not None:
        found.notes.append(f"config: {found.config_file}")
        return found.config
    sizes = _sizes(found.state_dict)
    if sizes is None:
        raise CheckpointError(
            f"{found.files[0]} has no word_embeddings.weight / position table to infer the model "
            f"size from; pass --config FILE or --preset NAME"
        )
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in sizes.items()):
            found.notes.append(
                f"config: preset {preset.name} (no config.json beside the checkpoint; the weights' "
                f"sizes L={sizes['num_layers']} h={sizes['hidden_size']} V={sizes['vocab_size']} "
                f"P={sizes['max_sequence_length']} are its sizes, so its "
                f"{preset.num_attention_heads} heads are ASSUMED)"
            )
            return preset
    shown = " ".join(f"{k}={v}" for k, v in sizes.items())
    raise CheckpointError(
        f"{found.files[0]} carries no config, no {CONFIG_FILE} is beside it, and its sizes ({shown}) match no "
        f"preset: the number of attention heads cannot be read from the weights; pass --config FILE (a "
        f"config.json) or --preset NAME"
    )


def _resolve_gelu(cfg: GLMConfig, gelu: str | None, found: _Found) -> GLMConfig:
    """--gelu wins; else what the config file states; else the layout's default (DEFAULT_GELU), said aloud."""
    if gelu is not None:
        if gelu not in GELU_KINDS:
            raise CheckpointError(f"gelu must be one of {GELU_KINDS}, got {gelu!r}")
        if found.layout == "glmx" and gelu != cfg.gelu:
            raise CheckpointError(
                f"{found.config_file} says the model was trained with gelu={cfg.gelu}; --gelu {gelu} contradicts it"
            )
        found.notes.append(f"gelu: {gelu} (given)")
        return cfg.replace(gelu=gelu)
    if cfg.arch.gelu_stated and found.layout != "glmx":
        found.notes.append(f"gelu: {cfg.gelu} (what {cfg.arch.title}'s released code computes)")
        return cfg
    if found.gelu_stated or found.layout == "glmx":
        found.notes.append(f"gelu: {cfg.gelu} (from {found.config_file or 'the given config'})")
        return cfg
    default = DEFAULT_GELU[found.layout]
    why = (
        "the Hugging Face remote code's exact erf GeLU"
        if default == "erf"
        else "the original training code's tanh approximation"
    )
    found.notes.append(
        f"gelu: {default} (the config does not say; {why} is the {found.layout} default - "
        f"ASSUMED, pass --gelu {'tanh' if default == 'erf' else 'erf'} if the model was trained "
        f"otherwise)"
    )
    return cfg.replace(gelu=default)


def _resolve_tokenizer(
    tokenizer: str | Path | GLMTokenizer | None, kind: str | None, cfg: GLMConfig, found: _Found
) -> tuple[GLMTokenizer | None, GLMConfig]:
    """The checkpoint's tokenizer (or the given one), decided by its folder and checked against cfg; the
    config's `tokenizer` field then names its kind."""
    if isinstance(tokenizer, GLMTokenizer):  # already loaded (an exported folder's recorded one)
        try:
            tok = check_fits(tokenizer, cfg, "the given tokenizer")
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
        found.notes.append(f"tokenizer: {tok.kind} (given, loaded)")
        return tok, cfg.replace(tokenizer=tok.kind)
    try:
        if tokenizer is None and kind is None and found.layout == "glmx" and found.manifest.tokenizer.get("file"):
            tok = check_fits(
                load_recorded_tokenizer(found.files[0].parent, found.manifest.tokenizer), cfg, str(found.config_file)
            )
            found.notes.append(f"tokenizer: {tok.kind} (recorded in {found.config_file})")
        else:
            path = Path(tokenizer) if tokenizer is not None else found.tokenizer_file
            if path is None:
                found.notes.append(f"tokenizer: none found beside {found.files[0].parent}")
                return None, cfg
            tok, notes = resolve_tokenizer(path, kind=kind, config=cfg, layout=found.layout)
            found.notes.extend(notes)
    except TokenizerError as exc:  # includes a tokenizer that does not fit the embedding (check_fits)
        raise CheckpointError(str(exc)) from None
    if tokenizer is not None:
        _say_replaced(found, Path(next(iter(tok.files.values()))))
    return tok, cfg.replace(tokenizer=tok.kind)


def _own_tokenizer(found: _Found) -> Path | None:
    """The tokenizer file the checkpoint itself holds: its manifest's (a glmx folder), else the one found beside
    its weights."""
    if found.manifest is not None and found.manifest.tokenizer.get("file"):
        return found.files[0].parent / found.manifest.tokenizer["file"]
    return found.tokenizer_file


def _say_replaced(found: _Found, given: Path) -> None:
    """A --tokenizer that replaces the checkpoint's own tokenizer is said (both files, sha256 prefixes) and
    recorded (both hashes: found.tokenizer_replaced, which the manifest's extra.source carries)."""
    own = _own_tokenizer(found)
    if own is None or not own.is_file():
        return
    hashes = {"checkpoint": (own, sha256_file(own)), "given": (given, sha256_file(given))}
    if hashes["checkpoint"][1] == hashes["given"][1]:
        return
    found.tokenizer_replaced = {k: {"file": str(f), "sha256": h} for k, (f, h) in hashes.items()}
    found.notes.append(
        f"tokenizer: --tokenizer {given} (sha256 {hashes['given'][1][:12]}...) replaces the checkpoint's own "
        f"{own} (sha256 {hashes['checkpoint'][1][:12]}...); both hashes are recorded"
    )


def describe_architecture(cfg: GLMConfig) -> str:
    """One line of every choice the architecture makes (printed, and in the manifest's notes)."""
    parts = []
    for key, value in cfg.arch.describe(cfg.num_layers, cfg.rotary_inv_freq).items():
        if key == "alpha" and cfg.arch.alpha_layers:
            value = (
                f"sqrt(2 x {cfg.arch.alpha_layers}) = {value:.6g}, fixed in the released code whatever num_layers says"
            )
        elif key == "rotary_inv_freq":
            value = "fp16-rounded (the HF code's)" if value == "fp16" else "exact fp32 (as chatglm.cpp / TensorRT-LLM)"
        parts.append(f"{key.replace('_', ' ')} {value}")
    return f"architecture: {cfg.arch.title}: " + "; ".join(parts[1:])


def _check_sizes(sd: Weights, config: GLMConfig, source: str) -> None:
    """The config's sizes (layers, width, V, P) against the weights' shapes, before anything is checked against
    the config (the tokenizer's ids against its V): a config that misstates the model is named as such."""
    sizes = _sizes(sd)
    if sizes is not None:
        diff = [f"{k}: config {getattr(config, k)}, weights {v}" for k, v in sizes.items() if getattr(config, k) != v]
        if diff:
            raise CheckpointError(
                f"weights in {source} do not match config {config.name!r}: {'; '.join(diff)}. "
                f"Pass the right config / --preset, or fix {CONFIG_FILE}"
            )


def _check_weights(sd: Weights, expected: Mapping[str, Sequence[int]], config: GLMConfig, source: str) -> None:
    """Names and shapes against the config, from the files' headers (NaN / inf are checked as each tensor is
    read, by glm_export.weights.Weights)."""
    _check_sizes(sd, config, source)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} of {len(expected)} GLM weights: {missing[:6]}; "
            f"the file is incomplete or not a GLM base model"
        )
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source} has unexpected keys {unexpected[:6]}: glmx loads only the GLM base model "
            f"(docs/glm.md 1.1); remove them or save the base model's weights"
        )
    wrong = [
        f"{k}: expected {list(v)}, got {list(sd.shape(k))}"
        for k, v in expected.items()
        if tuple(sd.shape(k)) != tuple(v)
    ]
    if wrong:
        raise CheckpointError(f"{source} has mis-shaped weights for config {config.name!r}: {'; '.join(wrong[:6])}")


# ---------------------------------------------------------------- entry points


@dataclass
class OpenedCheckpoint:
    """A checkpoint decided and checked but not read: config, tokenizer and notes as load_checkpoint has them,
    and `weights` (glm_export.weights.Weights, official names) that read each tensor from the files when used."""

    config: GLMConfig
    layout: str
    weights: Weights
    tokenizer: GLMTokenizer | None
    tokenizer_file: Path | None
    manifest: Manifest | None
    source_dtype: str  # "fp32" | "fp16" | "bf16": the word embedding's dtype in the files
    files: tuple[Path, ...]
    ignored_keys: tuple[str, ...]
    notes: tuple[str, ...]
    tokenizer_replaced: dict[str, Any] | None = None  # the checkpoint's own tokenizer and the given one, both hashed
    released: Released | None = None  # a chatglm-6b-int4 / -int8 folder's integers (glm_export.nbits)
    lora: dict[str, Any] | None = None  # the merged LoRA adapter's record (glm_export.lora), for the manifest

    def num_parameters(self) -> int:
        return self.weights.numel()


SOURCE_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def open_checkpoint(
    path: str | Path,
    *,
    config: GLMConfig | str | Path | None = None,
    tokenizer: str | Path | GLMTokenizer | None = None,
    tokenizer_kind: str | None = None,
    gelu: str | None = None,
    rotary_inv_freq: str | None = None,
    lora: str | Path | None = None,
) -> OpenedCheckpoint:
    """Everything load_checkpoint decides, from the files' headers only: names and shapes are checked against
    the config; the weights are read one tensor at a time when asked for (and checked for NaN / inf then).
    lora: a PEFT LoRA adapter folder, merged into each targeted weight as it is read (glm_export.lora)."""
    found = _detect(Path(path), config)
    sd, ignored = _strip_prefix(found.state_dict)
    sd.error = CheckpointError
    found.state_dict = sd
    sat_config = found.config if found.layout == "sat" else None  # the SAT reader resolved it already
    cfg = _resolve_gelu(sat_config or _resolve_config(config, found), gelu, found)
    if rotary_inv_freq is not None:
        cfg = cfg.replace(rotary_inv_freq=rotary_inv_freq)
    found.notes.append(describe_architecture(cfg))
    lora_record = None
    if lora is not None:  # PEFT's delta is in the published row order: merged before glmx reorders the rows
        qkv_rows = "blocks" if found.layout == "glmx" else None
        sd, lora_record = merge_lora(sd, cfg, lora, found.notes, qkv_rows=qkv_rows)
    released = None
    if found.layout != "glmx":  # a published folder's names and layout -> glmx's (GLM: nothing changes)
        sd, released = to_glmx_names(sd, cfg, found.notes, found.quantization_bit)
    source = ", ".join(str(f) for f in found.files[:3]) + (" ..." if len(found.files) > 3 else "")
    _check_sizes(sd, cfg, source)  # the config first: the tokenizer is then checked against a true V
    tok, cfg = _resolve_tokenizer(tokenizer, tokenizer_kind, cfg, found)
    expected = {k: tuple(v.shape) for k, v in GLMModel.skeleton(cfg).state_dict().items()}
    _check_weights(sd, expected, cfg, source)
    sd = sd.renamed({k: k for k in expected})  # the model's own order: embeddings, layers 0.., final LN
    if ignored:
        found.notes.append(f"ignored {len(ignored)} downstream head weights ({ignored[0]} ...)")
    tok_file = Path(next(iter(tok.files.values()))) if tok is not None else None
    dtype = SOURCE_DTYPES.get(sd.dtype_name("word_embeddings.weight"), sd.dtype_name("word_embeddings.weight"))
    return OpenedCheckpoint(
        cfg,
        found.layout,
        sd,
        tok,
        tok_file,
        found.manifest,
        dtype,
        tuple(found.files),
        tuple(ignored),
        tuple(found.notes),
        found.tokenizer_replaced,
        released,
        lora_record,
    )


def model_from_weights(config: GLMConfig, weights: Mapping[str, Any], dtype: torch.dtype) -> GLMModel:
    """The whole reference GLMModel (eval mode) from official-name weights, each converted to `dtype` as read."""
    model = GLMModel.skeleton(config)
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(weights[k])).to(dtype) for k in weights}, strict=True, assign=True
    )
    return model.eval()


def load_checkpoint(
    path: str | Path,
    *,
    config: GLMConfig | str | Path | None = None,
    dtype: torch.dtype | None = torch.float32,
    tokenizer: str | Path | GLMTokenizer | None = None,
    tokenizer_kind: str | None = None,
    gelu: str | None = None,
    lora: str | Path | None = None,
) -> LoadedCheckpoint:
    """Load any supported layout into the reference GLMModel (eval mode, CPU).

    config: a GLMConfig, a preset name, or a config file (glmx or Hugging Face JSON); it wins over the folder's
    own config. tokenizer / tokenizer_kind: a tokenizer file or folder to use instead of the checkpoint's, and
    its kind when the folder cannot tell (glm_runtime.tokenizer.resolve_tokenizer decides otherwise). gelu:
    'tanh' | 'erf' over the config's (DEFAULT_GELU when it does not say). dtype: the model's dtype; None keeps
    the files'. Every decision is in `.notes`. Errors raise CheckpointError (ManifestError for a glmx folder
    whose files do not match their manifest). The whole model is in memory: open_checkpoint reads lazily.
    """
    opened = open_checkpoint(
        path, config=config, tokenizer=tokenizer, tokenizer_kind=tokenizer_kind, gelu=gelu, lora=lora
    )
    source_dtype = DTYPES[opened.source_dtype]
    model = model_from_weights(opened.config, opened.weights, dtype or source_dtype)
    return LoadedCheckpoint(
        model,
        opened.config,
        opened.layout,
        opened.tokenizer_file,
        opened.manifest,
        source_dtype,
        opened.files,
        opened.ignored_keys,
        opened.notes,
        opened.tokenizer,
    )


def save_checkpoint(
    model: GLMModel,
    out_dir: str | Path,
    *,
    tokenizer_file: str | Path | GLMTokenizer | None = None,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write glmx's checkpoint folder: model.safetensors (official names), config.json (HF fields + a glmx block),
    the tokenizer if given (a GLMTokenizer, or a file whose kind its folder decides; checked against the model),
    manifest.json last. dtype: weights dtype on disk (None = the model's)."""
    precision = PRECISION.get(dtype or model.word_embeddings.weight.dtype)
    if precision is None:
        raise CheckpointError(
            f"cannot save weights of dtype {dtype or model.word_embeddings.weight.dtype}; use one of {sorted(DTYPES)}"
        )
    return write_checkpoint(
        model.config,
        Weights.from_arrays(model.state_dict()),
        out_dir,
        precision,
        tokenizer=tokenizer_file,
        extra=extra,
        overwrite=overwrite,
    )


NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def write_checkpoint(
    config: GLMConfig,
    weights: Weights,
    out_dir: str | Path,
    precision: str,
    *,
    tokenizer: str | Path | GLMTokenizer | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """glmx's checkpoint folder from official-name weights read one tensor at a time (memory: the largest
    tensor, whatever the model's size); model.safetensors holds them in `precision` (fp32 | fp16 | bf16)."""
    tok = tokenizer
    if tok is not None and not isinstance(tok, GLMTokenizer):
        try:
            tok, _ = resolve_tokenizer(tok, config=config)
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
    if tok is not None and tok.kind != config.tokenizer:
        config = config.replace(tokenizer=tok.kind)
    from glm_export.weights import write_safetensors

    dtype = NUMPY_DTYPES[precision]
    out_dir = Path(out_dir)
    with staged_folder(out_dir, overwrite=overwrite) as stage:
        write_safetensors(
            stage / WEIGHTS_FILE,
            [(k, weights.shape(k), dtype) for k in weights],
            lambda k: weights[k].astype(np.float32 if dtype == "bfloat16" else dtype, copy=False),
        )
        atomic_write_json(stage / CONFIG_FILE, to_hf_dict(config))
        tokenizer_record = tokenizer_entry(tok, stage) if tok is not None else {}
        write_manifest(
            stage,
            Manifest(
                kind="checkpoint",
                config=config.to_dict(),
                precision=precision,
                tokenizer=tokenizer_record,
                versions=tool_versions("torch", "safetensors"),
                extra=dict(extra or {}),
            ),
        )
    return out_dir


@claims_output(lambda a: [a["src"], a["config"], a["tokenizer"], a["lora"]])
def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    config: GLMConfig | str | Path | None = None,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_kind: str | None = None,
    gelu: str | None = None,
    rotary_inv_freq: str | None = None,
    lora: str | Path | None = None,
    overwrite: bool = False,
    tensor_parallel: int | None = None,
) -> tuple[OpenedCheckpoint, Path]:
    """Any supported layout -> glmx folder, one tensor at a time. dtype: 'fp32' | 'fp16' | 'bf16', or None to
    keep the source's. config / tokenizer / tokenizer_kind / gelu: as load_checkpoint; lora: an adapter folder
    merged on the way (glm_export.lora; its merged weights are float32 until `dtype` rounds them). What was
    decided goes into the manifest. tensor_parallel: write GLM-130B's SAT layout with this many ranks instead
    (glm_export.sat.write_sat; a GLM-130B model only; no manifest or tokenizer: the SAT folder has neither)."""
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    opened = open_checkpoint(
        src,
        config=config,
        tokenizer=tokenizer,
        tokenizer_kind=tokenizer_kind,
        gelu=gelu,
        rotary_inv_freq=rotary_inv_freq,
        lora=lora,
    )
    if tensor_parallel is not None:
        try:  # the architecture and the degree are checked before anything is staged
            notes = write_sat(
                opened.config,
                opened.weights,
                out_dir,
                tensor_parallel,
                dtype or opened.source_dtype,
                overwrite=overwrite,
            )
        except SatError as exc:
            raise CheckpointError(str(exc)) from None
        return replace(opened, notes=opened.notes + tuple(notes)), Path(out_dir)
    source = {"path": str(src), "layout": opened.layout, "dtype": opened.source_dtype}
    if opened.tokenizer_replaced:
        source["tokenizer_replaced"] = opened.tokenizer_replaced
    out = write_checkpoint(
        opened.config,
        opened.weights,
        out_dir,
        dtype or opened.source_dtype,
        tokenizer=opened.tokenizer,
        extra={"source": source, "notes": list(opened.notes), **({"lora": opened.lora} if opened.lora else {})},
        overwrite=overwrite,
    )
    return opened, out
