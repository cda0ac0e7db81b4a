"""Which GLM architecture a model is, as data: everything that differs between the 2021 GLM, ChatGLM-6B (v1) and
GLM-130B lives in one Architecture record, and every stage (reference model, graph builder, piecewise check, checkpoint
reader, quantizer, scale benchmark, runtime prompt rules) reads its side of the difference from here.

In: an architecture name (GLMConfig.architecture). Out: the frozen record. Torch-free: the runtime reads it too.
Facts: docs/glm.md (GLM) and ../shared/chatglm_v1_spec.md (ChatGLM-6B; GLM-130B: 1D rotary over the whole head,
a GeGLU MLP, alpha = sqrt(2L), its generate.py prompt rules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glm_runtime.errors import GLMXError


class ArchitectureError(GLMXError, ValueError):
    """An architecture name glmx does not know."""


@dataclass(frozen=True)
class PromptRule:
    """How a prompt's context ids are laid out around the text (the runtime's side).

    cls_first: [CLS] (ENC) opens the context (GLM). eos_unless_last: the end token closes the context unless the
    text's last token is one of these blanks (GLM: ("gMASK",); GLM-130B: any blank); None: no end token is ever
    added (ChatGLM-6B, whose context is `text [gMASK]` and whose span starts with <sop>, chatglm_v1_spec.md 5).
    gmask_when_no_blank: a text without a blank gets [gMASK] appended without being asked (GLM-130B's
    generate.py); otherwise that takes append_gmask. gmask_counts: the positions of a [gMASK] span keep counting
    up from its <sop> (1D: sop at the context length, then +1 per token; GLM-130B) instead of staying at the
    mask's position with the block position counting (GLM, ChatGLM-6B). blanks: how several blanks are filled:
    "appended" (each span after the context, docs/glm.md 4.2) or "spliced" (each span written into the text in
    place of its blank and the context run again before the next, GLM-130B's fill_blanks). stop: the token
    names that end a span besides eop (GLM-130B: eos too).
    """

    cls_first: bool
    eos_unless_last: tuple[str, ...] | None
    gmask_when_no_blank: bool = False
    gmask_counts: bool = False
    blanks: str = "appended"
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRule:
    """How a chat model's conversation becomes one prompt (ChatGLM-6B's chat(), chatglm_v1_spec.md 7), and the
    generation settings its chat() uses. No history: the question alone. Otherwise every earlier round as
    `past`, then the question as `ask`; the prompt rule then appends [gMASK] and the answer starts at <sop>.
    The model has no system role: a system text is folded into the first round's question as `system`."""

    past: str = "[Round {i}]\n问：{question}\n答：{answer}\n"
    ask: str = "[Round {i}]\n问：{question}\n答："
    system: str = "{system}\n\n{question}"
    temperature: float = 0.95
    top_p: float = 0.7


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str  # what a person calls it, in messages
    positions: str  # "learned": two position tables added to the embedding; "rotary-2d" (ChatGLM-6B: half the
    # head with the position, half with the block position) | "rotary-1d" (GLM-130B: the whole head, row 0 only)
    residual: str  # "pre-ln": x + F(LN(x)); "alpha-ln": alpha*LN(x) + F(LN(x)) (the LN output is the skip path)
    alpha_layers: int | None  # alpha = sqrt(2 * this); None: the config's num_layers (GLM-130B); unused for pre-ln
    mask_fill: float  # a masked score becomes -mask_fill ...
    mask_fill_per_layer: bool  # ... times (layer + 1) (ChatGLM's fill before its x(l+1) rescale)
    published_qkv: str  # fused QKV rows in the published files: "blocks" [Q;K;V] | "per-head" [h: q,k,v]...
    default_gelu: str  # what the published code computes when the config does not say
    gelu_stated: bool  # the architecture fixes the GeLU (no assumption to print)
    hf_model_type: str  # config.json's model_type
    published_embedding: str  # the word-embedding key in the published files
    prompt: PromptRule
    chat: ChatRule | None = None  # a chat model's conversation template; None: not a chat model
    rotary_base: float = 10000.0
    mlp: str = "gelu"  # "gelu": 4h(gelu(h->4h)); "geglu": h->2*inner split [value | gate], value * gelu(gate)

    @property
    def rotary(self) -> bool:
        return self.positions.startswith("rotary")

    @property
    def rotary_streams(self) -> int:
        """How many equal parts of a head rotate, each with its own position row: 2 (rotary-2d: position, block),
        1 (rotary-1d: the position row alone), 0 (learned positions)."""
        return {"rotary-2d": 2, "rotary-1d": 1}.get(self.positions, 0)

    def alpha(self, num_layers: int) -> float:
        """The skip-path multiplier of an alpha-ln residual (1.0 for pre-ln)."""
        if self.residual != "alpha-ln":
            return 1.0
        return math.sqrt(2.0 * (self.alpha_layers if self.alpha_layers is not None else num_layers))

    def mask_value(self, layer: int) -> float:
        """The (negative) score a masked key gets in 0-based layer `layer`."""
        return -self.mask_fill * ((layer + 1) if self.mask_fill_per_layer else 1)

    def describe(self, num_layers: int, rotary_inv_freq: str) -> dict[str, object]:
        """Every choice this architecture makes, as the manifest records and the CLI prints it."""
        out: dict[str, object] = {
            "architecture": self.name,
            "positions": self.positions,
            "residual": self.residual,
            "mask_value": self.mask_value(0) if not self.mask_fill_per_layer else f"{-self.mask_fill:g} x (layer+1)",
        }
        if self.residual == "alpha-ln":
            out["alpha"] = self.alpha(num_layers)
        if self.rotary:
            out["rotary_inv_freq"] = rotary_inv_freq
            out["rotary_base"] = self.rotary_base
        if self.mlp != "gelu":
            out["mlp"] = self.mlp
        return out


