"""The `glmx` command line: one thin command per pipeline stage, each mapping onto one function.

Imports of torch-side modules happen inside the commands, so `glmx fill` runs on a torch-free install.
"""
from __future__ import annotations

import json
import sys

import click


class GLMXError(click.ClickException):
    """A user-facing failure: printed as one line, exit status 1."""


def _one_line(exc: BaseException) -> str:
    """The first line of a message, whitespace folded (a parity table was printed above it already)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[0].split()) if lines else type(exc).__name__


class _Commands(click.Group):
    """Every command's failures end as one line on stderr and exit status 1: a glmx error with its own message
    and fix, an operating-system error with the file it concerns; anything else is a bug in glmx, said so in one
    line (GLMX_DEBUG=1 shows the traceback)."""

    def invoke(self, ctx: click.Context):
        import os

        from glm_runtime.errors import GLMXError as Failure
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Failure as exc:
            raise GLMXError(_one_line(exc)) from None
        except UnicodeDecodeError as exc:
            raise GLMXError(f"the input is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                            f"and try again") from None
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise GLMXError(f"{exc.strerror or exc}{where}") from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, said as one line
            if os.environ.get("GLMX_DEBUG"):
                raise
            raise GLMXError(f"internal error in glmx ({type(exc).__name__}: {_one_line(exc)}); this is a bug: "
                            f"please report it with the command (GLMX_DEBUG=1 shows the traceback)") from None


def require_export_extra(torch: bool = True) -> None:
    """The export extra must be installed; torch=False: only its ONNX side (optimize, quantize never load torch,
    which takes seconds to import)."""
    import importlib.util
    missing = [m for m in (("torch", "onnx") if torch else ("onnx",)) if importlib.util.find_spec(m) is None]
    if missing:
        raise GLMXError(f"this command needs the export extra ({', '.join(missing)} missing): "
                        f"pip install 'glmx[export]'")


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glmx", prog_name="glmx")
def main() -> None:
    """glmx: GLM blank infilling from a PyTorch checkpoint to ONNX Runtime and TensorRT.

    \b
    Stages:  convert -> export -> optimize / quantize -> build-engine -> fill / score / classify / bench
    Every artifact folder carries a manifest.json that later stages check; every failure is one Error line.
    """


@main.command("config")
@click.argument("preset", required=False)
def config_cmd(preset: str | None) -> None:
    """Print a preset's GLMConfig as JSON, or list the presets."""
    from glm_runtime.config import PRESETS, ConfigError, get_preset
    if preset is None:
        for name, cfg in PRESETS.items():
            click.echo(f"{name:20s} L={cfg.num_layers:<3d} h={cfg.hidden_size:<5d} n={cfg.num_attention_heads:<3d} "
                       f"P={cfg.max_sequence_length:<5d} V={cfg.vocab_size:<6d} tokenizer={cfg.tokenizer} "
                       f"params={cfg.num_parameters() / 1e6:.0f}M")
        return
    try:
        click.echo(get_preset(preset).to_json())
    except ConfigError as exc:
        raise GLMXError(str(exc)) from None


