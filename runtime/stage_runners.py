"""Where a pipeline's stages run, as the driver (glm_runtime.pipeline) reaches them: LocalStages (objects in this
process: tests, a quick check without Ray) or RayStages (Ray actors placed by a placement group, every wait bounded,
a dead or silent stage one line: PipelineError). In: a stage worker per stage. Out: submit / wait / ping / close.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from glm_runtime.errors import GLMXError
from glm_runtime.stage_worker import StageWorker

RAY_HINT = "pip install 'glmx[serve-ray]' (ray, onnx)"


class PipelineError(GLMXError, RuntimeError):
    """A stage failed (died, timed out, or cannot be placed): the call's requests fail with this one line."""


def layer_span(start: int, stop: int) -> str:
    return f"layer {start}" if stop == start + 1 else f"layers {start}-{stop - 1}"


class LocalStages:
    """The stages as objects in this process (tests; a quick check without Ray): calls run at once."""

    def __init__(self, workers: Sequence[StageWorker]):
        self.workers = list(workers)

    def submit(self, k: int, method: str, *args: Any) -> Any:
        return getattr(self.workers[k], method)(*args)

    def wait(self, refs: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        return refs

    def ping(self, timeout: float) -> list[Any]:
        return [w.ping() for w in self.workers]


class RayStages:
    """The stages as Ray actors (handles); every wait bounded by `timeout` seconds."""

    def __init__(self, handles: Sequence[Any], ranges: Sequence[tuple[int, int]], timeout: float, group: Any = None):
        self.handles, self.ranges, self.timeout = list(handles), list(ranges), timeout
        self.group = group  # the placement group the stages are pinned by

    def submit(self, k: int, method: str, *args: Any) -> Any:
        import ray

        if not ray.is_initialized():  # a call now would start a new local Ray (Ray's auto-init): refuse instead
            raise PipelineError("Ray was shut down in this process; the pipeline's stages are gone")
        return getattr(self.handles[k], method).remote(*args)

    def wait(self, refs: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        import ray

        if not ray.is_initialized():
            raise PipelineError("Ray was shut down in this process; the pipeline's stages are gone")
        try:
            return ray.get(refs, timeout=self.timeout if timeout is None else timeout)
        except ray.exceptions.GetTimeoutError:
            raise PipelineError(f"a pipeline stage did not answer {what} within {self.timeout:g} s") from None
        except ray.exceptions.RayActorError as exc:
            stage = self._which(exc)
            raise PipelineError(
                f"pipeline stage {stage} died during {what} ({type(exc).__name__}); Ray restarts it, and the "
                f"server answers again once it has reloaded its layers"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            raise PipelineError(f"a pipeline stage failed {what}: {' '.join(str(exc.cause).split())[:300]}") from None

    def _which(self, exc: Any) -> str:
        actor = getattr(exc, "actor_id", None)
        for k, handle in enumerate(self.handles):
            if actor is not None and handle._actor_id.hex() == actor:
                return f"{k} ({layer_span(*self.ranges[k])})"
        return "?"

    def ping(self, timeout: float) -> list[Any]:
        return self.wait([h.ping.remote() for h in self.handles], "a health check", timeout)

    def close(self) -> None:
        """End the stage actors (no restart) and free their placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return  # Ray's shutdown ended them already
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


# ---------------------------------------------------------------- joining Ray and placing the stages


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at `address` (None: start a local one) unless this process has joined one already."""
    try:
        import ray
    except ImportError:
        raise PipelineError(f"pipeline stages run on Ray: {RAY_HINT}") from None
    if ray.is_initialized():
        return
    try:
        local: dict[str, Any] = {"include_dashboard": False} if address is None else {}  # new: no dashboard
        ray.init(address=address, namespace="glmx", log_to_driver=False, **local)
    except ConnectionError as exc:
        raise PipelineError(
            f"cannot join the Ray cluster at {address} ({exc}); a cluster with token authentication (Ray's "
            f"default) needs RAY_AUTH_MODE=token and its token here when --address names it (docs/pipeline.md)"
        ) from None


def ray_stages(folder, ranges, address, root, stage_cpus, timeout, load_timeout, max_restarts, name):
    try:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        raise PipelineError(f"pipeline stages run on Ray: {RAY_HINT}") from None
    connect_ray(address)
    n, split = len(ranges), [b - a for a, b in ranges]
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    strategy = "STRICT_SPREAD" if n > 1 and len(nodes) >= n else "PACK"
    group = placement_group([{"CPU": stage_cpus}] * n, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=load_timeout)
    except ray.exceptions.GetTimeoutError:
        raise PipelineError(
            f"Ray cannot place {n} stages of {stage_cpus:g} CPU each ({strategy}) within {load_timeout:g} s: the "
            f"cluster has {len(nodes)} node(s) and {ray.cluster_resources().get('CPU', 0):g} CPUs"
        ) from None
    actor = ray.remote(StageWorker)
    prefix = name or f"glmx-{uuid.uuid4().hex[:8]}"
    handles = [
        actor.options(
            name=f"{prefix}-stage-{k}",
            namespace="glmx",
            num_cpus=stage_cpus,
            max_restarts=max_restarts,
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k),
        ).remote(str(folder.resolve()), split, k, str(root.resolve()) if root else None, max(1, int(stage_cpus)))
        for k in range(n)
    ]
    runner = RayStages(handles, ranges, timeout, group)
    try:
        info = runner.wait([h.ping.remote() for h in handles], "loading its layers", load_timeout)
    except PipelineError as exc:
        raise PipelineError(f"the stages did not load: {exc}") from None
    return runner, info