GLM = Architecture(
    name="glm",
    title="GLM (2021)",
    positions="learned",
    residual="pre-ln",
    alpha_layers=None,
    mask_fill=65504.0,  # docs/glm.md 1.3, 9.5: the fp16 minimum, never -inf
    mask_fill_per_layer=False,
    published_qkv="blocks",
    default_gelu="erf",  # the HF remote code; Megatron folders default to tanh (glm_export.checkpoint)
    gelu_stated=False,
    hf_model_type="glm",
    published_embedding="word_embeddings.weight",
    prompt=PromptRule(cls_first=True, eos_unless_last=("gMASK",)),
)

CHATGLM_6B = Architecture(
    name="chatglm-6b",
    title="ChatGLM-6B (v1)",
    positions="rotary-2d",  # chatglm_v1_spec.md 4.2: dims 0..d/2 rotate with the position, the rest with the block
    residual="alpha-ln",  # spec 3: alpha*LN(x) + F(LN(x))
    alpha_layers=28,  # spec 3: hard-wired sqrt(2*28) in the released code, whatever num_layers says
    mask_fill=10000.0,  # spec 4.4: masked_fill(-10000) before the x(layer+1) rescale
    mask_fill_per_layer=True,
    published_qkv="per-head",  # spec 2: rows [head 0: q, k, v], [head 1: ...]
    default_gelu="tanh",  # spec 3: gelu_impl, the tanh form
    gelu_stated=True,
    hf_model_type="chatglm",
    published_embedding="transformer.word_embeddings.weight",
    prompt=PromptRule(cls_first=False, eos_unless_last=None),
    chat=ChatRule(),
)

GLM_130B = Architecture(
    name="glm-130b",
    title="GLM-130B",
    positions="rotary-1d",  # spec 4.2: the full head rotates with one position row; SAT 2022 has no 2D flag
    residual="alpha-ln",  # spec 3: DeepNormWithGLUMixin, the same alpha*LN(x) + F(LN(x)) as ChatGLM-6B
    alpha_layers=None,  # alpha = sqrt(2 * num_layers): sqrt(140) for the released 70 layers
    mask_fill=10000.0,  # spec 4.4: the same SAT attention_fn: -10000 before the x(layer+1) rescale
    mask_fill_per_layer=True,
    published_qkv="per-head",  # spec 2: per-head interleaved, each TP rank holding whole heads
    default_gelu="erf",  # spec 3: F.gelu, the exact erf form, inside the GeGLU
    gelu_stated=True,
    hf_model_type="glm-130b",  # no HF folder exists: the SAT layout (glm_export.sat) names it
    published_embedding="transformer.word_embeddings.weight",
    prompt=PromptRule(
        cls_first=False,
        eos_unless_last=("MASK", "sMASK", "gMASK"),  # spec 5: </s> unless the text ends with a blank
        gmask_when_no_blank=True,  # spec 5: " [gMASK]" appended to a text without a blank
        gmask_counts=True,  # spec 5: with [gMASK] the positions keep increasing
        blanks="spliced",  # spec 5: fill_blanks splices each span back and restarts
        stop=("eos",),  # spec 5: eop and </s> (20002) both stop
    ),
    mlp="geglu",  # spec 3: dense_h_to_4h emits 2 x inner; the gate is the second half
)

ARCHITECTURES = {a.name: a for a in (GLM, CHATGLM_6B, GLM_130B)}
ROTARY_INV_FREQ = ("fp16", "fp32")  # fp16: the HF code's inv_freq.half() (default); fp32: exact frequencies


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ArchitectureError(f"unknown architecture {name!r}; glmx knows {sorted(ARCHITECTURES)}") from None


def rotary_inv_freq(head_dim: int, base: float, rounding: str, two_d: bool = True):
    """The rotary frequencies of one head (numpy float32 [rot/2]): rot = head_dim/2 per stream for 2D rotary, the
    whole head_dim for 1D (GLM-130B: 64 frequencies for its 128-wide head).
    rounding "fp16": rounded to fp16 as the HF code does even in fp32 (spec 4.2); "fp32": exact."""
    import numpy as np

    rot = head_dim // 2 if two_d else head_dim
    inv = 1.0 / (base ** (np.arange(0, rot, 2, dtype=np.float32) / rot))
    return (inv.astype(np.float16) if rounding == "fp16" else inv).astype(np.float32)
