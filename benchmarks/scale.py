"""Scale benchmark: GLM-Large, GLM-2B and GLM-10B shapes through convert-free export, quantize and fill on this machine.

In: model shapes (presets), a cache folder for the random-weight checkpoints (written once, hub layout: config.json,
GPT-2-sized vocab.json + merges.txt, fp16 safetensors shards with model.safetensors.index.json), a work folder.
Out: benchmarks/results/scale.{json,md,png}: per model and stage (export fp16, quantize int4-weight and
int8-weight, fill, decode) the peak resident memory of the whole process tree, wall time and disk written, each
against the memory goal (1 GB + 3x the largest fp32 tensor); decode ms per token at batch 1 against the model's
bandwidth floor. Every stage is the `glmx` command a user runs, in its own process.

    python -m glmx_benchmarks.scale --models glm-large,glm-2b,glm-10b --cache /work/scale-cache --work /work/scale-work

The weights are random at GLM's init scale (docs/glm.md 1.4), so accuracy figures are meaningless and the quantize
stages pass --accept-loss (recorded); memory, time and speed are what is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.manifest import CONFIG_FILE, MODEL_FILE
from glmx_benchmarks.machine import cpu_facts

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
PROMPT = "The capital of France is [MASK], a city on the Seine."
CHAT_LINES = '"你好"\\n"晚上睡不着应该怎么办"\\n'  # printf's text: two questions, two rounds
CHAT_ARGS = "chat --jsonl --temperature 0 --max-new-tokens 8"
SHARD_BYTES = 4 * 10**9  # the hub's usual shard size is 2-10 GB


# ---------------------------------------------------------------- random-weight hub checkpoints, written once


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols its byte-level BPE starts from."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_bert_vocab(folder: Path) -> None:
    """vocab.txt of bert-base-uncased's size and layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103),
    letters and their ## pieces, then fillers to 30522."""
    letters = [chr(c) for c in range(97, 123)]
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += letters + [f"##{c}" for c in letters] + [str(d) for d in range(10)] + list(".,;:!?'\"()-")
    lines += [f"filler{i}" for i in range(30522 - len(lines))]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMBertTokenizer"}))


def write_gpt2_vocab(folder: Path) -> None:
    """vocab.json of GPT-2's size (50257 ids, <|endoftext|> last): the byte alphabet, then fillers; no merges.
    Text tokenizes byte by byte, which is all a random-weight model needs."""
    entries = _byte_alphabet()
    entries += [f"<filler{i}>" for i in range(50256 - len(entries))] + ["<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(entries)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMGPT2Tokenizer"}))


def init_std(name: str, num_layers: int) -> float | None:
    """GLM's init (docs/glm.md 1.4): N(0, 0.02), output projections N(0, 0.02/sqrt(2L)); None for LayerNorm/bias."""
    if name.endswith("layernorm.weight") or name.endswith(".bias"):
        return None
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return 0.02 / math.sqrt(2.0 * num_layers)
    return 0.02


def official_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    from glm_export.model import GLMModel

    return {k: tuple(v.shape) for k, v in GLMModel.skeleton(config).state_dict().items()}


