"""Seeded GLMs with non-trivial weights for golden tests: LayerNorm and bias values moved off 1/0 (and, by
default, embeddings scaled up) so that a swapped, dropped or mis-shaped tensor shows in the outputs."""

from __future__ import annotations


def random_weights_model(config, seed: int = 0, scale_embeddings: bool = True):
    import torch

    from glm_export.model import GLMModel

    torch.manual_seed(seed)
    model = GLMModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif scale_embeddings and "embeddings" in name:
                p.mul_(10.0)
    return model
