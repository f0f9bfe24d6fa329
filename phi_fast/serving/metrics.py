"""Prometheus metrics of one app, in a registry of its own (several apps in a process never collide).

Counted by the server: requests by route and status, prompt and generated tokens, time to first token and
inter-token latency (seen from the server: when a token's text was handed to the response). Read from the
engine at each scrape (Engine.stats through the engine loop): running and waiting requests, KV pages, prefix
cache hits, preemptions.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "phi_fast"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Engine.stats() key -> (metric name, help, kind)
_ENGINE_METRICS = {
    "running": ("num_requests_running", "requests in the running batch", "gauge"),
    "waiting": ("num_requests_waiting", "requests queued for admission", "gauge"),
    "kv_pages_used": ("kv_cache_pages_used", "KV cache pages in use (prefix cache included)", "gauge"),
    "kv_pages_total": ("kv_cache_pages_total", "KV cache pages in the pool", "gauge"),
    "peak_batch": ("peak_batch_size", "most requests one engine step has advanced together", "gauge"),
    "prefix_cache_hits": ("prefix_cache_hits", "requests that started from cached prefix pages", "counter"),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                "counter"),
    "preemptions": ("preemptions", "running requests preempted for KV pages (recomputed later)", "counter"),
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine is gone
            log.warning("metrics: engine stats unavailable", exc_info=True)
            return
        for key, (name, text, kind) in _ENGINE_METRICS.items():
            if key in stats:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(f"{PREFIX}_{name}", text, value=stats[key])


class Metrics:
    """The app's metrics; `engine_stats` is called at every scrape (from a worker thread)."""

    def __init__(self, engine_stats: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens processed (image rows included)",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "from a request's arrival to its first "
                              "text", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between a choice's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
