"""benchmarks/llamacpp.py without a llama.cpp build: the GPT-2 GGUF it writes has llama.cpp's tensor names and
shapes for the asked shape (read back with the gguf package), and a missing build is named with the fix. With
GLMX_LLAMACPP pointing at a build, the whole comparison runs on a tiny shape."""

from __future__ import annotations

import os

import pytest

from glmx_benchmarks.llamacpp import PeerError, find_llamacpp, write_gpt2_gguf

SHAPE = dict(layers=2, hidden=64, heads=4, vocab=512, positions=256)


def test_gguf_has_gpt2_tensors_of_the_shape(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = write_gpt2_gguf(tmp_path / "m.gguf", **SHAPE)
    reader = gguf.GGUFReader(str(path))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    h, v = SHAPE["hidden"], SHAPE["vocab"]
    assert shapes["token_embd.weight"] == (h, v)  # ggml order: [n_embd, n_vocab]
    assert shapes["blk.1.attn_qkv.weight"] == (h, 3 * h) and shapes["blk.1.ffn_down.weight"] == (4 * h, h)
    assert "output.weight" not in shapes  # tied head, as GLM's
    assert len(shapes) == 2 + 12 * SHAPE["layers"] + 2
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "gpt2"
    assert not (tmp_path / "m.gguf.partial").exists()


def test_a_missing_build_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("GLMX_LLAMACPP", raising=False)
    with pytest.raises(PeerError, match="--llamacpp DIR or set GLMX_LLAMACPP"):
        find_llamacpp(None)
    with pytest.raises(PeerError, match="build_llamacpp.sh"):
        find_llamacpp(tmp_path)


@pytest.mark.skipif(not os.environ.get("GLMX_LLAMACPP"), reason="no llama.cpp build (set GLMX_LLAMACPP)")
def test_llama_bench_runs_on_a_quantized_tiny_gguf(tmp_path):
    from glmx_benchmarks.llamacpp import llama_decode_ms, quantize_gguf

    tools = find_llamacpp(None)
    f32 = write_gpt2_gguf(tmp_path / "m.gguf", **SHAPE)
    q4 = quantize_gguf(tools, f32, tmp_path / "m-q4.gguf", "Q4_0")
    assert q4.stat().st_size < f32.stat().st_size / 3
    assert 0 < llama_decode_ms(tools, q4, past=16, threads=1, tokens=4) < 1000


@pytest.mark.skipif(not os.environ.get("GLMX_LLAMACPP"), reason="no llama.cpp build (set GLMX_LLAMACPP)")
def test_compare_reports_both_and_glmx_against_its_floor(fill_onnx, tmp_path):
    from glm_runtime.manifest import load_manifest
    from glmx_benchmarks import floor
    from glmx_benchmarks.llamacpp import compare, table

    cfg = load_manifest(fill_onnx).config
    shape = dict(
        layers=cfg["num_layers"],
        hidden=cfg["hidden_size"],
        heads=cfg["num_attention_heads"],
        vocab=cfg["vocab_size"],
        positions=cfg["max_sequence_length"],
    )
    record = compare(
        None, {"fp32": fill_onnx}, shape=shape, past=16, threads=1, rounds=1, work=tmp_path, say=lambda m: None
    )
    row = record["rows"]["fp32"]
    assert row["llama_ms"] > 0 and row["glmx_ms"] > 0 and row["glmx_over_llama"] == row["glmx_ms"] / row["llama_ms"]
    read = floor.streamed_weight_bytes(fill_onnx)["streamed_bytes"] + 2 * shape["layers"] * 16 * shape["hidden"] * 4
    assert row["glmx_read_mb"] == read / 1e6
    assert row["glmx_floor_ms"] == read / record["bandwidth"]["read_bytes_per_s"] * 1e3
    assert f"{row['glmx_over_floor']:.2f}x" in table(record)
