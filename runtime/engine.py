"""The steppable blank-filling engine: requests share the rows of one KV cache, and each step is ONE decode call.
In: a session, its tokenizer, requests (a prompt with blanks and its own settings) submitted at any time.
Out: StreamEvents (runtime/requests.py) per step: tokens, spans, results, scores.

`Engine.run(requests)` is the one driver: `fill_blanks`, `stream_blanks`, `glmx fill` (a prompt, --stdin,
--jsonl), `score_candidates` / `classify` and the server's engine thread all reach the engine through it.

    submit() -> waiting queue --step()--> admitted into free rows: one context pass for all admitted
                                          every running row: one decode call, whatever blank / span it is in
                                          finished / cancelled rows free their row at once; rows stay packed

On a host cache the rows are packed (the running requests are rows 0..m-1: when one finishes, the last moves
into its row), so a step feeds only those m rows (a view, nothing copied). A device cache (CUDA IO binding,
TensorRT) cannot be sliced: it feeds every row, free ones a dummy that is never stored, and rows never move
(moving one would cost a copy for nothing).
Each row runs the loop of docs/glm.md 4.1 alone: its own blank, span step, budget and random generator, so a
request gives the same tokens whoever shares the batch (the rounding of a batched call is the one thing that
could differ; tests compare token ids). Whole requests run outside the pool: a beam request (runtime/beam.py,
on its own cache of num_beams rows) or a scoring request (runtime/cloze.py) runs whole in the step that takes it
from the queue (the running rows wait that step).

Thread safety: submit() and cancel() may be called from any thread while another thread runs step().
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm_runtime import masks
from glm_runtime.backend import Session
from glm_runtime.beam import fill_beam
from glm_runtime.cloze import ClozeBatch, check_scoring, score_cloze
from glm_runtime.errors import GLMXError
from glm_runtime.requests import (
    ENDINGS,
    CandidateScore,
    FillRequest,
    FillResult,
    Prompt,
    Request,
    ScoreRequest,
    Settings,
    Span,
    StreamEvent,
    assemble_result,
    decode_text,
    new_text,
    prepare_prompt,
    span_stops,
    splice_span,
    spliced_ids,
)
from glm_runtime.sampling import GenerationError, greedy, prompt_generators, sample
from glm_runtime.steps import decode_step, open_cache, run_context
from glm_runtime.tokenizer import GLMTokenizer

__all__ = ["ENDINGS", "Engine", "EngineError", "Job", "QueueFull"]


class EngineError(GLMXError, RuntimeError):
    """The engine cannot take a request (its queue is full) or cannot run on this session (too many rows)."""


class QueueFull(EngineError):
    """Every row is busy and the waiting queue holds max_waiting requests: try again after retry_after seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)  # a job is itself: compared and hashed by identity
class Job:
    """One request in the engine: what it asked, where its row is in the loop, and when things happened.
    A fill has its prompt; a scoring request its checked batch (cloze); both run whole when `whole`."""

    id: Any
    request: Request
    settings: Settings
    prompt: Prompt | None = None  # a fill's context ids and blanks
    cloze: ClozeBatch | None = None  # a scoring request, checked
    generator: np.random.Generator | None = None  # sample: this request's own stream
    on_event: Callable[[StreamEvent], None] | None = None
    state: str = "waiting"  # waiting -> running -> one of ENDINGS
    error: str | None = None
    result: FillResult | None = None
    scores: list[list[CandidateScore]] | None = None
    # progress in the loop (docs/glm.md 4.1): blank index, step t of the token fed next (sop is t = 0)
    blank: int = 0
    step: int = 0
    feed: int = 0
    flush: bool = False  # the next feed only stores a budget-ended span's last token (its logits are unused)
    span: list[int] = field(default_factory=list)
    shown: str = ""  # the span's text the stream has shown (runtime.requests.new_text)
    spans: list[Span] = field(default_factory=list)
    decode_calls: int = 0
    cancel_requested: str | None = None  # "cancelled" or "timeout": the row is freed at the next step
    # wall-clock times (time.perf_counter): submitted, admitted (context pass done), first token, finished
    submitted_at: float = 0.0
    context_s: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ENDINGS

    @property
    def whole(self) -> bool:
        """Runs outside the pool, whole, in the step that takes it: beam search and scoring."""
        return self.cloze is not None or self.settings.strategy == "beam"

    @property
    def context_tokens(self) -> int:
        if self.prompt is not None:
            return len(self.prompt.ids)
        return sum(len(ids) for ids in self.cloze.contexts) if self.cloze is not None else 0

    @property
    def mask_pos(self) -> int:
        assert self.prompt is not None
        return self.prompt.blanks[self.blank][0]

    @property
    def count_from(self) -> int:
        """Row 0 of this blank's sop when its span counts up (GLM-130B's [gMASK]), else -1 (masks.decode_positions)."""
        assert self.prompt is not None
        return self.prompt.count_from(self.blank)

    @property
    def new_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.spans) + len(self.span)


