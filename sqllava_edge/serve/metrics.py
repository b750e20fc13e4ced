"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus_client, one registry per app)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, float("inf"))


class Metrics:
    def __init__(self, live: Callable[[], dict[str, float]]):
        """live(): current values read at scrape time (queue depth, busy slots, engine counters)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sqllava_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("sqllava_prompt_tokens", "prompt positions of admitted requests (image rows "
                                     "included)", registry=self.registry)
        self.completion_tokens = Counter("sqllava_completion_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("sqllava_time_to_first_token_seconds", "from request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("sqllava_request_duration_seconds", "from request arrival to its last byte",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Live(live))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values owned by the scheduler and the engine, read when scraped."""

    GAUGES = {"queue_depth": "requests waiting for a slot", "running_requests": "requests being decoded",
              "busy_slots": "sequences decoding right now (choices of running requests)",
              "loaded": "1 once the model is loaded"}
    COUNTERS = {"vision_encodes": "images run through the vision backend",
                "image_cache_hits": "images whose embeddings came from the cache",
                "prefix_cache_hit_tokens": "prompt positions reused from the KV cache instead of prefilled",
                "prefill_positions": "positions prefilled (text tokens + image rows)",
                "decode_steps": "batched decode calls", "decode_tokens": "tokens decoded over all sequences",
                "decode_seconds": "time spent in batched decode calls (decode_tokens / this = decode throughput)",
                "prefill_seconds": "time spent encoding images and prefilling prompts",
                "cancelled_requests": "requests cancelled (client gone) or shut down",
                "timed_out_requests": "requests over the per-request timeout"}

    def __init__(self, live: Callable[[], dict[str, float]]):
        self.live = live

    def describe(self):
        return []

    def collect(self):
        values = self.live()
        for name, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"sqllava_{name}", doc, value=values.get(name, 0))
        for name, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"sqllava_{name}", doc, value=values.get(name, 0))