def write_random_hub(
    folder: Path,
    config: Any,
    seed: int = 0,
    dtype=np.float16,
    shard_bytes: int = SHARD_BYTES,
    log=print,
    tokenizer_file: Path | None = None,
) -> Path:
    """A hub-layout checkpoint of `config`'s shape with random init-scale weights (keys under "glm."), written to
    folder.partial and renamed when complete, so a killed run leaves nothing that looks finished."""
    if (folder / CONFIG_FILE).is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from glm_export.hf_config import to_hf_dict
    from glm_export.published import published_name
    from glm_export.weights import write_safetensors

    # the published names of config's architecture (GLM's under "glm.", as a hub downstream class holds them)
    prefix = "glm." if config.arch.name == "glm" else ""
    names = {prefix + published_name(n, config): n for n in official_shapes(config)}
    shapes = {published: official_shapes(config)[n] for published, n in names.items()}
    rng = np.random.default_rng(seed)

    def make(name: str) -> np.ndarray:
        shape = shapes[name]
        std = init_std(names[name], config.num_layers)
        if std is None:
            return np.ones(shape, np.float32) if name.endswith("weight") else np.zeros(shape, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, np.dtype(dtype).name))
        size += n
    shards.append(current)
    weight_map, started = {}, time.monotonic()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / fname, shard, make)
        weight_map.update({name: fname for name, _, _ in shard})
        log(f"scale: {folder.name}: shard {k + 1}/{len(shards)} written ({time.monotonic() - started:.0f} s)")
    total = sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(dtype).itemsize
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    hf = to_hf_dict(config)
    hf["torch_dtype"] = "float16" if dtype == np.float16 else "float32"
    (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=1))
    if tokenizer_file is not None:  # e.g. a small tokenizer.json for tests
        shutil.copy2(tokenizer_file, tmp / Path(tokenizer_file).name)
    elif config.tokenizer in ("gpt2", "bert"):
        {"gpt2": write_gpt2_vocab, "bert": write_bert_vocab}[config.tokenizer](tmp)
    elif config.tokenizer == "chatglm":  # a tiny ice_text.model: its ids fit the real V (130528) many times over
        from glm_export.tokenizer_training import train_ice_text_model, write_chatglm_tokenizer_config

        train_ice_text_model(tmp / "ice_text.model")
        write_chatglm_tokenizer_config(tmp, 0)
    else:
        raise ValueError(f"scale: no vocabulary writer for a {config.tokenizer} tokenizer; pass tokenizer_file")
    (tmp / "README.md").write_text(
        f"Random GLM weights at init scale (seed {seed}), shape of {config.name}; "
        f"written by benchmarks/scale.py for memory and speed measurements only.\n"
    )
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------- measuring a command: peak RSS of its process tree


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes, summed over `pid` and its descendants."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = anon = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, anon


def measure(
    cmd: Sequence[str], *, out: Path | None = None, timeout: float = 7200, interval: float = 0.2, log=print
) -> dict[str, Any]:
    """Run `cmd`; sample the tree's memory every `interval` s. -> peak RSS / anon RSS, wall, rc, disk written."""
    log("scale: $ " + " ".join(str(c) for c in cmd))
    started = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anon": 0}
    lines: list[str] = []

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip())
            log("    " + line.rstrip())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    while proc.poll() is None:
        rss, anon = _tree_memory(proc.pid)
        peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
        if time.monotonic() - started > timeout:
            proc.kill()
        time.sleep(interval)
    t.join(timeout=5)
    wall = time.monotonic() - started
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out is not None and out.exists() else 0
    return {
        "command": " ".join(str(c) for c in cmd),
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": peak["rss"],
        "peak_anon_bytes": peak["anon"],
        "disk_written_bytes": written,
        "output_tail": lines[-6:],
    }


# ---------------------------------------------------------------- decode speed at batch 1 (run in its own process)


