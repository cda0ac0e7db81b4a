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
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

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
    """One chatglm.cpp generation (greedy, generate mode): its own prompt and output timings."""
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hub", required=True, help="the random chatglm-6b hub folder (benchmarks/scale.py's cache)")
    p.add_argument("--int4", required=True, help="glmx's int4-weight export of it")
    p.add_argument("--int8", required=True, help="glmx's int8-weight export of it")
    p.add_argument("--cpp", default=str(Path.home() / ".cache/glmx/chatglmcpp"), help="build_chatglmcpp.sh's OUT_DIR")
    p.add_argument("--work", default="/tmp/glmx-chatglmcpp", help="where its converted files go")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    cpp, work = Path(args.cpp), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = {q: convert(Path(args.hub), work / f"chatglm-6b-{q}.bin", q, cpp) for q in ("q4_0", "q8_0")}
    short, long = "你好" * 16, "你好" * 256  # the tiny ice_text.model: 2 tokens per repeat
    pairs = [("int4", Path(args.int4), "q4_0"), ("int8", Path(args.int8), "q8_0")]
    rows: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for name, folder, q in pairs:
            c = cpp_run(cpp / "bin" / "main", files[q], short, args.new_tokens)
            rows.setdefault(f"chatglm.cpp {q}", []).append(c)
            g = glmx_decode(folder, c["prompt_tokens"], args.new_tokens)
            rows.setdefault(f"glmx {name}", []).append(g)
            c512 = cpp_run(cpp / "bin" / "main", files[q], long, 2)
            rows.setdefault(f"chatglm.cpp {q} prompt", []).append(c512)
            g512 = glmx_decode(folder, c512["prompt_tokens"], 2)
            rows.setdefault(f"glmx {name} prompt", []).append(g512)
    summary = {
        k: {m: statistics.median(r[m] for r in v) for m in v[0] if isinstance(v[0][m], (int, float))}
        for k, v in rows.items()
    }
    questions = [f"{q}{k}" for k in range(8) for q in ["你好"]]  # 8 different chats
    eight = {"glmx int4, 8 rows": glmx_eight(Path(args.int4), questions, args.new_tokens)}
    runs = [cpp_run(cpp / "bin" / "main", files["q4_0"], q, args.new_tokens) for q in questions]
    seconds = sum(r["prompt_ms"] + r["output_ms"] for r in runs) / 1e3  # one after another, load time left out
    tokens = sum(r["output_tokens"] for r in runs)
    eight["chatglm.cpp q4_0, one at a time"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    record = {"command": " ".join(sys.argv), "rows": rows, "medians": summary, "eight_chats": eight}
    (RESULTS / "chatglmcpp.json").write_text(json.dumps(record, indent=1))
    summary["eight_chats"] = eight
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
