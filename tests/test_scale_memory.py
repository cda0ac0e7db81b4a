"""Peak memory of export and int4 quantize does not grow with the number of layers (the streaming path).

Two random hub checkpoints (fp32 safetensors, 2 and 6 layers of h=384) go through `glmx export` and `glmx
quantize --scheme int4-weight`, each command in a process of its own; the peak resident set of each (ru_maxrss) is
compared. Four more layers are 4 x 7.1 MB of fp32 weights: a path that held the model would grow by about that
much (or a multiple of it), a streaming one by the graph description alone (2 MB for ten more layers, measured).

Each command's process is forked from one that has imported torch, onnx and glm_export already (tests/forked_cli.py;
2-4 s a process otherwise): every command starts from the same imported baseline, so the difference between the two
sizes is what the command itself holds.

`slow` (7-10 s here, a measurement rather than a unit check): `python -m pytest -q -m slow` runs it, and so does
`.ci/run`. The default suite keeps the structural guards in tests/test_pieces.py: the export that streams a
checkpoint folder without building the model, and the piecewise int4 stage that never loads the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests.forked_cli import ForkedCLI

H, HEADS, V, P = 384, 6, 512, 128
SIZES = (2, 6)
LAYER_BYTES = 12 * H * H * 4  # one layer's fp32 weights (QKV 3h^2, dense h^2, MLP 8h^2)


def peaks_of(scratch: Path, *commands) -> list[int]:
    """Peak RSS in bytes of each glmx command (its arguments), each run alone in a process of its own."""
    peaks = []
    with ForkedCLI(scratch) as cli:
        for command in commands:  # one after another
            child = cli.run(*command)
            assert child.returncode == 0, child.stderr[-4000:]
            peaks.append(child.peak_rss)
    return peaks


@pytest.fixture(scope="module")
def hubs(tmp_path_factory):
    import numpy as np

    from glm_runtime.config import GLMConfig
    from glmx_benchmarks.scale import write_random_hub
    from tests.fill_fixtures import make_tokenizer

    root = tmp_path_factory.mktemp("scale")
    make_tokenizer(root / "tokenizer.json")
    out = {}
    for layers in SIZES:
        cfg = GLMConfig(
            name=f"random-{layers}",
            num_layers=layers,
            hidden_size=H,
            num_attention_heads=HEADS,
            vocab_size=V,
            max_sequence_length=P,
            tokenizer="json",
            gelu="erf",
        )
        out[layers] = write_random_hub(
            root / f"hub-{layers}", cfg, dtype=np.float32, log=lambda m: None, tokenizer_file=root / "tokenizer.json"
        )
    return root, out


def export_then_int4(root: Path, layers: int, hub: Path) -> dict:
    """Peak RSS of `glmx export` and of `glmx quantize --scheme int4-weight` on one hub folder, each checked."""
    from glm_runtime.manifest import load_manifest

    onnx_dir, int4 = root / f"onnx-{layers}", root / f"int4-{layers}"
    export, quantize = peaks_of(
        root / f"forked-{layers}",
        ("export", hub, "-o", onnx_dir, "--external-data", "--check", "piecewise"),
        ("quantize", onnx_dir, "-o", int4, "--scheme", "int4-weight", "--check", "piecewise", "--accept-loss"),
    )
    peaks = {("export", layers): export, ("int4", layers): quantize}
    for folder in (onnx_dir, int4):  # both checked, one layer at a time, and recorded as such
        parity = load_manifest(folder).parity
        assert parity["method"].startswith("piecewise") and not parity.get("skipped")
    assert load_manifest(onnx_dir).parity["passed"]
    return peaks


@pytest.mark.slow
def test_export_and_int4_peak_memory_do_not_grow_with_layers(hubs):
    from concurrent.futures import ThreadPoolExecutor

    root, folders = hubs
    # the two sizes run side by side (two cores): ru_maxrss is each process's own peak, whatever runs beside it
    with ThreadPoolExecutor(len(folders)) as pool:
        runs = [pool.submit(export_then_int4, root, layers, hub) for layers, hub in folders.items()]
        peaks = {k: v for run in runs for k, v in run.result().items()}
    small, large = SIZES
    growth = (large - small) * LAYER_BYTES
    report = {k[0] + f"-{k[1]}": round(v / 2**20, 1) for k, v in peaks.items()}
    for stage in ("export", "int4"):
        grew = peaks[(stage, large)] - peaks[(stage, small)]
        # well below the extra layers' weights (28 MB): allocator noise and the larger graph only
        assert grew < 0.25 * growth, (stage, grew / 2**20, json.dumps(report))
