"""Prometheus metrics under vLLM's names, so existing vLLM dashboards and alerts work unchanged.

Latency histograms and token counters carry `model_name` and `adapter` ("" for the base model) labels; the
engine-wide gauges carry `model_name`. Each server has its own CollectorRegistry (several can live in one process).
"""

from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets for TTFT / inter-token latency / end-to-end latency (seconds).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)  # a base model's load, seconds
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class ServeMetrics:
    """The engine calls on_token / on_finish / set_state; the server exposes `render()` at GET /metrics."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        req = ["model_name", "adapter"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", ["model_name"], registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot", ["model_name"], registry=r)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV cache slots in use (1 = full)", ["model_name"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Arrival to first token", req, buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens",
            req,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token", req, buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", req, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", req, registry=r)
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason", req + ["finished_reason"], registry=r
        )
        # Prefix caching (vLLM's names; hit rate = hits / queries, in prompt tokens) and speculative decoding.
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", ["model_name"], registry=r
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", ["model_name"], registry=r
        )
        self.spec_draft = Counter(
            "vllm:spec_decode_num_draft_tokens", "Speculative tokens proposed", ["model_name"], registry=r
        )
        self.spec_accepted = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Speculative tokens accepted", ["model_name"], registry=r
        )
        self._prefix_seen = (0, 0)
        self.rejected = Counter(
            "slimlm:requests_rejected",
            "Requests refused before running, by HTTP status",
            ["model_name", "status"],
            registry=r,
        )
        # The model pool (serve/pool.py): base models loaded on first use and unloaded least recently used first.
        self.models_resident = Gauge("slimlm:models_resident", "Base models loaded in memory", registry=r)
        self.model_bytes = Gauge(
            "slimlm:model_resident_bytes",
            "A resident base model's weights + KV cache bytes",
            ["model_name"],
            registry=r,
        )
        self.model_loads = Counter(
            "slimlm:model_loads", "Base model loads, by outcome (ok | error)", ["model_name", "outcome"], registry=r
        )
        self.model_unloads = Counter(
            "slimlm:model_unloads", "Base models unloaded to make room (LRU evictions)", ["model_name"], registry=r
        )
        self.model_load_seconds = Histogram(
            "slimlm:model_load_seconds",
            "Seconds to load a base model and start its engine",
            ["model_name"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )

    def for_model(self, model_name: str) -> ServeMetrics:
        """The same collectors, labelled with another base model's name (one per engine of a multi-model server)."""
        view = copy.copy(self)
        view.model_name, view._prefix_seen = model_name, (0, 0)
        return view

    def on_load(self, model_name: str, seconds: float, resident_bytes: int | None, error: bool = False) -> None:
        self.model_loads.labels(model_name, "error" if error else "ok").inc()
        if not error:
            self.model_load_seconds.labels(model_name).observe(seconds)
            self.model_bytes.labels(model_name).set(resident_bytes or 0)

    def on_unload(self, model_name: str) -> None:
        self.model_unloads.labels(model_name).inc()
        self.model_bytes.labels(model_name).set(0)

    def _labels(self, req) -> dict:
        return {"model_name": self.model_name, "adapter": req.adapter.name if req.adapter is not None else ""}

    def on_token(self, req, now: float) -> None:
        """Called before req.t_first/t_last are updated for this token."""
        labels = self._labels(req)
        if req.t_first is None:
            self.ttft.labels(**labels).observe(now - req.t_arrival)
        else:
            self.itl.labels(**labels).observe(now - req.t_last)
        self.generation_tokens.labels(**labels).inc()

    def on_finish(self, req, now: float) -> None:
        labels = self._labels(req)
        self.e2e.labels(**labels).observe(now - req.t_arrival)
        if req.n_prefilled:
            self.prompt_tokens.labels(**labels).inc(req.n_prefilled)
        self.success.labels(**labels, finished_reason=req.finish_reason).inc()

    def set_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)
        self.kv_usage.labels(self.model_name).set(kv_usage)

    def set_prefix_cache(self, queries: int, hits: int) -> None:
        """The prefix cache's running totals (tokens); counters advance by the change since the last call."""
        q0, h0 = self._prefix_seen
        if queries > q0:
            self.prefix_queries.labels(self.model_name).inc(queries - q0)
        if hits > h0:
            self.prefix_hits.labels(self.model_name).inc(hits - h0)
        self._prefix_seen = (queries, hits)

    def on_speculation(self, proposed: int, accepted: int) -> None:
        self.spec_draft.labels(self.model_name).inc(proposed)
        self.spec_accepted.labels(self.model_name).inc(accepted)

    def on_rejected(self, status: int) -> None:
        self.rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
