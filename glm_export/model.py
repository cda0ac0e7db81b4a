"""The reference GLM in PyTorch, faithful to the released checkpoints of each architecture: the 2021 GLM (Du et
al., THUDM/GLM), ChatGLM-6B v1 (the HF remote code) and GLM-130B (SAT's glm130B_model.py), what differs read from
config.arch (glm_runtime.architecture), never from the model's name.

In: input_ids [B, T], position_ids [B, 2, T] (position, block position), an attention mask in one of the
original's forms, and optionally a per-layer (key, value) cache of `past` earlier tokens (rotary: keys cached
after rotation; GLM-130B's 1D rotary reads row 0 of the positions only).
Out: logits [B, T, V] (tied to the word embeddings, no bias) and the updated cache.
GLM's facts are from docs/glm.md, ChatGLM-6B's and GLM-130B's from ../shared/chatglm_v1_spec.md (cited "spec").
Parameter names are the official GLM ones (docs/glm.md 1.1) for every architecture, the fused QKV as [Q;K;V]
blocks: glm_export.checkpoint maps a published ChatGLM folder onto them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_runtime.architecture import rotary_inv_freq
from glm_runtime.config import GLMConfig

# Masked scores are pushed down by the fp16 minimum, not -inf (docs/glm.md 1.3, 9.5).
MASK_FILL = 65504.0

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: key, value [B, n, past, d]
MaskArg = int | torch.Tensor


def build_attention_mask(
    attention_mask: MaskArg, batch: int, query_len: int, past_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """Turn any of the original's mask forms into an explicit 0/1 float mask [B|1, 1, T, past+T].

    Forms (docs/glm.md 3.1): a Python int or one-element tensor = scalar sep; a [B] tensor = per-sample sep;
    anything else = explicit mask whose last past+T columns are used. With sep, query i (of the T new
    tokens) sees key j iff j < sep or j <= i; all past columns are visible (docs/glm.md 3.1, memory).
    """
    total = past_len + query_len
    if isinstance(attention_mask, int) or (
        torch.is_tensor(attention_mask)
        and attention_mask.numel() == 1
        and not (batch == 1 and attention_mask.dim() == 4)
    ):
        sep = torch.as_tensor(attention_mask, device=device).reshape(1)
    elif torch.is_tensor(attention_mask) and attention_mask.dim() == 1:
        if attention_mask.numel() != batch:
            raise ValueError(f"a per-sample sep vector must have {batch} entries, got {attention_mask.numel()}")
        sep = attention_mask
    else:
        mask = torch.as_tensor(attention_mask, device=device)
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != query_len or mask.shape[3] < total:
            raise ValueError(
                f"explicit attention_mask must be [B, 1, {query_len}, >= {total}] (past {past_len} + "
                f"seq {query_len}), got {list(mask.shape)}"
            )
        return mask[..., -total:].to(torch.float32)
    i = torch.arange(query_len, device=sep.device).view(1, query_len, 1)  # query index
    j = torch.arange(query_len, device=sep.device).view(1, 1, query_len)  # key index among new tokens
    sep = sep.view(-1, 1, 1)
    current = ((j < sep) | (j <= i)).to(torch.float32)  # [B|1, T, T]
    memory = torch.ones(current.shape[0], query_len, past_len, device=sep.device)
    return torch.cat([memory, current], dim=-1).unsqueeze(1)  # [B|1, 1, T, past+T]


def rotary_tables(config: GLMConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, d] of the rotary positions, each stream [freqs, freqs] (NeoX halves). 2D (ChatGLM-6B,
    spec 4.2): the first d/2 columns from the positions, the last d/2 from the block positions. 1D (GLM-130B):
    the whole head from the positions (row 0) alone. Angles in fp32 from the fp16-rounded frequencies (the HF
    code's fp32 mode) unless config.rotary_inv_freq == "fp32"."""
    streams = config.arch.rotary_streams
    inv = rotary_inv_freq(config.head_dim, config.arch.rotary_base, config.rotary_inv_freq, two_d=streams == 2)
    inv = torch.from_numpy(inv).to(position_ids.device)
    halves = []
    for row in range(streams):  # 2D: the position row, then the block row; 1D: the position row alone
        freqs = position_ids[:, row].to(torch.float32)[..., None] * inv  # [B, T, rot/2]
        halves.append(torch.cat([freqs, freqs], dim=-1))
    angles = torch.cat(halves, dim=-1)[:, None]  # [B, 1, T, d]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, streams: int = 2) -> torch.Tensor:
    """x [B, n, T, d] rotated: each of `streams` equal parts (2: ChatGLM's halves, 1: GLM-130B's whole head) rotates
    its pairs (j, j + part/2), rotate_half style (spec 4.2)."""
    d = x.shape[-1]
    w = d // streams
    parts = []
    for k in range(streams):
        part = x[..., k * w : (k + 1) * w]
        parts.append(torch.cat([-part[..., w // 2 :], part[..., : w // 2]], dim=-1))
    turned = torch.cat(parts, dim=-1)
    return (x * cos.to(x.dtype) + turned * sin.to(x.dtype)).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer: int = 0):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.rotary = config.arch.rotary
        self.streams = config.arch.rotary_streams
        self.fill = config.arch.mask_value(layer)
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, 3 * h)  # rows: [all Q; all K; all V], head-major (docs/glm.md 1.3)
        self.dense = nn.Linear(h, h)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n, T, d)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple]:
        B, T, h = x.shape
        q, k, v = self.query_key_value(x).split(h, dim=-1)  # each (B, T, h)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, n, T, d)
        if rotary is not None:  # spec 4.2-4.3: q and k rotated; the cache holds rotated keys
            q, k = apply_rotary(q, *rotary, self.streams), apply_rotary(k, *rotary, self.streams)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, n, past+T, d)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        d = self.head_dim
        if self.rotary:  # spec 4.4: q.k/sqrt(d) in fp32 (the x(l+1) trick is exact there), fill -10000 (l+1)
            scores = (q.float() / math.sqrt(d)) @ k.float().transpose(-1, -2)
            scores = torch.where(mask > 0, scores, torch.tensor(self.fill, dtype=scores.dtype))
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            ctx = (probs @ v).transpose(1, 2).reshape(B, T, h)
            return self.dense(ctx), present
        if self.scale == 1.0:
            scores = q @ (k / math.sqrt(d)).transpose(-1, -2)  # (B, n, T, past+T); K scaled first
            scores = scores * mask - MASK_FILL * (1.0 - mask)
        else:  # docs/glm.md 1.3: same softmax, different fp16 numerics
            s = self.scale
            scores = (q / math.sqrt(s)) @ (k / math.sqrt(d * s)).transpose(-1, -2)
            scores = scores * mask
            scores = (scores - scores.amax(dim=-1, keepdim=True)) * s
            scores = scores - MASK_FILL * (1.0 - mask)
        probs = self.attention_dropout(torch.softmax(scores, dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(B, T, h)  # heads concatenated in order
        return self.output_dropout(self.dense(ctx)), present


class MLP(nn.Module):
    """gelu (GLM, ChatGLM-6B): dense_4h_to_h(gelu(dense_h_to_4h(x))), inner 4h. geglu (GLM-130B, spec 3):
    dense_h_to_4h emits 2 x inner = [value | gate]; dense_4h_to_h(value * gelu(gate))."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        h = config.hidden_size
        self.dense_h_to_4h = nn.Linear(h, config.mlp_in_size)  # 4h (docs/glm.md 1.1), 2 x inner for a GeGLU
        self.dense_4h_to_h = nn.Linear(config.inner_size, h)
        self.geglu = config.arch.mlp == "geglu"
        self.approximate = "tanh" if config.gelu == "tanh" else "none"
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dense_h_to_4h(x)
        if self.geglu:
            value, gate = u.chunk(2, dim=-1)
            act = value * F.gelu(gate, approximate=self.approximate)
        else:
            act = F.gelu(u, approximate=self.approximate)
        return self.dropout(self.dense_4h_to_h(act))


class TransformerLayer(nn.Module):
    """GLM: pre-LN (docs/glm.md 1.2), x + Attn(LN(x)), then + MLP(LN(.)). ChatGLM-6B (alpha-ln, spec 3):
    a = LN(x); h = alpha*a + Attn(a); b = LN(h); alpha*b + MLP(b)."""

    def __init__(self, config: GLMConfig, layer: int = 0):
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = SelfAttention(config, layer)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = MLP(config)
        self.alpha = config.arch.alpha(config.num_layers) if config.arch.residual == "alpha-ln" else None

    def forward(self, x, mask, past, rotary=None):
        a = self.input_layernorm(x)
        attn, present = self.attention(a, mask, past, rotary)
        if self.alpha is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x)), present
        b = self.post_attention_layernorm(self.alpha * a + attn)
        return self.alpha * b + self.mlp(b), present


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        h, rows = config.hidden_size, config.position_table_rows  # P + 1 rows (docs/glm.md 9.2)
        if config.position_tables:  # GLM; a rotary architecture has none
            self.position_embeddings = _embedding(rows, h)
            self.block_position_embeddings = _embedding(rows, h)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)


def _embedding(rows: int, width: int) -> nn.Embedding:
    """An embedding table left uninitialised (GLMModel.reset_parameters gives every parameter GLM's init). Its
    own N(0, 1) init is skipped: on the meta device it runs a Python decomposition whose first use imports
    torch._dynamo (1.7 s a process with torch 2.13, measured), and elsewhere reset_parameters overwrites it."""
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


@contextmanager
def meta_without_init() -> Iterator[None]:
    """Modules built inside are on the meta device: names and shapes, no memory, values never read."""
    with torch.device("meta"):
        yield


class GLMModel(nn.Module):
    def __init__(self, config: GLMConfig, *, init: bool = True):
        super().__init__()
        self.config = config
        self.word_embeddings = _embedding(config.vocab_size, config.hidden_size)
        self.transformer = Transformer(config)
        if init:
            self.reset_parameters()

    @classmethod
    def skeleton(cls, config: GLMConfig) -> GLMModel:
        """The model on the meta device, uninitialised: its parameter names and shapes, for weights to be
        assigned (load_state_dict(..., assign=True)) or checked against."""
        with meta_without_init():
            return cls(config, init=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original init (docs/glm.md 1.4): N(0, 0.02), output projections N(0, 0.02/sqrt(2L)), LN 1/0."""
        out_std = 0.02 / math.sqrt(2.0 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, 0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: MaskArg,
        past_key_values: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, LayerKV]:
        x, presents = self.hidden_states(input_ids, position_ids, attention_mask, past_key_values)
        return self.lm_head(x), presents

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., h) -> logits (..., V): the tied embedding, no bias."""
        return F.linear(x, self.word_embeddings.weight)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: MaskArg,
        past_key_values: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, LayerKV]:
        """The final-LayerNorm output (B, T, h) and the per-layer presents; forward() without the head."""
        B, T = input_ids.shape
        if position_ids.shape != (B, 2, T):
            raise ValueError(f"position_ids must be [B, 2, T] = {[B, 2, T]}, got {list(position_ids.shape)}")
        L = len(self.transformer.layers)
        if past_key_values is not None and len(past_key_values) != L:
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has {L}")
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        mask = build_attention_mask(attention_mask, B, T, past_len, input_ids.device)  # (B|1, 1, T, past+T)
        mask = mask.to(self.word_embeddings.weight.dtype)  # masking runs in the model dtype (docs/glm.md 9.19)

        tr = self.transformer
        x = self.word_embeddings(input_ids)  # (B, T, h), no sqrt(h) scaling
        rotary = None
        if self.config.position_tables:
            x = x + tr.position_embeddings(position_ids[:, 0]) + tr.block_position_embeddings(position_ids[:, 1])
        else:
            rotary = rotary_tables(self.config, position_ids)
        x = tr.embedding_dropout(x)
        presents: LayerKV = []
        for i, layer in enumerate(tr.layers):
            x, present = layer(x, mask, None if past_key_values is None else past_key_values[i], rotary)
            presents.append(present)
        return tr.final_layernorm(x), presents
