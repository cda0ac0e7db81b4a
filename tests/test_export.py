"""ONNX export: parity with the torch reference on GLM's cases, the IO contract, the cache, files and manifests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from glm_runtime.manifest import _seal

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from glm_export import compare as parity
from glm_export import export as export_mod
from glm_export.compare import ParityError, glm_cases
from glm_export.export import ExportError, export_onnx, graph_io, load_onnx_model, validate_export
from glm_runtime.config import get_preset
from glm_runtime.iotable import io_table
from glm_runtime.manifest import ManifestError, load_manifest, write_manifest
from tests.random_models import random_weights_model as random_model

CASES = {
    "blank_mid_context",
    "two_blanks_through_cache",
    "gmask_at_end",
    "one_pass_two_spans",
    "batch_right_padding",
    "batch_left_padding",
}


TINY = get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
ODD = TINY.replace(num_layers=3, hidden_size=96, num_attention_heads=3, name="odd")  # d = 32, not a power of 4
# name -> (config, seed, precision, extra export kwargs)
EXPORTS = {
    "tiny_s0_fp32": (TINY, 0, "fp32", {}),
    "tiny_s1_fp32": (TINY, 1, "fp32", {}),
    "odd_fp32": (ODD, 2, "fp32", {}),
    "tiny_s0_fp16": (TINY, 0, "fp16", {}),
    "odd_fp16": (ODD, 2, "fp16", {}),
    "tiny_s0_fp32_external": (TINY, 0, "fp32", {"external_data": True}),
    # erf GeLU, attention_scale > 1 (docs/glm.md 1.3) and opset 18 (Split / ReduceMax take their newer forms)
    "variant_fp32": (ODD.replace(gelu="erf", attention_scale=2.0), 3, "fp32", {"opset": 18}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported once per module (every export runs its own parity check)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, (config, seed, precision, kwargs) in EXPORTS.items():
        model = random_model(config, seed)
        folder = export_onnx(model, root / name, precision=precision, log=lambda msg: None, **kwargs)
        out[name] = (model, folder)
    return out


def feeds_for(config, precision, ids, pos, mask, past=None):
    n, d = config.num_attention_heads, config.head_dim
    dtype = np.float16 if precision == "fp16" else np.float32
    B = ids.shape[0]
    feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
    for i in range(config.num_layers):
        for j, part in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{part}"] = np.zeros((B, n, 0, d), dtype) if past is None else past[i][j]
    return feeds


# ------------------------------------------------------------------ parity with the reference


@pytest.mark.parametrize("name", ["tiny_s0_fp32", "tiny_s1_fp32", "odd_fp32", "tiny_s0_fp32_external", "variant_fp32"])
def test_fp32_matches_reference_on_glm_cases(exported, name):
    model, folder = exported[name]
    report = validate_export(folder, model, "fp32", log=lambda m: None)
    assert set(report.cases) == CASES
    for case, f in report.cases.items():
        for key in ("logits", "present_key", "present_value"):
            assert f[key] <= 1e-4, f"{name} {case} {key}: {f[key]:.3e}"
    manifest, _ = load_onnx_model(folder)
    assert manifest.parity["passed"] and set(manifest.parity["cases"]) == CASES
    assert manifest.parity["max_abs_diff"]["logits"] <= 1e-4


@pytest.mark.parametrize("name", ["tiny_s0_fp16", "odd_fp16"])
def test_fp16_within_budget_and_finite(exported, name):
    model, folder = exported[name]
    report = validate_export(folder, model, "fp16", log=lambda m: None)
    assert report.passed, report.table()
    assert all(not f["non_finite"] for f in report.cases.values())
    assert report.max_diff("logits") <= parity.TOLERANCES["fp16"].atol + 0.005 * max(
        f["ref_logits"] for f in report.cases.values()
    )
    assert report.top1_decisive_mismatches == 0
    # the budget is not vacuous: fp16 really differs from the fp32 reference
    assert report.max_diff("logits") > 1e-5


def test_one_file_serves_context_pass_and_decode_steps(exported):
    """Independent of parity.py: context pass with past 0, then decode steps with past > 0 chaining the
    present-is-new outputs, equal the reference's single training-equivalent pass (docs/glm.md 4.2)."""
    model, folder = exported["tiny_s1_fp32"]
    config = model.config
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ctx = [1, 40, 2, 41, 42, 2, 43, 5]  # [CLS] t [MASK] t t [MASK] t eos
    spans = [(2, [4, 60, 61]), (5, [4, 70])]  # (mask position, sop + tokens)
    ids = ctx + [t for _, toks in spans for t in toks]
    pos = list(range(len(ctx))) + [m for m, toks in spans for _ in toks]
    blk = [0] * len(ctx) + [k + 1 for _, toks in spans for k in range(len(toks))]
    with torch.no_grad():
        full, _ = model(torch.tensor([ids]), torch.tensor([[pos, blk]]), len(ctx))
    C = len(ctx)
    out = session.run(
        None, feeds_for(config, "fp32", np.array([ctx]), np.array([[pos[:C], blk[:C]]]), np.ones((1, 1, C, C), bool))
    )
    assert out[1].shape == (1, config.num_attention_heads, C, config.head_dim)  # present: this call's K only
    past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(config.num_layers)]
    steps = [out[0]]
    for t in range(C, len(ids)):
        P = past[0][0].shape[2]
        out = session.run(
            None,
            feeds_for(
                config,
                "fp32",
                np.array([[ids[t]]]),
                np.array([[[pos[t]], [blk[t]]]]),
                np.ones((1, 1, 1, P + 1), bool),
                past,
            ),
        )
        assert out[1].shape[2] == 1
        past = [
            (np.concatenate([k, out[1 + 2 * i]], 2), np.concatenate([v, out[2 + 2 * i]], 2))
            for i, (k, v) in enumerate(past)
        ]
        steps.append(out[0])
    err = np.abs(np.concatenate(steps, axis=1) - full.numpy()).max()
    assert err < 1e-4, f"incremental ONNX vs one reference pass: {err:.3e}"


