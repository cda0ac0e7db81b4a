"""Atomic writes and manifests: nothing half-written survives a failure; tampering is refused on load."""

from __future__ import annotations

import json

import pytest

from glm_runtime.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    _seal,
    atomic_write_text,
    load_manifest,
    staged_folder,
    write_manifest,
)


def _write_artifact(folder):
    with staged_folder(folder) as stage:
        (stage / "weights.bin").write_bytes(b"\x00\x01" * 100)
        (stage / "sub").mkdir()
        (stage / "sub" / "tokenizer.json").write_text("{}")
        write_manifest(stage, Manifest(kind="checkpoint", config={"num_layers": 1}))


def test_round_trip_hashes_every_file(tmp_path):
    _write_artifact(tmp_path / "art")
    m = load_manifest(tmp_path / "art", kind="checkpoint")
    assert set(m.files) == {"weights.bin", "sub/tokenizer.json"}
    assert not list(tmp_path.glob(".*partial"))


def test_tampered_file_is_refused(tmp_path):
    _write_artifact(tmp_path / "art")
    (tmp_path / "art" / "weights.bin").write_bytes(b"\x00\x02" * 100)
    with pytest.raises(ManifestError, match=r"weights.bin does not match its manifest"):
        load_manifest(tmp_path / "art")


def test_missing_and_corrupt_manifest_are_refused(tmp_path):
    _write_artifact(tmp_path / "art")
    (tmp_path / "art" / "sub" / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="listed in the manifest but missing"):
        load_manifest(tmp_path / "art")
    (tmp_path / "art" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt"):
        load_manifest(tmp_path / "art")
    with pytest.raises(ManifestError, match="has no manifest.json"):
        load_manifest(tmp_path)


def test_wrong_kind_and_schema_are_refused(tmp_path):
    _write_artifact(tmp_path / "art")
    with pytest.raises(ManifestError, match="holds a 'checkpoint' artifact, expected 'onnx'"):
        load_manifest(tmp_path / "art", kind="onnx")
    path = tmp_path / "art" / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["schema"] = "glmx.manifest/99"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="was edited after it was written"):  # the self-hash sees any edit
        load_manifest(tmp_path / "art")
    _seal(tmp_path / "art", data)  # a manifest from a future glmx, sealed: its schema is refused by name
    with pytest.raises(ManifestError, match="unsupported manifest schema"):
        load_manifest(tmp_path / "art")
    del data["manifest_sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="carries no self-hash"):
        load_manifest(tmp_path / "art")


def test_failed_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "art") as stage:
            (stage / "weights.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_survives_a_failed_replace(tmp_path):
    _write_artifact(tmp_path / "art")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _write_artifact(tmp_path / "art")
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "art", overwrite=True):
            raise RuntimeError("crash")
    load_manifest(tmp_path / "art")  # the old artifact is intact


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    import glm_runtime.manifest as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_artifacts_get_ordinary_permissions(tmp_path):
    """Temp files and folders are private (0600/0700); finished artifacts follow the umask like any new file."""
    import os

    _write_artifact(tmp_path / "art")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "art" / MANIFEST_NAME).stat().st_mode & 0o777 == 0o666 & ~mask
    with staged_folder(tmp_path / "private") as stage:  # a writer that makes 0600 files (safetensors does)
        (stage / "weights.bin").write_bytes(b"w")
        os.chmod(stage / "weights.bin", 0o600)
    assert (tmp_path / "private" / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------- the output guard proves ownership (issue 30)


def test_overwrite_replaces_only_a_folder_whose_manifest_is_a_sealed_glmx_manifest(tmp_path):
    """A folder that merely holds a file named manifest.json (a web app's) is not a glmx artifact: --overwrite
    refuses it, naming why; an artifact whose manifest was sealed by glmx, or an empty folder, is replaced."""
    from glm_runtime.manifest import OutputError, check_output

    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "src" / "app.js").write_text("console.log('mine')")
    for text, why in [
        ('{"name": "my-app", "start_url": "/"}', "not a glmx manifest"),
        ("{not json", "not a glmx manifest"),
        ('["a"]', "not a glmx manifest"),
    ]:
        (app / MANIFEST_NAME).write_text(text)
        with pytest.raises(OutputError, match=why) as err:
            check_output(app, overwrite=True)
        assert "\n" not in str(err.value)
    _write_artifact(tmp_path / "art")
    data = json.loads((tmp_path / "art" / MANIFEST_NAME).read_text())
    data["kind"] = "onnx"  # edited after sealing: its self-hash no longer matches, so glmx cannot vouch for it
    (tmp_path / "art" / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(OutputError, match="self-hash"):
        check_output(tmp_path / "art", overwrite=True)
    _seal(tmp_path / "art", {k: v for k, v in data.items() if k != "manifest_sha256"})
    assert check_output(tmp_path / "art", overwrite=True) == (tmp_path / "art").resolve()
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=True)
    assert (app / "src" / "app.js").read_text() == "console.log('mine')"


