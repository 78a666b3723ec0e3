"""Which ``/metrics`` series each engine reports its load in, and how they become
per-rank :class:`EndpointMetrics` (specs/epp-protocol.md §11).

Engines: ``vllm``, ``sglang``, ``trtllm`` (trtllm-serve) and ``sim`` (kvpick's simulated
worker, which uses vLLM's names). Names are matched exactly; an engine name is matched
case-insensitively.

Data parallelism: an engine serving several DP ranks behind one port labels each rank's
series (vLLM ``engine="N"``, SGLang ``dp_rank="N"``). :func:`extract` gives rank N the series
labelled N; a series without the label (or with a non-numeric one) applies to every rank that
has no series of its own. This is what the reference EPP gets wrong (it keeps whichever series
is newest, GAIE #2950).

When several series compete for one field of one rank (several model names, or a
SGLang per-TP-rank series), the one with the newest timestamp wins, a sample without a
timestamp counting as newest (it means "now"), and among equals the last in the text.
For ``vllm:lora_requests_info`` the sample *value* is the time the label set was current,
so there the largest value wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from epp.datalayer.prom_text import Sample
from epp.scheduling.types import EndpointMetrics


@dataclass(frozen=True, slots=True)
class EngineNames:
    """The metric names (and labels) one engine reports its load under.

    ``cache_info`` is an info-style gauge whose labels ``cache_block_size_label`` and
    ``cache_num_blocks_label`` carry the KV block size and block count; ``block_size`` and
    ``num_blocks`` are plain gauges with the same facts (used when the info gauge is absent).
    ``rank_label`` is the label naming a series' data-parallel rank.
    """

    waiting: str
    running: str
    kv_usage: str
    rank_label: str | None = None
    lora_info: str | None = None
    cache_info: str | None = None
    cache_block_size_label: str = ""
    cache_num_blocks_label: str = ""
    block_size: str | None = None
    num_blocks: str | None = None

    @property
    def wanted(self) -> frozenset[str]:
        """Every sample name :func:`extract` reads, for :func:`prom_text.parse`."""
        names = (
            self.waiting,
            self.running,
            self.kv_usage,
            self.lora_info,
            self.cache_info,
            self.block_size,
            self.num_blocks,
        )
        return frozenset(name for name in names if name)


VLLM = EngineNames(
    waiting="vllm:num_requests_waiting",
    running="vllm:num_requests_running",
    kv_usage="vllm:kv_cache_usage_perc",
    rank_label="engine",
    lora_info="vllm:lora_requests_info",
    cache_info="vllm:cache_config_info",
    cache_block_size_label="block_size",
    cache_num_blocks_label="num_gpu_blocks",
)
SGLANG = EngineNames(
    waiting="sglang:num_queue_reqs",
    running="sglang:num_running_reqs",
    kv_usage="sglang:token_usage",
    rank_label="dp_rank",
    # GAIE's default mapping reads the info gauge; SGLang 0.5.23 only has the plain gauges.
    cache_info="sglang:cache_config_info",
    cache_block_size_label="page_size",
    cache_num_blocks_label="num_pages",
    block_size="sglang:page_size",
    num_blocks="sglang:num_pages",
)
TRTLLM = EngineNames(
    waiting="trtllm_num_requests_waiting",
    running="trtllm_num_requests_running",
    kv_usage="trtllm_kv_cache_utilization",
    block_size="trtllm_kv_cache_tokens_per_block",
    num_blocks="trtllm_kv_cache_max_blocks",
)
ENGINES: Mapping[str, EngineNames] = {
    "vllm": VLLM,
    "sglang": SGLANG,
    "trtllm": TRTLLM,
    "sim": VLLM,
}


def engine_names(engine: str) -> EngineNames:
    """The names for ``engine``; ValueError for an engine kvpick does not know."""
    try:
        return ENGINES[engine.lower()]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown engine {engine!r} (known: {known})") from None


def wanted_names(engine: str) -> frozenset[str]:
    """The sample names :func:`extract` reads for ``engine``."""
    return engine_names(engine).wanted


_ALL = -1
"""The rank key of series that carry no rank label: they apply to every rank."""


class _Series:
    """The winning sample per rank key for one metric name."""

    __slots__ = ("best",)

    def __init__(self) -> None:
        self.best: dict[int, tuple[float, int, Sample]] = {}

    def offer(self, rank: int, order: float, index: int, sample: Sample) -> None:
        current = self.best.get(rank)
        if current is None or (order, index) >= (current[0], current[1]):
            self.best[rank] = (order, index, sample)

    def for_rank(self, rank: int) -> Sample | None:
        entry = self.best.get(rank) or self.best.get(_ALL)
        return None if entry is None else entry[2]


def extract(
    engine: str,
    samples: Iterable[Sample],
    dp_size: int,
    *,
    scraped_at: float = 0.0,
    previous: Mapping[int, EndpointMetrics] | None = None,
) -> dict[int, EndpointMetrics]:
    """Map dp rank (0..dp_size-1) → :class:`EndpointMetrics` from one scrape's samples.

    A rank is in the result only when at least one of its waiting, running or KV-usage
    values is usable; a rank with none (the engine does not report it, or only garbage)
    is left out, so a caller keeps that rank's last good values. Counts that are negative,
    NaN or infinite and a non-finite KV usage are unusable; a finite KV usage is clamped to
    0..1; block size and count must be positive integers. A field that is unusable or
    absent takes its value from ``previous[rank]`` when given, else the dataclass default.
    The results carry ``scraped_at`` and ``stale=False``.
    """
    names = engine_names(engine)
    series: dict[str, _Series] = {name: _Series() for name in names.wanted}
    rank_label = names.rank_label
    lora_name = names.lora_info
    for index, sample in enumerate(samples):
        bucket = series.get(sample.name)
        if bucket is None:
            continue
        rank = _ALL
        if rank_label is not None:
            label = sample.labels.get(rank_label)
            if label is not None and label.isdecimal() and label.isascii():
                rank = int(label)
        if sample.name == lora_name:
            order = sample.value if not math.isnan(sample.value) else -math.inf
        else:
            order = math.inf if sample.timestamp is None else sample.timestamp
        bucket.offer(rank, order, index, sample)

    def value(name: str | None, rank: int) -> float | None:
        if name is None:
            return None
        sample = series[name].for_rank(rank)
        return None if sample is None else sample.value

    def label(name: str | None, key: str, rank: int) -> str | None:
        if name is None:
            return None
        sample = series[name].for_rank(rank)
        return None if sample is None else sample.labels.get(key)

    result: dict[int, EndpointMetrics] = {}
    for rank in range(dp_size):
        waiting = _count(value(names.waiting, rank))
        running = _count(value(names.running, rank))
        kv_usage = _fraction(value(names.kv_usage, rank))
        if waiting is None and running is None and kv_usage is None:
            continue
        prev = previous.get(rank) if previous is not None else None
        base = prev if prev is not None else EndpointMetrics()

        block_size = _positive_int_label(
            label(names.cache_info, names.cache_block_size_label, rank)
        )
        if block_size is None:
            block_size = _positive_int(value(names.block_size, rank))
        num_blocks = _positive_int_label(
            label(names.cache_info, names.cache_num_blocks_label, rank)
        )
        if num_blocks is None:
            num_blocks = _positive_int(value(names.num_blocks, rank))

        running_lora, waiting_lora, max_lora = base.running_lora, base.waiting_lora, base.max_lora
        lora = series[lora_name].for_rank(rank) if lora_name else None
        if lora is not None:
            running_lora = _adapters(lora.labels.get("running_lora_adapters"))
            waiting_lora = _adapters(lora.labels.get("waiting_lora_adapters"))
            max_lora = _positive_int_label(lora.labels.get("max_lora"))

        result[rank] = EndpointMetrics(
            waiting=base.waiting if waiting is None else waiting,
            running=base.running if running is None else running,
            kv_usage=base.kv_usage if kv_usage is None else kv_usage,
            block_size=base.block_size if block_size is None else block_size,
            num_blocks=base.num_blocks if num_blocks is None else num_blocks,
            running_lora=running_lora,
            waiting_lora=waiting_lora,
            max_lora=max_lora,
            scraped_at=scraped_at,
            stale=False,
        )
    return result


def _count(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return round(value)


def _fraction(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, value))


def _positive_int(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value < 1:
        return None
    return round(value)


def _positive_int_label(text: str | None) -> int | None:
    # Info gauges stringify Python values: "16", but also "None" before the cache is
    # sized; only a plain positive integer is usable.
    if text is None or not text.isascii() or not text.isdecimal():
        return None
    number = int(text)
    return number if number > 0 else None


def _adapters(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(name for name in (part.strip() for part in text.split(",")) if name)
