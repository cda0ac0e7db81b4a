"""Peak memory of export and int4 quantize does not grow with the number of layers (the streaming path).

Two random hub checkpoints (fp32 safetensors, 2 and 12 layers of h=384) go through `glmx export` and `glmx
quantize --scheme int4-weight`, each in its own process; the peak resident set of each (ru_maxrss) is compared.
Ten more layers are 10 x 7.1 MB of fp32 weights: a path that held the model would grow by about that much (or a
multiple of it), a streaming one by the graph description alone.
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
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(rc.stdout[-2000:] + rc.stderr[-2000:])
print(rc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def peak_of(*cmd) -> int:
    """Peak RSS in bytes of `cmd` run alone in a fresh process (Linux ru_maxrss is in KiB)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], capture_output=True, text=True)
    rc, peak = out.stdout.split()
    assert rc == "0", out.stderr
    return int(peak)


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


def glmx() -> str:
    import shutil
    return shutil.which("glmx") or "glmx"


def test_export_and_int4_peak_memory_do_not_grow_with_layers(hubs):
    from glm_runtime.manifest import load_manifest
    root, folders = hubs
    peaks = {}
    for layers, hub in folders.items():
        onnx_dir, int4 = root / f"onnx-{layers}", root / f"int4-{layers}"
        peaks[("export", layers)] = peak_of(glmx(), "export", hub, "-o", onnx_dir, "--external-data",
                                            "--check", "piecewise")
        peaks[("int4", layers)] = peak_of(glmx(), "quantize", onnx_dir, "-o", int4, "--scheme", "int4-weight",
                                          "--check", "piecewise", "--accept-loss")
        for folder in (onnx_dir, int4):  # both checked, one layer at a time, and recorded as such
            parity = load_manifest(folder).parity
            assert parity["method"].startswith("piecewise") and not parity.get("skipped")
        assert load_manifest(onnx_dir).parity["passed"]
    growth = 10 * LAYER_BYTES
    report = {k[0] + f"-{k[1]}": round(v / 2 ** 20, 1) for k, v in peaks.items()}
    for stage in ("export", "int4"):
        grew = peaks[(stage, 12)] - peaks[(stage, 2)]
        # well below the ten extra layers' weights (71 MB): allocator noise and the larger graph only
        assert grew < 0.25 * growth, (stage, grew / 2 ** 20, json.dumps(report))