def decode_worker(folder: str, steps: int = 16, context: int = 32) -> dict[str, Any]:
    """ms per decode step at batch 1 after a `context`-token context pass, on ONNX Runtime CPU (median)."""
    import statistics

    from glm_runtime.session import open_session

    session = open_session(folder)
    cfg = session.config
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 800, (1, context)).astype(np.int64)
    pos = np.stack([np.arange(context), np.zeros(context, np.int64)])[None].astype(np.int64)
    from glm_runtime.iotable import past_names, present_names

    n, d = cfg.num_attention_heads, cfg.head_dim
    empty = np.zeros((1, n, 0, d), dtype=session.kv_dtype)
    past = {name: empty for pair in past_names(session.io) for name in pair}
    feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": np.ones((1, 1, context, context), bool), **past}
    t0 = time.perf_counter()
    out = session.run(feeds)
    context_ms = (time.perf_counter() - t0) * 1e3
    cache = {pk: out[nk] for (pk, _), (nk, _) in zip(past_names(session.io), present_names(session.io))}
    cache.update({pv: out[nv] for (_, pv), (_, nv) in zip(past_names(session.io), present_names(session.io))})
    times = []
    for k in range(steps):
        P = context + k
        feeds = {
            "input_ids": np.array([[11]], np.int64),
            "position_ids": np.array([[[context - 1], [k + 1]]], np.int64),
            "attention_mask": np.ones((1, 1, 1, P + 1), bool),
            **cache,
        }
        t0 = time.perf_counter()
        out = session.run(feeds)
        times.append(time.perf_counter() - t0)
        for (pk, pv), (nk, nv) in zip(past_names(session.io), present_names(session.io)):
            cache[pk] = np.concatenate([cache[pk], out[nk]], axis=2)
            cache[pv] = np.concatenate([cache[pv], out[nv]], axis=2)
    warm = times[2:] if len(times) > 4 else times
    return {
        "decode_ms": statistics.median(warm) * 1e3,
        "context_ms": round(context_ms, 1),  # the context pass, once (a chat round runs its whole history so)
        "steps": steps,
        "context": context,
        "samples_ms": [round(t * 1e3, 2) for t in times],
    }


# ---------------------------------------------------------------- the run


def memory_goal(config: Any) -> int:
    """The issue's bound: about 1 GB plus a few (3) times the largest single fp32 weight tensor."""
    largest = max(int(np.prod(s)) for s in official_shapes(config).values()) * 4
    return GIB + 3 * largest


