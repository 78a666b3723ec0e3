"""Scorers, pickers, filters and the approximate prefix index of epp/scheduling."""

from __future__ import annotations

import math
import random
import struct
from collections import Counter, OrderedDict

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.kvindex.index import Overlap
from epp.scheduling.approx_prefix import ApproxPrefixIndex, prefix_hashes
from epp.scheduling.cost import CostParams
from epp.scheduling.filters import BusyDetector, UtilizationDetector
from epp.scheduling.pickers import (
    MaxScorePicker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from epp.scheduling.scorers import (
    KvAwareScorer,
    KvCacheUtilizationScorer,
    LeastLoadedScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsSizeScorer,
    min_max,
)
from epp.scheduling.types import (
    Candidate,
    EndpointMetrics,
    LoadView,
    SchedulingRequest,
)


def cand(name: str, rank: int = 0, **kw: object) -> Candidate:
    return Candidate((name, rank), **kw)  # type: ignore[arg-type]


def metrics(**kw: object) -> EndpointMetrics:
    return EndpointMetrics(**kw)  # type: ignore[arg-type]


REQ = SchedulingRequest("r", "m", prompt_tokens=64)


# --- normalisation and metric scorers ---------------------------------------------------


def test_min_max() -> None:
    assert min_max([3, 1, 2], lower_is_better=True) == [0.0, 1.0, 0.5]
    assert min_max([3, 1, 2], lower_is_better=False) == [1.0, 0.0, 0.5]
    assert min_max([7, 7], lower_is_better=True) == [1.0, 1.0]
    assert min_max([], lower_is_better=True) == []


def test_queue_scorer() -> None:
    cands = [
        cand("a", metrics=metrics(waiting=10)),
        cand("b", metrics=metrics(waiting=5)),
        cand("c", metrics=metrics(waiting=20)),
        cand("d"),  # no metrics: counts as an empty queue
    ]
    assert QueueScorer().score(REQ, cands) == [0.5, 0.75, 0.0, 1.0]
    same = [cand("a", metrics=metrics(waiting=3)), cand("b", metrics=metrics(waiting=3))]
    assert QueueScorer().score(REQ, same) == [1.0, 1.0]


def test_kv_cache_utilization_scorer() -> None:
    cands = [
        cand("a", metrics=metrics(kv_usage=0.25)),
        cand("b", metrics=metrics(kv_usage=1.4)),
        cand("c"),
    ]
    assert KvCacheUtilizationScorer().score(REQ, cands) == [0.75, 0.0, 1.0]


def test_running_requests_size_scorer() -> None:
    cands = [cand(n, metrics=metrics(running=r)) for n, r in (("a", 4), ("b", 0), ("c", 8))]
    assert RunningRequestsSizeScorer().score(REQ, cands) == [0.5, 1.0, 0.0]


def test_least_loaded_prefers_fewer_requests_then_fewer_prefill_tokens() -> None:
    cands = [
        cand("a", load=LoadView(prefill_tokens=0, requests=3)),
        cand("b", load=LoadView(prefill_tokens=900, requests=1)),
        cand("c", load=LoadView(prefill_tokens=100, requests=1)),
    ]
    scores = LeastLoadedScorer().score(REQ, cands)
    assert scores[2] == 1.0 and scores[0] == 0.0
    assert scores[2] > scores[1] > scores[0]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5000)), min_size=1, max_size=12))
def test_least_loaded_orders_lexicographically(loads: list[tuple[int, int]]) -> None:
    cands = [
        cand(f"w{i}", load=LoadView(prefill_tokens=p, requests=r)) for i, (r, p) in enumerate(loads)
    ]
    scores = LeastLoadedScorer().score(REQ, cands)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for i, a in enumerate(loads):
        for j, b in enumerate(loads):
            if a < b:
                assert scores[i] > scores[j]
            elif a == b:
                assert scores[i] == scores[j]


def test_lora_affinity_scorer() -> None:
    req = SchedulingRequest("r", "sql-lora")
    cands = [
        cand("active", metrics=metrics(running_lora=("sql-lora",), max_lora=2)),
        cand("room", metrics=metrics(running_lora=("x",), max_lora=2)),
        cand(
            "waiting", metrics=metrics(running_lora=("x",), waiting_lora=("sql-lora",), max_lora=2)
        ),
        cand("full", metrics=metrics(running_lora=("x", "y"), max_lora=2)),
        cand("no-limit", metrics=metrics()),
        cand("no-metrics"),
    ]
    assert LoraAffinityScorer().score(req, cands) == [1.0, 0.8, 0.6, 0.0, 0.0, 0.0]


