"""The comparison harness one layer at a time: parity and accuracy of a model larger than memory.

In: two layer stacks (an exported ONNX folder cut at its layer boundaries, each piece an ONNX Runtime session over
the folder's own external data; or the torch reference built layer by layer from a checkpoint's lazily read
weights), GLM's cases or held-out text windows. Out: the same `Comparison` record as glm_export.compare, with
`method` saying what was run.

How: both stacks are run in lockstep, one layer at a time. Every call of every case enters layer i with its own
hidden state; each side holds only its layer i (weights and this layer's cache), and the presents of layer i are
judged before layer i + 1 is loaded. The pieces are the exported graph's own nodes and bytes, so chaining them is
the whole graph's computation; the one thing not run is the optional logits_start input (always 0 here) and, on
text, greedy fills (they need every layer for each token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from glm_export.compare import (
    TOLERANCES,
    WINDOW,
    Call,
    Case,
    Comparison,
    ParityError,
    Tolerance,
    blank_calls,
    case_figures,
    glm_cases,
    judge,
    measure_present,
    span_figures,
    text_windows,
)
from glm_export.onnx_graph import EMBED_OUTPUT
from glm_runtime.config import GLMConfig
from glm_runtime.iotable import kv_names

# (x, mask, past key, past value, past 0's shape, position_ids) -> (y, present key, present value); the positions
# are read by rotary architectures only (each piece computes its rotary tables from them, as the graph does)
Layer = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]
]
METHOD = (
    "piecewise: the graph cut at its layer boundaries (embedding, each layer, final LayerNorm + head), each "
    "piece run on its own with the artifact's own weight bytes, both sides in lockstep one layer at a time"
)


def embed_output() -> str:
    """The embedding's output, the residual stream's first tensor (glm_export.onnx_graph.embeddings names it so in
    every architecture)."""
    return EMBED_OUTPUT


def layer_output(i: int) -> str:
    return f"/transformer.layers.{i}/residual_mlp/out"


# ------------------------------------------------------------------ the ONNX side: pieces of an exported graph


class OnnxLayers:
    """An exported glmx graph cut at its residual-stream boundaries; each piece an ONNX Runtime session that
    reads its initializers from the folder's external data (loaded when the piece is opened, freed after)."""

    def __init__(
        self,
        model_path: Path,
        config: GLMConfig,
        precision: str,
        label: str,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        prefix: Any = None,
    ):
        import onnx

        self.path, self.config, self.precision, self.label = Path(model_path), config, precision, label
        self.prefix = prefix  # the folder's P-tuning prefix (glm_runtime.prefix.Prefix), fed in front of each case
        self.providers = list(providers)
        self.model = onnx.load(str(model_path), load_external_data=False)  # the graph only
        g = self.model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {v.name: v for v in g.input}
        self.graph_outputs = {v.name: v for v in g.output}
        missing = [
            b for b in [embed_output()] + [layer_output(i) for i in range(config.num_layers)] if b not in self.producer
        ]
        if missing:
            raise ParityError(
                f"{model_path} has no layer boundary {missing[0]!r} (the residual stream's tensor "
                f"names of glm_export.onnx_graph), so it cannot be checked one layer at a time; "
                f"an ONNX Runtime-optimized graph renames them: use --level fuse"
            )
        kv = self.graph_inputs[kv_names("past", 0)[0]].type.tensor_type.elem_type
        self.kv_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kv))

    def _piece(self, inputs: Sequence[str], outputs: Sequence[str]):
        """A ModelProto of the nodes between `inputs` (boundaries or graph inputs) and `outputs`
        (glm_runtime.stages.cut_graph, which cuts pipeline stages the same way)."""
        from glm_runtime.stages import StageError, cut_graph

        try:
            return cut_graph(self.model, inputs, outputs, self.config.hidden_size)
        except StageError as exc:
            raise ParityError(f"{self.path}: {exc}") from None

    @contextmanager
    def _session(self, inputs: Sequence[str], outputs: Sequence[str]) -> Iterator[Any]:
        import onnxruntime as ort

        from glm_runtime.session import quiet_options

        options = quiet_options()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        session = ort.InferenceSession(
            self._piece(inputs, outputs).SerializeToString(), options, providers=self.providers
        )
        try:
            yield session
        finally:
            del session

    @contextmanager
    def embedding(self) -> Iterator[Callable[[np.ndarray, np.ndarray], np.ndarray]]:
        with self._session(["input_ids", "position_ids"], [embed_output()]) as s:
            yield lambda ids, pos: s.run(None, {"input_ids": ids, "position_ids": pos})[0]

    @contextmanager
    def layer(self, i: int) -> Iterator[Layer]:
        x_in = embed_output() if i == 0 else layer_output(i - 1)
        names = kv_names("past", i)
        outs = [layer_output(i), *kv_names("present", i)]
        first_past = kv_names("past", 0)[0]
        with self._session([x_in, "attention_mask", *names], outs) as s:
            wanted = {v.name for v in s.get_inputs()}

            def run(x, mask, past_k, past_v, past0_shape, pos):
                feeds = {
                    x_in: x,
                    "attention_mask": mask,
                    names[0]: past_k.astype(self.kv_dtype, copy=False),
                    names[1]: past_v.astype(self.kv_dtype, copy=False),
                }
                if "position_ids" in wanted:  # a rotary layer
                    feeds["position_ids"] = pos
                if first_past in wanted and i:  # only its length is read (past_len), by every layer
                    feeds[first_past] = np.zeros(past0_shape, dtype=self.kv_dtype)
                return tuple(s.run(None, feeds))

            yield run

    @contextmanager
    def head(self) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        x_in = layer_output(self.config.num_layers - 1)
        with self._session([x_in], ["logits"]) as s:
            yield lambda x: s.run(None, {x_in: x})[0]


