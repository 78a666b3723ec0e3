"""A deterministic single-worker engine, as a stream of KV event batches, for event-plane tests.

The same seed always gives the same batches, so a publisher in another process and the
test's reference index can both generate them. The engine has a paged cache of ``capacity``
blocks with prefix caching and LRU eviction (tail blocks first, as vLLM frees them); each
batch is one request's events: ``BlockRemoved`` per evicted block, then one ``BlockStored``
for its new blocks. Most prompts extend one of a handful of shared prefixes, so blocks are reused.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator

import xxhash

from epp.kvevents.types import BlockRemoved, BlockStored, KvEvent


def _engine_hash(seed: int, prefix: tuple[int, ...]) -> int:
    return xxhash.xxh3_64_intdigest(repr(prefix).encode(), seed)


def batches(
    seed: int, *, block_size: int = 4, capacity: int = 256, prefixes: int = 6
) -> Iterator[list[KvEvent]]:
    """Yield batches forever."""
    for events, _ in requests(seed, block_size=block_size, capacity=capacity, prefixes=prefixes):
        yield events


def requests(
    seed: int, *, block_size: int = 4, capacity: int = 256, prefixes: int = 6
) -> Iterator[tuple[list[KvEvent], list[int]]]:
    """Yield (batch, the request's prompt tokens) forever."""
    rng = random.Random(seed)
    roots = [
        [rng.randrange(1, 5000) for _ in range(block_size * rng.randint(2, 12))]
        for _ in range(prefixes)
    ]
    cache: OrderedDict[int, None] = OrderedDict()
    while True:
        # Most prompts extend a shared prefix; some start afresh.
        root = rng.choice(roots) if rng.random() < 0.8 else []
        tokens = list(root) + [
            rng.randrange(1, 5000) for _ in range(block_size * rng.randint(1, 10))
        ]
        hashes = [
            _engine_hash(seed, tuple(tokens[: (i + 1) * block_size]))
            for i in range(len(tokens) // block_size)
        ]
        first_new = next((i for i, h in enumerate(hashes) if h not in cache), len(hashes))
        new = hashes[first_new:]
        events: list[KvEvent] = []
        overflow = len(cache) + len(new) - capacity
        in_use = set(hashes[:first_new])
        if overflow > 0:
            victims = [h for h in cache if h not in in_use][:overflow]
            for h in victims:
                del cache[h]
                events.append(BlockRemoved([h], "GPU"))
        if new:
            events.append(
                BlockStored(
                    new,
                    hashes[first_new - 1] if first_new else None,
                    tokens[first_new * block_size : len(hashes) * block_size],
                    block_size,
                    medium="GPU",
                )
            )
        for h in reversed(hashes):
            cache[h] = None
            cache.move_to_end(h)
        yield events, tokens


def probe_prompts(seed: int, count: int, *, block_size: int = 4) -> list[list[int]]:
    """The prompts of the first ``count`` requests of :func:`requests` (distinct ones)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    gen = requests(seed, block_size=block_size)
    for _ in range(count):
        _, tokens = next(gen)
        if tuple(tokens) not in seen:
            seen.add(tuple(tokens))
            out.append(tokens)
    return out