def test_kv_aware_scorer_fills_costs() -> None:
    req = SchedulingRequest("r", "m", prompt_tokens=10, block_size=1)
    cands = [cand("a", overlap=Overlap(5), new_blocks=5), cand("b", new_blocks=10)]
    scores, costs = KvAwareScorer().score_with_costs(req, cands)
    assert costs == [10.0, 20.0]
    assert scores == [1.0, 0.0]
    _, decode_costs = KvAwareScorer().for_decode().score_with_costs(req, cands)
    assert decode_costs == [15.0, 20.0]  # overlap no longer credited
    assert KvAwareScorer(CostParams(overlap_credit=0.5)).for_decode().params.overlap_credit == 0


# --- approximate prefix index -----------------------------------------------------------


def test_prefix_hashes_follow_the_spec_chain() -> None:
    text = b"a" * 64 + b"b" * 64 + b"c" * 10  # partial tail dropped
    got = prefix_hashes("llama", "salt", text, 64, 256)
    h0 = xxhash.xxh64_intdigest(b"llamasalt")
    h1 = xxhash.xxh64_intdigest(b"a" * 64 + struct.pack("<Q", h0))
    h2 = xxhash.xxh64_intdigest(b"b" * 64 + struct.pack("<Q", h1))
    assert got == [h1, h2]
    assert prefix_hashes("llama", None, text, 64, 1) == [
        xxhash.xxh64_intdigest(b"a" * 64 + struct.pack("<Q", xxhash.xxh64_intdigest(b"llama")))
    ]
    assert prefix_hashes("llama", None, b"short", 64, 256) == []


def test_prefix_cache_scorer_after_record() -> None:
    scorer = PrefixCacheScorer(ApproxPrefixIndex(block_size_tokens=1))  # 4-byte blocks
    first = SchedulingRequest("1", "m", prefix_text=b"AAAABBBBCCCCDDDD")
    a, b = cand("a"), cand("b")
    assert scorer.score(first, [a, b]) == [0.0, 0.0]
    scorer.after_pick(first, a.worker)
    assert scorer.score(first, [a, b]) == [1.0, 0.0]
    # Shares two of four blocks; another model or salt shares nothing.
    second = SchedulingRequest("2", "m", prefix_text=b"AAAABBBBXXXXYYYY")
    assert scorer.score(second, [a, b]) == [0.5, 0.0]
    assert scorer.score(SchedulingRequest("3", "other", prefix_text=b"AAAABBBB"), [a]) == [0.0]
    salted = SchedulingRequest("4", "m", prefix_text=b"AAAABBBB", cache_salt="t")
    assert scorer.score(salted, [a]) == [0.0]
    scorer.remove_worker(a.worker)
    assert scorer.score(first, [a, b]) == [0.0, 0.0]
    assert scorer.index.size() == 0


def test_prefix_index_truncates_and_evicts_tails_first() -> None:
    index = ApproxPrefixIndex(block_size_tokens=1, max_prefix_blocks=3, lru_capacity_per_server=4)
    req = SchedulingRequest("r", "m", prefix_text=b"AAAABBBBCCCCDDDD")
    hashes = index.hashes(req)
    assert len(hashes) == 3
    index.record(req, ("a", 0))
    other = index.hashes(SchedulingRequest("s", "m", prefix_text=b"ZZZZYYYY"))
    index.record_hashes(other, ("a", 0))  # 5 hashes > capacity 4: the oldest tail goes
    assert index.size(("a", 0)) == 4
    assert index.match(hashes, [("a", 0)]) == {("a", 0): 2}
    assert index.match(other, [("a", 0)]) == {("a", 0): 2}


class _ModelLru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lru: dict[str, OrderedDict[int, None]] = {}

    def record(self, hashes: list[int], worker: str) -> None:
        lru = self.lru.setdefault(worker, OrderedDict())
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def match(self, hashes: list[int], workers: list[str]) -> dict[str, int]:
        out = {}
        for w in workers:
            held = self.lru.get(w, {})
            depth = 0
            while depth < len(hashes) and hashes[depth] in held:
                depth += 1
            out[w] = depth
        return out


DOC = st.lists(st.sampled_from(b"abc"), min_size=0, max_size=6).map(bytes)