# ------------------------------------------------------------------ the torch side: the reference, layer by layer


class TorchLayers:
    """The reference GLM (glm_export.model) one layer at a time, fp32, its weights read from `weights`
    (glm_export.weights.Weights, official names) as each layer is opened."""

    precision = "fp32"
    kv_dtype = np.dtype(np.float32)

    def __init__(self, config: GLMConfig, weights: Any, label: str, prefix: Any = None):
        self.config, self.weights, self.label = config, weights, label
        self.prefix = prefix  # a P-tuning prefix (glm_runtime.prefix.Prefix), as past_key_values in front of each case

    def _tensor(self, name: str):
        import torch

        return torch.from_numpy(np.asarray(self.weights[name], dtype=np.float32))

    @contextmanager
    def embedding(self):
        import torch

        names = ["word_embeddings.weight"]
        if self.config.position_tables:
            names += ["transformer.position_embeddings.weight", "transformer.block_position_embeddings.weight"]
        tables = [self._tensor(n) for n in names]

        def run(ids, pos):
            with torch.inference_mode():
                word, p, b = (torch.as_tensor(a) for a in (ids, pos[:, 0], pos[:, 1]))
                x = tables[0][word]  # noqa: F821 - deleted after the yield, once this function is no longer called
                for table, rows in zip(tables[1:], (p, b)):  # noqa: F821 - as above
                    x = x + table[rows]
                return x.numpy()

        yield run
        del tables

    @contextmanager
    def layer(self, i: int):
        import torch

        from glm_export.model import TransformerLayer, meta_without_init, rotary_tables

        prefix = f"transformer.layers.{i}."
        with meta_without_init():
            module = TransformerLayer(self.config, i)
        module.load_state_dict({k: self._tensor(prefix + k) for k in module.state_dict()}, assign=True)
        module.eval()

        def run(x, mask, past_k, past_v, _past0_shape, pos):
            with torch.inference_mode():
                P = past_k.shape[2]
                past = (torch.as_tensor(past_k), torch.as_tensor(past_v)) if P else None
                rotary = None if self.config.position_tables else rotary_tables(self.config, torch.as_tensor(pos))
                y, (k, v) = module(torch.as_tensor(x), torch.as_tensor(mask.astype(np.float32)), past, rotary)  # noqa: F821 - deleted after the yield, once this function is no longer called
                return y.numpy(), k[:, :, P:].numpy(), v[:, :, P:].numpy()

        yield run
        del module

    @contextmanager
    def head(self):
        import torch
        import torch.nn.functional as F

        eps = self.config.layernorm_epsilon
        ln_w, ln_b = (
            self._tensor("transformer.final_layernorm.weight"),
            self._tensor("transformer.final_layernorm.bias"),
        )
        table = self._tensor("word_embeddings.weight")

        def run(x):
            with torch.inference_mode():
                y = F.layer_norm(torch.as_tensor(x), (x.shape[-1],), ln_w, ln_b, eps)
                return F.linear(y, table).numpy()  # noqa: F821 - deleted after the yield, once this function is no longer called

        yield run
        del table


