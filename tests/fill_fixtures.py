"""Builders shared by the blank-filling tests: a tiny tokenizer, a tiny GLM that sometimes ends spans with eop,
its ONNX export, and a scripted numpy session that emits planned tokens and records every feed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glm_runtime.config import get_preset
from glm_runtime.iotable import io_table
from glm_runtime.kvcache import host_cache
from glm_runtime.session import Closable

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "where there is smoke there is fire",
] * 4
# single [MASK], several blanks, [sMASK], [gMASK] at the end, a blank first, mixed kinds, different lengths
PROMPTS = [
    "the quick [MASK] fox jumps [sMASK] dog",
    "a stitch [gMASK]",
    "all [MASK] is [MASK] gold",
    "[MASK] over the lazy [MASK]",
    "where there is [MASK]",
    "[sMASK] saves nine [MASK] in time [gMASK]",
]


def tiny_config(vocab_size: int = 384):
    return get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0, vocab_size=vocab_size)


def make_tokenizer(path: Path):
    from glm_export.tokenizer_training import train_bpe_tokenizer

    return train_bpe_tokenizer(LINES, 300, path)


def make_model(tokenizer, seed: int = 0, eop_pull: float = 1.0, vocab_size: int = 384):
    """A seeded tiny GLM with spread-out weights (std 0.3, so greedy text varies) whose final LayerNorm bias
    leans toward eop, so some spans end with eop and others reach the budget."""
    import torch

    from glm_export.model import GLMModel

    torch.manual_seed(seed)
    model = GLMModel(tiny_config(vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        eop = model.word_embeddings.weight[tokenizer.special["eop"]]
        model.transformer.final_layernorm.bias.copy_(eop_pull * eop / eop.norm())
    return model


def export_tiny(model, out_dir: Path, tokenizer_file: Path) -> Path:
    from glm_export.export import export_onnx

    return export_onnx(model, out_dir, tokenizer_file=tokenizer_file, validate=False, log=lambda msg: None)


class ScriptedSession(Closable):
    """The session contract without a network: a decode call at (mask_pos, block) answers plan[mask_pos][block-1]
    (eop once the plan runs out); every feed is recorded. present.* are zeros."""

    def __init__(self, plan: dict[int, list[int]], eop: int, config=None):
        self.config = config or tiny_config()
        self.io = io_table(self.config)
        self.inputs, self.outputs = self.io["inputs"], self.io["outputs"]
        self.kv_dtype = np.dtype("float32")
        self.tokenizer_path = None
        self.plan, self.eop = plan, eop
        self.calls: list[dict[str, np.ndarray]] = []

    def new_cache(self, batch, capacity):
        return host_cache(self, batch, capacity)

    def run(self, feeds):
        from glm_runtime.session import check_feeds

        check_feeds(feeds, self.inputs)
        self.calls.append({k: np.array(v) for k, v in feeds.items() if not k.startswith("past_")})
        B, T = feeds["input_ids"].shape
        c = self.config
        logits = np.zeros((B, T, c.vocab_size), dtype=np.float32)
        for b in range(B):
            for t in range(T):
                m, block = feeds["position_ids"][b, :, t]
                if block > 0:
                    plan = self.plan.get(int(m), [])
                    logits[b, t, plan[block - 1] if block - 1 < len(plan) else self.eop] = 1.0
        out = {"logits": logits}
        for entry in self.outputs[1:]:
            out[entry["name"]] = np.zeros((B, c.num_attention_heads, T, c.head_dim), dtype=np.float32)
        return out
