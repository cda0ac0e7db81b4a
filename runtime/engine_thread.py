"""The engine in a thread of its own: Engine.run drives it there while other threads submit and cancel (the HTTP
handlers of glmx serve, a Triton model's infer function). In: an Engine. Out: EngineLoop, whose submit / cancel are
safe from any thread; every request's events reach it through its on_event callback."""

from __future__ import annotations

import threading
from collections.abc import Callable

from glm_runtime.engine import Engine, EngineError, Job
from glm_runtime.requests import Request, StreamEvent


class EngineLoop:
    """Drives the engine (Engine.run) in one thread; the handlers submit and cancel from theirs. When nothing is
    running or waiting the thread sleeps until a submit wakes it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.error: str | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="glmx-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_event: Callable[[StreamEvent], None]) -> Job:
        if self.error is not None:
            raise EngineError(f"the engine stopped: {self.error}")
        if self._stopping:
            raise EngineError("the server is shutting down")
        job = self.engine.submit(request, on_event=on_event)
        self._wake.set()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        self.engine.cancel(job, reason)
        self._wake.set()

    def _idle(self) -> bool:
        """Nothing to do: wait for a submit (True: go on) unless the server is stopping (False: the driver ends)."""
        if self._stopping:
            return False
        self._wake.wait(0.25)
        self._wake.clear()
        return True

    def _run(self) -> None:
        try:
            for _ in self.engine.run(idle=self._idle):  # events reach each request through its on_event
                pass
        except Exception as exc:  # noqa: BLE001 - the session died: every request ends with the reason
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self.engine.fail_all(self.error)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is running and waiting (bounded by timeout), then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        """The thread has ended (stopped, or the session failed): nothing runs the engine's requests any more."""
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None
