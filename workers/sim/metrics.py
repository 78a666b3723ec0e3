"""The simulator's ``/metrics``: vLLM's metric names, read from the engines at scrape time.

Every series carries vLLM's labels ``model_name`` and ``engine`` (the data-parallel rank).
Gauges and counters are computed from the engines when scraped, so they can never drift
from the engine state; the TTFT histogram accumulates the first-token times the engines
record.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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

# kvpick's buckets for the NIXL histograms (vLLM's are not part of any contract): a few KiB
# to 16 GiB, and a sub-millisecond to a multi-second read.
XFER_BYTES_BUCKETS = tuple(float(1 << k) for k in range(12, 36, 2))
XFER_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

# vLLM's TTFT buckets (seconds).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class Histogram:
    """Counts per bucket (upper bounds, inclusive) and the sum, for one series."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def exposition(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs as :class:`HistogramMetricFamily` takes them."""
        out: list[tuple[str, float]] = []
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            cumulative += n
            out.append((str(bound), cumulative))
        out.append(("+Inf", cumulative + self.counts[-1]))
        return out


@dataclass(slots=True)
class TransferStats:
    """One rank's NIXL transfers, exposed under vLLM's NIXL metric names."""

    xfer_seconds: Histogram = field(default_factory=lambda: Histogram(XFER_SECONDS_BUCKETS))
    bytes_transferred: Histogram = field(default_factory=lambda: Histogram(XFER_BYTES_BUCKETS))
    failed_transfers: int = 0
    failed_notifications: int = 0
    expired_leases: int = 0
    loaded_tokens: int = 0  # prompt tokens that arrived over NIXL, verified


class SimCollector:
    """A Prometheus collector over the simulator's engines (one per rank)."""

    def __init__(
        self,
        engines: Sequence[Engine],
        model_name: str,
        hash_algo: str,
        transfers: Sequence[TransferStats] | None = None,
    ) -> None:
        """``transfers`` (one per engine, prefill or decode role) adds the NIXL metrics."""
        self._engines = engines
        self._model = model_name
        self._algo = hash_algo
        self._ttft = [Histogram(TTFT_BUCKETS) for _ in engines]
        self._transfers = transfers

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
            for value in stats.ttft:
                hist.add(value)
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
                if reason not in ("abort", "error"):  # vLLM counts only successes
                    success.add_metric([*lv, reason], n)
            cfg = engine.config
            info.add_metric(
                [str(cfg.block_size), "True", str(engine.rank), str(cfg.num_blocks), self._algo],
                1.0,
            )
            ttft.add_metric(lv, hist.exposition(), hist.total)
        yield from (waiting, running, usage, queries, hits, prompt, generation, preempt)
        yield from (success, info, ttft)
        if self._transfers is not None:
            yield from self._transfer_metrics(labels)

    def _transfer_metrics(self, labels: list[str]) -> Iterator[Metric]:
        assert self._transfers is not None
        seconds = HistogramMetricFamily(
            "vllm:nixl_xfer_time_seconds", "Duration of NIXL KV transfers.", labels=labels
        )
        nbytes = HistogramMetricFamily(
            "vllm:nixl_bytes_transferred", "Bytes per NIXL KV transfer.", labels=labels
        )
        failed = CounterMetricFamily(
            "vllm:nixl_num_failed_transfers",
            "NIXL KV transfers that failed or delivered unverifiable content.",
            labels=labels,
        )
        failed_notifs = CounterMetricFamily(
            "vllm:nixl_num_failed_notifications", "NIXL notifications not sent.", labels=labels
        )
        expired = CounterMetricFamily(
            "vllm:nixl_num_kv_expired_reqs",
            "Prefilled requests whose KV lease expired before a decode engine read it.",
            labels=labels,
        )
        by_source = CounterMetricFamily(
            "vllm:prompt_tokens_by_source",
            "Prompt tokens by where their KV came from.",
            labels=[*labels, "source"],
        )
        for engine, t in zip(self._engines, self._transfers, strict=True):
            lv = [self._model, str(engine.rank)]
            seconds.add_metric(lv, t.xfer_seconds.exposition(), t.xfer_seconds.total)
            nbytes.add_metric(lv, t.bytes_transferred.exposition(), t.bytes_transferred.total)
            failed.add_metric(lv, t.failed_transfers)
            failed_notifs.add_metric(lv, t.failed_notifications)
            expired.add_metric(lv, t.expired_leases)
            by_source.add_metric([*lv, "external_kv_transfer"], t.loaded_tokens)
        yield from (seconds, nbytes, failed, failed_notifs, expired, by_source)


def registry_for(collector: SimCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
