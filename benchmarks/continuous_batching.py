"""What continuous batching buys: throughput and latency of the engine and of a real `glmx serve`, against
running the same requests one by one, measured interleaved in one process, several rounds, medians.

    python -m glmx_benchmarks.continuous_batching [--model DIR ...] [--requests 32] [--rows 8]
        [--max-new-tokens 16] [--rounds 3]

Per model: (1) engine level, no HTTP: the requests one by one (fill_blanks([p]) each) vs all submitted to one
Engine(rows) at once; (2) HTTP level: two `glmx serve` subprocesses, `--rows R` (continuous batching) and
`--rows 1` (one row), each driven by 1, 4, 8 and 16 concurrent streaming clients, interleaved. Records
requests/s, new tokens/s, mean decode batch, p50/p99 latency, p50/p99 time to first token, and the CPU flags.
Writes benchmarks/results/continuous_batching.{json,md} (or --out DIR). Nothing else may share the cores while it
runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from glm_runtime.engine import Engine
from glm_runtime.generate import fill_blanks
from glm_runtime.requests import FillRequest
from glm_runtime.session import open_model
from glmx_benchmarks.machine import cpu_facts
from glmx_benchmarks.report import save_record

PROMPTS = [
    "The capital of France is [MASK].",
    "He went to the [MASK] and bought [MASK] for dinner.",
    "Once upon a time [gMASK]",
    "The [sMASK] was very good.",
    "[MASK] is the best way to learn.",
    "She said that [MASK] would come [MASK] the [MASK].",
    "Water boils at [MASK] degrees.",
    "A long time ago, in a small village near the sea, there lived an old fisherman who [sMASK]",
]
RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = (1, 4, 8, 16)


def one_by_one(session, tok, prompts, budget):
    t0 = time.perf_counter()
    results = [fill_blanks(session, tok, [p], max_new_tokens=budget)[0] for p in prompts]
    wall = time.perf_counter() - t0
    latencies = [r.timings["total_s"] for r in results]  # each starts when the previous ended: its own time
    waited = [sum(latencies[: i + 1]) for i in range(len(latencies))]  # what a client queued behind others saw
    return wall, results, waited, 1.0  # one row per decode call


def batched(session, tok, prompts, budget, rows):
    engine = Engine(session, tok, rows=rows)
    t0 = time.perf_counter()
    requests = [FillRequest.make(p, max_new_tokens=budget, id=i) for i, p in enumerate(prompts)]
    done = {e.prompt: e.result for e in engine.run(requests) if e.kind == "result"}
    wall = time.perf_counter() - t0
    results = [done[i] for i in range(len(prompts))]
    latencies = [r.timings["total_s"] for r in results]  # submitted (all at once) to finished
    return wall, results, latencies, engine.decode_rows / max(engine.steps, 1)


def summary(wall, results, latencies, mean_batch, count):
    tokens = sum(len(s.token_ids) for r in results for s in r.spans)
    return {
        "wall_s": wall,
        "requests_per_s": count / wall,
        "new_tokens_per_s": tokens / wall,
        "new_tokens": tokens,
        "mean_decode_batch": mean_batch,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": sorted(latencies)[max(int(0.95 * len(latencies)) - 1, 0)],
    }


def engine_level(model, prompts, budget, rows, rounds):
    session, tok = open_model(model)
    fill_blanks(session, tok, prompts[:2], max_new_tokens=2)  # warm-up
    runs = {"one_by_one": [], "engine": []}
    same = True
    for _ in range(rounds):  # interleaved
        a = one_by_one(session, tok, prompts, budget)
        b = batched(session, tok, prompts, budget, rows)
        same &= [r.tokens for r in a[1]] == [r.tokens for r in b[1]]
        runs["one_by_one"].append(summary(*a, len(prompts)))
        runs["engine"].append(summary(*b, len(prompts)))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {
        "answers_equal": same,
        "median": med,
        "throughput_ratio": med["engine"]["requests_per_s"] / med["one_by_one"]["requests_per_s"],
        "rounds": runs,
    }


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model, rows, max_waiting):
    """A `glmx serve --rows ROWS` subprocess on a free port, once /health says ok. -> (process, port)."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-c",
        "from glm_runtime.cli import run; run()",
        "serve",
        "--port",
        str(port),
        "--rows",
        str(rows),
        "--max-waiting",
        str(max_waiting),
    ]
    if model:
        cmd += ["--model", str(model)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"glmx serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if (
                json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())["status"]
                == "ok"
            ):
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"glmx serve did not get healthy in 120 s: {' '.join(cmd)}")


