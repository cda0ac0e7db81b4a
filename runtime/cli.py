"""The `glmx` command line: the runtime's commands (config, fill, score, classify) and the group the export side's
commands join (glm_export.cli: convert, export, optimize, quantize, build-engine, bench, ...) when it is there.

Every command is a thin wrapper over one function; every failure ends as one `Error:` line and exit status 1.
Torch-free: nothing here imports torch or glm_export (the export commands are loaded by name, like a plugin).
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


EXPORT_COMMANDS = "glm_export.cli"  # the export side's commands, joined to the group when it is installed


def run() -> None:
    """The `glmx` console script: the runtime's commands plus the export side's, when it is installed."""
    import importlib

    from glm_runtime.memory import large_buffers_to_os
    large_buffers_to_os()  # export, quantize and fill free weight-sized buffers all the time
    try:
        importlib.import_module(EXPORT_COMMANDS)
    except ImportError:  # a runtime without the export package: its commands alone
        pass
    main()


if __name__ == "__main__":  # pragma: no cover
    run()
