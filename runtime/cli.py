"""The `glmx` command line: the runtime's commands (config, fill, score, classify) and the group the export side's
commands join (glm_export.cli: convert, export, optimize, quantize, build-engine, bench, ...) when it is there.

Every command is a thin wrapper over one function; every failure ends as one `Error:` line and exit status 1
(a usage error, found by click before the command runs, after the usage line).
Torch-free: nothing here imports torch or glm_export (the export commands are loaded by name, like a plugin).
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import TYPE_CHECKING

import click

from glm_runtime.cli_inputs import fill_request, json_lines, jsonl_requests, read_text, refusal, result_line, text_lines
from glm_runtime.command_group import CommandError, Commands

if TYPE_CHECKING:  # for annotations only: the command group itself imports nothing heavy
    from glm_runtime.requests import FillResult


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glmx", prog_name="glmx")
def main() -> None:
    """glmx: GLM blank infilling from a PyTorch checkpoint to ONNX Runtime and TensorRT.

    \b
    Stages:  convert -> export -> optimize / quantize -> build-engine -> fill / serve / score / classify / bench
    Every artifact folder carries a manifest.json that later stages check; every failure is one Error line.
    """


@main.command("config")
@click.argument("preset", required=False)
def config_cmd(preset: str | None) -> None:
    """Print a preset's GLMConfig as JSON, or list the presets."""
    from glm_runtime.config import PRESETS, ConfigError, get_preset

    if preset is None:
        for name, cfg in PRESETS.items():
            click.echo(
                f"{name:20s} L={cfg.num_layers:<3d} h={cfg.hidden_size:<5d} n={cfg.num_attention_heads:<3d} "
                f"P={cfg.max_sequence_length:<5d} V={cfg.vocab_size:<6d} tokenizer={cfg.tokenizer} "
                f"params={cfg.num_parameters() / 1e6:.0f}M"
            )
        return
    try:
        click.echo(get_preset(preset).to_json())
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


