"""runtime/generate.py and friends: the blank-filling loop on ONNX Runtime against the torch reference, the
incremental cache against one full pass (docs/glm.md 4.2), batches, beam search, sampling, streaming, the loop's
feeds on a scripted session, every bad input's message, and `glmx fill`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glm_runtime import sampling
from glm_runtime.generate import fill_blanks, stream_blanks
from glm_runtime.sampling import GenerationError
from glm_runtime.tokenizer import build_context_ids, find_blanks
from tests.fill_fixtures import PROMPTS, ScriptedSession

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

N = 8  # max_new_tokens in most tests: some spans end with eop, some reach this budget


@pytest.fixture(scope="module")
def tok_file(fill_tok_file):
    return fill_tok_file


@pytest.fixture(scope="module")
def tok(fill_tok):
    return fill_tok


@pytest.fixture(scope="module")
def model(fill_model):
    return fill_model


@pytest.fixture(scope="module")
def torch_session(model):
    from glm_export.reference_session import TorchSession

    return TorchSession(model)


@pytest.fixture(scope="module")
def onnx_dir(fill_onnx):
    return fill_onnx


@pytest.fixture(scope="module")
def ort(onnx_dir):
    from glm_runtime.session import OnnxRuntimeSession

    return OnnxRuntimeSession(onnx_dir)


@pytest.fixture(scope="module")
def greedy_ort(ort, tok):
    return fill_blanks(ort, tok, PROMPTS, max_new_tokens=N)


class Recording:
    """Wraps a session and keeps every call's feeds and outputs (everything else is the inner session's)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, feeds):
        out = self.inner.run(feeds)
        self.calls.append(({k: np.array(v) for k, v in feeds.items()}, out))
        return out


# ---------------------------------------------------------------- ONNX Runtime against the torch reference


def test_greedy_onnx_equals_torch_token_for_token(greedy_ort, torch_session, tok):
    ref = fill_blanks(torch_session, tok, PROMPTS, max_new_tokens=N)
    for ours, theirs in zip(greedy_ort, ref):
        assert ours.tokens == theirs.tokens
        assert ours.text == theirs.text
        assert [s.token_ids for s in ours.spans] == [s.token_ids for s in theirs.spans]
    stops = {s.stop for r in greedy_ort for s in r.spans}
    assert stops == {"eop", "length"}  # both endings (and the flush after a budget-ended span) are exercised
    blanks = {s.blank for r in greedy_ort for s in r.spans}
    assert blanks == {"[MASK]", "[sMASK]", "[gMASK]"}


def test_result_layout(greedy_ort, tok):
    # tokens = context ids, then sop + span per blank (docs/glm.md 4.1 output); one span per blank, in order
    for prompt, result in zip(PROMPTS, greedy_ort):
        ids = build_context_ids(tok, prompt)
        assert result.tokens[: len(ids)] == ids
        tail = []
        for span in result.spans:
            tail += [tok.special["sop"], *span.token_ids]
        assert result.tokens[len(ids) :] == tail
        assert [s.position for s in result.spans] == [p for p, _ in find_blanks(ids, tok)]
        assert all(len(s.token_ids) <= N for s in result.spans)
        assert result.timings["total_s"] > 0


def test_incremental_loop_equals_one_full_pass(ort, tok, model):
    """Spec 4.2: the cached loop's logits equal one forward over context + every sop/span with sep = C."""
    flushed = 0
    for prompt in PROMPTS[:4]:
        rec = Recording(ort)
        (result,) = fill_blanks(rec, tok, [prompt], max_new_tokens=N)
        ids = build_context_ids(tok, prompt)
        C = len(ids)
        tokens, pos, block = list(ids), list(range(C)), [0] * C
        for k, span in enumerate(result.spans):
            fed = [tok.special["sop"], *span.token_ids]
            if k == len(result.spans) - 1 and span.stop == "length":
                fed = fed[:-1]  # the last token of the last span is never fed
            elif span.stop == "length":
                flushed += 1  # its last token is fed once more so later spans see it
            tokens += fed
            pos += [span.position] * len(fed)
            block += list(range(1, len(fed) + 1))
        with torch.no_grad():
            full, _ = model(torch.tensor([tokens]), torch.tensor([[pos, block]]), C)  # scalar sep = C
        full = full[0].numpy()
        context_logits = rec.calls[0][1]["logits"][0]
        steps = np.concatenate([out["logits"][0] for _, out in rec.calls[1:]])
        assert [int(f["input_ids"][0, 0]) for f, _ in rec.calls[1:]] == tokens[C:]
        # the runtime asks for the context's last position only (logits_start), the one it samples from
        assert context_logits.shape == full[C - 1 : C].shape
        assert np.abs(context_logits - full[C - 1 : C]).max() < 1e-4
        assert steps.shape == full[C:].shape
        assert np.abs(steps - full[C:]).max() < 1e-4
    assert flushed  # a budget-ended span before another blank was among the cases


