"""glm_export.optimize, level "fuse": each written-out GeLU becomes one standard Gelu node (opset 20), matched by
structure; the optimized folder passes parity, fills blanks through the runtime like its parent and records the
rewrite. fp32 and fp16 exports of one seeded tiny GLM; erf and opset-17 ReduceMax variants built in memory."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the export extra: a runtime-only install skips this module
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper

from glm_export import optimize
from glm_export.compare import HELDOUT, TOLERANCES, blank_calls, run_calls, split_text, strip_provenance
from glm_export.derive import op_histogram
from glm_export.onnx_graph import MAX_OPSET, build_model
from glm_export.optimize import OptimizeError, fuse_gelu, optimize_onnx
from glm_runtime.config import get_preset
from glm_runtime.iotable import LOGITS_START
from glm_runtime.manifest import load_manifest
from tests.fill_fixtures import PROMPTS
from tests.random_models import random_weights_model

TINY = get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
L = TINY.num_layers
EVAL = split_text(HELDOUT["en"].read_text(encoding="utf-8"))[1]
EVAL_SHORT = EVAL[: len(EVAL) // 2]
GELU_CONSTS = {"const/gelu_a", "const/gelu_k", "const/half", "const/one_w", "const/sqrt2"}
# one tanh GeLU written out: Mul x*x, *a, x*(.), *k, x*0.5, final Mul; Add 1+ax2, 1+t; Tanh
TANH_GELU_OPS = {"Mul": 6, "Add": 2, "Tanh": 1}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """fp32 and fp16 exports (with a tokenizer) of one seeded tiny GLM with spread-out weights."""
    from glm_export.export import export_onnx
    from glm_export.tokenizer_training import train_bpe_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("opt_parents")
    text = strip_provenance(HELDOUT["en"].read_text(encoding="utf-8"))
    train_bpe_tokenizer([text], 512, root / "tokenizer.json")
    model = random_weights_model(TINY, seed=0)
    return {
        p: export_onnx(
            model, root / p, precision=p, tokenizer_file=root / "tokenizer.json", validate=False, log=lambda msg: None
        )
        for p in ("fp32", "fp16")
    }


@pytest.fixture(scope="module")
def fused(parents, tmp_path_factory):
    root = tmp_path_factory.mktemp("opt_fused")
    return {p: optimize_onnx(parents[p], root / p, eval_text=EVAL_SHORT) for p in parents}  # default level


def _graph(folder) -> onnx.ModelProto:
    return onnx.load(folder / "model.onnx")


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fuse_leaves_one_gelu_per_layer_in_the_weight_dtype(parents, fused, precision):
    parent, child = _graph(parents[precision]), _graph(fused[precision])
    want = op_histogram(parent)
    for op, count in TANH_GELU_OPS.items():
        want[op] -= count * L
    want = {op: c for op, c in want.items() if c} | {"Gelu": L}
    assert op_histogram(child) == want
    gelus = [n for n in child.graph.node if n.op_type == "Gelu"]
    assert [helper.get_attribute_value(n.attribute[0]) for n in gelus] == [b"tanh"] * L
    # the same tensors as before: dense_h_to_4h's output in, dense_4h_to_h's MatMul reads the output
    assert [n.input[0] for n in gelus] == [f"/transformer.layers.{i}.mlp.dense_h_to_4h/Add/out" for i in range(L)]
    readers = {i for n in child.graph.node if n.op_type == "MatMul" for i in n.input}
    assert all(n.output[0] in readers for n in gelus)
    inferred = onnx.shape_inference.infer_shapes(child, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    wtype = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert {types[n.output[0]] for n in gelus} == {wtype}
    assert _opset(parent) == 17 and _opset(child) == 20 <= MAX_OPSET
    assert child.ir_version >= helper.find_min_ir_version_for(list(child.opset_import))
    inits = {t.name for t in child.graph.initializer}
    assert not inits & GELU_CONSTS  # dead constants went with their nodes
    assert LOGITS_START in inits and LOGITS_START in {i.name for i in child.graph.input}  # optional input kept


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_manifest_records_the_rewrite_and_checks(parents, fused, precision):
    m = load_manifest(fused[precision], kind="onnx")
    opt = m.extra["optimization"]
    assert opt["level"] == "fuse"
    assert opt["rewrites"]["gelu_fused"] == L and opt["rewrites"]["approximate"] == ["tanh"]
    assert opt["rewrites"]["opset"] == [17, 20]
    assert opt["ops"]["Gelu"] == L and "Tanh" not in opt["ops"] and opt["ops_parent"]["Tanh"] == L
    assert opt["trt_findings"] in ([], None)  # None only when glm_export.trt_check is absent
    assert m.precision == precision and m.io == load_manifest(parents[precision]).io
    assert m.parity["passed"] and m.parity["stage"] == "optimize" and set(m.parity["cases"]) >= {"gmask_at_end"}
    assert m.parity["text"]["fill_method"].startswith("glm_runtime.generate.fill_blanks")
    assert m.parity["text"]["language"] == "en" and m.parity["text"]["scheme"].startswith("optimized")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fused_graph_matches_parent_within_parity_tolerance(parents, fused, precision):
    from glm_runtime.session import open_model

    parent, tok = open_model(parents[precision])
    child, _ = open_model(fused[precision])
    calls, _ = blank_calls(tok, np.asarray(tok.encode(EVAL)[:40]))
    want_all, got_all = run_calls(parent, calls), run_calls(child, calls)  # each decodes on its own cache
    tol = TOLERANCES[precision]
    for want, got in zip(want_all, got_all):
        for name in want:
            diff = float(np.abs(got[name] - want[name]).max())
            assert np.isfinite(got[name]).all() and diff <= tol.allowed(float(np.abs(want[name]).max())), (name, diff)


def test_runtime_fills_blanks_like_parent(parents, fused):
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_session
    from glm_runtime.tokenizer import load_tokenizer

    m = load_manifest(parents["fp32"])
    tok = load_tokenizer(parents["fp32"] / m.tokenizer["file"])
    want = fill_blanks(open_session(parents["fp32"]), tok, PROMPTS, max_new_tokens=8)
    got = fill_blanks(open_session(fused["fp32"]), tok, PROMPTS, max_new_tokens=8)
    assert [[s.token_ids for s in r.spans] for r in got] == [[s.token_ids for s in r.spans] for r in want]
    assert [r.text for r in got] == [r.text for r in want]


# ---------------------------------------------------------------- the rewrite on graphs built in memory


def _run(model: onnx.ModelProto, config, T: int = 6) -> list[np.ndarray]:
    """Outputs of one context pass of T tokens (past empty) on ONNX Runtime CPU."""
    from glm_runtime.session import quiet_options

    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, config.vocab_size, (1, T)),
        "position_ids": np.stack([np.arange(T), np.zeros(T, np.int64)])[None].astype(np.int64),
        "attention_mask": np.tril(np.ones((T, T), bool))[None, None],
    }
    for i in range(config.num_layers):
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = np.zeros(
                (1, config.num_attention_heads, 0, config.head_dim), np.float32
            )
    session = ort.InferenceSession(model.SerializeToString(), quiet_options(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _built(config, opset: int) -> onnx.ModelProto:
    weights = {k: v.numpy() for k, v in random_weights_model(config, seed=3).state_dict().items()}
    return build_model(config, weights, "fp32", opset)


@pytest.mark.parametrize("opset", [17, 18])
def test_erf_gelu_and_reduce_max_through_the_opset_raise(opset):
    """erf GeLU -> Gelu(approximate="none"); attention_scale > 1 puts ReduceMax in the graph, whose axes move
    from attribute to input at opset 18: the raised graph must keep the values."""
    config = TINY.replace(gelu="erf", attention_scale=2.0)
    model = _built(config, opset)
    want = _run(model, config)
    out, record = fuse_gelu(_built(config, opset))
    onnx.checker.check_model(out, full_check=True)
    assert record["gelu_fused"] == L and record["approximate"] == ["none"] and record["opset"] == [opset, 20]
    ops = op_histogram(out)
    assert ops["Gelu"] == L and "Erf" not in ops and ops["ReduceMax"] == L
    for n in out.graph.node:
        if n.op_type == "ReduceMax":
            assert len(n.input) == 2 and "axes" not in {a.name for a in n.attribute}
    for w, g in zip(want, _run(out, config)):
        assert np.abs(w - g).max() <= TOLERANCES["fp32"].atol


def test_fuse_follows_structure_not_names():
    """Nodes renamed and the operands of every Mul / Add swapped: the same L GeLUs are found."""
    model = _built(TINY, 17)
    want = _run(model, TINY)
    for k, n in enumerate(model.graph.node):
        n.name = f"node{k}"
        if n.op_type in ("Mul", "Add"):
            n.input[0], n.input[1] = n.input[1], n.input[0]
    out, record = fuse_gelu(model)
    assert record["gelu_fused"] == L and op_histogram(out)["Gelu"] == L and "Tanh" not in op_histogram(out)
    for w, g in zip(want, _run(out, TINY)):
        assert np.abs(w - g).max() <= TOLERANCES["fp32"].atol


def test_fuse_leaves_near_misses_alone():
    # a different cubic coefficient is not GeLU: nothing fused, opset untouched
    model = _built(TINY, 17)
    a = next(t for t in model.graph.initializer if t.name == "const/gelu_a")
    a.CopyFrom(numpy_helper.from_array(np.asarray(0.05, np.float32), a.name))
    out, record = fuse_gelu(model)
    assert record["gelu_fused"] == 0 and _opset(out) == 17 and op_histogram(out)["Tanh"] == L
    # an inner tensor that is also a graph output cannot be removed: that layer stays written out
    model = _built(TINY, 17)
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    model.graph.output.append(helper.make_tensor_value_info(tanh.output[0], onnx.TensorProto.FLOAT, None))
    out, record = fuse_gelu(model)
    assert record["gelu_fused"] == L - 1 and op_histogram(out)["Tanh"] == 1
    assert "const/gelu_a" in {t.name for t in out.graph.initializer}  # still read by the unfused layer
    onnx.checker.check_model(out, full_check=True)


def test_fuse_refuses_a_graph_without_one_gelu_per_layer(parents, tmp_path, monkeypatch):
    monkeypatch.setattr(optimize, "fuse_gelu", lambda model: (model, {}))
    with pytest.raises(OptimizeError, match=f"fuse found 0 GeLU subgraphs .* for {L} layers"):
        optimize_onnx(parents["fp32"], tmp_path / "opt", eval_text=EVAL_SHORT)
    assert not (tmp_path / "opt").exists()


def test_cli_optimize_defaults_to_fuse():
    from click.testing import CliRunner

    from glm_export.cli import main

    result = CliRunner().invoke(main, ["optimize", "--help"])
    assert result.exit_code == 0 and "fuse" in result.output and "[default: fuse]" in result.output