@settings(max_examples=150)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["record", "remove"]), DOC, st.sampled_from(["w0", "w1", "w2"])),
        max_size=30,
    ),
    probe=DOC,
)
def test_prefix_index_matches_a_brute_force_model(
    ops: list[tuple[str, bytes, str]], probe: bytes
) -> None:
    # Blocks of 4 bytes over a 1-byte alphabet per block: documents share prefixes often.
    index = ApproxPrefixIndex(block_size_tokens=1, lru_capacity_per_server=5)
    model = _ModelLru(5)

    def hashes(doc: bytes) -> list[int]:
        return index.hashes(
            SchedulingRequest("r", "m", prefix_text=bytes(c for c in doc for _ in range(4)))
        )

    for op, doc, worker in ops:
        if op == "record":
            index.record_hashes(hashes(doc), worker)
            model.record(hashes(doc), worker)
        else:
            index.remove_worker(worker)
            model.lru.pop(worker, None)
    workers = ["w0", "w1", "w2"]
    assert index.match(hashes(probe), workers) == model.match(hashes(probe), workers)
    for w in workers:
        assert index.size(w) == len(model.lru.get(w, {}))
        assert index.size(w) <= 5


# --- pickers ----------------------------------------------------------------------------

CANDS = [cand(n) for n in ("c", "a", "d", "b")]


def test_max_score_ties_are_uniformly_random() -> None:
    scores = [1.0, 0.2, 1.0, 1.0]
    picks = Counter(
        MaxScorePicker().pick(CANDS, scores, 1, random.Random(seed))[0] for seed in range(600)
    )
    assert set(picks) == {0, 2, 3}
    assert all(150 <= picks[i] <= 250 for i in (0, 2, 3))


def test_max_score_fallbacks_in_descending_order() -> None:
    scores = [0.3, 0.9, 0.1, 0.5]
    for seed in range(20):
        assert MaxScorePicker().pick(CANDS, scores, 3, random.Random(seed)) == [1, 3, 0]
    assert MaxScorePicker().pick(CANDS, scores, 10, random.Random(0)) == [1, 3, 0, 2]


def test_temperature_sampling_matches_the_softmax() -> None:
    scores = [2.0, 1.0, 0.0, 1.5]  # normalised: 1, 0.5, 0, 0.75
    t = 0.5
    weights = [math.exp(-(1 - s / 2.0) / t) for s in scores]
    expected = [w / sum(weights) for w in weights]
    picker = MaxScorePicker(temperature=t)
    rng = random.Random(1234)
    n = 20_000
    counts = Counter(picker.pick(CANDS, scores, 1, rng)[0] for _ in range(n))
    for i, p in enumerate(expected):
        assert counts[i] / n == pytest.approx(p, abs=0.015)


def test_temperature_with_lone_kv_scorer_is_dynamos_softmax_over_cost() -> None:
    req = SchedulingRequest("r", "m", prompt_tokens=10, block_size=1)
    cands = [
        cand("a", overlap=Overlap(8), new_blocks=2),
        cand("b", overlap=Overlap(4), new_blocks=6),
        cand("c", new_blocks=10),
    ]
    scores, costs = KvAwareScorer().score_with_costs(req, cands)
    lo, hi = min(costs), max(costs)
    t = 0.7
    weights = [math.exp(-((c - lo) / (hi - lo)) / t) for c in costs]
    expected = [w / sum(weights) for w in weights]
    rng = random.Random(99)
    n = 20_000
    counts = Counter(MaxScorePicker(temperature=t).pick(cands, scores, 1, rng)[0] for _ in range(n))
    for i, p in enumerate(expected):
        assert counts[i] / n == pytest.approx(p, abs=0.015)


def test_temperature_fallbacks_follow_the_score() -> None:
    scores = [0.3, 0.9, 0.1, 0.5]
    rng = random.Random(5)
    for _ in range(200):
        picked = MaxScorePicker(temperature=1.0).pick(CANDS, scores, 4, rng)
        assert sorted(picked) == [0, 1, 2, 3]
        rest = picked[1:]
        assert [scores[i] for i in rest] == sorted((scores[i] for i in rest), reverse=True)


def test_equal_scores_with_temperature_are_uniform() -> None:
    rng = random.Random(3)
    counts = Counter(
        MaxScorePicker(temperature=0.1).pick(CANDS, [0.4] * 4, 1, rng)[0] for _ in range(8000)
    )
    assert all(counts[i] / 8000 == pytest.approx(0.25, abs=0.02) for i in range(4))