def test_batch_equals_one_by_one(greedy_ort, ort, tok):
    for prompt, batched in zip(PROMPTS, greedy_ort):
        (alone,) = fill_blanks(ort, tok, [prompt], max_new_tokens=N)
        assert alone.tokens == batched.tokens
        assert alone.text == batched.text


def test_device_cache_path_equals_host_path(onnx_dir, tok, greedy_ort):
    # io_binding=True is the CUDA path's code (OrtValues + the in-place scatter graph), run on the CPU device
    pytest.importorskip("onnx")
    from glm_runtime.session import OnnxRuntimeSession

    session = OnnxRuntimeSession(onnx_dir, io_binding=True)
    assert session.device == ("cpu", 0)
    results = fill_blanks(session, tok, PROMPTS, max_new_tokens=N)
    assert [r.tokens for r in results] == [r.tokens for r in greedy_ort]


# ---------------------------------------------------------------- beam search


def test_beam_with_one_beam_equals_greedy(ort, tok, greedy_ort):
    beams = fill_blanks(ort, tok, PROMPTS, max_new_tokens=N, strategy="beam", num_beams=1)
    assert [r.tokens for r in beams] == [r.tokens for r in greedy_ort]


def _reference_beam(model, tok, prompt, k, budget, length_penalty):
    """Beam search written again with full forward passes (no cache, no reorder): the independent reference."""
    ids = build_context_ids(tok, prompt)
    C, sop = len(ids), tok.special["sop"]
    stops = {tok.special["eop"], tok.special["eos"]}
    part_b: list[tuple[int, int, int]] = []  # (token, position, block) of earlier spans
    spans = []

    def logprobs(mask_pos, tokens):
        seq = part_b + [(t, mask_pos, j + 1) for j, t in enumerate([sop, *tokens])]
        x = torch.tensor([ids + [t for t, _, _ in seq]])
        p = torch.tensor([[list(range(C)) + [q for _, q, _ in seq], [0] * C + [b for _, _, b in seq]]])
        with torch.no_grad():
            logits, _ = model(x, p, C)
        return torch.log_softmax(logits[0, -1].double(), -1).numpy()

    for mask_pos, _ in find_blanks(ids, tok):
        live, finished = [([], 0.0)], []
        for step in range(budget):
            cands = []
            for b, (tokens, score) in enumerate(live):
                lp = logprobs(mask_pos, tokens)
                cands += [(score + lp[v], b, v) for v in range(len(lp))]
            cands.sort(key=lambda c: -c[0])
            nxt = []
            for rank, (score, b, v) in enumerate(cands[: 2 * k]):
                if v in stops:
                    if rank < k:
                        finished.append((score / (len(live[b][0]) + 1) ** length_penalty, live[b][0]))
                    continue
                nxt.append((live[b][0] + [v], score))
                if len(nxt) == k:
                    break
            finished = sorted(finished, key=lambda f: -f[0])[:k]
            if len(finished) >= k and finished[-1][0] >= max(s for _, s in nxt) / (step + 1) ** length_penalty:
                break
            live = nxt
            if step + 1 == budget:
                finished += [(s / budget**length_penalty, t) for t, s in live]
        best = max(finished, key=lambda f: f[0])[1]
        spans.append(best)
        part_b += [(t, mask_pos, j + 1) for j, t in enumerate([sop, *best])]
    return spans


def test_beam_search_equals_full_pass_reference(ort, tok, model):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[5]]
    results = fill_blanks(ort, tok, prompts, max_new_tokens=4, strategy="beam", num_beams=3, length_penalty=1.0)
    for prompt, result in zip(prompts, results):
        assert [s.token_ids for s in result.spans] == _reference_beam(model, tok, prompt, 3, 4, 1.0)


def test_beam_search_is_deterministic_and_differs_from_greedy_somewhere(ort, tok, greedy_ort):
    a = fill_blanks(ort, tok, PROMPTS, max_new_tokens=N, strategy="beam", num_beams=4, length_penalty=0.0)
    b = fill_blanks(ort, tok, PROMPTS, max_new_tokens=N, strategy="beam", num_beams=4, length_penalty=0.0)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in greedy_ort]


