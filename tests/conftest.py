"""Shared fixtures: tiny deterministic models and temporary folders."""
from __future__ import annotations

import pytest


@pytest.fixture
def tiny_config():
    from glm_runtime.config import get_preset
    return get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    torch = pytest.importorskip("torch")
    from glm_export.model import GLMModel
    torch.manual_seed(0)
    return GLMModel(tiny_config).eval()