# the model every runtime command opens, and the backend it runs on
MODEL_OPTION = click.option(
    "--model", type=click.Path(file_okay=False), help="exported model folder [default: the bundled model]"
)
BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "onnxruntime-cuda", "torch", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="torch needs the export extra; tensorrt an engine folder",
)


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
top_p, seed, num_beams, length_penalty, early_stopping, stop, append_gmask}; a line's own settings win for that
line.
Prompts run on the engine of glmx serve: --rows of them decode together and the next takes a row as soon as one
frees, so memory follows --rows, not the input's length. Results are printed as they finish, in input order.
Each input line gives one output line: a line break inside a result is written as the two characters \\n
(--json keeps the exact text). A line that is refused (bad JSON, a bad setting, too long) is named with its line
number at the end and the exit status is 1; every other line is still filled. Timings in --json are seconds."""


@main.command("fill", help=FILL_HELP)
@click.argument("prompt", required=False)
@MODEL_OPTION
@click.option("--stdin", "from_stdin", is_flag=True, help="read prompts from stdin, one per line (UTF-8)")
@click.option(
    "--jsonl",
    "jsonl",
    type=click.File("rb"),
    help='read prompts from a JSON-lines file ("-" = stdin): a string or {"prompt": ..., settings} per line',
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per prompt (spans, tokens, timings in s)")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="budget per blank")
@click.option("--strategy", type=click.Choice(["greedy", "sample", "beam"]), default="greedy", show_default=True)
@click.option("--temperature", type=float, default=None, help="sample: > 0 [default: 1]")
@click.option(
    "--top-k", type=int, default=None, help="sample: keep the k most likely tokens; 0 = no filter [default: 0]"
)
@click.option("--top-p", type=float, default=None, help="sample: nucleus mass in (0, 1]; 1 = no filter [default: 1]")
@click.option("--seed", type=int, default=None, help="sample: seed of every prompt's own stream (see above)")
@click.option("--num-beams", type=int, default=None, help="beam: beams per span [default: 1]")
@click.option("--length-penalty", type=float, default=None, help="beam: score = log-prob / length ** this [default: 1]")
@click.option("--early-stopping", is_flag=True, default=None, help="beam: stop a span once num_beams hypotheses ended")
@click.option("--append-gmask", is_flag=True, help="a prompt without a blank is continued at its end ([gMASK])")
@click.option(
    "--stop",
    multiple=True,
    help="greedy / sample: a span ends where its text first holds this string, which is cut off (stop reason "
    "'stop'); repeat for up to 4",
)
@click.option(
    "--rows",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="prompts decoding together (memory grows with this, not with the number of prompts)",
)
@BACKEND_OPTION
def fill_cmd(prompt, from_stdin, jsonl, as_json, model, backend, rows, **settings) -> None:
    from glm_runtime.engine import Engine
    from glm_runtime.requests import FillRequest
    from glm_runtime.sampling import GenerationError
    from glm_runtime.session import open_model

    sources = [s for s in (prompt is not None, from_stdin, jsonl is not None) if s]
    if len(sources) != 1:
        raise CommandError("give exactly one of: a PROMPT argument, --stdin, or --jsonl FILE")
    settings["early_stopping"] = settings["early_stopping"] or None  # a flag not given is "not set"
    settings["stop"] = list(settings["stop"]) or None
    if from_stdin:
        lines = [
            (n, {"prompt": line})
            for n, line in enumerate(text_lines(read_text(sys.stdin.buffer, "stdin")), 1)
            if line.strip()
        ]
        name = "stdin"
    elif jsonl is not None:
        lines, name = list(jsonl_requests(read_text(jsonl, jsonl.name), jsonl.name)), jsonl.name
    else:
        lines, name = [(0, {"prompt": prompt})], None
    if not lines:
        raise CommandError("no prompts given (the input was empty)")
    inputs = [fill_request(i, item, settings) for i, (_, item) in enumerate(lines)]
    where = [f"{name} line {n}: " if name else "" for n, _ in lines]
    if name is None and isinstance(inputs[0], GenerationError):
        raise CommandError(refusal(inputs[0]))
    session, tokenizer = open_model(model, backend)
    engine = Engine(session, tokenizer, rows=rows)
    done: dict[int, FillResult | str] = {}  # input index -> FillResult or error message, until printed in input order
    bad: list[str] = []

    def refuse(i: int, message: str) -> None:
        done[i] = message
        bad.append(message)

    for i, item in enumerate(inputs):
        if isinstance(item, str):  # a line that is not a request: its message names its line already
            refuse(i, item)
        elif isinstance(item, GenerationError):
            refuse(i, where[i] + refusal(item))

    def refused(request, exc) -> None:
        if name is None:
            raise CommandError(refusal(exc))
        refuse(request.id, where[request.id] + refusal(exc))

    printed = 0
    requests = (r for r in inputs if isinstance(r, FillRequest))
    events = engine.run(requests, lookahead=rows, on_refused=refused)  # a short queue: memory follows the rows
    for event in itertools.chain(events, [None]):
        if event is not None and event.kind != "result":
            continue
        if event is not None:
            done[event.prompt] = event.result
        while printed in done:
            outcome = done.pop(printed)
            if not isinstance(outcome, str):  # a refused line is said at the end; the others go on
                text = lines[printed][1]["prompt"]
                click.echo(
                    json.dumps({"prompt": text, **outcome.to_dict()}, ensure_ascii=False)
                    if as_json
                    else outcome.text
                    if name is None
                    else result_line(outcome.text)
                )
            printed += 1
    for message in bad if len(bad) > 1 else []:
        click.echo(message, err=True)
    if bad:
        raise CommandError(
            bad[0]
            if len(bad) == 1
            else f"{len(bad)} of {len(lines)} inputs were refused (each named "
            f"above); the other {len(lines) - len(bad)} were filled"
        )


SERVE_HELP = """Serve blank filling over HTTP with continuous batching (needs the serve extra: pip install
'glmx[serve]').


