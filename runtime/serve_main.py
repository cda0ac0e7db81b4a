"""Running `glmx serve`: the app (runtime/serve.py's create_app) under uvicorn on its socket until SIGINT / SIGTERM,
for one ONNX Runtime / TensorRT / torch session (`serve`) or any other loader (`run_app`: glmx serve --stages'
pipeline, runtime/serve_pipeline.py, which wraps the run in its watchdog and Ray). Torch-free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

from glm_runtime.serve import DEFAULT_MAX_BODY, ServeError, create_app, listening_socket


def model_name(model: str | None) -> str:
    """The id /v1/models gives a model folder: its last path part (the bundled model: glmx-bundled)."""
    return "glmx-bundled" if model is None else str(model).rstrip("/").split("/")[-1]


def run_app(
    load: Callable[[], tuple[Any, Any]],
    model_id: str,
    what: str,
    host: str,
    port: int,
    rows: int,
    max_waiting: int,
    timeout: float,
    api_key: str | None,
    log: Callable[[str], None] = print,
    max_body: int = DEFAULT_MAX_BODY,
    ui: bool = True,
    around: Callable[[Any], contextlib.AbstractContextManager[Any]] | None = None,
) -> None:
    """Serve `load`'s model until SIGINT / SIGTERM (uvicorn stops accepting, lets running requests finish, then the
    engine drains; exit 0). what: how the start line names the model's backend. around(app): a context the run
    happens in (entered after the socket is bound, before the signal handlers). A model that does not load stops
    the server, so a supervisor sees the failure: ServeError."""
    failure: dict[str, str] = {}

    def load_failed(reason: str) -> None:
        failure["reason"] = reason
        server.should_exit = True

    app = create_app(
        load,
        model_id=model_id,
        rows=rows,
        max_waiting=max_waiting,
        timeout=timeout,
        api_key=api_key,
        max_body=max_body,
        ui=ui,
        log=log,
        on_load_error=load_failed,
    )
    import signal
    import sys

    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(timeout))
    )
    sock = listening_socket(host, port)  # before anything loads: a taken port is one clear line
    log(
        f"glmx serve: http://{host}:{port} model {model_id!r} {what}, rows {rows}, "
        f"max waiting {max_waiting}, timeout {timeout:g} s{', API key required' if api_key else ''}"
        f"{f'; the playground: open http://{host}:{port}/ in a browser' if ui else ''}"
    )
    with around(app) if around is not None else contextlib.nullcontext():

        def drained(signum, frame):  # uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown: exit 0 then
            sys.exit(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, drained)
        server.run(sockets=[sock])
    if failure:
        raise ServeError(f"the model did not load: {failure['reason']}")
    log("glmx serve: stopped")


def serve(
    model: str | None,
    backend: str,
    host: str,
    port: int,
    rows: int,
    max_waiting: int,
    timeout: float,
    api_key: str | None,
    log: Callable[[str], None] = print,
    max_body: int = DEFAULT_MAX_BODY,
    ui: bool = True,
) -> None:
    """`glmx serve` of one model folder (None: the bundled model) on `backend`, until SIGINT / SIGTERM."""
    from glm_runtime.session import open_model

    load, what = partial(open_model, model, backend), f"backend {backend}"
    run_app(load, model_name(model), what, host, port, rows, max_waiting, timeout, api_key, log, max_body, ui)
