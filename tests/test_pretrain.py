"""glmx pretrain / evaluate on a tiny synthetic corpus: the loss falls, resuming is bitwise exact, errors are clear."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from glm_export.pretrain import PretrainError, pretrain

WORDS = (
    "the cat dog bird sat ran flew on under over a mat tree house red blue small big quickly slowly "
    "and then it was very happy sad near far old new"
).split()
TINY = dict(
    vocab_size=300,
    num_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    max_sequence_length=64,
    seq_length=32,
    batch_size=4,
    heldout_fraction=0.1,
    eval_batches=2,
    warmup_steps=2,
)
BUNDLED = Path(__file__).resolve().parents[1] / "glm_export" / "bundled"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three files of short documents made of simple sentences (seeded)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("corpus")
    for f in range(3):
        docs = []
        for _ in range(80):
            sents = [
                " ".join(rng.choice(WORDS, size=rng.integers(4, 9))).capitalize() + "."
                for _ in range(rng.integers(1, 5))
            ]
            docs.append(" ".join(sents))
        (folder / f"part{f}.txt").write_text("\n\n".join(docs) + "\n")
    return folder


def test_a_few_steps_lower_the_held_out_loss(corpus, tmp_path):
    result = pretrain(corpus, tmp_path / "run", steps=40, lr=3e-3, dropout=0.0, eval_every=1, progress=False, **TINY)
    first, last = result["evals"][0]["heldout_loss"], result["evals"][-1]["heldout_loss"]
    assert result["step"] == 40 and len(result["losses"]) == 40
    assert last < first - 1.0, (first, last)


def test_resume_gives_bitwise_the_uninterrupted_losses_and_weights(corpus, tmp_path):
    # dropout on and all three modes, so the torch RNG, the data position and the mode draw all matter
    settings = dict(TINY, steps=6, lr=2e-3, dropout=0.1, bert_prob=0.5, gap_sentence_prob=0.25)
    full = pretrain(corpus, tmp_path / "full", eval_every=3, checkpoint_every=100, progress=False, **settings)
    (tmp_path / "split").mkdir()
    shutil.copy(tmp_path / "full" / "tokenizer.json", tmp_path / "split" / "tokenizer.json")
    first = pretrain(
        corpus, tmp_path / "split", eval_every=3, checkpoint_every=100, stop_after=3, progress=False, **settings
    )
    assert first["step"] == 3 and first["losses"] == full["losses"][:3]
    second = pretrain(corpus, tmp_path / "split", eval_every=3, checkpoint_every=100, progress=False, **settings)
    assert second["step"] == 6
    assert torch.equal(torch.tensor(second["losses"]), torch.tensor(full["losses"][3:]))
    assert second["evals"] == full["evals"]
    a = torch.load(tmp_path / "full" / "train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg_sq"], b["optimizer"]["state"][0]["exp_avg_sq"])


def test_resume_with_other_settings_is_refused(corpus, tmp_path):
    pretrain(corpus, tmp_path / "run", steps=1, progress=False, **TINY)
    with pytest.raises(PretrainError, match=r"other settings .*'lr': \(0.0006, 0.001\)"):
        pretrain(corpus, tmp_path / "run", steps=1, progress=False, **dict(TINY, lr=1e-3))


def test_a_state_saved_before_a_setting_existed_resumes_with_its_default(corpus, tmp_path):
    """train_state.pt written before gpt_infill_prob existed (and before numpy's RNG state was a list): the default
    (1.0) is the old behaviour, and the state still loads with weights_only=True."""
    import torch

    run = tmp_path / "run"
    pretrain(corpus, run, steps=2, stop_after=1, progress=False, **TINY)
    state = torch.load(run / "train_state.pt", weights_only=True)
    del state["settings"]["gpt_infill_prob"]
    name, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)  # as older states held it: an array
    torch.save(state, run / "train_state.pt")
    assert pretrain(corpus, run, steps=2, progress=False, **TINY)["step"] == 2
    with pytest.raises(PretrainError, match=r"'gpt_infill_prob': \(1.0, 0.5\)"):
        pretrain(corpus, run, steps=3, progress=False, **dict(TINY, gpt_infill_prob=0.5))


class _Planted:
    """A pickle that runs code when loaded without weights_only: it writes the file it names."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('ran')",))


