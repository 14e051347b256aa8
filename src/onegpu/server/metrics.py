"""Prometheus metrics: requests by outcome, queue depth, batch, tokens, latency, GPU memory."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300, 900)


class Metrics:
    """One registry per app, so that several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "onegpu_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "onegpu_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "onegpu_time_to_first_token_seconds",
            "From /process arrival to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "onegpu_prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.new_tokens = Counter(
            "onegpu_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.decode_rate = Gauge(
            "onegpu_last_tokens_per_second",
            "Generated tokens/s of the last request",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "onegpu_queue_depth", "Requests waiting for the engine", registry=self.registry
        )
        self.running = Gauge(
            "onegpu_running_requests",
            "Requests holding KV cache now, prefilling or decoding (at most onegpu_batch_rows)",
            registry=self.registry,
        )
        self.rows = Gauge(
            "onegpu_batch_rows",
            "Requests the engine runs at once (--max-batch, fewer after an out-of-memory)",
            registry=self.registry,
        )
        self.peak_running = Gauge(
            "onegpu_peak_running_requests",
            "Most requests running at once since start",
            registry=self.registry,
        )
        self.reused_tokens = Gauge(
            "onegpu_reused_prompt_tokens",
            "Prompt tokens read from the prefix cache instead of recomputed, since start",
            registry=self.registry,
        )
        self.kv_blocks = Gauge(
            "onegpu_kv_blocks",
            "KV cache blocks: total, in use by running requests, cached (named prefixes)",
            ["state"],
            registry=self.registry,
        )
        self.preemptions = Gauge(
            "onegpu_preemptions",
            "Requests preempted (KV cache full) and recomputed later, since start",
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "onegpu_gpu_memory_bytes",
            "GPU memory by kind (allocated, peak, reserved, kv_cache)",
            ["kind"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
