"""runtime/session.py and runtime/kvcache.py: the session contract on ONNX Runtime and the torch reference, feed
checks (each message), manifest checks, the backend dict, and the preallocated cache."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest

from glm_runtime.iotable import io_table, past_names
from glm_runtime.kvcache import KVCache
from glm_runtime.manifest import ManifestError, _seal
from glm_runtime.session import FeedError, OnnxRuntimeSession, check_feeds, open_model, open_session
from tests.fill_fixtures import export_tiny, make_model, make_tokenizer, tiny_config

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(tok_file):
    from glm_runtime.tokenizer import load_tokenizer

    return make_model(load_tokenizer(tok_file))


@pytest.fixture(scope="module")
def onnx_dir(model, tok_file, tmp_path_factory):
    return export_tiny(model, tmp_path_factory.mktemp("export") / "onnx", tok_file)


@pytest.fixture(scope="module")
def ort(onnx_dir):
    return OnnxRuntimeSession(onnx_dir)


def _feeds(config, batch=2, seq=3, past=0, rng=np.random.default_rng(0)):  # noqa: B008 - one stream shared by every call, on purpose
    n, d = config.num_attention_heads, config.head_dim
    feeds = {
        "input_ids": rng.integers(10, 300, (batch, seq)).astype(np.int64),
        "position_ids": np.stack([np.tile(np.arange(seq), (batch, 1)), np.zeros((batch, seq), np.int64)], 1),
        "attention_mask": np.ones((batch, 1, seq, past + seq), dtype=bool),
    }
    for k, v in past_names(io_table(config)):
        feeds[k] = rng.normal(size=(batch, n, past, d)).astype(np.float32)
        feeds[v] = rng.normal(size=(batch, n, past, d)).astype(np.float32)
    return feeds


# ---------------------------------------------------------------- the contract


def test_metadata_is_the_manifest_io_table(ort):
    table = io_table(ort.config)
    assert ort.inputs == table["inputs"] and ort.outputs == table["outputs"]
    assert ort.kv_dtype == np.float32 and ort.tokenizer_path.name == "tokenizer.json"
    assert ort.device is None  # CPU: plain numpy in and out


@pytest.mark.parametrize("past", [0, 4])
def test_onnx_and_torch_sessions_agree_and_return_only_new_kv(ort, model, past):
    from glm_export.reference_session import TorchSession

    feeds = _feeds(ort.config, past=past)
    feeds["attention_mask"][1, 0, :, 1] = False  # a hidden past slot / key in row 1
    ours, ref = ort.run(feeds), TorchSession(model).run(feeds)
    n, d = ort.config.num_attention_heads, ort.config.head_dim
    assert ours["logits"].shape == (2, 3, ort.config.vocab_size)
    assert ours["present.0.key"].shape == (2, n, 3, d)  # present-is-new: only this call's 3 tokens
    assert set(ours) == set(ref) == {o["name"] for o in ort.outputs}
    for name in ours:
        assert np.abs(ours[name] - ref[name]).max() < 1e-4, name


@pytest.mark.parametrize("start", [0, 1, 2, -1, -2])
def test_logits_start_returns_the_tail_of_the_full_logits_on_both_backends(ort, model, start):
    """logits_start (optional, default 0) = Slice semantics over this call's positions; presents unchanged."""
    from glm_export.reference_session import TorchSession

    feeds = _feeds(ort.config, past=4)
    full = ort.run(feeds)
    for session in (ort, TorchSession(model)):
        part = session.run({**feeds, "logits_start": np.array([start], dtype=np.int64)})
        assert part["logits"].shape == full["logits"][:, start:].shape
        assert np.abs(part["logits"] - full["logits"][:, start:]).max() < 1e-4
        assert np.abs(part["present.1.value"] - full["present.1.value"]).max() < 1e-5


def test_torch_session_rejects_bad_precision(model):
    from glm_export.reference_session import TorchSession

    with pytest.raises(ValueError, match="precision must be one of"):
        TorchSession(model, precision="int3")