@pytest.mark.parametrize("target", ["artifact", "dangling"])
def test_a_symlink_output_is_refused_with_or_without_overwrite(tmp_path, target):
    from glm_runtime.manifest import OutputError, check_output

    _write_artifact(tmp_path / "art")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / ("art" if target == "artifact" else "nowhere"))
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is a symbolic link") as err:
            check_output(link, overwrite=overwrite)
        assert "\n" not in str(err.value)
        with pytest.raises(OutputError, match="is a symbolic link"):
            _write_artifact_over(link, overwrite=overwrite)
    assert link.is_symlink() and not list(tmp_path.glob(".link.*"))  # no stray .old link
    if target == "artifact":
        load_manifest(tmp_path / "art")


def _write_artifact_over(folder, overwrite):
    with staged_folder(folder, overwrite=overwrite) as stage:
        (stage / "weights.bin").write_bytes(b"new")
        write_manifest(stage, Manifest(kind="checkpoint", config={"num_layers": 1}))


@pytest.mark.parametrize("name", [".out.abc123.partial", ".out.x.old", ".model.partial"])
def test_an_output_named_like_a_staging_folder_is_refused(tmp_path, name):
    """No loader opens a folder named like a staging folder, so no stage may write one."""
    from glm_runtime.manifest import OutputError, check_output

    with pytest.raises(OutputError, match="named like a staging folder") as err:
        check_output(tmp_path / name)
    assert "\n" not in str(err.value)
    with pytest.raises(OutputError, match="named like a staging folder"):
        _write_artifact(tmp_path / name)
    assert not (tmp_path / name).exists()


def test_only_folders_glmx_marked_as_its_staging_are_removed(tmp_path):
    """Leftovers are recognised by the marker glmx writes first into each staging folder, never by name alone: a
    user's own `.art.backup.old` (or `.art.x.partial`) is left alone and mentioned; glmx's own are removed."""
    from glm_runtime.manifest import STAGING_MARKER, staging_folders

    mine = tmp_path / ".art.backup.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("my backup")
    (tmp_path / ".art.x.partial").mkdir()
    (tmp_path / ".art.x.partial" / "draft.tex").write_text("mine too")
    killed = tmp_path / ".art.k1ll3d.partial"  # what a killed writer left: marked first thing
    killed.mkdir()
    (killed / STAGING_MARKER).write_text("glmx staging folder of art: pid 1 on host")
    (killed / "weights.bin").write_bytes(b"half")
    assert staging_folders(tmp_path / "art") == [killed]
    said: list[str] = []
    for overwrite in (False, True):
        with staged_folder(tmp_path / "art", overwrite=overwrite, log=said.append) as stage:
            assert (stage / STAGING_MARKER).is_file()  # the marker is there from the start
            (stage / "weights.bin").write_bytes(b"w")
            write_manifest(stage, Manifest(kind="checkpoint", config={"num_layers": 1}))
    assert not killed.exists() and any(f"removed {killed.name}" in s for s in said), said
    assert (mine / "notes.txt").read_text() == "my backup"
    assert (tmp_path / ".art.x.partial" / "draft.tex").read_text() == "mine too"
    assert any(s.startswith("left .art.backup.old alone") for s in said), said
    assert not (tmp_path / "art" / STAGING_MARKER).exists() and set(load_manifest(tmp_path / "art").files) == {
        "weights.bin"
    }
    assert staging_folders(tmp_path / "art") == []


