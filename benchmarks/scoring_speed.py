"""Cloze scoring speed: candidates scored per second by glm_runtime.score against the official code's way.

In: the bundled model (and, with --large, the GLM-Large shape from the bench cache). Out:
benchmarks/results/scoring_speed.json and scoring_speed.md. For 2, 4 and 16 candidates per prompt: glmx on ONNX
Runtime (one context pass per prompt, every candidate in one span call) against the torch reference scoring each
candidate by a full forward of context + sop + answer (THUDM/GLM GLMForMultiTokenCloze does one such row per
candidate).
Interleaved rounds, medians; threads fixed; the CPU's vector flags recorded (int8 and kernel rates move with
them). The scores of the two are compared too (max |difference| per target token).

    python -m glmx_benchmarks.scoring_speed [--large] [--rounds 3] [--threads 2] [-o benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (2, 4, 16)
PROMPTS = 8


def workload(tok, vocab_size: int, count: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """PROMPTS held-out sentences with one [MASK] each, `count` candidate answers of 1-4 tokens per prompt."""
    from glm_export.compare import heldout_text, text_windows

    text, _ = heldout_text(tok.kind)
    rng = np.random.default_rng(seed)
    windows = text_windows(tok, text, vocab_size, 24, PROMPTS + count * PROMPTS)
    prompts = [
        " ".join(f"{tok.decode(w[:10].tolist())} [MASK] {tok.decode(w[14:].tolist())}".split())
        for w in windows[:PROMPTS]
    ]
    pool = windows[PROMPTS:]
    candidates = []
    for p in range(PROMPTS):
        mine = []
        for k in range(count):
            w = pool[(p * count + k) % len(pool)]
            n = int(rng.integers(1, 5))
            answer = " ".join(tok.decode(w[:n].tolist()).split())  # held-out words; line breaks folded
            mine.append(" " + answer if answer else " x")
        candidates.append(mine)
    return prompts, candidates


def torch_scores(model, tok, prompts, candidates) -> list[list[float]]:
    """One full forward per candidate (context + sop + answer, sep = C): the official code's work."""
    import torch

    from glm_runtime.tokenizer import build_context_ids

    out = []
    for prompt, answers in zip(prompts, candidates):
        ctx = build_context_ids(tok, prompt)
        m, C = ctx.index(tok.special["MASK"]), len(ctx)
        row = []
        for answer in answers:
            ans = tok.encode(answer)
            ids = ctx + [tok.special["sop"]] + ans
            pos = [list(range(C)) + [m] * (len(ans) + 1), [0] * C + list(range(1, len(ans) + 2))]
            with torch.inference_mode():
                logits, _ = model(torch.tensor([ids]), torch.tensor([pos]), C)
            logp = torch.log_softmax(logits[0, C:].double(), -1)
            targets = ans + [tok.special["eop"]]
            row.append(float(sum(logp[t, x] for t, x in enumerate(targets))))
        out.append(row)
    return out


def measure(name: str, onnx_dir: Path, checkpoint: Path, rounds: int, threads: int) -> dict:
    import onnxruntime as ort
    import torch

    from glm_export.checkpoint import load_checkpoint
    from glm_runtime.score import score_candidates
    from glm_runtime.session import open_model

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session, tok = open_model(onnx_dir, session_options=options)
    model = load_checkpoint(checkpoint, config=session.config).model
    rows = {}
    for count in COUNTS:
        prompts, candidates = workload(tok, session.config.vocab_size, count)
        glmx_scores = score_candidates(session, tok, prompts, candidates)
        ref = torch_scores(model, tok, prompts, candidates)
        diff = max(abs(g.total - r) / g.length for gs, rs in zip(glmx_scores, ref) for g, r in zip(gs, rs))
        times = {"glmx-ort": [], "torch-per-candidate": []}
        for k in range(rounds):  # interleaved, the order alternating each round
            order = ("glmx-ort", "torch-per-candidate") if k % 2 == 0 else ("torch-per-candidate", "glmx-ort")
            for which in order:
                t0 = time.perf_counter()
                if which == "glmx-ort":
                    score_candidates(session, tok, prompts, candidates)
                else:
                    torch_scores(model, tok, prompts, candidates)
                times[which].append(time.perf_counter() - t0)
        n = PROMPTS * count
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows[str(count)] = {
            "candidates": n,
            "seconds": times,
            "median_s": med,
            "candidates_per_s": {k: n / v for k, v in med.items()},
            "speedup": med["torch-per-candidate"] / med["glmx-ort"],
            "max_abs_diff_per_target_token": diff,
        }
        print(
            f"{name} {count:2d} candidates/prompt: glmx {n / med['glmx-ort']:8.1f}/s, torch per candidate "
            f"{n / med['torch-per-candidate']:8.1f}/s, {rows[str(count)]['speedup']:.1f}x",
            file=sys.stderr,
        )
    return {"onnx": str(onnx_dir), "config": session.config.to_dict(), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also the GLM-Large shape (from the bench cache)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default="/tmp/glmx-bench-cache")
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from glm_export.export import BUNDLED_CHECKPOINT
    from glm_runtime.manifest import atomic_write_json, atomic_write_text
    from glm_runtime.session import BUNDLED_MODEL
    from glmx_benchmarks import artifacts
    from glmx_benchmarks.bench import machine_info

    models = {"bundled": measure("bundled", BUNDLED_MODEL, BUNDLED_CHECKPOINT, args.rounds, args.threads)}
    if args.large:
        prepared = artifacts.prepare_model("glm-large-shape", Path(args.cache_dir), lambda m: print(m, file=sys.stderr))
        models["glm-large-shape"] = measure(
            "glm-large-shape", prepared["fp32"], prepared["checkpoint"], args.rounds, args.threads
        )
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "command": "python -m glmx_benchmarks.scoring_speed " + " ".join(given),
        "machine": machine_info(args.threads),
        "prompts": PROMPTS,
        "rounds": args.rounds,
        "models": models,
        "how": "candidates scored per second (median of interleaved rounds); glmx = glm_runtime.score on "
        "ONNX Runtime CPU (one context pass per prompt, all candidates in one span call); torch = "
        "the reference GLMModel, one full forward of context + sop + answer per candidate",
    }
    out = Path(args.out)
    atomic_write_json(out / "scoring_speed.json", result)
    lines = [
        f"# Cloze scoring speed\n\n`{result['command']}` on {result['machine']['cpu']} "
        f"({', '.join(result['machine']['cpu_flags'])}), {args.threads} threads, {PROMPTS} prompts, median of "
        f"{args.rounds} interleaved rounds.\n",
        "| model | candidates / prompt | glmx (ORT) cand/s | torch, one forward per candidate, cand/s | "
        "speedup | max score diff per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        for count, r in m["rows"].items():
            c = r["candidates_per_s"]
            lines.append(
                f"| {name} | {count} | {c['glmx-ort']:.1f} | {c['torch-per-candidate']:.1f} | "
                f"{r['speedup']:.1f}x | {r['max_abs_diff_per_target_token']:.1e} |"
            )
    atomic_write_text(out / "scoring_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
