"""The torch reference behind the runtime's session contract (backend "torch"), on glm_export.model.GLMModel.
In: feeds named by the IO table (numpy), as the ONNX graph takes them; or a checkpoint / exported folder.
Out: logits and `present.*` holding only this call's keys/values ("present-is-new"), as numpy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_export.model import GLMModel
from glm_runtime.config import GLMConfig
from glm_runtime.iotable import LOGITS_START, io_table, kv_dtype, past_names, present_names, without_optional_inputs
from glm_runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest
from glm_runtime.prefix import Prefix, load_prefix
from glm_runtime.session import Closable, check_feeds
from glm_runtime.tokenizer_folder import load_recorded_tokenizer

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class TorchSession(Closable):
    """GLMModel behind the session contract (backend "torch"): numpy in, numpy out, CPU."""

    def __init__(
        self,
        model: GLMModel,
        config: GLMConfig | None = None,
        precision: str = "fp32",
        tokenizer_path: Path | None = None,
        logits_start: bool = True,
        prefix: Any = None,
    ):
        """logits_start=False: the session does not take the optional input and always returns the logits of
        every position, as GLM's own forward does (the benchmark's "torch eager as users run it").
        prefix: a P-tuning prefix (glm_runtime.prefix.Prefix), cast to the cache dtype: the forward phases feed it
        as past_key_values with always-visible mask columns (runtime/steps.py), as the official code does."""
        if precision not in TORCH_DTYPES:
            raise ValueError(f"precision must be one of {sorted(TORCH_DTYPES)}, got {precision!r}")
        self.config = config or model.config
        self.precision = precision
        table = io_table(self.config, precision)
        self.io = table if logits_start else without_optional_inputs(table)
        self.inputs, self.outputs = self.io["inputs"], self.io["outputs"]
        self.kv_dtype = np.dtype(kv_dtype(precision))
        self.device = None  # outputs are host numpy arrays
        self.tokenizer_path = tokenizer_path
        self.model = model.to(TORCH_DTYPES[precision]).eval()
        self.prefix = None if prefix is None else Prefix(prefix.kv.astype(self.kv_dtype))

    def new_cache(self, batch: int, capacity: int) -> Any:
        from glm_runtime.kvcache import host_cache

        return host_cache(self, batch, capacity)

    def close(self) -> None:
        self.model = None
        super().close()

    @torch.inference_mode()
    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self._check_open()
        check_feeds(feeds, self.inputs)
        t = {name: torch.as_tensor(np.asarray(value)) for name, value in feeds.items()}
        past = [(t[k], t[v]) for k, v in past_names(self.io)]
        past_len = past[0][0].shape[2]
        x, presents = self.model.hidden_states(
            t["input_ids"], t["position_ids"], t["attention_mask"], past_key_values=past if past_len else None
        )
        start = int(t[LOGITS_START].reshape(-1)[0]) if LOGITS_START in t else 0
        logits = self.model.lm_head(x[:, start:])  # python slicing == ONNX Slice: negative counts from the end
        out = {"logits": logits.float().numpy()}
        for (kn, vn), (k, v) in zip(present_names(self.io), presents):
            # the model returns past + new (concatenated); the contract is only this call's tokens
            out[kn] = np.ascontiguousarray(k[:, :, past_len:].numpy())
            out[vn] = np.ascontiguousarray(v[:, :, past_len:].numpy())
        return out


def _recorded_lora(manifest: Any) -> Path | None:
    """The LoRA adapter an export merged (its manifest's extra.lora), which the torch model must merge too."""
    record = manifest.extra.get("lora")
    if not record:
        return None
    path = Path(record["path"])
    if not path.is_dir():
        raise ManifestError(
            f"the LoRA adapter this export merged (recorded as {path}) is not there, so backend 'torch' cannot "
            f"rebuild the model; put it back or use --backend onnxruntime"
        )
    return path


def load_torch_session(
    folder: str | Path, precision: str | None = None, verify: bool = True, logits_start: bool = True, **_ignored: Any
) -> TorchSession:
    """A TorchSession from a checkpoint folder (any layout glm_export.checkpoint reads), or from an exported
    folder's parent checkpoint (its manifest's `parent.path`). precision: None = the artifact's own."""
    from glm_export.checkpoint import load_checkpoint

    folder = Path(folder)
    tokenizer_path = None
    source = folder
    manifest = load_manifest(folder, verify=verify) if (folder / MANIFEST_NAME).is_file() else None
    if manifest is not None and manifest.kind == "onnx":
        parent = manifest.parent.get("path")
        if not parent:
            raise ManifestError(
                f"{folder}/manifest.json records no parent checkpoint, so backend 'torch' cannot "
                f"find the weights; pass the checkpoint folder instead"
            )
        source = Path(parent) if Path(parent).is_absolute() else (folder / parent)
        if not source.exists():  # a copied or moved export: its parent was recorded relative to where it was made
            where = os.path.normpath(source if source.is_absolute() else Path.cwd() / source)
            raise ManifestError(
                f"the checkpoint this export was made from (recorded as {parent}) is not at {where}; pass the "
                f"checkpoint folder itself with --backend torch, or use --backend onnxruntime"
            )
        if manifest.tokenizer.get("file"):
            tokenizer_path = folder / manifest.tokenizer["file"]
    elif manifest is not None and manifest.kind != "checkpoint":
        raise ManifestError(f"backend 'torch' reads checkpoints or exported ONNX folders, not {manifest.kind!r}")
    exported = manifest is not None and manifest.kind == "onnx"
    # an exported folder's config (GeLU and tokenizer as decided at export) describes its parent's weights, its
    # tokenizer is the one its manifest records (kind and options: a ChatGLM revision's offset), and a LoRA
    # adapter it merged is merged again
    tokenizer = load_recorded_tokenizer(folder, manifest.tokenizer) if tokenizer_path is not None else None
    loaded = load_checkpoint(
        source,
        config=GLMConfig.from_dict(manifest.config) if exported else None,
        tokenizer=tokenizer,
        lora=_recorded_lora(manifest) if exported else None,
    )
    tokenizer_path = tokenizer_path or loaded.tokenizer_file
    if precision is None:
        precision = manifest.precision if manifest is not None and manifest.precision in TORCH_DTYPES else "fp32"
    # an exported folder's P-tuning prefix (hash-checked) goes with it: the checkpoint alone has none
    prefix = load_prefix(folder, manifest, loaded.config, np.float32) if exported else None
    session = TorchSession(
        loaded.model,
        loaded.config,
        precision=precision,
        tokenizer_path=tokenizer_path,
        logits_start=logits_start,
        prefix=prefix,
    )
    session.tokenizer = None if exported else loaded.tokenizer  # an exported folder's is read from its manifest
    if exported:
        session.tokenizer_record = manifest.tokenizer
    return session
