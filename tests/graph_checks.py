"""What the architecture tests (ChatGLM-6B, GLM-130B, P-tuning) share when they hold an exported graph to an
independent oracle: glmx's parity budgets, one call of the graph with explicit positions and mask, and the bound
check that states the difference it measured."""

from __future__ import annotations

import numpy as np

FP32 = (1e-4, 3e-5)  # glmx's fp32 parity budget: atol + rtol * max|ref| (glm_export.compare.TOLERANCES)
FP16 = (3e-2, 5e-3)


def onnx_session(folder):
    from glm_runtime.session import OnnxRuntimeSession

    return OnnxRuntimeSession(folder)


def run_graph(session, ids, pos, visible, past=None):
    """One call of the graph: ids [B,T], positions [B,2,T], visible [B,1,T,past+T] (True = may attend)."""
    from glm_runtime.steps import empty_past

    feeds = {"input_ids": np.asarray(ids), "position_ids": np.asarray(pos), "attention_mask": np.asarray(visible)}
    feeds.update(past if past is not None else empty_past(session, len(ids)))
    return session.run(feeds)


def within(got, want, budget=FP32) -> float:
    """Assert max |got - want| <= atol + rtol * max|want|; -> the difference."""
    atol, rtol = budget
    diff = float(np.abs(np.asarray(got, np.float64) - want).max())
    bound = atol + rtol * float(np.abs(want).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > budget {bound:.3g}"
    return diff
