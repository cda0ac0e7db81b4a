"""runtime/engine.py on the bundled model, without threads or sockets: requests submitted at staggered steps
give exactly their one-by-one answers (greedy and seeded sampling), rows stay packed, a cancel leaves the
others unchanged, the queue limit and too-long prompts give their errors. Every loop is bounded in steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glm_runtime.engine import Engine, EngineError, QueueFull
from glm_runtime.generate import fill_blanks
from glm_runtime.requests import FillRequest
from glm_runtime.sampling import GenerationError
from glm_runtime.session import BUNDLED_MODEL, OnnxRuntimeSession, open_model

N = 6  # max_new_tokens: some spans end with eop, others reach the budget
MAX_STEPS = 400  # far above what any test here needs: a loop that does not end fails instead of hanging

PROMPTS = [
    "The capital of France is [MASK].",
    "He went to the [MASK] and bought [MASK] for dinner.",
    "Once upon a time [gMASK]",
    "The [sMASK] was very good.",
    "[MASK] is the best way to learn.",
    "She said that [MASK] would come [MASK] the [MASK].",
    "A long time ago, in a small village near the sea, there lived an old fisherman who [sMASK]",
    "Water boils at [MASK] degrees.",
]


@pytest.fixture(scope="module")
def model():
    return open_model(None, "onnxruntime")


class Counting:
    """A session that records the batch width of every call (and delegates everything else)."""

    def __init__(self, inner):
        self.inner, self.widths = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, feeds):
        self.widths.append((feeds["input_ids"].shape[0], feeds["input_ids"].shape[1]))
        return self.inner.run(feeds)


def alone(session, tok, prompt, **settings):
    (result,) = fill_blanks(session, tok, [prompt], **settings)
    return result


def run_staggered(engine, prompts, every=1, **settings):
    """Submit two prompts, then one more every `every` steps, stepping until all are done."""
    requests, pending, steps = [], list(prompts), 0
    while pending or engine.has_work():
        if pending and (not requests or steps % every == 0):
            for _ in range(2 if not requests else 1):
                if pending:
                    requests.append(engine.submit(FillRequest.make(pending.pop(0), **settings)))
        engine.step()
        steps += 1
        assert steps < MAX_STEPS
    return requests


@pytest.mark.parametrize(
    "settings",
    [dict(max_new_tokens=N), dict(max_new_tokens=N, strategy="sample", seed=7, top_k=20)],
    ids=["greedy", "seeded-sample"],
)
def test_staggered_requests_equal_their_one_by_one_answers(model, settings):
    session, tok = model
    engine = Engine(session, tok, rows=3)
    requests = run_staggered(engine, PROMPTS, every=2, **settings)
    assert engine.decode_rows / engine.steps > 1.5  # requests did share decode calls
    for prompt, request in zip(PROMPTS, requests):
        assert request.state == "finished"
        single = alone(session, tok, prompt, **settings)
        assert request.result.tokens == single.tokens, prompt
        assert request.result.text == single.text


def test_mixed_settings_in_one_batch_each_equal_alone(model):
    session, tok = model
    engine = Engine(session, tok, rows=4)
    mixed = [
        dict(max_new_tokens=3),
        dict(max_new_tokens=8, strategy="sample", seed=1, temperature=0.7),
        dict(max_new_tokens=5, strategy="sample", seed=2, top_p=0.9),
        dict(max_new_tokens=4, strategy="beam", num_beams=2),
        dict(max_new_tokens=7, append_gmask=True),
    ]
    texts = PROMPTS[:4] + ["The weather today is"]
    requests = [engine.submit(FillRequest.make(text, **s)) for text, s in zip(texts, mixed)]
    engine.run_until_done(MAX_STEPS)
    for text, s, request in zip(texts, mixed, requests):
        assert request.result.tokens == alone(session, tok, text, **s).tokens, (text, s)


def test_rows_stay_packed_and_each_step_is_one_call(model):
    session, tok = model
    counting = Counting(session)
    engine = Engine(counting, tok, rows=3)
    for prompt in PROMPTS:
        engine.submit(FillRequest.make(prompt, max_new_tokens=N))
    for _ in range(MAX_STEPS):
        if not engine.has_work():
            break
        before = len(counting.widths)
        engine.step()
        decode = [w for w in counting.widths[before:] if w[1] == 1]
        assert len(decode) == 1  # one decode call per step, whatever blank or span each row is in
        m = len(engine.running)
        assert all(not r.done for r in engine.running)
        assert (engine.cache.filled[m:] == 0).all() and not engine.cache.visible[m:].any()  # free rows hold nothing
        for r, request in enumerate(engine.running):  # each running row's slots are its own: context + fed tokens
            assert engine.cache.filled[r] == len(request.prompt.ids) + _fed(request)
    assert not engine.has_work()
    # a waiting request joined as soon as a row freed: the decode width stayed at 3 until the queue ran dry
    widths = [w[0] for w in counting.widths if w[1] == 1]
    assert widths[:3] == [3, 3, 3] and max(widths) == 3


def _fed(request) -> int:
    """Tokens a running request has fed: sop + span per finished blank (a stop token is never fed, a budget-ended
    span's last token is), then `step` of the current span; while flushing, that span is in `spans` already."""
    spans = request.spans[:-1] if request.flush else request.spans
    return sum(1 + len(s.token_ids) for s in spans) + request.step


def test_cancel_mid_span_leaves_the_others_unchanged(model):
    session, tok = model
    engine = Engine(session, tok, rows=4)
    requests = [engine.submit(FillRequest.make(p, max_new_tokens=N)) for p in PROMPTS[:4]]
    victim = requests[2]  # "Once upon a time [gMASK]": runs the whole budget
    for _ in range(3):
        engine.step()
    assert victim.state == "running" and victim.span  # mid-span
    engine.cancel(victim)
    events = engine.step()
    assert victim.state == "cancelled" and victim not in engine.running
    assert [e.kind for e in events if e.prompt == victim.id] == ["cancelled"]
    late = engine.submit(FillRequest.make(PROMPTS[4], max_new_tokens=N))  # takes the freed row
    engine.run_until_done(MAX_STEPS)
    for prompt, request in zip(PROMPTS[:4] + PROMPTS[4:5], requests + [late]):
        if request is not victim:
            assert request.result.tokens == alone(session, tok, prompt, max_new_tokens=N).tokens


def test_cancel_while_waiting_never_runs(model):
    session, tok = model
    engine = Engine(session, tok, rows=1)
    first, second = (
        engine.submit(FillRequest.make(PROMPTS[0], max_new_tokens=N)),
        engine.submit(FillRequest.make(PROMPTS[1], max_new_tokens=N)),
    )
    engine.cancel(second)
    engine.run_until_done(MAX_STEPS)
    assert first.state == "finished" and second.state == "cancelled" and second.admitted_at is None


def test_queue_limit_and_too_long_prompts_are_refused_before_taking_a_row(model):
    session, tok = model
    engine = Engine(session, tok, rows=1, max_waiting=1)
    engine.submit(FillRequest.make(PROMPTS[0], max_new_tokens=N))  # takes the row at the next step
    engine.submit(FillRequest.make(PROMPTS[1], max_new_tokens=N))  # waits
    with pytest.raises(QueueFull, match="busy") as info:
        engine.submit(FillRequest.make(PROMPTS[2], max_new_tokens=N))
    assert info.value.retry_after >= 1
    engine.step()  # the first runs, the second still waits: the limit holds
    with pytest.raises(QueueFull):
        engine.submit(FillRequest.make(PROMPTS[2], max_new_tokens=N))
    P = session.config.max_sequence_length
    with pytest.raises(GenerationError, match=f"too long for the model.*max_sequence_length {P}"):
        engine.submit(FillRequest.make("word " * P + "[MASK]", max_new_tokens=N))
    with pytest.raises(GenerationError, match="max_new_tokens must be"):
        engine.submit(FillRequest.make(PROMPTS[0], max_new_tokens=0))
    assert engine.waiting == 1 and len(engine.running) == 1
    with pytest.raises(EngineError, match="rows must be"):
        Engine(session, tok, rows=0)


def test_device_cache_engine_equals_host(model):
    # io_binding=True is the CUDA provider's cache code (OrtValues, the scatter graph) run on the CPU device:
    # a device cache cannot be sliced, so every row is fed and free rows get a dummy
    pytest.importorskip("onnx")
    _, tok = model
    device = OnnxRuntimeSession(BUNDLED_MODEL, io_binding=True)
    engine = Engine(device, tok, rows=3)
    assert not engine.cache.sliceable
    requests = run_staggered(engine, PROMPTS[:5], every=2, max_new_tokens=N)
    host, _ = model
    for prompt, request in zip(PROMPTS, requests):
        assert request.result.tokens == alone(host, tok, prompt, max_new_tokens=N).tokens


def test_failure_ends_every_request(model):
    session, tok = model
    engine = Engine(session, tok, rows=2)
    requests = [engine.submit(FillRequest.make(p, max_new_tokens=N)) for p in PROMPTS[:3]]
    engine.step()
    victims = engine.fail_all("the session died")
    assert set(victims) == set(requests) and all(r.state == "failed" for r in requests)
    assert not engine.has_work() and np.all(engine.cache.filled == 0)


def test_cli_jsonl_fills_every_good_line_and_names_the_bad_one(model, tmp_path):
    """glmx fill --jsonl on the engine: the good lines print in input order, equal to one by one; a bad line is
    named with its line number and the exit status is 1, without losing the others."""
    from click.testing import CliRunner

    from glm_runtime.cli import main

    session, tok = model
    lines = [
        {"prompt": PROMPTS[0]},
        {"prompt": "no blank here"},
        PROMPTS[1],
        {"prompt": PROMPTS[3], "max_new_tokens": 3},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["fill", "--jsonl", str(path), "--json", "--max-new-tokens", str(N), "--rows", "2"]
    )
    assert result.exit_code == 1
    out = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    want = [
        alone(session, tok, PROMPTS[0], max_new_tokens=N),
        alone(session, tok, PROMPTS[1], max_new_tokens=N),
        alone(session, tok, PROMPTS[3], max_new_tokens=3),
    ]
    assert [o["tokens"] for o in out] == [w.tokens for w in want]
    assert result.output.splitlines()[-1].startswith(f"Error: {path} line 2: the text has no blank to fill")


def test_cli_jsonl_names_each_bad_line_once(tmp_path):
    """Lines that are not requests (bad JSON, no prompt, an unknown key) and a bad setting are each named by their
    line number once, never twice ("f line 2: f line 2 is not JSON")."""
    from click.testing import CliRunner

    from glm_runtime.cli import main

    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"prompt": "a [MASK]", "max_new_tokens": 2}\nnot json\n{"prompt": 3}\n{"prompt": "b [MASK]", "bogus": 1}\n'
        '{"prompt": "c [MASK]", "top_k": 3}\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["fill", "--jsonl", str(path)])
    assert result.exit_code == 1
    said = [line for line in result.output.splitlines() if "line " in line and not line.startswith("Error")]
    assert [line.startswith(f"{path} line {n}") for line, n in zip(said, (2, 3, 4, 5))] == [True] * 4, said
    assert len(said) == 4, said
    assert all(line.count(f"{path} line") == 1 for line in said), said
    assert said[0].startswith(f"{path} line 2 is not JSON")
