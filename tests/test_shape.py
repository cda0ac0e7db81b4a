"""The tree keeps its shape: no function over FUNCTION_LINES lines and no file over FILE_LINES, except the ones
listed below with the reason each is still one piece. A listed exception that has come back under the limit
fails too, so the list only shrinks (a line budget a machine checks, as tinygrad keeps one in CI)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("glm_export", "runtime", "benchmarks", "tests")
FILE_LINES = 500
FUNCTION_LINES = 80

# Counted on the formatted code (ruff format wraps a long call one argument a line): before the formatter only
# export_onnx was over a limit. Each entry says why it is still one piece; the list may only shrink.
LONG_FILES = {
    "glm_export/compare.py": "the comparison harness: GLM's cases, the one judge, the text checks and the parity "
    "record, read side by side; the piecewise runner is its own module already (pieces.py)",
    "glm_export/checkpoint.py": "the three checkpoint layouts (glmx, Hugging Face, Megatron) share one streamed "
    "conversion path; one module per layout would repeat it",
    "glm_export/quantize.py": "the five schemes' one entry function and recipe resolver (nbits_recipe); the "
    "streamed path and the calibration are their own functions and module (calibration.py)",
    "glm_export/cli.py": "the export side's nine commands with their help texts, each a thin wrapper",
    "glm_export/pretrain.py": "pretraining's loop, checkpointing and resume in one stage file (STYLE.md: one file "
    "per stage); the collator and evaluation are modules of their own",
    "benchmarks/bench.py": "glmx bench's grid, rounds and cache; its workers, artifacts, floor and report are "
    "modules of their own",
    "benchmarks/scale.py": "the scale benchmark's one script: stages, peak memory and its report",
    "runtime/engine.py": "the engine is one class that owns the loop (admit, context pass, decode, whole "
    "requests) with its record (Job); requests, beams and scoring live in their own modules",
    "tests/test_trt_session.py": "the TensorRT session's tests on one stand-in engine built once for the module",
    "tests/test_published.py": "every published vocabulary's folder through every stage, on fixtures built once",
    "tests/test_tokenizer.py": "the five tokenizer kinds against their reference encodings, on shared fixtures",
    "tests/test_export.py": "the export stage's tests on one tiny export built once for the module",
}
LONG_FUNCTIONS = {
    "glm_export/quantize.py:quantize_onnx": "the quantize stage's entry function: every scheme's checks, the "
    "printed and recorded assumptions, staging and the parity judgement in order",
    "glm_export/quantize.py:_quantize_streamed": "the streamed int4 / int8 / fp16 path, one layer after another",
    "glm_export/export.py:export_onnx": "the export stage's entry function: each step prints and records an "
    "assumption in order (config, tokenizer, precision, streaming, parity); each step is a call already",
    "glm_export/optimize.py:optimize_onnx": "the optimize stage's entry function, as export_onnx",
    "glm_export/pretrain.py:pretrain": "the training loop with its resume, logging and checkpoint steps in order",
    "glm_export/compare.py:glm_cases": "GLM's parity cases, one block each (mid-text blank, two blanks through "
    "the cache, [gMASK], two spans in one pass, right and left padding)",
    "runtime/tokenizer_folder.py:resolve_tokenizer": "which tokenizer a checkpoint folder holds: one decision "
    "table read top to bottom (asked kind, tokenizer_class, files, sizes), each branch naming its evidence",
    "benchmarks/attention_decode.py:main": "a stand-alone benchmark script's main: build, check, time, record",
    "benchmarks/scale.py:run_model": "one model size through every stage, timed and measured in order",
    "benchmarks/scale.py:write_report": "the report's table rows, one per stage",
    "benchmarks/continuous_batching.py:main": "a stand-alone benchmark script's main: both ways, interleaved",
    "benchmarks/llamacpp.py:compare": "the llama.cpp comparison's rounds, interleaved, and its record",
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
