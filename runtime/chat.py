"""A chat model's conversation as glmx requests: ChatGLM-6B's round template (its HF chat(), chatglm_v1_spec.md 7)
turned into one fill request at the end of the text, the oldest rounds dropped when the history no longer fits the
model's positions, and the answer post-processed as chat() does (streamed without ever taking a character back).

In: a Conversation (the question, the earlier rounds, an optional system text), the model's config (its
Architecture.chat rule) and tokenizer. Out: the prompt text and its context ids, a FillRequest, the answer's text.
The context attends both ways, so no cache is reused from one round to the next: every round runs the whole
history again (its context pass is what a long chat costs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glm_runtime.architecture import ChatRule
from glm_runtime.errors import GLMXError
from glm_runtime.requests import FillRequest
from glm_runtime.tokenizer import GLMTokenizer, build_context_ids, find_blanks

MIN_ANSWER = 64  # positions kept free for the answer when no max_new_tokens is given
# chat()'s process_response: ASCII , ! : ; ? next to a CJK character become full-width (chatglm_v1_spec.md 6)
PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
CJK = "\u4e00-\u9fff"
TRAINING_TIME = ("[[训练时间]]", "2023年")


class ChatError(GLMXError, ValueError):
    """A conversation glmx cannot run: not a chat model, a malformed message list, a question that cannot fit."""


@dataclass
class Conversation:
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier rounds: (question, answer)
    system: str | None = None


def chat_rule(config: Any) -> ChatRule:
    """The model's chat template, or a one-line ChatError for a model that is not a chat model."""
    rule = config.arch.chat
    if rule is None:
        raise ChatError(
            f"{config.name} is a {config.arch.title} model, not a chat model (it has no chat template); fill its "
            f"blanks instead (glmx fill, POST /v1/completions)"
        )
    return rule


def chat_text(rule: ChatRule, conversation: Conversation) -> str:
    """The prompt chat() builds: the question alone without history, else every round then the question; a
    system text folded into the first round's question."""
    rounds = list(conversation.history)
    question = conversation.question
    if conversation.system:
        if rounds:
            rounds[0] = (rule.system.format(system=conversation.system, question=rounds[0][0]), rounds[0][1])
        else:
            question = rule.system.format(system=conversation.system, question=question)
    if not rounds:
        return question
    past = "".join(rule.past.format(i=i, question=q, answer=a) for i, (q, a) in enumerate(rounds))
    return past + rule.ask.format(i=len(rounds), question=question)


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]  # the context ids: text, then [gMASK]; the answer starts at <sop>
    dropped: int  # how many of the oldest rounds did not fit
    max_new_tokens: int


def fit_conversation(
    tokenizer: GLMTokenizer,
    rule: ChatRule,
    conversation: Conversation,
    max_positions: int,
    max_new_tokens: int | None = None,
) -> ChatPrompt:
    """The prompt of the most recent rounds that leave room for the answer: max_new_tokens, or MIN_ANSWER when
    none is given (the answer may then take every position left, as chat()'s max_length counts the prompt)."""
    need = MIN_ANSWER if max_new_tokens is None else max_new_tokens
    for dropped in range(len(conversation.history) + 1):
        kept = Conversation(conversation.question, conversation.history[dropped:], conversation.system)
        text = chat_text(rule, kept)
        ids = build_context_ids(tokenizer, text, append_gmask=True)
        if len(find_blanks(ids, tokenizer)) != 1:
            raise ChatError(
                "a chat message holds a blank ([MASK], [sMASK] or [gMASK]): a chat answers at the end of the "
                "conversation; fill blanks with glmx fill or POST /v1/completions"
            )
        room = max_positions - len(ids) - 1  # <sop> takes one position after the context
        if room >= need:
            return ChatPrompt(text, ids, dropped, room if max_new_tokens is None else max_new_tokens)
    raise ChatError(
        f"the question alone takes {len(ids)} tokens, and with {need} for the answer that is more than the "
        f"model's {max_positions} positions; shorten it"
        + ("" if max_new_tokens is None else " or lower max_new_tokens")
    )


def chat_request(prompt: ChatPrompt, settings: Mapping[str, Any], id: Any = None) -> FillRequest:
    """The engine request of one chat turn: the prompt continued at its end ([gMASK])."""
    return FillRequest.make(prompt.text, max_new_tokens=prompt.max_new_tokens, append_gmask=True, id=id, **settings)


def chat_settings(
    rule: ChatRule,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """chat()'s sampling unless told otherwise; temperature 0 means greedy (as OpenAI clients send it)."""
    if temperature is not None and temperature == 0:
        if top_p is not None or seed is not None:
            raise ChatError("temperature 0 means greedy, which reads no top_p or seed; drop them")
        return {"strategy": "greedy", "stop": stop}
    return {
        "strategy": "sample",
        "temperature": rule.temperature if temperature is None else temperature,
        "top_p": rule.top_p if top_p is None else top_p,
        "seed": seed,
        "stop": stop,
    }


def process_response(text: str) -> str:
    """chat()'s post-processing of an answer: stripped, the training-time placeholder filled, ASCII punctuation
    next to a CJK character made full-width."""
    text = text.strip().replace(*TRAINING_TIME)
    for ascii_mark, wide in PUNCTUATION:
        mark = re.escape(ascii_mark)
        text = re.sub(f"([{CJK}]){mark}", rf"\1{wide}", text)
        text = re.sub(f"{mark}([{CJK}])", rf"{wide}\1", text)
    return text


class AnswerStream:
    """An answer's post-processed text as it grows, shown only where it can no longer change: a trailing ASCII
    punctuation mark (the next character may be CJK) and a tail that may begin the training-time placeholder
    are held back; whitespace at the end waits for what follows (the answer is stripped)."""

    def __init__(self) -> None:
        self.raw, self.shown = "", ""

    def add(self, piece: str) -> str:
        self.raw += piece
        text = process_response(self.raw)
        hold = 1 if text and text[-1] in "".join(a for a, _ in PUNCTUATION) else 0
        marker = TRAINING_TIME[0]
        hold = max(hold, max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0))
        return self._show(text[: len(text) - hold])

    def end(self) -> str:
        return self._show(process_response(self.raw))

    def _show(self, text: str) -> str:
        if not text.startswith(self.shown):  # cannot happen with what add() holds back; never take text back
            return ""
        new = text[len(self.shown) :]
        self.shown = text
        return new


ROLES = ("system", "user", "assistant")


def conversation_of(messages: Any) -> Conversation:
    """OpenAI's messages as a Conversation: system messages first (folded into the first round), then user and
    assistant turns alternating, ending with the user's question. One-line ChatError otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ChatError('"messages" must be a non-empty list of {"role", "content"} objects')
    system: list[str] = []
    turns: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f'messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}}')
        if set(m) - {"role", "content", "name"}:
            raise ChatError(f"messages[{i}] has {sorted(set(m) - {'role', 'content', 'name'})}: not supported")
        if m["role"] == "system":
            if turns:
                raise ChatError(f"messages[{i}] is a system message after the conversation began; put it first")
            system.append(m["content"])
        else:
            want = "user" if len(turns) % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ChatError(f"messages[{i}] is {m['role']!r} where {want!r} comes: turns alternate from the user")
            turns.append(m["content"])
    if len(turns) % 2 == 0:
        raise ChatError("the last message must be the user's question")
    history = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    return Conversation(turns[-1], history, "\n".join(system) or None)
