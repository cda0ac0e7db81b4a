"""The artifacts a benchmark runs on: each model's fp32 export and its derived variants, built once into a cache.

In: a model name (bundled, glm-large-shape, tiny), a variant name (VARIANTS), a cache folder.
Out: (backend, folder) ready for open_session, or SkipVariant with the reason it cannot run here.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glm_runtime.errors import GLMXError
from glm_runtime.manifest import MANIFEST_NAME

MODELS = ("bundled", "glm-large-shape", "tiny")
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "glm_export" / "bundled" / "glmx-small"
TRAINING_TOKENIZER = Path(__file__).resolve().parents[1] / "runs" / "glmx-small" / "tokenizer.json"
DEFAULT_CACHE = Path("/tmp/glmx-bench-cache")
SEED = 0

# variant -> (backend, how the folder is made from the fp32 export); torch runs the fp32 export's parent.
VARIANTS: dict[str, tuple[str, str]] = {
    "torch-fp32": ("torch", "fp32"),
    "ort-fp32": ("onnxruntime", "fp32"),
    "ort-optimized": ("onnxruntime", "optimized"),
    "ort-fp16": ("onnxruntime", "fp16"),
    "ort-int8": ("onnxruntime", "int8-dynamic"),
    "ort-int8-head": ("onnxruntime", "int8-dynamic+head"),  # the tied head quantized too (faster, less exact)
    "ort-fused-int8-head": ("onnxruntime", "optimized/int8-dynamic+head"),  # the same, of the optimized graph
    "ort-qdq-int8": ("onnxruntime", "qdq-int8"),
    "ort-int4": ("onnxruntime", "int4-weight"),
    "ort-int8-weight": ("onnxruntime", "int8-weight"),
    "tensorrt-fp16": ("tensorrt", "engine"),
}
REFERENCE = "torch-fp32"


class SkipVariant(GLMXError, RuntimeError):
    """This variant cannot be measured here; the message says why (recorded in the results)."""


def is_export_folder(name: str) -> bool:
    """A model named by the path of an exported ONNX folder rather than one of MODELS."""
    return name not in MODELS and (Path(name) / MANIFEST_NAME).is_file()


def model_config(name: str) -> Any:
    from glm_runtime.config import get_preset

    if name == "glm-large-shape":  # GLM-Large's shape with the 50k GPT-2/RoBERTa vocabulary (docs/glm.md 6)
        return get_preset("glm-roberta-large").replace(
            name="glm-large-shape", hidden_dropout=0.0, attention_dropout=0.0
        )
    if name == "tiny":  # V = the bundled tokenizer's 8000 ids padded to 128, so its tokenizer belongs to it
        return get_preset("glm-tiny").replace(
            hidden_dropout=0.0, attention_dropout=0.0, vocab_size=8064, name="glm-tiny-8k"
        )
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def load_config(folder: Path) -> Any:
    from glm_runtime.config import GLMConfig
    from glm_runtime.manifest import load_manifest

    return GLMConfig.from_dict(load_manifest(folder, verify=False).config)


def _tokenizer_file() -> Path | None:
    """A glmx tokenizer for random-weight models (the accuracy reports of derived variants tokenize text)."""
    for path in (BUNDLED_CHECKPOINT / "tokenizer.json", TRAINING_TOKENIZER):
        if path.is_file():
            return path
    return None


def _ready(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def prepare_model(name: str, cache: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The fp32 ONNX export of model `name` (with its checkpoint as parent), built once into `cache`."""
    import torch

    from glm_export.export import export_onnx

    if is_export_folder(name):  # a user's own fp32 export, e.g. of a downloaded checkpoint
        from glm_runtime.manifest import load_manifest

        fp32 = Path(name).resolve()  # workers run in another folder
        manifest = load_manifest(fp32, kind="onnx")
        if manifest.precision != "fp32":
            raise SkipVariant(
                f"{fp32} is a {manifest.precision} artifact; benchmark the fp32 export (the variants "
                f"are derived from it)"
            )
        key = hashlib.sha256((fp32 / MANIFEST_NAME).read_bytes()).hexdigest()[:12]
        parent = manifest.parent.get("path")
        checkpoint = (fp32 / parent).resolve() if parent and not Path(parent).is_absolute() else parent
        return {
            "name": fp32.name,
            "root": cache / f"export-{key}",
            "checkpoint": checkpoint and Path(checkpoint),
            "fp32": fp32,
            "random_weights": False,
        }
    if name == "bundled":
        if not _ready(BUNDLED_CHECKPOINT):
            raise SkipVariant(
                f"the bundled checkpoint {BUNDLED_CHECKPOINT} is not present (train it first: "
                f"glmx pretrain ... --checkpoint-dir {BUNDLED_CHECKPOINT})"
            )
        key = hashlib.sha256((BUNDLED_CHECKPOINT / MANIFEST_NAME).read_bytes()).hexdigest()[:12]
        root = cache / f"bundled-{key}"
        checkpoint = BUNDLED_CHECKPOINT
        random_weights = False
    else:
        config = model_config(name)
        root = cache / f"{name}-v{config.vocab_size}"  # a cache made for another vocabulary is not reused
        checkpoint = root / "checkpoint"
        random_weights = True
        if not _ready(checkpoint):
            from glm_export.checkpoint import save_checkpoint
            from glm_export.model import GLMModel

            log(
                f"{name}: building a random-weight checkpoint (L={config.num_layers}, h={config.hidden_size}, "
                f"V={config.vocab_size}); speed does not depend on weight values"
            )
            torch.manual_seed(SEED)
            save_checkpoint(GLMModel(config).eval(), checkpoint, tokenizer_file=_tokenizer_file(), overwrite=True)
    fp32 = root / "onnx-fp32"
    if not _ready(fp32):
        log(f"{name}: exporting fp32 ONNX to {fp32}")
        # parity on a big random model costs minutes and says nothing new: the exporter's tests cover it
        export_onnx(
            checkpoint, fp32, precision="fp32", validate=not random_weights or name == "tiny", overwrite=True, log=log
        )
    return {"name": name, "root": root, "checkpoint": checkpoint, "fp32": fp32, "random_weights": random_weights}


