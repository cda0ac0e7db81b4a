"""The steppable blank-filling engine: requests share the rows of one KV cache, and each step is ONE decode call.
In: a session, its tokenizer, requests (a prompt with blanks and its own settings) submitted at any time.
Out: StreamEvents per step (tokens, spans, results); `fill_blanks`, `glmx fill` and `glmx serve` all run on it.

    submit() -> waiting queue --step()--> admitted into free rows: one context pass for all admitted
                                          every running row: one decode call, whatever blank / span it is in
                                          finished / cancelled rows free their row at once; rows stay packed

On a host cache the rows are packed (the running requests are rows 0..m-1: when one finishes, the last moves
into its row), so a step feeds only those m rows (a view, nothing copied). A device cache (CUDA IO binding,
TensorRT) cannot be sliced: it feeds every row, free ones a dummy that is never stored, and rows never move
(moving one would cost a copy for nothing).
Each row runs the loop of docs/glm.md 4.1 alone: its own blank, span step, budget and random generator, so a
request gives the same tokens whoever shares the batch (the rounding of a batched call is the one thing that
could differ; tests compare token ids). Beam search runs outside the pool: a beam request runs whole, on its
own cache of num_beams rows, in the step that takes it from the queue (the running rows wait that step).

Thread safety: submit() and cancel() may be called from any thread while another thread runs step().
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from glm_runtime import masks
from glm_runtime.errors import GLMXError
from glm_runtime.sampling import GenerationError, greedy, prompt_generators, sample
from glm_runtime.session import Session
from glm_runtime.steps import decode_step, run_context


ENDINGS = ("finished", "cancelled", "timeout", "failed")  # a request's last state; its last event is
# "result" (finished) or an event of the state's own name


class EngineError(GLMXError, RuntimeError):
    """The engine cannot take a request (its queue is full) or cannot run on this session (too many rows)."""


class QueueFull(EngineError):
    """Every row is busy and the waiting queue holds max_waiting requests: try again after retry_after seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)  # a request is itself: compared and hashed by identity
class Request:
    """One prompt in the engine: what it asked for, where its row is in the loop, and when things happened."""
    id: Any
    prompt: Any  # generate._Prompt: text, context ids, blanks
    settings: dict[str, Any]  # resolve_settings' output
    generator: Optional[np.random.Generator]  # sample: this request's own stream
    on_event: Optional[Callable[[Any], None]] = None
    state: str = "waiting"  # waiting -> running -> one of ENDINGS
    error: Optional[str] = None
    result: Any = None  # generate.FillResult once finished
    # progress in the loop (docs/glm.md 4.1): blank index, step t of the token fed next (sop is t = 0)
    blank: int = 0
    step: int = 0
    feed: int = 0
    flush: bool = False  # the next feed only stores a budget-ended span's last token (its logits are unused)
    span: list[int] = field(default_factory=list)
    spans: list[Any] = field(default_factory=list)
    decode_calls: int = 0
    cancel_requested: Optional[str] = None  # "cancelled" or "timeout": the row is freed at the next step
    # wall-clock times (time.perf_counter): submitted, admitted (context pass done), first token, finished
    submitted_at: float = 0.0
    context_s: float = 0.0
    admitted_at: Optional[float] = None
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.state in ENDINGS

    @property
    def mask_pos(self) -> int:
        return self.prompt.blanks[self.blank][0]

    @property
    def new_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.spans) + len(self.span)