def _source_options(command):
    """--preset / --config / --tokenizer / --tokenizer-kind / --gelu: how a checkpoint folder is read, shared by
    convert and export (glm_export.checkpoint.load_checkpoint)."""
    options = [
        click.option("--preset", default=None,
                     help="a released model's config (glmx config lists them), for a checkpoint without config.json"),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="config file (a Hugging Face config.json or glmx GLMConfig JSON) instead of the folder's"),
        click.option("--tokenizer", "tokenizer_file", type=click.Path(exists=True), default=None,
                     help="tokenizer file or folder to ship [default: the checkpoint's own]"),
        click.option("--tokenizer-kind", type=click.Choice(["gpt2", "roberta", "bert", "chinese-sp", "chinese-sp-fix",
                                                             "json"]), default=None,
                     help="the tokenizer's kind when the folder cannot tell (a SentencePiece model of unknown size: "
                          "chinese-sp-fix = GLM-Large-Chinese ids, chinese-sp = GLM-10B-Chinese) [default: "
                          "tokenizer_config.json, then the files, then the preset whose sizes match]"),
        click.option("--gelu", type=click.Choice(["tanh", "erf"]), default=None,
                     help="GeLU the model was trained with [default: the config's; else erf for a Hugging Face folder "
                          "(its remote code), tanh for a Megatron one (the original training code)]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_options(preset, config_file, tokenizer_file, tokenizer_kind, gelu) -> dict:
    from pathlib import Path
    if preset is not None and config_file is not None:
        raise GLMXError("give --preset or --config, not both")
    return {"config": Path(config_file) if config_file else preset, "tokenizer": tokenizer_file,
            "tokenizer_kind": tokenizer_kind, "gelu": gelu}


@main.command("convert")
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="glmx checkpoint folder to write")
@_source_options
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="weights dtype to write (default: the source's)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def convert_cmd(src: str, out_dir: str, preset, config_file, tokenizer_file, tokenizer_kind, gelu,
                dtype: str | None, overwrite: bool) -> None:
    """Convert a GLM checkpoint (glmx, Hugging Face or Megatron/DeepSpeed layout) into a glmx folder.

    Everything decided about the model (config, GeLU, tokenizer kind) is printed and written into the manifest.
    """
    require_export_extra()
    from glm_export.checkpoint import CheckpointError, convert_checkpoint
    from glm_runtime.config import ConfigError
    from glm_runtime.manifest import ManifestError
    options = _load_options(preset, config_file, tokenizer_file, tokenizer_kind, gelu)
    try:
        loaded, out = convert_checkpoint(src, out_dir, dtype=dtype, overwrite=overwrite, **options)
    except (CheckpointError, ConfigError, ManifestError, FileExistsError) as exc:
        raise GLMXError(str(exc)) from None
    cfg = loaded.config
    click.echo(f"layout: {loaded.layout} ({len(loaded.files)} weight file(s), {loaded.source_dtype})")
    click.echo(f"config: {cfg.name} L={cfg.num_layers} h={cfg.hidden_size} n={cfg.num_attention_heads} "
               f"P={cfg.max_sequence_length} V={cfg.vocab_size} gelu={cfg.gelu} tokenizer={cfg.tokenizer}")
    click.echo(f"parameters: {loaded.num_parameters():,}")
    for note in loaded.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {out}")


@main.command("pretrain")
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("work_dir", type=click.Path(file_okay=False))
@click.option("--export-dir", type=click.Path(file_okay=False), help="glmx checkpoint folder written at the last step")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seq-length", type=int, default=256, show_default=True, help="tokens per sample before corruption")
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--warmup-steps", type=int, default=100, show_default=True)
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--beta1", type=float, default=0.9, show_default=True)
@click.option("--beta2", type=float, default=0.98, show_default=True)
@click.option("--adam-eps", type=float, default=1e-6, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--dropout", type=float, default=0.1, show_default=True)
@click.option("--vocab-size", type=int, default=8000, show_default=True, help="BPE size before padding to 128")
@click.option("--num-layers", type=int, default=4, show_default=True)
@click.option("--hidden-size", type=int, default=256, show_default=True)
@click.option("--num-attention-heads", type=int, default=4, show_default=True)
@click.option("--max-sequence-length", type=int, default=512, show_default=True)
@click.option("--bert-prob", type=float, default=1.0, show_default=True)
@click.option("--gap-sentence-prob", type=float, default=0.0, show_default=True)
@click.option("--gpt-infill-prob", type=float, default=1.0, show_default=True,
              help="in document ([gMASK]) mode, the share of prefix + [gMASK] + suffix samples; the rest get one "
                   "[gMASK] span inside the text (GLM used 0.5; 1.0 is the bundled model's recipe)")
@click.option("--position-init", type=click.Choice(["local", "sinusoidal", "normal"]), default="local",
              show_default=True,
              help="how training starts: 'local' = sine/cosine position table plus two layer-0 heads that look at the "
                   "previous / next token (lets a small model use a [MASK]'s neighbours within a CPU budget); "
                   "'sinusoidal' = the table only; 'normal' = GLM's N(0, 0.02) init")
@click.option("--heldout-fraction", type=float, default=0.02, show_default=True)
@click.option("--eval-batches", type=int, default=4, show_default=True)
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--stop-after", type=int, default=None,
              help="stop (with a checkpoint) after this many steps of this call; run again to resume")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default="glmx-pretrained", show_default=True, help="model name written into the config")