def test_a_planted_pickle_in_train_state_runs_no_code_and_is_one_line(corpus, tmp_path):
    """README: pickles load with weights_only=True. train_state.pt holds tensors and plain containers only (saved
    that way), so a planted pickle is refused, in one line that is not an internal error, and its code never runs."""
    from click.testing import CliRunner

    from glm_export.cli import main

    run, ran = tmp_path / "run", tmp_path / "ran.txt"
    run.mkdir()
    torch.save({"settings": {}, "step": 0, "payload": _Planted(ran)}, run / "train_state.pt")
    with pytest.raises(PretrainError, match="holds objects other than tensors and plain containers") as err:
        pretrain(corpus, run, steps=1, progress=False, **TINY)
    assert "\n" not in str(err.value) and "(it names exec)" in str(err.value)
    result = CliRunner().invoke(main, ["pretrain", str(corpus), str(run), "--steps", "1"])
    line = result.output.strip()
    assert result.exit_code == 1 and line.startswith("Error: ") and "\n" not in line, result.output
    assert "internal error" not in line and "weights_only" in line, line
    assert not ran.exists()


def test_the_saved_train_state_loads_with_weights_only(corpus, tmp_path):
    """What pretrain saves (model, optimizer, schedule, the three RNG states) loads under weights_only=True."""
    pretrain(corpus, tmp_path / "run", steps=2, stop_after=1, progress=False, **TINY)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 1 and set(state["rng"]) == {"torch", "numpy", "python"}


def test_an_empty_corpus_folder_is_refused(tmp_path):
    with pytest.raises(PretrainError, match="no .txt files under"):
        pretrain(tmp_path, tmp_path / "run", progress=False, **TINY)


def test_export_then_evaluate_writes_metrics_beside_the_baseline(corpus, tmp_path):
    from glm_export.evaluate import evaluate
    from glm_runtime.manifest import load_manifest

    out = tmp_path / "model"
    pretrain(corpus, tmp_path / "run", out, steps=30, lr=3e-3, eval_every=100, progress=False, **TINY)
    manifest = load_manifest(out, kind="checkpoint")
    assert manifest.precision == "fp16" and manifest.extra["pretraining"]["steps_done"] == 30
    metrics = evaluate(out, corpus, tmp_path / "metrics.json", fill_examples=20, ppl_batches=2)
    assert json.loads((tmp_path / "metrics.json").read_text())["heldout_part_b_ppl"] == metrics["heldout_part_b_ppl"]
    # 30 tiny steps need not beat the baseline; both must be real perplexities below the uniform one (V = 384)
    assert 1.0 < metrics["heldout_part_b_ppl"] < 384 and 1.0 < metrics["unigram_part_b_ppl"] < 384
    assert metrics["mask_fill_examples_scored"] == 20 and 0.0 <= metrics["mask_fill_exact_match"] <= 1.0
    assert metrics["unigram_word"] == "the" or metrics["unigram_word"] in WORDS
    assert all("[MASK]" in ex["prompt"] for ex in metrics["examples"])
    for key in (
        "mask_fill_first_word_match",
        "mask_fill_known_length_match",
        "part_b_first_token_acc",
        "unigram_part_b_first_token_acc",
    ):
        assert 0.0 <= metrics[key] <= 1.0
    assert 0 < metrics["part_b_first_tokens"] < metrics["part_b_tokens"]
    # the baseline's guess is the most frequent first token of training spans, so on held-out spans it must
    # score above zero on this small-vocabulary corpus
    assert metrics["unigram_part_b_first_token_acc"] > 0 and isinstance(metrics["unigram_first_token"], str)
    _known_length_equals_the_cached_loop(out, corpus)


def _known_length_equals_the_cached_loop(checkpoint, corpus):
    """known_length_match (one teacher-forced pass over Part B) == feeding sop + the answer through the cache
    one token at a time (docs/glm.md 4.1's loop), answer by answer; and an answer made of the model's own greedy
    tokens always matches."""
    import torch

    from glm_export.checkpoint import load_checkpoint
    from glm_export.evaluate import _context, greedy_fill_torch, known_length_match, single_word_blanks
    from glm_export.pretrain import layout_special_ids, load_corpus_tokenizer, read_documents

    loaded = load_checkpoint(checkpoint)
    model, tok, sp = loaded.model.float().eval(), load_corpus_tokenizer(loaded.tokenizer_file), layout_special_ids()
    for left, word, right in single_word_blanks(read_documents(corpus), 12, 0):
        ids, mask_pos = _context(model, tok, left, right)
        answer = tok.encode(" " + word, add_special_tokens=False).ids
        with torch.no_grad():
            _, past = model(
                torch.tensor([ids]),
                torch.stack([torch.arange(len(ids)), torch.zeros(len(ids), dtype=torch.long)]).unsqueeze(0),
                len(ids),
            )
            hits, token = [], sp.sop
            for k, want in enumerate(answer):
                logits, past = model(torch.tensor([[token]]), torch.tensor([[[mask_pos], [k + 1]]]), 0, past)
                hits.append(int(logits[0, -1].argmax()) == want)
                token = want
        assert known_length_match(model, tok, left, right, word) == all(hits)
        own = greedy_fill_torch(model, tok, left, right)
        text = tok.decode(own)
        if own and text.startswith(" ") and tok.encode(text, add_special_tokens=False).ids == own:
            assert known_length_match(model, tok, left, right, text[1:])  # the model's own tokens match


