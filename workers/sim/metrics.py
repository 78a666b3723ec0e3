"""The simulator's ``/metrics``: vLLM's metric names, read from the engines at scrape time.

Every series carries vLLM's labels ``model_name`` and ``engine`` (the data-parallel rank).
Gauges and counters are computed from the engines when scraped, so they can never drift
from the engine state; the TTFT histogram accumulates the first-token times the engines
record.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from workers.sim.engine import Engine

# vLLM's TTFT buckets (seconds).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class _Ttft:
    def __init__(self) -> None:
        self.counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.total = 0.0

    def add(self, values: Sequence[float]) -> None:
        for v in values:
            self.counts[bisect.bisect_left(TTFT_BUCKETS, v)] += 1
            self.total += v


class SimCollector:
    """A Prometheus collector over the simulator's engines (one per rank)."""

    def __init__(self, engines: Sequence[Engine], model_name: str, hash_algo: str) -> None:
        self._engines = engines
        self._model = model_name
        self._algo = hash_algo
        self._ttft = [_Ttft() for _ in engines]

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting to be processed.", labels=labels
        )
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests in model execution batches.", labels=labels
        )
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", labels=labels
        )
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", labels=labels
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", labels=labels
        )
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Prefill tokens processed.", labels=labels
        )
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Generation tokens processed.", labels=labels
        )
        preempt = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative preemptions.", labels=labels
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig.",
            labels=[
                "block_size",
                "enable_prefix_caching",
                "engine",
                "num_gpu_blocks",
                "prefix_caching_hash_algo",
            ],
        )
        ttft = HistogramMetricFamily(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels=labels,
        )
        for engine, hist in zip(self._engines, self._ttft, strict=True):
            lv = [self._model, str(engine.rank)]
            stats = engine.stats
            hist.add(stats.ttft)
            stats.ttft.clear()
            waiting.add_metric(lv, engine.num_waiting)
            running.add_metric(lv, engine.num_running)
            usage.add_metric(lv, engine.cache.usage)
            queries.add_metric(lv, engine.cache.query_tokens)
            hits.add_metric(lv, engine.cache.hit_tokens)
            prompt.add_metric(lv, stats.prompt_tokens)
            generation.add_metric(lv, stats.generation_tokens)
            preempt.add_metric(lv, stats.preemptions)
            for reason, n in sorted(stats.finished.items()):
                if reason != "abort":
                    success.add_metric([*lv, reason], n)
            cfg = engine.config
            info.add_metric(
                [str(cfg.block_size), "True", str(engine.rank), str(cfg.num_blocks), self._algo],
                1.0,
            )
            cumulative = 0
            buckets = []
            for bound, n in zip((*TTFT_BUCKETS, float("inf")), hist.counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            ttft.add_metric(lv, buckets, hist.total)
        yield from (waiting, running, usage, queries, hits, prompt, generation, preempt)
        yield from (success, info, ttft)


def registry_for(collector: SimCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