# ---------------------------------------------------------------- feed checks, each message


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda f: f.update(tokens=f.pop("input_ids")), "unknown input 'tokens'"),
        (lambda f: f.pop("past_key_values.1.value"), "missing input 'past_key_values.1.value'"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "input 'input_ids' must be int64, got int32"),
        (
            lambda f: f.update(attention_mask=f["attention_mask"].astype(np.float32)),
            "input 'attention_mask' must be bool, got float32",
        ),
        (lambda f: f.update(position_ids=f["position_ids"][:, 0]), "input 'position_ids' must have rank 3"),
        (
            lambda f: f.update(position_ids=np.zeros((2, 3, 3), np.int64)),
            "input 'position_ids' must have size 2 on axis 1",
        ),
        (lambda f: f.update(input_ids=f["input_ids"][:1]), "has batch=2 on axis 0, but another input set batch=1"),
        (
            lambda f: f.update(attention_mask=np.ones((2, 1, 3, 5), bool)),
            "input 'attention_mask' must have past_seq + seq = 0 + 3 columns, got 5",
        ),
    ],
)
def test_bad_feeds_name_the_input(ort, change, message):
    feeds = _feeds(ort.config)
    change(feeds)
    with pytest.raises(FeedError) as info:
        ort.run(feeds)
    assert message in str(info.value)


def test_feed_check_is_shared_by_the_torch_session(model):
    from glm_export.reference_session import TorchSession

    feeds = _feeds(tiny_config())
    feeds["input_ids"] = feeds["input_ids"].astype(np.int32)
    with pytest.raises(FeedError, match="input 'input_ids' must be int64"):
        TorchSession(model).run(feeds)


def test_check_feeds_accepts_ortvalues(ort):
    feeds = {k: onnxruntime.OrtValue.ortvalue_from_numpy(v) for k, v in _feeds(ort.config).items()}
    assert check_feeds(feeds, ort.inputs) == {"batch": 2, "seq": 3, "past_seq": 0, "total_seq": 3}


# ---------------------------------------------------------------- loading: manifest, backends, model folders


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_model_is_refused(onnx_dir, tmp_path):
    folder = _copy(onnx_dir, tmp_path / "m")
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        OnnxRuntimeSession(folder)


def test_manifest_io_table_must_follow_its_config(onnx_dir, tmp_path):
    folder = _copy(onnx_dir, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    data["config"]["num_attention_heads"] = 2
    _seal(folder, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match="IO table's inputs do not match its config"):
        OnnxRuntimeSession(folder)


def test_a_checkpoint_folder_is_not_an_onnx_model(model, tok_file, tmp_path):
    from glm_export.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_file=tok_file)
    with pytest.raises(ManifestError, match="holds a 'checkpoint' artifact, expected 'onnx'"):
        open_session(ckpt)