@click.option("--overwrite", is_flag=True, help="replace an existing --export-dir")
def pretrain_cmd(**kwargs) -> None:
    """Pretrain a GLM from scratch (blank infilling) on CORPUS_DIR's .txt files; resumes from WORK_DIR."""
    require_export_extra()
    from glm_export.pretrain import PretrainError, pretrain
    try:
        result = pretrain(**kwargs)
    except (PretrainError, FileExistsError) as exc:
        raise GLMXError(str(exc)) from None
    click.echo(json.dumps({"step": result["step"], "evals": result["evals"][-1:], "export_dir": result["export_dir"]}))


@main.command("evaluate")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="write the metrics JSON here")
@click.option("--fill-examples", type=int, default=500, show_default=True, help="single-word [MASK] fills scored")
@click.option("--ppl-batches", type=int, default=8, show_default=True, help="held-out batches for Part B perplexity")
@click.option("--threads", type=int, default=2, show_default=True)
def evaluate_cmd(**kwargs) -> None:
    """Held-out Part B perplexity and single-word [MASK] exact match, each beside a unigram baseline."""
    require_export_extra()
    from glm_export.evaluate import EvaluateError, evaluate
    try:
        metrics = evaluate(**kwargs)
    except EvaluateError as exc:
        raise GLMXError(str(exc)) from None
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2))


FILL_HELP = """Fill the blanks of PROMPT, or of each prompt read with --stdin / --jsonl.

\b
Blanks (docs/glm.md 4.1): [MASK] fills a word or a short span, [sMASK] a sentence, [gMASK] a long continuation
(put it last: the model writes from there on). A prompt may hold several, filled left to right, each seeing
the ones before. Each blank gets at most --max-new-tokens tokens, and the context plus every blank's
1 + max-new-tokens positions must fit the model's max_sequence_length.
Example:  glmx fill "The capital of France is [MASK]. It is known for [MASK]."

\b
Strategies: greedy (default; the most likely token), sample (--temperature --top-k --top-p --seed), beam
(--num-beams --length-penalty --early-stopping); an option of another strategy is refused. With --seed, each
prompt's random stream comes from the seed and the prompt's text alone (numpy SeedSequence([seed,
sha256(prompt)])): the same prompt and seed give the same sample alone, anywhere in a file, or in a server's
batch. --jsonl lines are a string or {"prompt": ..., and any of max_new_tokens, strategy, temperature, top_k,
top_p, seed, num_beams, length_penalty, early_stopping, append_gmask}; a line's own settings win for that line.
Timings in --json are seconds."""

JSONL_KEYS = ("prompt", "max_new_tokens", "strategy", "temperature", "top_k", "top_p", "seed", "num_beams",
              "length_penalty", "early_stopping", "append_gmask")


