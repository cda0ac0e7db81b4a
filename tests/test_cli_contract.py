"""What the command line promises beyond "one Error line" (tests/test_cli_errors.py holds the bad-input table):
exit statuses (usage errors 1, a closed stdout 141), install hints said once, inputs that used to end as an
internal error and now work (a one-file corpus for evaluate, numeric gold labels for classify). No torch needed
except where a test says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from glm_runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_export_extra_hint_installs_the_cpu_torch_first(monkeypatch):
    """PyPI's Linux torch is the CUDA build (several GB of nvidia-* packages), which README's install section
    warns against: every "needs the export extra" hint is runtime.errors.EXPORT_EXTRA_HINT, the CPU torch line
    first, and no module spells its own."""
    from glm_export.cli import require_export_extra
    from glm_runtime.command_group import CommandError
    from glm_runtime.errors import EXPORT_EXTRA_HINT

    cpu = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert EXPORT_EXTRA_HINT.startswith(cpu) and "glmx[export]" in EXPORT_EXTRA_HINT
    spelled = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in ("runtime", "glm_export", "benchmarks")
        for path in (ROOT / folder).glob("*.py")
        if "glmx[export]" in path.read_text(encoding="utf-8")
    )
    assert spelled == ["runtime/errors.py"], spelled
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(CommandError) as caught:
        require_export_extra()
    assert caught.value.message.endswith(EXPORT_EXTRA_HINT), caught.value.message


def test_a_usage_error_exits_1_and_readme_says_so():
    """click's usage errors (an unknown option or command, a missing argument, a bad value) exit 1 after the usage
    line, as every other failure does (click's own status is 2). README says so."""
    for argv in (
        ["fill", "--no-such-option", "a [MASK]"],
        ["fill", "--rows", "0", "a [MASK]"],
        ["classify"],
        ["fil", "a [MASK]"],
        ["--no-such-option"],
    ):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: ") and sum(line.startswith("Error: ") for line in lines) == 1
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "exit status 1" in readme and "a usage error" in readme and "exits 1 too" in readme


def test_a_closed_stdout_ends_the_command_quietly_with_status_141():
    """`glmx fill --stdin < lines | head -1`: once the reader has gone, glmx stops without a message, with the
    status a shell shows for a tool that SIGPIPE ended (128 + 13), as `yes | head -1` does."""
    import subprocess
    import sys

    lines = "".join(f"line {i} has a [MASK] in it\n" for i in range(40)).encode()
    code = "from glm_runtime.cli import run; run()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "fill", "--stdin", "--max-new-tokens", "2", "--rows", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(lines)
    proc.stdin.close()
    assert proc.stdout.readline()  # the first result, then the reader goes away
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert stderr == "", stderr


def test_numeric_gold_labels_are_the_verbalizers_labels_by_their_spelling(tmp_path):
    """A verbalizer is a JSON object, so its labels are strings; a record's integer label 1 means label "1"."""
    records = tmp_path / "numeric.jsonl"
    records.write_text('{"text": "a fine day", "label": 1}\n{"text": "a bad day", "label": 0}\n', encoding="utf-8")
    args = ["classify", str(records), "--template", "{text} [MASK]"]  # the bundled model
    result = CliRunner().invoke(main, [*args, "--verbalizer", '{"1": " good", "0": " bad"}', "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [p["gold"] for p in out["predictions"]] == ["1", "0"] and out["gold_records"] == 2
    assert sum(sum(row.values()) for row in out["confusion"].values()) == 2


def test_evaluate_runs_on_a_one_file_corpus_smaller_than_a_training_batch(tmp_path):
    """One file of the calibration text: 8 training samples, fewer than the bundled run's batch of 16; the
    unigram baseline counts what there is instead of failing inside numpy."""
    pytest.importorskip("torch")
    from glm_export.cli import main as commands  # the group with the export side's commands joined
    from glm_export.export import BUNDLED_CHECKPOINT

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text(
        (ROOT / "glm_export" / "data" / "calibration.txt").read_text(encoding="utf-8"), encoding="utf-8"
    )
    args = ["evaluate", str(BUNDLED_CHECKPOINT), str(corpus), "--fill-examples", "3", "--ppl-batches", "1"]
    result = CliRunner().invoke(commands, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["mask_fill_examples_scored"] == 3 and metrics["heldout_part_b_ppl"] > 1