# ------------------------------------------------------------------ running both stacks in lockstep


def _masks(calls: Sequence[Call], prefix: int = 0) -> list[np.ndarray]:
    """The attention mask of each call as glm_export.compare.run_calls feeds a host session (exact-length past;
    `prefix` always-visible columns in front)."""
    B = calls[0].input_ids.shape[0]
    seen = np.ones((B, prefix), dtype=bool)
    out = []
    for call in calls:
        T = call.input_ids.shape[1]
        out.append(
            np.ascontiguousarray(
                np.concatenate([np.broadcast_to(seen[:, None, :], (B, T, seen.shape[1])), call.block], axis=2)[:, None]
            )
        )
        seen = np.concatenate([seen, call.keep], axis=1)
    return out


def _prefix_slots(candidate: Any, reference: Any) -> int:
    """P of the stacks' P-tuning prefix (0 without); both carry the same length, or they are not one model."""
    lengths = [0 if s.prefix is None else s.prefix.length for s in (candidate, reference)]
    if lengths[0] != lengths[1]:
        raise ParityError(
            f"the candidate carries a P-tuning prefix of {lengths[0]} slots and the reference one of {lengths[1]}"
        )
    return lengths[0]


def _first_past(stack: Any, i: int, batch: int, n: int, d: int) -> list[np.ndarray]:
    """Layer i's past before a case's first call: nothing, or the stack's prefix [batch, n, P, d] float32."""
    if stack.prefix is None:
        return [np.zeros((batch, n, 0, d), np.float32)] * 2
    return [np.repeat(np.asarray(a, np.float32), batch, axis=0) for a in stack.prefix.layer(i)]


def lockstep(
    candidate: Any,
    reference: Any,
    cases: Sequence[Case],
    *,
    on_present=None,
    rows: Callable[[int, int], bool] | None = None,
    log=None,
) -> tuple[list, list]:
    """Both stacks over every call of every case, one layer at a time.
    on_present(case index, call index, layer, (cand k, cand v), (ref k, ref v)): called as each layer's presents
    are made (they are then dropped). rows(case, call): whether that call's logits are wanted.
    -> (candidate logits, reference logits): per case, per call, [B, T, V] float32 or None."""
    cfg = candidate.config
    P = _prefix_slots(candidate, reference)
    masks = [_masks(case.calls, P) for case in cases]
    hidden: list[list[list[np.ndarray]]] = [[[], []] for _ in cases]  # [case][side][call]
    for side, stack in enumerate((candidate, reference)):
        with stack.embedding() as embed:
            for c, case in enumerate(cases):
                hidden[c][side] = [embed(call.input_ids, call.position_ids) for call in case.calls]
    n, d = cfg.num_attention_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        with candidate.layer(i) as run_c, reference.layer(i) as run_r:
            for c, case in enumerate(cases):
                B = case.calls[0].input_ids.shape[0]
                past = [_first_past(stack, i, B, n, d) for stack in (candidate, reference)]
                for k in range(len(case.calls)):
                    presents = []
                    for side, run in enumerate((run_c, run_r)):
                        pk, pv = past[side]
                        call = case.calls[k]
                        y, nk, nv = run(hidden[c][side][k], masks[c][k], pk, pv, pk.shape, call.position_ids)
                        hidden[c][side][k] = np.asarray(y, dtype=np.float32)
                        nk, nv = np.asarray(nk, np.float32), np.asarray(nv, np.float32)
                        past[side] = [np.concatenate([pk, nk], axis=2), np.concatenate([pv, nv], axis=2)]
                        presents.append((nk, nv))
                    if on_present is not None:
                        on_present(c, k, i, presents[0], presents[1])
        if log is not None:
            log(i + 1, cfg.num_layers)
    logits: list = [[], []]
    for side, stack in enumerate((candidate, reference)):
        with stack.head() as head:
            logits[side] = [
                [
                    np.asarray(head(h), np.float32) if rows is None or rows(c, k) else None
                    for k, h in enumerate(hidden[c][side])
                ]
                for c in range(len(cases))
            ]
    return logits[0], logits[1]


def _present_figures(cases: Sequence[Case]) -> tuple[dict, Any]:
    """Per case, the figures compare_sessions records, and the lockstep callback that measures the presents into
    them as each layer makes them (calls of cases beyond `cases`, e.g. text windows run in the same pass, are not
    judged)."""
    figures = {case.name: case_figures(case) for case in cases}

    def on_present(c, k, i, got, want):
        if c < len(cases):
            measure_present(figures[cases[c].name], k, i, kv_names("present", i), got, want)

    return figures, on_present