def _read_text(stream, name: str) -> str:
    """A whole text input as str: UTF-8 (a byte-order mark is dropped, not made prompt text)."""
    data = stream.read()
    if isinstance(data, str):
        return data.lstrip("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GLMXError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _json_lines(text: str, name: str):
    """(line number, parsed value) of every non-empty line of a JSON-lines text; a bad line is one Error."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise GLMXError(f"{name} line {n} is not JSON: {exc}") from None


def _jsonl_requests(text: str, name: str) -> list[dict]:
    requests = []
    for n, item in _json_lines(text, name):
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise GLMXError(f'{name} line {n}: expected a string or an object with a "prompt" string')
        unknown = sorted(set(item) - set(JSONL_KEYS))
        if unknown:
            raise GLMXError(f"{name} line {n}: unknown key {unknown[0]!r}; a line may set {', '.join(JSONL_KEYS)}")
        requests.append(item)
    return requests


@main.command("fill", help=FILL_HELP)
@click.argument("prompt", required=False)
@click.option("--model", type=click.Path(file_okay=False), help="exported model folder [default: the bundled model]")
@click.option("--stdin", "from_stdin", is_flag=True, help="read prompts from stdin, one per line (UTF-8)")
@click.option("--jsonl", "jsonl", type=click.File("rb"),
              help='read prompts from a JSON-lines file ("-" = stdin): a string or {"prompt": ..., settings} per line')
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per prompt (spans, tokens, timings in s)")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="budget per blank")
@click.option("--strategy", type=click.Choice(["greedy", "sample", "beam"]), default="greedy", show_default=True)
@click.option("--temperature", type=float, default=None, help="sample: > 0 [default: 1]")
@click.option("--top-k", type=int, default=None, help="sample: keep the k most likely tokens; 0 = no filter [default: 0]")
@click.option("--top-p", type=float, default=None, help="sample: nucleus mass in (0, 1]; 1 = no filter [default: 1]")
@click.option("--seed", type=int, default=None, help="sample: seed of every prompt's own stream (see above)")
@click.option("--num-beams", type=int, default=None, help="beam: beams per span [default: 1]")
@click.option("--length-penalty", type=float, default=None, help="beam: score = log-prob / length ** this [default: 1]")
@click.option("--early-stopping", is_flag=True, default=None, help="beam: stop a span once num_beams hypotheses ended")
@click.option("--append-gmask", is_flag=True, help="a prompt without a blank is continued at its end ([gMASK])")
@click.option("--backend", type=click.Choice(["onnxruntime", "onnxruntime-cuda", "torch", "tensorrt"]),
              default="onnxruntime", show_default=True, help="torch needs the export extra")
def fill_cmd(prompt, from_stdin, jsonl, as_json, model, backend, **settings) -> None:
    from glm_runtime.generate import STRATEGY_OPTIONS, fill_blanks, resolve_settings
    from glm_runtime.session import open_model
    sources = [s for s in (prompt is not None, from_stdin, jsonl is not None) if s]
    if len(sources) != 1:
        raise GLMXError("give exactly one of: a PROMPT argument, --stdin, or --jsonl FILE")
    if from_stdin:
        requests = [{"prompt": line} for line in _read_text(sys.stdin.buffer, "stdin").splitlines() if line.strip()]
    elif jsonl is not None:
        requests = _jsonl_requests(_read_text(jsonl, jsonl.name), jsonl.name)
    else:
        requests = [{"prompt": prompt}]
    if not requests:
        raise GLMXError("no prompts given (the input was empty)")
    settings["early_stopping"] = settings["early_stopping"] or None  # a flag not given is "not set"
    groups: dict[str, list[int]] = {}  # prompts that share their settings are filled as one batch
    resolved = []
    for n, request in enumerate(requests):
        mine = {**settings, **{k: v for k, v in request.items() if k != "prompt"}}
        append = bool(mine.pop("append_gmask", False))
        try:
            mine = resolve_settings(**mine)
        except ValueError as exc:
            where = f"{jsonl.name} line {n + 1}: " if jsonl is not None else ""
            raise GLMXError(where + " ".join(str(exc).split())) from None
        key = json.dumps([mine, append], sort_keys=True)
        groups.setdefault(key, []).append(n)
        resolved.append((mine, append))
    session, tokenizer = open_model(model, backend)
    results = [None] * len(requests)
    for rows in groups.values():
        mine, append = resolved[rows[0]]
        applies = {k: v for k, v in mine.items()
                   if k in ("max_new_tokens", "strategy") or k in STRATEGY_OPTIONS[mine["strategy"]]}
        filled = fill_blanks(session, tokenizer, [requests[r]["prompt"] for r in rows], append_gmask=append,
                             **applies)
        for r, result in zip(rows, filled):
            results[r] = result
    for request, result in zip(requests, results):
        text = request["prompt"]
        click.echo(json.dumps({"prompt": text, **result.to_dict()}, ensure_ascii=False) if as_json else result.text)


SCORE_HELP = """Score candidate answers for the one blank of PROMPT (GLM's cloze scoring), best first.

\b
Multi-token (default): the context with its blank, then sop + the candidate's tokens as the span; the score
is the sum of the log-probabilities of the candidate's tokens and eop, divided by (tokens + 1) ** the length
penalty. --single-token: the log-probability at the blank itself; every candidate must be one token.
With a byte-level BPE vocabulary (GPT-2, RoBERTa, glmx's own) write a candidate as it would follow the text,
usually with a leading space (" good"): the blank takes the space before it.
Example:  glmx score "The movie was great. It was really [MASK]." -c " good" -c " bad"
"""


@main.command("score", help=SCORE_HELP)
@click.argument("prompt")
@click.option("-c", "--candidate", "candidates", multiple=True, required=True, help="a candidate answer; repeat")
@click.option("--length-penalty", type=float, default=0.0, show_default=True,
              help="score = log-prob / (tokens + 1) ** this; 0 = the plain sum")
@click.option("--single-token", is_flag=True, help="score each one-token candidate at the blank itself")
@click.option("--json", "as_json", is_flag=True, help="print every candidate's figures as JSON")
@click.option("--model", type=click.Path(file_okay=False), help="exported model folder [default: the bundled model]")
@click.option("--backend", type=click.Choice(["onnxruntime", "onnxruntime-cuda", "torch", "tensorrt"]),
              default="onnxruntime", show_default=True)
def score_cmd(prompt, candidates, length_penalty, single_token, as_json, model, backend) -> None:
    from glm_runtime.score import score_candidates
    from glm_runtime.session import open_model
    session, tokenizer = open_model(model, backend)
    scores = score_candidates(session, tokenizer, prompt, list(candidates), length_penalty=length_penalty,
                              single_token=single_token)
    ranked = sorted(scores, key=lambda c: -c.score)
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "winner": ranked[0].text,
                               "candidates": [c.to_dict() for c in scores]}, ensure_ascii=False))
        return
    for c in ranked:
        click.echo(f"{c.score:12.4f}  {c.text!r}  ({c.length} target token(s), log-prob {c.total:.4f})")
    click.echo(f"winner: {ranked[0].text!r}")


CLASSIFY_HELP = """Classify each record of a JSONL file by cloze scoring: a template with {fields} and one blank,
and a verbalizer mapping each label to one or more answers.

\b
The task comes from --task FILE ({"template": ..., "verbalizer": {label: answer or [answers]}, and optionally
"aggregate", "length_penalty", "single_token"}) or from --template and --verbalizer (JSON). A label with several
answers scores as its best answer (--aggregate max) or the log of their summed probabilities (sum). Records
with a "label" field are gold: accuracy and the confusion matrix are printed after the predictions.
Example:  glmx classify reviews.jsonl --template "{text} It was really [MASK]." \\
            --verbalizer '{"positive": " good", "negative": " bad"}'"""


@main.command("classify", help=CLASSIFY_HELP)
@click.argument("records", type=click.File("rb"))
@click.option("--task", "task_file", type=click.File("rb"), default=None, help="JSON task file (see above)")
@click.option("--template", default=None, help="the prompt template, with {fields} and one blank")
@click.option("--verbalizer", default=None, help='JSON: {"label": "answer" or ["answers"], ...}')
@click.option("--aggregate", type=click.Choice(["max", "sum"]), default=None, help="several answers per label [max]")
@click.option("--length-penalty", type=float, default=None, help="as in glmx score [default: 0]")
@click.option("--single-token", is_flag=True, default=None, help="score one-token answers at the blank itself")
@click.option("--json", "as_json", is_flag=True, help="print the whole result as one JSON object")
@click.option("--model", type=click.Path(file_okay=False), help="exported model folder [default: the bundled model]")
@click.option("--backend", type=click.Choice(["onnxruntime", "onnxruntime-cuda", "torch", "tensorrt"]),
              default="onnxruntime", show_default=True)
def classify_cmd(records, task_file, template, verbalizer, aggregate, length_penalty, single_token, as_json, model,
                 backend) -> None:
    from glm_runtime.score import classify
    from glm_runtime.session import open_model
    task: dict = {}
    if task_file is not None:
        try:
            task = json.loads(_read_text(task_file, task_file.name))
        except json.JSONDecodeError as exc:
            raise GLMXError(f"{task_file.name} is not JSON: {exc}") from None
        if not isinstance(task, dict):
            raise GLMXError(f"{task_file.name} must be a JSON object with template and verbalizer")
        unknown = sorted(set(task) - {"template", "verbalizer", "aggregate", "length_penalty", "single_token"})
        if unknown:
            raise GLMXError(f"{task_file.name}: unknown key {unknown[0]!r}; a task has template, verbalizer, "
                            f"aggregate, length_penalty, single_token")
    if template is not None:
        task["template"] = template
    if verbalizer is not None:
        try:
            task["verbalizer"] = json.loads(verbalizer)
        except json.JSONDecodeError as exc:
            raise GLMXError(f"--verbalizer is not JSON: {exc}") from None
    for key, value in (("aggregate", aggregate), ("length_penalty", length_penalty), ("single_token", single_token)):
        if value is not None:
            task[key] = value
    if not isinstance(task.get("template"), str) or not isinstance(task.get("verbalizer"), dict):
        raise GLMXError("a task needs a template (a string) and a verbalizer (a JSON object): --task FILE, or "
                        "--template and --verbalizer")
    rows = []
    for n, item in _json_lines(_read_text(records, records.name), records.name):
        if not isinstance(item, dict):
            raise GLMXError(f"{records.name} line {n}: a record is a JSON object of the template's fields")
        rows.append(item)
    session, tokenizer = open_model(model, backend)
    result = classify(session, tokenizer, rows, task["template"], task["verbalizer"],
                      aggregate=task.get("aggregate", "max"), length_penalty=task.get("length_penalty", 0.0),
                      single_token=bool(task.get("single_token", False)))
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    for n, p in enumerate(result["predictions"]):
        probs = " ".join(f"{k}={v:.3f}" for k, v in p["probabilities"].items())
        gold = f"  gold {p['gold']}" if "gold" in p else ""
        click.echo(f"{n}\t{p['label']}\t{probs}{gold}")
    if "accuracy" in result:
        click.echo(f"accuracy {result['accuracy']:.4f} on {result['gold_records']} gold record(s)")
        labels = result["labels"]
        click.echo("confusion (rows gold, columns predicted): " + " ".join(labels))
        for g in labels:
            click.echo(f"  {g}: " + " ".join(str(result["confusion"][g][p]) for p in labels))


@main.command("build-engine")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="engine folder to write")
@click.option("--max-batch", default=1, show_default=True, type=int, help="most rows per call (prompts x beams)")
@click.option("--max-context", default=None, type=int, help="longest prompt in tokens [default: P - max-new-tokens]")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="most generated tokens per prompt")
@click.option("--workspace-gb", default=None, type=float, help="builder workspace limit in GiB [default: TensorRT's]")
@click.option("--timing-cache", default=None, type=click.Path(dir_okay=False),
              help="timing cache reused across builds [default: ~/.cache/glmx/trt_timing.cache]")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def build_engine_cmd(model_dir: str, out_dir: str, max_batch: int, max_context: int | None, max_new_tokens: int,
                     workspace_gb: float | None, timing_cache: str | None, overwrite: bool) -> None:
    """Build a TensorRT engine folder from a glmx ONNX folder (needs an NVIDIA GPU and TensorRT >= 10)."""
    from glm_export.engine import EngineBuildError, build_engine
    from glm_runtime.manifest import ManifestError, load_manifest
    from glm_runtime.trt_session import TensorRTError
    try:
        out = build_engine(model_dir, out_dir, max_batch=max_batch, max_context=max_context,
                           max_new_tokens=max_new_tokens, workspace_gb=workspace_gb, timing_cache=timing_cache,
                           overwrite=overwrite)
    except (EngineBuildError, TensorRTError, ManifestError, FileExistsError) as exc:
        raise GLMXError(str(exc)) from None
    m = load_manifest(out, kind="engine")
    gpu, parity = m.extra["gpu"], m.parity
    click.echo(f"TensorRT {m.extra['tensorrt']['version']} on {gpu['name']} (sm {gpu['compute_capability']}), "
               f"{m.precision}, built in {m.extra['build']['seconds']} s")
    for p in m.extra["profiles"]:
        click.echo(f"profile {p['name']:8s} " + " ".join(f"{k}={lo}..{hi}" for k, (lo, _, hi) in p["dims"].items()))
    click.echo(f"parity vs ONNX Runtime: max |logit diff| {parity['max_abs_diff']['logits']:.3g} "
               f"(max|ref| {parity['max_abs_ref']['logits']:.3g}, budget {parity['tolerance']['atol']:g} + "
               f"{parity['tolerance']['rtol']:g}*max|ref|), top-1 agreement {parity['top1_agreement']:.3f}")
    click.echo(f"wrote {out}")


@main.command("export")
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="ONNX folder to write")
@_source_options
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--external-data/--no-external-data", default=None,
              help="weights in model.onnx.data beside model.onnx [default: only past 2 GB]")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--no-validate", "validate", is_flag=True, flag_value=False, default=True,
              help="skip the parity check against the torch reference (recorded as skipped)")
@click.option("--no-tokenizer", is_flag=True,
              help="export the graph without a tokenizer (it then cannot fill text or be quantized)")
def export_cmd(checkpoint: str | None, out_dir: str, preset, config_file, tokenizer_file, tokenizer_kind, gelu,
               **kwargs) -> None:
    """Export CHECKPOINT (default: the bundled glmx-small) to a validated ONNX folder.

    CHECKPOINT is a glmx folder, a Hugging Face folder as the hub publishes it, or a Megatron/DeepSpeed folder.
    What was decided about it (config, GeLU, tokenizer kind) is printed and recorded in the manifest.
    """
    require_export_extra()
    from glm_export.checkpoint import CheckpointError
    from glm_export.compare import ParityError
    from glm_export.export import ExportError, export_onnx
    from glm_runtime.config import ConfigError
    from glm_runtime.manifest import ManifestError
    options = _load_options(preset, config_file, tokenizer_file, tokenizer_kind, gelu)
    options["tokenizer_file"] = options.pop("tokenizer")
    try:
        out = export_onnx(checkpoint, out_dir, log=lambda msg: click.echo(msg, err=True), **options, **kwargs)
    except (ExportError, ParityError, CheckpointError, ConfigError, ManifestError) as exc:
        raise GLMXError(str(exc)) from None
    click.echo(str(out))


@main.command("check-trt")
@click.argument("model", type=click.Path(exists=True))
def check_trt_cmd(model: str) -> None:
    """List the nodes of MODEL (.onnx or ONNX folder) that TensorRT's ONNX parser does not support."""
    try:
        from glm_export.trt_check import check_trt, support_list
    except ImportError as exc:
        raise GLMXError(f"check-trt reads the graph with the onnx package, which is not installed ({exc}): "
                        f"pip install 'glmx[export]'") from None
    try:
        findings = check_trt(model)
    except Exception as exc:  # noqa: BLE001 - onnx's DecodeError and friends: the file is not a readable graph
        if isinstance(exc, (OSError, click.ClickException)):
            raise
        raise GLMXError(f"{model} is not a readable ONNX graph ({type(exc).__name__}: {_one_line(exc)}); "
                        f"re-export it (glmx export)") from None
    src = support_list()["source"]
    for f in findings:
        click.echo(str(f))
    if findings:
        raise GLMXError(f"{len(findings)} finding(s) against TensorRT {src['tensorrt_version']}'s ONNX parser")
    click.echo(f"ok: every node is supported by TensorRT {src['tensorrt_version']}'s ONNX parser ({src['document']})")


@main.command("optimize")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="folder to write")
@click.option("--level", type=click.Choice(["fuse", "basic", "extended"]), default="fuse", show_default=True,
              help="fuse: glmx's rewrite (each GeLU subgraph -> one standard Gelu op, opset 20); basic / "
                   "extended: ONNX Runtime's offline optimizer (kept only if TensorRT can still parse it)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def optimize_cmd(src_dir: str, out_dir: str, **kwargs) -> None:
    """Optimize an exported ONNX folder offline, re-checked against its parent."""
    require_export_extra(torch=False)
    from glm_export.compare import BudgetError
    from glm_export.derive import DeriveError
    from glm_export.optimize import OptimizeError, optimize_onnx
    from glm_runtime.manifest import ManifestError
    try:
        click.echo(str(optimize_onnx(src_dir, out_dir, **kwargs)))
    except (OptimizeError, BudgetError, DeriveError, ManifestError, FileExistsError) as exc:
        raise GLMXError(str(exc)) from None


@main.command("quantize")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="folder to write")
@click.option("--scheme", required=True, type=click.Choice(["int8-dynamic", "int4-weight", "qdq-int8", "fp16"]))
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="qdq-int8: real text to calibrate on [default: glm_export/data/calibration.txt]")
@click.option("--block-size", type=int, default=None, help="int4-weight: weights per scale [default: 32]")
@click.option("--accuracy-level", type=int, default=None, help="int4-weight: MatMulNBits compute level [default: 4]")
@click.option("--keep-fp32", multiple=True, default=None,
              help="roles (embedding, head, first-layer, last-layer) or node names left in fp32; repeat the "
                   "option [default: embedding, head; int8-dynamic and qdq-int8 also first-layer]")
@click.option("--accept-loss", is_flag=True, help="write the artifact even if it misses its accuracy budget")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def quantize_cmd(src_dir: str, out_dir: str, **kwargs) -> None:
    """Quantize an fp32 ONNX folder; refuses (writes nothing) when it misses its accuracy budget."""
    require_export_extra(torch=False)
    from glm_export.compare import BudgetError
    from glm_export.derive import DeriveError
    from glm_export.quantize import QuantizeError, quantize_onnx
    from glm_runtime.manifest import ManifestError, load_manifest
    try:
        out = quantize_onnx(src_dir, out_dir, **dict(kwargs, keep_fp32=kwargs["keep_fp32"] or None))
    except (QuantizeError, BudgetError, DeriveError, ManifestError, FileExistsError) as exc:
        raise GLMXError(str(exc)) from None
    acc = load_manifest(out).parity["text"]
    click.echo(f"against the fp32 parent on {acc['positions']} positions of {acc['language']} held-out text "
               f"({acc['heldout']['source']}): top-1 agreement {acc['top1_agreement']:.4f}, fill agreement "
               f"{acc['fill_agreement']:.3f}, Part B ppl change {acc['ppl_change']:+.4f}, max logit diff "
               f"{acc['max_logit_diff']:.3g}"
               + ("" if acc["within_budget"] else f" (OVER BUDGET, accepted: {'; '.join(acc['misses'])})"))
    click.echo(str(out))


@main.command("bench")
@click.option("--model", "models", multiple=True,
              help="model(s) to measure: bundled, glm-large-shape, tiny, or the folder of your own fp32 export "
                   "(glmx export CHECKPOINT -o FOLDER); repeat [default: bundled and glm-large-shape; --quick: tiny]")
@click.option("--variant", "variants", multiple=True,
              help="backend/precision variant(s), e.g. torch-fp32, ort-fp32, ort-int8, ort-int4; repeat [default: all]")
@click.option("--quick", is_flag=True, help="tiny model, torch + ORT fp32, small grid: seconds (CI)")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="results folder [default: a new glmx-bench-DATE-TIME folder here; --quick: a temporary folder]; "
                   "the committed results are regenerated with -o benchmarks/results")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="/tmp/glmx-bench-cache", show_default=True,
              help="where exported and quantized benchmark models are kept between runs")