# ---------------------------------------------------------------- sampling


def test_sampling_same_seed_same_output(ort, tok):
    kw = dict(max_new_tokens=N, strategy="sample", temperature=0.9, top_k=40, top_p=0.95)
    a = fill_blanks(ort, tok, PROMPTS, seed=7, **kw)
    b = fill_blanks(ort, tok, PROMPTS, seed=7, **kw)
    c = fill_blanks(ort, tok, PROMPTS, seed=8, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_sampling_with_top_k_1_is_greedy(ort, tok, greedy_ort):
    results = fill_blanks(ort, tok, PROMPTS, max_new_tokens=N, strategy="sample", top_k=1, seed=3)
    assert [r.tokens for r in results] == [r.tokens for r in greedy_ort]


def test_filters_by_hand():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    assert np.isfinite(sampling.top_k_filter(logits, 2)).tolist() == [[True, True, False], [False, True, True]]
    assert np.isfinite(sampling.top_k_filter(logits, 0)).all()
    assert np.isfinite(sampling.top_p_filter(logits, 0.5)).tolist() == [[True, False, False], [False, True, False]]
    assert np.isfinite(sampling.top_p_filter(logits, 0.55)).tolist() == [[True, True, False], [False, True, False]]
    assert np.isfinite(sampling.top_p_filter(logits, 0.7)).tolist() == [[True, True, False], [False, True, True]]
    assert np.isfinite(sampling.top_p_filter(logits, 1.0)).all()
    assert sampling.greedy(logits).tolist() == [0, 1]


def test_sample_follows_the_distribution():
    probs = np.array([0.5, 0.3, 0.2])
    rows = 3000
    drawn = sampling.sample(np.tile(np.log(probs), (rows, 1)), sampling.make_generators(0, rows))
    freq = np.bincount(drawn, minlength=3) / rows
    assert np.abs(freq - probs).max() < 0.03  # ~4 standard errors
    cold = sampling.sample(np.tile(np.log(probs), (5, 1)), sampling.make_generators(1, 5), temperature=1e-4)
    assert cold.tolist() == [0] * 5


# ---------------------------------------------------------------- streaming


def test_stream_gives_tokens_then_spans_then_results(ort, tok, greedy_ort):
    events = []
    results = fill_blanks(ort, tok, PROMPTS, max_new_tokens=N, stream=events.append)
    assert [r.tokens for r in results] == [r.tokens for r in greedy_ort]
    for p, result in enumerate(results):
        mine = [e for e in events if e.prompt == p]
        for k, span in enumerate(result.spans):
            assert [e.token_id for e in mine if e.kind == "token" and e.blank == k] == span.token_ids
            (done,) = [e for e in mine if e.kind == "span" and e.blank == k]
            assert done.span == span
            last_token = max([i for i, e in enumerate(mine) if e.kind == "token" and e.blank == k], default=-1)
            assert mine.index(done) > last_token
        assert mine[-1].kind == "result" and mine[-1].result == result
    iterated = list(stream_blanks(ort, tok, PROMPTS, max_new_tokens=N))
    assert [(e.kind, e.prompt, e.blank, e.token_id) for e in iterated] == [
        (e.kind, e.prompt, e.blank, e.token_id) for e in events
    ]


# ---------------------------------------------------------------- the loop's feeds, on a scripted session


def _scripted(tok, prompt, plans):
    ids = build_context_ids(tok, prompt)
    blanks = [p for p, _ in find_blanks(ids, tok)]
    return ScriptedSession({m: plan for m, plan in zip(blanks, plans)}, tok.special["eop"]), ids, blanks


def test_spans_are_spliced_into_the_text(tok):
    prompt = "the quick [MASK] fox jumps [sMASK] lazy dog"
    session, _, _ = _scripted(tok, prompt, [tok.encode(" brown"), tok.encode(" over the")])
    (result,) = fill_blanks(session, tok, [prompt], max_new_tokens=N)
    assert result.text == "the quick brown fox jumps over the lazy dog"
    assert [s.text for s in result.spans] == [" brown", " over the"]
    assert [s.stop for s in result.spans] == ["eop", "eop"]


def test_append_gmask_continues_the_text(tok):
    session, _, _ = _scripted(tok, "a stitch in time [gMASK]", [tok.encode(" saves nine")])
    (result,) = fill_blanks(session, tok, ["a stitch in time"], append_gmask=True, max_new_tokens=N)
    assert result.text == "a stitch in time saves nine"
    assert result.spans[0].blank == "[gMASK]"


def test_positions_and_masks_fed_by_the_loop(tok):
    # blank 1 ends by budget (2 of 5 planned tokens): its last token is fed once more ("flush") before blank 2
    prompt = "all [MASK] is [MASK] gold"
    plan1, plan2 = [40, 41, 42, 43, 44], [50, 51, 52]
    session, ids, (m1, m2) = _scripted(tok, prompt, [plan1, plan2])
    (result,) = fill_blanks(session, tok, [prompt], max_new_tokens=2)
    C, sop = len(ids), tok.special["sop"]
    assert [s.token_ids for s in result.spans] == [[40, 41], [50, 51]]
    assert [s.stop for s in result.spans] == ["length", "length"]
    context, *steps = session.calls
    assert context["input_ids"].tolist() == [ids]
    assert context["position_ids"].tolist() == [[list(range(C)), [0] * C]]
    assert context["attention_mask"].all()
    fed = [(int(f["input_ids"][0, 0]), *f["position_ids"][0, :, 0].tolist()) for f in steps]
    assert fed == [
        (sop, m1, 1),
        (40, m1, 2),
        (41, m1, 3),  # sop, t1, then the flush of t2 at block 3
        (sop, m2, 1),
        (50, m2, 2),
    ]  # the last span's last token is never fed
    seen = [int(f["attention_mask"][0, 0, 0].sum()) for f in steps]
    assert seen == [C + 1, C + 2, C + 3, C + 4, C + 5]  # every filled slot + itself: later spans see earlier


def test_batch_rows_are_padded_and_finished_rows_leave_the_batch(tok):
    short, long = "a [MASK]", "all that glitters [MASK] not [MASK]"
    ids_s, ids_l = build_context_ids(tok, short), build_context_ids(tok, long)
    plans = {p: [60] for p, _ in find_blanks(ids_s, tok) + find_blanks(ids_l, tok)}
    session = ScriptedSession(plans, tok.special["eop"])
    fill_blanks(session, tok, [short, long], max_new_tokens=4)
    context = session.calls[0]
    assert context["input_ids"][0].tolist() == ids_s + [tok.special["pad"]] * (len(ids_l) - len(ids_s))
    assert not context["attention_mask"][0, 0, : len(ids_s), len(ids_s) :].any()
    # the short prompt (one blank) finished first: its row left, the long prompt's row moved up (rows stay packed)
    widths = [call["input_ids"].shape[0] for call in session.calls[1:]]
    assert widths[0] == 2 and widths[-1] == 1 and widths == sorted(widths, reverse=True)
    m2 = find_blanks(ids_l, tok)[1][0]
    assert session.calls[-1]["position_ids"][0, 0, 0] == m2


# ---------------------------------------------------------------- bad input: each message, before any work


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="sample", temperature=0), "temperature must be a number > 0"),
        (dict(strategy="sample", temperature=-1.0), "temperature must be a number > 0"),
        (dict(strategy="sample", top_p=0.0), "top_p must be in (0, 1]"),
        (dict(strategy="sample", top_p=1.5), "top_p must be in (0, 1]"),
        (dict(strategy="sample", top_k=-1), "top_k must be an integer >= 0"),
        (dict(strategy="sample", top_k=2.5), "top_k must be an integer >= 0"),
        (dict(strategy="beam", num_beams=0), "num_beams must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(strategy="nucleus"), "unknown strategy 'nucleus'"),
        (dict(strategy="sample", seed=-1), "seed must be a non-negative integer"),
        (dict(strategy="beam", length_penalty=float("nan")), "length_penalty must be a finite number"),
        # an option the strategy does not read is refused, never ignored
        (dict(num_beams=4), "--num-beams applies to --strategy beam, not greedy"),
        (dict(strategy="beam", temperature=0.7), "--temperature applies to --strategy sample, not beam"),
        (dict(strategy="beam", seed=1), "--seed applies to --strategy sample, not beam"),
        (dict(strategy="sample", early_stopping=True), "--early-stopping applies to --strategy beam"),
        (dict(temperature=0), "--temperature applies to --strategy sample, not greedy"),
    ],
)
def test_bad_settings_are_refused(tok, kwargs, message):
    session = ScriptedSession({}, tok.special["eop"])
    with pytest.raises(GenerationError) as info:
        fill_blanks(session, tok, ["a [MASK]"], **kwargs)
    assert message in str(info.value)
    assert session.calls == []


