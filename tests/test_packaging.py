"""`pip install -e .` with the oldest pip glmx supports: Debian 12's stock /usr/bin/python3.11 (3.11.2, pip 23.0.1).

Without pyproject.toml that pip fell back to legacy `setup.py develop`, which lost the package-dir mapping
(runtime/ -> glm_runtime) so `import glm_runtime` failed. The test makes a fresh venv in tmp_path, installs this
checkout editable with --no-deps (setuptools>=64 comes from the package index through build isolation), and imports
the three packages from outside the checkout. `slow`: the venv and the isolated build take ~10 s."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STOCK_PYTHON = Path("/usr/bin/python3.11")


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the venv's python must find glmx through its own install, nothing else
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kwargs)


def test_editable_install_with_the_oldest_supported_pip_imports_glm_runtime_from_the_checkout(tmp_path):
    if not STOCK_PYTHON.exists():
        pytest.skip(f"{STOCK_PYTHON} is missing (Debian 12's python3.11: the oldest pip glmx supports, 23.0.1)")
    if _run([STOCK_PYTHON, "-c", "import venv, ensurepip"]).returncode != 0:
        pytest.skip(f"{STOCK_PYTHON} has no venv/ensurepip (apt-get install python3.11-venv)")
    venv = tmp_path / "venv"
    made = _run([STOCK_PYTHON, "-m", "venv", venv], timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip_version = _run([python, "-m", "pip", "--version"]).stdout.strip()
    installed = _run([python, "-m", "pip", "install", "--no-deps", "-e", ROOT], timeout=300)
    assert installed.returncode == 0, f"{pip_version}\n{installed.stdout}\n{installed.stderr}"
    # from tmp_path, so that the checkout is not on sys.path by way of the working directory
    imported = _run(
        [
            python,
            "-c",
            "import glm_runtime, glm_export, glmx_benchmarks\n"
            "for m in (glm_runtime, glm_export, glmx_benchmarks): print(m.__file__)",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert imported.returncode == 0, f"{pip_version}\n{imported.stderr}"
    files = [Path(line).resolve() for line in imported.stdout.split()]
    assert [f.parent for f in files] == [ROOT / "runtime", ROOT / "glm_export", ROOT / "benchmarks"], pip_version
