"""The runtime fills blanks without torch: in a fresh interpreter where importing torch fails, a fill on an
exported tiny model (library call and `glmx fill`) works and leaves torch and glm_export out of sys.modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
# Any attempt to import torch raises, so a lazy import on the fill path fails loudly instead of passing unseen.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture(scope="module")
def onnx_dir(fill_onnx):  # conftest.py's session-wide tiny export
    return fill_onnx


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_fill_never_imports_torch(onnx_dir):
    code = f"""
from glm_runtime.session import open_model
from glm_runtime.generate import fill_blanks
session, tok = open_model({str(onnx_dir)!r})
results = fill_blanks(session, tok, ["the quick [MASK] fox [sMASK] dog", "a stitch [gMASK]"], max_new_tokens=4)
results += fill_blanks(session, tok, ["all [MASK] is gold"], max_new_tokens=3, strategy="beam", num_beams=2)
results += fill_blanks(session, tok, ["all [MASK] is gold"], max_new_tokens=3, strategy="sample", seed=1)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "glm_export"))
assert not leaked, leaked
print(len(results), all(len(r.spans) >= 1 for r in results))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "True"]


def test_glmx_fill_never_imports_torch(onnx_dir):
    code = f"""
from glm_export.cli import main
try:
    main(["fill", "the quick [MASK] fox", "--model", {str(onnx_dir)!r}, "--json", "--max-new-tokens", "3"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "torch" not in sys.modules and not any(m.startswith("torch.") for m in sys.modules)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["prompt"] == "the quick [MASK] fox" and len(row["spans"]) == 1


def test_torch_backend_without_torch_says_what_to_install(onnx_dir):
    code = f"""
from glm_runtime.session import open_session
try:
    open_session({str(onnx_dir)!r}, backend="torch")
except RuntimeError as exc:
    print(exc)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "backend 'torch' needs the export extra" in proc.stdout


def test_runtime_sources_import_neither_torch_nor_glm_export():
    # static check of every import statement in runtime/: the torch reference is reachable only through the
    # string-named plugin in session.BACKENDS
    for path in sorted(RUNTIME.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("torch", "glm_export"), f"{path.name} imports {name}"


def test_cloze_scoring_never_imports_torch(onnx_dir):
    code = f"""
from glm_runtime.session import open_model
from glm_runtime.score import classify, score_candidates
session, tok = open_model({str(onnx_dir)!r})
scores = score_candidates(session, tok, "the quick [MASK] fox", [" brown", " lazy dog"])
result = classify(session, tok, [{{"t": "the quick"}}], "{{t}} [MASK] fox", {{"a": " brown", "b": " lazy"}})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "glm_export"))
assert not leaked, leaked
print(len(scores), result["predictions"][0]["label"] in ("a", "b"))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "True"]


def test_the_runtime_command_group_stands_alone():
    """glm_runtime.cli holds the runtime's commands without the export side; the console script adds those."""
    proc = _python("""
import sys
from glm_runtime.cli import main
print(sorted(main.commands))
print(any(m.split(".")[0] in ("torch", "glm_export") for m in sys.modules))
""")
    assert proc.returncode == 0, proc.stderr
    names, leaked = proc.stdout.splitlines()
    assert names == str(["classify", "config", "fill", "score", "serve"]) and leaked == "False"


def test_the_server_never_imports_torch():
    """glmx serve's app on the bundled model answers a fill and a completion with torch blocked; neither torch nor
    glm_export is imported (Ray Serve's wrapper imports the same app)."""
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    proc = _python("""
import time
from starlette.testclient import TestClient
from glm_runtime.serve import create_app
from glm_runtime.session import open_model
with TestClient(create_app(lambda: open_model(None))) as client:
    for _ in range(300):
        if client.get("/health").status_code == 200:
            break
        time.sleep(0.05)
    a = client.post("/v1/fill", json={"prompt": "a [MASK] b", "max_new_tokens": 3}).status_code
    b = client.post("/v1/completions", json={"prompt": "a [MASK] b", "max_tokens": 3}).status_code
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "glm_export"))
print(a, b, leaked)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["200", "200", "[]"]


def test_optimize_and_quantize_need_onnx_but_not_torch(onnx_dir, tmp_path):
    """README: optimize, quantize and check-trt need the export extra's onnx, not torch. The streamed int4 rebuild
    once reached torch through export.py (for its external-data writer) and died as an internal error."""
    code = f"""
from glm_export.cli import main
for args in (["quantize", {str(onnx_dir)!r}, "-o", {str(tmp_path / "int4")!r}, "--scheme", "int4-weight",
              "--accept-loss"],
             ["optimize", {str(onnx_dir)!r}, "-o", {str(tmp_path / "optimized")!r}],
             ["check-trt", {str(onnx_dir)!r}]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args[0], exc.code)
assert "torch" not in sys.modules and not any(m.startswith("torch.") for m in sys.modules)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from glm_runtime.manifest import load_manifest

    assert load_manifest(tmp_path / "int4").precision == "int4-weight"
    assert load_manifest(tmp_path / "optimized").kind == "onnx"
