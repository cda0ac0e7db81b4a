"""Nothing lost: output folders that would destroy input or a user's files are refused before any work, one writer
per output at a time, and a killed stage leaves nothing loadable while the next run cleans up and succeeds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from glm_export.cli import main
from glm_runtime.manifest import ManifestError, load_manifest, staging_folders
from tests.forked_cli import Child, ForkedCLI
from tests.test_published import write_hub_folder


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *words):
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: ") and "Traceback" not in result.output, result.output
    for w in words:
        assert w in line, line
    return line


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def glmx(tmp_path_factory):
    """Starts glmx commands as processes of their own (tests/forked_cli.py: forked after the imports). Autouse:
    the helper does its imports (~2 s) on the other core while this module's first tests run."""
    with ForkedCLI(tmp_path_factory.mktemp("forked")) as forked:
        yield forked.start


@pytest.fixture(scope="module")
def exported(fill_checkpoint, tmp_path_factory):
    """A checkpoint folder (conftest.py's session-wide fill model: small, since the stages run in subprocesses)
    and its export by `glmx export`, validated, so its manifest carries the parity record the edits below touch."""
    onnx = tmp_path_factory.mktemp("lost") / "onnx"
    assert cli("export", fill_checkpoint, "-o", onnx).exit_code == 0
    return fill_checkpoint, onnx


def test_a_hub_folder_is_guarded_like_any_input(tmp_path):
    hub, _ = write_hub_folder("bert", tmp_path / "hub")
    before = tree(hub)
    refused(cli("export", hub, "-o", hub, "--overwrite"), "is the input")
    refused(cli("convert", hub, "-o", tmp_path, "--overwrite"), "contains the input")
    assert tree(hub) == before


def test_an_output_that_is_or_holds_the_input_is_refused(exported, tmp_path):
    hub, onnx = exported
    before_hub, before_onnx = tree(hub), tree(onnx)
    refused(cli("export", hub, "-o", hub, "--overwrite"), "is the input")
    refused(cli("convert", hub, "-o", hub / "inside", "--overwrite"), "inside the input")
    refused(cli("export", hub, "-o", hub.parent, "--overwrite"), "contains the input")
    refused(cli("quantize", onnx, "-o", onnx, "--scheme", "int8-dynamic", "--overwrite"), "is the input")
    refused(cli("optimize", onnx, "-o", onnx, "--overwrite"), "is the input")
    assert tree(hub) == before_hub and tree(onnx) == before_onnx  # nothing touched


def test_overwrite_replaces_only_a_glmx_artifact_or_an_empty_folder(exported, tmp_path, monkeypatch):
    hub, onnx = exported
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(cli("quantize", onnx, "-o", mine, "--scheme", "int8-dynamic", "--overwrite"), "not a glmx artifact")
    assert (mine / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(tmp_path)
    refused(cli("export", hub, "-o", ".", "--overwrite"), "current folder")
    (tmp_path / "afile").write_text("x")
    refused(cli("export", hub, "-o", tmp_path / "afile", "--overwrite"), "a file or a link")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = cli("quantize", onnx, "-o", empty, "--scheme", "int8-dynamic", "--overwrite", "--accept-loss")
    assert out.exit_code == 0, out.output
    again = cli("quantize", onnx, "-o", empty, "--scheme", "int4-weight", "--overwrite", "--accept-loss")
    assert again.exit_code == 0 and load_manifest(empty).precision == "int4-weight"  # an artifact is replaced


def test_overwrite_refuses_what_glmx_cannot_prove_it_wrote(exported, tmp_path):
    """A web app's folder with its own manifest.json, a symlink (to an artifact or to nothing), and a name only
    staging folders have: each refused in one line, nothing touched."""
    hub, onnx = exported
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "src" / "app.js").write_text("console.log('mine')")
    (app / "manifest.json").write_text('{"name": "my-app", "icons": []}')
    before = tree(app)
    refused(cli("export", hub, "-o", app, "--overwrite"), "not a glmx manifest")
    assert tree(app) == before
    (tmp_path / "link").symlink_to(onnx)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in ("link", "dangling"):
        refused(
            cli("quantize", onnx, "-o", tmp_path / link, "--scheme", "int8-dynamic", "--overwrite"), "symbolic link"
        )
    assert (tmp_path / "link").resolve() == onnx.resolve() and not list(tmp_path.glob(".link*"))
    refused(cli("export", hub, "-o", tmp_path / ".name.abc.partial"), "named like a staging folder")
    assert not (tmp_path / ".name.abc.partial").exists()


def test_a_users_folder_named_like_a_leftover_is_left_alone(exported, tmp_path):
    """`.OUT.backup.old` beside OUT is the user's (it carries no glmx staging marker): a stage, with or without
    --overwrite, leaves it and says so."""
    hub, _ = exported
    backup = tmp_path / ".out.backup.old"
    backup.mkdir()
    (backup / "model.onnx").write_text("my previous model")
    for extra in ((), ("--overwrite",)):
        result = cli("export", hub, "-o", tmp_path / "out", "--no-validate", *extra)
        assert result.exit_code == 0, result.output
        assert "left .out.backup.old alone" in result.output, result.output
    assert (backup / "model.onnx").read_text() == "my previous model"


