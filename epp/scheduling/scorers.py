"""Scorer plugins: each rates every candidate in [0, 1], higher is better.

A profile adds its scorers' ratings with weights and hands the total to its picker. Scorers
look only at the :class:`~epp.scheduling.types.Candidate` fields the director filled in
(and, for ``prefix-cache-scorer``, at its own record of past picks), so each costs
O(candidates) per request.

| type | rating |
|---|---|
| ``kv-aware-scorer`` | Dynamo's cost (:mod:`epp.scheduling.cost`), min-max, cheaper better |
| ``queue-scorer`` | min-max on the model server's waiting queue, shorter better |
| ``kv-cache-utilization-scorer`` | ``1 − kv_usage`` |
| ``running-requests-size-scorer`` | min-max on running requests, fewer better |
| ``prefix-cache-scorer`` | GAIE's approximate prefix match (:mod:`epp.scheduling.approx_prefix`) |
| ``least-loaded-scorer`` | min-max on kvpick's booked load, lighter better |
| ``lora-affinity-scorer`` | GAIE's 1.0 / 0.8 / 0.6 / 0 adapter affinity |

A candidate without model-server metrics (``metrics is None``) rates as an idle server
(nothing waiting, nothing running, an empty KV cache) for the metrics-based scorers: kvpick
has no evidence against it, and GAIE treats missing values as zero the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from epp.scheduling.approx_prefix import ApproxPrefixIndex
from epp.scheduling.cost import CostBreakdown, CostParams, kv_cost, kv_costs
from epp.scheduling.types import Candidate, SchedulingRequest, Worker


def min_max(values: Sequence[float], *, lower_is_better: bool) -> list[float]:
    """Min-max normalise ``values`` onto [0, 1], 1.0 for the best.

    ``(max − v)/(max − min)`` when lower is better, ``(v − min)/(max − min)`` otherwise;
    1.0 for every value when all are equal (nobody is worse than anybody).
    """
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    if lower_is_better:
        return [(hi - v) / span for v in values]
    return [(v - lo) / span for v in values]


class Scorer(ABC):
    """A scoring plugin. ``score`` returns one rating in [0, 1] per candidate, in order."""

    type_name: str = ""

    @abstractmethod
    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        """Rate every candidate; higher is better."""

    def score_with_costs(
        self, req: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> tuple[list[float], list[float] | None]:
        """Ratings plus, for a cost-based scorer, each candidate's cost (lower better)."""
        return self.score(req, candidates), None

    def for_decode(self) -> Scorer:
        """This scorer as used for the decode side of a disaggregated request (itself,
        unless the scorer credits cached prefixes)."""
        return self

    def after_pick(self, req: SchedulingRequest, worker: Worker) -> None:  # noqa: B027
        """Post-schedule hook: ``req`` was sent to ``worker``. Default: nothing."""

    def remove_worker(self, worker: Worker) -> None:  # noqa: B027
        """Forget any per-worker state. Default: nothing."""


