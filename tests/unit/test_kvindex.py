"""KvIndex: targeted cases (the property tests cover random interleavings)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from epp.hashing import block_hashes, chain_seed
from epp.kvevents.types import AllBlocksCleared, BlockRemoved, BlockStored
from epp.kvindex import KvIndex, Overlap

BS = 4


def toks(n_blocks: int, start: int = 1) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def stored(hashes, parent, tokens, **kw) -> BlockStored:
    return BlockStored(list(hashes), parent, list(tokens), BS, **kw)


@pytest.fixture
def index() -> KvIndex:
    idx = KvIndex(BS)
    for w in ("a", "b", "c"):
        idx.add_worker(w)
    return idx


def depth(idx: KvIndex, tokens, worker, **seed) -> int:
    return idx.find_matches(block_hashes(tokens, BS, chain_seed(**seed))).depth(worker)


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("kvpick_kv_events_dropped_total", {"reason": reason}) or 0


def test_chain_across_events_and_partial_prompts(index):
    t = toks(6)
    index.apply("a", stored([1, 2, 3], None, t[:12]))
    index.apply("a", stored([4, 5, 6], 3, t[12:]))
    assert depth(index, t, "a") == 6
    assert depth(index, t[:10], "a") == 2  # the partial tail block never counts
    assert depth(index, t + [99] * BS, "a") == 6
    assert depth(index, t[:8] + [0] * 16, "a") == 2  # diverges inside a run
    assert index.find_matches([]).depths == {}
    assert index.block_count("a") == 6


def test_equal_blocks_under_different_prefixes_do_not_conflate(index):
    shared = [7, 7, 7, 7]
    index.apply("a", stored([1, 2], None, [1, 1, 1, 1, *shared]))
    index.apply("b", stored([3, 4], None, [2, 2, 2, 2, *shared]))
    assert depth(index, [1, 1, 1, 1, *shared], "a") == 2
    assert depth(index, [1, 1, 1, 1, *shared], "b") == 0
    assert depth(index, [2, 2, 2, 2, *shared], "b") == 2


def test_cache_salt_seeds_the_whole_chain(index):
    t = toks(4)
    index.apply("a", stored([1, 2], None, t[:8], cache_salt="tenant-a"))
    index.apply("a", stored([3, 4], 2, t[8:]))  # vLLM announces the salt only at the start
    assert depth(index, t, "a", cache_salt="tenant-a") == 4
    assert depth(index, t, "a") == 0
    assert depth(index, t, "a", cache_salt="tenant-b") == 0


def test_lora_name_seeds_block_hashes(index):
    t = toks(3)
    index.apply("a", stored([1, 2, 3], None, t, lora_name="sql-adapter"))
    assert depth(index, t, "a", lora_name="sql-adapter") == 3
    assert depth(index, t, "a") == 0


def test_same_content_under_a_second_engine_hash_is_one_block(index):
    t = toks(3)
    index.apply("a", stored([1, 2, 3], None, t))
    index.apply("b", stored([11, 12, 13], None, t))  # another hashing scheme
    m = index.find_matches(block_hashes(t, BS))
    assert m.depths == {"a": 3, "b": 3}
    assert index.node_count == 3
    index.apply("b", BlockRemoved([13]))  # removal by the second hash
    assert depth(index, t, "b") == 2
    index.apply("b", stored([13], 12, t[8:]))
    assert depth(index, t, "b") == 3
    index.check_invariants()


def test_rejections_are_counted_by_reason(index):
    before = {
        r: dropped(r)
        for r in (
            "unknown_parent",
            "unknown_block",
            "inconsistent_parent",
            "block_size_mismatch",
            "token_count_mismatch",
            "bad_token_ids",
            "missing_token_ids",
            "unknown_worker",
            "duplicate_block_hash",
        )
    }
    t = toks(2)
    index.apply("a", stored([1, 2], None, t))
    index.apply("a", stored([5, 6], 999, t))  # parent nobody announced
    index.apply("a", BlockRemoved([12345]))  # a block nobody holds
    index.apply("b", BlockRemoved([1]))  # a block b does not hold
    index.apply("a", stored([2], None, t[:4]))  # known hash, but announced as a root now
    index.apply("a", BlockStored([7], None, [1] * 8, 8))
    index.apply("a", stored([7, 8], None, t[:4]))
    index.apply("a", stored([9], None, [-1, 2, 3, 4]))
    index.apply("a", BlockStored([10], None, None, BS))
    index.apply("zz", stored([11], None, t[:4]))
    index.apply("a", stored([20, 21, 20], None, toks(3, 50)))
    delta = {r: dropped(r) - v for r, v in before.items()}
    assert delta == {
        "unknown_parent": 2,
        "unknown_block": 2,
        "inconsistent_parent": 1,
        "block_size_mismatch": 1,
        "token_count_mismatch": 2,
        "bad_token_ids": 1,
        "missing_token_ids": 1,
        "unknown_worker": 1,
        "duplicate_block_hash": 1,
    }
    assert index.rejected["unknown_block"] == 2
    # The good part of the event with a repeated hash was kept.
    assert depth(index, toks(3, 50), "a") == 2
    assert index.block_count("a") == 4
    index.check_invariants()


def test_other_kv_groups_are_ignored(index):
    t = toks(2)
    index.apply("a", stored([1, 2], None, t, group_idx=1))
    index.apply("a", stored([1, 2], None, t, kv_cache_spec_kind="sliding_window"))
    assert depth(index, t, "a") == 0
    index.apply("a", stored([1, 2], None, t, group_idx=0, kv_cache_spec_kind="full_attention"))
    assert depth(index, t, "a") == 2


def test_tiers_split_the_matched_prefix(index):
    t = toks(5)
    index.apply("a", stored([1, 2, 3, 4, 5], None, t))
    index.apply("a", stored([4, 5], 3, t[12:], medium="CPU"))  # offloaded copies
    index.apply("a", BlockRemoved([4, 5], "GPU"))  # evicted from the GPU only
    index.apply("b", stored([1, 2], None, t[:8], medium="CPU"))
    index.apply("b", stored([3], 2, t[8:12], medium="STORAGE"))
    m = index.find_matches(block_hashes(t, BS))
    assert m.overlap("a") == Overlap(3, 2, 0, 0)
    assert m.overlap("b") == Overlap(0, 2, 1, 0)
    assert m.overlap("c") == Overlap(0)
    assert set(m.tiered) == {"a", "b"}
    # Back on the GPU alongside the CPU copy: the device tier wins.
    index.apply("a", stored([4, 5], 3, t[12:], medium="GPU"))
    assert index.find_matches(block_hashes(t, BS)).overlap("a") == Overlap(5)
    # Dropping the CPU copies while the GPU copies stay leaves device-only blocks.
    index.apply("a", BlockRemoved([4, 5], "CPU"))
    index.apply("b", BlockRemoved([3], "STORAGE"))
    index.apply("b", BlockRemoved([1, 2], "CPU"))
    m = index.find_matches(block_hashes(t, BS))
    assert m.overlap("a") == Overlap(5) and "a" not in m.tiered
    assert m.depth("b") == 0
    index.check_invariants()
    assert index._offdevice == 0


def test_a_hole_ends_the_match_and_refilling_it_restores_it(index):
    t = toks(6)
    index.apply("a", stored(range(1, 7), None, t))
    index.apply("a", BlockRemoved([3]))  # evicted out of order: blocks 4-6 remain
    assert depth(index, t, "a") == 2
    assert index.block_count("a") == 5
    index.apply("a", stored([3], 2, t[8:12]))
    assert depth(index, t, "a") == 6
    index.check_invariants()


def test_clear_and_remove_worker_take_effect_before_the_sweep(index):
    t = toks(4)
    for w in ("a", "b"):
        index.apply(w, stored([1, 2, 3, 4], None, t))
    index.apply("a", AllBlocksCleared())
    index.remove_worker("b")
    assert index.find_matches(block_hashes(t, BS)).depths == {}
    assert index.block_count("a") == 0 and not index.has_worker("b")
    assert index.needs_sweep
    # The blocks are still known until swept, so a child of them can be placed.
    index.apply("a", stored([5], 4, [9] * BS))
    assert index.block_count("a") == 1
    while not index.sweep(budget=1):
        assert index.find_matches(block_hashes(t, BS)).depths == {}
    assert not index.needs_sweep
    index.check_invariants()
    # The still-held child keeps its (unheld) ancestors; nothing else is left.
    assert index.node_count == 5


def test_sweep_frees_memory_and_reuses_worker_slots():
    index = KvIndex(BS)
    rng = random.Random(3)
    for round_ in range(20):
        for w in range(8):
            name = f"w{round_}-{w}"
            index.add_worker(name)
            tokens = [rng.randrange(1000) for _ in range(10 * BS)]
            index.apply(name, stored(range(w * 100, w * 100 + 10), None, tokens))
        for w in range(8):
            index.remove_worker(f"w{round_}-{w}")
        assert index.sweep()
        assert index.node_count == 0 and index.run_count == 0
    # Slots were recycled: masks stayed small.
    assert index._next_slot <= 16


def test_runs_split_and_merge_back():
    index = KvIndex(BS)
    index.add_worker("a")
    index.add_worker("b")
    t = toks(1000)
    index.apply("a", stored(range(500), None, t[: 500 * BS]))
    index.apply("a", stored(range(500, 1000), 499, t[500 * BS :]))
    assert index.run_count == 1  # a continuation of a run with the same holders extends it
    index.apply("b", stored(range(500), None, t[: 500 * BS]))
    assert index.run_count == 2  # [0, 500) held by a and b, [500, 1000) by a
    assert depth(index, t, "a") == 1000 and depth(index, t, "b") == 500
    for h in reversed(range(500, 1000)):  # vLLM's order: the tail goes first
        index.apply("a", BlockRemoved([h]))
    assert index.run_count == 1 and index.node_count == 500
    for h in reversed(range(500)):
        index.apply("a", BlockRemoved([h]))
        index.check_invariants() if h % 97 == 0 else None
    assert depth(index, t, "b") == 500 and depth(index, t, "a") == 0
    assert index.run_count == 1  # the pieces b alone holds merged back into one run
    index.check_invariants()


def test_unknown_medium_counts_as_the_slowest_tier(index):
    t = toks(1)
    index.apply("a", stored([1], None, t, medium="QUANTUM_FOAM"))
    assert index.find_matches(block_hashes(t, BS)).overlap("a") == Overlap(0, 0, 0, 1)


def test_invalid_construction():
    with pytest.raises(ValueError):
        KvIndex(0)
