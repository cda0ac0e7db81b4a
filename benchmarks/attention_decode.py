"""Attention over the KV cache in a decode step, alone: glmx's graph (split scores: past and new, one Softmax,
probabilities split again; present-is-new) against ONNX Runtime's fused attention kernels, 24 layers of GLM-Large's
heads (16 x 64):
- MultiHeadAttention (com.microsoft) and ONNX's own Attention (opset 23): past K/V in, an additive mask, the same
  IO contract except that the kernel concatenates past and new into a present it returns (requesting no present
  from MultiHeadAttention makes it ignore the past: wrong values, so it is not timed);
- GroupQueryAttention with a shared past/present buffer (the graph writes the new K/V into the preallocated
  cache): a changed IO contract.

    python -m glmx_benchmarks.attention_decode [--past 128 512] [--rounds 20]

Why glmx's attention reads the cache below the machine's bandwidth (the rates it reaches are in
results/attention_decode.md): each layer's two products are 16 per-head matrix-vector products (M = 1) that ONNX
Runtime's MatMul runs as small batched GEMMs (FusedMatMul with transB for the scores), each call with its own
dispatch, where numpy's own matrix-vector product streams the same bytes faster on one thread.
GroupQueryAttention is causal with per-row lengths (seqlens_k): it fits GLM's decode and span steps (a new token
sees every filled slot of its row), not the bidirectional context pass. The two fused
kernels' outputs are checked against glmx's graph on the same inputs (max abs difference recorded) before they are
timed. The sessions run with intra-op spinning off: with it on, each session's idle threads spin through the next
session's run and the interleaved timings measure that contention (2-5x here), not the kernels.
Out: results/attention_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper

from glmx_benchmarks.report import save_record

n, d, L = 16, 64, 24
h = n * d
RESULTS = Path(__file__).resolve().parent / "results"


def sess(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the docstring
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def vi(name, shape, t=TP.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def current():
    """glmx's own graph per layer: scores against the past and the new key apart, one softmax over both, the two
    value products added (the contract's split-score attention; the past K is read transposed, not copied)."""
    inputs = [vi("q", [1, n, 1, d]), vi("k", [1, n, 1, d]), vi("v", [1, n, 1, d]), vi("mask", [1, 1, 1, "PT"], TP.BOOL)]
    inits = [
        helper.make_tensor("fill", TP.FLOAT, [], [-65504.0]),
        helper.make_tensor("s0", TP.INT64, [1], [0]),
        helper.make_tensor("ax3", TP.INT64, [1], [3]),
        helper.make_tensor("big", TP.INT64, [1], [2**62]),
    ]
    nodes, outs = [helper.make_node("Shape", ["pk0"], ["pks"], start=2, end=3)], []
    node = helper.make_node
    for i in range(L):
        inputs += [vi(f"pk{i}", [1, n, "P", d]), vi(f"pv{i}", [1, n, "P", d])]
        p = f"l{i}/"
        nodes += [
            node("Transpose", [f"pk{i}"], [p + "kt"], perm=[0, 1, 3, 2]),
            node("Transpose", ["k"], [p + "knt"], perm=[0, 1, 3, 2]),
            node("MatMul", ["q", p + "kt"], [p + "sp"]),
            node("MatMul", ["q", p + "knt"], [p + "sn"]),
            node("Concat", [p + "sp", p + "sn"], [p + "s"], axis=3),
            node("Where", ["mask", p + "s", "fill"], [p + "m"]),
            node("Softmax", [p + "m"], [p + "pr"], axis=-1),
            node("Slice", [p + "pr", "s0", "pks", "ax3"], [p + "pp"]),
            node("Slice", [p + "pr", "pks", "big", "ax3"], [p + "pn"]),
            node("MatMul", [p + "pp", f"pv{i}"], [p + "cp"]),
            node("MatMul", [p + "pn", "v"], [p + "cn"]),
            node("Add", [p + "cp", p + "cn"], [f"out{i}"]),
        ]
        outs.append(vi(f"out{i}", [1, n, 1, d]))
    graph = helper.make_graph(nodes, "att", inputs, outs, inits)
    return sess(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def gqa(cap):
    """GroupQueryAttention per layer over a preallocated past of `cap` slots shared with the present (the
    contract change measured: seqlens / total say how much of the buffer is filled)."""
    ins = [
        vi("q", [1, 1, h]),
        vi("k", [1, 1, h]),
        vi("v", [1, 1, h]),
        vi("seqlens", [1], TP.INT32),
        vi("total", [], TP.INT32),
    ]
    nodes, outs = [], []
    for i in range(L):
        ins += [vi(f"pk{i}", [1, n, cap, d]), vi(f"pv{i}", [1, n, cap, d])]
        o = [f"o{i}", f"prk{i}", f"prv{i}"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                ["q", "k", "v", f"pk{i}", f"pv{i}", "seqlens", "total"],
                o,
                domain="com.microsoft",
                num_heads=n,
                kv_num_heads=n,
            )
        )
        outs += [vi(x, None) for x in o]
    graph = helper.make_graph(nodes, "g", ins, outs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return sess(helper.make_model(graph, opset_imports=opsets))


def fused(kind):
    """One fused node per layer with past K/V, an additive mask [1,1,1,P+1] and present outputs (the kernel
    concatenates). kind "mha": com.microsoft MultiHeadAttention, q/k/v [1,1,h]; "onnx": Attention-23, [1,n,1,d]."""
    qkv = [1, 1, h] if kind == "mha" else [1, n, 1, d]
    ins = [vi("q", qkv), vi("k", qkv), vi("v", qkv), vi("bias", [1, 1, 1, "PT"])]
    nodes, outs = [], []
    for i in range(L):
        ins += [vi(f"pk{i}", [1, n, "P", d]), vi(f"pv{i}", [1, n, "P", d])]
        o = [f"out{i}", f"prk{i}", f"prv{i}"]
        if kind == "mha":
            nodes.append(
                helper.make_node(
                    "MultiHeadAttention",
                    ["q", "k", "v", "", "", "bias", f"pk{i}", f"pv{i}"],
                    o,
                    domain="com.microsoft",
                    num_heads=n,
                    scale=1.0,
                )
            )
        else:
            nodes.append(helper.make_node("Attention", ["q", "k", "v", "bias", f"pk{i}", f"pv{i}"], o, scale=1.0))
        outs += [vi(x, None) for x in o]
    opsets = (
        [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        if kind == "mha"
        else [helper.make_opsetid("", 23)]
    )
    return sess(helper.make_model(helper.make_graph(nodes, kind, ins, outs), opset_imports=opsets))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds; the first 3 are warm-up (at least 4)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.rounds < 4:
        ap.error(f"--rounds must be at least 4 (the first 3 are warm-up), got {args.rounds}")
    from glmx_benchmarks.machine import cpu_facts

    rng = np.random.default_rng(0)
    rows = []
    for P in args.past:
        cap = P + 16
        cur, g, mha, onnx_att = current(), gqa(cap), fused("mha"), fused("onnx")
        fc = {
            "q": rng.standard_normal((1, n, 1, d), dtype=np.float32),
            "k": rng.standard_normal((1, n, 1, d), dtype=np.float32),
            "v": rng.standard_normal((1, n, 1, d), dtype=np.float32),
            "mask": np.ones((1, 1, 1, P + 1), bool),
        }
        io = g.io_binding()
        small = {
            "q": rng.standard_normal((1, 1, h), dtype=np.float32),
            "k": rng.standard_normal((1, 1, h), dtype=np.float32),
            "v": rng.standard_normal((1, 1, h), dtype=np.float32),
            "seqlens": np.array([P], np.int32),
            "total": np.array(P + 1, np.int32),
        }
        for k, v in small.items():
            io.bind_cpu_input(k, v)
        for i in range(L):
            fc[f"pk{i}"] = rng.standard_normal((1, n, P, d), dtype=np.float32)
            fc[f"pv{i}"] = rng.standard_normal((1, n, P, d), dtype=np.float32)
            for name in (f"pk{i}", f"pv{i}"):
                buf = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, n, cap, d), dtype=np.float32))
                io.bind_ortvalue_input(name, buf)
                io.bind_ortvalue_output(name.replace("pk", "prk").replace("pv", "prv"), buf)  # shared buffer
            io.bind_output(f"o{i}")
        # the fused kernels get glmx's own inputs: q/k/v as [1,1,h] for MultiHeadAttention, the mask as 0 / -inf
        fo = {k: v for k, v in fc.items() if k != "mask"} | {"bias": np.zeros((1, 1, 1, P + 1), np.float32)}
        fm = fo | {k: fc[k].transpose(0, 2, 1, 3).reshape(1, 1, h) for k in "qkv"}
        names = [f"out{i}" for i in range(L)]
        want = cur.run(names, fc)
        diff = {
            "mha": max(
                float(np.abs(o.reshape(1, 1, n, d).transpose(0, 2, 1, 3) - w).max())
                for o, w in zip(mha.run(names, fm), want)
            ),
            "onnx_attention": max(float(np.abs(o - w).max()) for o, w in zip(onnx_att.run(names, fo), want)),
        }
        wrong = {k: v for k, v in diff.items() if v > 1e-4}
        if wrong:  # a kernel that computes something else is not timed
            sys.exit(
                f"attention_decode: at past {P}, {', '.join(wrong)} disagree with glmx's graph (max abs "
                f"difference {max(wrong.values()):.3g} > 1e-4); nothing timed"
            )
        runs = {
            "glmx": lambda: cur.run(names, fc),  # noqa: B023 - called within this iteration
            "mha": lambda: mha.run(names, fm),  # noqa: B023 - called within this iteration
            "onnx_attention": lambda: onnx_att.run(names, fo),  # noqa: B023 - called within this iteration
            "gqa": lambda: g.run_with_iobinding(io),  # noqa: B023 - called within this iteration
        }
        times = {k: [] for k in runs}
        for _ in range(args.rounds):  # interleaved
            for k, run in runs.items():
                t = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t)
        mb = 2 * L * n * P * d * 4 / 1e6
        row = {"past": P, "cache_mb": mb, "max_abs_diff_vs_glmx": diff}
        for k, v in times.items():
            t = statistics.median(v[3:])
            row[k + "_ms"], row[k + "_gb_per_s"] = 1000 * t, mb / 1000 / t
        rows.append(row)
    cpu = cpu_facts()
    given = argv if argv is not None else sys.argv[1:]
    record = {
        "command": "python -m glmx_benchmarks.attention_decode " + " ".join(given),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "onnxruntime": ort.__version__,
        "threads": 2,
        "intra_op_spinning": False,
        "cpu": cpu["cpu"],
        "cpu_flags": cpu["flags"],
        "rows": rows,
    }
    lines = [
        "# Attention over the cache, one decode token, 24 layers x 16 heads x 64, 2 threads",
        "",
        f"`{record['command']}` on {record['date']}, onnxruntime {record['onnxruntime']}, {cpu['cpu']}, median "
        f"of {args.rounds} interleaved rounds, intra-op spinning off. CPU flags: {' '.join(cpu['flags'])}",
        "",
        "ms per step (cache read in GB/s); the ratio is glmx's graph over the variant (above 1: the variant is "
        "faster). Same IO contract: MultiHeadAttention and ONNX Attention-23 (each returns a concatenated "
        "present). Changed contract: GroupQueryAttention over a shared preallocated buffer.",
        "",
        "| past | cache MB | glmx graph | MultiHeadAttention | ratio | ONNX Attention-23 | ratio | "
        "GroupQueryAttention, shared buffer | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[k + '_ms']:.2f} ({r[k + '_gb_per_s']:.1f})" for k in ("glmx", "mha", "onnx_attention", "gqa")]
        lines.append(
            f"| {r['past']} | {r['cache_mb']:.1f} | {cells[0]} | "
            + " | ".join(
                f"{c} | {r['glmx_ms'] / r[k + '_ms']:.2f}x" for c, k in zip(cells[1:], ("mha", "onnx_attention", "gqa"))
            )
            + " |"
        )
    save_record(args.out, "attention_decode", record, "\n".join(lines))


if __name__ == "__main__":
    main()
