"""Shared fixtures: tiny deterministic models and temporary folders (temp_root: a run leaves nothing behind).

The blank-filling model (tests/fill_fixtures.py: a tiny tokenizer, a seeded GLM that sometimes ends spans with
eop) is made once per test session, with its glmx checkpoint and its ONNX export; tests read these folders and
never write into them."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def temp_root(tmp_path_factory):
    """The temp folder of everything the tests run, for this session only, removed at its end: tempfile's default
    in this process (ONNX Runtime's quantizer, glmx bench --quick, a stage's scratch files) and TMPDIR for every
    subprocess (a glmx killed mid-write leaves its scratch folders there). pytest's own folders are placed first,
    in the real temp folder, where pytest.ini's retention policy keeps a failing run's."""
    tmp_path_factory.getbasetemp()  # before TMPDIR moves: pytest's base folder stays in the real temp folder
    root = tempfile.mkdtemp(prefix="glmx-tests-")  # short: Ray's socket paths must stay under 108 bytes
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = root, root
    try:
        yield root
    finally:
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_config():
    from glm_runtime.config import get_preset

    return get_preset("glm-tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    torch = pytest.importorskip("torch")
    from glm_export.model import GLMModel

    torch.manual_seed(0)
    return GLMModel(tiny_config).eval()


@pytest.fixture(scope="session")
def fill_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fill-model")


@pytest.fixture(scope="session")
def fill_tok_file(fill_root):
    from tests.fill_fixtures import make_tokenizer

    path = fill_root / "tokenizer.json"
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def fill_tok(fill_tok_file):
    from glm_runtime.tokenizer import load_tokenizer

    return load_tokenizer(fill_tok_file)


@pytest.fixture(scope="session")
def fill_model(fill_tok):
    pytest.importorskip("torch")
    from tests.fill_fixtures import make_model

    return make_model(fill_tok)


@pytest.fixture(scope="session")
def fill_checkpoint(fill_model, fill_tok_file, fill_root):
    """The fill model as a glmx checkpoint folder (read-only for tests)."""
    from glm_export.checkpoint import save_checkpoint

    return save_checkpoint(fill_model, fill_root / "checkpoint", tokenizer_file=fill_tok_file)


@pytest.fixture(scope="session")
def fill_onnx(fill_model, fill_tok_file, fill_root):
    """The fill model's fp32 ONNX export (read-only for tests)."""
    from tests.fill_fixtures import export_tiny

    return export_tiny(fill_model, fill_root / "onnx", fill_tok_file)