def test_prompt_without_blank_is_refused(tok):
    session = ScriptedSession({}, tok.special["eop"])
    with pytest.raises(GenerationError, match=r"prompt 1: the text has no blank to fill.*append_gmask"):
        fill_blanks(session, tok, ["a [MASK]", "no blank here"])
    assert session.calls == []


def test_prompt_too_long_is_refused_before_any_work(tok):
    session = ScriptedSession({}, tok.special["eop"])  # glm-tiny: P = 128
    prompt = "the quick brown fox [MASK] " * 6
    with pytest.raises(GenerationError) as info:
        fill_blanks(session, tok, [prompt], max_new_tokens=40)
    text = str(info.value)
    assert "prompt 0 is too long" in text and "> max_sequence_length 128" in text and "lower max_new_tokens" in text
    assert session.calls == []
    with pytest.raises(GenerationError, match="shorten the prompt"):
        fill_blanks(session, tok, ["fox " * 130 + "[MASK]"], max_new_tokens=1)


def test_empty_prompt_list_is_refused(tok):
    with pytest.raises(GenerationError, match="non-empty list"):
        fill_blanks(ScriptedSession({}, tok.special["eop"]), tok, [])


# ---------------------------------------------------------------- glmx fill


def _cli(*args, input=None):
    from click.testing import CliRunner

    from glm_export.cli import main

    return CliRunner().invoke(main, ["fill", *args], input=input)


