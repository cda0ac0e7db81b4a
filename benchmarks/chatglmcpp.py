"""chatglm.cpp as a peer for ChatGLM-6B: the same random weights converted to its Q4_0 / Q8_0 files by its own
converter, and timed against glmx's int4-weight / int8-weight exports of them in one run, interleaved rounds.

In: the random hub folder benchmarks/scale.py wrote for chatglm-6b (published names, a tiny ice_text.model), glmx's
int4 / int8 exports of it, and a chatglm.cpp build (benchmarks/build_chatglmcpp.sh: its `main` and its Python
converter). Out: benchmarks/results/chatglmcpp.{json,md}: decode ms/token at batch 1 (same context length, the
machine's 2 threads on both sides), the prompt pass of a ~512-token prompt, and the total tokens/s of 8 answers (glmx:
8 rows of one engine; chatglm.cpp: one after another, as it serves one request at a time; its load time left out).

chatglm.cpp's converter imports transformers and tabulate at module level for its hub path; neither is used for a
state dict handed to ChatGLMConverter directly, so both are stubbed here (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from glmx_benchmarks.llamacpp import PeerError

RESULTS = Path(__file__).resolve().parent / "results"
PERF = re.compile(r"(prompt|output) time: ([\d.]+) ms / (\d+) tokens \(([\d.]+) ms/token\)")


def _converter(cpp: Path) -> Any:
    """chatglm.cpp's convert.py as a module, its unused hub-loading imports stubbed."""
    for name in ("transformers", "tabulate"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.AutoConfig = stub.AutoModel = stub.AutoModelForCausalLM = stub.AutoTokenizer = None  # type: ignore[attr-defined]
            stub.tabulate = lambda rows, **kw: f"{len(rows)} tensors"  # type: ignore[attr-defined]
            sys.modules[name] = stub
    spec = importlib.util.spec_from_file_location("chatglmcpp_convert", cpp / "chatglm_cpp" / "convert.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _State(dict):
    """glmx's weights (glm_export.weights.Weights) as the torch state dict of the published names the converter asks
    for, each read when asked (once), lm_head tied to the embedding."""

    def __init__(self, weights: Any):
        super().__init__()
        self.weights = weights

    def __getitem__(self, key: str) -> Any:
        import torch

        name = "word_embeddings.weight" if key in ("lm_head.weight", "transformer.word_embeddings.weight") else key
        return torch.from_numpy(np.ascontiguousarray(self.weights[name]))


def convert(hub: Path, out: Path, qtype: str, cpp: Path) -> Path:
    """hub (published names) -> chatglm.cpp's GGML file of qtype ("q4_0" | "q8_0"), written whole or not at all."""
    if out.is_file():
        return out
    from glm_export.checkpoint import open_checkpoint

    conv = _converter(cpp)
    config = json.loads((hub / "config.json").read_text())
    cfg = types.SimpleNamespace(
        **config, pre_seq_len=None, quantization_bit=0, eos_token_id=config.get("eos_token_id"), pad_token_id=3
    )
    state = _State(open_checkpoint(hub).weights)  # glmx's names, read lazily
    model = types.SimpleNamespace(config=cfg, state_dict=lambda: state)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(hub / "ice_text.model"))
    tokenizer = types.SimpleNamespace(sp_tokenizer=types.SimpleNamespace(text_tokenizer=types.SimpleNamespace(sp=sp)))
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as f:
        conv.ChatGLMConverter.convert(f, model, tokenizer, conv.GGMLType[qtype.upper()])
    partial.rename(out)
    return out


def cpp_run(main: Path, model: Path, prompt: str, new_tokens: int) -> dict[str, float]:
    """One chatglm.cpp generation (greedy, generate mode): its own prompt and output timings. Its `main` (0.4.2) has
    no thread option: ggml picks the count itself (2 on this 2-vCPU machine, hardware_concurrency <= 4)."""
    cmd = [str(main), "-m", str(model), "--mode", "generate", "-p", prompt, "--max_new_tokens", str(new_tokens)]
    run = subprocess.run([*cmd, "--temp", "0", "-v"], capture_output=True, text=True, timeout=1800)
    if run.returncode:
        raise RuntimeError(f"chatglm.cpp failed: {run.stderr[-500:]}")
    found = {kind: (float(total), int(n), float(per)) for kind, total, n, per in PERF.findall(run.stdout)}
    return {
        "prompt_tokens": found["prompt"][1],
        "prompt_ms": found["prompt"][0],
        "output_tokens": found["output"][1],
        "output_ms": found["output"][0],
        "decode_ms": found["output"][2],
    }


def glmx_decode(folder: Path, context: int, steps: int) -> dict[str, float]:
    """glmx's decode ms/token at batch 1 after a context pass of `context` tokens (its own process)."""
    cmd = [sys.executable, "-m", "glmx_benchmarks.scale", "--decode", str(folder), "--context", str(context)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode:
        raise RuntimeError(f"glmx decode failed: {run.stderr[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def glmx_eight(folder: Path, prompts: list[str], new_tokens: int) -> dict[str, float]:
    """8 answers on 8 rows of one engine: total new tokens per second (greedy, fixed budget)."""
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    session, tok = open_model(folder)
    with session:
        t0 = time.perf_counter()
        results = fill_blanks(session, tok, prompts, append_gmask=True, max_new_tokens=new_tokens, rows=8)
        wall = time.perf_counter() - t0
    tokens = sum(len(r.spans[0].token_ids) for r in results)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def find_chatglmcpp(folder: str | Path | None) -> Path:
    """A chatglm.cpp build folder (build_chatglmcpp.sh's OUT_DIR: bin/main and chatglm_cpp/convert.py), or PeerError
    saying how to make one."""
    if folder is None:
        raise PeerError("no chatglm.cpp build: pass --chatglmcpp DIR or set GLMX_CHATGLMCPP")
    cpp = Path(folder)
    missing = [p for p in ("bin/main", "chatglm_cpp/convert.py") if not (cpp / p).is_file()]
    if missing:
        raise PeerError(
            f"{cpp} is not a chatglm.cpp build (no {missing[0]}): make one with benchmarks/build_chatglmcpp.sh {cpp}"
        )
    return cpp


def compare(
    hub: Path, int4: Path, int8: Path, cpp: Path, work: Path, rounds: int, new_tokens: int, threads: int, say=print
) -> dict[str, Any]:
    """The whole comparison: decode and the ~512-token prompt pass at int4 / Q4_0 and int8 / Q8_0 in interleaved
    rounds (every variant once per round; medians), then 8 chats (glmx: 8 rows of one engine; chatglm.cpp: one
    after another). -> the record chatglmcpp.json holds."""
    work.mkdir(parents=True, exist_ok=True)
    files = {q: convert(hub, work / f"{hub.name}-{q}.bin", q, cpp) for q in ("q4_0", "q8_0")}
    short, long = "你好" * 16, "你好" * 256  # the tiny ice_text.model: 2 tokens per repeat
    pairs = [("int4", int4, "q4_0"), ("int8", int8, "q8_0")]
    rows: dict[str, list[dict[str, float]]] = {}
    main = cpp / "bin" / "main"
    for r in range(rounds):
        for name, folder, q in pairs:
            c = cpp_run(main, files[q], short, new_tokens)
            rows.setdefault(f"chatglm.cpp {q}", []).append(c)
            rows.setdefault(f"glmx {name}", []).append(glmx_decode(folder, c["prompt_tokens"], new_tokens))
            c512 = cpp_run(main, files[q], long, 2)
            rows.setdefault(f"chatglm.cpp {q} prompt", []).append(c512)
            rows.setdefault(f"glmx {name} prompt", []).append(glmx_decode(folder, c512["prompt_tokens"], 2))
        say(f"chatglm.cpp comparison: round {r + 1}/{rounds} done")
    medians = {
        k: {m: statistics.median(r[m] for r in v) for m in v[0] if isinstance(v[0][m], (int, float))}
        for k, v in rows.items()
    }
    questions = [f"你好{k}" for k in range(8)]  # 8 different chats
    eight = {"glmx int4, 8 rows": glmx_eight(int4, questions, new_tokens)}
    runs = [cpp_run(main, files["q4_0"], q, new_tokens) for q in questions]
    seconds = sum(r["prompt_ms"] + r["output_ms"] for r in runs) / 1e3  # one after another, load time left out
    tokens = sum(r["output_tokens"] for r in runs)
    eight["chatglm.cpp q4_0, one at a time"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    # chatglm.cpp's main has no thread option and glmx's decode worker opens ONNX Runtime with its default: both use
    # the machine's cores (`threads` is what glmx bench was asked for, recorded beside them)
    return {
        "rounds": rounds,
        "threads": os.cpu_count(),
        "threads_asked": threads,
        "rows": rows,
        "medians": medians,
        "eight_chats": eight,
    }


def table(record: dict[str, Any]) -> str:
    """The Markdown table of a record: glmx against chatglm.cpp per bit width, and the 8-chat line."""
    m = record["medians"]
    lines = [
        "| measure | glmx int4 | chatglm.cpp Q4_0 | ratio (cpp / glmx) | glmx int8 | chatglm.cpp Q8_0 | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    cells = []
    for g, c in (("glmx int4", "chatglm.cpp q4_0"), ("glmx int8", "chatglm.cpp q8_0")):
        cells.append((m[g]["decode_ms"], m[c]["decode_ms"]))
    tokens = int(m["chatglm.cpp q4_0"]["prompt_tokens"])
    lines.append(
        f"| decode ms/token, batch 1, after a {tokens}-token prompt | "
        + " | ".join(f"{g:.1f} | {c:.1f} | {c / g:.2f}x" for g, c in cells)
        + " |"
    )
    cells = []
    for g, c in (("glmx int4 prompt", "chatglm.cpp q4_0 prompt"), ("glmx int8 prompt", "chatglm.cpp q8_0 prompt")):
        cells.append((m[g]["context_ms"] / 1e3, m[c]["prompt_ms"] / 1e3))
    tokens = int(m["chatglm.cpp q4_0 prompt"]["prompt_tokens"])
    lines.append(
        f"| prompt pass of {tokens} tokens, s | "
        + " | ".join(f"{g:.1f} | {c:.1f} | {c / g:.2f}x" for g, c in cells)
        + " |"
    )
    e = record["eight_chats"]
    g, c = e["glmx int4, 8 rows"]["tokens_per_s"], e["chatglm.cpp q4_0, one at a time"]["tokens_per_s"]
    lines.append(
        f"\n8 chats: glmx int4 on 8 rows of one engine {g:.2f} tokens/s; chatglm.cpp Q4_0 one after another "
        f"{c:.2f} tokens/s: {g / c:.2f}x."
    )
    return "\n".join(lines)


def prepare(cache: Path, layers: int, log=print) -> tuple[Path, Path, Path]:
    """A random ChatGLM-6B-shaped hub folder (`layers` of its 28 layers) and glmx's int4-weight / int8-weight
    exports of it, in `cache`, each made once (the glmx CLI, as a user runs it)."""
    from glm_runtime.config import get_preset
    from glmx_benchmarks.scale import write_random_hub

    cfg = get_preset("chatglm-6b")
    name = "chatglm-6b" if layers == cfg.num_layers else f"chatglm-6b-{layers}-layers"
    hub = write_random_hub(cache / f"{name}-random-fp16", cfg.replace(num_layers=layers, name=name), log=log)
    glmx = shutil.which("glmx") or "glmx"
    out = cache / f"{name}-glmx"
    steps = [
        ("fp16", [glmx, "export", str(hub), "-o", str(out / "fp16"), "--precision", "fp16"]),
        ("int4", [glmx, "quantize", str(out / "fp16"), "-o", str(out / "int4"), "--scheme", "int4-weight"]),
        ("int8", [glmx, "quantize", str(out / "fp16"), "-o", str(out / "int8"), "--scheme", "int8-weight"]),
    ]
    for variant, cmd in steps:
        if not (out / variant / "manifest.json").is_file():
            log(f"chatglm.cpp comparison: glmx {variant} of {hub.name} (once; kept in {out})")
            subprocess.run(
                [*cmd, "--accept-loss", "--overwrite"] if variant != "fp16" else [*cmd, "--overwrite"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
    return hub, out / "int4", out / "int8"


def write_record(record: dict[str, Any], out: Path, command: str) -> None:
    from glmx_benchmarks.machine import cpu_facts
    from glmx_benchmarks.report import save_record

    flags = [f for f in cpu_facts()["flags"] if f.startswith(("avx", "amx", "fma", "f16c"))]
    record.update(command=command, date=time.strftime("%Y-%m-%d %H:%M"), cpu_flags=flags)
    build = (Path(record["chatglm_cpp"]) / "BUILD_INFO") if record.get("chatglm_cpp") else None
    info = build.read_text().strip().splitlines()[0] if build is not None and build.is_file() else "unknown build"
    md = (
        f"# ChatGLM-6B shape ({record['layers']} layers): glmx against chatglm.cpp, same random weights, one run\n\n"
        f"`{command}` on {record['date']}; median of {record['rounds']} interleaved rounds; {record['threads']} "
        f"threads (each side's default on this machine); chatglm.cpp: {info}\nCPU flags: {' '.join(flags)}\n\n"
        + table(record)
    )
    save_record(out, "chatglmcpp", record, md)


def chatglmcpp_column(
    cpp: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    threads: int = 2,
    layers: int = 28,
    rounds: int = 2,
    new_tokens: int = 16,
    log=lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    """glmx bench --chatglmcpp: the comparison on a ChatGLM-6B-shaped model built into cache_dir (the full 28
    layers by default: about 30 minutes the first time on 2 cores; fewer layers of the same width in minutes),
    written to out_dir/chatglmcpp.{json,md}."""
    folder = find_chatglmcpp(cpp)
    cache = Path(cache_dir) / "chatglmcpp"
    hub, int4, int8 = prepare(cache, layers, log)
    record = compare(hub, int4, int8, folder, cache / "ggml", rounds, new_tokens, threads, log)
    record.update(layers=layers, chatglm_cpp=str(folder))
    write_record(record, Path(out_dir), f"glmx bench --chatglmcpp {cpp} --chatglmcpp-layers {layers}")
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hub", required=True, help="the random chatglm-6b hub folder (benchmarks/scale.py's cache)")
    p.add_argument("--int4", required=True, help="glmx's int4-weight export of it")
    p.add_argument("--int8", required=True, help="glmx's int8-weight export of it")
    p.add_argument("--cpp", default=str(Path.home() / ".cache/glmx/chatglmcpp"), help="build_chatglmcpp.sh's OUT_DIR")
    p.add_argument("--work", default="/tmp/glmx-chatglmcpp", help="where its converted files go")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="recorded: both sides use the machine's threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        cpp = find_chatglmcpp(args.cpp)
    except PeerError as exc:
        sys.exit(f"Error: {exc}")
    hub = Path(args.hub)
    record = compare(
        hub, Path(args.int4), Path(args.int8), cpp, Path(args.work), args.rounds, args.new_tokens, args.threads
    )
    layers = json.loads((hub / "config.json").read_text()).get("num_layers", 28)
    record.update(layers=layers, chatglm_cpp=str(cpp))
    write_record(
        record, args.out, "python benchmarks/chatglmcpp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    )


if __name__ == "__main__":
    main()