class Engine:
    """Continuous batching over `rows` rows of one KV cache. See the module docstring.

    rows: how many requests decode together (the KV pool's batch); max_waiting: how many may wait beyond the
    rows (None = unbounded; past rows + max_waiting, submit() raises QueueFull); max_beams: the most beams a
    request may ask for (a beam request runs on a cache of num_beams rows of its own; None = unbounded);
    on_end(job) is called as each request ends (finished, cancelled, timeout, failed) and on_step(engine, rows
    fed) after each step, in the thread that runs the engine. A step admits waiting requests into free rows,
    runs their context pass (one call), then one decode call for every running row.
    """

    def __init__(
        self,
        session: Session,
        tokenizer: GLMTokenizer,
        rows: int = 8,
        max_waiting: int | None = None,
        max_beams: int | None = None,
        on_end: Callable[[Job], None] | None = None,
        on_step: Callable[[Engine, int], None] | None = None,
    ):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise EngineError(f"rows must be an integer >= 1, got {rows!r}")
        if max_waiting is not None and (
            isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0
        ):
            raise EngineError(f"max_waiting must be an integer >= 0 or None, got {max_waiting!r}")
        limits = session.limits
        if limits.get("max_batch") and rows > limits["max_batch"]:
            raise EngineError(
                f"{rows} rows do not fit the TensorRT engine's profile (max batch "
                f"{limits['max_batch']}): use --rows {limits['max_batch']} or rebuild the engine"
            )
        self.session, self.tokenizer = session, tokenizer
        self.rows, self.max_waiting, self.on_end, self.on_step = rows, max_waiting, on_end, on_step
        self.max_beams = max_beams  # a beam request's num_beams rows of cache; None = unbounded
        self.max_positions = int(session.config.max_sequence_length)
        self.max_past = limits.get("max_past")  # TensorRT: the profiles' largest past_seq
        special = tokenizer.special
        self.sop, self.pad = special["sop"], special["pad"]
        self.stops = span_stops(tokenizer)
        # GLM-130B (PromptRule.blanks "spliced"): a finished span is written into the context in place of its
        # blank, and the job goes back to the head of the queue for a new context pass before its next blank
        self.spliced = tokenizer.prompt.blanks == "spliced"
        # grows (geometrically) to what the admitted requests need; a P-tuning prefix fills every row's first slots
        self.cache = open_cache(session, rows, 1)
        self.slots: list[Job | None] = [None] * rows  # slots[r]: the job holding cache row r
        self._waiting: deque[Job] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._step_s = 0.05  # the last decode call's time (a guess until one ran)
        self.steps = 0  # decode calls made
        self.decode_rows = 0  # rows fed over all decode calls (mean batch = decode_rows / steps)

    # ------------------------------------------------------------ the driver

    def run(
        self,
        requests: Iterable[Request] = (),
        *,
        lookahead: int | None = None,
        on_refused: Callable[[Request, GLMXError], None] | None = None,
        idle: Callable[[], bool] | None = None,
    ) -> Iterator[StreamEvent]:
        """Submit `requests` and step until every request has ended, yielding every event as it comes.

        lookahead: None submits every request before the first step (a bad one is refused before any work); n
        keeps at most n waiting and reads the next requests as rows free (memory follows the rows, not the input).
        on_refused(request, error): a request the engine refuses is reported there and the rest go on (default:
        the error is raised). idle(): called when nothing runs, waits or is left to read; True means more may
        come (other threads submit: the server) and the driver goes on, False ends it.
        """
        source = iter(requests)
        more = True
        while True:
            while more and (lookahead is None or self.waiting < lookahead):
                request = next(source, None)
                if request is None:
                    more = False
                    break
                try:
                    self.submit(request)
                except GLMXError as exc:  # a bad setting or prompt, a scoring request's ScoreError, a full queue
                    if on_refused is None:
                        raise
                    on_refused(request, exc)
            if self.has_work():
                yield from self.step()
            elif not more and (idle is None or not idle()):
                return

    # ------------------------------------------------------------ taking requests

    def submit(self, request: Request, on_event: Callable[[StreamEvent], None] | None = None) -> Job:
        """Check a request and queue it; it joins a row at a later step(). Raises GenerationError (ScoreError for
        a scoring request) for a bad setting or a prompt too long for the model, before it takes a row, and
        QueueFull when the queue is full. The job's id is the request's, or the next number."""
        job_id = next(self._ids) if request.id is None else request.id
        if isinstance(request, ScoreRequest):
            job = Job(job_id, request, Settings(), cloze=check_scoring(self.tokenizer, request, self.max_positions))
        else:
            job = self._fill_job(job_id, request)
        job.on_event, job.submitted_at = on_event, time.perf_counter()
        with self._lock:
            free = self.slots.count(None)  # waiting requests that will take a row at the next step
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(
                    f"the server is busy: {len(self.running)} request(s) running on {self.rows} rows "
                    f"and {len(self._waiting)} waiting (the limit); retry later",
                    retry_after=self._retry_after(),
                )
            self._waiting.append(job)
        return job

    def _fill_job(self, job_id: Any, request: FillRequest) -> Job:
        settings = request.settings
        if settings.strategy == "beam" and self.max_beams is not None and settings.num_beams > self.max_beams:
            raise GenerationError(
                f" {settings.num_beams} is more than this engine's {self.max_beams} rows (each beam is a row of "
                f"cache); ask for at most {self.max_beams}",
                field="num_beams",
            )
        budget = settings.max_new_tokens
        prompt = prepare_prompt(
            self.tokenizer, request.prompt, job_id, request.append_gmask, budget, self.max_positions
        )
        if self.max_past is not None:
            need = self.cache.prefix_slots + prompt.positions_needed(budget) + 1  # a P-tuning prefix's slots too
            if need > self.max_past:
                raise GenerationError(
                    f" needs {need} cache slots but the TensorRT engine was built for at most "
                    f"{self.max_past}: lower max_new_tokens or shorten the prompt",
                    field="prompt",
                    subject=f"prompt {job_id}",
                )
        generator = prompt_generators(settings.seed, [request.prompt])[0] if settings.strategy == "sample" else None
        return Job(job_id, request, settings, prompt=prompt, generator=generator, feed=self.sop)

    def _retry_after(self) -> float:
        """A rough wait until a row frees: the running requests' mean remaining budget at this engine's step rate."""
        if not self.running or not self.steps:
            return 1.0
        left = [max(j.settings.max_new_tokens - len(j.span), 1) for j in self.running]
        return max(1.0, float(np.mean(left)) * self._step_s)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop a request (reason "cancelled" or "timeout"): a waiting one leaves the queue, a running one frees
        its row at the next step. A request that has ended already is left as it is."""
        if reason not in ("cancelled", "timeout"):
            raise ValueError(f"reason must be 'cancelled' or 'timeout', got {reason!r}")
        with self._lock:
            if job.cancel_requested is None:
                job.cancel_requested = reason

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> list[Job]:
        """The jobs holding a row, in row order."""
        return [j for j in self.slots if j is not None]

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def slots_used(self) -> int:
        """KV slots the running requests hold (the cache's filled positions)."""
        return int(sum(self.cache.filled[r] for r, j in enumerate(self.slots) if j is not None))

    # ------------------------------------------------------------ one step

    def step(self) -> list[StreamEvent]:
        """Admit, run the context pass of the admitted, run one decode call for every running row; returns the
        events of this step (each also goes to its job's on_event)."""
        events: list[StreamEvent] = []
        rows_before = self.decode_rows
        self._drop_cancelled(events)
        admitted, whole = self._admit()
        for job in whole:
            self._run_whole(job, events)
        if admitted:
            self._context_pass(admitted)
        if self.running:
            t0 = time.perf_counter()
            self._decode(events)
            self._step_s = time.perf_counter() - t0
        if self.on_step is not None:
            self.on_step(self, self.decode_rows - rows_before)
        return events

    def run_until_done(self, max_steps: int | None = None) -> list[StreamEvent]:
        """step() until nothing is running or waiting (at most max_steps steps); returns every event."""
        events: list[StreamEvent] = []
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work():
                break
            events += self.step()
        return events

    def fail_all(self, message: str) -> list[Job]:
        """The session failed: every running and waiting request ends as failed with `message`."""
        with self._lock:
            victims = list(self.running) + list(self._waiting)
            self._waiting.clear()
        self.slots = [None] * self.rows
        self.cache.free_rows(range(self.cache.batch))
        for job in victims:
            self._end(job, "failed", [], error=message)
        return victims

    def _emit(self, job: Job, event: StreamEvent, events: list[StreamEvent]) -> None:
        events.append(event)
        if job.on_event is not None:
            job.on_event(event)

    def _end(self, job: Job, state: str, events: list[StreamEvent], error: str | None = None) -> None:
        job.state, job.error, job.finished_at = state, error, time.perf_counter()
        if state == "finished":
            if job.scores is not None:
                event = StreamEvent("scores", job.id, scores=job.scores)
            else:
                assert job.result is not None
                event = StreamEvent("result", job.id, text=job.result.text, result=job.result)
        else:
            event = StreamEvent(state, job.id, text=error or "")
        self._emit(job, event, events)
        if self.on_end is not None:
            self.on_end(job)

    def _drop_cancelled(self, events: list[StreamEvent]) -> None:
        with self._lock:
            gone = [j for j in self._waiting if j.cancel_requested]
            for job in gone:
                self._waiting.remove(job)
        leaving = [r for r, j in enumerate(self.slots) if j is not None and j.cancel_requested]
        for job in gone + [j for r in leaving if (j := self.slots[r]) is not None]:
            assert job.cancel_requested is not None
            self._end(job, job.cancel_requested, events)
        self._free(leaving)

    def _admit(self) -> tuple[list[Job], list[Job]]:
        """Move waiting jobs into free rows (FIFO); a whole job (beam, scoring) at the head runs outside the pool."""
        admitted: list[Job] = []
        whole: list[Job] = []
        with self._lock:
            while self._waiting and (self._waiting[0].whole or len(admitted) < self.slots.count(None)):
                job = self._waiting.popleft()
                (whole if job.whole else admitted).append(job)
        return admitted, whole

    def _context_pass(self, admitted: list[Job]) -> None:
        t0 = time.perf_counter()
        rows = [r for r, j in enumerate(self.slots) if j is None][: len(admitted)]  # packed: the rows after the last
        for row, job in zip(rows, admitted):  # held before the session runs: if it fails, fail_all ends these too
            self.slots[row] = job
        prompts = [j.prompt for j in admitted if j.prompt is not None]
        contexts = [p.ids for p in prompts]
        need = max(p.positions_needed(j.settings.max_new_tokens) for p, j in zip(prompts, admitted))
        self.cache.reserve(max(self.cache.prefix_slots + need + 1, int(self.cache.filled.max()) + 1))
        out, _ = run_context(self.session, contexts, self.pad)
        self.cache.load_rows(rows, out, [len(ids) for ids in contexts])
        now = time.perf_counter()
        for job in admitted:
            if job.admitted_at is None:  # a spliced fill's later context passes keep its first admission's times
                job.admitted_at, job.context_s = now, now - t0
            job.state = "running"

    def _decode(self, events: list[StreamEvent]) -> None:
        slots = self.slots
        occupied = [r for r, j in enumerate(slots) if j is not None]
        width = occupied[-1] + 1 if self.cache.sliceable else self.cache.batch  # packed: width = running rows
        live = [slots[r] is not None for r in range(width)]
        running = {r: j for r, j in enumerate(slots[:width]) if j is not None}
        tokens = [running[r].feed if r in running else self.pad for r in range(width)]
        mask_pos = [running[r].mask_pos if r in running else 0 for r in range(width)]
        step = [running[r].step if r in running else -1 for r in range(width)]  # free rows: a dummy, not stored
        origin = [running[r].count_from if r in running else -1 for r in range(width)]
        positions = masks.decode_positions(mask_pos, step, origin)
        logits = decode_step(self.session, self.cache, tokens, positions, live)
        self.steps += 1
        self.decode_rows += len(occupied)
        chosen = self._choose(logits, [r for r in occupied if not running[r].flush])
        now = time.perf_counter()
        finished = [r for r in occupied if self._advance(running[r], chosen.get(r, -1), now, events)]
        again = [running[r] for r in finished if running[r].state == "waiting"]  # spliced: its next context pass
        with self._lock:
            self._waiting.extendleft(reversed(again))
        for r in finished:
            job = running[r]
            if job.state == "waiting":
                continue
            assert job.prompt is not None and job.admitted_at is not None
            job.result = assemble_result(self.tokenizer, job.prompt, job.spans, self._timings(job))
            self._end(job, "finished", events)
        self._free(finished)

    def _advance(self, job: Job, token: int, now: float, events: list[StreamEvent]) -> bool:
        """One decode call's outcome for one row: store the chosen token, end the span or the blank; True when
        the job's last blank is done. A flushing row's token is unused (-1)."""
        assert job.prompt is not None
        job.decode_calls += 1
        if job.flush:  # flushed: the budget-ended span is now wholly in the cache; on to the next blank
            job.blank, job.flush, job.feed, job.step, job.span, job.shown = job.blank + 1, False, self.sop, 0, [], ""
            return False
        cut = None  # where a stop string starts in the span's text
        if token not in self.stops:
            job.span.append(token)
            if job.first_token_at is None:
                job.first_token_at = now
            text, cut = new_text(self.tokenizer, job.span, job.shown, job.settings.stop)
            job.shown += text
            self._emit(job, StreamEvent("token", job.id, job.blank, token, text), events)
            if cut is None and len(job.span) < job.settings.max_new_tokens:
                job.feed, job.step = token, job.step + 1
                return False
        pos, mask_id = job.prompt.blanks[job.blank]
        span = Span(
            decode_text(self.tokenizer, job.span)[:cut],
            job.span,
            self.tokenizer.id_to_token(mask_id),
            pos,
            "stop" if cut is not None else self.stops.get(token, "length"),
        )
        job.spans.append(span)
        rest = span.text[len(job.shown) :] if span.text.startswith(job.shown) else ""
        self._emit(job, StreamEvent("span", job.id, job.blank, text=span.text, rest=rest, span=span), events)
        last = job.blank + 1 == len(job.prompt.blanks)
        if self.spliced and not last:  # the row is freed; the job waits at the queue's head for its new context
            job.prompt = splice_span(job.prompt, job.blank, spliced_ids(self.tokenizer, span))
            job.blank, job.feed, job.step, job.span, job.shown = job.blank + 1, self.sop, 0, [], ""
            job.state = "waiting"
            return True
        if token in self.stops or last:  # every span token is in the cache (a stop token is never fed)
            job.blank, job.feed, job.step, job.span, job.shown = job.blank + 1, self.sop, 0, [], ""
            return last
        job.feed, job.step, job.flush = token, len(job.span), True  # feed the last token too (docs/glm.md 4.1)
        return False

    def _choose(self, logits: np.ndarray, rows: list[int]) -> dict[int, int]:
        """The next token of each row in rows: greedy rows at once, sampling rows grouped by their settings."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for r in rows:
            job = self.slots[r]
            assert job is not None
            s = job.settings
            key = ("greedy",) if s.strategy == "greedy" else (s.temperature, s.top_k, s.top_p)
            groups.setdefault(key, []).append(r)
        chosen: dict[int, int] = {}
        for key, members in groups.items():
            if key == ("greedy",):
                picked = greedy(logits[members])
            else:
                generators = [job.generator for job in (self.slots[r] for r in members) if job is not None]
                picked = sample(logits[members], generators, *key)
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

    def _timings(self, job: Job) -> dict[str, float]:
        assert job.admitted_at is not None
        end = time.perf_counter()
        decode = end - job.admitted_at
        new = job.new_tokens
        return {
            "queue_s": job.admitted_at - job.context_s - job.submitted_at,
            "context_s": job.context_s,
            "decode_s": decode,
            "total_s": end - job.submitted_at,
            "decode_steps": job.decode_calls,  # counts stay integers in --json
            "new_tokens": new,
            "tokens_per_s": new / decode if decode > 0 else 0.0,
        }

    # ------------------------------------------------------------ whole requests (outside the pool)

    def _run_whole(self, job: Job, events: list[StreamEvent]) -> None:
        """A beam or scoring request, whole: its events carry its id; it ends finished like a pooled one."""
        job.state, job.admitted_at = "running", time.perf_counter()
        if job.cloze is not None:
            job.scores = score_cloze(self.session, self.tokenizer, job.cloze)
            self._end(job, "finished", events)
            return
        assert job.prompt is not None
        for event in fill_beam(self.session, self.tokenizer, job.prompt, job.settings):
            event.prompt = job.id
            if event.kind == "token" and job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            if event.kind == "span" and event.span is not None:
                job.spans.append(event.span)
            if event.kind == "result":
                assert event.result is not None
                job.result = event.result
                job.result.timings["queue_s"] = job.admitted_at - job.submitted_at
                self._end(job, "finished", events)
                continue
            self._emit(job, event, events)
