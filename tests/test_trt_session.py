"""The TensorRT session: what it refuses (other TensorRT / GPU, missing packages, bad feeds, calls beyond the
engine's profiles) is tested everywhere; running an engine and its device-resident KV cache needs a GPU.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from glm_export.trt_build import compute_profiles, engine_io, resolve_limits
from glm_runtime import trt_memory, trt_session
from glm_runtime.iotable import io_table
from glm_runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, _seal, staged_folder, write_manifest
from glm_runtime.session import FeedError
from glm_runtime.trt_session import (
    ENGINE_FILE,
    DeviceArray,
    EngineInfo,
    Profile,
    TensorRTError,
    TensorRTSession,
    check_engine_compatibility,
    feed_dims,
    select_profile,
)

# A stand-in engine's parity record: one case within its fp32 tolerance (loaders re-judge a record's own figures)
_CASE = {"logits": 1e-5, "present_key": 1e-6, "present_value": 1e-6, "ref_logits": 10.0, "ref_present": 5.0}
STAND_IN_PARITY = {
    "stage": "build-engine",
    "passed": True,
    "failures": [],
    "note": "stand-in record",
    "tolerance": {"atol": 1e-4, "rtol": 3e-5},
    "cases": {
        "blank_mid_context": dict(
            _CASE,
            allowed_logits=1e-4 + 3e-5 * 10.0,
            allowed_present_key=1e-4 + 3e-5 * 5.0,
            allowed_present_value=1e-4 + 3e-5 * 5.0,
            non_finite=[],
            calls=1,
        )
    },
    "top1_decisive_mismatches": 0,
}
BUILT_ON = {"trt_version": "10.7.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _engine_folder(path, config, **facts):
    """An engine folder as build_engine writes it, with stand-in engine bytes (nothing here deserializes it)."""
    facts = {**BUILT_ON, **facts}
    limits = resolve_limits(config.to_dict(), max_batch=4, max_context=32, max_new_tokens=16)
    profiles = compute_profiles(config, max_batch=4, max_context=32, max_new_tokens=16)
    with staged_folder(path) as stage:
        (stage / ENGINE_FILE).write_bytes(b"not a real engine")
        write_manifest(
            stage,
            Manifest(
                kind="engine",
                config=config.to_dict(),
                io=engine_io(io_table(config)),
                parity=dict(STAND_IN_PARITY),
                extra={
                    "tensorrt": {"version": facts["trt_version"]},
                    "gpu": {"name": facts["gpu_name"], "compute_capability": facts["compute_capability"]},
                    "profiles": [p.to_dict() for p in profiles],
                    "limits": limits,
                },
            ),
        )
    return path


@pytest.fixture
def engine_dir(tmp_path, tiny_config):
    return _engine_folder(tmp_path / "engine", tiny_config)


def _pretend(monkeypatch, trt_version="10.7.0", gpu=("NVIDIA H100 80GB HBM3", "9.0")):
    """This machine's TensorRT and GPU, as the session sees them (to reach the checks without either)."""
    monkeypatch.setattr(trt_session, "import_tensorrt", lambda: SimpleNamespace(__version__=trt_version))
    monkeypatch.setattr(trt_session, "gpu_identity", lambda device=0: gpu)