def test_the_existence_check_runs_before_any_work(exported, tmp_path, monkeypatch):
    import glm_export.checkpoint as checkpoint

    hub, _ = exported
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before refusing"))
    refused(cli("export", hub, "-o", tmp_path / "out"), "already exists")
    refused(cli("convert", hub, "-o", tmp_path / "out"), "already exists")


def _wait_for(predicate, proc: Child, limit: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.running(), f"the stage ended before the moment to test: {proc.wait()}, {proc.stderr}"
        assert time.monotonic() - t0 < limit, "timed out waiting for the stage"
        time.sleep(0.02)


def test_two_writers_of_one_output_the_second_fails_at_once(exported, tmp_path, glmx):
    """While one writer holds OUT (here this test process, as a stage does for its whole run), a second glmx
    process fails at once, naming the first; the lock goes with the writer."""
    from glm_runtime.manifest import claim_output

    hub, _ = exported
    out = tmp_path / "onnx"
    with claim_output(out):
        second = glmx("export", hub, "-o", out, "--overwrite")
        second.wait()
        err = second.stderr
        assert second.returncode == 1 and f"is being written by glmx pid {os.getpid()}" in err, err
        assert "Traceback" not in err and not out.exists()
    assert not (tmp_path / ".onnx.lock").exists()
    again = cli("export", hub, "-o", out)
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("stage", ["export", "convert", "quantize", "optimize"])
def test_a_killed_stage_leaves_nothing_loadable_and_the_next_run_succeeds(exported, tmp_path, stage, glmx):
    hub, onnx = exported
    out = tmp_path / "out"
    if stage == "convert":  # a small folder converts in a blink: ~70 MB of weights take long enough to kill
        hub, _ = write_hub_folder("bert", tmp_path / "hub", shape={"hidden_size": 512, "num_attention_heads": 8})
    args = {
        "export": ("export", hub, "-o", out),
        "convert": ("convert", hub, "-o", out),
        "quantize": ("quantize", onnx, "-o", out, "--scheme", "qdq-int8", "--accept-loss"),
        "optimize": ("optimize", onnx, "-o", out),
    }[stage]
    # after the staging folder appears: at once, and into the work (quantize, the fastest stage, at three points)
    for delay in (0.0, 0.1, 0.25) if stage == "quantize" else (0.1,):  # qdq-int8 here: ~0.4 s of work
        left = set(staging_folders(out))  # the last kill's leftover: this run removes it, then makes its own
        proc = glmx(*args)
        _wait_for(lambda: bool(set(staging_folders(out)) - left), proc)  # noqa: B023 - called within this iteration
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        if out.exists():  # killed after the final rename: then it is whole
            load_manifest(out)
            break
        for partial in staging_folders(out):
            with pytest.raises(ManifestError, match="staging folder of a write that did not finish"):
                load_manifest(partial)
            refused(cli("fill", "--model", partial, "hello [MASK]"), "did not finish")
    else:
        assert staging_folders(out)  # what the kills left, now to be cleaned up
    rerun = cli(*args, "--overwrite")  # in this process: the kill needed a process of its own, the rerun does not
    assert rerun.exit_code == 0, rerun.output
    assert not staging_folders(out) and not (tmp_path / ".out.lock").exists()
    load_manifest(out)
    if "removed" in rerun.output:
        assert "left by an earlier write to out that did not finish" in rerun.output


def test_an_export_killed_during_its_parity_check_leaves_a_pending_record_no_loader_takes(exported, tmp_path, glmx):
    """The staged manifest says `pending` until the export's parity check ends (not `skipped`, the record of a
    deliberate --no-validate): a copy of a staging folder killed during the check is refused by every loader."""
    import shutil

    from glm_runtime.session import open_model

    hub, _ = exported
    out = tmp_path / "out"

    def staged() -> list[Path]:
        return [p for p in staging_folders(out) if (p / "manifest.json").is_file()]

    for _ in range(3):  # the check takes ~1 s here; the kill comes within ~20 ms of the manifest
        for left in staging_folders(out):
            shutil.rmtree(left)
        proc = glmx("export", hub, "-o", out, "--overwrite")
        _wait_for(lambda: bool(staged()), proc)
        proc.kill()
        proc.wait(timeout=30)
        if staged() and not out.exists():
            break
    else:
        pytest.fail("the export finished its parity check before it could be killed, three times")
    (stage,) = staged()
    assert json.loads((stage / "manifest.json").read_text())["parity"].get("pending") is True
    copy = _copy(stage, tmp_path / "copy")  # what the tester did: a copy under an ordinary name
    for load in (load_manifest, open_model):
        with pytest.raises(ManifestError, match="parity check is pending"):
            load(copy)
    refused(cli("fill", "--model", copy, "hello [MASK]"), "parity check is pending")


# ---------------------------------------------------------------- artifacts that verify themselves whole


def _copy(folder: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dst))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["parity"]["max_abs_diff"].update(logits=0.0),  # parity figures
        lambda d: d["parity"]["cases"]["blank_mid_context"].update(non_finite=["call 0 logits"]),  # non-finite flags
        lambda d: d.update(precision="fp16"),  # precision
        lambda d: d["tokenizer"].update(sha256="0" * 64),  # the tokenizer hash
        lambda d: d["files"].pop("model.onnx"),  # a file dropped from the list
    ],
)
def test_any_edit_of_a_manifest_is_refused(exported, tmp_path, edit):
    _, onnx = exported
    folder = _copy(onnx, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="was edited after it was written"):
        load_manifest(folder)
    refused(cli("fill", "--model", folder, "hello [MASK]"), "was edited after it was written")


