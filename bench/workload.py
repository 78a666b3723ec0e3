"""A synthetic multi-tenant chat workload with realistic prefix sharing, as KV events.

Shape (modelled on the shared-prefix presets and the Mooncake trace, specs/testing-
environment.md §7): ``tenants`` system prompts of 1K-4K tokens with Zipf popularity;
conversations under a tenant grow turn by turn (each turn's prompt extends the previous
one); a conversation sticks to one worker, as a KV-aware router keeps it, so popular system
prompts end up on most workers and conversation tails on one.

Each worker is a paged cache of ``capacity`` blocks with prefix caching and LRU eviction in
vLLM's order (a finished request frees its blocks tail first, so leaves go before their
parents). Every request yields one batch of engine events for its worker: one
``BlockRemoved`` per evicted block (as vLLM emits them) and one ``BlockStored`` for its new
blocks. Engine hashes are content hashes distinct from kvpick's keys (as vLLM's are), so the
index has to map between them.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import random
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

from epp.hashing import CHAIN_SEED, block_hashes

_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack
_ENGINE_SEED = 0x5EED


@dataclass(slots=True)
class Block:
    hash: int  # kvpick block hash (of this block's tokens)
    key: int  # kvpick sequence hash (of the whole prefix up to this block)
    engine: int  # the "engine's" hash of the same block
    tokens: list[int]


@dataclass
class WorkerCache:
    capacity: int
    lru: OrderedDict[int, Block] = field(default_factory=OrderedDict)  # engine hash → block


@dataclass
class Request:
    worker: int
    blocks: list[Block]


@dataclass
class Workload:
    block_size: int
    workers: int
    batches: list[tuple[int, list]]  # (worker, events) in arrival order
    caches: list[WorkerCache]
    tenants: list[list[Block]]
    prompt_blocks: int
    rng: random.Random
    token_pool: list[int]
    conversations: list[tuple[int, list[Block]]] = field(default_factory=list)

    def stored_blocks(self) -> int:
        return sum(
            len(ev.block_hashes)
            for _, events in self.batches
            for ev in events
            if type(ev).__name__ == "BlockStored"
        )

    def query(self) -> tuple[list[int], list[int]]:
        """A fresh ``prompt_blocks``-block prompt, as (block hashes, sequence hashes): a
        later turn of a known conversation (70 %) or a new conversation of a tenant (30 %).
        """
        rng = self.rng
        if self.conversations and rng.random() < 0.7:
            _, prefix = rng.choice(self.conversations)
        else:
            prefix = self.tenants[_zipf_index(rng, len(self.tenants))]
        blocks = list(prefix[: self.prompt_blocks])
        parent = blocks[-1].key if blocks else None
        while len(blocks) < self.prompt_blocks:
            blk = _new_block(rng, self.token_pool, self.block_size, parent)
            blocks.append(blk)
            parent = blk.key
        return [b.hash for b in blocks], [b.key for b in blocks]


def _zipf_index(rng: random.Random, n: int, s: float = 1.1) -> int:
    # Inverse-CDF sampling over a precomputed table would be faster; n is small here.
    weights = _ZIPF_CACHE.get((n, s))
    if weights is None:
        total = 0.0
        weights = []
        for i in range(1, n + 1):
            total += 1.0 / i**s
            weights.append(total)
        _ZIPF_CACHE[(n, s)] = weights
    u = rng.random() * weights[-1]
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if weights[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return lo


_ZIPF_CACHE: dict[tuple[int, float], list[float]] = {}


def _new_block(
    rng: random.Random, pool: list[int], block_size: int, parent_key: int | None
) -> Block:
    start = rng.randrange(len(pool) - block_size)
    tokens = pool[start : start + block_size]
    (bh,) = block_hashes(tokens, block_size, CHAIN_SEED)
    key = bh if parent_key is None else _xxh3(_pack_pair(parent_key, bh), CHAIN_SEED)
    engine = _xxh3(key.to_bytes(8, "little"), _ENGINE_SEED)
    return Block(bh, key, engine, tokens)


def _chain(rng: random.Random, pool: list[int], block_size: int, parent: Block | None, n: int):
    out = []
    key = parent.key if parent is not None else None
    for _ in range(n):
        blk = _new_block(rng, pool, block_size, key)
        out.append(blk)
        key = blk.key
    return out


def generate(
    *,
    workers: int = 64,
    capacity: int = 16384,
    block_size: int = 16,
    prompt_blocks: int = 512,
    tenants: int = 48,
    vocab: int = 128_000,
    seed: int = 7,
    fill: float = 1.0,
) -> Workload:
    """Run requests until every worker cache holds ``fill × capacity`` blocks."""
    from epp.kvevents.types import BlockRemoved, BlockStored

    rng = random.Random(seed)
    pool = [rng.randrange(vocab) for _ in range(1 << 18)]
    system = [_chain(rng, pool, block_size, None, rng.randint(64, 256)) for _ in range(tenants)]
    caches = [WorkerCache(capacity) for _ in range(workers)]
    batches: list[tuple[int, list]] = []
    open_convs: list[tuple[int, int, list[Block]]] = []  # (tenant, worker, prompt blocks)
    finished: list[tuple[int, list[Block]]] = []
    target = int(capacity * fill)

    def run(worker: int, blocks: list[Block]) -> None:
        cache = caches[worker]
        lru = cache.lru
        new_from = len(blocks)
        for i, blk in enumerate(blocks):
            if blk.engine not in lru:
                new_from = i
                break
        new = blocks[new_from:]
        events: list = []
        overflow = len(lru) + len(new) - cache.capacity
        if overflow > 0:
            in_use = {b.engine for b in blocks[:new_from]}
            evicted = []
            for eng in lru:
                if len(evicted) >= overflow:
                    break
                if eng not in in_use:
                    evicted.append(eng)
            for eng in evicted:
                del lru[eng]
                events.append(BlockRemoved([eng], "GPU"))
        if new:
            parent = blocks[new_from - 1].engine if new_from > 0 else None
            tokens = [t for b in new for t in b.tokens]
            events.append(
                BlockStored([b.engine for b in new], parent, tokens, block_size, medium="GPU")
            )
        # Free in vLLM's order: the tail becomes least recently used first.
        for blk in reversed(blocks):
            lru[blk.engine] = blk
            lru.move_to_end(blk.engine)
        if events:
            batches.append((worker, events))

    while min(len(c.lru) for c in caches) < target:
        if open_convs and rng.random() < 0.6:
            i = rng.randrange(len(open_convs))
            tenant, worker, prompt = open_convs[i]
            turn = _chain(rng, pool, block_size, prompt[-1], rng.randint(8, 48))
            prompt = prompt + turn
            if len(prompt) >= prompt_blocks or rng.random() < 0.15:
                open_convs[i] = open_convs[-1]
                open_convs.pop()
                finished.append((tenant, prompt[:prompt_blocks]))
            else:
                open_convs[i] = (tenant, worker, prompt)
        else:
            tenant = _zipf_index(rng, tenants)
            # Sticky routing by conversation, least-filled worker first for new ones so that
            # every cache fills.
            worker = min(range(workers), key=lambda w: (len(caches[w].lru), rng.random()))
            prompt = system[tenant] + _chain(
                rng, pool, block_size, system[tenant][-1], rng.randint(8, 64)
            )
            open_convs.append((tenant, worker, prompt))
        run(worker, prompt[:prompt_blocks])

    convs = [(t, p) for t, _, p in open_convs] + finished
    return Workload(
        block_size=block_size,
        workers=workers,
        batches=batches,
        caches=caches,
        tenants=system,
        prompt_blocks=prompt_blocks,
        rng=random.Random(seed + 1),
        token_pool=pool,
        conversations=convs,
    )
