"""The tree keeps its shape: no function over FUNCTION_LINES lines and no file over FILE_LINES, except the ones
listed below with the reason each is still one piece. A listed exception that has come back under the limit
fails too, so the list only shrinks (../shared/STYLE.md: "Small files"; tinygrad keeps a line budget in CI)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("glm_export", "runtime", "benchmarks", "tests")
FILE_LINES = 500
FUNCTION_LINES = 80

LONG_FILES = {
    "glm_export/checkpoint.py": "the three checkpoint layouts (glmx, Hugging Face, Megatron) and their key maps; "
    "one reader per layout would repeat the streamed-conversion path they share",
    "glm_export/compare.py": "the comparison harness: cases, the one judge, text checks and the parity record "
    "read best side by side; the piecewise runner is already its own module (pieces.py)",
    "benchmarks/bench.py": "glmx bench's grid, rounds and cache in one script; its workers, artifacts, floor and "
    "report are modules of their own",
    "tests/test_trt_session.py": "the TensorRT session's tests on a stand-in engine that runs on the CPU; one "
    "fixture builds it, and splitting the file would build it twice",
}
LONG_FUNCTIONS = {
    "glm_export/export.py:export_onnx": "the export stage's one entry function: every step prints and records "
    "an assumption in order (config, tokenizer, precision, streaming, parity); each step is a call already"
}


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    files, functions = {}, {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            text = path.read_text(encoding="utf-8")
            files[name] = len(text.splitlines())
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return files, functions


def test_no_file_is_over_the_limit_unless_listed():
    files, _ = sizes()
    assert len(files) > 80  # the walk saw the tree
    over = {name: n for name, n in files.items() if n > FILE_LINES}
    unlisted = sorted(set(over) - set(LONG_FILES))
    assert not unlisted, f"over {FILE_LINES} lines: {[(n, over[n]) for n in unlisted]}; split it or list it"
    back = sorted(set(LONG_FILES) - set(over))
    assert not back, f"listed as long but now within {FILE_LINES} lines: {back}; drop them from LONG_FILES"


def test_no_function_is_over_the_limit_unless_listed():
    _, functions = sizes()
    over = {name: n for name, n in functions.items() if n > FUNCTION_LINES}
    unlisted = sorted(set(over) - set(LONG_FUNCTIONS))
    assert not unlisted, f"over {FUNCTION_LINES} lines: {[(n, over[n]) for n in unlisted]}; split it or list it"
    back = sorted(set(LONG_FUNCTIONS) - set(over))
    assert not back, f"listed as long but now within {FUNCTION_LINES} lines: {back}; drop them from LONG_FUNCTIONS"
