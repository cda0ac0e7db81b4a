"""glmx serve's metrics for Prometheus, in a registry of their own; names follow vLLM's, with the prefix glmx:.
In: the engine after each step, each job as it ends. Out: the text GET /metrics answers."""

from __future__ import annotations

from glm_runtime.engine import Engine, Job

METRIC_NAMES = (
    "glmx:requests_total",
    "glmx:num_requests_running",
    "glmx:num_requests_waiting",
    "glmx:request_queue_time_seconds",
    "glmx:time_to_first_token_seconds",
    "glmx:time_per_output_token_seconds",
    "glmx:e2e_request_latency_seconds",
    "glmx:decode_batch_rows",
    "glmx:kv_slots_used",
    "glmx:kv_cache_usage_perc",
    "glmx:prompt_tokens_total",
    "glmx:generation_tokens_total",
)
OUTCOMES = ("finished", "cancelled", "timeout", "failed", "rejected", "invalid")  # engine endings + refused ones


class Metrics:
    """Prometheus metrics in a registry of their own (two apps in one process do not collide)."""

    def __init__(self, rows: int):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # no *_created series beside every counter and histogram
        self.registry = r = CollectorRegistry()
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("glmx:requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.running = Gauge("glmx:num_requests_running", "Requests holding a row", registry=r)
        self.waiting = Gauge("glmx:num_requests_waiting", "Requests waiting for a row", registry=r)
        self.queue_time = Histogram(
            "glmx:request_queue_time_seconds", "Submit to admission", buckets=latency, registry=r
        )
        self.ttft = Histogram(
            "glmx:time_to_first_token_seconds", "Submit to first span token", buckets=latency, registry=r
        )
        self.tpot = Histogram(
            "glmx:time_per_output_token_seconds",
            "Decode time per new token",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.e2e = Histogram("glmx:e2e_request_latency_seconds", "Submit to result", buckets=latency, registry=r)
        self.batch = Histogram(
            "glmx:decode_batch_rows",
            "Rows in each decode call",
            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, rows})),
            registry=r,
        )
        self.slots = Gauge("glmx:kv_slots_used", "KV cache slots the running requests hold", registry=r)
        self.usage = Gauge("glmx:kv_cache_usage_perc", "KV slots used / allocated (0..1)", registry=r)
        self.prompt_tokens = Counter("glmx:prompt_tokens", "Context tokens of finished requests", registry=r)
        self.generation_tokens = Counter("glmx:generation_tokens", "Span tokens generated", registry=r)

    def after_step(self, engine: Engine, rows_fed: int) -> None:
        self.running.set(len(engine.running))
        self.waiting.set(engine.waiting)
        if rows_fed:
            self.batch.observe(rows_fed)
        used = engine.slots_used()
        self.slots.set(used)
        total = engine.cache.batch * engine.cache.capacity
        self.usage.set(used / total if total else 0.0)

    def ended(self, job: Job) -> None:
        self.requests.labels(job.state).inc()
        if job.admitted_at is not None:
            self.queue_time.observe(max(job.admitted_at - job.context_s - job.submitted_at, 0.0))
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.submitted_at)
        if job.state == "finished" and job.finished_at is not None:
            self.e2e.observe(job.finished_at - job.submitted_at)
            self.prompt_tokens.inc(job.context_tokens)
            new = job.new_tokens
            self.generation_tokens.inc(new)
            if new and job.admitted_at is not None:
                self.tpot.observe((job.finished_at - job.admitted_at) / new)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
