"""Prometheus metrics: requests by outcome, queue depth, batch, tokens, latency, GPU memory.

The routes report each answer (`answered`) and failure (`failed`); the gauges are read from the
engine when /metrics is scraped (`sample`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from onegpu.engine.types import Completion
    from onegpu.engine.worker import EngineWorker

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
            "Requests holding KV cache now, prefilling or decoding (at most onegpu_batch_limit)",
            registry=self.registry,
        )
        self.batch_limit = Gauge(
            "onegpu_batch_limit",
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
        self.recomputed_tokens = Gauge(
            "onegpu_recomputed_tokens",
            "Positions computed again after a preemption, since start",
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "onegpu_gpu_memory_bytes",
            "GPU memory by kind (allocated, peak, reserved, kv_cache)",
            ["kind"],
            registry=self.registry,
        )

    def answered(self, endpoint: str, completion: Completion, seconds: float) -> None:
        """One answered request: its outcome, latency, tokens and time to its first token."""
        self.requests.labels(endpoint, "ok").inc()
        self.latency.labels(endpoint).observe(seconds)
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.new_tokens.inc(completion.new_tokens)
        if completion.first_token_seconds is not None:
            # From arrival: the wait in the queue plus the engine's time to the first token.
            self.first_token.observe(seconds - completion.seconds + completion.first_token_seconds)
        if completion.seconds > 0:
            self.decode_rate.set(completion.new_tokens / completion.seconds)

    def failed(self, endpoint: str, error: Exception) -> None:
        self.requests.labels(endpoint, type(error).__name__).inc()

    def sample(self, worker: EngineWorker) -> None:
        """Read the gauges off the engine and its queue."""
        self.queue_depth.set(worker.queued)
        stats = worker.engine.stats()
        self.running.set(stats["running"])
        self.batch_limit.set(stats["batch_limit"])
        self.peak_running.set(stats["peak_running"])
        self.reused_tokens.set(stats["reused_prompt_tokens"])
        self.preemptions.set(stats["preemptions"])
        self.recomputed_tokens.set(stats["recomputed_tokens"])
        for state in ("total", "in_use", "cached"):
            self.kv_blocks.labels(state).set(stats[f"blocks_{state}"])
        for kind, value in worker.engine.memory().items():
            self.gpu_memory.labels(kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
