"""The simulator's KV events, decoded and indexed by the EPP's own subscriber and index,
agree with what the simulator really caches: after a long random workload with evictions,
in both event shapes, and again after a gap the subscriber recovers through replay."""

from __future__ import annotations

import asyncio
import pathlib
import random
import sys

import aiohttp
import pytest

from epp.hashing import block_hashes
from epp.kvevents.subscriber import EventSource, KvEventSubscriber
from epp.kvindex import KvIndex

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sim_helpers import loopback, running_sim, wait_for

BS = 4
EVENTS = '{"enable_kv_cache_events": true, "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"}'


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts over a few shared prefixes (hits) and fresh tails (misses and evictions)."""
    roots = [[rng.randrange(1, 5000) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
    out = []
    for _ in range(n):
        root = rng.choice(roots)
        tail = [rng.randrange(1, 5000) for _ in range(rng.randrange(1, 30))]
        out.append(root[: rng.randrange(1, len(root) + 1)] + tail)
    return out


async def _drive(port: int, prompts: list[list[int]], concurrency: int = 8) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with aiohttp.ClientSession() as session:

        async def one(prompt: list[int], i: int) -> dict:
            async with (
                sem,
                session.post(url, json={"prompt": prompt, "max_tokens": 1 + i % 7}) as r,
            ):
                assert r.status == 200, await r.text()
                return await r.json()

        return await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts)))


def _agree(app, index: KvIndex, worker, prompts: list[list[int]]) -> None:
    engine = app.engines[0]
    cache = engine.cache
    assert index.block_count(worker) == len(cache.cached_hashes())
    for prompt in prompts:
        digests = engine.hasher.digests(prompt)
        keys = block_hashes(prompt, BS)
        got = index.find_matches(keys).depth(worker) if len(keys) else 0
        assert got == cache.match(digests), prompt


@pytest.mark.parametrize("shape", ["map", "array"])
async def test_index_matches_the_cache_after_a_random_workload(shape):
    rng = random.Random(7)
    prompts = _prompts(rng, 300)
    args = ("--block-size", str(BS), "--num-blocks", "48", "--speedup", "2000")
    async with running_sim(*args, "--kv-events-config", EVENTS, "--kv-events-shape", shape) as app:
        pub = app.publishers[0]
        index = KvIndex(BS)
        sub = KvEventSubscriber(index)
        sub.add_worker(EventSource("w", loopback(pub.endpoint), loopback(pub.replay_endpoint)))
        try:
            await asyncio.sleep(0.3)  # PUB/SUB joins before the first batch
            results = await _drive(app.port, prompts)
            assert sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results) > 0
            await wait_for(lambda: sub.stats("w").last_seq == pub.next_seq - 1, what="all batches")
            assert app.engines[0].cache.used_blocks == 0  # every request released its blocks
            assert app.engines[0].cache.evictions > 0  # the workload overflows the cache
            _agree(app, index, "w", prompts)
            assert sub.stats("w").batches > 0
        finally:
            await sub.close()


async def test_a_gap_is_recovered_through_replay():
    rng = random.Random(11)
    args = ("--block-size", str(BS), "--num-blocks", "40", "--speedup", "2000")
    async with running_sim(*args, "--kv-events-config", EVENTS) as app:
        pub = app.publishers[0]
        engine = app.engines[0]
        dropped = {"left": 0}

        def publish(events):
            send = dropped["left"] == 0
            if not send:
                dropped["left"] -= 1
            pub.publish_events(events, send=send)

        engine._publish = publish
        index = KvIndex(BS)
        sub = KvEventSubscriber(index)
        sub.add_worker(EventSource("w", loopback(pub.endpoint), loopback(pub.replay_endpoint)))
        try:
            await asyncio.sleep(0.3)
            first = _prompts(rng, 60)
            await _drive(app.port, first)
            dropped["left"] = 5  # the next five batches are kept for replay but never sent
            second = _prompts(rng, 120)
            await _drive(app.port, second)
            await wait_for(lambda: sub.stats("w").last_seq == pub.next_seq - 1, what="catch-up")
            assert dropped["left"] == 0
            assert sub.stats("w").gaps_replayed >= 1
            _agree(app, index, "w", first + second)
        finally:
            await sub.close()