def test_an_old_artifact_moved_aside_is_marked_before_the_move(tmp_path, monkeypatch):
    """Killed between moving the old OUT aside and deleting it, the `.old` folder still carries the marker (it was
    written before the move), so the next write removes it."""
    import glm_runtime.manifest as mod
    from glm_runtime.manifest import STAGING_MARKER, staging_folders

    _write_artifact(tmp_path / "art")
    real_rmtree = mod.shutil.rmtree
    monkeypatch.setattr(mod.shutil, "rmtree", lambda *a, **k: None)  # as if killed before the .old was deleted
    _write_artifact_over(tmp_path / "art", overwrite=True)
    monkeypatch.setattr(mod.shutil, "rmtree", real_rmtree)
    (old,) = staging_folders(tmp_path / "art")
    assert old.name.endswith(".old") and (old / STAGING_MARKER).is_file()
    assert not (tmp_path / "art" / STAGING_MARKER).exists()
    _write_artifact_over(tmp_path / "art", overwrite=True)
    assert not old.exists() and staging_folders(tmp_path / "art") == []


# ---------------------------------------------------------------- records that cannot lie (issue 30 B7)


def _text_record(accept_loss=None, **text):
    """A quantized artifact's parity record (values judged on held-out text only), within its budget unless
    `text` says otherwise."""
    figures = {"top1_agreement": 0.97, "fill_agreement": 0.6, "ppl_change": 0.01, "max_logit_diff": 0.3}
    figures.update(text)
    budget = {"top1": 0.95, "fill": 0.5, "ppl_change": 0.08}
    misses = [f"top-1 agreement {figures['top1_agreement']} < 0.95"] if figures["top1_agreement"] < 0.95 else []
    case = {"logits": 0.3, "present_key": 0.1, "present_value": 0.1, "ref_logits": 9.0, "ref_present": 4.0}
    case.update(allowed_logits=float("inf"), allowed_present_key=float("inf"), allowed_present_value=float("inf"))
    record = {
        "stage": "quantize",
        "precision": "int4-weight",
        "passed": not misses,
        "failures": [f"text: {m}" for m in misses],
        "tolerance": None,
        "max_abs_diff": {"logits": 0.3, "present_key": 0.1, "present_value": 0.1},
        "cases": {"blank_mid_context": dict(case, non_finite=[], calls=1)},
        "top1_decisive_mismatches": 0,
        "text": dict(figures, finite=True, budget=budget, within_budget=not misses, misses=misses),
    }
    if accept_loss is not None:
        record["accept_loss"] = accept_loss
    return record


def _write_record(folder, parity, precision="int4-weight"):
    with staged_folder(folder, overwrite=True) as stage:
        (stage / "model.onnx").write_bytes(b"graph")
        write_manifest(stage, Manifest(kind="onnx", config={}, precision=precision, parity=parity))
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["text"].update(top1_agreement=0.2), "over its own recorded budget"),  # within_budget stays
        (lambda r: r["text"].update(ppl_change=-4.0), "over its own recorded budget"),
        (lambda r: r["text"].update(finite=False), "over its own recorded budget"),
        (lambda r: r.update(passed=False, failures=["text: top-1 agreement 0.2 < 0.95"]), "says it failed"),
        (lambda r: r.update(passed="yes"), "says neither passed nor failed"),
        (lambda r: r["cases"]["blank_mid_context"].update(non_finite=["call 0 logits"]), "over its own"),
    ],
)
def test_a_record_over_its_own_budget_or_failed_is_refused(tmp_path, edit, message):
    record = _text_record()
    _write_record(tmp_path / "ok", record)
    load_manifest(tmp_path / "ok")
    edit(record)
    _write_record(tmp_path / "bad", record)
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(tmp_path / "bad")
    assert "\n" not in str(err.value)


def test_a_text_loss_accepted_knowingly_loads_and_nothing_else_fails():
    """--accept-loss writes a record that failed on text only, saying so: it loads; the same record without
    accept_loss, or with a structural failure too, does not."""
    from glm_runtime.parity import parity_problem

    accepted = _text_record(accept_loss=True, top1_agreement=0.5)
    assert not accepted["passed"] and parity_problem("onnx", "int4-weight", accepted, {}) is None
    refused = _text_record(accept_loss=False, top1_agreement=0.5)
    assert "says it failed" in parity_problem("onnx", "int4-weight", refused, {})
    structural = dict(accepted, failures=[*accepted["failures"], "blank_mid_context: the outputs contain NaN"])
    assert "says it failed" in parity_problem("onnx", "int4-weight", structural, {})
