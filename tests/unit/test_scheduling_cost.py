"""The KV-aware cost (epp/scheduling/cost.py): Dynamo's worked example, every term, decay
and tier credits."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.kvindex.index import Overlap
from epp.scheduling.cost import CostParams, kv_cost, kv_costs
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.scorers import KvAwareScorer
from epp.scheduling.types import Candidate, LoadView, SchedulingRequest

NO_OVERLAP = Overlap(0)


def request(prompt_tokens: int, block_size: int = 16) -> SchedulingRequest:
    return SchedulingRequest("r", "m", prompt_tokens=prompt_tokens, block_size=block_size)


def cand(
    name: str = "w",
    *,
    overlap: Overlap = NO_OVERLAP,
    prefill: int = 0,
    decode: int = 0,
    requests: int = 0,
    new: int = 0,
) -> Candidate:
    return Candidate(
        (name, 0),
        overlap=overlap,
        load=LoadView(prefill_tokens=prefill, decode_blocks=decode, requests=requests),
        new_blocks=new,
    )


# The docs' example (specs/routing-and-disagg.md §1.2): a 10-block prompt, block size 1,
# credit 1. W1 caches 2 blocks (prefill 8, decode 10), W2 caches 5 (prefill 5, decode 5),
# W3 caches 8 (prefill 2, decode 9). The decode figures are split into active + new blocks.
WORKED = [
    cand("W1", overlap=Overlap(2), decode=4, new=6),
    cand("W2", overlap=Overlap(5), decode=0, new=5),
    cand("W3", overlap=Overlap(8), decode=7, new=2),
]


def test_worked_example_costs_18_10_11() -> None:
    req = request(10, block_size=1)
    costs = [kv_cost(req, c, CostParams()).cost for c in WORKED]
    assert costs == [18.0, 10.0, 11.0]


def test_worked_example_w2_wins() -> None:
    req = request(10, block_size=1)
    scores = KvAwareScorer().score(req, WORKED)
    assert scores == [0.0, 1.0, 0.875]
    for seed in range(20):
        picked = MaxScorePicker().pick(WORKED, scores, 1, random.Random(seed))
        assert WORKED[picked[0]].worker == ("W2", 0)


def test_every_term() -> None:
    # 40 prompt tokens = 2.5 blocks of 16 (3 counting the partial one); 24 booked prefill
    # tokens = 1.5 blocks; overlap: 1 device, 1 host, 1 disk, 1 external.
    req = request(40)
    c = cand(overlap=Overlap(1, 1, 1, 1), prefill=24, decode=5, requests=3, new=2)
    params = CostParams(prefill_load_scale=2.0, decode_active_request_weight=0.5)
    b = kv_cost(req, c, params, min_prefill_tokens=24)
    assert b.request_blocks == 3
    assert b.raw_prefill_blocks == pytest.approx(4.0)  # (24 + 40) / 16
    assert b.credit_blocks == pytest.approx(1 + 0.75 + 0.25 + 0.25)
    assert b.adjusted_prefill_blocks == pytest.approx(4.0 - 2.25)
    assert b.decode_blocks == 7
    assert b.cost == pytest.approx(2.0 * 1.75 + 7 + 0.5 * 3)


def test_adjusted_prefill_never_negative() -> None:
    b = kv_cost(request(4, block_size=1), cand(overlap=Overlap(10)), CostParams())
    assert b.raw_prefill_blocks == 4.0
    assert b.adjusted_prefill_blocks == 0.0
    assert b.cost == 0.0


def test_credit_decay_discounts_hits_on_prefill_backlog() -> None:
    # 64 prompt tokens = 4 request blocks; this worker has 32 more booked prefill tokens
    # than the least loaded one: 2 excess blocks, normalised 2/4, so credit 1/(1 + 0.5).
    req = request(64)
    c = cand(overlap=Overlap(3), prefill=32)
    params = CostParams(credit_decay=1.0)
    b = kv_cost(req, c, params, min_prefill_tokens=0)
    assert b.credit_blocks == pytest.approx(3 * (1 / 1.5))
    # No decay on the least loaded worker, nor with decay 0.
    assert kv_cost(req, c, params, min_prefill_tokens=32).credit_blocks == pytest.approx(3.0)
    assert kv_cost(req, c, CostParams(), min_prefill_tokens=0).credit_blocks == pytest.approx(3)


def test_decay_does_not_touch_lower_tiers() -> None:
    req = request(64)
    c = cand(overlap=Overlap(0, 2, 2, 2), prefill=1000)
    decayed = kv_cost(req, c, CostParams(credit_decay=5.0), min_prefill_tokens=0)
    assert decayed.credit_blocks == pytest.approx(2 * (0.75 + 0.25 + 0.25))


def test_tier_credits_rank_device_over_host_over_disk() -> None:
    req = request(160)
    costs = [
        kv_cost(req, cand(overlap=o), CostParams()).cost
        for o in (Overlap(8), Overlap(0, 8), Overlap(0, 0, 8), Overlap(0, 0, 0, 8), Overlap(0))
    ]
    assert costs[0] < costs[1] < costs[2] < costs[4]
    assert costs[3] == costs[2]  # external is weighted like disk by default
    custom = CostParams(host_credit=0.5, disk_credit=0.1, external_credit=0.05)
    b = kv_cost(req, cand(overlap=Overlap(1, 2, 3, 4)), custom)
    assert b.credit_blocks == pytest.approx(1 + 0.5 * 2 + 0.1 * 3 + 0.05 * 4)


def test_without_overlap_is_the_disaggregated_decode_variant() -> None:
    req = request(160)
    params = CostParams(overlap_credit=0.9, prefill_load_scale=3.0).without_overlap()
    assert (params.overlap_credit, params.host_credit, params.disk_credit) == (0, 0, 0)
    assert params.external_credit == 0
    assert params.prefill_load_scale == 3.0
    cached = kv_cost(req, cand(overlap=Overlap(5, 3, 2, 1)), params)
    cold = kv_cost(req, cand(), params)
    assert cached.credit_blocks == 0.0
    assert cached.cost == cold.cost


def test_explicit_block_size_overrides_the_request() -> None:
    b = kv_cost(request(64, block_size=16), cand(prefill=64), CostParams(block_size=32))
    assert b.request_blocks == 2
    assert b.raw_prefill_blocks == 4.0


@pytest.mark.parametrize(
    "kwargs",
    [{"overlap_credit": -1}, {"host_credit": -0.1}, {"prefill_load_scale": -2}, {"block_size": 0}],
)
def test_invalid_params_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CostParams(**kwargs)


counts = st.integers(min_value=0, max_value=500)


@given(
    prompt=st.integers(min_value=0, max_value=4000),
    device=counts,
    host=counts,
    prefill=st.integers(min_value=0, max_value=10_000),
    decode=counts,
    new=counts,
    requests=st.integers(min_value=0, max_value=50),
    decay=st.floats(min_value=0, max_value=10),
    scale=st.floats(min_value=0, max_value=10),
    weight=st.floats(min_value=0, max_value=10),
)
def test_cost_identity_and_monotonicity(
    prompt: int,
    device: int,
    host: int,
    prefill: int,
    decode: int,
    new: int,
    requests: int,
    decay: float,
    scale: float,
    weight: float,
) -> None:
    req = request(prompt)
    params = CostParams(
        credit_decay=decay, prefill_load_scale=scale, decode_active_request_weight=weight
    )
    c = cand(
        overlap=Overlap(device, host), prefill=prefill, decode=decode, requests=requests, new=new
    )
    b = kv_cost(req, c, params, min_prefill_tokens=0)
    assert b.adjusted_prefill_blocks >= 0
    assert b.adjusted_prefill_blocks == max(0.0, b.raw_prefill_blocks - b.credit_blocks)
    assert math.isclose(
        b.cost,
        scale * b.adjusted_prefill_blocks + b.decode_blocks + weight * requests,
        rel_tol=1e-12,
        abs_tol=1e-9,
    )
    # One more cached block never makes a worker more expensive; one more booked block of
    # decode load never makes it cheaper.
    more_cached = cand(
        overlap=Overlap(device + 1, host),
        prefill=prefill,
        decode=decode,
        requests=requests,
        new=new,
    )
    more_loaded = cand(
        overlap=Overlap(device, host),
        prefill=prefill,
        decode=decode + 1,
        requests=requests,
        new=new,
    )
    assert kv_cost(req, more_cached, params).cost <= kv_cost(req, c, params).cost + 1e-9
    assert kv_cost(req, more_loaded, params).cost >= kv_cost(req, c, params).cost


@given(
    loads=st.lists(
        st.tuples(counts, counts, st.integers(min_value=0, max_value=5000), counts, counts),
        min_size=1,
        max_size=8,
    ),
    prompt=st.integers(min_value=0, max_value=2000),
    decay=st.floats(min_value=0, max_value=5),
)
def test_batch_costs_equal_single_costs(
    loads: list[tuple[int, int, int, int, int]], prompt: int, decay: float
) -> None:
    req = request(prompt)
    params = CostParams(credit_decay=decay, decode_active_request_weight=0.5)
    cands = [
        cand(f"w{i}", overlap=Overlap(d, h), prefill=p, decode=dec, requests=dec // 3, new=n)
        for i, (d, h, p, dec, n) in enumerate(loads)
    ]
    least = min(c.load.prefill_tokens for c in cands)
    expected = [kv_cost(req, c, params, least).cost for c in cands]
    assert kv_costs(req, cands, params) == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert kv_costs(req, [], params) == []