def test_importing_the_module_imports_no_gpu_stack():
    code = (
        "import sys, glm_runtime.trt_session, glm_runtime.session; "
        "print(sorted(m for m in ('tensorrt', 'torch', 'cuda', 'onnxruntime', 'glm_export') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- refusals before any GPU work


def test_missing_tensorrt_and_cuda_python_are_named_with_the_fix(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(
        TensorRTError,
        match=r"TensorRT is not installed.*pip install 'glmx\[gpu\]' on a machine "
        r"with an NVIDIA GPU",
    ):
        TensorRTSession(engine_dir)
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(TensorRTError, match=r"cuda-python is not installed.*glmx\[gpu\]"):
        trt_session.import_cudart()


def test_engine_from_another_tensorrt_version_is_refused(engine_dir, monkeypatch):
    _pretend(monkeypatch, trt_version="10.9.0")
    with pytest.raises(
        TensorRTError,
        match=r"built by TensorRT 10.7.0 and this machine has TensorRT 10.9.0.*"
        r"Rebuild it on this machine with glmx build-engine",
    ):
        TensorRTSession(engine_dir)


def test_engine_for_another_gpu_is_refused(engine_dir, monkeypatch):
    _pretend(monkeypatch, gpu=("NVIDIA A100-SXM4-80GB", "8.0"))
    with pytest.raises(
        TensorRTError,
        match=r"built for compute capability 9.0 \(NVIDIA H100 80GB HBM3\) and this "
        r"GPU is 8.0 \(NVIDIA A100-SXM4-80GB\)",
    ):
        TensorRTSession(engine_dir)
    _pretend(monkeypatch, gpu=("NVIDIA H100 PCIe", "9.0"))
    with pytest.raises(
        TensorRTError,
        match=r"built on a NVIDIA H100 80GB HBM3 and this GPU is a NVIDIA H100 PCIe "
        r"\(same compute capability: pass strict_gpu=False",
    ):
        TensorRTSession(engine_dir)


def test_every_reason_is_given_and_strict_gpu_only_relaxes_the_name(engine_dir):
    from glm_runtime.manifest import load_manifest

    info = EngineInfo.from_manifest(load_manifest(engine_dir, kind="engine"))
    with pytest.raises(TensorRTError) as exc:
        check_engine_compatibility(info, "11.0.0", "NVIDIA L4", "8.9")
    assert "TensorRT 11.0.0" in str(exc.value) and "this GPU is 8.9 (NVIDIA L4)" in str(exc.value)
    check_engine_compatibility(info, "10.7.0", "NVIDIA H100 PCIe", "9.0", strict_gpu=False)  # accepted
    with pytest.raises(TensorRTError, match="compute capability"):
        check_engine_compatibility(info, "10.7.0", "NVIDIA H100 PCIe", "8.0", strict_gpu=False)


def test_a_matching_engine_goes_on_to_the_gpu(engine_dir, monkeypatch):
    _pretend(monkeypatch)
    monkeypatch.setitem(sys.modules, "cuda", None)  # past the checks, the session's first GPU step is CUDA
    with pytest.raises(TensorRTError, match="cuda-python is not installed"):
        TensorRTSession(engine_dir)


def test_engine_folders_are_checked_before_tensorrt(engine_dir, tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (engine_dir / ENGINE_FILE).write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="model.engine does not match its manifest"):
        TensorRTSession(engine_dir)
    with staged_folder(tmp_path / "onnx") as stage:
        (stage / "model.onnx").write_bytes(b"graph")
        write_manifest(stage, Manifest(kind="onnx", config=tiny_config.to_dict(), io=io_table(tiny_config)))
    with pytest.raises(ManifestError, match="holds a 'onnx' artifact, expected 'engine'"):
        TensorRTSession(tmp_path / "onnx")
    bare = _engine_folder(tmp_path / "bare", tiny_config)
    data = json.loads((bare / MANIFEST_NAME).read_text())
    del data["extra"]["gpu"]
    _seal(bare, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(ManifestError, match=r"engine manifest lacks 'gpu'.*rebuild it with glmx build-engine"):
        TensorRTSession(bare)


def test_open_session_reaches_the_tensorrt_backend(engine_dir, monkeypatch):
    from glm_runtime.session import open_session

    _pretend(monkeypatch, trt_version="10.8.0")
    with pytest.raises(TensorRTError, match="built by TensorRT 10.7.0"):
        open_session(engine_dir, backend="tensorrt")


# ---------------------------------------------------------------- profiles and feeds (pure python)


def test_profile_round_trips_through_the_manifest_json(tiny_config):
    for p in compute_profiles(tiny_config, max_batch=2, max_context=16, max_new_tokens=8):
        assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_calls_go_to_the_profile_their_shape_fits(tiny_config):
    profiles = compute_profiles(tiny_config, max_batch=4, max_context=32, max_new_tokens=16)  # cache 48 slots
    assert select_profile(profiles, {"batch": 4, "seq": 1, "past_seq": 48, "total_seq": 49}) == 1  # decode
    assert select_profile(profiles, {"batch": 1, "seq": 1, "past_seq": 0, "total_seq": 1}) == 1
    assert select_profile(profiles, {"batch": 2, "seq": 32, "past_seq": 0, "total_seq": 32}) == 0  # prompt
    assert select_profile(profiles, {"batch": 2, "seq": 3, "past_seq": 40, "total_seq": 43}) == 0  # span chunk
    with pytest.raises(TensorRTError, match=r"decode profile \(batch=5 not in 1..4\).*--max-batch"):
        select_profile(profiles, {"batch": 5, "seq": 1, "past_seq": 10, "total_seq": 11})
    with pytest.raises(TensorRTError, match=r"context profile \(seq=33 not in 1..32\).*--max-context"):
        select_profile(profiles, {"batch": 1, "seq": 33, "past_seq": 0, "total_seq": 33})
    with pytest.raises(TensorRTError, match=r"past_seq=49 not in 0..48; total_seq=50 not in 1..49"):
        select_profile(profiles, {"batch": 1, "seq": 1, "past_seq": 49, "total_seq": 50})


def _feeds(config, batch=2, seq=3, past=5, kv=np.float32):
    n, d = config.num_attention_heads, config.head_dim
    feeds = {
        "input_ids": np.zeros((batch, seq), np.int64),
        "position_ids": np.zeros((batch, 2, seq), np.int64),
        "attention_mask": np.ones((batch, 1, seq, past + seq), bool),
    }
    for i in range(config.num_layers):
        for part in ("key", "value"):  # the cache as the device cache hands it over: pointers, not arrays
            feeds[f"past_key_values.{i}.{part}"] = DeviceArray(None, 0, (batch, n, past, d), kv)
    return feeds


def test_feeds_are_checked_by_the_shared_checker_even_on_the_device(tiny_config):
    io = io_table(tiny_config)
    assert feed_dims(io, _feeds(tiny_config)) == {"batch": 2, "seq": 3, "past_seq": 5, "total_seq": 8}
    with pytest.raises(FeedError, match="'past_key_values.0.key' must be float32, got float16"):
        feed_dims(io, _feeds(tiny_config, kv=np.float16))
    bad = _feeds(tiny_config)
    bad["attention_mask"] = np.ones((2, 1, 3, 7), bool)
    with pytest.raises(FeedError, match="past_seq \\+ seq = 5 \\+ 3 columns, got 7"):
        feed_dims(io, bad)
    bad = _feeds(tiny_config)
    bad["past_key_values.1.value"] = DeviceArray(None, 0, (3, 4, 5, 16), np.float32)
    with pytest.raises(FeedError, match="has batch=3 on axis 0, but another input set batch=2"):
        feed_dims(io, bad)


def test_outputs_of_an_earlier_run_cannot_be_read_after_the_next(tiny_config):
    session = SimpleNamespace(_epoch=1)
    out = DeviceArray(None, 1234, (1, 4, 1, 16), np.float32, owner=session, epoch=1)
    assert out.ptr == 1234 and out.nbytes == 256
    session._epoch = 2
    with pytest.raises(TensorRTError, match="overwritten by a later run"):
        out.ptr  # noqa: B018 - reading the property is what raises


# ---------------------------------------------------------------- GPU: a real engine against ONNX Runtime


def _need_tensorrt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'glmx[gpu]' on a GPU machine)")
    try:
        trt_session.gpu_identity(0)
    except TensorRTError as exc:
        pytest.skip(f"no usable CUDA GPU: {exc}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(onnx folder, engine folder) of glm-tiny fp32, built on this GPU."""
    _need_tensorrt_gpu()
    torch = pytest.importorskip("torch")
    from glm_export.export import export_onnx
    from glm_export.model import GLMModel
    from glm_export.trt_build import build_engine
    from glm_runtime.config import get_preset

    torch.manual_seed(0)
    model = GLMModel(get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)).eval()
    root = tmp_path_factory.mktemp("trt")
    onnx = export_onnx(model, root / "onnx", precision="fp32", log=lambda m: None)
    engine = build_engine(
        onnx, root / "engine", max_batch=4, max_context=32, max_new_tokens=16, timing_cache=root / "timing.cache"
    )
    return onnx, engine


@pytest.mark.gpu
def test_engine_matches_onnx_runtime_through_the_device_cache(built):
    from glm_export.compare import TOLERANCES
    from glm_runtime import steps
    from glm_runtime.session import open_session

    onnx, engine = built
    ref, trt = open_session(onnx, "onnxruntime"), open_session(engine, "tensorrt")
    assert trt.inputs == [e for e in ref.inputs if "default" not in e]  # logits_start is a constant to TensorRT
    assert trt.outputs == ref.outputs
    rng = np.random.default_rng(1)
    contexts = [rng.integers(8, 500, size=n).tolist() for n in (9, 5, 12)]  # ragged, right-padded
    ref_cache, trt_cache = ref.new_cache(3, 14), trt.new_cache(3, 14)  # 14 < needed: both must grow
    want = steps.context_pass(ref, ref_cache, contexts, pad_id=0)
    got = steps.context_pass(trt, trt_cache, contexts, pad_id=0)
    budget = TOLERANCES["fp32"].allowed(float(np.abs(want).max()))
    assert np.abs(got - want).max() <= budget
    tokens = want.argmax(-1)
    for t in range(12):  # greedy decode of one blank per row, at the rows' last context position
        positions = np.array([[[len(c) - 1], [t + 1]] for c in contexts], dtype=np.int64)
        live = [True, t < 6, True]  # row 1 finishes early: its cache must stay untouched
        want = steps.decode_step(ref, ref_cache, tokens, positions, live)
        got = steps.decode_step(trt, trt_cache, tokens, positions, live)
        assert np.abs(got - want).max() <= TOLERANCES["fp32"].allowed(float(np.abs(want).max())), t
        tokens = want.argmax(-1)
    assert trt_cache.capacity >= ref_cache.filled.max() and trt_cache.grown >= 1
    np.testing.assert_array_equal(trt_cache.filled, ref_cache.filled)
    np.testing.assert_array_equal(
        trt_cache.visible[:, : ref_cache.capacity], ref_cache.visible[:, : trt_cache.capacity]
    )
    host = trt_cache.to_host()
    used = int(ref_cache.filled.max())
    for name, value in ref_cache.feeds().items():
        for b, f in enumerate(ref_cache.filled):
            np.testing.assert_allclose(host[name][b, :, :f], value[b, :, :f], atol=1e-4)
    # beam search reorders rows on the device exactly as the host cache does
    ref_cache.reorder([2, 2, 0])
    trt_cache.reorder([2, 2, 0])
    host = trt_cache.to_host()
    for name, value in ref_cache.feeds().items():
        np.testing.assert_allclose(host[name][:, :, :used], value[:, :, :used], atol=1e-4)
    trt_cache.close()
    trt.close()


@pytest.mark.gpu
def test_run_returns_host_arrays_when_asked_and_refuses_calls_beyond_the_profiles(built):
    from glm_runtime.session import open_session

    onnx, engine = built
    ref, trt = open_session(onnx, "onnxruntime"), open_session(engine, "tensorrt")
    c = trt.config
    feeds = {
        "input_ids": np.arange(1, 7, dtype=np.int64)[None],
        "position_ids": np.zeros((1, 2, 6), np.int64),
        "attention_mask": np.ones((1, 1, 6, 6), bool),
    }
    feeds.update(
        {
            e["name"]: np.zeros((1, c.num_attention_heads, 0, c.head_dim), np.float32)
            for e in trt.inputs
            if e["name"].startswith("past_key_values.")
        }
    )
    want, got = ref.run(feeds), trt.run(feeds, host_outputs=True)
    assert all(isinstance(v, np.ndarray) for v in got.values())
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, err_msg=name)
    device = trt.run(feeds)
    assert isinstance(device["present.0.key"], DeviceArray) and isinstance(device["logits"], np.ndarray)
    np.testing.assert_allclose(np.asarray(device["present.0.key"]), want["present.0.key"], atol=1e-4)
    too_long = {
        **feeds,
        "input_ids": np.zeros((1, 33), np.int64),
        "position_ids": np.zeros((1, 2, 33), np.int64),
        "attention_mask": np.ones((1, 1, 33, 33), bool),
    }
    with pytest.raises(TensorRTError, match="seq=33 not in 1..32.*--max-context"):
        trt.run(too_long)
    trt.close()


@pytest.mark.gpu
def test_a_real_engine_from_another_tensorrt_version_is_refused(built, tmp_path):
    import shutil

    _, engine = built
    copy = shutil.copytree(engine, tmp_path / "engine")
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["extra"]["tensorrt"]["version"] = "9.0.0"  # the manifest is not hashed into itself: an edit is possible
    _seal(copy, data)  # planted: re-sealed so the deeper check must see it
    with pytest.raises(TensorRTError, match="built by TensorRT 9.0.0"):
        TensorRTSession(copy)


# ---------------------------------------------------------------- CPU: the session's own logic on a stand-in
# cuda-python and TensorRT replaced by host memory and ONNX Runtime. This proves glmx's part (binding, scratch
# buffers, the strided slot writes of the device cache, growth, beam reorders, profile choice) exactly, with
# every "device" access bounds-checked; it proves nothing about TensorRT itself (the gpu tests above do that).


class _HostCudart:
    """cuda-python's runtime calls over host memory: a "device pointer" is the address of a numpy block."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}

    def _device(self, ptr: int, nbytes: int) -> None:  # [ptr, ptr + nbytes) must lie inside one live block
        assert any(p <= ptr and ptr + nbytes <= p + b.nbytes for p, b in self.blocks.items()), (ptr, nbytes)

    def cudaSetDevice(self, device):
        return (0,)

    def cudaStreamCreate(self):
        return (0, 7)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return (0, SimpleNamespace(name=b"Host stand-in\x00\x00", major=0, minor=0))

    def cudaMalloc(self, nbytes):
        block = np.full(nbytes, 0xFF, np.uint8)  # garbage, as real device memory would be
        self.blocks[block.ctypes.data] = block
        return (0, block.ctypes.data)

    def cudaFree(self, ptr):
        del self.blocks[ptr]  # a double free or a foreign pointer raises KeyError
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        self._device(ptr, nbytes)
        ctypes.memset(ptr, value, nbytes)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height):
            if kind != 1:
                self._device(src + r * spitch, width)
            if kind != 2:
                self._device(dst + r * dpitch, width)
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        return self.cudaMemcpy2DAsync(dst, nbytes, src, nbytes, nbytes, 1, kind, stream)


class _HostTensorRT:
    """The TensorRT calls the session makes; the "engine" is a JSON plan naming an ONNX file and the profiles."""

    __version__ = "10.7.0"
    TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, cudart: _HostCudart):
        self.cudart = cudart
        outer = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return _HostEngine(json.loads(bytes(plan)), outer.cudart)

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


_ORT_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class _HostEngine:
    def __init__(self, plan, cudart):
        import onnxruntime as ort

        self.ort = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profiles = [Profile.from_dict(p) for p in plan["profiles"]]
        self.cudart = cudart
        self.io = {
            v.name: (mode, _ORT_NUMPY[v.type], v.shape)
            for mode, vs in (("input", self.ort.get_inputs()), ("output", self.ort.get_outputs()))
            for v in vs
        }
        self.num_io_tensors, self.num_optimization_profiles = len(self.io), len(self.profiles)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def create_execution_context(self):
        return _HostContext(self)


class _HostContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):  # as TensorRT: refuse a shape outside the active profile
        lo, _, hi = self.engine.profiles[self.profile].shapes[name]
        self.shapes[name] = tuple(shape)
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        batch, seq = self.shapes["input_ids"]
        # logits_start is a constant 0 to TensorRT, so logits cover every position: logits_seq = seq
        return [{"batch": batch, "seq": seq, "logits_seq": seq}.get(d, d) for d in self.engine.io[name][2]]

    def execute_async_v3(self, stream):
        feeds = {}
        for name, (mode, dtype, _) in self.engine.io.items():
            if mode == "input":
                shape, dt = self.shapes[name], np.dtype(dtype)
                nbytes = int(np.prod(shape)) * dt.itemsize
                self.engine.cudart._device(self.addresses[name], nbytes)
                raw = (ctypes.c_uint8 * nbytes).from_address(self.addresses[name])
                feeds[name] = np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        names = [o.name for o in self.engine.ort.get_outputs()]
        for name, value in zip(names, self.engine.ort.run(names, feeds)):
            assert list(value.shape) == self.get_tensor_shape(name)
            self.engine.cudart._device(self.addresses[name], value.nbytes)
            ctypes.memmove(self.addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)
        return True


@pytest.fixture
def stand_in(tiny_model, tmp_path, monkeypatch):
    """(ONNX folder, engine folder whose "plan" runs on the stand-in, the stand-in cudart)."""
    from glm_export.export import export_onnx
    from glm_export.trt_build import engine_manifest, write_engine_folder
    from glm_runtime.manifest import load_manifest

    onnx = export_onnx(tiny_model, tmp_path / "onnx", precision="fp32", validate=False, log=lambda m: None)
    parent = load_manifest(onnx, kind="onnx")
    profiles = compute_profiles(parent, max_batch=4, max_context=32, max_new_tokens=16)
    limits = resolve_limits(parent.config, max_batch=4, max_context=32, max_new_tokens=16)
    plan = json.dumps({"onnx": str(onnx / "model.onnx"), "profiles": [p.to_dict() for p in profiles]}).encode()
    manifest = engine_manifest(
        parent,
        onnx,
        trt_version="10.7.0",
        gpu_name="Host stand-in",
        compute_capability="0.0",
        profiles=profiles,
        limits=limits,
        build={},
    )
    manifest.parity = dict(STAND_IN_PARITY)
    engine = write_engine_folder(tmp_path / "engine", plan, onnx, manifest)
    cudart = _HostCudart()
    monkeypatch.setattr(trt_memory, "import_cudart", lambda: cudart)  # what Cuda (runtime/trt_memory.py) calls
    monkeypatch.setattr(trt_session, "import_tensorrt", lambda: _HostTensorRT(cudart))
    return onnx, engine, cudart


def test_session_and_device_cache_logic_on_the_stand_in(stand_in):
    from glm_runtime import steps
    from glm_runtime.session import open_session

    onnx, engine, cudart = stand_in
    ref, trt = open_session(onnx, "onnxruntime"), open_session(engine, "tensorrt")
    rng = np.random.default_rng(1)
    contexts = [rng.integers(8, 500, size=n).tolist() for n in (9, 5, 12)]  # ragged, right-padded
    ref_cache, trt_cache = ref.new_cache(3, 14), trt.new_cache(3, 14)
    np.testing.assert_array_equal(
        steps.context_pass(trt, trt_cache, contexts, 0), steps.context_pass(ref, ref_cache, contexts, 0)
    )
    tokens = np.zeros(3, np.int64)
    for t in range(14):  # row 1 finishes early and must keep its cache; rows grow the cache past 14 slots
        positions = np.array([[[len(c) - 1], [t + 1]] for c in contexts], dtype=np.int64)
        live = [True, t < 6, True]
        want = steps.decode_step(ref, ref_cache, tokens, positions, live)
        # same graph, same numbers; only the cache widths differ once the host cache outgrows 48 slots
        np.testing.assert_allclose(steps.decode_step(trt, trt_cache, tokens, positions, live), want, atol=1e-5)
        tokens = want.argmax(-1)
        if t == 8:  # a beam-search reorder halfway, then an uneven chunk (prefill_span) on every row
            ref_cache.reorder([2, 0, 0])
            trt_cache.reorder([2, 0, 0])
            np.testing.assert_array_equal(
                steps.prefill_span(trt, trt_cache, [4, 9, 10], 3), steps.prefill_span(ref, ref_cache, [4, 9, 10], 3)
            )
    # both grew twice (14 -> 28 -> ...): the host cache to 56, the device cache only to the engine's 48
    assert (trt_cache.grown, ref_cache.grown, trt_cache.capacity, ref_cache.capacity) == (2, 2, 48, 56)
    assert int(ref_cache.filled.max()) <= 48 and not ref_cache.visible[:, 48:].any()
    np.testing.assert_array_equal(trt_cache.visible, ref_cache.visible[:, :48])
    host = trt_cache.to_host()
    for name, value in ref_cache.feeds().items():
        np.testing.assert_array_equal(host[name], value[:, :, :48])
    with pytest.raises(TensorRTError, match="needs 49 slots but the engine was built for at most 48"):
        trt_cache.reserve(49)
    trt_cache.close()
    trt.close()
    assert cudart.blocks == {}  # every device block was freed exactly once


def test_outputs_stay_on_the_device_and_calls_outside_the_profiles_are_refused(stand_in):
    from glm_runtime.session import open_session

    _, engine, _ = stand_in
    trt = open_session(engine, "tensorrt")
    c = trt.config
    empty = {
        e["name"]: np.zeros((1, c.num_attention_heads, 0, c.head_dim), np.float32)
        for e in trt.inputs
        if e["name"].startswith("past_key_values.")
    }
    feeds = {
        "input_ids": np.arange(1, 7, dtype=np.int64)[None],
        "position_ids": np.zeros((1, 2, 6), np.int64),
        "attention_mask": np.ones((1, 1, 6, 6), bool),
        **empty,
    }
    first = trt.run(feeds)
    assert isinstance(first["present.1.value"], DeviceArray) and isinstance(first["logits"], np.ndarray)
    host = trt.run(feeds, host_outputs=True)
    assert isinstance(host["present.1.value"], np.ndarray)
    with pytest.raises(TensorRTError, match="overwritten by a later run"):
        np.asarray(first["present.1.value"])
    long = {
        **feeds,
        "input_ids": np.zeros((1, 33), np.int64),
        "position_ids": np.zeros((1, 2, 33), np.int64),
        "attention_mask": np.ones((1, 1, 33, 33), bool),
    }
    with pytest.raises(TensorRTError, match=r"seq=33 not in 1..32.*--max-context"):
        trt.run(long)
    trt.close()


def test_build_parity_figures_on_the_stand_in(stand_in):
    from glm_export.trt_build import measure_parity

    onnx, engine, _ = stand_in
    session = TensorRTSession(engine)
    from glm_runtime.manifest import load_manifest

    result = measure_parity(session, onnx, load_manifest(engine).extra["limits"]).to_dict()
    # the stand-in runs ONNX Runtime on a capacity-sized device cache: only summation order differs
    assert result["passed"] and result["max_abs_diff"]["logits"] <= 1e-5 and result["top1_agreement"] == 1.0
    assert {"blank_mid_context", "gmask_at_end"} <= set(result["cases"]) and result["tolerance"]["atol"] == 1e-4
    assert result["stage"] == "build-engine" and "TensorRTSession" in result["candidate"]
    session.close()


def test_cloze_scoring_runs_on_an_engine_in_one_call_or_in_single_token_steps(stand_in, tmp_path, monkeypatch):
    """The span call fits the engine's context profile (past 0..max_past); an engine whose profiles would not
    take it gets the span one token per call. Both give ONNX Runtime's scores."""
    from glm_runtime import cloze, score
    from glm_runtime.session import open_session
    from tests.fill_fixtures import make_tokenizer

    onnx, engine, _ = stand_in
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    trt, ref = open_session(engine, "tensorrt"), open_session(onnx, "onnxruntime")
    assert cloze._takes_chunks(trt, 4, 3, 8) and not cloze._takes_chunks(trt, 4, 3, 49)  # past beyond max_past
    prompts = ["the quick [MASK] fox", "a stitch in [MASK] saves nine"]
    candidates = [[" brown", " lazy dog"], [" time", " the nick of time"]]
    want = score.score_candidates(ref, tok, prompts, candidates)
    one_call = score.score_candidates(trt, tok, prompts, candidates)
    monkeypatch.setattr(cloze, "_takes_chunks", lambda *a: False)
    stepwise = score.score_candidates(trt, tok, prompts, candidates)
    for a, b, w in zip(one_call, stepwise, want):
        assert [c.total for c in a] == pytest.approx([c.total for c in w], abs=1e-4)
        assert [c.total for c in b] == pytest.approx([c.total for c in w], abs=1e-4)
    trt.close()


def test_the_serving_engine_runs_on_an_engine_within_its_profiles(stand_in, tmp_path):
    """runtime/engine.py on the TensorRT session (device cache, every row fed): staggered requests give ONNX
    Runtime's one-by-one tokens; more rows than the profile's batch, or a request past its max past, are refused."""
    from glm_runtime.engine import Engine, EngineError
    from glm_runtime.generate import fill_blanks
    from glm_runtime.requests import FillRequest
    from glm_runtime.sampling import GenerationError
    from glm_runtime.session import open_session
    from tests.fill_fixtures import make_tokenizer

    onnx, engine, _ = stand_in
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    trt, ref = open_session(engine, "tensorrt"), open_session(onnx, "onnxruntime")
    with pytest.raises(EngineError, match="max batch 4"):
        Engine(trt, tok, rows=5)
    served = Engine(trt, tok, rows=3)
    assert not served.cache.sliceable
    prompts = [
        "the quick [MASK] fox",
        "a stitch [MASK] nine",
        "all [MASK] is [MASK] gold",
        "where there [MASK]",
        "[MASK] over the lazy dog",
    ]
    requests = []
    for step in range(200):
        if step % 2 == 0 and len(requests) < len(prompts):
            requests.append(served.submit(FillRequest.make(prompts[len(requests)], max_new_tokens=4)))
        if not served.has_work() and len(requests) == len(prompts):
            break
        served.step()
    for prompt, request in zip(prompts, requests):
        (alone,) = fill_blanks(ref, tok, [prompt], max_new_tokens=4)
        assert request.result.tokens == alone.tokens
    with pytest.raises(GenerationError, match="TensorRT engine was built for at most 48"):
        served.submit(
            FillRequest.make("the quick brown fox jumps over the lazy dog " * 3 + "[MASK]", max_new_tokens=16)
        )
    trt.close()
