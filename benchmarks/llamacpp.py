"""llama.cpp as a peer column: decode of one token at the same past, threads and batch, interleaved with glmx.

llama.cpp has no 2021-GLM architecture, but its GPT-2 architecture does the same work per token (LayerNorm,
fused QKV with bias, GeLU MLP, learned absolute positions, a tied head), so a GPT-2 GGUF of the same shape with
random weights is a fair stand-in for decode speed. This module writes that GGUF with the `gguf` package (F32),
quantizes it with llama.cpp's own `llama-quantize` (Q8_0, Q4_0), and times `llama-bench` against glmx's
fp32 / int8-weight / int4-weight artifacts of the same shape, round by round.

    python -m glmx_benchmarks.llamacpp --llamacpp DIR --glmx fp32=FOLDER --glmx int8=FOLDER --glmx int4=FOLDER
    glmx bench --llamacpp DIR        (the same, on glmx bench's GLM-Large-shape artifacts)

DIR holds bin/llama-bench and bin/llama-quantize (benchmarks/build_llamacpp.sh builds them; GLMX_LLAMACPP may
name DIR). Nothing here downloads or builds anything. Writes llamacpp.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from glm_runtime.errors import GLMXError

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}  # glmx bit width -> llama.cpp type


class PeerError(GLMXError, RuntimeError):
    """llama.cpp is not where it was said to be, or one of its tools failed."""


def find_llamacpp(folder: str | Path | None) -> dict[str, Path]:
    """{"bench": llama-bench, "quantize": llama-quantize} under folder/bin (or $GLMX_LLAMACPP/bin)."""
    folder = folder or os.environ.get("GLMX_LLAMACPP")
    if not folder:
        raise PeerError(
            "no llama.cpp build given: pass --llamacpp DIR or set GLMX_LLAMACPP (build one with "
            "benchmarks/build_llamacpp.sh DIR)"
        )
    tools = {k: Path(folder) / "bin" / f"llama-{k}" for k in ("bench", "quantize")}
    missing = [str(p) for p in tools.values() if not os.access(p, os.X_OK)]
    if missing:
        raise PeerError(
            f"{missing[0]} is missing or not executable; build it with benchmarks/build_llamacpp.sh {folder}"
        )
    return tools


def build_info(folder: Path) -> str:
    info = Path(folder) / "BUILD_INFO"
    return info.read_text().strip() if info.is_file() else "unknown build"


def write_gpt2_gguf(
    path: Path, *, layers: int, hidden: int, heads: int, vocab: int, positions: int, seed: int = 0
) -> Path:
    """A GPT-2 GGUF (F32) of this shape, random weights at GLM's init scale (std 0.02), tied head, a synthetic
    byte-level vocabulary (llama-bench feeds random ids; the text is never read)."""
    import gguf

    rng = np.random.default_rng(seed)
    tmp = Path(str(path) + ".partial")
    w = gguf.GGUFWriter(str(tmp), "gpt2")
    w.add_context_length(positions)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(0)  # ALL_F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["< t", "<t 0"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    ones, zeros = np.ones(hidden, np.float32), np.zeros(hidden, np.float32)
    w.add_tensor("token_embd.weight", normal(vocab, hidden))
    w.add_tensor("position_embd.weight", normal(positions, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_norm.bias", zeros)
        w.add_tensor(p + "attn_qkv.weight", normal(3 * hidden, hidden))
        w.add_tensor(p + "attn_qkv.bias", np.zeros(3 * hidden, np.float32))
        w.add_tensor(p + "attn_output.weight", normal(hidden, hidden))
        w.add_tensor(p + "attn_output.bias", zeros)
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_norm.bias", zeros)
        w.add_tensor(p + "ffn_up.weight", normal(4 * hidden, hidden))
        w.add_tensor(p + "ffn_up.bias", np.zeros(4 * hidden, np.float32))
        w.add_tensor(p + "ffn_down.weight", normal(hidden, 4 * hidden))
        w.add_tensor(p + "ffn_down.bias", zeros)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output_norm.bias", zeros)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def quantize_gguf(tools: dict[str, Path], src: Path, dst: Path, kind: str) -> Path:
    if dst.is_file():
        return dst
    tmp = Path(str(dst) + ".partial")
    proc = subprocess.run([str(tools["quantize"]), str(src), str(tmp), kind], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerError(f"llama-quantize {kind} failed: {proc.stderr.strip().splitlines()[-1:]}")
    os.replace(tmp, dst)
    return dst


def llama_decode_ms(tools: dict[str, Path], model: Path, past: int, threads: int, tokens: int = 16) -> float:
    """ms per generated token at depth `past`, batch 1 (llama-bench -p 0 -n tokens -d past, its mean)."""
    proc = subprocess.run(
        [
            str(tools["bench"]),
            "-m",
            str(model),
            "-p",
            "0",
            "-n",
            str(tokens),
            "-d",
            str(past),
            "-t",
            str(threads),
            "-r",
            "3",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PeerError(f"llama-bench failed on {model.name}: {proc.stderr.strip().splitlines()[-1:]}")
    (row,) = [r for r in json.loads(proc.stdout) if r.get("n_gen") == tokens]
    return 1000.0 / float(row["avg_ts"])


def llama_prompt_ms(tools: dict[str, Path], model: Path, tokens: int, threads: int) -> float:
    """ms for a prompt of `tokens` tokens, batch 1 (llama-bench -p tokens -n 0, its mean)."""
    proc = subprocess.run(
        [
            str(tools["bench"]),
            "-m",
            str(model),
            "-p",
            str(tokens),
            "-n",
            "0",
            "-t",
            str(threads),
            "-r",
            "3",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PeerError(f"llama-bench failed on {model.name}: {proc.stderr.strip().splitlines()[-1:]}")
    (row,) = [r for r in json.loads(proc.stdout) if r.get("n_prompt") == tokens]
    return 1000.0 * tokens / float(row["avg_ts"])


def glmx_session(folder: Path, threads: int):
    """glmx's ONNX Runtime session on `threads` intra-op threads, one inter-op (the benchmark's settings)."""
    import onnxruntime as ort

    from glm_runtime.session import OnnxRuntimeSession

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return OnnxRuntimeSession(folder, session_options=options, verify=False)


def glmx_context_ms(folder: Path, tokens: int, threads: int, repeats: int = 3) -> float:
    """ms of glmx's context pass over `tokens` tokens, batch 1 (the runtime's own call: logits at the last row)."""
    from glm_runtime import steps

    session = glmx_session(folder, threads)
    steps.run_context(session, [[5] * tokens], 0)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        steps.run_context(session, [[5] * tokens], 0)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def glmx_decode_ms(folder: Path, past: int, threads: int, tokens: int = 16) -> float:
    """ms per decode step of one token at past `past`, batch 1, on ONNX Runtime with `threads` threads: the
    context pass of `past` tokens, then `tokens` steps; the median step."""
    from glm_runtime import masks, steps

    session = glmx_session(folder, threads)
    cache = session.new_cache(1, past + tokens + 2)
    steps.context_pass(session, cache, [[5] * past], 0)
    times = []
    for t in range(tokens):
        positions = masks.decode_positions([past - 1], [t])
        t0 = time.perf_counter()
        steps.decode_step(session, cache, [7], positions, [True])
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times[2:])


def compare(
    llamacpp: str | Path | None,
    glmx: dict[str, Path],
    *,
    shape: dict[str, int],
    past: int = 128,
    threads: int = 2,
    rounds: int = 3,
    work: Path = Path("/tmp/glmx-llamacpp"),
    say=lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Per bit width: llama.cpp's and glmx's ms/token, measured interleaved over `rounds`, medians and ratio; and
    glmx's step against its bandwidth floor: the bytes it reads (streamed weights + cached K/V at `past`) over the
    best read bandwidth sampled at the start of each round (glmx_benchmarks.floor, as glmx bench does)."""
    from glmx_benchmarks import floor

    tools = find_llamacpp(llamacpp)
    folder = tools["bench"].parent.parent
    work.mkdir(parents=True, exist_ok=True)
    tag = "gpt2-{layers}x{hidden}-h{heads}-v{vocab}".format(**shape)
    f32 = work / f"{tag}-F32.gguf"
    if not f32.is_file():
        say(f"llamacpp: writing {f32.name} (random weights, std 0.02)")
        write_gpt2_gguf(f32, **shape)
    models = {}
    for key in glmx:  # "int4" or "int4/label" (another glmx recipe at the same bits)
        kind = LLAMA_TYPES[key.split("/")[0]]
        models[key] = f32 if kind == "F32" else quantize_gguf(tools, f32, work / f"{tag}-{kind}.gguf", kind)
    keys = ("llama.cpp", "glmx", "llama.cpp prompt", "glmx context")
    runs: dict[str, dict[str, list[float]]] = {b: {k: [] for k in keys} for b in glmx}
    bandwidth: list[dict[str, Any]] = []
    for r in range(rounds):
        bandwidth.append(floor.measure_bandwidth(megabytes=512, threads=threads, repeats=5))
        for bits in glmx:
            v = runs[bits]
            v["llama.cpp"].append(llama_decode_ms(tools, models[bits], past, threads))
            v["glmx"].append(glmx_decode_ms(Path(glmx[bits]), past, threads))
            v["llama.cpp prompt"].append(llama_prompt_ms(tools, models[bits], past, threads))
            v["glmx context"].append(glmx_context_ms(Path(glmx[bits]), past, threads))
            say(
                f"llamacpp: round {r + 1} {bits}: decode llama.cpp {v['llama.cpp'][-1]:.1f} ms, glmx "
                f"{v['glmx'][-1]:.1f} ms; {past}-token prompt llama.cpp {v['llama.cpp prompt'][-1]:.0f} ms, glmx "
                f"{v['glmx context'][-1]:.0f} ms"
            )
    best = max(bandwidth, key=lambda b: b["read_bytes_per_s"])
    kv = floor.kv_bytes(SimpleNamespace(num_layers=shape["layers"], hidden_size=shape["hidden"]), past, batch=1)
    rows = {}
    for bits, v in runs.items():
        med = {k: statistics.median(x) for k, x in v.items()}
        read = floor.streamed_weight_bytes(glmx[bits])["streamed_bytes"] + kv
        floor_ms = read / best["read_bytes_per_s"] * 1e3
        rows[bits] = {
            "llama_type": LLAMA_TYPES[bits.split("/")[0]],
            "llama_ms": med["llama.cpp"],
            "glmx_ms": med["glmx"],
            "glmx_over_llama": med["glmx"] / med["llama.cpp"],
            "llama_prompt_ms": med["llama.cpp prompt"],
            "glmx_context_ms": med["glmx context"],
            "context_glmx_over_llama": med["glmx context"] / med["llama.cpp prompt"],
            "llama_file_mb": models[bits].stat().st_size / 1e6,
            "rounds": v,
            "glmx_read_mb": read / 1e6,
            "glmx_floor_ms": floor_ms,
            "glmx_over_floor": med["glmx"] / floor_ms,
            "glmx_artifact": str(glmx[bits]),
        }
    return {
        "past": past,
        "threads": threads,
        "batch": 1,
        "rounds": rounds,
        "shape": shape,
        "llama_cpp": build_info(folder),
        "rows": rows,
        "bandwidth": {
            "read_bytes_per_s": best["read_bytes_per_s"],
            "read_kernel": best["read_kernel"],
            "samples_read_bytes_per_s": [b["read_bytes_per_s"] for b in bandwidth],
            "method": best["method"] + "; the best of one sample per round",
        },
    }


