"""glmx serve on Ray Serve: every replica is the whole `glmx serve` app (its own engine and KV rows); Ray Serve
routes requests among replicas and autoscales them on ongoing requests. No second batcher: Ray hands each
request straight to a replica, whose engine merges it into its running batch at the next decode step.
In: the same options as `glmx serve` plus replica counts. Out: a Ray Serve Application.

    one machine:  serve run glm_runtime.serve_ray:build model=/path/to/export rows=8 max_replicas=2
    a cluster:    ray start --head (then ray start --address=HEAD:6379 on each worker), and the same
                  `serve run` (or `serve deploy` of a config file naming glm_runtime.serve_ray:build) on the head

The model folder must exist at the same path on every node that hosts a replica (a shared or copied folder).
Needs the serve-ray extra: pip install 'glmx[serve-ray]'.
"""

from __future__ import annotations

from typing import Any

from glm_runtime.serve import ServeError

SERVE_RAY_EXTRA = "pip install 'glmx[serve-ray]'"


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise ServeError(f"glmx on Ray Serve needs ray[serve]: {SERVE_RAY_EXTRA}") from None
    return serve


def deployment(
    model: str | None = None,
    backend: str = "onnxruntime",
    rows: int = 8,
    max_waiting: int = 64,
    timeout: float = 600.0,
    api_key: str | None = None,
    num_replicas: int | None = None,
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_ongoing_requests: float | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Any:
    """The Ray Serve Application: `num_replicas` fixed replicas, or Ray Serve's autoscaling between min_replicas
    and max_replicas aiming at `target_ongoing_requests` per replica (default: rows, a replica's decode batch).
    Each replica takes at most rows + max_waiting requests at once (max_ongoing_requests); past that Ray queues
    them in front of the replicas, so glmx's own 429 is only reached when every replica is full."""
    serve = _serve()
    from glm_runtime.serve import create_app
    from glm_runtime.serve_main import model_name

    @serve.ingress()
    class GlmxReplica:
        """One replica: opens the model, builds the glmx serve app around its own engine."""

        def __init__(self) -> None:
            from glm_runtime.session import open_model

            self._glmx_app = create_app(
                lambda: open_model(model, backend),
                model_id=model_name(model),
                rows=rows,
                max_waiting=max_waiting,
                timeout=timeout,
                api_key=api_key,
                load_now=True,
            )
            server = self._glmx_app.state.glmx
            if server.error:
                raise ServeError(f"the replica could not open the model: {server.error}")

        def __serve_build_asgi_app__(self) -> Any:
            return self._glmx_app

        def check_health(self) -> None:
            """Ray Serve restarts a replica whose engine died."""
            loop = self._glmx_app.state.glmx.loop
            if loop is None or not loop.alive:
                raise RuntimeError(f"glmx engine stopped: {loop.error if loop else 'not loaded'}")

    options: dict[str, Any] = {
        "max_ongoing_requests": rows + max_waiting,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests or rows,
        }
    return serve.deployment(GlmxReplica, name="glmx", **options).bind()


_ARGS = {
    "model": str,
    "backend": str,
    "rows": int,
    "max_waiting": int,
    "timeout": float,
    "api_key": str,
    "num_replicas": int,
    "min_replicas": int,
    "max_replicas": int,
    "target_ongoing_requests": float,
    "num_cpus": float,
    "num_gpus": float,
}


def build(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (`serve run glm_runtime.serve_ray:build key=value ...`): the keys are
    deployment()'s arguments; values arrive as strings and are converted, an unknown key is refused."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise ServeError(f"unknown argument {unknown[0]!r}; glm_runtime.serve_ray:build takes {', '.join(_ARGS)}")
    try:
        typed = {k: _ARGS[k](v) for k, v in args.items()}
    except ValueError as exc:
        raise ServeError(f"bad argument value: {exc}") from None
    return deployment(**typed)
