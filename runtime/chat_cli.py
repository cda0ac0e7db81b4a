"""`glmx chat`: a conversation with a chat model (ChatGLM-6B) in the terminal, or as JSON lines for scripts; it
joins the runtime's command group (glm_runtime.cli.run loads it by name). The conversation's rules are in
glm_runtime.chat; each answer runs on the engine that glmx serve and glmx fill use."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from glm_runtime.cli import BACKEND_OPTION, MODEL_OPTION, main
from glm_runtime.cli_inputs import read_text, text_lines
from glm_runtime.command_group import CommandError

CHAT_HELP = """Chat with a chat model (ChatGLM-6B) in rounds, the answer streamed as it decodes.

\b
Each round's prompt is ChatGLM's chat() template: the question alone in the first round, then
"[Round N]\\n问：...\\n答：..." for every earlier round and "[Round N]\\n问：question\\n答：" (rounds from 0), with
[gMASK] appended; the answer is post-processed as chat() does (stripped, ASCII , ! : ; ? next to a Chinese
character made full-width). Defaults are chat()'s: sampling with temperature 0.95 and top-p 0.7, and the answer
may take every position the history leaves (max_length 2048 counts the prompt); --temperature 0 is greedy.
ChatGLM-6B has no system role: --system TEXT is folded into the first round's question as "TEXT\\n\\nquestion".
The context attends both ways, so nothing is cached from one round to the next: every round runs the whole
history again. When the history no longer fits the model's positions, the oldest rounds are dropped and a line
says how many.

\b
In the terminal: type a question; /clear forgets the history, /quit (or Ctrl-D) ends. With --jsonl (or when
stdin is not a terminal): each stdin line is a question (a JSON string, or {"content": ...}) or {"command":
"clear"}; each answer is one JSON line {"round", "answer", "dropped_rounds", "finish_reason", "tokens" (the
prompt's ids, [gMASK] and <sop> included), "answer_tokens"}."""


@main.command("chat", help=CHAT_HELP)
@MODEL_OPTION
@BACKEND_OPTION
@click.option("--system", default=None, help="text folded into the first round's question (see above)")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="an answer's budget [default: every position the history leaves]",
)
@click.option("--temperature", type=float, default=None, help="[default: 0.95, chat()'s]; 0 = greedy")
@click.option("--top-p", type=float, default=None, help="[default: 0.7, chat()'s]")
@click.option("--seed", type=int, default=None, help="sampling seed (each answer's stream: the seed and its prompt)")
@click.option("--stop", multiple=True, help="an answer ends where it first holds this string (cut off); repeat")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="JSON lines in and out (see above)")
def chat_cmd(model, backend, system, max_new_tokens, temperature, top_p, seed, stop, as_jsonl) -> None:
    from glm_runtime.chat import ChatError, chat_rule, chat_settings
    from glm_runtime.session import open_model

    session, tok = open_model(model, backend)
    try:
        rule = chat_rule(session.config)
        settings = chat_settings(rule, temperature, top_p, seed, list(stop) or None)
    except ChatError as exc:
        session.close()
        raise CommandError(str(exc)) from None
    turn = Turns(session, tok, rule, system, max_new_tokens, settings)
    with session:
        if as_jsonl or not sys.stdin.isatty():
            _jsonl(turn)
        else:
            _interactive(turn)


class Turns:
    """The conversation so far and how one more round runs (glm_runtime.chat)."""

    def __init__(self, session: Any, tok: Any, rule: Any, system: str | None, budget: int | None, settings: dict):
        from glm_runtime.engine import Engine

        self.engine = Engine(session, tok, rows=1)
        self.tok, self.rule, self.system, self.budget, self.settings = tok, rule, system, budget, settings
        self.positions = int(session.config.max_sequence_length)
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str, show: Callable[[str], None]) -> dict[str, Any]:
        """One round: the answer streamed to show(), kept in the history; -> its record."""
        from glm_runtime.chat import AnswerStream, Conversation, chat_request, fit_conversation, process_response

        conversation = Conversation(question, self.history, self.system)
        prompt = fit_conversation(self.tok, self.rule, conversation, self.positions, self.budget)
        if prompt.dropped:
            self.history = self.history[prompt.dropped :]
        stream, result, failed = AnswerStream(), None, None
        for event in self.engine.run([chat_request(prompt, self.settings)]):
            if event.kind == "token":
                show(stream.add(event.text))
            elif event.kind == "span":
                show(stream.add(event.rest))
            elif event.kind == "result":
                result = event.result
            elif event.kind == "failed":
                failed = event.text
        if result is None:
            raise CommandError(f"the answer failed: {failed}")
        show(stream.end())
        answer = process_response(result.spans[0].text)
        self.history.append((question, answer))
        return {
            "round": len(self.history) - 1,
            "answer": answer,
            "dropped_rounds": prompt.dropped,
            "finish_reason": "length" if result.spans[0].stop == "length" else "stop",
            "tokens": [*prompt.ids, self.tok.special["sop"]],
            "answer_tokens": result.spans[0].token_ids,
        }


def _say_dropped(record: dict[str, Any]) -> None:
    if record["dropped_rounds"]:
        click.echo(
            f"(the history no longer fit the model's positions: the oldest {record['dropped_rounds']} round(s) "
            f"were dropped)",
            err=True,
        )


def _jsonl(turn: Turns) -> None:
    from glm_runtime.chat import ChatError

    for n, line in enumerate(text_lines(read_text(sys.stdin.buffer, "stdin")), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommandError(f"stdin line {n} is not JSON: {exc}") from None
        if isinstance(item, dict) and item.get("command") == "clear":
            turn.history = []
            continue
        question = item.get("content") if isinstance(item, dict) else item
        if not isinstance(question, str):
            raise CommandError(f'stdin line {n}: a question is a JSON string or {{"content": "..."}}')
        try:
            record = turn.ask(question, lambda text: None)
        except ChatError as exc:
            raise CommandError(f"stdin line {n}: {exc}") from None
        _say_dropped(record)
        click.echo(json.dumps(record, ensure_ascii=False))


def _interactive(turn: Turns) -> None:
    from glm_runtime.chat import ChatError

    click.echo("glmx chat: type a question; /clear forgets the history, /quit ends.", err=True)
    while True:
        try:
            question = click.prompt("用户", prompt_suffix="：", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            click.echo("", err=True)
            return
        if question.strip() in ("/quit", "/exit"):
            return
        if question.strip() == "/clear":
            turn.history = []
            click.echo("(history cleared)", err=True)
            continue
        if not question.strip():
            continue
        click.echo("ChatGLM：", nl=False)
        try:
            record = turn.ask(question, lambda text: click.echo(text, nl=False))
        except ChatError as exc:
            click.echo("")
            click.echo(f"Error: {exc}", err=True)
            continue
        click.echo("")
        _say_dropped(record)