def test_round_robin_cycles_in_worker_order() -> None:
    picker = RoundRobinPicker()
    rng = random.Random(0)
    order = [CANDS[picker.pick(CANDS, [0.0] * 4, 1, rng)[0]].worker[0] for _ in range(8)]
    assert order == ["a", "b", "c", "d", "a", "b", "c", "d"]
    shuffled = list(reversed(CANDS))
    picked = picker.pick(shuffled, [0.0] * 4, 3, rng)  # 9th pick starts at "a" again
    assert [shuffled[i].worker[0] for i in picked] == ["a", "b", "c"]


def test_random_picker_returns_distinct_targets() -> None:
    for seed in range(50):
        picked = RandomPicker().pick(CANDS, [0.0] * 4, 3, random.Random(seed))
        assert len(set(picked)) == 3
    firsts = Counter(
        RandomPicker().pick(CANDS, [0] * 4, 1, random.Random(s))[0] for s in range(400)
    )
    assert set(firsts) == {0, 1, 2, 3}


def test_weighted_random_picker_follows_weights() -> None:
    rng = random.Random(11)
    scores = [1.0, 3.0, 0.0, 0.0]
    n = 20_000
    counts = Counter(WeightedRandomPicker().pick(CANDS, scores, 1, rng)[0] for _ in range(n))
    assert counts[1] / n == pytest.approx(0.75, abs=0.015)
    assert counts[2] == counts[3] == 0
    for _ in range(50):
        picked = WeightedRandomPicker().pick(CANDS, scores, 4, rng)
        assert set(picked[:2]) == {0, 1} and set(picked[2:]) == {2, 3}


def test_picker_parameters_validated() -> None:
    with pytest.raises(ValueError):
        MaxScorePicker(max_endpoints=0)
    with pytest.raises(ValueError):
        MaxScorePicker(temperature=-1)


# --- filters / saturation ---------------------------------------------------------------


def test_utilization_detector() -> None:
    det = UtilizationDetector()
    ok = cand("ok", metrics=metrics(waiting=4, kv_usage=0.5))
    queued = cand("queued", metrics=metrics(waiting=5, kv_usage=0.1))
    full = cand("full", metrics=metrics(waiting=0, kv_usage=0.85))
    stale = cand("stale", metrics=metrics(stale=True))
    blind = cand("blind")
    assert det.saturation(ok) == pytest.approx(0.8)
    assert det.saturation(full) == pytest.approx(0.85 / 0.8)
    assert [det.saturated(c) for c in (ok, queued, full, stale, blind)] == [
        False,
        True,
        True,
        True,
        False,
    ]
    assert det.filter(REQ, [ok, queued, blind]) == [ok, blind]
    assert det.filter(REQ, [queued, full]) == [queued, full]  # never empties the list
    assert not UtilizationDetector(headroom=0.1).saturated(full)


def test_busy_detector() -> None:
    never = BusyDetector()
    heavy = cand(
        "h",
        load=LoadView(prefill_tokens=10**9, decode_blocks=10**9),
        metrics=metrics(num_blocks=10),
    )
    assert not never.saturated(heavy)
    decode = BusyDetector(active_decode_blocks_threshold=0.5)
    assert decode.saturated(
        cand("a", load=LoadView(decode_blocks=51), metrics=metrics(num_blocks=100))
    )
    assert not decode.saturated(
        cand("b", load=LoadView(decode_blocks=50), metrics=metrics(num_blocks=100))
    )
    assert not decode.saturated(cand("c", load=LoadView(decode_blocks=99)))  # no block count
    absolute = BusyDetector(active_prefill_tokens_threshold=1000)
    assert absolute.saturated(cand("d", load=LoadView(prefill_tokens=1001)))
    assert not absolute.saturated(cand("e", load=LoadView(prefill_tokens=1000)))
    frac = BusyDetector(active_prefill_tokens_threshold_frac=2.0, max_num_batched_tokens=512)
    assert frac.saturated(cand("f", load=LoadView(prefill_tokens=1025)))
    assert not frac.saturated(cand("g", load=LoadView(prefill_tokens=1024)))
    with pytest.raises(ValueError, match="maxNumBatchedTokens"):
        BusyDetector(active_prefill_tokens_threshold_frac=1.0)
