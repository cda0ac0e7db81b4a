"""Where one decode step's time goes: ONNX Runtime's node profiler over the runtime's own decode step.

In: an exported ONNX folder, threads, past length. Out (stdout): the median step time with profiling on, the
nodes per step, and kernel time per op type, heaviest first.
The profiler adds a cost to every node it times, so a graph of many small nodes looks slower than it runs (compare
the step time printed here with the unprofiled one in benchmarks/results/results.md); glmx_benchmarks.kernel_rates
times kernels without it.

    python -m glmx_benchmarks.profile_decode FOLDER [--threads 2] [--past 128] [--steps 20] [--rows 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile

import numpy as np


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    from glm_runtime import masks
    from glm_runtime.session import open_session
    from glm_runtime.steps import decode_step
    from glmx_benchmarks.worker import fill_cache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=1, help="rows decoded together (batch)")
    ap.add_argument("--nodes", type=int, default=0, help="also list the N heaviest nodes by name")
    args = ap.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = tempfile.mkdtemp(prefix="glmx-profile-") + "/decode"
    session = open_session(args.folder, "onnxruntime", session_options=options)
    rows = args.rows
    cache = fill_cache(session, rows, args.past, np.random.default_rng(0))
    positions = masks.decode_positions([args.past // 2] * rows, [1] * rows)
    for _ in range(args.steps):
        decode_step(session, cache, [500] * rows, positions, [True] * rows)
        cache.truncate([args.past] * rows)
    events = json.load(open(session._session.end_profiling()))
    per_op, count, per_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
            per_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    runs = sorted(e["dur"] for e in events if e.get("name") == "model_run")
    total = sum(per_op.values())
    print(
        f"step median {runs[len(runs) // 2] / 1e3:.2f} ms with profiling on; {sum(count.values()) // args.steps} "
        f"nodes per step; kernels {total / args.steps / 1e3:.2f} ms per step"
    )
    for op, us in per_op.most_common(15):
        print(f"{op:28s} {us / args.steps / 1e3:8.2f} ms/step {100 * us / total:5.1f}%  x{count[op] // args.steps}")

    for node, us in per_node.most_common(args.nodes):
        print(f"{node:60s} {us / args.steps / 1e3:8.2f} ms/step")


if __name__ == "__main__":
    main()
