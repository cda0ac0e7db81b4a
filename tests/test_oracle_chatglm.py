"""Sanity checks of the independent ChatGLM-6B numpy oracle (tests/oracle_chatglm.py) on a random 2-layer model
(h 64, 4 heads of 16, vocab 100): each fact of shared/chatglm_v1_spec.md it encodes, tested so it can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import oracle_chatglm as oc

L, h, H, V = 2, 64, 4, 100
d = h // H
CFG = {"num_layers": L, "hidden_size": h, "num_attention_heads": H}
MASK, GMASK, SOP, EOP, PAD = 95, 96, 97, 98, 3  # the 130000.. special ids, moved into the tiny vocabulary


def random_sd(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    g = lambda *shape, s=0.2: rng.normal(0.0, s, shape)
    sd = {
        "transformer.word_embeddings.weight": g(V, h, s=0.5),
        "transformer.final_layernorm.weight": 1 + g(h),
        "transformer.final_layernorm.bias": g(h),
    }
    for i in range(L):
        p = f"transformer.layers.{i}."
        shapes = {
            "attention.query_key_value": (3 * h, h),
            "attention.dense": (h, h),
            "mlp.dense_h_to_4h": (4 * h, h),
            "mlp.dense_4h_to_h": (h, 4 * h),
        }
        for name, (o, n_in) in shapes.items():
            sd[p + name + ".weight"] = g(o, n_in)
            sd[p + name + ".bias"] = g(o)
        for ln in ("input_layernorm", "post_attention_layernorm"):
            sd[p + ln + ".weight"] = 1 + g(h)
            sd[p + ln + ".bias"] = g(h)
    return sd


SD = random_sd()


def run(ids, sd=SD, **kw):
    """Logits [T,V] of one prompt with its HF positions and mask (model path)."""
    pos, mask = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    return oc.forward(sd, CFG, [ids], pos[None], mask[None], **kw)[0][0]


def random_prefix(P: int = 3, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 1, (P, 1, H, d)), rng.normal(0, 1, (P, 1, H, d))) for _ in range(L)]


def test_worked_example_positions_and_mask():
    """spec 5: "你好" = [5, 74874, 130001, 130004] -> positions [0,1,2,2], blocks [0,0,0,1]; generated tokens stay
    at m while the block counts up; context rows see 0..c-1 (not <sop>), rows from <sop> on are causal."""
    pos, mask = oc.chatglm_positions([5, 74, GMASK, SOP], GMASK, MASK, SOP)
    assert pos.tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]
    visible = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask.shape == (1, 4, 4) and (~mask[0]).astype(int).tolist() == visible
    pos, _ = oc.chatglm_positions([5, 74, GMASK, SOP, 11, 12], GMASK, MASK, SOP)
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]
    # m: [gMASK] when present (model path), else [MASK]; the tokenizer's _pad prefers [MASK] (spec 5)
    assert oc.chatglm_positions([MASK, 7, GMASK, SOP], GMASK, MASK, SOP)[0][0].tolist() == [0, 1, 2, 2]
    assert oc.chatglm_positions([7, MASK, 8, SOP], GMASK, MASK, SOP)[0][0].tolist() == [0, 1, 2, 1]
    ids, pos, _ = oc.left_padded_batch([[MASK, 7, GMASK, SOP]], PAD, GMASK, MASK, SOP)
    assert pos[0, 0].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="sop"):
        oc.chatglm_positions([5, 74, GMASK], GMASK, MASK, SOP)


def test_one_token_through_one_layer_by_hand():
    """spec 3 written out for one token (its attention is dense(v)): h = a*LN(x) + Attn, x' = a*LN(h) + MLP with
    the tanh GeLU, a = sqrt(56), LayerNorm eps 1e-5, final LayerNorm, tied head."""
    w = lambda name: SD[f"transformer.layers.0.{name}"]
    ln = lambda x, name: (x - x.mean()) / np.sqrt(x.var() + 1e-5) * SD[name + ".weight"] + SD[name + ".bias"]
    x = SD["transformer.word_embeddings.weight"][7]
    a = ln(x, "transformer.layers.0.input_layernorm")
    qkv = w("attention.query_key_value.weight") @ a + w("attention.query_key_value.bias")
    v = qkv.reshape(H, 3, d)[:, 2].reshape(h)  # per head: q, k, v
    hid = np.sqrt(56) * a + w("attention.dense.weight") @ v + w("attention.dense.bias")
    b = ln(hid, "transformer.layers.0.post_attention_layernorm")
    u = w("mlp.dense_h_to_4h.weight") @ b + w("mlp.dense_h_to_4h.bias")
    gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
    x = np.sqrt(56) * b + w("mlp.dense_4h_to_h.weight") @ gelu + w("mlp.dense_4h_to_h.bias")
    want = ln(x, "transformer.final_layernorm") @ SD["transformer.word_embeddings.weight"].T
    got = oc.forward(SD, dict(CFG, num_layers=1), [[7]], [[[5], [2]]])[0][0, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_rotary_is_2d_neox_halves():
    """spec 4.2: dims 0..d/2-1 turn with the position, d/2..d-1 with the block; within a half j pairs with j + d/4."""
    f = oc._inv_freq(d, "fp16")
    x = np.zeros((1, 1, 1, d))
    x[..., 1] = x[..., 9] = 1.0  # dim 1 (position half), dim 9 = d/2 + 1 (block half)
    out = oc._rotary_2d(x, np.array([[[5], [3]]]), f)[0, 0, 0]
    want = np.zeros(d)
    want[1], want[1 + d // 4] = np.cos(5 * f[1]), np.sin(5 * f[1])
    want[9], want[9 + d // 4] = np.cos(3 * f[1]), np.sin(3 * f[1])
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-15)


def test_context_attends_both_ways_span_is_causal():
    ids = [5, 9, 14, 33, GMASK, SOP, 40, 41]
    base = run(ids)
    later_context = run(ids[:2] + [15] + ids[3:])  # index 2 is context: row 0 sees it
    assert np.abs(later_context[0] - base[0]).max() > 1e-3
    later_span = run(ids[:6] + [42, 41])  # index 6 is in the span: rows 0..5 do not see it
    np.testing.assert_allclose(later_span[:6], base[:6], rtol=0, atol=1e-12)
    assert np.abs(later_span[6] - base[6]).max() > 1e-3
    # and a plain causal mask is not the model's (spec "Checked by running": moves logits by ~11 on HF)
    pos, _ = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    causal = ~np.tril(np.ones((len(ids), len(ids)), dtype=bool))
    assert np.abs(oc.forward(SD, CFG, [ids], pos[None], causal[None, None])[0][0] - base).max() > 1e-2


def test_decode_through_past_equals_full_forward():
    ids = [5, 9, 14, GMASK, SOP, 40, 41]
    pos, mask = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    full, full_presents = oc.forward(SD, CFG, [ids], pos[None], mask[None])
    _, past = oc.forward(SD, CFG, [ids[:-1]], pos[None, :, :-1], mask[None, :, :-1, :-1])
    assert past[0][0].shape == (len(ids) - 1, 1, H, d)  # [past, B, H, d], HF's cache layout
    step, presents = oc.forward(SD, CFG, [ids[-1:]], pos[None, :, -1:], None, past=past)
    assert pos[:, -1].tolist() == [3, 3]  # (m, j - c + 1) for j = 6, c = 4
    np.testing.assert_allclose(step[0, -1], full[0, -1], rtol=0, atol=1e-10)
    for (k, v), (fk, fv) in zip(presents, full_presents):
        np.testing.assert_allclose(k, fk, atol=1e-12)
        np.testing.assert_allclose(v, fv, atol=1e-12)
    # the cached keys are rotated: layer 0's raw key of the token at (pos 1, block 0) is not what is cached,
    # while the token at (0, 0) (angle 0) is cached unchanged
    a = oc._layer_norm(
        oc._f64(SD["transformer.word_embeddings.weight"])[np.array([ids])], SD, "transformer.layers.0.input_layernorm"
    )
    _, raw_k, _ = oc._split_qkv(oc._linear(a, SD, "transformer.layers.0.attention.query_key_value"), H)
    cached = presents[0][0][:, 0]  # [T,H,d]
    np.testing.assert_allclose(cached[0], raw_k[0, :, 0], atol=1e-12)
    assert np.abs(cached[1] - raw_k[0, :, 1]).max() > 1e-3


def test_decode_through_a_prefixed_cache():
    """A cache made with a prefix holds it in front; decoding from it (prefix=None) equals the full forward."""
    prefix, ids = random_prefix(), [5, 9, GMASK, SOP, 40]
    full = run(ids, prefix=prefix)
    pos, mask = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    _, past = oc.forward(SD, CFG, [ids[:-1]], pos[None, :, :-1], mask[None, :, :-1, :-1], prefix=prefix)
    assert past[0][0].shape == (3 + len(ids) - 1, 1, H, d)
    step, _ = oc.forward(SD, CFG, [ids[-1:]], pos[None, :, -1:], None, past=past)
    np.testing.assert_allclose(step[0, -1], full[-1], rtol=0, atol=1e-10)


def test_shifting_positions_matters_only_with_a_prefix():
    ids = [5, 9, 14, GMASK, SOP, 40]
    pos, mask = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    prefix = random_prefix()
    for pre, changes in ((None, False), (prefix, True)):
        base = oc.forward(SD, CFG, [ids], pos[None], mask[None], prefix=pre)[0]
        moved = oc.forward(SD, CFG, [ids], pos[None] + 1, mask[None], prefix=pre)[0]
        diff = np.abs(moved - base).max()
        assert diff > 1e-3 if changes else diff < 1e-10, (pre is not None, diff)


def test_alpha_is_sqrt_56_whatever_num_layers():
    ids = [5, 9, 14, GMASK, SOP, 40]
    default = run(ids)
    np.testing.assert_array_equal(default, run(ids, alpha_layers=28))
    assert np.abs(run(ids, alpha_layers=L) - default).max() > 1e-2  # TensorRT-LLM's 2*num_layers: not HF's
    one = dict(CFG, num_layers=1)
    pos, mask = oc.chatglm_positions(ids, GMASK, MASK, SOP)
    logits_one = lambda **kw: oc.forward(SD, one, [ids], pos[None], mask[None], **kw)[0]
    np.testing.assert_array_equal(logits_one(), logits_one(alpha_layers=28))


def test_qkv_rows_are_interleaved_per_head():
    ids = [5, 9, 14, GMASK, SOP, 40]
    base = run(ids)
    # zeroing the v rows (head*3d + 2d + j) zeroes every value: the attention is its dense bias alone
    no_v, no_dense = dict(SD), dict(SD)
    rows = np.array([hd * 3 * d + 2 * d + j for hd in range(H) for j in range(d)])
    for i in range(L):
        p = f"transformer.layers.{i}.attention."
        w, b = SD[p + "query_key_value.weight"].copy(), SD[p + "query_key_value.bias"].copy()
        w[rows], b[rows] = 0.0, 0.0
        no_v[p + "query_key_value.weight"], no_v[p + "query_key_value.bias"] = w, b
        no_dense[p + "dense.weight"] = np.zeros((h, h))
    np.testing.assert_allclose(run(ids, sd=no_v), run(ids, sd=no_dense), rtol=0, atol=1e-10)
    # the same rows read as [Q;K;V] blocks give another model (spec: ~17 on HF)
    blocks = dict(SD)
    for i in range(L):
        for kind in ("weight", "bias"):
            key = f"transformer.layers.{i}.attention.query_key_value.{kind}"
            inter = SD[key].reshape(H, 3, d, -1)  # rows as (head, s, j)
            blocks[key] = inter.transpose(1, 0, 2, 3).reshape(SD[key].shape)  # rows as (s, head, j)
    assert np.abs(run(ids, sd=blocks) - base).max() > 0.1


def test_lm_head_is_tied():
    ids = [5, 9, GMASK, SOP]
    other = dict(SD, **{"lm_head.weight": np.ones((V, h))})
    np.testing.assert_array_equal(run(ids, sd=other), run(ids))


def test_left_padding_stays_finite_and_does_not_leak(monkeypatch):
    short, long = [7, GMASK, SOP], [5, 9, 14, 33, GMASK, SOP]
    ids, pos, mask = oc.left_padded_batch([short, long], PAD, GMASK, MASK, SOP)
    assert ids[0].tolist() == [PAD] * 3 + short and pos[0].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert mask[0, 0, :3].all() and mask[0, 0, :, :3].all()  # padding rows and columns masked
    logits, _ = oc.forward(SD, CFG, ids, pos, mask)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[0, 3:], run(short), rtol=0, atol=1e-10)
    np.testing.assert_allclose(logits[1], run(long), rtol=0, atol=1e-10)
    monkeypatch.setattr(oc, "MASK_VALUE", -np.inf)  # spec 4.4: -inf NaNs the pad rows, and 0 * NaN spreads
    with np.errstate(invalid="ignore"):
        assert np.isnan(oc.forward(SD, CFG, ids, pos, mask)[0][0]).all()


def test_fp16_inv_freq_differs_slightly_at_long_positions():
    np.testing.assert_array_equal(oc._inv_freq(d, "fp16"), np.float16([1.0, 0.1, 0.01, 0.001]).astype(np.float64))
    rng = np.random.default_rng(3)
    diffs = []
    for T in (21, 300):
        ids = [int(t) for t in rng.integers(4, MASK, T - 2)] + [GMASK, SOP]
        diffs.append(np.abs(run(ids) - run(ids, inv_freq="exact")).max())
        fp32 = np.abs(run(ids, inv_freq="fp32") - run(ids, inv_freq="exact")).max()
        assert fp32 < 1e-5  # float32 frequencies are the exact ones to ~1e-8 (7e-7 here at 300)
    assert 0 < diffs[0] < diffs[1] < 0.1, diffs  # spec: 7e-4 at 21 tokens, 5e-3 at 300 (HF, head dim 16)


def test_greedy_generate_matches_the_cached_decode_and_stops_at_eop():
    prompt = [5, 9, 14, GMASK, SOP]
    out = oc.greedy_generate(SD, CFG, prompt, GMASK, MASK, SOP, EOP, 5)
    assert len(out) == 5
    pos, mask = oc.chatglm_positions(prompt, GMASK, MASK, SOP)
    logits, past = oc.forward(SD, CFG, [prompt], pos[None], mask[None])
    seq = list(prompt)
    for _ in range(5):  # spec 5's decode step: the last token alone at (m, seq_len - c), mask None
        seq.append(int(np.argmax(logits[0, -1])))
        step_pos = np.array([[[3], [len(seq) - 4]]])
        logits, past = oc.forward(SD, CFG, [seq[-1:]], step_pos, None, past=past)
    assert seq[len(prompt) :] == out
    assert oc.greedy_generate(SD, CFG, prompt, GMASK, MASK, SOP, out[0], 5) == []  # its first token as eop


def test_prefix_from_ptuning_layout():
    P, rng = 3, np.random.default_rng(4)
    emb = rng.normal(0, 1, (P, 2 * L * h))
    kv = oc.prefix_from_ptuning({"transformer.prefix_encoder.embedding.weight": emb}, CFG, P, False)
    assert len(kv) == L and kv[0][0].shape == (P, 1, H, d)
    for i, hd, j in ((0, 0, 0), (1, 2, 5), (1, 3, 15)):
        assert kv[i][0][2, 0, hd, j] == emb[2, (2 * i) * h + hd * d + j]  # key of layer i: slice 2i
        assert kv[i][1][2, 0, hd, j] == emb[2, (2 * i + 1) * h + hd * d + j]  # value: slice 2i + 1
    proj = {
        "transformer.prefix_encoder.embedding.weight": rng.normal(0, 1, (P, h)),
        "transformer.prefix_encoder.trans.0.weight": rng.normal(0, 0.1, (h, h)),
        "transformer.prefix_encoder.trans.0.bias": rng.normal(0, 0.1, h),
        "transformer.prefix_encoder.trans.2.weight": rng.normal(0, 0.1, (2 * L * h, h)),
        "transformer.prefix_encoder.trans.2.bias": rng.normal(0, 0.1, 2 * L * h),
    }
    t = np.tanh(
        proj["transformer.prefix_encoder.embedding.weight"] @ proj["transformer.prefix_encoder.trans.0.weight"].T
        + proj["transformer.prefix_encoder.trans.0.bias"]
    )
    want = t @ proj["transformer.prefix_encoder.trans.2.weight"].T + proj["transformer.prefix_encoder.trans.2.bias"]
    got = oc.prefix_from_ptuning(proj, CFG, P, True)
    np.testing.assert_allclose(got[1][1][:, 0].reshape(P, h), want[:, 3 * h : 4 * h], atol=1e-12)


def _config(folder) -> None:
    config = dict(CFG, vocab_size=V, inner_hidden_size=4 * h, gmask_token_id=GMASK, bos_token_id=SOP)
    (folder / "config.json").write_text(json.dumps(config))


def test_load_hf_folder_safetensors(tmp_path):
    half = {k: (v.astype(np.float16) if "layernorm" not in k else v.astype(np.float32)) for k, v in SD.items()}
    half["transformer.layers.0.attention.rotary_emb.inv_freq"] = np.ones(d // 4, dtype=np.float16)
    pytest.importorskip("safetensors.numpy").save_file(half, str(tmp_path / "model.safetensors"))
    _config(tmp_path)
    sd, cfg = oc.load_hf_folder(str(tmp_path))
    assert cfg["num_layers"] == L and cfg["gmask_token_id"] == GMASK and cfg["pre_seq_len"] is None
    assert set(sd) == set(SD) and all(v.dtype == np.float32 for v in sd.values())
    np.testing.assert_array_equal(
        sd["transformer.final_layernorm.weight"], SD["transformer.final_layernorm.weight"].astype(np.float32)
    )
    np.testing.assert_array_equal(
        sd["transformer.word_embeddings.weight"], SD["transformer.word_embeddings.weight"].astype(np.float16)
    )


def test_load_hf_folder_bin_shards(tmp_path):
    torch = pytest.importorskip("torch")
    names = sorted(SD)
    weight_map = {}
    for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-0000{n}-of-00002.bin"
        torch.save({k: torch.from_numpy(SD[k].astype(np.float16)) for k in part}, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _config(tmp_path)
    sd, _ = oc.load_hf_folder(str(tmp_path))
    assert set(sd) == set(SD)
    np.testing.assert_array_equal(sd[names[-1]], SD[names[-1]].astype(np.float16))
