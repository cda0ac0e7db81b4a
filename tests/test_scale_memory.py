"""Peak memory of export and int4 quantize does not grow with the number of layers (the streaming path).

Two random hub checkpoints (fp32 safetensors, 2 and 12 layers of h=384) go through `glmx export` and `glmx
quantize --scheme int4-weight`, each command in a process of its own; the peak resident set of each (ru_maxrss) is
compared. Ten more layers are 10 x 7.1 MB of fp32 weights: a path that held the model would grow by about that
much (or a multiple of it), a streaming one by the graph description alone.

Each command's process is forked from one that has imported torch, onnx and glm_export already (3-4 s a process
otherwise, most of this test's time): every command starts from the same imported baseline, so the difference
between the two sizes is what the command itself holds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

H, HEADS, V, P = 384, 6, 512, 128
LAYER_BYTES = 12 * H * H * 4  # one layer's fp32 weights (QKV 3h^2, dense h^2, MLP 8h^2)

MEASURE = """
import json, os, sys
import glm_export.checkpoint, glm_export.compare, glm_export.export, glm_export.pieces, glm_export.quantize
from glm_runtime.cli import run
for args in json.loads(sys.argv[1]):  # one forked process per command, one after another
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["glmx", *args]
        try:
            run()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        finally:
            sys.stderr.flush()
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, flush=True)  # Linux: KiB
"""


def peaks_of(*commands) -> list[int]:
    """Peak RSS in bytes of each glmx command (its arguments), each run alone in a process of its own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([list(map(str, c)) for c in commands])],
                         capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == len(commands) and all(rc == "0" for rc, _ in rows), out.stderr[-4000:]
    return [int(peak) for _, peak in rows]


@pytest.fixture(scope="module")
def hubs(tmp_path_factory):
    from glmx_benchmarks.scale import write_random_hub
    from glm_runtime.config import GLMConfig
    from tests.fill_fixtures import make_tokenizer
    import numpy as np
    root = tmp_path_factory.mktemp("scale")
    make_tokenizer(root / "tokenizer.json")
    out = {}
    for layers in (2, 12):
        cfg = GLMConfig(name=f"random-{layers}", num_layers=layers, hidden_size=H, num_attention_heads=HEADS,
                        vocab_size=V, max_sequence_length=P, tokenizer="json", gelu="erf")
        out[layers] = write_random_hub(root / f"hub-{layers}", cfg, dtype=np.float32, log=lambda m: None,
                                       tokenizer_file=root / "tokenizer.json")
    return root, out


def export_then_int4(root: Path, layers: int, hub: Path) -> dict:
    """Peak RSS of `glmx export` and of `glmx quantize --scheme int4-weight` on one hub folder, each checked."""
    from glm_runtime.manifest import load_manifest
    onnx_dir, int4 = root / f"onnx-{layers}", root / f"int4-{layers}"
    export, quantize = peaks_of(("export", hub, "-o", onnx_dir, "--external-data", "--check", "piecewise"),
                                ("quantize", onnx_dir, "-o", int4, "--scheme", "int4-weight", "--check", "piecewise",
                                 "--accept-loss"))
    peaks = {("export", layers): export, ("int4", layers): quantize}
    for folder in (onnx_dir, int4):  # both checked, one layer at a time, and recorded as such
        parity = load_manifest(folder).parity
        assert parity["method"].startswith("piecewise") and not parity.get("skipped")
    assert load_manifest(onnx_dir).parity["passed"]
    return peaks


def test_export_and_int4_peak_memory_do_not_grow_with_layers(hubs):
    from concurrent.futures import ThreadPoolExecutor
    root, folders = hubs
    # the two sizes run side by side (two cores): ru_maxrss is each process's own peak, whatever runs beside it
    with ThreadPoolExecutor(len(folders)) as pool:
        runs = [pool.submit(export_then_int4, root, layers, hub) for layers, hub in folders.items()]
        peaks = {k: v for run in runs for k, v in run.result().items()}
    growth = 10 * LAYER_BYTES
    report = {k[0] + f"-{k[1]}": round(v / 2 ** 20, 1) for k, v in peaks.items()}
    for stage in ("export", "int4"):
        grew = peaks[(stage, 12)] - peaks[(stage, 2)]
        # well below the ten extra layers' weights (71 MB): allocator noise and the larger graph only
        assert grew < 0.25 * growth, (stage, grew / 2 ** 20, json.dumps(report))
