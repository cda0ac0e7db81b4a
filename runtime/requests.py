"""Requests as data: what a caller asks the engine (a fill or a scoring request, with its settings), what the
engine makes of a prompt (context ids and blanks), and what comes back (spans, results, stream events).
In: prompt text and settings from the API, the CLI and the server. Out: typed records every layer shares; the
engine (runtime/engine.py) runs them, nothing here runs a model.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from glm_runtime.sampling import GenerationError, check_beam, check_sampling
from glm_runtime.tokenizer import GLMTokenizer, build_context_ids, find_blanks

STRATEGIES = ("greedy", "sample", "beam")
# which options each strategy reads; passing one another strategy does not read is refused, never ignored
STRATEGY_OPTIONS = {
    "greedy": ("stop",),
    "sample": ("temperature", "top_k", "top_p", "seed", "stop"),
    "beam": ("num_beams", "length_penalty", "early_stopping"),
}
OPTION_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": None,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "stop": (),
}
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's limit on stop strings; a stop string's length
ENDINGS = ("finished", "cancelled", "timeout", "failed")  # a request's last state
# a fill request's fields as the CLI's --jsonl lines and the server's /v1/fill spell them
FILL_FIELDS = ("prompt", "max_new_tokens", "strategy", *OPTION_DEFAULTS, "append_gmask")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """One request's decoding settings, checked and with every default filled in (resolve_settings)."""

    max_new_tokens: int = 32
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop: tuple[str, ...] = ()  # a span ends where its text first holds one of these, which is cut off

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_settings(max_new_tokens: Any = 32, strategy: str = "greedy", **options: Any) -> Settings:
    """Check a request and fill in the defaults: the options a strategy reads (STRATEGY_OPTIONS) take their
    defaults when left None; an option given (not None) to a strategy that does not read it is refused.
    Errors name the option as the CLI spells it (--top-k); callers with other field names use `field`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise GenerationError(f" must be an integer >= 1, got {max_new_tokens!r}", field="max_new_tokens")
    if strategy not in STRATEGIES:
        raise GenerationError(
            f"{strategy!r}; choose one of {STRATEGIES}", field="strategy", subject="unknown strategy "
        )
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise GenerationError(
            f"unknown setting {unknown[0]!r}; settings are max_new_tokens, strategy and {', '.join(OPTION_DEFAULTS)}"
        )
    for name, value in options.items():
        if value is not None and name not in STRATEGY_OPTIONS[strategy]:
            owner = next(k for k, v in STRATEGY_OPTIONS.items() if name in v)
            flag = "--" + name.replace("_", "-")
            raise GenerationError(
                f" applies to --strategy {owner}, not {strategy}; drop it or pass --strategy {owner}",
                field=name,
                subject=flag,
            )
    chosen = {name: OPTION_DEFAULTS[name] if options.get(name) is None else options[name] for name in OPTION_DEFAULTS}
    chosen["stop"] = check_stop(chosen["stop"])
    if strategy == "sample":
        check_sampling(chosen["temperature"], chosen["top_k"], chosen["top_p"])
    if strategy == "beam":
        check_beam(chosen["num_beams"], chosen["length_penalty"], chosen["early_stopping"])
    return Settings(int(max_new_tokens), strategy, **chosen)


def check_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings as OpenAI takes them: one string or a list of at most MAX_STOPS non-empty strings."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(f" must be a string or a list of non-empty strings, got {stop!r}", field="stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise GenerationError(
            f" takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each", field="stop"
        )
    return tuple(stops)


def stop_cut(text: str, stops: Sequence[str]) -> tuple[int | None, int]:
    """(where the first stop string starts in text, or None; how much of text a stream may show now): the text
    before a stop string, else all but a tail that may still begin one."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return min(found), min(found)
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return None, len(text) - hold


# ---------------------------------------------------------------- what a caller asks


@dataclass(frozen=True)
class FillRequest:
    """Fill every blank of one prompt. id: the caller's name for it (events carry it; the engine numbers a
    request without one). append_gmask: a prompt without a blank is continued at its end."""

    prompt: str
    settings: Settings = Settings()
    append_gmask: bool = False
    id: Any = None

    @classmethod
    def make(
        cls,
        prompt: str,
        *,
        max_new_tokens: Any = 32,
        strategy: str = "greedy",
        append_gmask: bool = False,
        id: Any = None,
        **options: Any,
    ) -> FillRequest:
        """A request from keyword settings, checked (GenerationError names the bad one)."""
        return cls(prompt, resolve_settings(max_new_tokens, strategy, **options), bool(append_gmask), id)