class KvAwareScorer(Scorer):
    """``kv-aware-scorer``: Dynamo's KV-aware cost per candidate, min-max normalised.

    The rating is ``(max − cost)/(max − min)`` over the candidates (1.0 for all when every
    cost is equal), so with this scorer alone the best rating is the cheapest worker, and the
    picker's temperature sampling reproduces Dynamo's softmax over normalised cost.
    """

    type_name = "kv-aware-scorer"

    def __init__(self, params: CostParams | None = None) -> None:
        self.params = params if params is not None else CostParams()

    def costs(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[CostBreakdown]:
        """Every candidate's cost breakdown; the credit decay compares each candidate with
        the least prefill-loaded one among ``candidates``."""
        if not candidates:
            return []
        min_prefill = min(c.load.prefill_tokens for c in candidates)
        params = self.params
        return [kv_cost(req, c, params, min_prefill) for c in candidates]

    def score_with_costs(
        self, req: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> tuple[list[float], list[float] | None]:
        costs = kv_costs(req, candidates, self.params)
        return min_max(costs, lower_is_better=True), costs

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return self.score_with_costs(req, candidates)[0]

    def for_decode(self) -> KvAwareScorer:
        """The same scorer with every overlap credit at zero (see :mod:`epp.scheduling.cost`)."""
        return KvAwareScorer(self.params.without_overlap())


class QueueScorer(Scorer):
    """``queue-scorer`` (GAIE): ``(maxQ − q)/(maxQ − minQ)`` on the waiting queue ``q``
    from the model server's metrics; 1.0 for all when equal; no metrics counts as q = 0."""

    type_name = "queue-scorer"

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return min_max(
            [c.metrics.waiting if c.metrics is not None else 0 for c in candidates],
            lower_is_better=True,
        )


class KvCacheUtilizationScorer(Scorer):
    """``kv-cache-utilization-scorer`` (GAIE): ``1 − kv_usage`` (usage clamped to [0, 1]);
    no metrics counts as an empty cache (1.0)."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        out: list[float] = []
        for c in candidates:
            usage = c.metrics.kv_usage if c.metrics is not None else 0.0
            out.append(1.0 - min(1.0, max(0.0, usage)))
        return out


class RunningRequestsSizeScorer(Scorer):
    """``running-requests-size-scorer`` (GAIE): min-max on the model server's running
    requests, fewer better; 1.0 for all when equal; no metrics counts as 0 running."""

    type_name = "running-requests-size-scorer"

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return min_max(
            [c.metrics.running if c.metrics is not None else 0 for c in candidates],
            lower_is_better=True,
        )


class LeastLoadedScorer(Scorer):
    """``least-loaded-scorer`` (kvpick): kvpick's own booked load, lighter better.

    Candidates are ranked by booked requests, and among equal request counts by booked
    prefill tokens. The rating is the min-max normalisation (lower better) of
    ``requests + prefill_tokens / (max_prefill_tokens + 1)``: the fraction is below 1, so
    the key orders candidates exactly by ``(requests, prefill_tokens)``.
    """

    type_name = "least-loaded-scorer"

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        if not candidates:
            return []
        scale = 1.0 / (max(c.load.prefill_tokens for c in candidates) + 1)
        return min_max(
            [c.load.requests + c.load.prefill_tokens * scale for c in candidates],
            lower_is_better=True,
        )


class LoraAffinityScorer(Scorer):
    """``lora-affinity-scorer`` (GAIE), with the request's model as the adapter name.

    1.0 when the adapter is running on the server; else 0.8 when the server has room for
    another adapter (``running + waiting adapters < max_lora``); else 0.6 when the adapter
    is waiting to load there; else 0. A server that reports no LoRA limit (``max_lora`` is
    None) or no metrics has no room to offer, so it can only earn 1.0 or 0.6.
    """

    type_name = "lora-affinity-scorer"

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        adapter = req.model
        out: list[float] = []
        for c in candidates:
            m = c.metrics
            if m is None:
                out.append(0.0)
            elif adapter in m.running_lora:
                out.append(1.0)
            elif m.max_lora is not None and len(m.running_lora) + len(m.waiting_lora) < m.max_lora:
                out.append(0.8)
            elif adapter in m.waiting_lora:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


class PrefixCacheScorer(Scorer):
    """``prefix-cache-scorer`` (GAIE): the share of the request's prefix blocks that the
    approximate index says each candidate was last sent (matched / total; 0 for a prompt
    shorter than one block). After a pick, :meth:`after_pick` records the request's blocks
    for the chosen worker."""

    type_name = "prefix-cache-scorer"

    def __init__(self, index: ApproxPrefixIndex | None = None) -> None:
        self.index = index if index is not None else ApproxPrefixIndex()
        # The last request hashed and its hashes: after_pick usually follows score for the
        # same request object, so it need not hash again. Holding the request itself keeps
        # its identity from being reused by another object.
        self._last: tuple[SchedulingRequest, list[int]] | None = None

    def _hashes(self, req: SchedulingRequest) -> list[int]:
        last = self._last
        if last is not None and last[0] is req:
            return last[1]
        hashes = self.index.hashes(req)
        self._last = (req, hashes)
        return hashes

    def score(self, req: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        hashes = self._hashes(req)
        if not hashes:
            return [0.0] * len(candidates)
        matched = self.index.match(hashes, [c.worker for c in candidates])
        total = len(hashes)
        return [matched[c.worker] / total for c in candidates]

    def after_pick(self, req: SchedulingRequest, worker: Worker) -> None:
        self.index.record_hashes(self._hashes(req), worker)

    def remove_worker(self, worker: Worker) -> None:
        self.index.remove_worker(worker)
