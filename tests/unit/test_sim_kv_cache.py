"""The simulator's KV cache: prefix reuse, LRU eviction order, release order, reset, and
events that always describe exactly what is cached."""

from __future__ import annotations

import random

from epp.kvevents.types import AllBlocksCleared, BlockRemoved, BlockStored
from workers.sim.engine_hash import BlockHasher, event_value
from workers.sim.kv_cache import KvCache, SeqKv

BS = 2


def fill(cache: KvCache, tokens: list[int]) -> SeqKv:
    seq = SeqKv()
    digests = cache.hasher.digests(tokens)
    hits = cache.match(digests, (len(tokens) - 1) // BS)
    cache.admit(seq, digests, hits)
    assert cache.grow(seq, len(tokens))
    cache.commit(seq, tokens, len(tokens))
    assert hits == seq.hit_blocks
    return seq


def replay(events, held: set[int]) -> None:
    for ev in events:
        if isinstance(ev, BlockStored):
            assert held.isdisjoint(ev.block_hashes), "a block announced twice"
            assert ev.parent_hash is None or ev.parent_hash in held, "parent not cached"
            held.update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            assert set(ev.block_hashes) <= held, "removal of a block never announced"
            held.difference_update(ev.block_hashes)
        elif isinstance(ev, AllBlocksCleared):
            held.clear()


def test_prefix_is_reused_and_counted():
    cache = KvCache(8, BS, BlockHasher(BS))
    a = fill(cache, [1, 2, 3, 4, 5])
    cache.release(a)
    b = fill(cache, [1, 2, 3, 4, 9, 9])
    assert b.hit_blocks == 2
    assert cache.hit_tokens == 4 and cache.query_tokens == 4 + 6
    stored = [e for e in cache.drain_events() if isinstance(e, BlockStored)]
    assert [len(e.block_hashes) for e in stored] == [2, 1]
    assert stored[1].parent_hash == stored[0].block_hashes[1]


def test_eviction_takes_the_least_recently_freed_tail_first():
    cache = KvCache(4, BS, BlockHasher(BS))
    a = fill(cache, [1, 2, 3, 4])  # two cached blocks
    cache.release(a)
    cache.drain_events()
    b = SeqKv()
    assert cache.grow(b, 2)  # one block: never-used blocks go first, nothing evicted
    assert cache.drain_events() == []
    assert cache.grow(b, 6)  # two more: the last never-used one, then a's tail block
    removed = cache.drain_events()
    tail = event_value(cache.hasher.digests([1, 2, 3, 4])[1])
    assert removed == [BlockRemoved([tail], medium="GPU", group_idx=0)]
    assert not cache.grow(b, 12)  # more than the cache holds: refused, nothing changes
    assert cache.free_blocks == 1


def test_reset_refused_while_blocks_are_in_use():
    cache = KvCache(4, BS, BlockHasher(BS))
    a = fill(cache, [1, 2, 3])
    assert not cache.reset()
    cache.release(a)
    assert cache.reset()
    assert isinstance(cache.drain_events()[-1], AllBlocksCleared)
    assert cache.cached_hashes() == set()


def test_duplicate_content_is_cached_once_and_the_copy_freed():
    cache = KvCache(8, BS, BlockHasher(BS))
    # Two sequences with the same new prefix, both allocated before either fills.
    a, b = SeqKv(), SeqKv()
    tokens = [5, 6, 7, 8]
    for s in (a, b):
        digests = cache.hasher.digests(tokens)
        cache.admit(s, digests, cache.match(digests, 1))
        assert cache.grow(s, 4)
    cache.commit(a, tokens, 4)
    cache.commit(b, tokens, 4)
    assert b.blocks == a.blocks  # b now holds a's cached blocks
    assert cache.used_blocks == 2
    held: set[int] = set()
    replay(cache.drain_events(), held)
    assert held == cache.cached_hashes()


def test_random_workload_events_describe_the_cache():
    rng = random.Random(3)
    cache = KvCache(24, BS, BlockHasher(BS))
    held: set[int] = set()
    live: list[SeqKv] = []
    roots = [[rng.randrange(50) for _ in range(8)] for _ in range(4)]
    for _ in range(2000):
        if live and (rng.random() < 0.5 or cache.free_blocks < 6):
            cache.release(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(roots)[: rng.randrange(1, 9)] + [rng.randrange(50)] * rng.randrange(
                3
            )
            seq = SeqKv()
            digests = cache.hasher.digests(tokens)
            hits = cache.match(digests, (len(tokens) - 1) // BS)
            if not cache.can_admit(digests, hits, len(tokens)):
                continue
            cache.admit(seq, digests, hits)
            assert cache.grow(seq, len(tokens))
            cache.commit(seq, tokens, len(tokens))
            live.append(seq)
        replay(cache.drain_events(), held)
        assert held == cache.cached_hashes()
    assert cache.evictions > 0


def test_commit_with_known_digests_matches_hashing_again():
    rng = random.Random(5)
    tokens = [rng.randrange(1, 500) for _ in range(23)]
    hasher = BlockHasher(BS)
    known = hasher.digests(tokens[:15])  # the "prompt": 7 full blocks known up front
    plain, reused = KvCache(32, BS, hasher), KvCache(32, BS, hasher)
    a, b = SeqKv(), SeqKv()
    for cache, seq in ((plain, a), (reused, b)):
        assert cache.grow(seq, len(tokens))
    # In steps, as an engine commits: inside the known part, then past it.
    for n in (5, 14, 23):
        plain.commit(a, tokens, n)
        reused.commit(b, tokens, n, known)
    assert a.digests == b.digests == hasher.digests(tokens)
    assert plain.drain_events() == reused.drain_events()
