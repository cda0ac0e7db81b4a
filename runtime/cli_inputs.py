"""The command line's text inputs: prompts read from stdin or a JSON-lines file (one request per line, each
line's own settings), tasks and records; a refused line is said by its line number, never by an index.
In: raw bytes or text from click. Out: lines, parsed values, FillRequests or the reason a line was refused."""

from __future__ import annotations

import json

from glm_runtime.errors import GLMXError


class InputError(GLMXError, ValueError):
    """An input file or stream that cannot be read as the command needs (not UTF-8, not JSON)."""


def read_text(stream, name: str) -> str:
    """A whole text input as str: UTF-8 (a byte-order mark is dropped, not made prompt text)."""
    data = stream.read()
    if isinstance(data, str):
        return data.lstrip("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def text_lines(text: str) -> list[str]:
    """A text's lines as files and pipes have them: split at \\n only, a CRLF file's \\r dropped. (str.splitlines
    also splits at form feeds, U+2028 and other separators that may sit inside one prompt or JSON line.)"""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def result_line(text: str) -> str:
    """A result written as one output line per input: its line breaks as the two characters \\n."""
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def json_lines(text: str, name: str):
    """(line number, parsed value) of every non-empty line of a JSON-lines text; a bad line is one Error."""
    for n, line in enumerate(text_lines(text), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{name} line {n} is not JSON: {exc}") from None


def jsonl_requests(text: str, name: str):
    """(line number, request dict or the line's error message) of every non-empty line of a JSON-lines text."""
    from glm_runtime.requests import FILL_FIELDS  # a line's keys are a FillRequest's fields

    for n, line in enumerate(text_lines(text), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, f"{name} line {n} is not JSON: {exc}"
            continue
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            yield n, f'{name} line {n}: expected a string or an object with a "prompt" string'
            continue
        unknown = sorted(set(item) - set(FILL_FIELDS))
        if unknown:
            yield n, f"{name} line {n}: unknown key {unknown[0]!r}; a line may set {', '.join(FILL_FIELDS)}"
            continue
        yield n, item


def refusal(exc: Exception) -> str:
    """A refused input's message as glmx fill says it: the input is named by its line, not its index."""
    from glm_runtime.sampling import GenerationError

    if isinstance(exc, GenerationError) and exc.field == "prompt":  # "prompt 3: <why>" / "prompt 3 is ..."
        said = exc.detail[2:] if exc.detail.startswith(": ") else exc.said_as({"prompt": "the prompt"})
        return " ".join(said.split())
    return " ".join(str(exc).split())


def fill_request(index: int, item, settings: dict):
    """One input as a FillRequest (the command's settings, then the line's own), or its error: a message for a
    line that is not a request, a GenerationError for a bad setting."""
    from glm_runtime.requests import FillRequest
    from glm_runtime.sampling import GenerationError

    if isinstance(item, str):
        return item
    mine = {**settings, **{k: v for k, v in item.items() if k != "prompt"}}
    mine["append_gmask"] = bool(mine.get("append_gmask", False))
    try:
        return FillRequest.make(item["prompt"], id=index, **mine)
    except GenerationError as exc:
        return exc
