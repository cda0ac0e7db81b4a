"""GLM-130B's SAT checkpoints: the released tensor-parallel shards read merged, one tensor at a time, and written.

In: a SAT folder (`latest` holding the iteration, `<iter>/mp_rank_{00..N-1}_model_states.pt`, each {"module":
state_dict}) and the model arguments it was run with (configs/model_glm_130b.sh's MODEL_ARGS, or a JSON of the same
names). Out: `Weights` under the published names with each tensor merged across the ranks when it is read, the
GLMConfig the arguments describe; and `write_sat`, the inverse (chatglm_v1_spec.md 1 and 2, tools/convert_tp.py).
Merge rules: LayerNorms, the row-parallel biases and inv_freq are replicated; attention.dense and
mlp.dense_4h_to_h weights are split along dim 1; mlp.dense_h_to_4h (GeGLU) holds on each rank [its value slice; its
gate slice]; everything else (embedding rows, per-head QKV rows, whole heads per rank) is split along dim 0.
"""

from __future__ import annotations

import json
import re
import shlex
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_export.published import blocks_to_per_head, published_name
from glm_export.weights import Entry, Weights, WeightsError, dtype_of
from glm_runtime.architecture import rotary_inv_freq
from glm_runtime.config import LAYERNORM_EPS, PRESETS, GLMConfig
from glm_runtime.manifest import staged_folder

TRACKER = "latest"  # SAT's tracker file: the iteration's folder name
RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
REPLICATED = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "final_layernorm.weight",
    "final_layernorm.bias",
    "attention.dense.bias",
    "mlp.dense_4h_to_h.bias",
    "attention.rotary_emb.inv_freq",
)
COLUMNS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")  # row-parallel linears: split along dim 1
GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")  # each rank: [value slice; gate slice]
# The model arguments glmx reads (SAT's names, dashes or underscores); the others (--load, --skip-init, ...) only
# say how the model was run.
REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
SAT_ONLY_ARGS = ("inner_hidden_size", "model_parallel_size", "tokenizer_type", "layernorm_order")


class SatError(WeightsError):
    """A SAT checkpoint or its model arguments cannot be read, or do not fit each other."""


def rule(key: str) -> str:
    """How a SAT key is split across tensor-parallel ranks: 'replicated', 'columns', 'glu' or 'rows'."""
    name = re.sub(r"^transformer\.(layers\.\d+\.)?", "", key)
    if name in REPLICATED:
        return "replicated"
    if name in COLUMNS:
        return "columns"
    return "glu" if name in GLU else "rows"


# ---------------------------------------------------------------- the model arguments (.sh or .json)


def is_model_args(path: Path) -> bool:
    """A SAT model-arguments file: a shell file, or a JSON object with SAT's argument names (not a config.json)."""
    if path.suffix != ".json":
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or "model_type" in data or "gelu" in data:
        return False
    keys = {_arg_name(k) for k in data}
    return any("-" in k for k in data) or any(k in keys for k in SAT_ONLY_ARGS)