def table(record: dict[str, Any]) -> str:
    p = record["past"]
    lines = [
        f"| bits | llama.cpp type | decode ms/token: llama.cpp | glmx | glmx / llama.cpp | glmx reads | glmx / "
        f"floor | {p}-token prompt ms: llama.cpp | glmx | glmx / llama.cpp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bits, r in record["rows"].items():
        floor = f"{r['glmx_read_mb']:.0f} MB | {r['glmx_over_floor']:.2f}x" if "glmx_over_floor" in r else " | "
        lines.append(
            f"| {bits} | {r['llama_type']} ({r['llama_file_mb']:.0f} MB) | {r['llama_ms']:.1f} | "
            f"{r['glmx_ms']:.1f} | {r['glmx_over_llama']:.2f}x | {floor} | {r['llama_prompt_ms']:.0f} | "
            f"{r['glmx_context_ms']:.0f} | {r['context_glmx_over_llama']:.2f}x |"
        )
    if "bandwidth" in record:
        lines.append(
            f"\nFloor: the bytes a glmx step reads (streamed weights + fp32 K/V at past {p}) over "
            f"{record['bandwidth']['read_bytes_per_s'] / 1e9:.1f} GB/s, the best read bandwidth of the run "
            f"({record['bandwidth']['read_kernel']}, one sample per round)."
        )
    return "\n".join(lines)


def llamacpp_column(
    llamacpp: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    threads: int = 2,
    past: int = 128,
    rounds: int = 3,
    log=lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    """glmx bench --llamacpp: the comparison on glmx bench's own GLM-Large-shape artifacts (built into cache_dir
    if they are not there), written to out_dir/llamacpp.{json,md}."""
    from glmx_benchmarks import artifacts

    model = artifacts.prepare_model("glm-large-shape", Path(cache_dir), log)
    glmx = {
        bits: artifacts.prepare_variant(model, variant, log)[1]
        for bits, variant in (("fp32", "ort-fp32"), ("int8", "ort-int8-weight"), ("int4", "ort-int4"))
    }
    cfg = artifacts.model_config("glm-large-shape")
    shape = {
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "vocab": cfg.vocab_size,
        "positions": cfg.max_sequence_length,
    }
    record = compare(
        llamacpp,
        glmx,
        shape=shape,
        past=past,
        threads=threads,
        rounds=rounds,
        work=Path(cache_dir) / "llamacpp",
        say=log,
    )
    write_record(record, Path(out_dir), "glmx bench --llamacpp " + str(llamacpp))
    return record


def write_record(record: dict[str, Any], out: Path, command: str) -> None:
    from glmx_benchmarks.machine import cpu_facts
    from glmx_benchmarks.report import save_record

    record["cpu_flags"] = cpu_facts()["flags"]
    record["command"], record["date"] = command, time.strftime("%Y-%m-%d %H:%M")
    info = record["llama_cpp"].splitlines()
    md = (
        f"# glmx against llama.cpp: decode of one token at past {record['past']} and a {record['past']}-token "
        f"prompt, batch 1, {record['threads']} threads\n\n`{command}` on {record['date']}; "
        f"median of {record['rounds']} interleaved rounds; "
        f"{'; '.join(info[:2])}\nCPU flags: "
        f"{' '.join(f for f in record['cpu_flags'] if f.startswith(('avx', 'amx', 'fma')))}\n\n" + table(record)
    )
    save_record(out, "llamacpp", record, md)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp", default=None, help="folder with bin/llama-bench, bin/llama-quantize")
    parser.add_argument(
        "--glmx",
        action="append",
        required=True,
        help="BITS[/LABEL]=FOLDER (BITS: fp32, int8, int4): glmx artifacts of the GLM-Large shape; "
        "repeat (a label tells two glmx recipes at the same bits apart)",
    )
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    glmx = dict(item.split("=", 1) for item in args.glmx)
    unknown = sorted({k.split("/")[0] for k in glmx} - set(LLAMA_TYPES))
    if unknown:
        parser.error(f"unknown bit width {unknown[0]!r}; use {', '.join(LLAMA_TYPES)}")
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab", "positions")}
    try:
        record = compare(
            args.llamacpp,
            {k: Path(v) for k, v in glmx.items()},
            shape=shape,
            past=args.past,
            threads=args.threads,
            rounds=args.rounds,
        )
    except PeerError as exc:
        sys.exit(f"Error: {exc}")
    write_record(
        record, args.out, "python -m glmx_benchmarks.llamacpp " + " ".join(argv if argv is not None else sys.argv[1:])
    )


if __name__ == "__main__":
    main()
