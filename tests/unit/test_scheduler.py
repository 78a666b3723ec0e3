"""The Scheduler end to end: modes, KV-aware choices, shedding, 503s, the GAIE default."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.kvindex.index import Overlap
from epp.scheduling.config import load_config
from epp.scheduling.scheduler import Scheduler
from epp.scheduling.types import (
    Candidate,
    EndpointMetrics,
    LoadView,
    SchedulingError,
    SchedulingRequest,
)


def req(
    prompt: int = 10, *, block_size: int = 1, priority: int = 0, text: bytes = b""
) -> SchedulingRequest:
    return SchedulingRequest(
        "r", "m", prompt_tokens=prompt, block_size=block_size, priority=priority, prefix_text=text
    )


def cand(
    name: str,
    *,
    role: str = "both",
    overlap: int = 0,
    decode: int = 0,
    prefill: int = 0,
    new: int | None = None,
    metrics: EndpointMetrics | None = None,
) -> Candidate:
    return Candidate(
        (name, 0),
        role=role,
        overlap=Overlap(overlap),
        load=LoadView(prefill_tokens=prefill, decode_blocks=decode, requests=decode // 10),
        new_blocks=(10 - overlap) if new is None else new,
        metrics=metrics,
    )


def names(targets: list[Candidate]) -> list[str]:
    return [c.worker[0] for c in targets]


def test_kv_aware_picks_the_cached_worker() -> None:
    sched = Scheduler()
    cands = [cand("cold"), cand("warm", overlap=8), cand("cool", overlap=2)]
    for seed in range(10):
        decision = sched.schedule(req(), cands, rng=random.Random(seed))
        assert decision.mode == "aggregated" and decision.prefill is None
        assert decision.primary.worker == ("warm", 0)


def test_kv_aware_avoids_the_cached_worker_when_loaded() -> None:
    sched = Scheduler()
    cands = [cand("idle"), cand("warm-but-busy", overlap=8, decode=200, prefill=50)]
    assert sched.schedule(req(), cands).primary.worker == ("idle", 0)


def test_worked_example_and_scores_recorded() -> None:
    sched = Scheduler()
    cands = [
        cand("W1", overlap=2, decode=4, new=6),
        cand("W2", overlap=5, decode=0, new=5),
        cand("W3", overlap=8, decode=7, new=2),
    ]
    decision = sched.schedule(req(), cands, fallbacks=2)
    assert names(decision.decode.targets) == ["W2", "W3", "W1"]
    by_worker = {s.worker[0]: s for s in decision.decode.scores}
    assert {w: s.cost for w, s in by_worker.items()} == {"W1": 18.0, "W2": 10.0, "W3": 11.0}
    assert by_worker["W2"].parts == {"kv-aware-scorer": 1.0}
    assert by_worker["W2"].score == 1.0 and by_worker["W1"].score == 0.0
    assert decision.decode.profile == "default"


def test_disaggregation_prefill_by_overlap_decode_ignoring_it() -> None:
    sched = Scheduler()
    cands = [
        cand("P-cold", role="prefill"),
        cand("P-warm", role="prefill", overlap=6),
        # D-warm wins on overlap if credited (cost 12 vs 19) and loses without (20 vs 19).
        cand("D-warm", role="decode", overlap=8, decode=8, new=2),
        cand("D-cold", role="decode", new=9),
    ]
    decision = sched.schedule(req(), cands)
    assert decision.mode == "disaggregated"
    assert decision.prefill is not None
    assert decision.prefill.targets[0].worker == ("P-warm", 0)
    assert decision.primary.worker == ("D-cold", 0)
    assert {s.worker[0]: s.cost for s in decision.decode.scores} == {"D-warm": 20.0, "D-cold": 19.0}
    assert {c.worker[0] for c in decision.prefill.targets} <= {"P-cold", "P-warm"}
    # The same decode workers alone (aggregated) are scored with the overlap credit.
    aggregated = sched.schedule(req(), cands[2:])
    assert aggregated.mode == "aggregated"
    assert aggregated.primary.worker == ("D-warm", 0)


def test_both_role_counts_as_decode_capable() -> None:
    decision = Scheduler().schedule(req(), [cand("P", role="prefill"), cand("B", role="both")])
    assert decision.mode == "disaggregated" and decision.primary.worker == ("B", 0)


@pytest.mark.parametrize(
    ("cands", "message"),
    [
        ([], "no ready endpoint"),
        ([cand("P1", role="prefill"), cand("P2", role="prefill")], "prefill-only"),
        ([cand("E", role="encode")], "encode"),
    ],
)
def test_503(cands: list[Candidate], message: str) -> None:
    with pytest.raises(SchedulingError, match=message) as err:
        Scheduler().schedule(req(), cands)
    assert err.value.status == 503


SATURATED = EndpointMetrics(waiting=10)
FREE = EndpointMetrics(waiting=0)


def test_shed_only_sheddable_requests_when_all_saturated() -> None:
    sched = Scheduler.from_preset("gaie-default")
    full = [cand("a", metrics=SATURATED), cand("b", metrics=EndpointMetrics(stale=True))]
    with pytest.raises(SchedulingError) as err:
        sched.schedule(req(priority=-1), full)
    assert err.value.status == 429
    assert sched.schedule(req(priority=0), full).primary.worker in {("a", 0), ("b", 0)}
    one_free = [*full, cand("c", metrics=FREE)]
    assert sched.schedule(req(priority=-1), one_free).primary.worker in {
        ("a", 0),
        ("b", 0),
        ("c", 0),
    }
    assert sched.schedule(req(priority=-1), [cand("blind")]).primary.worker == ("blind", 0)


def test_shed_by_busy_detector_and_filtering() -> None:
    sched = Scheduler.from_preset("kv-aware", {"activePrefillTokensThreshold": 100})
    busy = cand("busy", overlap=9, prefill=500)
    idle = cand("idle")
    with pytest.raises(SchedulingError) as err:
        sched.schedule(req(priority=-1), [busy])
    assert err.value.status == 429
    # Not all busy: the busy worker is filtered out despite its cache, and its score says so.
    decision = sched.schedule(req(priority=-1), [busy, idle])
    assert decision.primary.worker == ("idle", 0)
    filtered = next(s for s in decision.decode.scores if s.worker == ("busy", 0))
    assert filtered.parts == {"filtered:busy-detector": 1.0} and filtered.cost is None
    # All busy and not sheddable: served anyway, by the cheapest.
    assert sched.schedule(req(), [busy, cand("busy2", prefill=500)]).primary.worker == (
        "busy",
        0,
    )


def test_shed_when_the_prefill_stage_is_saturated() -> None:
    sched = Scheduler.from_preset("kv-aware", {"activePrefillTokensThreshold": 100})
    cands = [cand("P", role="prefill", prefill=500), cand("D", role="decode")]
    with pytest.raises(SchedulingError, match="prefill") as err:
        sched.schedule(req(priority=-5), cands)
    assert err.value.status == 429
    assert sched.schedule(req(), cands).mode == "disaggregated"


def test_no_detectors_never_shed() -> None:
    sched = Scheduler.from_preset("random")
    assert sched.schedule(req(priority=-1), [cand("a", metrics=SATURATED)]).primary


def test_fallbacks_are_distinct_and_ordered() -> None:
    sched = Scheduler()
    cands = [cand(f"w{i}", overlap=i) for i in range(6)]
    decision = sched.schedule(req(), cands, fallbacks=3)
    assert names(decision.decode.targets) == ["w5", "w4", "w3", "w2"]
    assert len(Scheduler().schedule(req(), cands[:2], fallbacks=5).decode.targets) == 2


def test_gaie_default_prefers_the_approximate_prefix_winner_after_record() -> None:
    sched = Scheduler.from_preset("gaie-default", rng=random.Random(7))
    text = b"You are a helpful assistant. " * 20  # 580 bytes: 9 blocks of 64
    cands = [cand(f"w{i}", metrics=FREE) for i in range(4)]
    first = sched.schedule(req(text=text), cands)
    assert first.decode.scores[0].cost is None  # no kv-aware scorer in this profile
    # Before anything is recorded, equal candidates are picked at random.
    firsts = Counter(
        sched.schedule(req(text=text), cands, rng=random.Random(s)).primary.worker
        for s in range(100)
    )
    assert len(firsts) == 4
    sched.after_pick(req(text=text), first)
    winner = first.primary.worker
    for seed in range(30):
        again = sched.schedule(req(text=text + b" and more"), cands, rng=random.Random(seed))
        assert again.primary.worker == winner
        parts = {s.worker: s.parts["prefix-cache-scorer"] for s in again.decode.scores}
        assert parts[winner] == 1.0 and all(v == 0.0 for w, v in parts.items() if w != winner)
    # A busier queue on the winner outweighs the prefix (weights 2 + 2 vs 3).
    loaded = [
        cand(w[0], metrics=EndpointMetrics(waiting=9, kv_usage=0.9) if w == winner else FREE)
        for w in (c.worker for c in cands)
    ]
    assert sched.schedule(req(text=text), loaded).primary.worker != winner
    sched.remove_worker(winner)
    scores = sched.schedule(req(text=text), cands).decode.scores
    assert all(s.parts["prefix-cache-scorer"] == 0.0 for s in scores)


def test_after_pick_records_served_and_prefill_workers() -> None:
    text = b"x" * 640
    config = load_config(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
        "kind: EndpointPickerConfig\n"
        "plugins: [{type: prefix-cache-scorer}, {type: kv-aware-scorer}]\n"
    )
    sched = Scheduler(config)
    cands = [cand("P", role="prefill"), cand("D1", role="decode"), cand("D2", role="decode")]
    decision = sched.schedule(req(text=text), cands)
    served = ("D2", 0) if decision.primary.worker == ("D1", 0) else ("D1", 0)
    sched.after_pick(req(text=text), decision, served=served)
    index = sched.plugin("prefix-cache-scorer").index
    assert index.size(("P", 0)) == 10
    assert index.size(served) == 10
    assert index.size(decision.primary.worker) == 0


def test_round_robin_policy_cycles() -> None:
    sched = Scheduler.from_preset("round-robin")
    cands = [cand("b"), cand("c"), cand("a")]
    picks = [sched.schedule(req(), cands).primary.worker[0] for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_policy() -> None:
    sched = Scheduler.from_preset("least-loaded")
    cands = [cand("a", decode=30), cand("b", decode=10, prefill=90), cand("c", decode=10)]
    assert sched.schedule(req(), cands).primary.worker == ("c", 0)


def test_temperature_override_spreads_picks() -> None:
    sched = Scheduler.from_preset("kv-aware", {"temperature": 1.0}, rng=random.Random(3))
    cands = [cand("a", overlap=9), cand("b", overlap=5), cand("c")]
    picks = Counter(sched.schedule(req(), cands).primary.worker[0] for _ in range(600))
    assert set(picks) == {"a", "b", "c"}
    assert picks["a"] > picks["b"] > picks["c"]
