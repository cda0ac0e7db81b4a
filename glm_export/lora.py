"""LoRA adapters in PEFT's format, merged into a checkpoint's weights as each weight is read (chatglm_v1_spec.md 8).

In: an adapter folder (adapter_config.json + adapter_model.safetensors or .bin) and a checkpoint's weights before
glm_export.published reorders anything (a glmx folder's are in [Q;K;V] blocks already). Out: a Weights view in
which each targeted `<module>.weight` reads as W + scale * B @ A in float32, PEFT's delta in the published row
order as the base's (B's rows reordered for a base held in blocks), notes, and the record every manifest keeps.
A merged LoRA leaves the graph unchanged.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glm_export.published import BASE_PREFIXES, per_head_to_blocks
from glm_export.weights import Entry, Weights, WeightsError, read_safetensors
from glm_runtime.config import GLMConfig
from glm_runtime.manifest import sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order: safetensors first
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model
# `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r]; some savers keep the adapter name
# (`.lora_A.default.weight`).
KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
QKV_MODULE = "attention.query_key_value"
# base_model_name_or_path words that name each architecture's family (anything else is said, never refused)
FAMILY = {"chatglm-6b": re.compile(r"chatglm(?![0-9])", re.I), "glm": re.compile(r"(?<!chat)glm(?!-?4)", re.I)}
ROWS_PER_STEP = 4096  # the delta is added this many rows at a time: memory stays near one float32 copy of W


class LoraError(WeightsError):
    """A LoRA adapter cannot be merged: not a LoRA, a setting glmx does not merge, or tensors that do not fit."""


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter folder, checked: its settings and its lora_A / lora_B tensors (read when merged)."""

    folder: Path
    files: tuple[Path, Path]  # adapter_config.json, the weights file
    r: int
    alpha: float
    rslora: bool
    targets: Any  # target_modules: a list of module names, a regex string, or None
    base_model: str | None
    pairs: dict[str, tuple[str, str]]  # module (base names) -> (lora_A key, lora_B key)
    tensors: Weights
    notes: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _setting(folder: Path, cfg: dict[str, Any]) -> list[str]:
    """What the adapter's settings allow: refused in one line where glmx cannot merge it; notes otherwise."""
    where = folder / CONFIG_FILE
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LoraError(f"{where} says peft_type {cfg.get('peft_type')!r}: not a LoRA adapter (glmx merges LORA)")
    if cfg.get("use_dora"):
        raise LoraError(f"{where} says use_dora: a DoRA adapter is not supported, only plain LoRA is merged")
    if cfg.get("lora_bias"):
        raise LoraError(f"{where} says lora_bias: lora_B biases are not supported, only the weight delta is merged")
    if (cfg.get("bias") or "none") != "none":
        raise LoraError(
            f"{where} says bias {cfg['bias']!r}: an adapter that trained biases is not supported (glmx merges the "
            f"weight delta only); train it with bias='none'"
        )
    if cfg.get("modules_to_save"):
        raise LoraError(
            f"{where} lists modules_to_save {cfg['modules_to_save']}: whole replaced modules are not supported "
            f"(glmx merges lora_A / lora_B deltas only)"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoraError(f"{where} has a {key} {cfg[key]}: per-module ranks and alphas are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        raise LoraError(f"{where}: r must be a positive integer and lora_alpha a number, got r={r!r} {alpha=!r}")
    notes = []
    if cfg.get("fan_in_fan_out"):
        notes.append(
            "lora: fan_in_fan_out is true in the adapter's config; PEFT sets it false for torch.nn.Linear targets "
            "(ChatGLM's and GLM's linears), so the delta is B @ A [out, in], not transposed"
        )
    return notes


def _read_tensors(path: Path) -> Weights:
    """The adapter's tensors, read when merged (a .bin is a torch pickle: weights_only, memory-mapped)."""
    try:
        if path.suffix == ".safetensors":
            tensors = read_safetensors(path)
        else:
            import torch

            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
                raise LoraError(f"{path} is not a flat dict of tensors, as PEFT saves an adapter")
            tensors = Weights.from_arrays(sd, str(path))
    except WeightsError as exc:
        raise LoraError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises bare Exceptions on a malformed file
        raise LoraError(f"cannot read {path}: {type(exc).__name__}: {exc}; re-save the adapter") from None
    tensors.error = LoraError
    return tensors


def _pairs(tensors: Weights, path: Path) -> dict[str, tuple[str, str]]:
    """module (its name in the base weights) -> (lora_A key, lora_B key), every key accounted for."""
    parts: dict[str, dict[str, str]] = {}
    adapters = set()
    for key in tensors:
        m = KEY.match(key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key)
        if m is None:
            raise LoraError(f"{path} holds {key}, not a lora_A / lora_B weight: only plain LoRA linears are merged")
        adapters.add(m["adapter"])
        module = m["module"]
        module = next((module[len(p) :] for p in BASE_PREFIXES if module.startswith(p)), module)
        if m["part"] in parts.setdefault(module, {}):
            raise LoraError(f"{path} holds two lora_{m['part']} weights for {module}: {key} and another")
        parts[module][m["part"]] = key
    if len(adapters) > 1:
        raise LoraError(f"{path} holds the tensors of several adapters ({sorted(map(str, adapters))}); save one")
    if not parts:
        raise LoraError(f"{path} holds no lora_A / lora_B weights")
    for module, ab in parts.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part in ab and other not in ab:
                raise LoraError(
                    f"{path} holds lora_{part} of {module} without its lora_{other}: the file is incomplete"
                )
    return {module: (ab["A"], ab["B"]) for module, ab in parts.items()}


def read_adapter(folder: str | Path) -> LoraAdapter:
    """A PEFT LoRA folder, its settings checked and its tensors paired (nothing but the headers is read)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise LoraError(
            f"{folder} is not a PEFT adapter folder: it has no {CONFIG_FILE} (a LoRA adapter holds {CONFIG_FILE} "
            f"and {' or '.join(WEIGHT_FILES)})"
        )
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"cannot read {folder / CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{folder / CONFIG_FILE} is not a JSON object")
    notes = _setting(folder, cfg)
    weights_file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights_file is None:
        raise LoraError(f"{folder} has {CONFIG_FILE} but no {' or '.join(WEIGHT_FILES)}")
    tensors = _read_tensors(weights_file)
    return LoraAdapter(
        folder,
        (folder / CONFIG_FILE, weights_file),
        cfg["r"],
        float(cfg["lora_alpha"]),
        bool(cfg.get("use_rslora")),
        cfg.get("target_modules"),
        cfg.get("base_model_name_or_path") or None,
        _pairs(tensors, weights_file),
        tensors,
        tuple(notes),
    )


# ---------------------------------------------------------------- the adapter against the base weights


def _check_targets(adapter: LoraAdapter, weights: Weights, config: GLMConfig) -> None:
    """Every adapter module and every target_modules name (a list's; a regex string is PEFT's to match against
    names of its own, so its tensors' modules say it) names a weight of this checkpoint."""
    modules = [k[: -len(".weight")] for k in weights if k.endswith(".weight")]
    linears = sorted(
        {
            m.rsplit(".", 1)[-1]
            for m in modules
            if m.startswith("transformer.layers.") and len(weights.shape(m + ".weight")) == 2
        }
    )
    model = f"this {config.arch.title} checkpoint (L={config.num_layers}, h={config.hidden_size}; its linears: "
    model += f"{', '.join(linears)})"
    targets = [] if isinstance(adapter.targets, str) else list(adapter.targets or [])
    for target in targets:
        if not any(m == target or m.endswith(f".{target}") for m in modules):
            raise LoraError(
                f"{adapter.files[0]}: target module {target!r} matches no weight of {model}: the adapter was made "
                f"for another model"
            )
    for module in adapter.pairs:
        if f"{module}.weight" not in weights:
            raise LoraError(
                f"{adapter.files[1]} adapts {module}, which matches no weight of {model}: the adapter was made "
                f"for another model"
            )


def _check_shapes(adapter: LoraAdapter, weights: Weights, module: str) -> None:
    """lora_B [out, r] @ lora_A [r, in] must give the base weight's [out, in], in a float base."""
    a_key, b_key = adapter.pairs[module]
    a, b, w = adapter.tensors.shape(a_key), adapter.tensors.shape(b_key), weights.shape(f"{module}.weight")
    if weights.dtype_name(f"{module}.weight") not in ("float32", "float16", "bfloat16", "float64"):
        raise LoraError(
            f"{module}.weight is {weights.dtype_name(f'{module}.weight')} in the checkpoint: a LoRA delta merges "
            f"into float weights only; merge the adapter into the float model, then quantize"
        )
    fits = len(a) == 2 and len(b) == 2 and a[0] == b[1] and (b[0], a[1]) == tuple(w)
    if not fits:
        raise LoraError(
            f"{adapter.files[1]}: {b_key} {list(b)} @ {a_key} {list(a)} does not fit the checkpoint's "
            f"{module}.weight {list(w)}: the adapter was made for another model"
        )
    if a[0] != adapter.r:
        raise LoraError(f"{a_key} has rank {a[0]}, but {adapter.files[0]} says r {adapter.r}")


def _merged_read(weights: Weights, adapter: LoraAdapter, module: str, heads: int | None) -> Entry:
    """The entry whose read gives W + scale * B @ A (float32, or float64 for a float64 W); heads: reorder B's
    per-head rows into [Q;K;V] blocks first, for a base that glmx already holds in blocks."""
    a_key, b_key = adapter.pairs[module]
    base = weights.entry(f"{module}.weight")
    wide = np.float64 if base.dtype == np.float64 else np.float32

    def read() -> np.ndarray:
        w = np.array(weights[f"{module}.weight"], dtype=wide)  # a copy of its own
        a = adapter.tensors[a_key].astype(wide)  # [r, in]
        b = adapter.tensors[b_key].astype(wide)  # [out, r]
        if heads is not None:
            b = per_head_to_blocks(b, heads)
        scale = wide(adapter.scale)
        for start in range(0, w.shape[0], ROWS_PER_STEP):
            rows = slice(start, start + ROWS_PER_STEP)
            w[rows] += scale * (b[rows] @ a)
        return w

    return Entry(base.shape, wide, read, f"{base.where} + {adapter.files[1]}")


def _family_note(adapter: LoraAdapter, config: GLMConfig) -> list[str]:
    family = FAMILY.get(config.arch.name)
    if adapter.base_model is None or family is None or family.search(adapter.base_model):
        return []
    return [
        f"lora: the adapter's base_model_name_or_path {adapter.base_model!r} does not name a {config.arch.title} "
        f"model; merged anyway, as its tensors fit this checkpoint's shapes"
    ]


def merge_lora(
    weights: Weights, config: GLMConfig, adapter_dir: str | Path, notes: list[str], *, qkv_rows: str | None = None
) -> tuple[Weights, dict[str, Any]]:
    """-> (the weights with the adapter merged when each weight is read, the manifest's record of it).

    qkv_rows: the row order of `weights`' query_key_value ("blocks" | "per-head"; default the architecture's
    published order). PEFT's delta is in the published order: where the base is already in blocks (a glmx folder
    of ChatGLM-6B) B's rows are reordered as the base's were (per_head_to_blocks); otherwise it is merged as it is,
    before glm_export.published reorders the merged rows."""
    adapter = read_adapter(adapter_dir)
    _check_targets(adapter, weights, config)
    for module in adapter.pairs:
        _check_shapes(adapter, weights, module)
    reorder = config.arch.published_qkv == "per-head" and (qkv_rows or config.arch.published_qkv) == "blocks"
    heads = {m: config.num_attention_heads if reorder and m.endswith(QKV_MODULE) else None for m in adapter.pairs}
    entries = {f"{m}.weight": _merged_read(weights, adapter, m, heads[m]) for m in adapter.pairs}
    merged = Weights.merged([weights, Weights(entries)])
    merged.error = weights.error
    names = sorted({m.rsplit(".", 1)[-1] for m in adapter.pairs})
    how = f"alpha/sqrt(r) = {adapter.scale:g} (use_rslora)" if adapter.rslora else f"alpha/r = {adapter.scale:g}"
    notes.extend(adapter.notes)
    notes.append(
        f"lora: {adapter.folder} merged into {len(entries)} weights ({', '.join(names)}) as W + scale x B @ A in "
        f"float32, r {adapter.r}, lora_alpha {adapter.alpha:g}, scale {how}"
    )
    if reorder and any(m.endswith(QKV_MODULE) for m in adapter.pairs):
        notes.append("lora: query_key_value deltas reordered from the published per-head rows to [Q;K;V] blocks")
    notes.extend(_family_note(adapter, config))
    record = {
        "path": str(adapter.folder.resolve()),
        "files": {f.name: sha256_file(f) for f in adapter.files},
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.rslora,
        "scale": adapter.scale,
        "target_modules": adapter.targets,
        "merged": len(entries),
        "base_model_name_or_path": adapter.base_model,
    }
    return merged, record