def test_evaluate_refuses_a_checkpoint_not_written_by_pretrain(tmp_path, tiny_model):
    from glm_export.checkpoint import save_checkpoint
    from glm_export.evaluate import EvaluateError, evaluate

    save_checkpoint(tiny_model, tmp_path / "ckpt")
    with pytest.raises(EvaluateError, match="no extra.pretraining block"):
        evaluate(tmp_path / "ckpt", tmp_path)


def test_cli_pretrain_runs_and_reports(corpus, tmp_path):
    from click.testing import CliRunner

    from glm_export.cli import main

    args = ["pretrain", str(corpus), str(tmp_path / "run"), "--steps", "2", "--eval-every", "1"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["step"] == 2
    res = CliRunner().invoke(main, args[:-2] + ["--eval-every", "1", "--lr", "1e-3"])  # other settings
    assert res.exit_code == 1 and "other settings" in res.output


@pytest.mark.slow
def test_bundled_metrics_reproduce():
    """Re-run `glmx evaluate` on the bundled model and compare with the committed metrics (needs data/corpus)."""
    from glm_export.evaluate import evaluate

    corpus_dir = Path(__file__).resolve().parents[1] / "data" / "corpus"
    if not (corpus_dir / "corpus.json").exists():
        pytest.skip("run `python glm_export/data/get_corpus.py data/corpus` first")
    committed = json.loads((BUNDLED / "glmx-small.metrics.json").read_text())
    metrics = evaluate(BUNDLED / "glmx-small", corpus_dir, fill_examples=committed["mask_fill_examples_scored"])
    for key in ("heldout_part_b_ppl", "unigram_part_b_ppl"):
        assert metrics[key] == pytest.approx(committed[key], rel=1e-3), key
    for key in (
        "mask_fill_exact_match",
        "mask_fill_first_word_match",
        "mask_fill_known_length_match",
        "part_b_first_token_acc",
    ):
        assert abs(metrics[key] - committed[key]) <= 0.01, key
    for key in ("unigram_mask_fill_exact_match", "unigram_part_b_first_token_acc", "unigram_first_token"):
        assert metrics[key] == committed[key], key


def test_sinusoidal_position_table_depends_only_on_the_offset():
    """dot(E[p], E[p+k]) is the same for every p (sin a sin b + cos a cos b = cos(a - b)): attending to "the token
    k to the left" is one query/key map at every position. Element RMS is the std asked for (each sin/cos pair
    has squares summing to 1)."""
    import torch

    from glm_export.pretrain import sinusoidal_positions

    table = sinusoidal_positions(513, 64, 0.02).double()
    assert table.shape == (513, 64) and float(table.pow(2).mean().sqrt()) == pytest.approx(0.02, rel=1e-6)
    for k in (1, 3, 40):
        dots = (table[:-k] * table[k:]).sum(-1)
        assert torch.allclose(dots, dots[0].expand_as(dots), rtol=1e-5, atol=0), k  # fp32 table
    near, far = float((table[100] * table[101]).sum()), float((table[100] * table[300]).sum())
    assert near > far


def test_position_init_setting(tiny_config):
    import torch

    from glm_export.model import GLMModel
    from glm_export.pretrain import POSITION_RMS, PretrainSettings, init_positions, sinusoidal_positions

    torch.manual_seed(0)
    model = GLMModel(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_positions(model, "normal")  # GLM's own init, untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    init_positions(model, "sinusoidal")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"transformer.position_embeddings.weight"}
    assert torch.equal(
        model.transformer.position_embeddings.weight,
        sinusoidal_positions(*model.transformer.position_embeddings.weight.shape, POSITION_RMS),
    )
    init_positions(model, "local")  # + layer 0's query/key rows
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "transformer.position_embeddings.weight",
        "transformer.layers.0.attention.query_key_value.weight",
    }
    assert PretrainSettings().position_init == "local"
    with pytest.raises(PretrainError, match="position_init"):
        PretrainSettings(position_init="rope")


def test_local_heads_attend_to_the_previous_and_next_position():
    """local_head_weights on the bare sinusoidal table: for every query position the best-scoring key is the one
    at the head's offset (the margin is what makes it survive the token embeddings added at init)."""
    import torch

    from glm_export.pretrain import local_head_weights, sinusoidal_positions

    table = sinusoidal_positions(300, 64, 1.0)
    for offset in (-1, 1):
        wq, wk = local_head_weights(64, 16, offset, gain=1.0)
        scores = (table @ wq.T) @ (table @ wk.T).T  # (query p, key p')
        best = scores[5:295].argmax(-1)
        assert torch.equal(best, torch.arange(5, 295) + offset), offset


def test_local_init_makes_part_a_attention_local(tiny_config):
    """After init_positions("local"), layer 0's head 0 gives a Part A token more weight on the token before it
    than a uniform head would by an order of magnitude; head 1 the same for the token after it."""
    import torch

    import glm_export.model as glm_model
    from glm_export.model import GLMModel
    from glm_export.pretrain import init_positions

    cfg = dataclasses.replace(tiny_config, hidden_size=128, num_attention_heads=4)
    torch.manual_seed(0)
    model = GLMModel(cfg).eval()
    init_positions(model, "local")
    T = cfg.max_sequence_length
    ids = torch.randint(10, cfg.vocab_size, (1, T))
    positions = torch.stack([torch.arange(T), torch.zeros(T, dtype=torch.long)]).unsqueeze(0)
    seen, softmax = [], torch.softmax
    glm_model.torch.softmax = lambda x, dim=-1: seen.append(softmax(x, dim=dim)) or seen[-1]
    try:
        with torch.no_grad():
            model(ids, positions, T)  # all of it Part A (bidirectional)
    finally:
        glm_model.torch.softmax = softmax
    probs, i = seen[0][0], torch.arange(1, T - 1)
    assert float(probs[0][i, i - 1].mean()) > 10 / T and float(probs[1][i, i + 1].mean()) > 10 / T
    assert float(probs[2][i, i - 1].mean()) < 3 / T  # an ordinary head is not local


def test_heldout_first_token_accuracy_matches_the_full_forward(corpus, tiny_model):
    """heldout_metrics's first-token accuracy (head on Part B rows only) against GLM's full forward, scored
    by hand at the rows whose input is sop."""
    import torch

    from glm_export.collator import BlockCollator
    from glm_export.pretrain import (
        batch_to_tensors,
        cut_samples,
        heldout_metrics,
        layout_special_ids,
        load_corpus_tokenizer,
        read_documents,
        token_stream,
        train_tokenizer,
    )

    tok_file = Path(str(corpus)) / ".." / "tok-first.json"
    train_tokenizer(iter(read_documents(corpus)), 300, tok_file)
    samples = cut_samples(token_stream(load_corpus_tokenizer(tok_file), read_documents(corpus)), 32)
    rng = np.random.default_rng(1)
    batches = [batch_to_tensors(BlockCollator(layout_special_ids())(list(samples[:4]), rng)) for _ in range(2)]
    model = tiny_model.eval()
    got = heldout_metrics(model, batches)
    hits = n = 0
    with torch.no_grad():
        for b in batches:
            logits, _ = model(b["input_ids"], b["position_ids"], b["sep"])
            first = (b["input_ids"] == layout_special_ids().sop) & (b["loss_mask"] == 1)
            hits += int((logits.argmax(-1) == b["target_ids"])[first].sum())
            n += int(first.sum())
    assert n > 0 and got["heldout_first_token_acc"] == pytest.approx(hits / n)


def test_pretrain_writes_a_checkpoint_dir_and_keeps_the_old_spelling():
    """`--checkpoint-dir` (a checkpoint, not an export); `--export-dir`, in the bundled model's recorded training
    command, still parses to the same option."""
    import click

    from glm_export.cli import main

    cmd = main.get_command(click.Context(main), "pretrain")
    (opt,) = [p for p in cmd.params if p.name == "checkpoint_dir"]
    assert opt.opts == ["--checkpoint-dir", "--export-dir"]
    ctx = cmd.make_context("pretrain", [".", "run", "--export-dir", "out"])
    assert ctx.params["checkpoint_dir"] == "out"
