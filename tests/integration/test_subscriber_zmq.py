"""The KV event subscriber on real ZMQ sockets, against publishers in other processes.

Each test compares the subscriber-fed index with a reference index fed the same generated
batches directly (no sockets), with the clears the scenario calls for. Publishers bind on
random ports of the loopback interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import sys
import time

import msgpack
import pytest
import zmq
from prometheus_client import REGISTRY

from epp.hashing import block_hashes
from epp.kvevents.msgpack_codec import encode_batch
from epp.kvevents.subscriber import EventSource, KvEventSubscriber
from epp.kvevents.types import BlockStored
from epp.kvindex import KvIndex

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import eventgen

BS = 4
PROC = pathlib.Path(__file__).resolve().parent / "kv_publisher_proc.py"


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class PublisherProc:
    """A publisher process (kv_publisher_proc.py) and the batches it has published."""

    def __init__(self, seed: int, replay: bool = True) -> None:
        self.seed = seed
        self.replay = replay
        self.segments: list[tuple[int, int]] = [(seed, 0)]  # (seed, batches published)

    async def start(self) -> PublisherProc:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROC),
            "tcp://*:0",
            "tcp://*:0" if self.replay else "-",
            str(self.seed),
            str(BS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode().split()
        assert line[0] == "ready", line
        port = line[1].rsplit(":", 1)[1]
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.replay_endpoint = (
            None if line[2] == "-" else f"tcp://127.0.0.1:{line[2].rsplit(':', 1)[1]}"
        )
        return self

    async def command(self, **cmd) -> int:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode().split()
        assert line and line[0] == "done", line
        return int(line[1])

    async def publish(self, count: int, drop: tuple[int, ...] = ()) -> int:
        seed, n = self.segments[-1]
        self.segments[-1] = (seed, n + count)
        return await self.command(op="publish", count=count, drop=list(drop))

    async def restart(self, seed: int) -> None:
        self.segments.append((seed, 0))
        await self.command(op="restart", seed=seed)

    def source(self, worker: str, replay: bool = True) -> EventSource:
        return EventSource(worker, self.endpoint, self.replay_endpoint if replay else None)

    def kill(self) -> None:
        self.proc.kill()

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(AssertionError, BrokenPipeError, ConnectionResetError):
                await self.command(op="exit")
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


def reference(segments: list[tuple[int, int]], worker: str = "w") -> KvIndex:
    """The index the subscriber should end up with: each segment's batches applied in order,
    the worker cleared between segments (a restart)."""
    index = KvIndex(BS)
    index.add_worker(worker)
    for seed, count in segments:
        index.clear_worker(worker)
        gen = eventgen.batches(seed, block_size=BS)
        for _ in range(count):
            for event in next(gen):
                index.apply(worker, event)
    return index


def assert_same(
    index: KvIndex,
    expected: KvIndex,
    segments: list[tuple[int, int]],
    worker: str = "w",
    counts: bool = True,
) -> None:
    """Same block count (optionally) and the same match for every prompt the run issued."""
    if counts:
        assert index.block_count(worker) == expected.block_count(worker)
    matched = 0
    for seed, n in segments:
        for tokens in eventgen.probe_prompts(seed, n, block_size=BS):
            keys = block_hashes(tokens, BS)
            want = expected.find_matches(keys).depth(worker)
            assert index.find_matches(keys).depth(worker) == want
            matched += want > 0
    assert matched, "the probes matched nothing: the comparison would be vacuous"


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def connect(sub: KvEventSubscriber, pub: PublisherProc, worker: str = "w") -> None:
    """Publish until the subscriber has seen a batch (ZMQ subscriptions take a moment)."""
    deadline = time.monotonic() + 30
    while sub.stats(worker).last_seq is None:
        assert time.monotonic() < deadline, "subscriber never connected"
        await pub.publish(1)
        await asyncio.sleep(0.05)


async def prime(sub: KvEventSubscriber, pub: zmq.Socket, events: list) -> int:
    """Send batches 0, 1, ... of ``events`` on a raw PUB socket until the subscriber has seen
    one (ZMQ subscriptions take a moment); returns the next sequence number."""
    seq = 0
    deadline = time.monotonic() + 10
    while sub.stats("w").last_seq is None:
        assert time.monotonic() < deadline, "subscriber never connected"
        pub.send_multipart([b"", seq.to_bytes(8, "big"), encode_batch(events, 0.0)])
        seq += 1
        await asyncio.sleep(0.05)
    return seq


@pytest.fixture
async def subscriber():
    index = KvIndex(BS)
    sub = KvEventSubscriber(index, replay_timeout=1.0)
    await sub.start()
    yield sub
    await sub.close()


async def test_thousands_of_batches_with_lost_ones_recovered_by_replay(subscriber):
    pub = await PublisherProc(seed=11).start()
    try:
        subscriber.add_worker(pub.source("w"))
        await connect(subscriber, pub)
        replayed_before = counter("kvpick_kv_event_gaps_total", outcome="replayed")
        base = await pub.publish(0)
        drops = (base + 5, base + 6, base + 7, base + 300, base + 1200, base + 2999)
        last = await pub.publish(3000, drop=drops)
        await pub.publish(1)  # so that the final dropped batch is followed by a live one
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="all batches")
        stats = subscriber.stats("w")
        assert stats.gaps_replayed == 4  # 5-7 is one gap
        assert stats.gaps_cleared == 0
        assert stats.replayed_batches >= len(drops)
        assert counter("kvpick_kv_event_gaps_total", outcome="replayed") - replayed_before == 4
        assert_same(subscriber.index, reference(pub.segments), pub.segments)
    finally:
        await pub.close()


async def test_late_join_replays_the_history(subscriber):
    pub = await PublisherProc(seed=12).start()
    try:
        await pub.publish(120)  # nobody listening: only the replay buffer has these
        subscriber.add_worker(pub.source("w"))
        await connect(subscriber, pub)
        last = await pub.publish(10) - 1
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="catch-up")
        assert subscriber.stats("w").replayed_batches >= 120
        assert_same(subscriber.index, reference(pub.segments), pub.segments)
    finally:
        await pub.close()


async def test_an_idle_publishers_history_is_replayed_at_subscribe(subscriber):
    pub = await PublisherProc(seed=16).start()
    try:
        last = await pub.publish(80) - 1  # and nothing after: the engine is idle
        subscriber.add_worker(pub.source("w"))
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="replay at subscribe")
        assert_same(subscriber.index, reference(pub.segments), pub.segments)
        # Batches published from now on are applied once, whether or not the replay saw them.
        dup_before = counter("kvpick_kv_events_ignored_total", reason="duplicate")
        last = await pub.publish(30) - 1
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="live batches")
        stats = subscriber.stats("w")
        assert stats.restarts == 0 and stats.gaps_cleared == 0
        assert counter("kvpick_kv_events_ignored_total", reason="duplicate") >= dup_before
        assert_same(subscriber.index, reference(pub.segments), pub.segments)
    finally:
        await pub.close()


async def test_publisher_restart_clears_the_worker(subscriber):
    pub = await PublisherProc(seed=13).start()
    try:
        subscriber.add_worker(pub.source("w"))
        await connect(subscriber, pub)
        await pub.publish(200)
        restarts_before = counter("kvpick_kv_event_publisher_restarts_total")
        await pub.restart(seed=14)
        last = await pub.publish(150) - 1
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="post-restart")
        assert subscriber.stats("w").restarts == 1
        assert counter("kvpick_kv_event_publisher_restarts_total") - restarts_before == 1
        expected = reference(pub.segments)
        assert_same(subscriber.index, expected, pub.segments)
        # Nothing of the first life survives: blocks only the old cache had are gone.
        old_only = [
            p
            for p in eventgen.probe_prompts(13, pub.segments[0][1], block_size=BS)
            if expected.find_matches(block_hashes(p, BS)).depth("w") == 0
        ]
        assert old_only
        for tokens in old_only:
            assert subscriber.index.find_matches(block_hashes(tokens, BS)).depth("w") == 0
    finally:
        await pub.close()


async def test_gap_without_replay_socket_clears_the_worker(subscriber):
    pub = await PublisherProc(seed=15).start()
    try:
        subscriber.add_worker(pub.source("w", replay=False))
        await connect(subscriber, pub)
        before = await pub.publish(0)
        await pub.publish(100)
        cleared_before = counter("kvpick_kv_event_gaps_total", outcome="cleared")
        last = await pub.publish(50, drop=(before + 100,)) - 1
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="after the gap")
        assert subscriber.stats("w").gaps_cleared == 1
        assert counter("kvpick_kv_event_gaps_total", outcome="cleared") - cleared_before == 1
        # Expected: the batches before the gap applied, the worker cleared, the lost batch
        # missing, and the 49 batches after it applied. Stores after the clear whose
        # parents the worker no longer holds may or may not be recorded (depending on
        # whether the cleared blocks were swept yet), but can never add to a match, so the
        # comparison is on matches only.
        expected = KvIndex(BS)
        expected.add_worker("w")
        gen = eventgen.batches(15, block_size=BS)
        for n in range(before + 150):
            events = next(gen)
            if n == before + 100:
                expected.clear_worker("w")
                continue
            for event in events:
                expected.apply("w", event)
        assert_same(subscriber.index, expected, [(15, before + 150)], counts=False)
        stale = [
            p
            for p in eventgen.probe_prompts(15, before + 100, block_size=BS)
            if expected.find_matches(block_hashes(p, BS)).depth("w") == 0
        ]
        assert stale  # prompts cached before the gap and not since
    finally:
        await pub.close()


async def test_vanished_worker_is_removed_and_others_continue(subscriber):
    gone = await PublisherProc(seed=16).start()
    stays = await PublisherProc(seed=17).start()
    try:
        subscriber.add_worker(gone.source("gone"))
        subscriber.add_worker(stays.source("w"))
        await connect(subscriber, gone, "gone")
        await connect(subscriber, stays)
        await gone.publish(50)
        await wait_for(lambda: subscriber.index.block_count("gone") > 0, what="gone's blocks")
        gone.kill()
        await gone.proc.wait()
        await subscriber.remove_worker("gone")
        assert not subscriber.index.has_worker("gone")
        assert "gone" not in subscriber.workers()
        for tokens in eventgen.probe_prompts(16, 50, block_size=BS):
            assert "gone" not in subscriber.index.find_matches(block_hashes(tokens, BS)).depths
        last = await stays.publish(100) - 1
        await wait_for(lambda: subscriber.stats("w").last_seq == last, what="the other worker")
        assert_same(subscriber.index, reference(stays.segments), stays.segments)
        await wait_for(lambda: not subscriber.index.needs_sweep, what="the sweep")
    finally:
        await gone.close()
        await stays.close()


async def test_replay_socket_that_never_answers_clears_after_timeout():
    index = KvIndex(BS)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    silent = ctx.socket(zmq.ROUTER)  # accepts the request, never replies
    silent_port = silent.bind_to_random_port("tcp://127.0.0.1")
    source = EventSource("w", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{silent_port}")
    block = BlockStored([1], None, [1, 2, 3, 4], BS)
    try:
        async with KvEventSubscriber(index, replay_timeout=0.3) as sub:
            sub.add_worker(source)
            seq = await prime(sub, pub, [block])
            # seq 0..n were sent; the subscriber joined at some seq; skip one now.
            await wait_for(lambda: index.block_count("w") == 1, what="the first block")
            seq += 1
            later = BlockStored([2], None, [5, 6, 7, 8], BS)
            pub.send_multipart([b"", seq.to_bytes(8, "big"), encode_batch([later], 0.0)])
            await wait_for(lambda: sub.stats("w").last_seq == seq, what="the batch after the gap")
            assert sub.stats("w").gaps_cleared >= 1
            # Cleared, then the batch after the gap applied: only block 2 is left.
            assert index.block_count("w") == 1
            assert index.find_matches(block_hashes([5, 6, 7, 8], BS)).depth("w") == 1
            assert index.find_matches(block_hashes([1, 2, 3, 4], BS)).depth("w") == 0
    finally:
        pub.close(0)
        silent.close(0)
        ctx.term()


async def test_corrupt_frames_are_counted_and_dropped():
    index = KvIndex(BS)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    good = BlockStored([7], None, [1, 2, 3, 4], BS)
    try:
        async with KvEventSubscriber(index) as sub:
            sub.add_worker(EventSource("w", f"tcp://127.0.0.1:{port}"))
            seq = await prime(sub, pub, [])
            before = {
                r: counter("kvpick_kv_events_dropped_total", reason=r)
                for r in ("bad_frame", "bad_msgpack", "bad_batch", "bad_event", "unknown_parent")
            }
            bad_event = msgpack.packb([0.0, [{"type": "BlockStored", "block_hashes": "x"}], 0])
            orphan = BlockStored([8], 999, [1, 2, 3, 4], BS)
            messages = [
                [b"only-two", b"frames"],
                [b"", b"short", b"payload"],
                [b"", (seq).to_bytes(8, "big"), b"\xc1\xc1 not msgpack"],
                [b"", (seq + 1).to_bytes(8, "big"), msgpack.packb(42)],
                [b"", (seq + 2).to_bytes(8, "big"), bad_event],
                [b"", (seq + 3).to_bytes(8, "big"), encode_batch([orphan], 0.0)],
                [b"", (seq + 4).to_bytes(8, "big"), encode_batch([good], 0.0)],
            ]
            for message in messages:
                pub.send_multipart(message)
            await wait_for(lambda: sub.stats("w").last_seq == seq + 4, what="the good batch")
            assert index.find_matches(block_hashes([1, 2, 3, 4], BS)).depth("w") == 1
            delta = {
                r: counter("kvpick_kv_events_dropped_total", reason=r) - v
                for r, v in before.items()
            }
            assert delta == {
                "bad_frame": 2,
                "bad_msgpack": 1,
                "bad_batch": 1,
                "bad_event": 1,
                "unknown_parent": 1,
            }
            assert sub.stats("w").gaps_cleared == 0
    finally:
        pub.close(0)
        ctx.term()


async def test_a_flood_of_batches_does_not_starve_the_event_loop():
    """While thousands of queued batches are applied, other coroutines keep running."""
    index = KvIndex(BS)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    gen = eventgen.batches(21, block_size=BS)
    payloads = [encode_batch(next(gen), 0.0) for _ in range(3000)]
    try:
        async with KvEventSubscriber(index, time_slice=0.002) as sub:
            sub.add_worker(EventSource("w", f"tcp://127.0.0.1:{port}"))
            seq = await prime(sub, pub, [])
            first = seq
            for payload in payloads:
                pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
                seq += 1
            ticks = 0
            worst = 0.0
            loop = asyncio.get_running_loop()
            while sub.stats("w").last_seq != seq - 1:
                t = loop.time()
                await asyncio.sleep(0)
                worst = max(worst, loop.time() - t)
                ticks += 1
            busy = sub.stats("w").batches
            assert busy >= len(payloads)
            # Without yielding, the whole flood would be one loop step.
            assert ticks > 20, ticks
            assert worst < 0.25, worst
            assert index.block_count("w") > 0 and first > 0
    finally:
        pub.close(0)
        ctx.term()


async def test_a_live_copy_of_a_batch_replayed_at_subscribe_is_not_a_restart():
    import zmq.asyncio

    from epp.kvevents import frames

    index = KvIndex(BS)
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    router = ctx.socket(zmq.ROUTER)
    replay_port = router.bind_to_random_port("tcp://127.0.0.1")
    payloads = [
        encode_batch([BlockStored([100 + i], None, list(range(4 * i, 4 * i + 4)), BS)], float(i))
        for i in range(6)
    ]

    async def answer() -> None:  # the replay buffer holds batches 0..3
        identity, start = frames.parse_replay_request(await router.recv_multipart())
        for seq in range(start, 4):
            await router.send_multipart([identity, b"", frames.seq_bytes(seq), payloads[seq]])
        await router.send_multipart([identity, b"", frames.END_SEQ, b""])

    server = asyncio.ensure_future(answer())
    source = EventSource("w", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}")
    try:
        async with KvEventSubscriber(index, replay_timeout=2.0) as sub:
            sub.add_worker(source)
            await wait_for(lambda: sub.stats("w").last_seq == 3, what="replay at subscribe")
            await server
            # Batch 3 again (it was in flight during the replay), then 4 and 5.
            deadline = time.monotonic() + 10
            while sub.stats("w").last_seq != 5:
                assert time.monotonic() < deadline, "live batches never arrived"
                for seq in (3, 4, 5):
                    await pub.send_multipart([b"", frames.seq_bytes(seq), payloads[seq]])
                await asyncio.sleep(0.05)
            stats = sub.stats("w")
            assert stats.restarts == 0 and stats.gaps_cleared == 0
            assert index.block_count("w") == 6
    finally:
        server.cancel()
        pub.close(0)
        router.close(0)
        ctx.term()
