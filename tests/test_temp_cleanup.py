"""A test run leaves nothing in the temp folder when it passes (pytest.ini's retention policy, tests/conftest.py's
temp_root), and keeps a failing test's folder to look at. Checked on an inner pytest run of a small test file that
writes where the suite's tests write: tmp_path, a module fixture's folder, tempfile, and a subprocess's TMPDIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INNER = """
import subprocess, sys, tempfile

def test_writes_everywhere(tmp_path, tmp_path_factory):
    (tmp_path / "mine").write_text("x")
    (tmp_path_factory.mktemp("module") / "shared").write_text("x")
    print("MADE", tempfile.mkdtemp(prefix="scratch-"))
    child = "import tempfile; print(tempfile.mkdtemp(prefix='child-'))"
    print("MADE", subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
    assert FAIL is False
"""


def inner_run(tmp_path: Path, fail: bool) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "test_inner.py").write_text(INNER.replace("FAIL", str(fail)), encoding="utf-8")
    temproot = tmp_path / "temproot"
    temproot.mkdir()
    env = dict(os.environ, PYTEST_DEBUG_TEMPROOT=str(temproot))
    args = [sys.executable, "-m", "pytest", "-q", "-s", "-c", str(ROOT / "pytest.ini"), "-p", "tests.conftest"]
    proc = subprocess.run(
        [*args, "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, temproot


def made(proc: subprocess.CompletedProcess) -> list[Path]:
    return [Path(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("MADE ")]


def test_a_passing_run_leaves_nothing_in_the_temp_folder(tmp_path):
    proc, temproot = inner_run(tmp_path, fail=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(made(proc)) == 2 and not any(p.exists() for p in made(proc)), made(proc)
    left = [p for p in temproot.rglob("*") if p.is_file()]
    assert left == [], left


def test_a_failing_run_keeps_the_failed_tests_folder(tmp_path):
    proc, temproot = inner_run(tmp_path, fail=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [p.name for p in temproot.rglob("mine")] == ["mine"]  # tmp_path of the failed test, to look at
    assert not any(p.exists() for p in made(proc))  # scratch of the code under test: gone either way
