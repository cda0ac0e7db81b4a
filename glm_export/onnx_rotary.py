"""Rotary positions as ONNX nodes (glm_export.onnx_graph's subgraphs for a rotary architecture): the cos / sin
tables computed once from position_ids, and the rotation of q and k. What differs is read from config.arch:
"rotary-2d" (ChatGLM-6B, chatglm_v1_spec.md 4.2: the first d/2 columns of a head rotate with the position, the
last d/2 with the block position) or "rotary-1d" (GLM-130B, spec 4.2 last bullet: the whole head rotates with
the position row alone; the block row of position_ids [B,2,T] is never read).

In: a GraphBuilder (glm_export.onnx_graph; typed Any here so this module does not import it), the config.
Out: tensor names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from glm_runtime.architecture import rotary_inv_freq
from glm_runtime.config import GLMConfig


# position_ids [B,2,T] -Cast fp32- Gather(0|1, axis 1) -> [B,T] - Unsqueeze - Mul(inv_freq [r/2]) -> [B,T,r/2]
#   - Concat(f, f) -> [B,T,r] per stream - Concat(streams) -> [B,T,d] - Unsqueeze(1) -> [B,1,T,d]
#   - Cos | Sin (fp32), computed once and shared by every layer. r = d/2 (2D: position, block) or d (1D: the
#   position row only); inv_freq fp16-rounded unless rotary_inv_freq fp32.
def rotary_tables(b: Any, cfg: GLMConfig) -> tuple[str, str]:
    two_d = cfg.arch.rotary_streams == 2
    inv = rotary_inv_freq(cfg.head_dim, cfg.arch.rotary_base, cfg.rotary_inv_freq, two_d=two_d)
    pos = b.cast("position_ids", TensorProto.FLOAT, "/rotary/positions")
    halves = []
    for row, tag in ((0, "position"), (1, "block"))[: cfg.arch.rotary_streams]:
        p = b.op("Gather", [pos, b.const("zero" if row == 0 else "one", row)], f"/rotary/{tag}_row", axis=1)
        p = b.op("Unsqueeze", [p, b.const("axes_last", [-1])], f"/rotary/{tag}/unsqueeze")
        f = b.op("Mul", [p, b.const("inv_freq", inv, np.float32)], f"/rotary/{tag}/freqs")
        halves.append(b.op("Concat", [f, f], f"/rotary/{tag}/halves", axis=-1))
    angles = b.op("Concat", halves, "/rotary/angles", axis=-1) if two_d else halves[0]
    angles = b.op("Unsqueeze", [angles, b.const("axes_heads", [1])], "/rotary/per_head")
    return b.op("Cos", [angles], "/rotary/cos"), b.op("Sin", [angles], "/rotary/sin")


# x [B,n,T,d] -Cast*- Split into 2 x streams parts -> turned = rotate_half per stream:
#   2D: quarters x0|x1|x2|x3 -> Concat(-x1, x0, -x3, x2);  1D: halves x0|x1 -> Concat(-x1, x0)
#   -> x*cos + turned*sin (fp32) -Cast*-> [B,n,T,d] (weight dtype: keys are cached after rotation, spec 4.3)
def apply_rotary(
    b: Any, x: str, rot: tuple[str, str], d: int, name: str, output: str | None = None, parts: int = 2
) -> str:
    xf = b.to_float(x, name)
    k = 2 * parts
    tag = "quarters" if k == 4 else "halves"
    if b.opset >= 18:
        pieces = b.op("Split", [xf], f"{name}/{tag}", n_out=k, axis=-1, num_outputs=k)
    else:
        pieces = b.op("Split", [xf, b.const(tag, [d // k] * k)], f"{name}/{tag}", n_out=k, axis=-1)
    turned_parts = []
    for s in range(parts):
        turned_parts += [b.op("Neg", [pieces[2 * s + 1]], f"{name}/neg{2 * s + 1}"), pieces[2 * s]]
    turned = b.op("Concat", turned_parts, f"{name}/turned", axis=-1)
    cos, sin = rot
    summed = [b.op("Mul", [xf, cos], f"{name}/x_cos"), b.op("Mul", [turned, sin], f"{name}/turned_sin")]
    if b.fp16:
        added = b.op("Add", summed, f"{name}/rotated")
        return b.op("Cast", [added], f"{name}/to_fp16", outputs=[output] if output else None, to=b.wtype)
    return b.op("Add", summed, f"{name}/rotated", outputs=[output] if output else None)
