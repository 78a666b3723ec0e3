"""The EPP's garbage-collector settings: start-up objects frozen, every pause observed."""

from __future__ import annotations

import gc

import pytest

from epp import collector
from epp import metrics as M


def _count(generation: str) -> float:
    for metric in M.GC_PAUSE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels["generation"] == generation:
                return sample.value
    return 0.0


@pytest.fixture
def watching():
    collector.watch()
    try:
        yield
    finally:
        collector.unwatch()


def test_each_collection_is_observed_by_generation(watching):
    before = {g: _count(g) for g in "012"}
    gc.collect(0)
    gc.collect(2)
    gc.collect(2)
    assert _count("0") == before["0"] + 1
    assert _count("2") == before["2"] + 2


def test_watch_is_idempotent_and_unwatch_stops_observing(watching):
    collector.watch()
    before = _count("1")
    gc.collect(1)
    assert _count("1") == before + 1  # one callback, not two
    collector.unwatch()
    gc.collect(1)
    assert _count("1") == before + 1


def test_settle_moves_what_is_alive_out_of_later_collections():
    gc.unfreeze()
    try:
        kept = [{"n": i} for i in range(1000)]
        moved = collector.settle()
        assert moved >= 1000 and gc.get_freeze_count() == moved
        # A frozen object is in no generation, so a full collection does not walk it.
        assert not any(kept[0] is o for o in gc.get_objects())
    finally:
        gc.unfreeze()
