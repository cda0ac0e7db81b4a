"""ChatGLM-6B (v1) through glmx's stages on tiny hub-layout folders (tests/chatglm_folders.py), each judged against
the independent numpy oracle written from the research note (tests/oracle_chatglm.py), never against glmx's own
torch reference: the exported graph's logits for a prompt ending [gMASK] <sop>, a left-padded batch as HF's
tokenizer builds it, decode steps through the cache against full forwards; the released int4 / int8 folders; the
ChatGLM2 / 3 and GLM-4 folders refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import oracle_chatglm as oc
from tests.chatglm_folders import dequantize_like_hf, make_chatglm_folder, quantize_like_hf
from tests.graph_checks import onnx_session as _session
from tests.graph_checks import run_graph as _run
from tests.graph_checks import within as _within

pytest.importorskip("torch")
pytest.importorskip("onnx")

# The special ids of the tiny model: pieces of no tokenizer (these tests feed ids), inside its 640 rows.
GMASK, MASK, SOP, EOP = 600, 601, 602, 603


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return make_chatglm_folder(tmp_path_factory.mktemp("chatglm") / "chatglm-6b", seed=3)


@pytest.fixture(scope="module")
def oracle(hub):
    return oc.load_hf_folder(str(hub))


@pytest.fixture(scope="module")
def exported(hub, tmp_path_factory):
    from glm_export.export import export_onnx

    return export_onnx(hub, tmp_path_factory.mktemp("onnx") / "fp32", no_tokenizer=True, log=lambda m: None)


PROMPT = [5, 17, 33, 9, 44, 71, 12, GMASK, SOP]  # text, then [gMASK] <sop> at the end (spec 5)


def test_exported_logits_match_the_oracle_for_a_gmask_prompt(exported, oracle):
    sd, cfg = oracle
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    want, _ = oc.forward(sd, cfg, [PROMPT], pos[None], mask[None])
    with _session(exported) as s:
        got = _run(s, [PROMPT], pos[None], ~mask[None])["logits"]
    _within(got, want)


def test_decode_steps_through_the_cache_equal_full_forwards(exported, oracle):
    """Greedy: the oracle recomputes the whole sequence each step; glmx runs the context, then one token per
    call through its cache (rotated keys), at (m, step + 1)."""
    from glm_runtime.iotable import kv_names

    sd, cfg = oracle
    want = oc.greedy_generate(sd, cfg, PROMPT, GMASK, MASK, SOP, EOP, 6)
    m, c = PROMPT.index(GMASK), PROMPT.index(SOP)
    got: list[int] = []
    with _session(exported) as s:
        pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
        out = _run(s, [PROMPT], pos[None], ~mask[None])
        names = [pair for i in range(cfg["num_layers"]) for pair in zip(kv_names("past", i), kv_names("present", i))]
        past = {p: out[n] for p, n in names}
        while len(got) < 6:
            nxt = int(np.argmax(out["logits"][0, -1]))
            if nxt == EOP:
                break
            got.append(nxt)
            total = len(PROMPT) + len(got)
            step = np.array([[[m], [total - 1 - c + 1]]])
            out = _run(s, [[nxt]], step, np.ones((1, 1, 1, total), bool), past)
            past = {p: np.concatenate([past[p], out[n]], axis=2) for p, n in names}
    assert got == want and len(want) == 6, (got, want)


def test_a_left_padded_batch_stays_finite_and_matches_the_oracle(exported, oracle):
    """HF's tokenizer pads on the left with fully masked rows (spec 5): -10000, not -inf, keeps them finite."""
    sd, cfg = oracle
    seqs = [PROMPT, [8, 9, GMASK, SOP]]
    ids, pos, mask = oc.left_padded_batch(seqs, 3, GMASK, MASK, SOP, prefer="gmask")
    want, _ = oc.forward(sd, cfg, ids, pos, mask)
    with _session(exported) as s:
        got = _run(s, ids, pos, ~mask)["logits"]
    assert np.isfinite(got).all()
    _within(got, want)


def test_a_mask_mid_text_gets_its_positions(exported, oracle):
    """[MASK] in the middle: the span's tokens sit at the [MASK]'s position (no [gMASK] in the prompt)."""
    sd, cfg = oracle
    ids = [5, 17, MASK, 9, 44, SOP, 30]
    pos, mask = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 2, 2]
    want, _ = oc.forward(sd, cfg, [ids], pos[None], mask[None])
    with _session(exported) as s:
        _within(_run(s, [ids], pos[None], ~mask[None])["logits"], want)