@click.option("--context", "contexts", multiple=True, type=int, help="context lengths; repeat")
@click.option("--past", "pasts", multiple=True, type=int, help="past lengths for decode latency; repeat")
@click.option("--batch", "batches", multiple=True, type=int, help="batch sizes for throughput; repeat")
@click.option("--threads", type=int, default=None, help="threads per backend [default: 2; --quick: 1]")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="how often the target figures (context 128, decode at past 128, batch 8) are measured, variants "
                   "in rotated order; the report gives each target's median and range over the rounds "
                   "[default: 3; --quick: 2]")
@click.option("--no-plots", "plots", is_flag=True, flag_value=False, default=True, help="skip the PNG plots")
@click.option("--readme-table", "readme_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="only print the README's performance table from this results.json")
def bench_cmd(readme_json: str | None, **kwargs) -> None:
    """Benchmark every backend/precision against torch eager fp32 and the hardware floor."""
    import shlex
    if readme_json:
        from benchmarks.report import print_readme_table
        print_readme_table(readme_json)
        return
    require_export_extra()
    from benchmarks.bench import BenchmarkError, run_benchmarks
    for key in ("models", "variants", "contexts", "pasts", "batches"):
        kwargs[key] = tuple(kwargs[key]) or None
    if kwargs["models"] is None:
        kwargs["models"] = ("tiny",) if kwargs["quick"] else ("bundled", "glm-large-shape")
    if kwargs["out_dir"] is None and not kwargs["quick"]:  # a new folder: a run never writes over earlier results
        import time
        kwargs["out_dir"] = time.strftime("glmx-bench-%Y%m%d-%H%M%S")
    if kwargs["threads"] is None:
        kwargs["threads"] = 1 if kwargs["quick"] else 2
    command = ["glmx", "bench"] + (["--quick"] if kwargs["quick"] else [])  # the options this run resolved to
    for key, flag in (("models", "--model"), ("variants", "--variant"), ("contexts", "--context"),
                      ("pasts", "--past"), ("batches", "--batch")):
        for value in kwargs[key] or ():
            command += [flag, str(value)]
    command += ["--threads", str(kwargs["threads"]), "--cache-dir", kwargs["cache_dir"]]
    command += ["--rounds", str(kwargs["rounds"])] if kwargs["rounds"] is not None else []
    command += (["-o", kwargs["out_dir"]] if kwargs["out_dir"] else []) + ([] if kwargs["plots"] else ["--no-plots"])
    try:
        results = run_benchmarks(command=shlex.join(command), **kwargs)
    except (BenchmarkError, ValueError) as exc:
        raise GLMXError(str(exc)) from None
    click.echo(results["out_dir"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
