"""Filter plugins that are also saturation detectors.

Each says, per candidate, whether that worker is saturated. Used in a profile, the plugin is
a filter: it drops saturated candidates **unless that would drop all of them** (a saturated
worker still beats a 503; whether to refuse the request is the shedding rule's call, not
the filter's). Declared in the config at all, it also takes part in shedding: a sheddable
request (priority < 0) is refused with 429 when every candidate is saturated by some
detector (see :mod:`epp.scheduling.scheduler`).

* ``utilization-detector`` (GAIE) looks at the model server's scraped metrics.
* ``busy-detector`` (kvpick, after Dynamo's busy thresholds, specs/routing-and-disagg.md §3)
  looks at kvpick's own booked load.

Both judge each candidate ``(endpoint, dp rank)`` on its own. Dynamo calls a multi-rank
worker busy only when all its ranks are; kvpick has a separate candidate per rank, so a busy
rank is filtered out while its idle siblings stay, which is the same outcome for routing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from epp.scheduling.types import Candidate, SchedulingRequest


class Filter(ABC):
    """A filtering plugin that is also a per-candidate saturation detector."""

    type_name: str = ""

    @abstractmethod
    def saturated(self, cand: Candidate) -> bool:
        """Whether the candidate is saturated (too loaded to take more work now)."""

    def filter(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The unsaturated candidates, in order; all of them when every one is saturated.

        Never returns an empty list for a non-empty input.
        """
        kept = [c for c in candidates if not self.saturated(c)]
        return kept if kept else list(candidates)


class UtilizationDetector(Filter):
    """``utilization-detector`` (GAIE): saturation from the model server's own metrics.

    A candidate's saturation is ``max(waiting / queue_depth_threshold,
    kv_usage / kv_cache_util_threshold)``, or 1.0 when its metrics are stale (the last
    known values may be long gone, so kvpick assumes the server is at its limit). It is
    saturated when that reaches ``1 + headroom``. A candidate without any metrics source
    is never saturated: there is no information to act on.

    GAIE's ``metricsStalenessThreshold`` is accepted but unused: kvpick's scraper marks
    stale metrics itself (``EndpointMetrics.stale``, against its own staleness flag), and a
    second threshold here could only disagree with it.
    """

    type_name = "utilization-detector"

    def __init__(
        self,
        *,
        queue_depth_threshold: float = 5,
        kv_cache_util_threshold: float = 0.8,
        headroom: float = 0.0,
    ) -> None:
        if queue_depth_threshold <= 0:
            raise ValueError(f"queueDepthThreshold must be > 0, got {queue_depth_threshold}")
        if not 0 < kv_cache_util_threshold <= 1:
            raise ValueError(
                f"kvCacheUtilThreshold must be in (0, 1], got {kv_cache_util_threshold}"
            )
        if headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {headroom}")
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.headroom = headroom

    def saturation(self, cand: Candidate) -> float:
        """The candidate's saturation (0 when it has no metrics; 1.0 when they are stale)."""
        m = cand.metrics
        if m is None:
            return 0.0
        if m.stale:
            return 1.0
        return max(
            m.waiting / self.queue_depth_threshold,
            m.kv_usage / self.kv_cache_util_threshold,
        )

    def saturated(self, cand: Candidate) -> bool:
        return self.saturation(cand) >= 1.0 + self.headroom


class BusyDetector(Filter):
    """``busy-detector`` (kvpick): Dynamo's busy thresholds on kvpick's booked load.

    A candidate is busy when any set threshold is exceeded:

    * ``load.decode_blocks / metrics.num_blocks > active_decode_blocks_threshold`` (only
      when the server reports its block count);
    * ``load.prefill_tokens > active_prefill_tokens_threshold``;
    * ``load.prefill_tokens > active_prefill_tokens_threshold_frac × max_num_batched_tokens``.

    Every threshold is unset by default, and then nothing is ever busy.
    """

    type_name = "busy-detector"

    def __init__(
        self,
        *,
        active_decode_blocks_threshold: float | None = None,
        active_prefill_tokens_threshold: float | None = None,
        active_prefill_tokens_threshold_frac: float | None = None,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        for name, value in (
            ("activeDecodeBlocksThreshold", active_decode_blocks_threshold),
            ("activePrefillTokensThreshold", active_prefill_tokens_threshold),
            ("activePrefillTokensThresholdFrac", active_prefill_tokens_threshold_frac),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"maxNumBatchedTokens must be >= 1, got {max_num_batched_tokens}")
        self.active_decode_blocks_threshold = active_decode_blocks_threshold
        self.active_prefill_tokens_threshold = active_prefill_tokens_threshold
        self._prefill_limit_frac: float | None = None
        if active_prefill_tokens_threshold_frac is not None:
            if max_num_batched_tokens is None:
                raise ValueError(
                    "activePrefillTokensThresholdFrac needs maxNumBatchedTokens "
                    "(the engines' max_num_batched_tokens)"
                )
            self._prefill_limit_frac = active_prefill_tokens_threshold_frac * max_num_batched_tokens
        self.active_prefill_tokens_threshold_frac = active_prefill_tokens_threshold_frac
        self.max_num_batched_tokens = max_num_batched_tokens

    def saturated(self, cand: Candidate) -> bool:
        load = cand.load
        threshold = self.active_decode_blocks_threshold
        if threshold is not None:
            m = cand.metrics
            if m is not None and m.num_blocks and load.decode_blocks / m.num_blocks > threshold:
                return True
        threshold = self.active_prefill_tokens_threshold
        if threshold is not None and load.prefill_tokens > threshold:
            return True
        limit = self._prefill_limit_frac
        return limit is not None and load.prefill_tokens > limit
