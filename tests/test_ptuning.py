"""P-tuning v2 fine-tunes of ChatGLM-6B (chatglm_v1_spec.md 8) through glmx's stages, judged against the independent
numpy oracle (tests/oracle_chatglm.py: forward(prefix=...), prefix_from_ptuning): a checkpoint made here in the
official ptuning/main.py format (config.json with pre_seq_len / prefix_projection, pytorch_model.bin holding only
transformer.prefix_encoder.*), exported with --ptuning; the graph's logits with the prefix, greedy fills through the
runtime's cache on ONNX Runtime and the torch reference, a batch against each prompt alone and rows joining a running
pool; checkpoints that do not fit refused in one line with nothing written; a tampered prefix file refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import oracle_chatglm as oc
from tests.chatglm_folders import make_chatglm_folder
from tests.graph_checks import FP32
from tests.graph_checks import within as _within

pytest.importorskip("torch")
pytest.importorskip("onnx")

GMASK, MASK, SOP, EOP, PAD = 600, 601, 602, 603, 3  # ids of the tiny model (these tests feed ids)
L, H, HEADS, P = 2, 64, 4, 6  # the tiny base (tests/chatglm_folders.py defaults) and the prefix length
PROMPT = [5, 17, 33, 9, 44, 71, 12, GMASK, SOP]  # text, then [gMASK] <sop> at the end (spec 5)


def encoder_weights(projection: bool, pre_seq_len: int = P, layers: int = L, hidden: int = H, seed: int = 0) -> dict:
    """PrefixEncoder's state dict under the names the official trainer saves (float32, as it keeps the encoder).
    Keys and values of about 10: large enough to steer the tiny random model's greedy tokens (a weak prefix leaves
    it repeating its input, with and without the prefix)."""
    rng = np.random.default_rng(seed)
    wide = 2 * layers * hidden
    if not projection:
        return {"transformer.prefix_encoder.embedding.weight": rng.normal(0, 10.0, (pre_seq_len, wide))}
    return {
        "transformer.prefix_encoder.embedding.weight": rng.normal(0, 1.0, (pre_seq_len, hidden)),
        "transformer.prefix_encoder.trans.0.weight": rng.normal(0, 0.3, (hidden, hidden)),
        "transformer.prefix_encoder.trans.0.bias": rng.normal(0, 0.1, hidden),
        "transformer.prefix_encoder.trans.2.weight": rng.normal(0, 3.0, (wide, hidden)),
        "transformer.prefix_encoder.trans.2.bias": rng.normal(0, 0.1, wide),
    }


def make_ptuning_folder(folder: Path, base: Path, sd: dict, pre_seq_len: int = P, projection: bool = False) -> Path:
    """ptuning/main.py's checkpoint-N/: the base's config.json plus pre_seq_len and prefix_projection, and a
    pytorch_model.bin of the prefix encoder alone."""
    import torch

    folder.mkdir(parents=True)
    config = json.loads((base / "config.json").read_text())
    config.update(pre_seq_len=pre_seq_len, prefix_projection=projection)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return make_chatglm_folder(tmp_path_factory.mktemp("chatglm") / "chatglm-6b", seed=3)


@pytest.fixture(scope="module")
def oracle(hub):
    return oc.load_hf_folder(str(hub))


@pytest.fixture(scope="module", params=[False, True], ids=["embedding", "projection"])
def tuned(request, hub, oracle, tmp_path_factory):
    """(export folder, the oracle's prefix, projection) for a checkpoint without and with prefix_projection."""
    from glm_export.export import export_onnx

    projection = request.param
    root = tmp_path_factory.mktemp("ptuning")
    sd = encoder_weights(projection, seed=7)
    pt = make_ptuning_folder(root / "checkpoint-3000", hub, sd, projection=projection)
    out = export_onnx(hub, root / "onnx", no_tokenizer=True, ptuning=pt, log=lambda m: None)
    return out, oc.prefix_from_ptuning(sd, oracle[1], P, projection), projection


def _session(folder, backend="onnxruntime"):
    from glm_runtime.session import open_session

    return open_session(folder, backend)


def test_the_exported_logits_with_the_prefix_match_the_oracle(tuned, oracle):
    """A [gMASK] <sop> prompt in one call: the prefix as the past of every layer, always visible; the tokens at
    positions from 0 (the prefix takes none). Without the prefix the logits move by far more than the budget."""
    from glm_runtime.iotable import past_names
    from glm_runtime.steps import empty_past

    folder, prefix, _ = tuned
    sd, cfg = oracle
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    want, _ = oc.forward(sd, cfg, [PROMPT], pos[None], mask[None], prefix=prefix)
    plain, _ = oc.forward(sd, cfg, [PROMPT], pos[None], mask[None])
    with _session(folder) as s:
        assert s.prefix.length == P and s.prefix.kv.shape == (L, 2, HEADS, P, H // HEADS)
        past = empty_past(s, 1)  # the prefix, [1, n, P, d] per layer
        assert set(past) == {n for pair in past_names(s.io) for n in pair}
        visible = np.concatenate([np.ones((1, 1, len(PROMPT), P), bool), ~mask[None]], axis=3)
        feeds = {"input_ids": np.array([PROMPT]), "position_ids": pos[None], "attention_mask": visible, **past}
        got = s.run(feeds)["logits"]
    diff = _within(got, want)
    print(f"P-tuning logits vs oracle: max |diff| {diff:.3g} (max |ref| {np.abs(want).max():.3g})")
    assert np.abs(want - plain).max() > 100 * (FP32[0] + FP32[1] * np.abs(want).max())  # the prefix matters


def test_the_manifest_records_and_hashes_the_prefix(tuned):
    folder, _, projection = tuned
    m = json.loads((folder / "manifest.json").read_text())
    record = m["extra"]["ptuning"]
    assert record["file"] == "prefix.safetensors" and record["file"] in m["files"]
    assert record["sha256"] == m["files"]["prefix.safetensors"]
    assert record["pre_seq_len"] == P and record["prefix_projection"] is projection
    assert set(record["source_files"]) == {"config.json", "pytorch_model.bin"}
    assert m["parity"]["passed"] and not m["parity"]["failures"]  # the export's own check, with the prefix


def _greedy(session, contexts: list[list[int]], steps: int, join_at: int | None = None) -> list[list[int]]:
    """Greedy spans through the runtime's forward phases (runtime/steps.py) on one cache, a row per context (right-
    padded in one context pass); join_at: the second row joins after that many decode calls of the first (its
    context pass alone, cache.load_rows, as the engine admits a request into a running pool)."""
    from glm_runtime import masks
    from glm_runtime.steps import decode_step, open_cache, run_context

    B = len(contexts)
    cache = open_cache(session, B, max(len(c) for c in contexts) + steps + 1)
    first = contexts if join_at is None else contexts[:1]
    out, _ = run_context(session, first, PAD)
    cache.load_rows(list(range(len(first))), out, [len(c) for c in first])
    live = [True] * len(first) + [False] * (B - len(first))
    feed, step, spans = [SOP] * B, [0] * B, [[] for _ in contexts]
    calls = 0
    while any(live) and calls < 4 * steps:
        if join_at is not None and calls == join_at:
            out, _ = run_context(session, contexts[1:], PAD)
            cache.load_rows([1], out, [len(contexts[1])])
            live[1] = True
        mask_pos = [c.index(GMASK) for c in contexts]
        positions = masks.decode_positions(mask_pos, [s if ok else -1 for s, ok in zip(step, live)])
        logits = decode_step(session, cache, [f if ok else PAD for f, ok in zip(feed, live)], positions, live)
        calls += 1
        for b in range(B):
            if not live[b]:
                continue
            token = int(np.argmax(logits[b]))
            if token == EOP or len(spans[b]) == steps:
                live[b] = False
                continue
            spans[b].append(token)
            feed[b], step[b] = token, step[b] + 1
    return spans


CONTEXTS = [PROMPT[:-1], [8, 9, 40, 41, 42, GMASK]]  # text + [gMASK]: the span starts with <sop> (spec 5)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_greedy_fill_through_the_runtime_equals_the_oracle(tuned, oracle, backend):
    """The oracle recomputes the whole sequence (prefix in front) for each token; glmx runs the context pass with
    the prefix as its past, then one token per call through its cache whose first P slots hold the prefix."""
    folder, prefix, _ = tuned
    sd, cfg = oracle
    want = oc.greedy_generate(sd, cfg, PROMPT, GMASK, MASK, SOP, EOP, 6, prefix=prefix)
    plain = oc.greedy_generate(sd, cfg, PROMPT, GMASK, MASK, SOP, EOP, 6)
    with _session(folder, backend) as s:
        assert s.prefix is not None and s.prefix.length == P
        got = _greedy(s, CONTEXTS[:1], 6)[0]
    assert got == want and len(want) == 6, (got, want)
    assert want != plain  # the prefix changes what is generated


def test_a_batch_and_rows_joining_a_running_pool_equal_each_prompt_alone(tuned, oracle):
    folder, prefix, _ = tuned
    sd, cfg = oracle
    want = [oc.greedy_generate(sd, cfg, c + [SOP], GMASK, MASK, SOP, EOP, 5, prefix=prefix) for c in CONTEXTS]
    with _session(folder) as s:
        alone = [_greedy(s, [c], 5)[0] for c in CONTEXTS]
        batch = _greedy(s, CONTEXTS, 5)  # right-padded context pass, one decode call for both rows
        joined = _greedy(s, CONTEXTS, 5, join_at=2)  # row 1 joins after row 0's second decode call
    assert alone == want and batch == want and joined == want, (alone, batch, joined, want)


def test_the_parity_check_runs_with_the_prefix_piecewise_too(hub, tmp_path):
    """--check piecewise: both layer stacks take the prefix as their first past; the record passes."""
    from glm_export.export import export_onnx

    pt = make_ptuning_folder(tmp_path / "pt", hub, encoder_weights(True, seed=2), projection=True)
    out = export_onnx(hub, tmp_path / "onnx", no_tokenizer=True, ptuning=pt, check="piecewise", log=lambda m: None)
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert "piecewise" in parity["method"] and not parity["failures"]


def _mismatches(hub: Path) -> dict:
    """name -> (encoder weights, pre_seq_len in config.json, prefix_projection) that do not fit the tiny base."""
    extra = encoder_weights(False)
    extra["transformer.layers.0.attention.dense.weight"] = np.zeros((H, H))
    no_trans2 = encoder_weights(True)
    del no_trans2["transformer.prefix_encoder.trans.2.weight"]
    return {
        "pre_seq_len_vs_embedding": (encoder_weights(False, pre_seq_len=P + 2), P, False),
        "layer_count": (encoder_weights(False, layers=L + 1), P, False),
        "width": (encoder_weights(True, hidden=2 * H), P, True),
        "other_keys": (extra, P, False),
        "projection_without_its_linears": (encoder_weights(False), P, True),
        "missing_linear": (no_trans2, P, True),
        "no_pre_seq_len": (encoder_weights(False), None, False),
    }


@pytest.mark.parametrize(
    "case",
    [
        "pre_seq_len_vs_embedding",
        "layer_count",
        "width",
        "other_keys",
        "projection_without_its_linears",
        "missing_linear",
        "no_pre_seq_len",
    ],
)
def test_a_checkpoint_that_does_not_fit_is_one_line_and_nothing_is_written(hub, tmp_path, case):
    from glm_export.export import export_onnx
    from glm_export.ptuning import PTuningError

    sd, pre_seq_len, projection = _mismatches(hub)[case]
    pt = make_ptuning_folder(tmp_path / "pt", hub, sd, pre_seq_len=pre_seq_len, projection=projection)
    with pytest.raises(PTuningError) as info:
        export_onnx(hub, tmp_path / "out", no_tokenizer=True, ptuning=pt, log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message and "P-tuning checkpoint" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt"]  # no OUT, no staging folder, no lock


def test_the_cli_says_it_in_one_line(hub, tmp_path):
    from click.testing import CliRunner

    import glm_export.cli  # noqa: F401 - its commands join the group
    from glm_runtime.cli import main

    pt = make_ptuning_folder(tmp_path / "pt", hub, encoder_weights(False, layers=L + 1))
    result = CliRunner().invoke(main, ["export", str(hub), "-o", str(tmp_path / "out"), "--ptuning", str(pt)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "2*L*h" in errors[0], result.output
    assert not (tmp_path / "out").exists()
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "--ptuning DIR" in help_text and "pre_seq_len" in help_text


def test_a_tampered_prefix_file_is_refused_at_load(tuned, tmp_path):
    """One byte changed in prefix.safetensors: every backend refuses the folder, even with verify=False (the prefix
    is hashed as it is read)."""
    from glm_runtime.manifest import ManifestError
    from glm_runtime.session import OnnxRuntimeSession, open_session

    # beside the original: the torch backend finds the checkpoint by the relative path the export recorded
    folder = Path(shutil.copytree(tuned[0], tuned[0].parent / f"tampered-{tmp_path.name}"))
    data = bytearray((folder / "prefix.safetensors").read_bytes())
    data[-3] ^= 0x40
    (folder / "prefix.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="prefix.safetensors does not match its manifest"):
        OnnxRuntimeSession(folder)
    with pytest.raises(ManifestError, match="P-tuning prefix was modified"):
        OnnxRuntimeSession(folder, verify=False)
    with pytest.raises(ManifestError, match="prefix.safetensors"):
        open_session(folder, "torch", verify=False)
    (folder / "prefix.safetensors").unlink()
    with pytest.raises(ManifestError, match="missing|cannot be read"):
        OnnxRuntimeSession(folder)


def test_an_engine_for_a_prefixed_export_has_p_more_cache_slots(tuned):
    """TensorRT (built on a GPU; the profiles are pure python): every past may hold the prefix's P slots too, the
    prompt pass's opt past is P, and the limits record them."""
    from glm_export.trt_build import compute_profiles, resolve_limits
    from glm_runtime.manifest import load_manifest

    parent = load_manifest(tuned[0], kind="onnx")
    plain = compute_profiles(parent, max_batch=2, max_context=32, max_new_tokens=16)
    prefixed = compute_profiles(parent, max_batch=2, max_context=32, max_new_tokens=16, prefix=P)
    for a, b in zip(plain, prefixed):
        assert b.dims["past_seq"][2] == a.dims["past_seq"][2] + P == 48 + P
        assert b.dims["seq"] == a.dims["seq"]
    assert prefixed[0].dims["past_seq"][1] == P  # the prompt pass runs on the prefix
    limits = resolve_limits(parent.config, max_batch=2, max_context=32, max_new_tokens=16, prefix=P)
    assert limits["max_past"] == 48 + P and limits["prefix_slots"] == P


def test_the_device_cache_holds_the_prefix_too(tuned, oracle):
    """ONNX Runtime with IO binding (on CPU here) keeps K/V in a DeviceKVCache: the prefix is scattered into every
    row's first slots and a joining row's context lands after it, as on the host cache."""
    from glm_runtime.kvcache import DeviceKVCache
    from glm_runtime.session import OnnxRuntimeSession

    folder, prefix, _ = tuned
    sd, cfg = oracle
    want = [oc.greedy_generate(sd, cfg, c + [SOP], GMASK, MASK, SOP, EOP, 5, prefix=prefix) for c in CONTEXTS]
    with OnnxRuntimeSession(folder, io_binding=True) as s:
        assert isinstance(s.new_cache(1, 1), DeviceKVCache)
        assert _greedy(s, CONTEXTS, 5, join_at=2) == want


def test_an_fp16_export_keeps_the_prefix_in_its_cache_dtype(hub, oracle, tmp_path):
    """fp16: the prefix is rounded to the cache's fp16 when loaded (the official code casts it to half too); the
    logits stay within the fp16 parity budget of the oracle."""
    from glm_export.export import export_onnx
    from glm_runtime.steps import empty_past

    sd, cfg = oracle
    enc = encoder_weights(False, seed=4)
    pt = make_ptuning_folder(tmp_path / "pt", hub, enc)
    out = export_onnx(hub, tmp_path / "fp16", precision="fp16", no_tokenizer=True, ptuning=pt, log=lambda m: None)
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    want, _ = oc.forward(sd, cfg, [PROMPT], pos[None], mask[None], prefix=oc.prefix_from_ptuning(enc, cfg, P, False))
    with _session(out) as s:
        assert s.prefix.kv.dtype == np.float16
        visible = np.concatenate([np.ones((1, 1, len(PROMPT), P), bool), ~mask[None]], axis=3)
        feeds = {"input_ids": np.array([PROMPT]), "position_ids": pos[None], "attention_mask": visible}
        got = s.run({**feeds, **empty_past(s, 1)})["logits"]
    diff = _within(got, want, (3e-2, 5e-3))
    print(f"fp16 P-tuning logits vs oracle: max |diff| {diff:.3g} (max |ref| {np.abs(want).max():.3g})")