Routes:  POST /v1/completions  OpenAI-shaped: "prompt" may hold blanks; "suffix" means prompt + [MASK] + suffix;
                               a prompt without a blank is continued at its end; "max_tokens" is the budget per
                               blank; "echo" returns the filled text; "stream" sends server-sent events ending in
                               [DONE]; each choice's "glmx" field holds the spans. temperature > 0 (or top_p < 1)
                               samples, otherwise greedy; "glmx": {"strategy", "top_k", "num_beams", ...} for the
                               rest. Options glmx does not implement (n > 1, logprobs, best_of, stop, penalties)
                               answer 400.
         POST /v1/fill         glmx fill --json's fields and answer ("stream": true for events).
         POST /v1/score        {"prompt", "candidates"}: glmx score --json's answer, probabilities added.
         GET /                 the web playground (fill, score, chat) in a browser; --no-ui leaves it out.
         GET /health (503 while loading or after the engine failed), GET /v1/models, GET /metrics (Prometheus).
Bounded: --rows requests decode together, --max-waiting more may wait; past that a request gets 429 with
Retry-After. A body past --max-body-bytes answers 413; num_beams above --rows, or more prompts in one request
than --rows + --max-waiting, answer 400. A client that hangs up frees its row; --timeout answers 504.
SIGTERM / Ctrl-C stop accepting, let running requests finish, then exit. Binds 127.0.0.1 unless --host says
otherwise; with --api-key (or GLMX_API_KEY) /v1/* need "Authorization: Bearer KEY".
Example:  glmx serve --port 8000 &
          until curl -sf localhost:8000/health >/dev/null; do sleep 0.2; done
          curl -s localhost:8000/v1/completions -d '{"prompt": "The capital of France is [MASK].", "max_tokens": 8}'"""


@main.command("serve", help=SERVE_HELP)
@MODEL_OPTION
@BACKEND_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0 = every interface)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--rows",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="requests decoding together (the KV cache's rows)",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="requests that may wait for a row before new ones get 429",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="seconds a request may take before it is cancelled (504)",
)
@click.option("--api-key", envvar="GLMX_API_KEY", default=None, help="require this bearer token on /v1/*")
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=1 << 20,
    show_default=True,
    help="a request body past this answers 413",
)
@click.option("--no-ui", is_flag=True, help="serve the API alone, without the web playground at GET /")
@click.option(
    "--stages",
    default=None,
    metavar="N|L0,L1,..",
    help="cut the model into N pipeline stages (or stages of L0, L1, .. layers), each a Ray actor holding its "
    "layers and their KV cache (docs/pipeline.md); placed one per node (STRICT_SPREAD) when the cluster has that "
    "many nodes, else together on one (PACK); onnxruntime backend only",
)
@click.option(
    "--address",
    default=None,
    help="with --stages: the Ray cluster (auto = the one `ray start --head` made here, ray://HOST:10001, "
    "HOST:6379); default: a local Ray of this process",
)
def serve_cmd(
    model, backend, host, port, rows, max_waiting, timeout, api_key, max_body_bytes, no_ui, stages, address
) -> None:
    import os

    from glm_runtime.serve_main import serve

    if api_key is None and os.environ.get("GLMX_API_KEY") is not None:  # click reads a set but empty one as unset
        api_key = os.environ["GLMX_API_KEY"]  # and the server refuses it: an empty key is no key
    args = (host, port, rows, max_waiting, timeout, api_key)
    options = {"log": lambda m: click.echo(m, err=True), "max_body": max_body_bytes, "ui": not no_ui}
    if stages is None and address is not None:
        raise click.UsageError("--address names the Ray cluster of --stages: give --stages N too")
    if stages is not None:
        try:
            split = [int(n) for n in stages.split(",")]
        except ValueError:
            raise click.BadParameter(f"{stages!r}: a number of stages, or each stage's layers (14,19,19,18)") from None
        if backend != "onnxruntime":
            raise click.UsageError(f"--stages runs ONNX Runtime stages; --backend {backend} cannot be cut")
        from glm_runtime.serve_pipeline import serve_stages

        serve_stages(model, split[0] if len(split) == 1 else split, address, *args, **options)
        return
    serve(model, backend, *args, **options)


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
@click.option(
    "--length-penalty",
    type=float,
    default=0.0,
    show_default=True,
    help="score = log-prob / (tokens + 1) ** this; 0 = the plain sum",
)
@click.option("--single-token", is_flag=True, help="score each one-token candidate at the blank itself")
@click.option("--json", "as_json", is_flag=True, help="print every candidate's figures as JSON")
@MODEL_OPTION
@BACKEND_OPTION
def score_cmd(prompt, candidates, length_penalty, single_token, as_json, model, backend) -> None:
    from glm_runtime.score import score_candidates
    from glm_runtime.session import open_model

    session, tokenizer = open_model(model, backend)
    scores = score_candidates(
        session, tokenizer, prompt, list(candidates), length_penalty=length_penalty, single_token=single_token
    )
    ranked = sorted(scores, key=lambda c: -c.score)
    if as_json:
        click.echo(
            json.dumps(
                {"prompt": prompt, "winner": ranked[0].text, "candidates": [c.to_dict() for c in scores]},
                ensure_ascii=False,
            )
        )
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
with a "label" field are gold (a string naming a label; an integer 1 means label "1"): accuracy and the
confusion matrix are printed after the predictions. A template field is a record's key as it is: {text}.
Example:  glmx classify docs/examples/reviews.jsonl --template "{text} It was really [MASK]." \\
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
@MODEL_OPTION
@BACKEND_OPTION
def classify_cmd(
    records, task_file, template, verbalizer, aggregate, length_penalty, single_token, as_json, model, backend
) -> None:
    from glm_runtime.score import classify
    from glm_runtime.session import open_model

    task: dict = {}
    if task_file is not None:
        try:
            task = json.loads(read_text(task_file, task_file.name))
        except json.JSONDecodeError as exc:
            raise CommandError(f"{task_file.name} is not JSON: {exc}") from None
        if not isinstance(task, dict):
            raise CommandError(f"{task_file.name} must be a JSON object with template and verbalizer")
        unknown = sorted(set(task) - {"template", "verbalizer", "aggregate", "length_penalty", "single_token"})
        if unknown:
            raise CommandError(
                f"{task_file.name}: unknown key {unknown[0]!r}; a task has template, verbalizer, "
                f"aggregate, length_penalty, single_token"
            )
    if template is not None:
        task["template"] = template
    if verbalizer is not None:
        try:
            task["verbalizer"] = json.loads(verbalizer)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--verbalizer is not JSON: {exc}") from None
    for key, value in (("aggregate", aggregate), ("length_penalty", length_penalty), ("single_token", single_token)):
        if value is not None:
            task[key] = value
    if not isinstance(task.get("template"), str) or not isinstance(task.get("verbalizer"), dict):
        raise CommandError(
            "a task needs a template (a string) and a verbalizer (a JSON object): --task FILE, or "
            "--template and --verbalizer"
        )
    rows = []
    for n, item in json_lines(read_text(records, records.name), records.name):
        if not isinstance(item, dict):
            raise CommandError(f"{records.name} line {n}: a record is a JSON object of the template's fields")
        rows.append(item)
    session, tokenizer = open_model(model, backend)
    result = classify(
        session,
        tokenizer,
        rows,
        task["template"],
        task["verbalizer"],
        aggregate=task.get("aggregate", "max"),
        length_penalty=task.get("length_penalty", 0.0),
        single_token=bool(task.get("single_token", False)),
    )
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
CHAT_COMMAND = "glm_runtime.chat_cli"  # glmx chat, in its own module


def run() -> None:
    """The `glmx` console script: the runtime's commands plus the export side's, when it is installed."""
    import importlib

    from glm_runtime.memory import large_buffers_to_os

    large_buffers_to_os()  # export, quantize and fill free weight-sized buffers all the time
    importlib.import_module(CHAT_COMMAND)
    try:
        importlib.import_module(EXPORT_COMMANDS)
    except ImportError:  # a runtime without the export package: its commands alone
        pass
    main()


if __name__ == "__main__":  # pragma: no cover
    run()