@dataclass(frozen=True)
class ScoreRequest:
    """Score candidate answers for the one blank of each prompt (GLM's cloze scoring, runtime/cloze.py).
    candidates: one list per prompt. length_penalty: score = log-prob / (tokens + 1) ** this (0 = the sum)."""

    prompts: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]
    length_penalty: float = 0.0
    single_token: bool = False
    id: Any = None


Request = FillRequest | ScoreRequest


# ---------------------------------------------------------------- what the engine makes of a prompt


@dataclass
class Prompt:
    """A prompt ready to run: its context ids and blanks (position, mask id), in order. counting: per blank,
    whether its span's positions count up from the context length (PromptRule.gmask_counts: GLM-130B's [gMASK])
    instead of staying at the blank. filled: how many of the blanks are already spliced into ids (PromptRule.blanks
    "spliced": each span written in place of its blank and the context run again; splice_span)."""

    index: Any
    text: str
    ids: list[int]
    blanks: list[tuple[int, int]]
    counting: list[bool] = field(default_factory=list)
    filled: int = 0

    def positions_needed(self, max_new_tokens: int) -> int:
        """Positions the context and every open blank's sop + span take (docs/glm.md 3.3)."""
        return len(self.ids) + (len(self.blanks) - self.filled) * (1 + max_new_tokens)

    def count_from(self, blank: int) -> int:
        """Where blank `blank`'s sop sits in row 0 when its span counts up (the context length), else -1: its
        span stays at the blank's position (glm_runtime.masks.decode_positions)."""
        return len(self.ids) if blank < len(self.counting) and self.counting[blank] else -1


def counts_up(tokenizer: GLMTokenizer, mask_id: int) -> bool:
    """Whether a span of blank `mask_id` counts its positions up from the context length (PromptRule.gmask_counts:
    GLM-130B's [gMASK]) instead of staying at the blank."""
    return tokenizer.prompt.gmask_counts and mask_id == tokenizer.special.get("gMASK")


def span_stops(tokenizer: GLMTokenizer) -> dict[int, str]:
    """The ids that end a span, by name: eop and eos for every architecture, and any PromptRule.stop names."""
    special = tokenizer.special
    stops = {special["eop"]: "eop", special["eos"]: "eos"}
    for name in tokenizer.prompt.stop:
        stops.setdefault(special[name], name)
    return stops


def splice_span(prompt: Prompt, blank: int, span: Sequence[int]) -> Prompt:
    """The prompt of the next round of a spliced fill (GLM-130B's fill_blanks, spec 5): the span's ids in place
    of blank `blank` (the rest of the context, its eos included, as it was), the later blanks moved by the span's
    length; the filled blanks keep their records."""
    at = prompt.blanks[blank][0]
    shift = len(span) - 1
    ids = [*prompt.ids[:at], *span, *prompt.ids[at + 1 :]]
    blanks = prompt.blanks[: blank + 1] + [(p + shift, m) for p, m in prompt.blanks[blank + 1 :]]
    return Prompt(prompt.index, prompt.text, ids, blanks, list(prompt.counting), blank + 1)


def prepare_prompt(
    tokenizer: GLMTokenizer, text: Any, index: Any, append_gmask: bool, max_new_tokens: int, max_positions: int
) -> Prompt:
    """Context ids and blanks of one prompt; refuses, before any work, a prompt that cannot fit.

    GLM was trained on sequences of at most P tokens (Part A + every sop + span), and the original generator
    keeps at most P - 1 memory positions (docs/glm.md 3.3); so C + blanks x (1 + max_new_tokens) must be <= P,
    which also keeps every block position (<= max_new_tokens + 1) inside the table.
    """
    if not isinstance(text, str):
        raise GenerationError(
            f" is a {type(text).__name__}, expected a string", field="prompt", subject=f"prompt {index}"
        )
    try:
        ids = build_context_ids(tokenizer, text, append_gmask=append_gmask)
    except ValueError as exc:
        raise GenerationError(f": {exc}", field="prompt", subject=f"prompt {index}") from None
    blanks = find_blanks(ids, tokenizer)
    prompt = Prompt(index, text, ids, blanks, [counts_up(tokenizer, mask_id) for _, mask_id in blanks])
    need = prompt.positions_needed(max_new_tokens)
    if need > max_positions:
        blanks = len(prompt.blanks)
        room = (max_positions - len(ids)) // blanks - 1
        fix = (
            f"lower max_new_tokens to {room} or shorten the prompt"
            if room >= 1
            else "shorten the prompt or use fewer blanks"
        )
        raise GenerationError(
            f" is too long for the model: {len(ids)} context tokens + {blanks} blank(s) x "
            f"(1 + {max_new_tokens} new tokens) = {need} positions > max_sequence_length {max_positions}; {fix}",
            field="prompt",
            subject=f"prompt {index}",
        )
    return prompt


# ---------------------------------------------------------------- what comes back