def test_a_resealed_manifest_still_needs_every_file_it_reads_hashed_and_its_parity(exported, tmp_path):
    """Even a manifest whose self-hash was recomputed cannot drop model.onnx from its file list, carry an
    unlisted model file, or lose its parity record."""
    from glm_runtime.manifest import _seal
    from glm_runtime.session import OnnxRuntimeSession

    _, onnx = exported
    folder = _copy(onnx, tmp_path / "a")
    data = json.loads((folder / "manifest.json").read_text())
    _seal(folder, {**data, "files": {k: v for k, v in data["files"].items() if k != "model.onnx"}})
    with pytest.raises(ManifestError, match="does not hash model.onnx, which the artifact reads"):
        OnnxRuntimeSession(folder)
    folder = _copy(onnx, tmp_path / "b")
    (folder / "extra.onnx").write_bytes((folder / "model.onnx").read_bytes())
    with pytest.raises(ManifestError, match="extra.onnx is in the artifact folder but not in its manifest"):
        OnnxRuntimeSession(folder)
    folder = _copy(onnx, tmp_path / "c")
    _seal(folder, {**data, "parity": {}})
    with pytest.raises(ManifestError, match="has no parity record"):
        OnnxRuntimeSession(folder)


def _over_budget(data: dict, factor: float = 5000.0, with_allowance: bool = False) -> None:
    """One case's logit figure `factor` times over its own budget (and the record's maximum with it); with
    `with_allowance` the case's allowance is raised too, past what its recorded tolerance gives."""
    parity = data["parity"]
    case = next(iter(parity["cases"].values()))
    if with_allowance:
        case["allowed_logits"] *= 2 * factor
    case["logits"] = case["allowed_logits"] * (0.5 if with_allowance else factor)
    parity["max_abs_diff"]["logits"] = max(f["logits"] for f in parity["cases"].values())


def _relabel(precision: str, record_too: bool = True):
    def edit(data: dict) -> None:
        data["precision"] = precision
        if record_too:
            data["parity"]["precision"] = precision

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["parity"].update(passed=False, failures=["top-1 differs at 3 position(s)"]), "says it failed"),
        (_over_budget, "over its own recorded budget"),
        (lambda d: _over_budget(d, with_allowance=True), "does not follow from its recorded tolerance"),
        (lambda d: d["parity"]["max_abs_diff"].update(logits=5.0), "does not match its cases"),
        (lambda d: d["parity"].update(top1_decisive_mismatches=4), "over its own recorded budget"),
        (lambda d: d.update(parity={"skipped": True}, extra={**d["extra"], "quantization": {}}), "skipped"),
        (_relabel("int4-weight", record_too=False), "parity record is for precision 'fp32'"),
        (_relabel("int4-weight"), "no MatMulNBits with bits=4"),
        (_relabel("int8-weight"), "no MatMulNBits with bits=8"),
        (_relabel("qdq-int8"), "no QuantizeLinear"),
        (_relabel("int8-dynamic"), "no DynamicQuantizeLinear"),
    ],
)
def test_a_resealed_record_that_failed_or_lies_is_refused(exported, tmp_path, edit, message):
    """A manifest resealed with the documented self-hash recipe still cannot load when its own record says it
    failed, when its figures are over the budget it records, or when its precision is not the graph's."""
    from glm_runtime.manifest import _seal
    from glm_runtime.session import open_model

    _, onnx = exported
    folder = _copy(onnx, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    _seal(folder, {k: v for k, v in data.items() if k != "manifest_sha256"})
    with pytest.raises(ManifestError, match=message):
        open_model(folder)
    refused(cli("fill", "--model", folder, "hello [MASK]"), message)


def test_pretrain_refuses_its_export_folder_before_training(tmp_path, monkeypatch):
    import glm_export.pretrain as pretrain

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "notes.txt").write_text("mine")
    monkeypatch.setattr(pretrain, "read_documents", lambda *a: pytest.fail("trained before refusing"))
    with pytest.raises(ManifestError, match="not a glmx artifact"):
        pretrain.pretrain(tmp_path / "corpus", tmp_path / "run", tmp_path / "export", overwrite=True)
    with pytest.raises(ManifestError, match="already exists"):
        pretrain.pretrain(tmp_path / "corpus", tmp_path / "run", tmp_path / "export")