def _arg_name(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def _expand(text: str, variables: Mapping[str, str]) -> str:
    """${NAME} and $NAME from the file's earlier assignments (an unknown one is empty, as in bash)."""
    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def _shell_tokens(path: Path, text: str) -> list[str]:
    """The words of the assignment that holds --num-layers (MODEL_ARGS="..."), variables expanded; a file that
    assigns none is read as one command line."""
    text = text.replace("\\\n", " ")  # a backslash-newline continues the line (inside "..." too)
    variables: dict[str, str] = {}
    chosen = None
    for line in text.splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(.*)$", line)
        if not m:
            continue
        try:
            words = shlex.split(_expand(m.group(2), variables), comments=True)
        except ValueError as exc:
            raise SatError(f"cannot read {path}: {m.group(1)}= is not a shell word ({exc})") from None
        variables[m.group(1)] = " ".join(words)
        if "--num-layers" in variables[m.group(1)].split():
            chosen = m.group(1)
    try:
        return shlex.split(variables[chosen] if chosen else _expand(text, variables), comments=True)
    except ValueError as exc:
        raise SatError(f"cannot read {path}: {exc}") from None


def read_model_args(path: str | Path) -> dict[str, Any]:
    """SAT's model arguments as {name_with_underscores: value}: from a shell file (configs/model_glm_130b.sh, its
    MODEL_ARGS="--num-layers 70 ..." assignment) or a JSON object ("num-layers" or "num_layers")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SatError(f"cannot read {path}: {exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SatError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise SatError(f"{path} is not a JSON object of SAT model arguments")
        return {_arg_name(k): v for k, v in data.items()}
    args: dict[str, Any] = {}
    words = _shell_tokens(path, text)
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            args[_arg_name(word)] = value
    return args


def _int_arg(args: Mapping[str, Any], name: str, source: Path) -> int:
    value = args[name]
    try:
        number = int(value)
        if isinstance(value, (bool, float)) or number <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise SatError(f"{source}: --{name.replace('_', '-')} must be a positive integer, got {value!r}") from None
    return number


def config_from_args(args: Mapping[str, Any], source: Path, notes: list[str]) -> tuple[GLMConfig, int | None]:
    """The GLMConfig of GLM-130B's architecture that SAT model arguments describe, and their
    --model-parallel-size (None if absent); every value not given is said as an assumption."""
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED_ARGS if n not in args]
    if missing:
        raise SatError(f"{source} lacks the model arguments {', '.join(missing)} (read: {sorted(args)[:8]})")
    if args.get("quantization_bit_width") not in (None, False):
        raise SatError(
            f"{source} sets --quantization-bit-width {args['quantization_bit_width']}: glmx reads the fp16 SAT "
            f"release only; quantize after export (glmx quantize)"
        )
    if args.get("position_encoding_2d") not in (None, False):
        raise SatError(f"{source} sets --position-encoding-2d: glmx's GLM-130B is the released 1D-rotary model")
    order = args.get("layernorm_order", "post")
    if order != "post":
        raise SatError(f"{source} says --layernorm-order {order}: GLM-130B's DeepNorm is 'post', glmx runs only that")
    eps = float(args.get("layernorm_epsilon", LAYERNORM_EPS))
    if eps != LAYERNORM_EPS:
        raise SatError(f"{source} says --layernorm-epsilon {eps}; glmx runs the released {LAYERNORM_EPS}")
    sizes = {n: _int_arg(args, n, source) for n in REQUIRED_ARGS}
    assumed = []
    if "max_sequence_length" in args:
        sizes["max_sequence_length"] = _int_arg(args, "max_sequence_length", source)
    else:
        sizes["max_sequence_length"] = 512
        assumed.append("max-sequence-length 512 (SAT's default)")
    inner = _int_arg(args, "inner_hidden_size", source) if "inner_hidden_size" in args else None
    if inner is None:
        assumed.append(f"inner-hidden-size 4 x hidden = {4 * sizes['hidden_size']} (SAT's default)")
    if "layernorm_order" not in args:
        assumed.append("layernorm-order post (GLM-130B's DeepNorm)")
    if args.get("tokenizer_type", "icetk-glm-130B") != "icetk-glm-130B":
        assumed.append(f"tokenizer icetk, though --tokenizer-type says {args['tokenizer_type']}")
    released = PRESETS["glm-130b"]
    cfg = released.replace(**sizes, inner_hidden_size=inner)
    if cfg != released:
        cfg = cfg.replace(name="glm-130b-custom")
    notes.append(
        f"config: SAT model arguments in {source}: L={cfg.num_layers} h={cfg.hidden_size} "
        f"n={cfg.num_attention_heads} inner={cfg.inner_size} V={cfg.vocab_size} P={cfg.max_sequence_length}; "
        f"architecture GLM-130B (the arguments name no model class: ASSUMED, as generate.py runs them)"
        + (f"; ASSUMED {', '.join(assumed)}" if assumed else "")
    )
    tp = _int_arg(args, "model_parallel_size", source) if "model_parallel_size" in args else None
    return cfg, tp


def check_degree(config: GLMConfig, tp: int, where: str) -> None:
    """tp ranks hold whole heads, equal slices of the inner width and of the vocabulary: refused otherwise."""
    parts = {"attention heads": config.num_attention_heads, "inner width": config.inner_size}
    parts["vocabulary rows"] = config.vocab_size
    wrong = [f"{n} {v}" for n, v in parts.items() if v % tp]
    if tp < 1 or wrong:
        raise SatError(
            f"{where}: tensor-parallel degree {tp} does not divide the model's {', '.join(wrong) or 'ranks'}; "
            f"pick a divisor of {config.num_attention_heads} heads that also divides {config.inner_size} and "
            f"{config.vocab_size}"
        )


# ---------------------------------------------------------------- reading: rank files, merged lazily


def rank_files(path: Path, expected: int | None = None) -> tuple[list[Path], list[str]]:
    """The iteration folder's mp_rank files in rank order (via `latest` if there is one); a missing or extra rank
    (against each other, and against --model-parallel-size when given) names the file."""
    notes = []
    folder = path
    tracker = path / TRACKER
    if tracker.is_file():
        tag = tracker.read_text(encoding="utf-8").strip()
        folder = path / tag
        if not tag or not folder.is_dir():
            raise SatError(f"{tracker} names iteration {tag!r}, but {folder} is not a folder")
        notes.append(f"{TRACKER} -> iteration {tag}")
    ranks = {int(m.group(1)): p for p in folder.iterdir() if (m := RANK_FILE.match(p.name))}
    if not ranks:
        raise SatError(f"{folder} holds no mp_rank_XX_model_states.pt files")
    count = expected if expected is not None else max(ranks) + 1
    for r in range(max(count, max(ranks) + 1)):
        name = folder / f"mp_rank_{r:02d}_model_states.pt"
        if r not in ranks:
            raise SatError(f"{name} is missing: found ranks {sorted(ranks)}, the model has {count}")
        if r >= count:
            raise SatError(f"{name} is extra: --model-parallel-size says {count} ranks")
    return [ranks[r] for r in range(count)], notes


def load_rank(path: Path) -> dict[str, torch.Tensor]:
    """One rank's state dict, memory-mapped (torch.load mmap=True, weights_only=True: tensors only, no code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - torch.load raises bare Exceptions on a malformed or unsafe file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SatError(f"cannot read {path}: {type(exc).__name__}: {first}; re-download or re-save it") from None
    sd = obj.get("module") if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise SatError(f"{path} is not a SAT model-states file: expected {{'module': a flat state dict of tensors}}")
    return dict(sd)


def looks_like_sat(path: Path) -> bool:
    """A folder whose rank 0 names its embedding transformer.word_embeddings.weight (SAT; GLM's Megatron layout
    names it word_embeddings.weight). Only zip-format files are peeked (memory-mapped, nothing read)."""
    if not path.is_dir():
        return False
    tracker = path / TRACKER
    tag = tracker.read_text(encoding="utf-8", errors="replace").strip() if tracker.is_file() else ""
    first = (path / tag if tag else path) / "mp_rank_00_model_states.pt"
    if not first.is_file() or not zipfile.is_zipfile(first):
        return False
    try:
        sd = torch.load(first, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not readable here: the Megatron reader names the problem
        return False
    return isinstance(sd, Mapping) and "transformer.word_embeddings.weight" in (sd.get("module") or {})


def _merged_shape(key: str, shapes: Sequence[tuple[int, ...]], files: Sequence[Path]) -> tuple[int, ...]:
    how = rule(key)
    dim = 1 if how == "columns" else 0
    for f, shape in zip(files[1:], shapes[1:]):
        if shape != shapes[0]:
            raise SatError(f"{f}: {key} is {list(shape)}, rank 0 has {list(shapes[0])}: the ranks do not fit")
    if how == "replicated" or len(shapes[0]) <= dim:
        return shapes[0]
    if how == "glu" and shapes[0][0] % 2:
        raise SatError(f"{files[0]}: {key} has {shapes[0][0]} rows; a GeGLU slice holds [value; gate], an even count")
    merged = list(shapes[0])
    merged[dim] *= len(shapes)
    return tuple(merged)


def _array(t: torch.Tensor) -> np.ndarray:
    """A rank's tensor as numpy without a copy where possible (bf16 is widened to float32)."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def merge(key: str, parts: Sequence[torch.Tensor], files: Sequence[Path]) -> np.ndarray:
    """One key of the tp ranks (rank order) as the whole tensor, in SAT's (published) row order."""
    how = rule(key)
    arrays = [_array(p) for p in parts]
    if how == "replicated":
        for f, a in zip(files[1:], arrays[1:]):
            if not np.array_equal(a, arrays[0]):
                raise SatError(f"{f}: {key} should equal rank 0's (it is replicated) but differs")
        return arrays[0].copy()
    if how == "glu":  # [v_0; g_0], [v_1; g_1] ... -> [v_0; v_1 ...; g_0; g_1 ...]
        halves = [np.split(a, 2, axis=0) for a in arrays]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    return np.concatenate(arrays, axis=1 if how == "columns" and arrays[0].ndim > 1 else 0)


def read_sat(files: Sequence[Path]) -> Weights:
    """The ranks' state dicts as one Weights under SAT's names, each tensor merged when it is read (the files stay
    memory-mapped; memory: the merged tensor). Key sets and shapes are checked now, naming the file."""
    shards = [load_rank(f) for f in files]
    keys = list(shards[0])
    quantized = [k for k in keys if k.endswith("weight_scale")]
    if quantized:
        raise SatError(f"{files[0]} holds quantized weights ({quantized[0]} ...): glmx reads the fp16 SAT release only")
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise SatError(f"{f} has other keys than {files[0]}: {diff[:4]}; the ranks come from different models")
    where = f"{files[0].parent} ({len(files)} ranks)"
    entries = {}
    for key in keys:
        parts = [s[key] for s in shards]
        shape = _merged_shape(key, [tuple(p.shape) for p in parts], files)
        entries[key] = Entry(shape, dtype_of(parts[0]), (lambda k=key, p=parts: merge(k, p, files)), where)
    return Weights(entries, files)


# ---------------------------------------------------------------- writing: the inverse


def sat_rank(name: str, value: np.ndarray, config: GLMConfig, tp: int, r: int) -> np.ndarray:
    """Rank r's slice of glmx's tensor `name` ([Q;K;V] blocks) as SAT holds it."""
    if name.endswith("attention.query_key_value.weight") or name.endswith("attention.query_key_value.bias"):
        value = blocks_to_per_head(value, config.num_attention_heads)  # whole heads: rank r holds heads r*n/tp..
    how = rule(published_name(name, config))
    if how == "replicated":
        return value
    if how == "glu":
        value_half, gate = np.split(value, 2, axis=0)
        return np.concatenate([np.split(value_half, tp, axis=0)[r], np.split(gate, tp, axis=0)[r]], axis=0)
    return np.split(value, tp, axis=1 if how == "columns" else 0)[r]


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_sat(
    config: GLMConfig,
    weights: Weights,
    out_dir: str | Path,
    tp: int,
    precision: str,
    *,
    iteration: str = "1",
    overwrite: bool = False,
) -> list[str]:
    """GLM-130B's SAT folder from glmx's weights: `latest` (the iteration), `<iteration>/mp_rank_XX_model_states.pt`
    for XX < tp, each {"module": its slices}, with each layer's rotary_emb.inv_freq (SAT's fp16 buffer; readers
    recompute it). One rank at a time: memory is one rank's share, each source tensor read tp times. Atomic: a
    staged folder renamed at the end. -> notes."""
    if config.architecture != "glm-130b":
        raise SatError(f"the SAT layout written here is GLM-130B's; the source is a {config.arch.title} model")
    check_degree(config, tp, f"--tensor-parallel {tp}")
    dtype = TORCH_DTYPES[precision]
    freq = torch.from_numpy(rotary_inv_freq(config.head_dim, config.arch.rotary_base, "fp16", two_d=False)).half()
    with staged_folder(Path(out_dir), overwrite=overwrite) as stage:
        (stage / TRACKER).write_text(iteration, encoding="utf-8")
        (stage / iteration).mkdir()
        for r in range(tp):
            module: dict[str, torch.Tensor] = {}
            for name in weights:
                part = np.ascontiguousarray(sat_rank(name, weights[name], config, tp, r))
                module[published_name(name, config)] = torch.from_numpy(part).to(dtype)
                if name.endswith("attention.dense.weight"):
                    module[name.replace("dense.weight", "rotary_emb.inv_freq")] = freq.clone()
            torch.save({"module": module}, stage / iteration / f"mp_rank_{r:02d}_model_states.pt")
    return [
        f"wrote GLM-130B's SAT layout: {tp} tensor-parallel rank(s) of {precision} weights in {out_dir}/{iteration}; "
        f"read it back with --config (MODEL_ARGS with --model-parallel-size {tp}) or --preset"
    ]


def model_args(config: GLMConfig, tp: int) -> str:
    """configs/model_glm_130b.sh's MODEL_ARGS line for a config (what `glmx convert --tensor-parallel` suggests)."""
    inner = f" --inner-hidden-size {config.inner_size}"
    return (
        f'MODEL_ARGS="--model-parallel-size {tp} --num-layers {config.num_layers} --hidden-size {config.hidden_size}'
        f"{inner} --vocab-size {config.vocab_size} --num-attention-heads {config.num_attention_heads} "
        f'--max-sequence-length {config.max_sequence_length} --tokenizer-type icetk-glm-130B --layernorm-order post"'
    )
