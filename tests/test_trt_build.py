"""Engine building: optimization profiles, the engine manifest, and every refusal that needs no GPU.

The build itself, its parity against ONNX Runtime and the timing cache need TensorRT and a CUDA GPU: those tests
are marked gpu and skip with the reason elsewhere (no GPU was available where this file was written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from glm_export.trt_build import (
    EngineBuildError,
    _load_timing_cache,
    _network_flags,
    _save_timing_cache,
    build_engine,
    compute_profiles,
    default_timing_cache,
    engine_io,
    engine_manifest,
    resolve_limits,
    write_engine_folder,
)
from glm_runtime.config import get_preset
from glm_runtime.iotable import io_table
from glm_runtime.manifest import (
    ENGINE_FILE,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    _seal,
    load_manifest,
    sha256_file,
    staged_folder,
    write_manifest,
)
from glm_runtime.trt_session import EngineInfo, TensorRTError


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """A real exported glm-tiny fp32 folder with a tokenizer file (export's own validation skipped for speed)."""
    torch = pytest.importorskip("torch")
    from glm_export.export import export_onnx
    from glm_export.model import GLMModel

    cfg = get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("engine")
    from tests.fill_fixtures import make_tokenizer

    tok = make_tokenizer(root / "tokenizer.json").files["tokenizer.json"]  # copied verbatim by the engine stage
    return export_onnx(
        GLMModel(cfg).eval(), root / "onnx", precision="fp32", tokenizer_file=tok, validate=False, log=lambda msg: None
    )


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- profiles


def test_profiles_golden_tiny(tiny_config):
    """Worked by hand: P=128, max_batch 4, context 32, new 16 -> cache 48 slots; opt past = 8 + 16."""
    ctx, dec = compute_profiles(tiny_config, max_batch=4, max_context=32, max_new_tokens=16, opt_batch=2, opt_context=8)
    assert (ctx.name, dec.name) == ("context", "decode")
    assert ctx.dims == {"batch": (1, 2, 4), "seq": (1, 8, 32), "past_seq": (0, 0, 48), "total_seq": (1, 8, 80)}
    assert dec.dims == {"batch": (1, 2, 4), "seq": (1, 1, 1), "past_seq": (0, 24, 48), "total_seq": (1, 25, 49)}
    assert ctx.shapes["input_ids"] == ((1, 1), (2, 8), (4, 32))
    assert ctx.shapes["position_ids"] == ((1, 2, 1), (2, 2, 8), (4, 2, 32))
    assert ctx.shapes["attention_mask"] == ((1, 1, 1, 1), (2, 1, 8, 8), (4, 1, 32, 80))
    assert ctx.shapes["past_key_values.1.value"] == ((1, 4, 0, 16), (2, 4, 0, 16), (4, 4, 48, 16))
    assert dec.shapes["attention_mask"] == ((1, 1, 1, 1), (2, 1, 1, 25), (4, 1, 1, 49))
    assert dec.shapes["past_key_values.0.key"] == ((1, 4, 0, 16), (2, 4, 24, 16), (4, 4, 48, 16))


@pytest.mark.parametrize(
    "preset,kw",
    [
        ("glm-tiny", dict(max_batch=1, max_context=100, max_new_tokens=28)),
        ("glm-tiny", dict(max_batch=8, max_context=1, max_new_tokens=1, opt_batch=8)),
        ("glm-large", dict(max_batch=16, max_context=384, max_new_tokens=128, opt_batch=4, opt_context=200)),
        ("glm-10b", dict(max_batch=2, max_context=None, max_new_tokens=256)),
    ],
)
def test_profiles_are_consistent(preset, kw):
    config = get_preset(preset)
    table = engine_io(io_table(config))  # optional inputs are constants to TensorRT: no profile shapes
    profiles = compute_profiles(config, **kw)
    max_context = kw["max_context"] or config.max_sequence_length - kw["max_new_tokens"]
    for p in profiles:
        assert set(p.shapes) == {s["name"] for s in table["inputs"]}
        for spec in table["inputs"]:
            lo, opt, hi = p.shapes[spec["name"]]
            assert len(lo) == len(spec["shape"])
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (p.name, spec["name"])
            for axis, dim in enumerate(spec["shape"]):
                if isinstance(dim, int):  # fixed dims (2, heads, head_dim) are the same in min, opt and max
                    assert lo[axis] == opt[axis] == hi[axis] == dim
        for k in range(3):  # attention_mask's last dim is past + seq, for min, opt and max alike
            mask = p.shapes["attention_mask"][k]
            assert (
                mask[-1]
                == p.dims["past_seq"][k] + p.dims["seq"][k]
                == p.shapes["past_key_values.0.key"][k][2] + p.shapes["input_ids"][k][1]
            )
        assert p.dims["batch"][2] == kw["max_batch"] and p.dims["past_seq"][2] == max_context + kw["max_new_tokens"]
    ctx, dec = profiles
    assert ctx.dims["seq"][2] == max_context and ctx.dims["past_seq"][0] == 0  # the prompt pass has no past
    assert dec.dims["seq"] == (1, 1, 1)


def test_profiles_take_a_manifest_a_config_or_a_dict(tiny_config):
    kw = dict(max_batch=2, max_context=20, max_new_tokens=10)
    manifest = Manifest(kind="onnx", config=tiny_config.to_dict(), io=io_table(tiny_config, "fp16"))
    a = compute_profiles(tiny_config, **kw)
    assert compute_profiles(tiny_config.to_dict(), **kw) == a == compute_profiles(manifest, **kw)


def test_default_context_is_what_the_new_tokens_leave(tiny_config):
    limits = resolve_limits(tiny_config.to_dict(), max_batch=1, max_context=None, max_new_tokens=28)
    assert limits == {
        "max_batch": 1,
        "max_context": 100,
        "max_new_tokens": 28,
        "max_past": 128,
        "max_sequence_length": 128,
    }


@pytest.mark.parametrize(
    "kw,message",
    [
        (
            dict(max_batch=1, max_context=100, max_new_tokens=29),
            r"max_context 100 \+ max_new_tokens 29 = 129 exceeds the model's max_sequence_length 128",
        ),
        (dict(max_batch=1, max_context=None, max_new_tokens=128), r"leaves no room for a prompt.*128"),
        (dict(max_batch=0, max_context=8, max_new_tokens=8), r"max_batch must be an integer >= 1, got 0"),
        (dict(max_batch=True, max_context=8, max_new_tokens=8), r"max_batch must be an integer >= 1, got True"),
        (dict(max_batch=1, max_context=0, max_new_tokens=8), r"max_context must be an integer >= 1, got 0"),
        (dict(max_batch=1, max_context=8, max_new_tokens=-1), r"max_new_tokens must be an integer >= 1, got -1"),
        (dict(max_batch=2, max_context=8, max_new_tokens=8, opt_batch=3), r"opt_batch 3 must lie in 1..max_batch 2"),
        (
            dict(max_batch=2, max_context=8, max_new_tokens=8, opt_context=9),
            r"opt_context 9 must lie in 1..max_context 8",
        ),
    ],
)
def test_profiles_refuse_impossible_limits(tiny_config, kw, message):
    with pytest.raises(EngineBuildError, match=message):
        compute_profiles(tiny_config, **kw)


# ---------------------------------------------------------------- the engine folder and its manifest


def _engine_manifest(onnx_dir: Path, **overrides) -> Manifest:
    parent = load_manifest(onnx_dir, kind="onnx")
    profiles = compute_profiles(parent, max_batch=2, max_context=32, max_new_tokens=16)
    limits = resolve_limits(parent.config, max_batch=2, max_context=32, max_new_tokens=16)
    facts = dict(trt_version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    facts.update(overrides)
    return engine_manifest(parent, onnx_dir, profiles=profiles, limits=limits, build={"seconds": 1.0}, **facts)


def test_engine_folder_round_trip(onnx_dir, tmp_path):
    plan = bytes(range(256)) * 8  # stands in for a serialized engine: the folder logic does not look inside
    out = write_engine_folder(tmp_path / "engine", plan, onnx_dir, _engine_manifest(onnx_dir))
    m = load_manifest(out, kind="engine")
    parent = load_manifest(onnx_dir, kind="onnx")
    assert (out / ENGINE_FILE).read_bytes() == plan
    assert set(m.files) == {ENGINE_FILE, "tokenizer.json"}
    assert (out / "tokenizer.json").read_bytes() == (onnx_dir / "tokenizer.json").read_bytes()
    assert m.tokenizer == parent.tokenizer and m.tokenizer["sha256"] == m.files["tokenizer.json"]
    assert (m.precision, m.config, m.io) == (parent.precision, parent.config, engine_io(parent.io))
    assert m.parent["manifest_sha256"] == sha256_file(onnx_dir / MANIFEST_NAME)
    info = EngineInfo.from_manifest(m)
    assert (info.trt_version, info.gpu_name, info.compute_capability) == ("10.7.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert list(info.profiles) == compute_profiles(parent, max_batch=2, max_context=32, max_new_tokens=16)
    assert info.limits["max_past"] == 48
    assert not list(tmp_path.glob(".*partial"))


def test_engine_folder_is_all_or_nothing(onnx_dir, tmp_path):
    manifest = _engine_manifest(onnx_dir)
    manifest.tokenizer = dict(manifest.tokenizer, file="missing.json")
    with pytest.raises(FileNotFoundError):
        write_engine_folder(tmp_path / "engine", b"plan", onnx_dir, manifest)
    assert list(tmp_path.iterdir()) == []
    write_engine_folder(tmp_path / "engine", b"plan", onnx_dir, _engine_manifest(onnx_dir))
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_engine_folder(tmp_path / "engine", b"plan", onnx_dir, _engine_manifest(onnx_dir))


# ---------------------------------------------------------------- build_engine refusals (before any GPU work)


def test_build_refuses_a_folder_that_is_not_onnx(tmp_path):
    with staged_folder(tmp_path / "ckpt") as stage:
        (stage / "model.safetensors").write_bytes(b"weights")
        write_manifest(stage, Manifest(kind="checkpoint", config=get_preset("glm-tiny").to_dict()))
    with pytest.raises(ManifestError, match="holds a 'checkpoint' artifact, expected 'onnx'"):
        build_engine(tmp_path / "ckpt", tmp_path / "engine")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ManifestError, match="has no manifest.json"):
        build_engine(tmp_path / "plain", tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_build_refuses_a_tampered_onnx_folder(onnx_dir, tmp_path):
    folder = _copy_folder(onnx_dir, tmp_path / "onnx")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model.onnx does not match its manifest"):
        build_engine(folder, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_build_refuses_an_edited_io_table(onnx_dir, tmp_path):
    folder = _copy_folder(onnx_dir, tmp_path / "onnx")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["io"]["inputs"][0]["dtype"] = "int32"
    _seal(folder, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match="IO table does not follow from its config"):
        build_engine(folder, tmp_path / "engine")


def test_build_refuses_limits_beyond_the_model_and_existing_output(onnx_dir, tmp_path):
    with pytest.raises(EngineBuildError, match="exceeds the model's max_sequence_length 128"):
        build_engine(onnx_dir, tmp_path / "engine", max_context=120, max_new_tokens=16)
    with pytest.raises(EngineBuildError, match="max_batch must be an integer >= 1"):
        build_engine(onnx_dir, tmp_path / "engine", max_batch=0)
    with pytest.raises(EngineBuildError, match="workspace_gb must be > 0"):
        build_engine(onnx_dir, tmp_path / "engine", workspace_gb=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        build_engine(onnx_dir, tmp_path / "taken")


def test_build_without_tensorrt_says_how_to_install_it(onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # an import of tensorrt now fails, GPU machine or not
    with pytest.raises(TensorRTError, match=r"TensorRT is not installed.*pip install 'glmx\[gpu\]'.*NVIDIA GPU"):
        build_engine(onnx_dir, tmp_path / "engine", max_context=16, max_new_tokens=8)
    assert not (tmp_path / "engine").exists()


def test_cli_build_engine_reports_user_errors_in_one_line(onnx_dir, tmp_path):
    from click.testing import CliRunner

    from glm_export.cli import main

    result = CliRunner().invoke(
        main,
        ["build-engine", str(onnx_dir), "-o", str(tmp_path / "e"), "--max-context", "120", "--max-new-tokens", "16"],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: max_context 120 + max_new_tokens 16 = 136 exceeds the model's max_sequence_length 128 (its "
        "position tables and training length): lower --max-context or --max-new-tokens so that they sum to at "
        "most 128"
    ]


# ---------------------------------------------------------------- TensorRT 10 / 11 feature detection


def test_strongly_typed_flag_is_set_only_where_weak_typing_exists():
    trt10 = SimpleNamespace(
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1), BuilderFlag=SimpleNamespace(FP16=0, TF32=6)
    )
    trt11 = SimpleNamespace(
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0), BuilderFlag=SimpleNamespace(TF32=6)
    )  # FP16 / INT8 removed: always strongly typed
    later = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(), BuilderFlag=SimpleNamespace())
    assert (_network_flags(trt10), _network_flags(trt11), _network_flags(later)) == (1 << 1, 0, 0)


class _FakeTimingConfig:
    """Records what the builder config is given; a blob starting with b"other" plays another GPU's cache."""

    def __init__(self):
        self.installed = None

    def create_timing_cache(self, blob):
        config = self

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def combine(self, other, ignore_mismatch):
                assert ignore_mismatch is False
                self.data += b"+" + other.data

            def serialize(self):
                return self.data + b"+built"

        if blob.startswith(b"corrupt"):
            raise RuntimeError("bad timing cache")
        config.last = Cache(blob)
        return config.last

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = not cache.data.startswith(b"other")
        if ok:
            self.installed = cache
        return ok

    def get_timing_cache(self):
        return self.installed


@pytest.mark.parametrize(
    "old,state,saved",
    [
        (None, "new", b"+built"),
        (b"mine", "reused", b"mine+mine+built"),
        (b"other-gpu", "new (the old one came from another", b"+other-gpu+built"),
        (b"corrupt", "new (the old one came from another", None),
    ],
)
def test_timing_cache_is_reused_replaced_and_saved_atomically(tmp_path, old, state, saved):
    path = tmp_path / "cache" / "trt_timing.cache"
    if old is not None:
        path.parent.mkdir()
        path.write_bytes(old)
    config = _FakeTimingConfig()
    assert _load_timing_cache(config, path).startswith(state)
    if saved is None:  # a corrupt file on disk cannot be combined; the new cache replaces it
        _save_timing_cache(config, path)
        assert path.read_bytes() == b"+built"
    else:
        _save_timing_cache(config, path)
        assert path.read_bytes() == saved
    assert [p.name for p in path.parent.iterdir()] == ["trt_timing.cache"]  # no temp file left behind


def test_default_timing_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_timing_cache() == tmp_path / ".cache" / "glmx" / "trt_timing.cache"


# ---------------------------------------------------------------- the graph the builder would take


def test_build_refuses_a_graph_tensorrt_cannot_parse(tmp_path, tiny_config):
    pytest.importorskip("glm_export.trt_check", reason="glm_export.trt_check is not in this tree")
    from onnx import TensorProto, helper

    # dynamic int8 (ONNX Runtime's MatMulInteger) has no TensorRT parser support: refused before any build
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="layer0.qkv.matmul_int8")
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 4]),
            helper.make_tensor_value_info("b", TensorProto.UINT8, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with staged_folder(tmp_path / "onnx") as stage:
        (stage / "model.onnx").write_bytes(model.SerializeToString())
        write_manifest(
            stage,
            Manifest(
                kind="onnx", config=tiny_config.to_dict(), io=io_table(tiny_config), extra={"model_file": "model.onnx"}
            ),
        )
    with pytest.raises(EngineBuildError, match=r"cannot take.*\n  layer0.qkv.matmul_int8 \(MatMulInteger\)"):
        build_engine(tmp_path / "onnx", tmp_path / "engine", max_context=16, max_new_tokens=8)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_check_passes_the_exported_graph(tiny_model, tmp_path, precision):
    trt_check = pytest.importorskip(
        "glm_export.trt_check",
        reason="glm_export.trt_check (another engineer's "
        "module) is not in this tree yet; build_engine notes the graph as unchecked",
    )
    from glm_export.export import export_onnx

    folder = export_onnx(tiny_model, tmp_path / precision, precision=precision, validate=False, log=lambda m: None)
    assert not trt_check.check_trt(folder / "model.onnx")


# ---------------------------------------------------------------- GPU: build, parity, timing cache


def _need_tensorrt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'glmx[gpu]' on a GPU machine)")
    from glm_runtime.trt_session import gpu_identity

    try:
        gpu_identity(0)
    except TensorRTError as exc:
        pytest.skip(f"no usable CUDA GPU: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engine_end_to_end(tiny_model, tmp_path, precision):
    _need_tensorrt_gpu()
    import tensorrt

    from glm_export.export import export_onnx
    from glm_runtime.trt_session import gpu_identity

    onnx = export_onnx(tiny_model, tmp_path / "onnx", precision=precision, log=lambda m: None)
    cache = tmp_path / "timing.cache"
    out = build_engine(
        onnx, tmp_path / "engine", max_batch=2, max_context=32, max_new_tokens=16, workspace_gb=1, timing_cache=cache
    )
    m = load_manifest(out, kind="engine")
    assert m.precision == precision and m.extra["tensorrt"]["version"] == tensorrt.__version__
    name, cc = gpu_identity(0)
    assert m.extra["gpu"] == {"name": name, "compute_capability": cc}
    assert m.parity["passed"] and m.parity["max_abs_logits"] <= m.parity["tolerance"]["budget"]
    assert m.parity["case"] == {"batch": 2, "context": 8, "decode_steps": 3, "seed": 0}
    assert m.extra["build"]["timing_cache"]["state"] == "new" and cache.stat().st_size > 0
    # a second build reuses the cache it left behind
    again = build_engine(onnx, tmp_path / "engine2", max_batch=2, max_context=32, max_new_tokens=16, timing_cache=cache)
    assert load_manifest(again, kind="engine").extra["build"]["timing_cache"]["state"] == "reused"