def run_model(name: str, cache: Path, work: Path, log=print, stages: Sequence[str] = ()) -> dict[str, Any]:
    from glm_runtime.config import get_preset
    from glmx_benchmarks import floor

    cfg = get_preset(name)
    params = sum(int(np.prod(s)) for s in official_shapes(cfg).values())
    started = time.monotonic()
    ckpt = write_random_hub(cache / f"{name}-random-fp16", cfg, log=log)
    record: dict[str, Any] = {
        "model": name,
        "parameters": params,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "checkpoint": str(ckpt),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
        "checkpoint_written_s": round(time.monotonic() - started, 1),
        "memory_goal_bytes": memory_goal(cfg),
        "stages": {},
    }
    glmx = [shutil.which("glmx") or "glmx"]  # the console script, as a user runs it
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    plan = [
        (
            "export-fp16",
            [*glmx, "export", ckpt, "-o", out / "fp16", "--precision", "fp16", "--overwrite"],
            out / "fp16",
        ),
        (
            "quantize-int4",
            [
                *glmx,
                "quantize",
                out / "fp16",
                "-o",
                out / "int4",
                "--scheme",
                "int4-weight",
                "--accept-loss",
                "--overwrite",
            ],
            out / "int4",
        ),
        (
            "quantize-int8",
            [
                *glmx,
                "quantize",
                out / "fp16",
                "-o",
                out / "int8",
                "--scheme",
                "int8-weight",
                "--accept-loss",
                "--overwrite",
            ],
            out / "int8",
        ),
        ("fill-int4", [*glmx, "fill", "--model", out / "int4", "--max-new-tokens", "8", PROMPT], None),
        ("fill-int8", [*glmx, "fill", "--model", out / "int8", "--max-new-tokens", "8", PROMPT], None),
        ("decode-int4", [sys.executable, "-m", "glmx_benchmarks.scale", "--decode", out / "int4"], None),
        ("decode-int8", [sys.executable, "-m", "glmx_benchmarks.scale", "--decode", out / "int8"], None),
    ]
    if cfg.arch.chat is not None:  # a chat model: two rounds of glmx chat, and what a 512-token history costs
        plan += [
            ("chat-int4", ["sh", "-c", f"printf '{CHAT_LINES}' | {glmx[0]} {CHAT_ARGS} --model {out / 'int4'}"], None),
            ("chat-int8", ["sh", "-c", f"printf '{CHAT_LINES}' | {glmx[0]} {CHAT_ARGS} --model {out / 'int8'}"], None),
            *(
                (
                    f"context512-{v}",
                    [sys.executable, "-m", "glmx_benchmarks.scale", "--decode", out / v, "--context", "512"],
                    None,
                )
                for v in ("int4", "int8")
            ),
        ]
    bandwidth = floor.measure_bandwidth()["read_bytes_per_s"]
    record["bandwidth_bytes_per_s"] = bandwidth
    for stage, cmd, folder in plan:
        if stages and stage not in stages:
            continue
        result = measure(cmd, out=folder, log=log)
        # fill and decode are judged by RSS / the weights they keep (rss_over_weights), not by the stage goal
        result["within_memory_goal"] = (
            result["peak_rss_bytes"] <= record["memory_goal_bytes"]
            if stage.startswith(("export", "quantize"))
            else None
        )
        if stage.startswith(("decode", "context")) and result["rc"] == 0:
            line = next((x for x in reversed(result["output_tail"]) if x.startswith("{")), "{}")
            result.update(json.loads(line))
            variant = out / stage.split("-")[1]
            streamed = floor.streamed_weight_bytes(variant)["streamed_bytes"]
            result["streamed_weight_bytes"] = streamed
            result["floor_ms"] = streamed / bandwidth * 1e3
            result["vs_floor"] = result["decode_ms"] / result["floor_ms"]
        if stage.startswith(("fill", "decode", "chat", "context")):
            variant = out / stage.split("-")[1]
            weights = sum(f.stat().st_size for f in variant.glob(f"{MODEL_FILE}*"))
            result["artifact_weight_bytes"] = weights
            result["rss_over_weights"] = result["peak_rss_bytes"] / weights if weights else None
        if stage.startswith(("export", "quantize")) and result["rc"] == 0:
            from glm_runtime.manifest import load_manifest

            parity = load_manifest(folder).parity
            result["check"] = {
                "method": parity.get("method"),
                "passed": parity.get("passed"),
                "structural_failures": [f for f in parity.get("failures", []) if not f.startswith("text")],
                "text_misses": (parity.get("text") or {}).get("misses"),
                "max_abs_diff": parity.get("max_abs_diff"),
                "text": {
                    k: (parity.get("text") or {}).get(k)
                    for k in ("positions", "top1_agreement", "ppl_change", "max_logit_diff")
                },
            }
        record["stages"][stage] = result
        log(
            f"scale: {name} {stage}: rc {result['rc']}, {result['wall_s']} s, peak RSS "
            f"{result['peak_rss_bytes'] / 1e9:.2f} GB (goal {record['memory_goal_bytes'] / 1e9:.2f} GB)"
        )
    return record