def stream_fill(port, prompt, budget):
    """One streamed POST /v1/fill. -> (latency s: to the last event, time to first token s, new tokens)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_new_tokens": budget, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/fill", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, tokens = None, 0
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        event = json.loads(line[len("data: ") :])
        if event.get("kind") == "token":
            tokens += 1
            first = time.perf_counter() - t0 if first is None else first
    latency = time.perf_counter() - t0
    conn.close()
    return latency, latency if first is None else first, tokens


def _percentile(values, q):
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def drive(port, prompts, budget, clients):
    """`clients` concurrent clients work through `prompts` (each takes the next one when its last is answered)."""

    def batch_rows():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        values = {
            line.split()[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("glmx:decode_batch_rows_")
        }
        return values["glmx:decode_batch_rows_sum"], values["glmx:decode_batch_rows_count"]

    rows0, calls0 = batch_rows()
    latencies, ttfts, tokens, lock = [], [], [0], threading.Lock()
    queue = list(prompts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop(0)
            dt, first, n = stream_fill(port, prompt, budget)
            with lock:
                latencies.append(dt)
                ttfts.append(first)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rows1, calls1 = batch_rows()
    return {
        "clients": clients,
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "new_tokens_per_s": tokens[0] / wall,
        "mean_decode_batch": (rows1 - rows0) / max(calls1 - calls0, 1),
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": _percentile(latencies, 0.99),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": _percentile(ttfts, 0.99),
    }


def http_level(model, prompts, budget, rows, rounds, clients=CLIENTS):
    """Two real servers, `--rows ROWS` (continuous batching) and `--rows 1` (one request at a time), each driven
    by 1, 4, 8 and 16 concurrent streaming clients; rounds interleave every (clients, server) pair."""
    servers = {}
    try:
        for name, r in (("batching", rows), ("one_row", 1)):
            servers[name] = _start_server(model, r, max_waiting=4 * len(prompts))
            stream_fill(servers[name][1], prompts[0], budget)  # warm-up
        runs = {f"{name}_{c}": [] for c in clients for name in servers}
        for _ in range(rounds):
            for c in clients:
                for name, (_, port) in servers.items():
                    runs[f"{name}_{c}"].append(drive(port, prompts, budget, c))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    ratios = {str(c): med[f"batching_{c}"]["requests_per_s"] / med[f"one_row_{c}"]["requests_per_s"] for c in clients}
    return {"median": med, "throughput_ratio": ratios, "clients": list(clients), "rows": rows, "rounds": runs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="exported folder (repeat; 'bundled' = the bundled model, the default)",
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    given = argv if argv is not None else sys.argv[1:]
    record = {
        "command": "python -m glmx_benchmarks.continuous_batching " + " ".join(given),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": cpu_facts(),
        "requests": args.requests,
        "rows": args.rows,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "models": {},
    }
    for model in args.model or ["bundled"]:
        model = None if model == "bundled" else model
        name = "bundled" if model is None else Path(model).name
        print(f"{name}: engine level ...", flush=True)
        entry = {"engine": engine_level(model, prompts, args.max_new_tokens, args.rows, args.rounds)}
        print(f"{name}: HTTP level ...", flush=True)
        entry["http"] = http_level(model, prompts, args.max_new_tokens, args.rows, args.rounds)
        record["models"][name] = entry
    lines = [
        "# Continuous batching: throughput against one by one",
        "",
        f"`{record['command']}` on {record['date']}; CPU {record['machine']['cpu']} "
        f"({' '.join(record['machine']['flags'])}); {args.requests} requests (mixed blanks), "
        f"max_new_tokens {args.max_new_tokens}, rows {args.rows}, median of {args.rounds} interleaved rounds.",
        "",
        "| model | path | requests/s | new tokens/s | mean decode batch | p50 / p95 latency s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in record["models"].items():
        e = entry["engine"]["median"]
        for path, key in (
            ("one by one (`fill_blanks([p])` each)", "one_by_one"),
            (f"engine, rows {args.rows}, all submitted", "engine"),
        ):
            m = e[key]
            ratio = f"{entry['engine']['throughput_ratio']:.2f}x" if key == "engine" else "1.00x"
            lines.append(
                f"| {name} | {path} | {m['requests_per_s']:.1f} | {m['new_tokens_per_s']:.0f} | "
                f"{m['mean_decode_batch']:.2f} | {m['latency_p50_s']:.3f} / {m['latency_p95_s']:.3f} | "
                f"{ratio} |"
            )
        lines.append(f"| {name} | answers equal one by one (token ids) | {entry['engine']['answers_equal']} | | | | |")
    lines += [
        "",
        "One by one, a request's latency includes waiting for the ones before it (a client queued behind "
        "them); the engine's latency is submit to result with every request submitted at t = 0.",
        "",
        f"## A real `glmx serve`: `--rows {args.rows}` (continuous batching) against `--rows 1` (one request at "
        f"a time)",
        "",
        f"Each client streams `POST /v1/fill` and sends its next request when the last is answered; "
        f"{args.requests} requests per run. Latency: request to last event; TTFT: request to first token "
        f"event; p99 is the nearest rank (of {args.requests}: the slowest). Mean decode batch from the "
        f"server's /metrics.",
        "",
        "| model | clients | server | requests/s | p50 / p99 latency s | p50 / p99 TTFT s | mean decode batch | "
        "requests/s vs one row |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in record["models"].items():
        h = entry["http"]
        for c in h["clients"]:
            for server in ("batching", "one_row"):
                m = h["median"][f"{server}_{c}"]
                label = f"`--rows {args.rows}`" if server == "batching" else "`--rows 1`"
                ratio = f"{h['throughput_ratio'][str(c)]:.2f}x" if server == "batching" else "1.00x"
                lines.append(
                    f"| {name} | {c} | {label} | {m['requests_per_s']:.2f} | {m['latency_p50_s']:.3f} / "
                    f"{m['latency_p99_s']:.3f} | {m['ttft_p50_s']:.3f} / {m['ttft_p99_s']:.3f} | "
                    f"{m['mean_decode_batch']:.2f} | {ratio} |"
                )
    save_record(args.out, "continuous_batching", record, "\n".join(lines))


if __name__ == "__main__":
    main()
