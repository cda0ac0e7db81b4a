"""glmx's engine behind NVIDIA Triton (KServe v2 HTTP/gRPC) with PyTriton: one EngineLoop shared by N Triton model
instances. Each instance takes one request at a time and blocks until the engine finishes it, so N clients are N
rows of the engine's continuous batch; Triton's own batching stays off (the engine already batches).

    pip install -e . nvidia-pytriton        # no torch; PyTriton ships its own Triton server and runs on a CPU
    python docs/examples/pytriton_glmx.py [--model DIR] [--rows 8] [--http-port 8000]
    curl -s localhost:8000/v2/models/glmx/infer -d '{"inputs": [{"name": "PROMPT", "shape": [1],
         "datatype": "BYTES", "data": ["The [MASK] sat on the mat."]}]}'

Inputs: PROMPT (BYTES [1]), MAX_NEW_TOKENS (INT32 [1], optional, default 32). Outputs: TEXT (BYTES [1], the filled
text), SPANS (BYTES [1], JSON: the spans as `glmx fill --json` gives them). A bad prompt answers Triton's error
with glmx's message. Tested by tests/test_serve_triton.py where PyTriton is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading

import numpy as np

from glm_runtime.engine import Engine
from glm_runtime.engine_thread import EngineLoop
from glm_runtime.requests import FillRequest
from glm_runtime.session import open_model


def make_infer(loop: EngineLoop):
    """One instance's infer function: submit each request to the shared engine and wait for its result."""

    def infer(requests):
        answers = []
        for request in requests:
            prompt = request["PROMPT"].reshape(-1)[0]
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
            budget = request.data.get("MAX_NEW_TOKENS")
            max_new = int(np.asarray(budget).reshape(-1)[0]) if budget is not None else 32
            done, box = threading.Event(), {}

            def on_event(event, box=box, done=done):
                if event.kind in ("result", "cancelled", "timeout", "failed"):
                    box["event"] = event
                    done.set()

            loop.submit(
                FillRequest.make(prompt, max_new_tokens=max_new), on_event
            )  # a bad request raises: Triton answers its error
            done.wait()
            event = box["event"]
            if event.kind != "result":
                raise RuntimeError(f"{event.kind}: {event.text}")
            spans = [dataclasses.asdict(s) for s in event.result.spans]
            answers.append(
                {
                    "TEXT": np.array([event.result.text.encode()], dtype=np.object_),
                    "SPANS": np.array([json.dumps(spans).encode()], dtype=np.object_),
                }
            )
        return answers

    return infer


def serve(
    model: str | None,
    rows: int,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run Triton with the glmx model until interrupted (or until `stop` is set, for tests)."""
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    session, tok = open_model(model)
    loop = EngineLoop(Engine(session, tok, rows=rows, max_waiting=4 * rows))
    config = TritonConfig(
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        http_address="127.0.0.1",
        grpc_address="127.0.0.1",
    )
    try:
        with Triton(config=config) as triton:
            triton.bind(
                model_name="glmx",
                infer_func=[make_infer(loop) for _ in range(rows)],
                inputs=[
                    Tensor(name="PROMPT", dtype=bytes, shape=(1,)),
                    Tensor(name="MAX_NEW_TOKENS", dtype=np.int32, shape=(1,), optional=True),
                ],
                outputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,)), Tensor(name="SPANS", dtype=bytes, shape=(1,))],
                config=ModelConfig(batching=False),
            )
            if stop is None:
                triton.serve()
            else:
                triton.run()
                if ready is not None:
                    ready.set()
                stop.wait()
    finally:
        loop.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="exported ONNX folder [default: the bundled model]")
    ap.add_argument("--rows", type=int, default=8, help="engine rows = Triton model instances")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    args = ap.parse_args()
    serve(args.model, args.rows, args.http_port, args.grpc_port, args.metrics_port)


if __name__ == "__main__":
    main()