@dataclass
class Span:
    """One filled blank of a result."""

    text: str
    token_ids: list[int]
    blank: str  # the blank token it fills: "[MASK]", "[sMASK]" or "[gMASK]"
    position: int  # index of that blank in the context ids (its position id)
    stop: str  # why it ended: "eop", "eos", "length" (max_new_tokens reached) or "stop" (a stop string; cut off)


@dataclass
class FillResult:
    text: str  # the prompt with every blank replaced by its span
    spans: list[Span]
    tokens: list[int]  # the original's output layout: context ids, then sop + span ids per blank (no eop)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CandidateScore:
    text: str
    token_ids: list[int]  # the answer's ids (single-token: the one id)
    logprobs: list[float]  # per target: answer tokens then eop (single-token: the one)
    total: float  # sum of logprobs
    length: int  # number of targets
    score: float  # total / length ** length_penalty (single-token: total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    """kind: "token" (a new span token), "span" (a finished span), "result" (a finished fill), "scores" (a
    finished scoring request), or the ending of a request without a result: "cancelled", "timeout", "failed"
    (text says why)."""

    kind: str
    prompt: Any  # the request's id
    blank: int = -1  # index of the blank within the prompt
    token_id: int | None = None
    text: str = ""  # the token's or span's text
    rest: str = ""  # a span's text that no token event showed (held back for a stop string that never came)
    span: Span | None = None
    result: FillResult | None = None
    scores: list[list[CandidateScore]] | None = None


# ---------------------------------------------------------------- text out


def decode_text(tokenizer: GLMTokenizer, ids: Sequence[int]) -> str:
    """Text of ids, skipping ids that have no text (padded vocabulary rows a model may still pick, docs/glm.md 9.8)."""
    known = []
    for i in ids:
        try:
            tokenizer.id_to_token(int(i))
        except ValueError:
            continue
        known.append(int(i))
    return tokenizer.decode(known)


def new_text(
    tokenizer: GLMTokenizer, span: Sequence[int], shown: str, stops: Sequence[str] = ()
) -> tuple[str, int | None]:
    """What a stream shows after the span's latest token: the whole span decoded, less what was already shown;
    nothing while the text ends in U+FFFD (a character whose UTF-8 bytes, byte-fallback pieces, are not all
    there yet), so a character is never split. Decoding the whole span keeps the spaces between its pieces,
    which a piece decoded alone loses. With stop strings: the text before the first one, and where it starts
    (else None; a tail that may still begin one is held back). -> (new text, stop position)."""
    text = decode_text(tokenizer, span)
    cut, show = stop_cut(text, stops) if stops else (None, len(text))
    if (cut is None and text.endswith("\ufffd")) or not text.startswith(shown):
        return "", cut
    return text[len(shown) : max(show, len(shown))], cut


def assemble_result(
    tokenizer: GLMTokenizer, prompt: Prompt, spans: list[Span], timings: dict[str, float]
) -> FillResult:
    """Splice each span's ids in place of its blank, drop [ENC] and the final eos, decode once. A spliced prompt
    (prompt.filled > 0) holds its first `filled` spans already: only the later ones are placed, and `tokens` is
    the last round's sequence fed (its context, then sop + span)."""
    special = tokenizer.special
    placed = spans[prompt.filled :]
    by_pos = {s.position: s.token_ids for s in placed}
    last = len(prompt.ids) - 1
    drop = {0} if prompt.ids[0] == special.get("ENC") else set()
    if prompt.ids[last] == special["eos"] and last not in by_pos:
        drop.add(last)
    cut = {s.position: s for s in placed if s.stop == "stop"}  # cut at a stop string: spliced as text
    spliced: list[int] = []
    for k, i in enumerate(prompt.ids):
        if k not in drop:
            spliced.extend([i] if k in cut else by_pos.get(k, [i]))
    tokens = list(prompt.ids)
    for s in placed:
        tokens += [special["sop"], *s.token_ids]
    text, start = decode_text(tokenizer, spliced), 0
    for position in sorted(cut):  # each such blank still reads as its own string: its span's text goes there
        span = cut[position]
        at = text.find(span.blank, start)
        text, start = text[:at] + span.text + text[at + len(span.blank) :], at + len(span.text)
    return FillResult(text, spans, tokens, timings)


def spliced_ids(tokenizer: GLMTokenizer, span: Span) -> list[int]:
    """The ids a finished span puts in place of its blank for the next round of a spliced fill: all of them, or,
    for a span cut at a stop string, the longest first ids whose text does not run past the cut."""
    if span.stop != "stop":
        return list(span.token_ids)
    keep = 0
    while keep < len(span.token_ids) and span.text.startswith(decode_text(tokenizer, span.token_ids[: keep + 1])):
        keep += 1
    return list(span.token_ids[:keep])