def prepare_variant(model: dict[str, Any], variant: str, log: Callable[[str], None]) -> tuple[str, Path]:
    """(backend, folder) of `variant` for a prepared model; builds derived folders once; raises SkipVariant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    backend, how = VARIANTS[variant]
    fp32 = model["fp32"]
    if how == "fp32":
        return backend, fp32
    if how == "engine":
        if importlib.util.find_spec("tensorrt") is None:
            raise SkipVariant(
                "TensorRT is not installed here (its PyPI packages fetch NVIDIA's libraries at "
                "install time, which this machine cannot reach); build an engine with "
                "`glmx build-engine` on a GPU machine and benchmark there"
            )
        raise SkipVariant(
            "TensorRT is installed but engine benchmarking needs a GPU build of this model: "
            "run `glmx build-engine` first (not automated by the benchmark)"
        )
    parent = fp32
    if "/" in how:  # "<parent variant's how>/<scheme>": quantize a derived folder, not the fp32 export
        parent_how, how = how.split("/", 1)
        parent = prepare_variant(model, next(v for v, (_, h) in VARIANTS.items() if h == parent_how), log)[1]
    folder = model["root"] / f"onnx-{'' if parent == fp32 else parent.name[5:] + '-'}{how.replace('+', '-')}"
    scheme, _, extra = how.partition("+")
    keep = None if how == "optimized" else keep_fp32(scheme, head=extra == "head")
    if _ready(folder) and (keep is None or _recorded_recipe(folder) == current_recipe(scheme, keep)):
        return backend, folder
    from glm_runtime.manifest import load_manifest

    if not load_manifest(fp32, verify=False).tokenizer.get("file"):
        raise SkipVariant(
            f"{variant} measures its accuracy on held-out text, and {fp32} carries no tokenizer "
            f"(the bundled checkpoint's tokenizer is used when present)"
        )
    log(f"{model['name']}: making {variant} in {folder}")
    try:
        if how == "optimized":
            from glm_export.optimize import optimize_onnx

            optimize_onnx(fp32, folder, overwrite=True)  # the default level: glmx's fusions
        else:
            from glm_export.quantize import quantize_onnx

            # random weights miss any budget by construction; the loss is recorded in the manifest, not refused
            quantize_onnx(parent, folder, scheme=scheme, keep_fp32=keep, accept_loss=True, overwrite=True)
    except ImportError as exc:
        raise SkipVariant(f"{variant}: its stage module is not importable here ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a stage still being finished: skip this variant, keep the run
        raise SkipVariant(f"{variant}: building it failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return backend, folder


def keep_fp32(scheme: str, head: bool = False) -> tuple[str, ...]:
    """What a variant leaves fp32: the scheme's `glmx quantize` default (the recipe whose accuracy the bundled
    model's manifest states), less the tied head for the "+head" variants."""
    from glm_export.quantize import default_keep_fp32

    return tuple(k for k in default_keep_fp32(scheme) if not (head and k == "head"))


RECIPE_KEYS = ("keep_fp32", "block_size", "mlp_block_size", "head")


def current_recipe(scheme: str, keep: tuple[str, ...]) -> dict[str, Any]:
    """What `glmx quantize --scheme scheme` records today with keep_fp32 = keep and every other default
    (glm_export.quantize.nbits_recipe, the rules quantize itself resolves), in RECIPE_KEYS."""
    from glm_export import quantize as q

    if scheme not in q.NBITS:
        return {"keep_fp32": list(keep)}
    recipe = q.nbits_recipe(scheme, keep)
    return {k: list(recipe[k]) if k == "keep_fp32" else recipe[k] for k in RECIPE_KEYS}


def _recorded_recipe(folder: Path) -> dict[str, Any]:
    """The recipe a cached quantized folder was made with, in current_recipe's keys (a folder from an older
    recipe differs and is rebuilt)."""
    from glm_export.quantize import NBITS
    from glm_runtime.manifest import load_manifest

    recorded = load_manifest(folder, verify=False).extra.get("quantization") or {}
    want = RECIPE_KEYS if recorded.get("scheme") in NBITS else RECIPE_KEYS[:1]
    return {k: recorded.get(k) for k in want}


def accuracy_figures(folder: Path) -> dict[str, Any]:
    """Accuracy figures copied from an artifact's manifest (parity vs torch, accuracy vs fp32 parent)."""
    from glm_runtime.manifest import load_manifest

    manifest = load_manifest(folder, verify=False)
    parity = manifest.parity or {}
    out: dict[str, Any] = {"precision": manifest.precision}
    acc = parity.get("text") or parity.get("accuracy")  # "accuracy": manifests written before glm_export.compare
    if acc:
        out.update(
            {
                k: acc.get(k)
                for k in ("top1_agreement", "fill_agreement", "ppl_change", "max_logit_diff", "within_budget")
            }
        )
    elif parity.get("skipped"):
        out["parity"] = "skipped at export (random weights)"
    elif parity:  # the exporter's parity report against the torch reference
        out["parity_passed"] = parity.get("passed")
        out["max_logit_diff"] = (parity.get("max_abs_diff") or {}).get("logits")
        out["top1_agreement"] = parity.get("top1_agreement")
    return out


def disk_bytes(folder: Path) -> int:
    """Bytes of the model files (graph + external data), not the tokenizer or manifest."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model"))