def test_padded_cache_slots_are_masked_not_read(exported):
    """Garbage in masked cache slots changes nothing: the graph honours the mask, whatever the slot holds."""
    model, folder = exported["tiny_s0_fp32"]
    config = model.config
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    n, d, P = config.num_attention_heads, config.head_dim, 6
    past = [
        (rng.standard_normal((1, n, P, d)).astype(np.float32), rng.standard_normal((1, n, P, d)).astype(np.float32))
        for _ in range(config.num_layers)
    ]
    mask = np.array([[[[True, True, False, True, False, True, True]]]])  # slots 2 and 4 are holes
    base = session.run(None, feeds_for(config, "fp32", np.array([[9]]), np.array([[[3], [1]]]), mask, past))
    for k, v in past:
        k[:, :, [2, 4]] = 1e4
        v[:, :, [2, 4]] = -1e4
    again = session.run(None, feeds_for(config, "fp32", np.array([[9]]), np.array([[[3], [1]]]), mask, past))
    assert np.array_equal(base[0], again[0])
    assert np.isfinite(again[0]).all()


# ------------------------------------------------------------------ the IO contract and the weights


@pytest.mark.parametrize("name", ["tiny_s0_fp32", "tiny_s0_fp16", "odd_fp16"])
def test_graph_io_is_exactly_the_io_table(exported, name):
    model, folder = exported[name]
    precision = EXPORTS[name][2]
    table = io_table(model.config, precision)
    io = graph_io(onnx.load(str(folder / "model.onnx")))
    assert io == {"inputs": table["inputs"], "outputs": table["outputs"]}
    manifest, _ = load_onnx_model(folder)
    assert manifest.io == table and manifest.precision == precision
    kv = "float16" if precision == "fp16" else "float32"
    assert {e["dtype"] for e in io["outputs"][1:]} == {kv} and io["outputs"][0]["dtype"] == "float32"


