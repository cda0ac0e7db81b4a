"""optimize_onnx / quantize_onnx / compare_on_text on a tiny exported GLM (random weights, trained tokenizer).

Random weights give near-flat logits, so the per-scheme budgets (set on the trained bundled model) are not what
these tests judge: they check that each artifact runs, stays within a stated logit tolerance of its parent,
records what it is, and that every refusal (calibration, budget, keep_fp32, scheme) happens with its message.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the export extra: a runtime-only install skips this module
torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from glm_export import compare as accuracy
from glm_export.calibration import calibration_feeds
from glm_export.compare import HELDOUT, blank_calls, run_calls
from glm_export.quantize import QuantizeError, head_node, quantize_onnx
from glm_runtime.manifest import load_manifest, sha256_file

# max |child - parent| logit over the report's windows on the tiny model, per scheme (measured: fp16 6e-4,
# int8-dynamic 0.044, qdq-int8 0.035, int4-weight 0.059)
LOGIT_TOL = {"fp16": 5e-3, "int8-dynamic": 0.1, "qdq-int8": 0.1, "int4-weight": 0.15}
EVAL = accuracy.split_text(HELDOUT["en"].read_text(encoding="utf-8"))[1]
EVAL_SHORT = EVAL[: len(EVAL) // 2]  # ~700 teacher-forced positions: enough for the tests, half the time


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from glm_export.export import export_onnx
    from glm_export.model import GLMModel
    from glm_export.tokenizer_training import train_bpe_tokenizer
    from glm_runtime.config import get_preset

    root = tmp_path_factory.mktemp("quant")
    text = accuracy.strip_provenance(HELDOUT["en"].read_text(encoding="utf-8"))
    train_bpe_tokenizer([text], 512, root / "tokenizer.json")
    torch.manual_seed(0)
    model = GLMModel(get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)).eval()
    return export_onnx(
        model, root / "fp32", tokenizer_file=root / "tokenizer.json", validate=False, log=lambda msg: None
    )


@pytest.fixture(scope="module")
def children(parent, tmp_path_factory):
    root = tmp_path_factory.mktemp("children")
    return {s: quantize_onnx(parent, root / s, scheme=s, accept_loss=True, eval_text=EVAL_SHORT) for s in LOGIT_TOL}


@pytest.mark.parametrize("scheme", sorted(LOGIT_TOL))
def test_scheme_runs_close_to_parent(parent, children, scheme):
    from glm_runtime.session import open_model

    parent_session, tok = open_model(parent)
    child, _ = open_model(children[scheme])
    calls, _ = blank_calls(tok, np.asarray(tok.encode(EVAL)[:40]))
    for want, got in zip(run_calls(parent_session, calls), run_calls(child, calls)):  # each on its own cache
        assert np.isfinite(got["logits"]).all()
        assert np.abs(got["logits"] - want["logits"]).max() <= LOGIT_TOL[scheme]
    report = load_manifest(children[scheme]).parity["text"]
    assert report["max_logit_diff"] <= LOGIT_TOL[scheme] and report["finite"]


@pytest.mark.parametrize("scheme", sorted(LOGIT_TOL))
def test_manifest_records_scheme_parent_and_figures(parent, children, scheme):
    m, p = load_manifest(children[scheme], kind="onnx"), load_manifest(parent)
    assert m.precision == scheme
    assert m.parent["manifest_sha256"] == sha256_file(parent / "manifest.json")
    assert m.extra["quantization"]["scheme"] == scheme and m.extra["quantization"]["accept_loss"] is True
    acc = m.parity["text"]
    for key in ("max_logit_diff", "top1_agreement", "fill_agreement", "ppl_change", "budget", "within_budget"):
        assert key in acc
    assert acc["positions"] >= 400 and acc["fill_prompts"] >= 8
    if scheme == "fp16":
        assert m.io == __import__("glm_runtime.iotable", fromlist=["io_table"]).io_table(p.config, "fp16")
    else:
        assert m.io == p.io  # same IO table: KV cache stays float32
    assert m.tokenizer == p.tokenizer and (children[scheme] / p.tokenizer["file"]).is_file()


def test_graphs_quantize_what_they_say(children):
    ops = {s: {n.op_type for n in onnx.load(children[s] / "model.onnx").graph.node} for s in children}
    assert "MatMulInteger" in ops["int8-dynamic"] and "MatMulNBits" in ops["int4-weight"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["qdq-int8"]
    assert "Cast" in ops["fp16"]
    for scheme in ("int8-dynamic", "qdq-int8"):  # default: tied head stays the fp32 Gemm
        model = onnx.load(children[scheme] / "model.onnx")
        head = head_node(model)
        assert head.op_type == "Gemm" and head.input[1] == "word_embeddings.weight"
        assert not [t.name for t in model.graph.initializer if "Transposed" in t.name or t.name.endswith(".weight.T.T")]
    # int4-weight's default: attention 4-bit blocks of 32, MLP 4-bit blocks of 128, head 8-bit blocks of 128 (an
    # untied copy); the Gather keeps the fp32 table
    model = onnx.load(children["int4-weight"] / "model.onnx")
    head = head_node(model)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits" and (attrs["bits"], attrs["block_size"]) == (8, 128)
    layers = {
        (
            onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")),
            onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size")),
            "mlp" if ".mlp." in n.name else "attention",
        )
        for n in model.graph.node
        if n.op_type == "MatMulNBits" and n is not head
    }
    assert layers == {(4, 32, "attention"), (4, 128, "mlp")}
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and "word_embeddings" in n.input[0])
    table = next(t for t in model.graph.initializer if t.name == gather.input[0])
    assert table.data_type == onnx.TensorProto.FLOAT
    quant = load_manifest(children["int4-weight"]).extra["quantization"]
    assert quant["head"] == {"bits": 8, "block_size": 128} and quant["keep_fp32"] == ["embedding"]
    assert (quant["block_size"], quant["mlp_block_size"]) == (32, 128)


def test_mlp_block_size_sets_only_the_mlp_matmuls(parent, tmp_path):
    out = quantize_onnx(
        parent,
        tmp_path / "mlp64",
        scheme="int4-weight",
        block_size=32,
        mlp_block_size=64,
        head_block_size=16,
        accept_loss=True,
        eval_text=EVAL_SHORT,
    )
    model = onnx.load(out / "model.onnx")
    blocks = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["block_size"]
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    head = head_node(model).name
    roles = {name: 16 if name == head else 64 if ".mlp." in name else 32 for name in blocks}
    assert blocks == roles and {64, 32} <= set(blocks.values())
    quant = load_manifest(out).extra["quantization"]
    assert (quant["block_size"], quant["mlp_block_size"], quant["head"]["block_size"]) == (32, 64, 16)
    assert "the MLP's in blocks of 64" in quant["weights"]
    # defaults: int8-weight keeps its head in blocks of 32; --block-size alone sets the MLP's blocks too
    for scheme, args, want in (("int8-weight", {}, (32, 128, 32)), ("int4-weight", {"block_size": 64}, (64, 64, 128))):
        out = quantize_onnx(
            parent, tmp_path / f"{scheme}-{args}", scheme=scheme, accept_loss=True, eval_text=EVAL_SHORT, **args
        )
        quant = load_manifest(out).extra["quantization"]
        assert (quant["block_size"], quant["mlp_block_size"], quant["head"]["block_size"]) == want, scheme
    for scheme, size, why in (
        ("int8-dynamic", 64, "applies to --scheme int4-weight"),
        ("int4-weight", 48, "--mlp-block-size must be a power of two"),
    ):
        with pytest.raises(QuantizeError, match=why):
            quantize_onnx(parent, tmp_path / "no", scheme=scheme, mlp_block_size=size, eval_text=EVAL_SHORT)
    assert not (tmp_path / "no").exists()


def test_qdq_is_symmetric_per_channel_and_spares_attention(children):
    model = onnx.load(children["qdq-int8"] / "model.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 4  # qkv, dense, h->4h, 4h->h of layer 1 (the default keeps layer 0 fp32)
    for n in weight_dq:
        assert inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1  # per-channel scales
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert not inits[n.input[2]].any()  # zero point 0: TensorRT's symmetric int8
        if n.op_type == "MatMul" and "attention/" in n.name:  # Q.K^T and probs.V read fp32 activations
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input)


def test_qdq_passes_check_trt(children):
    trt_check = pytest.importorskip("glm_export.trt_check")
    assert list(trt_check.check_trt(children["qdq-int8"] / "model.onnx")) == []
    assert load_manifest(children["qdq-int8"]).extra["quantization"]["trt_findings"] == []


@pytest.mark.parametrize("scheme", sorted(LOGIT_TOL))
def test_folder_opens_in_runtime_session_and_fills(children, scheme):
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    session, tok = open_model(children[scheme])
    assert session.precision == scheme
    (result,) = fill_blanks(session, tok, ["the [MASK] of the text"], max_new_tokens=4)
    assert len(result.spans) == 1 and len(result.spans[0].token_ids) <= 4
    assert result.spans[0].stop in ("eop", "eos", "length")
    # the report's greedy fills went through the runtime's own loop
    assert load_manifest(children[scheme]).parity["text"]["fill_method"].startswith("glm_runtime")


def test_fp16_passes_the_fp16_tolerance_on_glms_cases(children):
    parity = load_manifest(children["fp16"]).parity
    assert parity["tolerance"]["atol"] == accuracy.TOLERANCES["fp16"].atol and not [
        f for f in parity["failures"] if not f.startswith("text: ")
    ]
    assert load_manifest(children["int4-weight"]).parity["tolerance"] is None  # judged on text only


def test_quantizing_the_head_is_a_choice(parent, tmp_path):
    out = quantize_onnx(
        parent,
        tmp_path / "int8-head",
        scheme="int8-dynamic",
        keep_fp32=("embedding",),
        accept_loss=True,
        eval_text=EVAL_SHORT,
    )
    model = onnx.load(out / "model.onnx")
    assert head_node(model).op_type == "MatMulInteger"
    gather_tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    assert "word_embeddings.weight" in gather_tables  # the embedding lookup still reads the fp32 table
    assert load_manifest(out).extra["quantization"]["keep_fp32"] == ["embedding"]


def test_layer_roles_keep_exactly_that_layers_weight_matmuls(parent, children):
    from glm_export.quantize import excluded_nodes

    model = onnx.load(parent / "model.onnx")
    last = max(int(m.group(1)) for n in model.graph.node if (m := re.match(r"/transformer\.layers\.(\d+)[./]", n.name)))
    base = set(excluded_nodes(model, ("embedding", "head")))
    for role, index in (("first-layer", 0), ("last-layer", last)):
        extra = set(excluded_nodes(model, ("embedding", "head", role))) - base
        assert extra == {
            f"/transformer.layers.{index}.{w}/MatMul"
            for w in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        }
    # int8-dynamic's default keeps the first layer: its four weight MatMuls are still plain fp32 MatMuls
    m = load_manifest(children["int8-dynamic"])
    assert m.extra["quantization"]["keep_fp32"] == ["embedding", "head", "first-layer"]
    nodes = {n.name: n.op_type for n in onnx.load(children["int8-dynamic"] / "model.onnx").graph.node}
    assert nodes["/transformer.layers.0.mlp.dense_4h_to_h/MatMul"] == "MatMul"
    assert nodes.get(f"/transformer.layers.{last}.mlp.dense_4h_to_h/MatMul") != "MatMul"  # quantized, renamed


def test_compare_on_text_self_is_exact(parent):
    from glm_runtime.session import open_model

    session, tok = open_model(parent)
    figures = accuracy.compare_on_text(session, session, tok, EVAL, max_windows=4, prompts=2)
    assert figures["max_logit_diff"] == 0.0 and figures["top1_agreement"] == 1.0
    assert figures["fill_agreement"] == 1.0 and figures["ppl_change"] == 0.0
    assert figures["fill_method"].startswith("glm_runtime.generate.fill_blanks")


def test_budget_miss_refuses_unless_accept_loss(parent, tmp_path, monkeypatch):
    monkeypatch.setitem(accuracy.BUDGETS, "int8-dynamic", {"top1": 1.01, "fill": 0.0, "ppl_change": 1.0})
    with pytest.raises(accuracy.BudgetError, match=r"top-1 agreement .* < 1.01.*--accept-loss"):
        quantize_onnx(parent, tmp_path / "miss", scheme="int8-dynamic", eval_text=EVAL_SHORT)
    assert not (tmp_path / "miss").exists()
    out = quantize_onnx(parent, tmp_path / "miss", scheme="int8-dynamic", accept_loss=True, eval_text=EVAL_SHORT)
    parity = load_manifest(out).parity
    assert parity["text"]["within_budget"] is False and parity["accept_loss"] is True and parity["text"]["misses"]


def test_calibration_errors(parent, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(QuantizeError, match="is empty"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=empty)
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=tmp_path / "nope.txt")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text.\n")
    with pytest.raises(QuantizeError, match="at least 256 tokens"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=short)
    with pytest.raises(QuantizeError, match="no calibration data|at least 8"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=[])
    with pytest.raises(QuantizeError, match="only used by qdq-int8"):
        quantize_onnx(parent, tmp_path / "q", scheme="int8-dynamic", calibration=short)
    assert not (tmp_path / "q").exists()


def test_calibration_feeds_must_fit_the_io_table(parent, tmp_path):
    from glm_runtime.session import open_model

    session, tok = open_model(parent)
    feeds = calibration_feeds(session, tok, accuracy.split_text(HELDOUT["en"].read_text())[0], "test")
    assert {f["past_key_values.0.key"].shape[2] > 0 for f in feeds} == {False, True}  # context and decode
    bad = [dict(f) for f in feeds]
    bad[3]["attention_mask"] = bad[3]["attention_mask"][..., :-1]
    with pytest.raises(QuantizeError, match="attention_mask covers"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=bad)
    bad = [dict(f) for f in feeds]
    bad[1]["past_key_values.1.value"] = np.zeros((1, 3, 0, 16), np.float32)  # 3 heads, the graph has 4
    with pytest.raises(QuantizeError, match="past_key_values.1.value has shape"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=bad)
    context_only = [f for f in feeds if f["past_key_values.0.key"].shape[2] == 0]
    with pytest.raises(QuantizeError, match="decode steps"):
        quantize_onnx(parent, tmp_path / "q", scheme="qdq-int8", calibration=context_only)


def test_bad_requests(parent, tmp_path):
    with pytest.raises(QuantizeError, match="unknown scheme 'int3'"):
        quantize_onnx(parent, tmp_path / "q", scheme="int3")
    with pytest.raises(QuantizeError, match="embedding Gather always stays fp32"):
        quantize_onnx(parent, tmp_path / "q", scheme="int8-dynamic", keep_fp32=("head",))
    with pytest.raises(QuantizeError, match="neither a role"):
        quantize_onnx(parent, tmp_path / "q", scheme="int8-dynamic", keep_fp32=("embedding", "head", "nosuch"))
    with pytest.raises(QuantizeError, match="--block-size must be a power of two >= 16, got 24"):
        quantize_onnx(parent, tmp_path / "q", scheme="int4-weight", block_size=24)
    for args, why in (
        ({"head_bits": 6}, "--head-bits must be 4 or 8, got 6"),
        ({"accuracy_level": 7}, "--accuracy-level must be 0..4"),
        ({"keep_fp32": ("embedding", "head"), "head_block_size": 64}, "the head is kept fp32"),
    ):
        with pytest.raises(QuantizeError, match=why):
            quantize_onnx(parent, tmp_path / "q", scheme="int8-weight", **args)
    assert not (tmp_path / "q").exists()


def test_keep_fp32_is_honoured_or_refused_for_every_scheme_and_unknown_names_are_no_role(parent, children, tmp_path):
    """fp16 writes every weight fp16, so --keep-fp32 is refused there (it was ignored and recorded as applied); an
    unknown name is refused for every scheme, naming the roles, even alone (where the embedding rule spoke first)."""
    out = tmp_path / "q"
    for keep in (("embedding", "head"), ("decoder",)):
        with pytest.raises(QuantizeError, match="--keep-fp32 does not apply to --scheme fp16.*first-layer"):
            quantize_onnx(parent, out, scheme="fp16", keep_fp32=keep)
    roles = re.escape("'decoder' is neither a role (embedding, head, first-layer, last-layer)")
    for scheme in ("int4-weight", "int8-weight", "int8-dynamic", "qdq-int8"):
        for keep in (("decoder",), ("embedding", "decoder")):
            with pytest.raises(QuantizeError, match=roles):
                quantize_onnx(parent, out, scheme=scheme, keep_fp32=keep, accept_loss=True)
    assert not out.exists()
    assert load_manifest(children["fp16"]).extra["quantization"]["keep_fp32"] == []  # nothing was kept fp32


def test_optimize_basic_keeps_parity_and_records_it(parent, tmp_path):
    from glm_export.optimize import optimize_onnx

    out = optimize_onnx(parent, tmp_path / "opt", level="basic", eval_text=EVAL_SHORT)
    m = load_manifest(out, kind="onnx")
    assert m.precision == "fp32" and m.io == load_manifest(parent).io
    assert m.parity["passed"] and m.parity["text"]["max_logit_diff"] <= 1e-3
    assert m.parent["manifest_sha256"] == sha256_file(parent / "manifest.json")
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(out / "model.onnx").graph.node)
    assert m.extra["optimization"]["level"] == "basic"


def test_optimize_refuses_contrib_ops(parent, tmp_path):
    from glm_export.optimize import OptimizeError, optimize_onnx

    with pytest.raises(OptimizeError, match="non-standard ops.*TensorRT"):
        optimize_onnx(parent, tmp_path / "opt", level="extended")
    assert not (tmp_path / "opt").exists()


def test_cli_quantize_budget_miss_is_one_line_error(parent, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from glm_export.cli import main

    monkeypatch.setitem(accuracy.BUDGETS, "int4-weight", {"top1": 1.01, "fill": 0.0, "ppl_change": 1.0})
    result = CliRunner().invoke(main, ["quantize", str(parent), "-o", str(tmp_path / "q"), "--scheme", "int4-weight"])
    assert result.exit_code == 1 and "misses its accuracy budget" in result.output
    assert not (tmp_path / "q").exists()


def test_onnx_runtimes_quantizer_advice_is_not_shown(tmp_path, caplog, capfd):
    """ONNX Runtime's quantizers log 'Please consider to run pre-processing before quantization' on the root
    logger, and the calibration session warns in C++ that logits_start is not a constant: glmx quantize shows
    neither (the graph is shape-inferred already; the input is optional on purpose)."""
    import logging

    from glm_export.quantize import quiet_quantizer

    with caplog.at_level(logging.WARNING), quiet_quantizer():
        logging.warning("Please consider to run pre-processing before quantization. Refer to example: ...")
        logging.warning("a warning of glmx's own")
    assert [r.getMessage() for r in caplog.records] == ["a warning of glmx's own"]
    assert not logging.getLogger().filters  # the filter goes with the block


def test_glmx_quantize_prints_no_warning_of_onnx_runtimes(parent, tmp_path):
    """In a process of its own (pytest's logging plugin would catch a root-logger line in-process)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from glm_runtime.cli import run; run()",
            "quantize",
            str(parent),
            "-o",
            str(tmp_path / "q"),
            "--scheme",
            "int8-dynamic",
            "--accept-loss",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "pre-processing" not in proc.stdout + proc.stderr and "WARNING" not in proc.stdout + proc.stderr