class Engine:
    """Continuous batching over `rows` rows of one KV cache. See the module docstring.

    rows: how many requests decode together (the KV pool's batch); max_waiting: how many may wait beyond the
    rows (None = unbounded; past rows + max_waiting, submit() raises QueueFull); on_end(request) is called as each request ends
    (finished, cancelled, timeout, failed), in the thread that runs step(). A step admits waiting requests into free rows, runs
    their context pass (one call), then one decode call for every running row.
    """

    def __init__(self, session: Session, tokenizer: Any, rows: int = 8, max_waiting: Optional[int] = None,
                 on_end: Optional[Callable[[Request], None]] = None):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise EngineError(f"rows must be an integer >= 1, got {rows!r}")
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 0):
            raise EngineError(f"max_waiting must be an integer >= 0 or None, got {max_waiting!r}")
        limits = session.limits
        if limits.get("max_batch") and rows > limits["max_batch"]:
            raise EngineError(f"{rows} rows do not fit the TensorRT engine's profile (max batch "
                              f"{limits['max_batch']}): use --rows {limits['max_batch']} or rebuild the engine")
        self.session, self.tokenizer = session, tokenizer
        self.rows, self.max_waiting, self.on_end = rows, max_waiting, on_end
        self.max_positions = int(session.config.max_sequence_length)
        self.max_past = limits.get("max_past")  # TensorRT: the profiles' largest past_seq
        special = tokenizer.special
        self.sop, self.pad = special["sop"], special["pad"]
        self.stops = {special["eop"]: "eop", special["eos"]: "eos"}
        self.cache = session.new_cache(rows, 1)  # grows (geometrically) to what the admitted requests need
        self.slots: list[Optional[Request]] = [None] * rows  # slots[r]: the request holding cache row r
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0  # decode calls made
        self.decode_rows = 0  # rows fed over all decode calls (mean batch = decode_rows / steps)

    # ------------------------------------------------------------ taking requests

    def submit(self, prompt: str, *, max_new_tokens: int = 32, strategy: str = "greedy",
               append_gmask: bool = False, request_id: Any = None, on_event: Optional[Callable] = None,
               **options: Any) -> Request:
        """Check a request and queue it; it joins a row at a later step(). Raises GenerationError for a bad
        setting or a prompt too long for the model (before it takes a row), QueueFull when the queue is full."""
        from glm_runtime.generate import prepare_prompt, resolve_settings
        settings = resolve_settings(max_new_tokens, strategy, **options)
        index = next(self._ids) if request_id is None else request_id
        prepared = prepare_prompt(self.tokenizer, prompt, index, append_gmask, max_new_tokens, self.max_positions)
        if self.max_past is not None:
            need = len(prepared.ids) + len(prepared.blanks) * (1 + max_new_tokens) + 1
            if need > self.max_past:
                raise GenerationError(f"prompt {index} needs {need} cache slots but the TensorRT engine was built "
                                      f"for at most {self.max_past}: lower max_new_tokens or shorten the prompt")
        generator = prompt_generators(settings["seed"], [prompt])[0] if strategy == "sample" else None
        request = Request(index, prepared, settings, generator, on_event, feed=self.sop,
                          submitted_at=time.perf_counter())
        with self._lock:
            free = self.slots.count(None)  # waiting requests that will take a row at the next step
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"the server is busy: {len(self.running)} request(s) running on {self.rows} rows "
                                f"and {len(self._waiting)} waiting (the limit); retry later",
                                retry_after=self._retry_after())
            self._waiting.append(request)
        return request

    def _retry_after(self) -> float:
        """A rough wait until a row frees: the running requests' mean remaining budget at this engine's step rate."""
        if not self.running or not self.steps:
            return 1.0
        left = [max(r.settings["max_new_tokens"] - len(r.span), 1) for r in self.running]
        per_step = getattr(self, "_step_s", 0.05)
        return max(1.0, float(np.mean(left)) * per_step)

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """Stop a request (reason "cancelled" or "timeout"): a waiting one leaves the queue, a running one frees
        its row at the next step. A request that has ended already is left as it is."""
        if reason not in ("cancelled", "timeout"):
            raise ValueError(f"reason must be 'cancelled' or 'timeout', got {reason!r}")
        with self._lock:
            if request.cancel_requested is None:
                request.cancel_requested = reason

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> list[Request]:
        """The requests holding a row, in row order."""
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def slots_used(self) -> int:
        """KV slots the running requests hold (the cache's filled positions)."""
        return int(sum(self.cache.filled[r] for r, q in enumerate(self.slots) if q is not None))

    # ------------------------------------------------------------ one step

    def step(self) -> list[Any]:
        """Admit, run the context pass of the admitted, run one decode call for every running row; returns the
        StreamEvents of this step (each also goes to its request's on_event)."""
        events: list[Any] = []
        self._drop_cancelled(events)
        admitted, beams = self._admit()
        for request in beams:
            self._run_beam(request, events)
        if admitted:
            self._context_pass(admitted)
        if self.running:
            t0 = time.perf_counter()
            self._decode(events)
            self._step_s = time.perf_counter() - t0
        return events

    def run_until_done(self, max_steps: Optional[int] = None) -> list[Any]:
        """step() until nothing is running or waiting (at most max_steps steps); returns every event."""
        events: list[Any] = []
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work():
                break
            events += self.step()
        return events

    def fail_all(self, message: str) -> list[Request]:
        """The session failed: every running and waiting request ends as failed with `message`."""
        with self._lock:
            victims = list(self.running) + list(self._waiting)
            self._waiting.clear()
        self.slots = [None] * self.rows
        self.cache.free_rows(range(self.cache.batch))
        for request in victims:
            self._end(request, "failed", [], error=message)
        return victims

    def _emit(self, request: Request, event: Any, events: list[Any]) -> None:
        events.append(event)
        if request.on_event is not None:
            request.on_event(event)

    def _end(self, request: Request, state: str, events: list[Any], error: Optional[str] = None) -> None:
        from glm_runtime.generate import StreamEvent
        request.state, request.error, request.finished_at = state, error, time.perf_counter()
        self._emit(request, StreamEvent(state, request.id, text=error or ""), events)
        if self.on_end is not None:
            self.on_end(request)

    def _drop_cancelled(self, events: list[Any]) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancel_requested]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self._end(request, request.cancel_requested, events)
        leaving = [r for r, q in enumerate(self.slots) if q is not None and q.cancel_requested]
        for r in leaving:
            self._end(self.slots[r], self.slots[r].cancel_requested, events)
        self._free(leaving)

    def _admit(self) -> tuple[list[Request], list[Request]]:
        """Move waiting requests into free rows (FIFO); a beam request at the head runs outside the pool."""
        admitted, beams = [], []
        with self._lock:
            while self._waiting and (self._waiting[0].settings["strategy"] == "beam"
                                     or len(admitted) < self.slots.count(None)):
                request = self._waiting.popleft()
                (beams if request.settings["strategy"] == "beam" else admitted).append(request)
        return admitted, beams

    def _context_pass(self, admitted: list[Request]) -> None:
        t0 = time.perf_counter()
        rows = [r for r, q in enumerate(self.slots) if q is None][:len(admitted)]  # packed: the rows after the last
        contexts = [r.prompt.ids for r in admitted]
        need = max(len(r.prompt.ids) + len(r.prompt.blanks) * (1 + r.settings["max_new_tokens"]) for r in admitted)
        self.cache.reserve(max(need + 1, int(self.cache.filled.max()) + 1))
        out, _ = run_context(self.session, contexts, self.pad)
        self.cache.load_rows(rows, out, [len(ids) for ids in contexts])
        now = time.perf_counter()
        for row, request in zip(rows, admitted):
            request.state, request.admitted_at, request.context_s = "running", now, now - t0
            self.slots[row] = request

    def _decode(self, events: list[Any]) -> None:
        from glm_runtime.generate import Span, StreamEvent, _assemble, _decode
        slots = self.slots
        occupied = [r for r, q in enumerate(slots) if q is not None]
        width = occupied[-1] + 1 if self.cache.sliceable else self.cache.batch  # packed: width = running rows
        live = [slots[r] is not None for r in range(width)]
        tokens = [slots[r].feed if live[r] else self.pad for r in range(width)]
        mask_pos = [slots[r].mask_pos if live[r] else 0 for r in range(width)]
        step = [slots[r].step if live[r] else -1 for r in range(width)]  # free rows: a dummy at (0, 0), not stored
        logits = decode_step(self.session, self.cache, tokens, masks.decode_positions(mask_pos, step), live)
        self.steps += 1
        self.decode_rows += len(occupied)
        chosen = self._choose(logits, [r for r in occupied if not slots[r].flush])
        finished = []
        now = time.perf_counter()
        for r in occupied:
            request = slots[r]
            request.decode_calls += 1
            if request.flush:  # the budget-ended span is now wholly in the cache: on to the next blank
                request.blank, request.flush, request.feed, request.step, request.span = \
                    request.blank + 1, False, self.sop, 0, []
                continue
            token = chosen[r]
            if token not in self.stops:
                request.span.append(token)
                if request.first_token_at is None:
                    request.first_token_at = now
                self._emit(request, StreamEvent("token", request.id, request.blank, token,
                                                _decode(self.tokenizer, [token])), events)
            if token not in self.stops and len(request.span) < request.settings["max_new_tokens"]:
                request.feed, request.step = token, request.step + 1
                continue
            pos, mask_id = request.prompt.blanks[request.blank]
            span = Span(_decode(self.tokenizer, request.span), request.span, self.tokenizer.id_to_token(mask_id),
                        pos, self.stops.get(token, "length"))
            request.spans.append(span)
            self._emit(request, StreamEvent("span", request.id, request.blank, text=span.text, span=span), events)
            last = request.blank + 1 == len(request.prompt.blanks)
            if token in self.stops or last:  # every span token is in the cache (a stop token is never fed)
                request.blank, request.feed, request.step, request.span = request.blank + 1, self.sop, 0, []
                if last:
                    finished.append(r)
            else:  # budget spent: feed the last token too, so later spans see the whole span (docs/glm.md 4.1)
                request.feed, request.step, request.flush = token, len(request.span), True
        for r in finished:
            request = slots[r]
            request.result = _assemble(self.tokenizer, request.prompt, request.spans, self._timings(request))
            request.state, request.finished_at = "finished", time.perf_counter()
            self._emit(request, StreamEvent("result", request.id, text=request.result.text, result=request.result),
                       events)
            if self.on_end is not None:
                self.on_end(request)
        self._free(finished)

    def _choose(self, logits: np.ndarray, rows: list[int]) -> dict[int, int]:
        """The next token of each row in rows: greedy rows at once, sampling rows grouped by their settings."""
        groups: dict[tuple, list[int]] = {}
        for r in rows:
            s = self.slots[r].settings
            key = ("greedy",) if s["strategy"] == "greedy" else (s["temperature"], s["top_k"], s["top_p"])
            groups.setdefault(key, []).append(r)
        chosen: dict[int, int] = {}
        for key, members in groups.items():
            if key == ("greedy",):
                picked = greedy(logits[members])
            else:
                picked = sample(logits[members], [self.slots[r].generator for r in members], *key)
            chosen.update(zip(members, picked.tolist()))
        return chosen

    def _free(self, rows: list[int]) -> None:
        """Free rows. On a sliceable (host) cache keep the running rows packed: the last running row moves into
        each hole, so the next call's width shrinks. A device cache's rows stay where they are."""
        if not rows:
            return
        for r in rows:
            self.slots[r] = None
        if not self.cache.sliceable:
            self.cache.free_rows(rows)
            return
        kept = self.rows - self.slots.count(None)
        holes = [r for r in range(kept) if self.slots[r] is None]
        movers = [r for r in range(kept, self.rows) if self.slots[r] is not None]
        index = np.arange(self.cache.batch)  # row b of the cache becomes a copy of row index[b]
        for hole, mover in zip(holes, movers):
            index[hole] = mover
            self.slots[hole], self.slots[mover] = self.slots[mover], None
        self.cache.reorder(index)
        self.cache.free_rows(range(kept, self.cache.batch))

    def _timings(self, request: Request) -> dict[str, float]:
        end = time.perf_counter()
        decode = end - request.admitted_at
        new = request.new_tokens
        return {"queue_s": request.admitted_at - request.context_s - request.submitted_at,
                "context_s": request.context_s, "decode_s": decode, "total_s": end - request.submitted_at,
                "decode_steps": float(request.decode_calls), "new_tokens": float(new),
                "tokens_per_s": new / decode if decode > 0 else 0.0}

    # ------------------------------------------------------------ beam search (outside the pool)

    def _run_beam(self, request: Request, events: list[Any]) -> None:
        from glm_runtime.generate import _fill_beam
        s = request.settings
        request.state, request.admitted_at = "running", time.perf_counter()
        for event in _fill_beam(self.session, self.tokenizer, request.prompt, s["max_new_tokens"], s["num_beams"],
                                s["length_penalty"], s["early_stopping"]):
            event.prompt = request.id
            if event.kind == "token" and request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            if event.kind == "result":
                request.result = event.result
                request.result.timings["queue_s"] = request.admitted_at - request.submitted_at
                request.state, request.finished_at = "finished", time.perf_counter()
            self._emit(request, event, events)
            if event.kind == "result" and self.on_end is not None:
                self.on_end(request)