@pytest.mark.parametrize("name", ["tiny_s0_fp32", "tiny_s0_fp16", "tiny_s0_fp32_external"])
def test_tied_embedding_stored_once(exported, name):
    model, folder = exported[name]
    V, h = model.config.vocab_size, model.config.hidden_size
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    shapes = [tuple(t.dims) for t in graph.initializer]
    assert shapes.count((V, h)) + shapes.count((h, V)) == 1
    users = [n.op_type for n in graph.node if "word_embeddings.weight" in n.input]
    assert sorted(users) == ["Gather", "Gemm"]  # the same initializer feeds the embedding and the head
    assert not [n for n in graph.node if n.op_type == "Transpose" and "word_embeddings.weight" in n.input]


def test_fp16_graph_is_strongly_typed_with_fp32_islands(exported):
    _, folder = exported["tiny_s0_fp16"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.onnx")))
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    by_op = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(node)
    assert all(types[n.input[0]] == FLOAT for n in by_op["LayerNormalization"])
    assert all(types[n.input[0]] == FLOAT for n in by_op["Softmax"])
    assert all(types[n.input[1]] == FLOAT for n in by_op["Where"])  # masking in fp32
    qk = [n for n in by_op["MatMul"] if "scores" in n.name]
    assert qk and all(types[n.output[0]] == FLOAT for n in qk)
    big = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert big and all(t.data_type == HALF for t in big)
    assert all(t in (FLOAT, HALF, onnx.TensorProto.INT64, onnx.TensorProto.BOOL) for t in types.values())


# ------------------------------------------------------------------ files: external data, manifest, tampering


def test_external_data_round_trip(exported):
    (model, inline), (_, external) = exported["tiny_s0_fp32"], exported["tiny_s0_fp32_external"]
    assert (external / "model.onnx.data").is_file() and not (inline / "model.onnx.data").exists()
    assert (external / "model.onnx").stat().st_size < 0.1 * (external / "model.onnx.data").stat().st_size
    manifest, path = load_onnx_model(external)
    assert manifest.extra["external_data"] == "model.onnx.data" and "model.onnx.data" in manifest.files
    feeds = feeds_for(
        model.config, "fp32", np.array([[1, 9, 2, 5]]), np.array([[[0, 1, 2, 3], [0] * 4]]), np.ones((1, 1, 4, 4), bool)
    )
    a = ort.InferenceSession(str(inline / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    full = onnx.load(str(path))  # the weights come back from the data file intact
    table = onnx.numpy_helper.to_array(next(t for t in full.graph.initializer if t.name == "word_embeddings.weight"))
    assert np.array_equal(table, model.word_embeddings.weight.detach().numpy())


def test_manifest_records_parity_versions_and_io(exported):
    _, folder = exported["odd_fp16"]
    data = json.loads((folder / "manifest.json").read_text())
    assert data["kind"] == "onnx" and data["precision"] == "fp16" and data["config"]["name"] == "odd"
    assert {"torch", "onnx", "onnxruntime"} <= set(data["versions"])
    assert data["parity"]["tolerance"]["atol"] == parity.TOLERANCES["fp16"].atol
    assert data["io"]["cache"] == "present-is-new" and data["parent"] == {}


def _copy(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def test_tampered_model_refused(exported, tmp_path):
    for name, victim in (("tiny_s0_fp32", "model.onnx"), ("tiny_s0_fp32_external", "model.onnx.data")):
        folder = _copy(exported[name][1], tmp_path / name)
        data = bytearray((folder / victim).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / victim).write_bytes(bytes(data))
        with pytest.raises(ManifestError, match=f"{victim} does not match its manifest"):
            load_onnx_model(folder)


def test_tampered_manifest_refused(exported, tmp_path):
    src = exported["tiny_s0_fp32"][1]

    def edited(tag, change):
        folder = _copy(src, tmp_path / tag)
        data = json.loads((folder / "manifest.json").read_text())
        change(data)
        _seal(folder, data)  # planted: re-sealed so the deeper check must see it
        return folder

    with pytest.raises(ManifestError, match="parity record is for precision 'fp32'"):
        load_onnx_model(edited("precision", lambda d: d.update(precision="fp16")))
    with pytest.raises(ManifestError, match="IO table does not follow"):  # the record relabelled too
        load_onnx_model(edited("relabel", lambda d: d.update(precision="fp16") or d["parity"].update(precision="fp16")))
    with pytest.raises(ManifestError, match="IO table does not follow"):
        load_onnx_model(edited("layers", lambda d: d["config"].update(num_layers=3)))
    with pytest.raises(ManifestError, match="config/precision are invalid"):
        load_onnx_model(edited("badcfg", lambda d: d["config"].update(hidden_size=65)))
    with pytest.raises(ManifestError, match="not valid JSON"):
        folder = _copy(src, tmp_path / "json")
        (folder / "manifest.json").write_text("{ not json")
        load_onnx_model(folder)
    # model.onnx swapped for another graph AND its hash updated: the graph's IO still gives it away
    folder = _copy(src, tmp_path / "swap")
    shutil.copyfile(exported["tiny_s0_fp16"][1] / "model.onnx", folder / "model.onnx")
    data = json.loads((folder / "manifest.json").read_text())
    data["files"]["model.onnx"] = export_mod.sha256_file(folder / "model.onnx")
    _seal(folder, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match="manifest says past_key_values.0.key float32"):
        load_onnx_model(folder)


# ------------------------------------------------------------------ the checks can fail


def _run_planted(folder, tmp_path, model, edit):
    """The export folder with an edited graph (hashes renewed, so only the comparison can object)."""
    dst = tmp_path / "planted"
    shutil.copytree(folder, dst)
    m = onnx.load(str(dst / "model.onnx"))
    edit(m.graph)
    onnx.save(m, str(dst / "model.onnx"))
    write_manifest(dst, load_manifest(dst, verify=False))
    return lambda: validate_export(dst, model, "fp32", log=lambda m: None)


def test_parity_catches_swapped_position_rows(exported, tmp_path):
    model, folder = exported["tiny_s0_fp32"]

    def swap(graph):  # read block ids as positions and positions as block ids
        for node in graph.node:
            if node.name == "/embed/position_row":
                node.input[1] = "const/one"
            elif node.name == "/embed/block_row":
                node.input[1] = "const/zero"

    run = _run_planted(folder, tmp_path, model, swap)
    with pytest.raises(ParityError, match=r"logits max \|diff\| \S+ > budget \S+ \(max\|ref\| ") as err:
        run()
    assert "batch_right_padding" in str(err.value) and "MISS" in str(err.value)


def test_parity_catches_wrong_output_names_and_shapes(exported, tmp_path):
    model, folder = exported["tiny_s0_fp32"]
    last = f"present.{model.config.num_layers - 1}.value"

    def rename(graph):
        for node in graph.node:
            node.output[:] = ["renamed" if o == last else o for o in node.output]
            node.input[:] = ["renamed" if i == last else i for i in node.input]
        for o in graph.output:
            if o.name == last:
                o.name = "renamed"

    with pytest.raises(
        ManifestError,
        match=rf"graph inputs/outputs differ from the manifest's IO table at "
        rf"\['{last}', 'renamed'\]",
    ):
        _run_planted(folder, tmp_path, model, rename)()

    def truncate(graph):  # present.0.key loses its last head-dim column
        for node in graph.node:
            node.output[:] = ["k_full" if o == "present.0.key" else o for o in node.output]
            node.input[:] = ["k_full" if i == "present.0.key" else i for i in node.input]
        d = model.config.head_dim
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(np.array([0, d - 1, 3], np.int64).reshape(3, 1)[i], f"planted/{i}")
                for i in range(3)
            ]
        )
        graph.node.append(
            onnx.helper.make_node(
                "Slice", ["k_full", "planted/0", "planted/1", "planted/2"], ["present.0.key"], name="planted_slice"
            )
        )

    # the graph's own shapes already disagree with the manifest: the loader refuses before any call
    with pytest.raises(ManifestError, match=r"present.0.key has size 15 on axis 3 in the graph but 16"):
        _run_planted(folder, tmp_path / "t", model, truncate)()


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(parity.TOLERANCES, "fp16", parity.Tolerance(atol=1e-9, rtol=0.0))
    with pytest.raises(ParityError, match="misses its fp16 parity budget"):
        export_onnx(random_model(TINY, 0), tmp_path / "out", precision="fp16", log=lambda m: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir()]  # no staging leftovers either


# ------------------------------------------------------------------ arguments, the CLI and checkpoints


def test_argument_errors(tmp_path, monkeypatch):
    model = random_model(TINY, 0)
    with pytest.raises(ExportError, match="precision must be one of"):
        export_onnx(model, tmp_path / "a", precision="int8")
    with pytest.raises(ExportError, match=r"opset must be in \[17, 24\]"):
        export_onnx(model, tmp_path / "a", opset=13)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        export_onnx(model, tmp_path / "exists", validate=False, log=lambda m: None)
    monkeypatch.setattr(export_mod, "PROTOBUF_LIMIT", 1000)  # pretend the tiny model is past 2 GiB
    with pytest.raises(ExportError, match=r"past protobuf.s 2 GiB limit .*\(drop --no-external-data\)"):
        export_onnx(model, tmp_path / "b", external_data=False)
    monkeypatch.setattr(export_mod, "STREAM_THRESHOLD", 1000)  # pretend the tiny model is large
    folder = export_onnx(model, tmp_path / "auto", validate=False, log=lambda m: None)
    assert (folder / "model.onnx.data").is_file()  # auto picked external data
    with pytest.raises(ExportError, match="tokenizer path .* does not exist"):
        export_onnx(model, tmp_path / "c", tokenizer_file=tmp_path / "missing.json")


def test_missing_bundled_model_named(monkeypatch, tmp_path):
    monkeypatch.setattr(export_mod, "BUNDLED_CHECKPOINT", tmp_path / "glmx-small")
    with pytest.raises(ExportError, match="bundled model .*glmx-small is not present.*pass a CHECKPOINT"):
        export_onnx(None, tmp_path / "out")


def test_cli_exports_checkpoint_folder(tmp_path):
    from click.testing import CliRunner

    from glm_export.checkpoint import save_checkpoint
    from glm_export.cli import main
    from tests.fill_fixtures import make_tokenizer

    tok = make_tokenizer(tmp_path / "tokenizer.json").files["tokenizer.json"]
    ckpt = save_checkpoint(random_model(TINY, 4), tmp_path / "ckpt", tokenizer_file=tok)
    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(out), "--precision", "fp16", "--no-validate"])
    assert result.exit_code == 0, result.output
    manifest, _ = load_onnx_model(out)
    assert manifest.parity == {"skipped": True} and manifest.precision == "fp16"
    assert manifest.parent["manifest_sha256"] == export_mod.sha256_file(ckpt / "manifest.json")
    assert manifest.tokenizer["file"] == "tokenizer.json" and (out / "tokenizer.json").read_text() == tok.read_text()
    assert manifest.tokenizer["sha256"] == export_mod.sha256_file(tok)
    again = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_bpe_pair_tokenizer_travels_to_the_export_and_is_guarded(tmp_path):
    """GPT-2 / RoBERTa vocabularies are vocab.json + merges.txt: both reach the exported folder, both are hashed,
    the runtime loads the tokenizer from that folder alone, and an edited merges.txt is refused."""
    from glm_export.checkpoint import save_checkpoint
    from glm_runtime.session import open_model
    from glm_runtime.tokenizer import load_tokenizer
    from tests.test_checkpoint import BPE_TEXT, small_gpt2_vocab

    vocab = small_gpt2_vocab(tmp_path / "vocab")
    pair = ("vocab.json", "merges.txt")
    hashes = {name: export_mod.sha256_file(vocab / name) for name in pair}
    ckpt = save_checkpoint(
        random_model(TINY.replace(tokenizer="gpt2"), 9), tmp_path / "ckpt", tokenizer_file=vocab / "vocab.json"
    )
    out = export_onnx(ckpt, tmp_path / "onnx", validate=False, log=lambda m: None)
    manifest, _ = load_onnx_model(out)
    for folder in (ckpt, out):
        assert all((folder / name).read_bytes() == (vocab / name).read_bytes() for name in pair)
    assert {name: manifest.files[name] for name in pair} == hashes and manifest.tokenizer["files"] == hashes
    assert manifest.tokenizer["file"] == "vocab.json" and manifest.tokenizer["kind"] == "gpt2"
    session, tok = open_model(out)  # the runtime's path: manifest checks, then the tokenizer from `out` alone
    assert tok.kind == "gpt2" and tok.encode(BPE_TEXT) == load_tokenizer(vocab).encode(BPE_TEXT)
    edited = _copy(out, tmp_path / "edited")
    lines = (edited / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (edited / "merges.txt").write_text("".join(lines[:-1]), encoding="utf-8")  # drop the last merge, "Ġc at"
    with pytest.raises(ManifestError, match=r"merges\.txt does not match its manifest .*modified"):
        open_model(edited)
    # a half pair given explicitly is refused before the export starts
    (tmp_path / "half").mkdir()
    shutil.copyfile(vocab / "vocab.json", tmp_path / "half" / "vocab.json")
    from glm_export.checkpoint import CheckpointError

    with pytest.raises((ExportError, CheckpointError), match=r"needs vocab\.json, merges\.txt; missing: .*merges\.txt"):
        export_onnx(ckpt, tmp_path / "onnx_half", tokenizer_file=tmp_path / "half" / "vocab.json", validate=False)
    assert not (tmp_path / "onnx_half").exists()


def test_parity_cases_cover_glm_layouts():
    """The case builders follow the spec: 2D positions, sep masks, padded batches with masked holes."""
    from glm_export.compare import run_calls
    from glm_runtime.kvcache import host_cache
    from glm_runtime.session import Closable

    class Recorder(Closable):  # a stand-in session that records the feeds the harness gives
        def __init__(self):
            cfg = TINY
            self.io, self.config, self.kv_dtype, self.feeds = io_table(cfg), cfg, np.dtype("float32"), []

        def new_cache(self, batch, capacity):
            return host_cache(self, batch, capacity)

        def run(self, feeds):
            self.feeds.append(feeds)
            B, T = feeds["input_ids"].shape
            n, d = self.config.num_attention_heads, self.config.head_dim
            return {
                "logits": np.zeros((B, T, self.config.vocab_size), np.float32),
                **{
                    f"present.{i}.{p}": np.zeros((B, n, T, d), np.float32)
                    for i in range(self.config.num_layers)
                    for p in ("key", "value")
                },
            }

    cases = {c.name: c for c in glm_cases(512)}
    assert set(cases) == CASES
    rec = Recorder()
    run_calls(rec, cases["two_blanks_through_cache"].calls)
    masks = [f["attention_mask"] for f in rec.feeds]
    assert [m.shape[-1] for m in masks] == [8, 9, 10, 11, 14, 15]  # past grows: decode on a cache
    assert rec.feeds[4]["position_ids"].tolist() == [[[5, 5, 5], [1, 2, 3]]]  # span 2 chunk: (mask pos, 1..3)
    assert masks[4][0, 0, :, 11:].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert masks[4][0, 0, :, :11].all()  # every earlier token is visible
    ctx = cases["blank_mid_context"].calls[0]
    assert ctx.block.all() and (ctx.position_ids[0, 1] == 0).all()
    rec = Recorder()
    run_calls(rec, cases["batch_right_padding"].calls)
    first = rec.feeds[0]["attention_mask"][:, 0]
    assert first.diagonal(axis1=-2, axis2=-1).all()  # every slot sees itself
    row1 = first[1]  # 5 real tokens then padding
    assert row1[0].tolist() == [True] * 5 + [False] * 5 and row1[7].tolist() == [False] * 7 + [True] + [False] * 2
    assert rec.feeds[1]["attention_mask"][1, 0, 0].tolist() == [True] * 5 + [False] * 5 + [True]  # holes masked
    assert rec.feeds[1]["position_ids"][:, :, 0].tolist() == [[2, 1], [3, 1], [6, 1]]  # sop at each row's blank


def test_the_harness_checks_every_outputs_shape():
    """A backend returning a wrong shape (here logits of 4 columns for V = 512) is refused by name."""
    from glm_export.compare import run_calls
    from glm_runtime.backend import Closable
    from glm_runtime.kvcache import host_cache

    class Wrong(Closable):  # the session defaults (no folder, no providers) with a wrong run
        io, config, kv_dtype, precision = io_table(TINY), TINY, np.dtype("float32"), "fp32"

        def new_cache(self, batch, capacity):
            return host_cache(self, batch, capacity)

        def run(self, feeds):
            B, T = feeds["input_ids"].shape
            n, d = TINY.num_attention_heads, TINY.head_dim
            return {
                "logits": np.zeros((B, T, 4), np.float32),
                **{
                    f"present.{i}.{p}": np.zeros((B, n, T, d), np.float32)
                    for i in range(TINY.num_layers)
                    for p in ("key", "value")
                },
            }

    with pytest.raises(ParityError, match=r"output 'logits' .* has shape \[1, 8, 4\], expected \[1, 8, 512\]"):
        run_calls(Wrong(), glm_cases(512)[0].calls)


def test_a_given_tokenizer_that_replaces_the_checkpoints_own_is_said_and_recorded(fill_checkpoint, tmp_path):
    """`glmx export --tokenizer OTHER` (and convert) on a checkpoint that has its own tokenizer: one line names both
    files with their sha256 prefixes, and the manifest records both hashes (it replaced it without a word)."""
    import hashlib

    from click.testing import CliRunner

    from glm_export.cli import main

    own = fill_checkpoint / "tokenizer.json"
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(json.dumps(json.loads(own.read_text()), indent=1))  # the same ids, other bytes
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (own, other)}
    assert sha[own] != sha[other]
    for command, out in (("export", tmp_path / "onnx"), ("convert", tmp_path / "ckpt")):
        args = [command, str(fill_checkpoint), "-o", str(out), "--tokenizer", str(other)]
        result = CliRunner().invoke(main, args + (["--no-validate"] if command == "export" else []))
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if "replaces the checkpoint's own" in line]
        assert len(lines) == 1, result.output
        assert str(other) in lines[0] and str(own) in lines[0], lines[0]
        assert sha[own][:12] in lines[0] and sha[other][:12] in lines[0], lines[0]
        replaced = load_manifest(out).extra["source"]["tokenizer_replaced"]
        assert replaced == {
            "checkpoint": {"file": str(own), "sha256": sha[own]},
            "given": {"file": str(other), "sha256": sha[other]},
        }
    same = CliRunner().invoke(main, ["export", str(fill_checkpoint), "-o", str(tmp_path / "same"), "--no-validate"])
    assert same.exit_code == 0 and "replaces" not in same.output
    assert "tokenizer_replaced" not in load_manifest(tmp_path / "same").extra["source"]
