"""The layer-at-a-time path: lazy weight files, and the piecewise check against the whole-graph check.

Golden comparisons: glm_export.weights reads what the safetensors library reads, bit for bit; the piecewise
check (glm_export.pieces) reports the whole-graph check's figures on the same artifact; and it fails an export
whose bytes of one layer were changed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from glm_export import export as export_mod
from glm_export.compare import HELDOUT, ParityError, split_text
from glm_export.export import export_onnx
from glm_export.quantize import quantize_onnx
from glm_export.weights import WeightsError, read_safetensors
from glm_runtime.config import GLMConfig
from glm_runtime.manifest import load_manifest
from tests.fill_fixtures import make_tokenizer
from tests.random_models import random_weights_model

CFG = GLMConfig(
    name="pieces",
    num_layers=3,
    hidden_size=64,
    num_attention_heads=2,
    vocab_size=384,
    max_sequence_length=128,
    tokenizer="json",
    gelu="erf",
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
TEXT = split_text(HELDOUT["en"].read_text(encoding="utf-8"))[1][:6000]


def test_safetensors_reader_matches_the_library_bit_for_bit(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(5, 7),
        "b": torch.randn(3, 4).half(),
        "c": torch.randn(6, 2).bfloat16(),
        "d": torch.arange(10, dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "w.safetensors"))
    w = read_safetensors(tmp_path / "w.safetensors")
    assert set(w) == set(tensors) and w.shape("a") == (5, 7) and w.dtype_name("c") == "bfloat16"
    for name, t in tensors.items():
        want = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        got = w[name]
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    (tmp_path / "w.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-8])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_safetensors(tmp_path / "w.safetensors")


def test_a_nan_is_named_when_its_tensor_is_read(tmp_path):
    from safetensors.torch import save_file

    bad = torch.randn(4, 4)
    bad[1, 2] = float("nan")
    save_file({"ok": torch.randn(2), "bad": bad}, str(tmp_path / "w.safetensors"))
    w = read_safetensors(tmp_path / "w.safetensors")
    assert w["ok"].shape == (2,)  # reading one tensor does not read the others
    with pytest.raises(WeightsError, match=r"bad holds 1 NaN or inf value\(s\) of 16"):
        w["bad"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    tok = make_tokenizer(root / "tokenizer.json")
    model = random_weights_model(CFG, seed=3)
    out = {}
    for check in ("whole", "piecewise"):
        out[check] = export_onnx(
            model,
            root / f"onnx-{check}",
            tokenizer_file=root / "tokenizer.json",
            external_data=True,
            check=check,
            log=lambda m: None,
        )
    return root, model, tok, out


def _close(a: float, b: float, rel: float = 1e-3, abs_: float = 1e-6) -> bool:
    return abs(a - b) <= abs_ + rel * max(abs(a), abs(b))


def test_piecewise_export_check_reports_the_whole_checks_figures(exported):
    _, _, _, out = exported
    whole, piece = (load_manifest(out[k]).parity for k in ("whole", "piecewise"))
    assert whole["method"].startswith("whole") and piece["method"].startswith("piecewise")
    assert whole["passed"] and piece["passed"]
    for key in ("logits", "present_key", "present_value"):
        assert _close(whole["max_abs_diff"][key], piece["max_abs_diff"][key], rel=0.5, abs_=2e-6), key
    assert whole["max_abs_ref"]["logits"] == pytest.approx(piece["max_abs_ref"]["logits"], rel=1e-5)
    assert whole["top1_agreement"] == piece["top1_agreement"] == 1.0
    assert set(whole["cases"]) == set(piece["cases"])


def test_piecewise_quantize_check_reports_the_whole_checks_figures(exported):
    root, _, _, out = exported
    parity = {}
    for check in ("whole", "piecewise"):
        q = quantize_onnx(
            out["whole"],
            root / f"int4-{check}",
            scheme="int4-weight",
            check=check,
            eval_text=TEXT,
            accept_loss=True,
            log=lambda m: None,
        )
        parity[check] = load_manifest(q).parity
        assert (q / "model.onnx.data").is_file()  # a parent with external data gives a child with it
    whole, piece = parity["whole"], parity["piecewise"]
    for key in ("logits", "present_key", "present_value"):  # the same int4 bytes against the same parent
        assert _close(whole["max_abs_diff"][key], piece["max_abs_diff"][key], rel=1e-3), key
    assert whole["top1_agreement"] == pytest.approx(piece["top1_agreement"], abs=0.02)
    assert piece["text"]["fill_agreement"] is None and "not run" in piece["text"]["fill_method"]
    assert whole["text"]["top1_agreement"] == pytest.approx(piece["text"]["top1_agreement"], abs=0.05)


def test_piecewise_check_fails_an_export_whose_layer_bytes_changed(exported, tmp_path, monkeypatch):
    _, model, _, _ = exported
    original = export_mod.ExternalData.__call__

    def tampered(self, name, array):
        if name == "transformer.layers.1.mlp.dense_4h_to_h.weight.T":
            array = array * np.float32(1.05)
        return original(self, name, array)

    monkeypatch.setattr(export_mod.ExternalData, "__call__", tampered)
    with pytest.raises(ParityError, match="misses its fp32 parity budget"):
        export_onnx(model, tmp_path / "bad", external_data=True, check="piecewise", log=lambda m: None)
    assert not (tmp_path / "bad").exists()  # nothing that looks valid is left


def test_export_streams_a_checkpoint_folder_without_building_the_model(exported, tmp_path, monkeypatch):
    """A checkpoint folder is exported from its files: the whole torch model is never built (piecewise check)."""
    import glm_export.checkpoint as ck
    from glmx_benchmarks.scale import write_random_hub

    root = exported[0]
    hub = write_random_hub(
        tmp_path / "hub",
        CFG,
        dtype=np.float16,
        log=lambda m: None,
        tokenizer_file=root / "tokenizer.json",
        shard_bytes=200_000,
    )  # several shards
    assert len(list(hub.glob("*.safetensors"))) > 1
    monkeypatch.setattr(ck, "model_from_weights", lambda *a, **k: pytest.fail("the whole model was built"))
    out = export_onnx(
        hub, tmp_path / "onnx", precision="fp16", check="piecewise", external_data=True, log=lambda m: None
    )
    parity = load_manifest(out).parity
    assert parity["passed"] and parity["method"].startswith("piecewise") and parity["precision"] == "fp16"


def test_piecewise_int4_quantize_never_holds_the_whole_model(exported, tmp_path, monkeypatch):
    """The streamed int4 stage with the piecewise check reads the graph without its weights and never opens a
    session on a whole model (the default suite's structural guard; tests/test_scale_memory.py measures it)."""
    import onnx
    import onnxruntime as ort

    root, _, _, out = exported
    load, session = onnx.load, ort.InferenceSession

    def graph_only(f, *args, **kwargs):
        assert kwargs.get("load_external_data", True) is False, f"the whole model was loaded: {f}"
        return load(f, *args, **kwargs)

    def no_whole_session(model, *args, **kwargs):
        assert not (isinstance(model, (str, bytes)) and str(model).endswith("model.onnx")), f"a session on {model}"
        return session(model, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", graph_only)
    monkeypatch.setattr(onnx, "load_model", graph_only)
    monkeypatch.setattr(ort, "InferenceSession", no_whole_session)
    q = quantize_onnx(
        out["whole"],
        tmp_path / "int4",
        scheme="int4-weight",
        check="piecewise",
        eval_text=TEXT,
        accept_loss=True,
        log=lambda m: None,
    )
    assert load_manifest(q).parity["method"].startswith("piecewise")
