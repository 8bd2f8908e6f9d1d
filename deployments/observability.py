"""Metrics and logs of the serving stages on Ray: what the Serve wrappers plug into the Ray-free logic.

Metrics go to Ray's metrics endpoint through `ray.util.metrics` (Ray prefixes every name with `ray_`;
Prometheus adds `_total`, `_bucket`, ... by type):

* `maas_requests{model,version,tenant,kind,status}`: requests by how they ended (`ok`, `aborted`, an error code);
* `maas_tokens{model,version,tenant,kind}`: prompt and completion tokens of finished requests, at the ingress;
* `maas_time_to_first_token_seconds{model,version,stream}`: arrival at the ingress → first streamed piece;
* `maas_inter_token_latency_seconds{model,version}`: per streamed request, the mean gap between tokens;
* `maas_request_duration_seconds{model,version,kind}`: arrival → last byte;
* `maas_queue_wait_seconds{model,version}`: time a request waited in the engine's queue before its
  first scheduling (vLLM's own timestamps);
* billing's (`billing/metrics.py`): rejections, billed tokens and spend, ledger lag;
* vLLM's engine metrics (`vllm:*`, through its `RayPrometheusStatLogger`) when `engine.log_stats` is on.

Logs: `common.logs.setup_logging(stage)` (JSON lines with the request id, keys scrubbed).
"""

from __future__ import annotations

from ray.util import metrics

from deployments.openai.service import RequestRecord

# Seconds; spans a warm GPU's first token to a long CPU generation.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5]


class RayRequestMetrics:
    """The ingress's request metrics (implements `deployments.openai.service.RequestObserver`)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("maas_requests", "Requests by how they ended (ok, aborted, or the error code).", tag_keys=("model", "version", "tenant", "kind", "status"))
        self.tokens = metrics.Counter("maas_tokens", "Prompt and completion tokens of requests the ingress finished.", tag_keys=("model", "version", "tenant", "kind"))
        self.ttft = metrics.Histogram(
            "maas_time_to_first_token_seconds", "Arrival at the ingress to the first streamed piece (whole response when not streaming).", boundaries=LATENCY_BUCKETS, tag_keys=("model", "version", "stream")
        )
        self.itl = metrics.Histogram("maas_inter_token_latency_seconds", "Mean gap between completion tokens of a streamed request.", boundaries=ITL_BUCKETS, tag_keys=("model", "version"))
        self.duration = metrics.Histogram("maas_request_duration_seconds", "Arrival at the ingress to the end of the response.", boundaries=LATENCY_BUCKETS, tag_keys=("model", "version", "kind"))

    def finished(self, r: RequestRecord) -> None:
        version = r.version or "-"
        tenant = r.tenant or "-"
        self.requests.inc(1, tags={"model": r.model, "version": version, "tenant": tenant, "kind": r.kind, "status": r.status})
        if r.prompt_tokens:
            self.tokens.inc(r.prompt_tokens, tags={"model": r.model, "version": version, "tenant": tenant, "kind": "prompt"})
        if r.completion_tokens:
            self.tokens.inc(r.completion_tokens, tags={"model": r.model, "version": version, "tenant": tenant, "kind": "completion"})
        if r.ttft_s is not None and r.status == "ok":
            self.ttft.observe(r.ttft_s, tags={"model": r.model, "version": version, "stream": str(r.stream).lower()})
        if r.itl_s is not None:
            self.itl.observe(r.itl_s, tags={"model": r.model, "version": version})
        if r.status == "ok":
            self.duration.observe(r.duration_s, tags={"model": r.model, "version": version, "kind": r.kind})


class RayQueueMetrics:
    """The generator's queue-wait histogram for one model version."""

    def __init__(self, model: str, version: str) -> None:
        self.queue = metrics.Histogram("maas_queue_wait_seconds", "Time a request waited in the engine's queue before it was first scheduled.", boundaries=LATENCY_BUCKETS, tag_keys=("model", "version"))
        self.queue.set_default_tags({"model": model, "version": version})

    def observe(self, queue_s: float) -> None:
        self.queue.observe(queue_s)