def test_cli_prints_the_filled_text(onnx_dir, greedy_ort):
    res = _cli(PROMPTS[0], "--model", str(onnx_dir), "--max-new-tokens", str(N))
    assert res.exit_code == 0, res.output
    assert res.output == greedy_ort[0].text + "\n"


def test_cli_json_stdin_and_jsonl(onnx_dir, greedy_ort, tmp_path):
    res = _cli(
        "--stdin", "--json", "--model", str(onnx_dir), "--max-new-tokens", str(N), input="\n".join(PROMPTS[:2]) + "\n"
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [r["tokens"] for r in rows] == [r.tokens for r in greedy_ort[:2]]
    assert rows[0]["prompt"] == PROMPTS[0] and rows[0]["spans"][0]["blank"] == "[MASK]"
    assert set(rows[0]["timings"]) >= {"context_s", "decode_s", "total_s"}
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": PROMPTS[2]}) + "\n" + json.dumps(PROMPTS[3]) + "\n")
    res = _cli("--jsonl", str(lines), "--model", str(onnx_dir), "--max-new-tokens", str(N))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [greedy_ort[2].text, greedy_ort[3].text]


def test_cli_torch_backend_on_a_checkpoint_matches(model, tok_file, tmp_path, greedy_ort):
    from glm_export.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_file=tok_file)
    res = _cli(PROMPTS[0], "--model", str(ckpt), "--backend", "torch", "--max-new-tokens", str(N), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tokens"] == greedy_ort[0].tokens


@pytest.mark.parametrize(
    "args,message",
    [
        (["no blank here"], "the text has no blank to fill"),
        (["a [MASK]", "--strategy", "sample", "--temperature", "0"], "temperature must be a number > 0"),
        (["a [MASK]", "--strategy", "sample", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["a [MASK]", "--num-beams", "4"], "--num-beams applies to --strategy beam"),
        (["a [MASK]", "--num-beams", "0", "--strategy", "beam"], "num_beams must be an integer >= 1"),
        (["a [MASK]", "--max-new-tokens", "500"], "too long for the model"),
        ([], "give exactly one of"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(onnx_dir, args, message):
    res = _cli(*args, "--model", str(onnx_dir))
    assert res.exit_code == 1
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_cli_unknown_backend_and_missing_model(onnx_dir, tmp_path):
    res = _cli("a [MASK]", "--model", str(onnx_dir), "--backend", "tpu")
    assert res.exit_code == 1 and "tpu" in res.output
    res = _cli("a [MASK]", "--model", str(tmp_path / "nowhere"))
    assert res.exit_code == 1 and "does not exist" in res.output


@pytest.mark.parametrize("strategy", [["--strategy", "greedy"], ["--strategy", "beam", "--num-beams", "2"]])
def test_json_timings_count_in_integers(strategy):
    """--json's decode_steps and new_tokens are counts: JSON integers, not 3.0 (greedy through the pool and beam)."""
    from click.testing import CliRunner

    from glm_runtime.cli import main

    result = CliRunner().invoke(main, ["fill", "--json", "--max-new-tokens", "3", *strategy, "The [MASK] sat."])
    assert result.exit_code == 0, result.output
    timings = json.loads(result.output)["timings"]
    assert isinstance(timings["decode_steps"], int) and isinstance(timings["new_tokens"], int), timings
    assert isinstance(timings["total_s"], float)
