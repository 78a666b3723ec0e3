"""The KV-aware cost of sending a request to a worker: the one place this formula lives.

This is Dynamo's current router cost (specs/routing-and-disagg.md §1.1), evaluated per
candidate ``(endpoint, dp rank)``; **lower is better**::

    request_blocks          = ceil(prompt_tokens / block_size)
    raw_prefill_blocks      = (active_prefill_tokens + prompt_tokens) / block_size
    excess_prefill_blocks   = max(0, active_prefill_tokens - min_prefill_tokens) / block_size
    credit_eff              = overlap_credit / (1 + credit_decay * excess_prefill_blocks
                                                    / request_blocks)
    credit_blocks           = credit_eff * device_overlap + host_credit * host_overlap
                              + disk_credit * disk_overlap + external_credit * external_overlap
    adjusted_prefill_blocks = max(0, raw_prefill_blocks - credit_blocks)
    decode_blocks           = active_decode_blocks + new_blocks
    cost                    = prefill_load_scale * adjusted_prefill_blocks + decode_blocks
                              + decode_active_request_weight * active_requests

``min_prefill_tokens`` is the smallest booked prefill load among the workers being compared,
so ``credit_decay`` > 0 trusts a cache hit less on a worker whose prefill queue is longer than
the least loaded one's.

Block counts derived from tokens (``raw_prefill_blocks``, ``excess_prefill_blocks``) are
fractions, as in Dynamo: a half-finished block of booked prefill work is half a block of cost.
Overlap and decode counts are whole blocks.

Tier credits. Dynamo credits host-memory hits at 0.75 and disk hits at 0.25 of a device hit.
kvpick's fourth tier, *external* (a remote or shared store such as LMCache or Mooncake), is
kvpick's own choice: it is weighted like disk (0.25), since fetching from a remote store costs
about as much as reading from local disk and both are far cheaper than recomputing. Dynamo's
``shared_cache_multiplier`` term plays the same role there.

Disaggregated decode. When the prefill runs on a separate prefill worker, the decode worker
receives the KV cache over NIXL and its own cached prefix saves nothing, so the decode side is
scored with every overlap credit at zero (:meth:`CostParams.without_overlap`): Dynamo's
gateway mode overrides ``overlap_score_credit`` to 0 for the decode pick. kvpick also zeroes
the host, disk and external credits there, for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from epp.scheduling.types import Candidate, SchedulingRequest


@dataclass(frozen=True, slots=True)
class CostParams:
    """The knobs of :func:`kv_cost`, with Dynamo's defaults.

    ``block_size`` converts tokens to blocks; ``None`` (the normal case) uses the request's
    own block size, which is the unit the overlap and new-block counts are already in.
    """

    overlap_credit: float = 1.0
    credit_decay: float = 0.0
    host_credit: float = 0.75
    disk_credit: float = 0.25
    external_credit: float = 0.25
    prefill_load_scale: float = 1.0
    decode_active_request_weight: float = 0.0
    block_size: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "overlap_credit",
            "credit_decay",
            "host_credit",
            "disk_credit",
            "external_credit",
            "prefill_load_scale",
            "decode_active_request_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def without_overlap(self) -> CostParams:
        """These parameters with every overlap credit (all tiers) set to zero: the decode
        side of a disaggregated request, whose prefill happens elsewhere."""
        return replace(
            self, overlap_credit=0.0, host_credit=0.0, disk_credit=0.0, external_credit=0.0
        )


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """Every term of one candidate's cost, for the decision log.

    Guarantees: ``adjusted_prefill_blocks >= 0``; ``cost`` is exactly
    ``prefill_load_scale * adjusted_prefill_blocks + decode_blocks
    + decode_active_request_weight * active_requests`` for the parameters used.
    """

    request_blocks: int
    raw_prefill_blocks: float
    credit_blocks: float
    adjusted_prefill_blocks: float
    decode_blocks: int
    cost: float


def kv_cost(
    req: SchedulingRequest,
    cand: Candidate,
    params: CostParams,
    min_prefill_tokens: int = 0,
) -> CostBreakdown:
    """The cost of sending ``req`` to ``cand`` (lower is better); see the module docstring.

    ``min_prefill_tokens`` is the least booked prefill load among the candidates compared
    with this one (only used when ``params.credit_decay`` > 0).
    """
    return CostBreakdown(*_cost_terms(req, (cand,), params, min_prefill_tokens)[0])


def kv_costs(
    req: SchedulingRequest, candidates: Sequence[Candidate], params: CostParams
) -> list[float]:
    """Every candidate's :func:`kv_cost` ``.cost``, with ``min_prefill_tokens`` taken over
    ``candidates``: the per-request scoring path, which needs only the totals."""
    if not candidates:
        return []
    min_prefill = min(c.load.prefill_tokens for c in candidates)
    return [terms[5] for terms in _cost_terms(req, candidates, params, min_prefill)]


def _cost_terms(
    req: SchedulingRequest,
    candidates: Sequence[Candidate],
    params: CostParams,
    min_prefill_tokens: int,
) -> list[tuple[int, float, float, float, int, float]]:
    """The formula itself, once for many candidates: the terms of :class:`CostBreakdown`
    in field order. Everything that depends only on the request and the parameters is
    computed once, outside the loop; this is the scheduler's hot path."""
    block_size = params.block_size or req.block_size
    prompt = req.prompt_tokens
    request_blocks = -(-prompt // block_size)
    base_credit = params.overlap_credit
    decay = params.credit_decay if request_blocks > 0 else 0.0
    decay_per_token = decay / (block_size * request_blocks) if decay > 0.0 else 0.0
    host_w, disk_w, external_w = params.host_credit, params.disk_credit, params.external_credit
    scale = params.prefill_load_scale
    request_w = params.decode_active_request_weight
    out = []
    for cand in candidates:
        load = cand.load
        prefill_tokens = load.prefill_tokens
        raw_prefill = (prefill_tokens + prompt) / block_size
        credit = base_credit
        if decay_per_token and prefill_tokens > min_prefill_tokens:
            # credit / (1 + decay * (excess_tokens / block_size) / request_blocks)
            credit = credit / (1.0 + decay_per_token * (prefill_tokens - min_prefill_tokens))
        device, host, disk, external = cand.overlap
        credit_blocks = credit * device + host_w * host + disk_w * disk + external_w * external
        adjusted = raw_prefill - credit_blocks
        if adjusted < 0.0:
            adjusted = 0.0
        decode_blocks = load.decode_blocks + cand.new_blocks
        cost = scale * adjusted + decode_blocks + request_w * load.requests
        out.append((request_blocks, raw_prefill, credit_blocks, adjusted, decode_blocks, cost))
    return out