def write_report(records: list[dict[str, Any]], command: str, path: Path = RESULTS) -> None:
    import platform

    doc = {
        "command": command,
        "machine": {
            "cpu_flags": cpu_facts()["flags"],
            "cores": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": records,
    }
    tmp = path / "scale.json.partial"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path / "scale.json")
    lines = [
        "# Scale: export, quantize and fill of large GLM shapes on this machine",
        "",
        f"Command: `{command}`  ",
        f"Machine of the last run: {os.cpu_count()} cores, "
        f"{doc['machine']['memory_bytes'] / GIB:.0f} GiB; CPU flags {' '.join(doc['machine']['cpu_flags'])}  ",
        "Each model's own machine is under its heading (records from before machines were recorded: an earlier "
        "2-core, 24 GiB machine with AVX-512 VNNI, this file's git history).  ",
        "Peak RSS is of the whole process tree, sampled every 0.2 s. Goal: 1 GB + 3x the largest fp32 tensor.",
        "Weights are random (init scale): quantize runs with --accept-loss; accuracy figures are not meaningful.",
        "",
    ]
    for r in records:
        lines += [
            f"## {r['model']}: {r['parameters'] / 1e9:.2f} B parameters, checkpoint "
            f"{r['checkpoint_bytes'] / 1e9:.1f} GB fp16 safetensors",
            "",
            f"`{r.get('command', command)}`",
            "",
            f"memory goal {r['memory_goal_bytes'] / 1e9:.2f} GB; bandwidth {r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s",
            "",
            *([f"machine: CPU flags {' '.join(r['machine']['cpu_flags'])}", ""] if r.get("machine") else []),
            "| stage | rc | wall s | peak RSS GB | anon GB | within goal | disk written GB | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for stage, s in r["stages"].items():
            notes = []
            if "decode_ms" in s:
                notes.append(f"{s['decode_ms']:.1f} ms/token, floor {s['floor_ms']:.1f} ms ({s['vs_floor']:.2f}x)")
            if s.get("rss_over_weights"):
                notes.append(f"RSS / weights {s['rss_over_weights']:.2f}")
            if s.get("check"):
                c = s["check"]
                verdict = "cases within budget" if not c.get("structural_failures") else "CASES FAILED"
                if c.get("text_misses"):
                    verdict += "; text over budget (random weights), accepted"
                notes.append(f"check {(c['method'] or '').split(':')[0]}: {verdict}")
            lines.append(
                f"| {stage} | {s['rc']} | {s['wall_s']} | {s['peak_rss_bytes'] / 1e9:.2f} | "
                f"{s['peak_anon_bytes'] / 1e9:.2f} | "
                f"{'n/a' if s['within_memory_goal'] is None else 'yes' if s['within_memory_goal'] else 'NO'} | "
                f"{s['disk_written_bytes'] / 1e9:.2f} | {'; '.join(notes)} |"
            )
        lines.append("")
    (path / "scale.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for stage in ("export-fp16", "quantize-int4", "quantize-int8", "fill-int4", "fill-int8"):
            pts = [
                (r["parameters"] / 1e9, r["stages"][stage]["peak_rss_bytes"] / 1e9)
                for r in records
                if stage in r["stages"]
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=stage)
        ax.plot(
            [r["parameters"] / 1e9 for r in records],
            [r["memory_goal_bytes"] / 1e9 for r in records],
            "k--",
            label="goal (1 GB + 3x largest tensor)",
        )
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("peak RSS of the process tree (GB)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path / "scale.png", dpi=120)
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="glm-large,glm-2b,glm-10b")
    p.add_argument(
        "--cache", default=os.path.expanduser("~/.cache/glmx/scale"), help="random-weight checkpoints, written once"
    )
    p.add_argument("--work", default="/tmp/glmx-scale", help="where the exported folders go")
    p.add_argument("--stages", default="", help="comma-separated subset of the stages")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--decode", help=argparse.SUPPRESS)  # worker mode: one folder's decode speed, JSON on stdout
    p.add_argument("--context", type=int, default=32, help=argparse.SUPPRESS)  # worker mode: its context length
    args = p.parse_args(argv)
    if args.decode:
        print(json.dumps(decode_worker(args.decode, context=args.context)))
        return
    out = Path(args.out)
    previous = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {"models": []}
    command = "python -m glmx_benchmarks.scale " + " ".join(argv or sys.argv[1:])
    records = [dict(r, command=r.get("command", previous.get("command"))) for r in previous["models"]]
    for name in args.models.split(","):  # a model measured again replaces its earlier record
        stages = [s for s in args.stages.split(",") if s]
        record = run_model(name, Path(args.cache), Path(args.work), stages=stages)
        record["command"] = command
        record["machine"] = {"cpu_flags": cpu_facts()["flags"], "cores": os.cpu_count()}
        old = next((r for r in records if r["model"] == name), None)
        if stages and old is not None:  # a rerun of some stages updates those stages of the earlier record
            for stage, figures in record["stages"].items():
                old["stages"][stage] = dict(figures, command_of_run=command)
            record = old
        records = [r for r in records if r["model"] != name] + [record]
        records.sort(key=lambda r: r["parameters"])
        write_report(records, command, out)


if __name__ == "__main__":
    main()
