"""glmx on Ray Serve: a local Ray instance on 127.0.0.1, two replicas of the glmx serve app, concurrent requests
each answered as one-by-one, everything shut down at the end. That test is `slow` (8-11 s here, nearly all of it
Ray starting its cluster and stopping it): `python -m pytest -q -m slow` runs it, and so does `.ci/run`."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from glm_runtime.serve import ServeError
from tests.serve_helpers import concurrently, mixed_request, one_by_one


def test_build_refuses_unknown_arguments():
    from glm_runtime.serve_ray import build

    with pytest.raises(ServeError, match="unknown argument 'replicas'"):
        build({"replicas": "2"})
    with pytest.raises(ServeError, match="bad argument value"):
        build({"rows": "many"})


@pytest.mark.slow
def test_two_replicas_answer_as_one_by_one():
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    pytest.importorskip("starlette")
    from glm_runtime.serve_ray import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # two CPUs, replicas of half a CPU each: more slots only start idle workers that compete for two cores (-3 s)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(num_replicas=2, rows=4, num_cpus=0.5), name="glmx", route_prefix="/")
        status = serve.status().applications["glmx"].deployments["glmx"]
        assert status.replica_states == {"RUNNING": 2}
        replies: dict[int, dict] = {}

        def ask(i):
            prompt, max_new = mixed_request(i)
            body = {"prompt": prompt, "max_new_tokens": max_new}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/fill", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                replies[i] = json.loads(response.read())

        concurrently(ask, 16)
        for i, alone in enumerate(one_by_one(16)):
            assert replies[i]["tokens"] == alone.tokens
    finally:  # ray.shutdown ends the local cluster, Serve's actors with it (serve.shutdown first: 3 s more)
        ray.shutdown()