def _judge_stacks(
    candidate: Any,
    reference: Any,
    stage: str,
    cases: Sequence[Case],
    tol: Tolerance | None,
    figures: dict,
    got_all: list,
    want_all: list,
) -> Comparison:
    """glm_export.compare.judge over both stacks' logits, labelled as the piecewise check."""
    logits = [list(zip(got_all[c], want_all[c])) for c in range(len(cases))]
    return judge(
        stage,
        f"{candidate.label} ({candidate.precision})",
        f"{reference.label} ({reference.precision})",
        candidate.precision,
        tol,
        cases,
        figures,
        logits,
        method=METHOD,
    )


def compare_by_layer(
    candidate: Any,
    reference: Any,
    *,
    stage: str,
    tolerance: Tolerance | None = None,
    cases: Sequence[Case] | None = None,
    log=None,
) -> Comparison:
    """glm_export.compare.compare_sessions one layer at a time: the same figures, the same record."""
    cases = list(cases) if cases is not None else glm_cases(reference.config.vocab_size)
    figures, on_present = _present_figures(cases)
    got, want = lockstep(candidate, reference, cases, on_present=on_present, log=log)
    return _judge_stacks(
        candidate, reference, stage, cases, tolerance or TOLERANCES.get(candidate.precision), figures, got, want
    )


def compare_with_text_by_layer(
    candidate: Any,
    reference: Any,
    tok: Any,
    text: str,
    *,
    stage: str,
    language: str = "?",
    max_windows: int = 16,
    log=None,
) -> tuple[Comparison, dict]:
    """compare_by_layer on GLM's cases and text_by_layer's figures in ONE lockstep pass: each layer of each side
    is loaded once for both (a large model's check is bound by reading its weights)."""
    cfg = reference.config
    cases = glm_cases(cfg.vocab_size)
    windows, targets, window = _windows(tok, text, cfg)
    n = len(cases)
    figures, on_present = _present_figures(cases)
    got, want = lockstep(
        candidate, reference, cases + windows, on_present=on_present, rows=lambda c, k: c < n or k == 1, log=log
    )  # a window's logits: its span call only
    result = _judge_stacks(
        candidate, reference, stage, cases, TOLERANCES.get(candidate.precision), figures, got[:n], want[:n]
    )
    return result, _text_figures(tok, got[n:], want[n:], targets, window, language)


def _windows(tok: Any, text: str, cfg: GLMConfig, max_windows: int = 16):
    window = min(WINDOW, (cfg.max_sequence_length - 2) // 2 * 2)
    chunks = text_windows(tok, text, cfg.vocab_size, window, max_windows)
    if len(chunks) < 2:
        raise ValueError(f"held-out text gives fewer than 2 windows of {window} tokens: pass a longer text")
    cases, targets = [], []
    for j, chunk in enumerate(chunks):
        calls, target = blank_calls(tok, chunk)
        cases.append(Case(f"window_{j}", "teacher-forced blank", calls))
        targets.append(target)
    return cases, targets, window


def _text_figures(tok, got_all, want_all, targets, window, language) -> dict[str, Any]:
    figures = span_figures([(got_all[c][1][0], want_all[c][1][0], t) for c, t in enumerate(targets)])
    return {
        "language": language,
        "tokenizer": tok.kind,
        "windows": len(targets),
        "window": window,
        **figures,
        "fill_prompts": 0,
        "fill_method": "not run: the check runs one layer at a time, and a greedy fill needs "
        "every layer for each token",
        "fill_tokens": 0,
        "fill_agreement": None,
        "fill_token_agreement": None,
        "method": METHOD,
    }


def text_by_layer(
    candidate: Any, reference: Any, tok: Any, text: str, *, language: str = "?", max_windows: int = 16, log=None
) -> dict[str, Any]:
    """glm_export.compare.compare_on_text's teacher-forced figures one layer at a time (greedy fills are not
    run: each generated token needs every layer)."""
    cases, targets, window = _windows(tok, text, reference.config, max_windows)
    got_all, want_all = lockstep(candidate, reference, cases, rows=lambda c, k: k == 1, log=log)
    return _text_figures(tok, got_all, want_all, targets, window, language)
