"""`glmx serve --stages N`: the same server (runtime/serve.py's app, engine, metrics and API) on a pipeline session
(runtime/pipeline.py), and a watchdog that follows its stages.
In: the serve options, the stage count and a Ray address. Out: the app under uvicorn until SIGINT / SIGTERM.

The watchdog pings every stage each `every` seconds. A stage that died (found by a request or by a ping) stops
the engine: its requests fail with the PipelineError's one line (HTTP 500) and /health answers 503 with it.
Once every stage answers again (Ray restarted the actor, which reloaded its layers), the stages forget their
caches and a fresh engine starts on the same session: /health answers 200 and new requests are served.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from glm_runtime.pipeline import PipelineError, PipelineSession, connect_ray, open_pipeline
from glm_runtime.serve import DEFAULT_MAX_BODY
from glm_runtime.serve_main import model_name, run_app


class Watchdog:
    """Follows a served pipeline (see the module docstring); runs in a daemon thread until stop()."""

    def __init__(self, server: Any, every: float = 0.5, patience: float = 10.0, log: Callable[[str], None] = print):
        self.server, self.every, self.patience, self.log = server, every, patience, log
        self.retired: list[Any] = []  # engine loops stopped because a stage died
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glmx-pipeline-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def session(self) -> PipelineSession | None:
        loop = self.server.loop
        return loop.engine.session if loop is not None else None

    def check(self) -> None:
        """One round: stop the engine of a broken pipeline, restart it on one whose stages are all back."""
        self._fail_retired()
        session, loop = self.session(), self.server.loop
        if session is None or loop is None:
            return  # still loading (or it failed to: /health says why)
        if session.broken is None and session.probe(self.patience) == "died":  # a slow stage is not a dead one
            session.broken = "a pipeline stage died (Ray is restarting it); retry shortly"
        if session.broken is None:
            return
        if loop.alive:  # refuse new requests now: the engine thread ends as its next call fails
            loop.error = f"PipelineError: {session.broken}"
            loop.stop(timeout=0)
            self.log(f"glmx serve: {session.broken}")
        if loop not in self.retired:
            self.retired.append(loop)
        if session.probe(self.patience) is not None:
            return
        try:
            session.recover()
        except PipelineError as exc:
            session.broken = str(exc)
            return
        # a new engine on the same session (the load function hands it back); a failure here leaves the server
        # up and unhealthy (not stopped, as a failed first load does) for the next round to retry
        server, hook = self.server, self.server.on_load_error
        server.on_load_error, server.error = None, None
        try:
            server.start()
        finally:
            server.on_load_error = hook
        if server.loop is not loop and server.loop is not None and server.loop.alive:
            self.log("glmx serve: every pipeline stage answers again; serving")

    def _fail_retired(self) -> None:
        """A request that reached a stopped engine just as it stopped would wait there for ever: once an old engine's
        thread has ended, whatever it still holds fails with its reason (HTTP 500, one line)."""
        del self.retired[:-4]  # the last few: a request can only have reached a loop that stopped just now
        for old in self.retired:
            if old.finished:
                old.engine.fail_all(old.error or "PipelineError: a pipeline stage died")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watchdog must outlive a bad round
                self.log(f"glmx serve: pipeline watchdog: {type(exc).__name__}: {exc}")


def pipeline_loader(model, stages, address, stage_cpus: float, timeout: float, log) -> tuple[Callable, dict]:
    """The server's load function: open_pipeline once (a restart after a stage died reuses the session and its
    stages), and the dict that holds what it opened."""
    opened: dict[str, Any] = {}

    def load():
        if "model" not in opened:
            name = f"glmx-serve-{os.getpid()}"  # stage k is the actor f"{name}-stage-{k}" in namespace glmx
            opened["model"] = open_pipeline(
                model, stages, address, stage_cpus=stage_cpus, timeout=timeout, name=name, log=log
            )
        return opened["model"]

    return load, opened


def serve_stages(
    model: str | None,
    stages: int | list[int],
    address: str | None,
    host: str,
    port: int,
    rows: int,
    max_waiting: int,
    timeout: float,
    api_key: str | None,
    log: Callable[[str], None] = print,
    max_body: int = DEFAULT_MAX_BODY,
    ui: bool = True,
    stage_cpus: float = 1.0,
) -> None:
    """glm_runtime.serve_main.serve with the model cut in `stages` Ray actors (open_pipeline's address rules)."""
    load, opened = pipeline_loader(model, stages, address, stage_cpus, timeout, log)

    @contextlib.contextmanager
    def watched(app: Any) -> Iterator[None]:
        watchdog = Watchdog(app.state.glmx, log=log)
        watchdog.start()
        try:
            connect_ray(address)  # in the main thread, before run_app's signal handlers: Ray's own abort on SIGTERM
            yield
        finally:
            watchdog.stop()
            if "model" in opened:
                opened["model"][0].close()  # the stage actors end, their placement group goes
            _shutdown_ray()

    what = f"in pipeline stages {stages} on Ray ({address or 'a local Ray'})"
    run_app(load, model_name(model), what, host, port, rows, max_waiting, timeout, api_key, log, max_body, ui, watched)


def _shutdown_ray() -> None:
    """The stage actors end with this driver (they are not detached); a local Ray it started ends too."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - stopping anyway
        pass