def test_exact_rotary_frequencies_are_a_recorded_choice(hub, oracle, tmp_path):
    from glm_export.export import export_onnx

    sd, cfg = oracle
    long = list(range(10, 590)) * 1 + [GMASK, SOP]
    pos, mask = oc.chatglm_positions(long, GMASK, MASK, SOP)
    out = export_onnx(hub, tmp_path / "exact", no_tokenizer=True, rotary_inv_freq="fp32", log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["rotary_inv_freq"] == "fp32"
    assert manifest["extra"]["architecture"]["alpha"] == pytest.approx(56**0.5)
    with _session(out) as s:
        got = _run(s, [long], pos[None], ~mask[None])["logits"]
    exact, _ = oc.forward(sd, cfg, [long], pos[None], mask[None], inv_freq="fp32")
    rounded, _ = oc.forward(sd, cfg, [long], pos[None], mask[None], inv_freq="fp16")
    _within(got, exact)
    with pytest.raises(AssertionError):  # the switch matters: the fp16-rounded model is outside the budget
        _within(got, rounded)


@pytest.mark.parametrize("bits", [4, 8])
def test_released_int_folders_export_their_own_integers(bits, tmp_path):
    """A chatglm-6b-int4 / -int8 folder (written here in the released layout) exports as int4-weight /
    int8-weight, judged against the oracle on the dequantized weights (q x scale); glm_export/hf_quantized.py's
    tests prove the integers bit for bit, so what remains is MatMulNBits' int8 activations and the 8-bit head."""
    from glm_export.export import export_onnx

    hub = make_chatglm_folder(
        tmp_path / f"chatglm-6b-int{bits}",
        seed=5,
        mutate=lambda sd: quantize_like_hf(sd, bits),
        config_extra={"quantization_bit": bits},
    )
    out = export_onnx(hub, tmp_path / "onnx", no_tokenizer=True, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == f"int{bits}-weight"
    assert manifest["parity"]["passed"] and manifest["extra"]["quantization"]["scheme"] == f"int{bits}-weight"
    import torch

    raw = {}  # the oracle's loader reads float folders: the released tensors, dequantized here independently
    for f in sorted(hub.glob("pytorch_model-*.bin")):
        raw.update({k: v.numpy() for k, v in torch.load(f).items()})
    sd = dequantize_like_hf(raw, bits)
    cfg = json.loads((hub / "config.json").read_text())
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    want, _ = oc.forward(sd, cfg, [PROMPT], pos[None], mask[None])
    with _session(out) as s:
        got = _run(s, [PROMPT], pos[None], ~mask[None])["logits"]
    # MatMulNBits at accuracy_level 4 rounds activations to int8 and the head is 8-bit: the figure is recorded
    err = float(np.abs(got - want).max())
    assert err < 0.05 * float(np.abs(want).max()), err
    assert int(np.argmax(got[0, -1])) == int(np.argmax(want[0, -1]))


def test_chatglm2_and_glm4_folders_are_refused_in_one_line_nothing_written(tmp_path):
    from glm_export.checkpoint import convert_checkpoint
    from glm_runtime.errors import GLMXError

    for padded, name in ((65024, "ChatGLM2-6B / ChatGLM3-6B"), (151552, "GLM-4")):
        hub = make_chatglm_folder(
            tmp_path / f"v2-{padded}",
            config_extra={"multi_query_attention": True, "padded_vocab_size": padded, "multi_query_group_num": 2},
        )
        out = tmp_path / f"out-{padded}"
        with pytest.raises(GLMXError) as exc:
            convert_checkpoint(hub, out)
        message = str(exc.value)
        assert "\n" not in message and name in message and "multi_query_attention" in message, message
        assert not out.exists()


def test_the_piecewise_check_of_the_large_model_path_runs_rotary_layers(hub, exported, tmp_path):
    """The streamed export's one-layer-at-a-time check (a 6.2B model's normal path): each layer piece computes its
    rotary tables from the position ids, as the whole graph does, so both checks measure the same figures."""
    from glm_export.export import export_onnx

    out = export_onnx(hub, tmp_path / "pieces", no_tokenizer=True, check="piecewise", external_data=True, log=print)
    piecewise = json.loads((out / "manifest.json").read_text())["parity"]
    whole = json.loads((exported / "manifest.json").read_text())["parity"]
    assert piecewise["passed"] and piecewise["method"].startswith("piecewise")
    for case, figures in whole["cases"].items():
        assert piecewise["cases"][case]["logits"] == pytest.approx(figures["logits"], abs=2e-6), case


def test_a_safetensors_folder_and_an_untied_lm_head(tmp_path, oracle, exported):
    """The hub's safetensors layout reads as the .bin shards do; an lm_head.weight that differs from the embedding
    is one line that says what the HF code does (ties them on load, computing with the embedding), and so does
    glmx: the logits are the embedding's."""
    from glm_export.export import export_onnx

    def untie(sd):
        sd["lm_head.weight"] = sd["lm_head.weight"] + np.float16(0.5)

    hub = make_chatglm_folder(tmp_path / "st", seed=3, safetensors=True, mutate=untie)
    said: list[str] = []
    out = export_onnx(hub, tmp_path / "onnx", no_tokenizer=True, log=said.append)
    (line,) = [m for m in said if "lm_head.weight differs" in m]
    assert "ties lm_head to the embedding on load" in line and "max |diff| 0.5" in line
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    with _session(out) as s, _session(exported) as t:
        got = _run(s, [PROMPT], pos[None], ~mask[None])["logits"]
        same_weights = _run(t, [PROMPT], pos[None], ~mask[None])["logits"]
    np.testing.assert_allclose(got, same_weights, atol=1e-5)  # seed 3: the .bin folder's weights, lm_head unused


def test_convert_then_export_round_trips_through_glmx_folders(hub, exported, tmp_path):
    from glm_export.checkpoint import convert_checkpoint
    from glm_export.export import export_onnx

    _, folder = convert_checkpoint(hub, tmp_path / "glmx", dtype="fp32")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"]["architecture"] == "chatglm-6b"
    out = export_onnx(folder, tmp_path / "onnx", no_tokenizer=True, log=lambda m: None)
    pos, mask = oc.chatglm_positions(PROMPT, GMASK, MASK, SOP)
    with _session(out) as s, _session(exported) as t:
        np.testing.assert_allclose(
            _run(s, [PROMPT], pos[None], ~mask[None])["logits"],
            _run(t, [PROMPT], pos[None], ~mask[None])["logits"],
            atol=1e-5,
        )
