"""Pipeline stages (runtime/stages.py, stage_worker.py, pipeline.py, serve_pipeline.py) against the whole graph.

Fast: the cut (each stage's outputs chained equal the whole graph's logits and presents; a rotary ChatGLM too),
each stage's weights are its layers' initializers (the parent's bytes, counted from the parent graph), the cache
(cut once, a tampered file refused, the model folder untouched), and the engine on in-process stages token for
token as on one session. Slow (`.ci/run`): a local Ray cluster (`ray start --head` in a temp dir, 127.0.0.1), a
real `glmx serve --stages 2` and `--stages 3` answering 8 concurrent clients as the single-process engine does
(greedy and seeded sampling), a stage actor killed (clear errors, /health 503, then recovery), each stage's
process memory, the servers stopped by their PID and the cluster stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from glm_runtime.stages import STAGE_DATA, StageError, cut_stages, ensure_stage, read_stage, stage_ranges

pytest.importorskip("onnx")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


def test_stage_ranges_are_contiguous_and_even():
    assert stage_ranges(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert stage_ranges(70, 4) == [(0, 18), (18, 36), (36, 53), (53, 70)]
    assert stage_ranges(2, 1) == [(0, 2)]
    assert stage_ranges(70, [14, 19, 19, 18]) == [(0, 14), (14, 33), (33, 52), (52, 70)]
    for bad in (0, 5):
        with pytest.raises(StageError, match="between 1 and the model's 4 layers"):
            stage_ranges(4, bad)
    with pytest.raises(StageError, match=r"add up to 3, not the model's 4"):
        stage_ranges(4, [1, 2])
    with pytest.raises(StageError, match="a whole number of layers >= 1"):
        stage_ranges(4, [4, 0])
    for bad in (True, 2.0, "2"):
        with pytest.raises(StageError, match="a number of stages"):
            stage_ranges(4, bad)


def _chained(model_folder: Path, stages: int, root: Path, feeds: dict) -> tuple[np.ndarray, dict]:
    """The stages run one after another in this process (no Ray): the last stage's logits, every present."""
    from glm_runtime.stage_worker import StageWorker

    x, presents = None, {}
    for k in range(stages):
        worker = StageWorker(str(model_folder), stages, k, str(root))
        names = [n for i in worker.layers for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
        plain = {n: v for n, v in feeds.items() if not n.startswith("past_key_values.")}
        x = worker.forward("run", 0, (0, len(feeds["input_ids"])), plain, {n: feeds[n] for n in names}, x)
        presents.update(worker.fetch("run"))
    assert x is not None
    return x, presents


def _context(session, contexts):
    from glm_runtime.steps import context_feeds

    return context_feeds(session, contexts, 0)


@pytest.mark.parametrize("which, stages", [("fill", 2), ("bundled", 4)])
def test_the_stages_chained_are_the_whole_graph(fill_onnx, tmp_path, which, stages):
    from glm_runtime.session import default_model, open_model

    folder = fill_onnx if which == "fill" else default_model()  # 2 layers; 4 layers
    session, _ = open_model(folder)
    feeds = _context(session, [[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    want = session.run(feeds)
    logits, presents = _chained(folder, stages, tmp_path, feeds)
    # the same nodes and the same weight bytes in the same order: equal to fp32 rounding of the kernels' threading
    np.testing.assert_allclose(logits, want["logits"], rtol=0, atol=1e-5)
    assert sorted(presents) == sorted(n for n in want if n.startswith("present."))
    for name, value in presents.items():
        np.testing.assert_allclose(value, want[name], rtol=0, atol=1e-5)


def test_each_stage_holds_its_layers_weights_only(tmp_path):
    """Stage k's data file holds exactly the parent's initializers its nodes read: its layers' (named
    transformer.layers.{i}.*), the embedding tables on stage 0, the final LayerNorm (and the tied embedding) on the
    last. Counted from the parent graph, independently of the cut."""
    import onnx

    from glm_runtime.session import default_model

    parent = onnx.load(str(default_model() / "model.onnx"))
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in parent.graph.initializer}
    weights = {n for n in sizes if not n.startswith("const/") and n != "logits_start"}  # the model's, not constants
    folders = cut_stages(default_model(), 3, tmp_path)
    for k, folder in enumerate(folders):
        record = read_stage(folder, verify=True)
        start, stop = record["layers"]
        mine = {
            n
            for n in weights
            if any(n.startswith(f"transformer.layers.{i}.") for i in range(start, stop))
            or (k == 0 and "embeddings" in n)
            or (k == 2 and ("final_layernorm" in n or n == "word_embeddings.weight"))
        }
        stage = onnx.load(str(folder / "stage.onnx"))
        held = {t.name for t in stage.graph.initializer if t.name in weights}
        assert held == mine, (k, sorted(held ^ mine))
        layer_bytes = sum(sizes[n] for n in mine)
        assert layer_bytes <= record["weights_bytes"] <= layer_bytes + 4096  # + the graph's small constants
        assert (folder / STAGE_DATA).stat().st_size < layer_bytes + 4096 * len(sizes)  # + alignment only
        assert record["parent"]["model_sha256"] and record["stage"] == k and record["stages"] == 3


def test_stages_are_cut_once_and_never_into_the_model_folder(fill_onnx, tmp_path):
    before = _snapshot(fill_onnx)
    first = cut_stages(fill_onnx, 2, tmp_path)
    files = [_snapshot(f) for f in first]
    again = cut_stages(fill_onnx, 2, tmp_path)
    assert again == first and [_snapshot(f) for f in again] == files  # cached: nothing rewritten
    assert _snapshot(fill_onnx) == before
    assert all(tmp_path in f.parents for f in first)
    with open(first[1] / STAGE_DATA, "r+b") as fh:  # a flipped byte in the weights
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StageError, match="not the file stage.json hashed; cut it again"):
        read_stage(first[1], verify=True)
    record = json.loads((first[0] / "stage.json").read_text())
    record["parent"]["model_sha256"] = "0" * 64  # cut from another model: cut again, atomically, in place
    (first[0] / "stage.json").write_text(json.dumps(record))
    assert ensure_stage(fill_onnx, 2, 0, tmp_path) == first[0]
    assert read_stage(first[0], verify=True)["parent"]["model_sha256"] != "0" * 64
    assert sorted(p.name for p in first[0].parent.iterdir()) == ["stage-0", "stage-1"]  # no temp folder left


def _greedy_and_sampled(session, tok, prompts):
    from glm_runtime.generate import fill_blanks

    greedy = fill_blanks(session, tok, prompts, max_new_tokens=4, rows=3)  # rows join as others finish
    sampled = fill_blanks(session, tok, prompts, max_new_tokens=4, strategy="sample", seed=11, temperature=0.9)
    return [r.tokens for r in greedy], [r.tokens for r in sampled]


def test_the_engine_on_in_process_stages_answers_as_one_session(tmp_path):
    from glm_runtime.generate import fill_blanks
    from glm_runtime.pipeline import open_pipeline
    from glm_runtime.session import open_model
    from tests.serve_helpers import PROMPTS

    session, tok = open_model(None)
    piped, ptok = open_pipeline(None, 3, stage_root=tmp_path, in_process=True)
    prompts = PROMPTS + PROMPTS[:1]
    assert _greedy_and_sampled(piped, ptok, prompts) == _greedy_and_sampled(session, tok, prompts)
    # a beam request runs on a cache of its own, its context repeated per beam through the host (RemotePresent)
    beam = fill_blanks(session, tok, PROMPTS[:1], max_new_tokens=3, strategy="beam", num_beams=2)
    piped_beam = fill_blanks(piped, ptok, PROMPTS[:1], max_new_tokens=3, strategy="beam", num_beams=2)
    assert [r.tokens for r in piped_beam] == [r.tokens for r in beam]
    from glm_runtime.playground import model_facts  # what /v1/models and the page name the backend

    assert model_facts(piped)["backend"] == "onnxruntime, 3 pipeline stages"


@pytest.mark.slow
def test_a_rotary_model_cut_in_stages_is_the_whole_graph(tmp_path):
    """ChatGLM-6B's layers read position_ids themselves (rotary): a middle stage gets them too (slow: the export,
    7 s here)."""
    pytest.importorskip("torch")
    from glm_export.export import export_onnx
    from glm_runtime.session import open_model
    from tests.chatglm_folders import make_chatglm_folder

    hub = make_chatglm_folder(tmp_path / "hub", layers=3, hidden=64, heads=4, text_vocab=896, seed=3)
    onnx_dir = export_onnx(hub, tmp_path / "onnx", no_tokenizer=True, log=lambda m: None)
    session, _ = open_model(onnx_dir) if (onnx_dir / "tokenizer.json").exists() else (None, None)
    if session is None:
        from glm_runtime.session import open_session

        session = open_session(onnx_dir)
    feeds = _context(session, [[5, 6, 7, 8], [9, 10]])
    want = session.run(feeds)
    logits, presents = _chained(onnx_dir, 3, tmp_path / "stages", feeds)
    np.testing.assert_allclose(logits, want["logits"], rtol=0, atol=1e-5)
    for name, value in presents.items():
        np.testing.assert_allclose(value, want[name], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- a local Ray cluster and real servers (slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster that this test process starts (ray.init, 4 CPUs, 127.0.0.1) and the servers join by
    its address; ray.shutdown ends it (its own processes only). Ray's token authentication is off for it: a
    driver that names an address sends the token only with RAY_AUTH_MODE=token (docs/pipeline.md)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("starlette")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        context = ray.init(
            num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", namespace="glmx"
        )
        yield {"address": context.address_info["gcs_address"], "stages": tmp_path_factory.mktemp("stage-cache")}
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _get(url: str, timeout: float = 30):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _post(port: int, body: dict, timeout: float = 120):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/fill", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_health(port: int, want: int, within: float, proc=None) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"glmx serve exited {proc.returncode}: {_said(proc)}")
        try:
            status, body = _get(f"http://127.0.0.1:{port}/health", 5)
            if status == want:
                return body
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health did not answer {want} within {within} s")


def _one_by_one(n: int, sample: bool) -> list:
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model
    from tests.serve_helpers import mixed_request

    session, tok = open_model(None)
    answers = []
    for i in range(n):
        prompt, max_new = mixed_request(i)
        settings = {"strategy": "sample", "seed": i, "temperature": 0.8} if sample else {}
        answers.append(fill_blanks(session, tok, [prompt], max_new_tokens=max_new, **settings)[0].tokens)
    return answers


def _ask_all(port: int, sample: bool) -> dict:
    from tests.serve_helpers import concurrently, mixed_request

    replies: dict[int, dict] = {}

    def ask(i):
        prompt, max_new = mixed_request(i)
        body = {"prompt": prompt, "max_new_tokens": max_new}
        if sample:
            body.update(strategy="sample", seed=i, temperature=0.8)
        status, replies[i] = _post(port, body)
        assert status == 200, replies[i]

    concurrently(ask, 8)
    return replies


def _serve(cluster, stages: int):
    port = _free_port()
    env = {**os.environ, "GLMX_STAGE_CACHE": str(cluster["stages"])}
    cmd = [sys.executable, "-c", "from glm_runtime.cli import run; run()", "serve", "--stages", str(stages)]
    cmd += ["--address", cluster["address"], "--port", str(port), "--rows", "4", "--no-ui", "--timeout", "120"]
    log = open(cluster["stages"] / f"serve-{port}.log", "w+b")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    _wait_health(port, 200, 180, proc)
    return proc, port


def _said(proc) -> str:
    proc.log.seek(0)
    return proc.log.read().decode()[-3000:]


def _stop(proc) -> None:
    os.kill(proc.pid, signal.SIGTERM)  # by its PID
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 3])
def test_a_served_pipeline_answers_as_one_process_and_survives_a_dead_stage(cluster, stages):
    import ray

    want = {sample: _one_by_one(8, sample) for sample in (False, True)}
    proc, port = _serve(cluster, stages)
    try:
        for sample in (False, True):  # 8 concurrent clients, greedy then seeded sampling
            replies = _ask_all(port, sample)
            assert [replies[i]["tokens"] for i in range(8)] == want[sample]
        actors = [ray.get_actor(f"glmx-serve-{proc.pid}-stage-{k}", namespace="glmx") for k in range(stages)]
        infos = ray.get([actor.ping.remote() for actor in actors], timeout=30)
        # every stage is a process of its own holding its share: the weights add up to the model's (plus the tied
        # embedding, which the first and the last stage both hold)
        assert len({info["pid"] for info in infos} | {proc.pid}) == stages + 1
        assert all(info["peak_rss_bytes"] > info["weights_bytes"] for info in infos)
        assert all(Path(info["folder"]).is_relative_to(cluster["stages"]) for info in infos)  # the server's cache
        ray.kill(actors[-1], no_restart=False)
        status, body = _post(port, {"prompt": "The capital of France is [MASK].", "max_new_tokens": 8})
        assert status in (500, 503), body
        message = body["error"]["message"]
        assert "PipelineError" in message and "\n" not in message, message
        recovered = _wait_health(port, 200, 120, proc)
        assert recovered["status"] == "ok"
        replies = _ask_all(port, False)
        assert [replies[i]["tokens"] for i in range(8)] == want[False]
    finally:
        _stop(proc)
    assert proc.returncode == 0, _said(proc)


def test_a_session_that_fails_in_a_context_pass_fails_the_admitted_requests():
    """The engine holds admitted requests in their rows before the session runs: a stage that dies during their
    context pass ends them as failed (the server's 500), none is left waiting for ever."""
    from glm_runtime.engine import Engine
    from glm_runtime.engine_thread import EngineLoop
    from glm_runtime.pipeline import PipelineError
    from glm_runtime.requests import FillRequest
    from glm_runtime.session import open_model

    session, tok = open_model(None)

    class Dying:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, feeds):
            raise PipelineError("pipeline stage 1 (layers 2-3) died during a forward pass")

    events = []
    loop = EngineLoop(Engine(Dying(session), tok, rows=2))
    job = loop.submit(FillRequest("The capital of France is [MASK]."), events.append)
    deadline = time.monotonic() + 10
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.state == "failed" and "died during a forward pass" in job.error
    assert [e.kind for e in events] == ["failed"] and not loop.alive


def test_serve_stages_options_are_checked_before_anything_starts():
    from click.testing import CliRunner

    from glm_runtime.cli import main

    run = CliRunner().invoke
    result = run(main, ["serve", "--address", "auto"])
    assert result.exit_code == 1 and "--address names the Ray cluster of --stages" in result.output
    result = run(main, ["serve", "--stages", "two"])
    assert result.exit_code == 1 and "a number of stages, or each stage's layers" in result.output
    result = run(main, ["serve", "--stages", "2", "--backend", "torch"])
    assert result.exit_code == 1 and "--backend torch cannot be cut" in result.output
    help_text = " ".join(run(main, ["serve", "--help"]).output.split())
    assert "STRICT_SPREAD" in help_text and "PACK" in help_text