def test_backend_dict(onnx_dir):
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose one of \['onnxruntime', "):
        open_session(onnx_dir, backend="tpu")
    with pytest.raises(RuntimeError):  # an ONNX folder is no TensorRT engine (and TensorRT is absent here)
        open_session(onnx_dir, backend="tensorrt")
    with pytest.raises(ManifestError, match="records no parent checkpoint"):
        open_session(onnx_dir, backend="torch")


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is present")
def test_cuda_backend_without_cuda_says_so(onnx_dir):
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider is not available here"):
        open_session(onnx_dir, backend="onnxruntime-cuda")


@pytest.mark.gpu
def test_cuda_backend_fills_like_cpu(onnx_dir):
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    from glm_runtime.generate import fill_blanks
    from tests.fill_fixtures import PROMPTS

    cpu, tok = open_model(onnx_dir)
    gpu, _ = open_model(onnx_dir, backend="onnxruntime-cuda")
    assert gpu.device == ("cuda", 0)
    a = fill_blanks(cpu, tok, PROMPTS, max_new_tokens=8)
    b = fill_blanks(gpu, tok, PROMPTS, max_new_tokens=8)
    assert [r.tokens for r in a] == [r.tokens for r in b]


def test_open_model_pairs_session_and_tokenizer(onnx_dir):
    session, tok = open_model(onnx_dir)
    assert tok.special["MASK"] in tok.mask_ids and session.config.vocab_size >= tok.vocab_size


def test_tokenizer_larger_than_the_model_is_refused(tok_file, tmp_path):
    from glm_export.export import ExportError
    from glm_runtime.tokenizer import load_tokenizer

    small = make_model(load_tokenizer(tok_file), vocab_size=256)  # the tokenizer has 300 ids
    with pytest.raises(ExportError, match="has 300 ids.* but the model has 256 embedding rows"):
        export_tiny(small, tmp_path / "small", tok_file)  # refused where it enters, before anything is written
    assert not (tmp_path / "small").exists()


def test_tokenizer_entry_must_match_the_hashed_file(onnx_dir, tmp_path):
    folder = _copy(onnx_dir, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    data["tokenizer"]["sha256"] = "0" * 64
    _seal(folder, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match="tokenizer 'tokenizer.json' has sha256 000000000000... in its tokenizer"):
        OnnxRuntimeSession(folder)


def test_tokenizer_special_ids_must_match_the_manifest(onnx_dir, tmp_path):
    folder = _copy(onnx_dir, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    data["tokenizer"]["special_tokens"] = {"pad": 0, "eos": 0, "sop": 9, "eop": 6}
    _seal(folder, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match="special ids .* differ from those (the|its) manifest recorded"):
        open_model(folder)


def test_missing_bundled_model_is_a_clear_error(monkeypatch, tmp_path):
    import glm_runtime.session as session_module

    monkeypatch.setattr(session_module, "BUNDLED_MODEL", tmp_path / "absent")
    with pytest.raises(ManifestError, match="no model folder given and the bundled model .* is not in this install"):
        open_model()


# ---------------------------------------------------------------- the preallocated cache


def _cache(batch=2, capacity=4):
    c = tiny_config()
    return KVCache(io_table(c), batch, c.num_attention_heads, c.head_dim, capacity, np.float32)


def _present(cache, batch, seq, value):
    c = tiny_config()
    out = {}
    for k, v in cache.present:
        out[k] = np.full((batch, c.num_attention_heads, seq, c.head_dim), value, np.float32)
        out[v] = -out[k]
    return out


def test_cache_writes_in_place_at_each_rows_slots():
    cache = _cache()
    buffers = [id(a) for a in cache.feeds().values()]
    cache.append(_present(cache, 2, 3, 1.0), [3, 1])  # a padded context pass: row 1 has one real token
    cache.append(_present(cache, 2, 1, 2.0), [1, 1])
    assert [id(a) for a in cache.feeds().values()] == buffers  # no new arrays: written in place
    k = cache.keys[0]
    assert k[0, 0, :, 0].tolist() == [1, 1, 1, 2] and k[1, 0, :2, 0].tolist() == [1, 2]
    assert cache.visible.tolist() == [[True] * 4, [True, True, False, False]]
    assert cache.filled.tolist() == [4, 2]
    cache.append(_present(cache, 2, 1, 3.0), [0, 1])  # row 0 finished: unchanged, no growth needed
    assert cache.filled.tolist() == [4, 3] and cache.grown == 0 and k[1, 0, 2, 0] == 3


def test_cache_grows_geometrically_only_when_needed():
    cache = _cache(batch=1, capacity=1)
    for step in range(1, 65):
        cache.append(_present(cache, 1, 1, float(step)), [1])
    assert cache.grown == 6 and cache.capacity == 64  # 1 -> 2 -> 4 ... -> 64: amortised
    assert cache.keys[0][0, 0, :, 0].tolist() == list(range(1, 65))
    assert cache.visible.all()


def test_cache_reorder_and_truncate():
    cache = _cache(batch=3, capacity=4)
    cache.append(_present(cache, 3, 1, 0.0), [1, 1, 1])
    for b in range(3):
        cache.keys[0][b, :, 0] = b
    cache.reorder([2, 2, 0])
    assert cache.keys[0][:, 0, 0, 0].tolist() == [2, 2, 0]
    cache.append(_present(cache, 3, 2, 5.0), [2, 2, 2])
    cache.truncate([1, 1, 1])
    assert cache.filled.tolist() == [1, 1, 1] and cache.visible.sum(1).tolist() == [1, 1, 1]


def test_device_array_feeds_are_checked_like_numpy():
    """Any array with .dtype and a tuple .shape (TensorRT's DeviceArray) goes through the same checker."""

    class Device:
        def __init__(self, shape, dtype):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}]
    assert check_feeds({"x": Device((2, 3), "float32")}, inputs) == {"batch": 2}
    with pytest.raises(FeedError, match="input 'x' must be float32, got float16"):
        check_feeds({"x": Device((2, 3), "float16")}, inputs)
    with pytest.raises(FeedError, match="a feed must be a numpy array, an onnxruntime OrtValue or a device array"):
        check_feeds({"x": [[0.0] * 3] * 2}, inputs)


def test_a_session_is_a_context_manager_and_refuses_to_run_once_closed(onnx_dir):
    from glm_runtime.generate import fill_blanks

    session, tok = open_model(onnx_dir)
    with session as s:
        assert fill_blanks(s, tok, ["the quick [MASK] fox"], max_new_tokens=2)[0].spans
    assert session.closed
    with pytest.raises(ManifestError, match="this session was closed"):
        fill_blanks(session, tok, ["the quick [MASK] fox"], max_new_tokens=2)


# ---------------------------------------------------------------- the graph's precision (issue 30 B7)


def _graph(tmp_path, nodes, initializers=(), name="g.onnx"):
    """A small ModelProto with these nodes and initializers, saved (never run: only its protobuf is read)."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [], list(initializers)
    )
    path = tmp_path / name
    save(helper.make_model(graph), path)
    return path


@pytest.mark.parametrize(
    "nodes, fp16, precision, problem",
    [
        ([("MatMulNBits", {"bits": 4})], False, "int4-weight", None),
        ([("MatMulNBits", {})], False, "int4-weight", None),  # bits default to 4
        ([("MatMulNBits", {"bits": 8})], False, "int4-weight", "no MatMulNBits with bits=4"),
        ([("MatMulNBits", {"bits": 8})], False, "int8-weight", None),
        ([("MatMul", {})], False, "int8-weight", "no MatMulNBits with bits=8"),
        ([("DynamicQuantizeLinear", {}), ("MatMulInteger", {})], False, "int8-dynamic", None),
        ([("QuantizeLinear", {}), ("DequantizeLinear", {})], False, "qdq-int8", None),
        ([("DequantizeLinear", {})], False, "qdq-int8", "no QuantizeLinear and DequantizeLinear"),
        ([("MatMul", {})], True, "fp16", None),
        ([("MatMul", {})], False, "fp16", "no float16 weights"),
        ([("MatMul", {})], False, "fp32", None),
        ([("MatMul", {})], True, "fp32", "float16 weights"),
        ([("MatMulNBits", {"bits": 4})], False, "fp32", "MatMulNBits"),
        ([("MatMulInteger", {})], False, "fp32", "MatMulInteger"),
    ],
)
def test_the_graphs_ops_must_be_its_recorded_precision(tmp_path, nodes, fp16, precision, problem):
    """onnx_facts reads op types, MatMulNBits bits and float16 weights from the protobuf (onnx is not needed); it
    agrees with onnx's own parse, and precision_problem names what is missing."""
    import onnx
    from onnx import TensorProto, helper

    from glm_runtime.onnx_facts import graph_facts, precision_problem

    made = [
        helper.make_node(op, ["x"], [f"y{k}"], name=f"n{k}", domain="com.microsoft" if op == "MatMulNBits" else "", **a)
        for k, (op, a) in enumerate(nodes)
    ]
    weights = [helper.make_tensor("w", TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT, [2], [1.0, 2.0])]
    path = _graph(tmp_path, made, weights)
    facts = graph_facts(path)
    parsed = onnx.load(path)
    assert facts.ops == {n.op_type for n in parsed.graph.node}
    assert facts.float16 == any(t.data_type == TensorProto.FLOAT16 for t in parsed.graph.initializer)
    found = precision_problem(facts, precision)
    assert (found is None) if problem is None else (problem in found), found


def test_a_real_export_is_its_own_precision_and_no_other(onnx_dir):
    """The exporter's fp32 graph is fp32 to the check the session makes before ONNX Runtime loads it, and no other
    precision (tests/test_nothing_lost.py reseals a validated export's manifest and sees the session refuse it)."""
    from glm_runtime.config import GLMConfig
    from glm_runtime.manifest import load_manifest
    from glm_runtime.session import check_graph

    config = GLMConfig.from_dict(load_manifest(onnx_dir).config)
    check_graph(onnx_dir / "model.onnx", "fp32", config)
    for precision, missing in [("int8-weight", "MatMulNBits with bits=8"), ("fp16", "float16 weights")]:
        with pytest.raises(ManifestError, match=f"no {missing}, so it is not {precision} as its manifest says"):
            check_graph(onnx_dir / "model.onnx", precision, config)
