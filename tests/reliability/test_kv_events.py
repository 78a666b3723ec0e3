"""KV event ingestion against hostile and unlucky publishers, over loopback ZMQ: a flood of
20,000 malformed messages among valid batches; an engine restarting on the same endpoints
with its sequence numbers reset; lost batches; and a SIGKILLed ``kvpick worker sim``
restarted under a running ``kvpick epp``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import aiohttp
import harness as H
import msgpack
import pytest
import yaml
import zmq

from bench.procstat import free_port
from epp import metrics
from epp.hashing import block_hashes
from epp.kvevents.msgpack_codec import decode_batch, encode_batch
from epp.kvevents.publisher import ZmqEventPublisher
from epp.kvevents.subscriber import EventSource, KvEventSubscriber
from epp.kvevents.types import BlockRemoved, BlockStored, EventError, KvEvent
from epp.kvindex import KvIndex

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

BS = 4
W = "w"


def prompt(n: int) -> list[int]:
    """The tokens of prompt ``n``: two blocks no other prompt shares."""
    return [n * 10 + k for k in range(2 * BS)]


def stored(n: int, parent: int | None = None, block_size: int = BS) -> BlockStored:
    return BlockStored([n * 2 + 1, n * 2 + 2], parent, prompt(n), block_size)


def live(seq: int, events: list[KvEvent]) -> list[bytes]:
    """A well-formed live message: ``[topic, seq, batch]``."""
    return [b"", seq.to_bytes(8, "big"), encode_batch(events, 0.0)]


def depth(index: KvIndex, n: int) -> int:
    return index.find_matches(block_hashes(prompt(n), BS)).depth(W)


def dropped() -> Counter[str]:
    """``kvpick_kv_events_dropped_total`` by reason."""
    out: Counter[str] = Counter()
    for family in metrics.KV_EVENTS_DROPPED.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                out[s.labels["reason"]] += s.value
    return out


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Ticker:
    """Sleeps 10 ms in a loop; ``worst`` is the longest extra delay of a wake-up."""

    def __init__(self) -> None:
        self.worst, self._loop = 0.0, asyncio.get_running_loop()
        self._last = self._loop.time()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self._lap()

    def _lap(self) -> None:
        now = self._loop.time()
        self.worst, self._last = max(self.worst, now - self._last - 0.01), now

    def stop(self) -> None:
        self._lap()  # a tick that never came counts too
        self._task.cancel()


# ---------------------------------------------------------------------------- garbage

NOT_MSGPACK = (b"\xc1", b"\xc1\x00junk", b"\x93\xcb\x00", encode_batch([stored(1)], 0.0)[:-7])
NOT_A_BATCH = (42, "batch", None, [], [1.0], ["ts", []], [1.0, 5], {"ts": "x"})
BAD_HASHES = {"type": "BlockStored", "block_hashes": "x"}
BAD_EVENTS = [  # (event, reason): the batch is fine, the event is not
    (BAD_HASHES, "bad_event"),
    ({"type": "BlockStored", "block_hashes": [1], "block_size": "4"}, "bad_event"),
    ({"type": "BlockRemoved", "block_hashes": [None]}, "bad_event"),
    (["BlockStored", "not-a-list"], "bad_event"),
    (17, "bad_event"),
    ({"type": "BlockEvaporated"}, "unknown_event_type"),
    (["Nope", 1], "unknown_event_type"),
]
UNPLACEABLE: list[tuple[KvEvent, str]] = [  # decodable, but the index drops both blocks
    (stored(2, parent=0xDEAD), "unknown_parent"),
    (stored(3, block_size=BS * 2), "block_size_mismatch"),
    (BlockStored([7, 8], None, [1, 2, 3], BS), "token_count_mismatch"),
    (BlockRemoved([0xBEEF, 0xBEEF + 1]), "unknown_block"),
]


def garbage(rng: random.Random, seqs: Iterator[int]) -> tuple[list[bytes], Counter[str]]:
    """A malformed message and what it should add to the dropped counter. Those with a
    well-formed seq frame take the next number (a bad payload still uses up its seq)."""
    kind = rng.randrange(8)
    if kind == 0:  # wrong frame count
        frames = [rng.randbytes(rng.randrange(12)) for _ in range(rng.choice((1, 2, 4, 5, 7)))]
        return frames, Counter(bad_frame=1)
    if kind == 1:  # random frames; a second one of 8 bytes would read as a seq, so none is
        frames = [rng.randbytes(rng.choice((0, 3, 9, 20))) for _ in range(rng.randrange(1, 7))]
        return frames, Counter(bad_frame=1)
    if kind == 2:  # a seq frame that is not 8 bytes
        seq = rng.randbytes(rng.choice((0, 1, 4, 7, 9, 16)))
        return [b"", seq, live(0, [stored(0)])[2]], Counter(bad_frame=1)
    seq = next(seqs).to_bytes(8, "big")
    if kind == 3:
        return [b"", seq, rng.choice(NOT_MSGPACK)], Counter(bad_msgpack=1)
    if kind == 4:
        return [b"", seq, msgpack.packb(rng.choice(NOT_A_BATCH))], Counter(bad_batch=1)
    if kind == 5:
        bad, reason = rng.choice(BAD_EVENTS)
        return [b"", seq, msgpack.packb([0.0, [bad], 0])], Counter({reason: 1})
    if kind == 6:
        event, reason = rng.choice(UNPLACEABLE)
        return [b"", seq, encode_batch([event], 0.0)], Counter({reason: 2})
    while True:  # random bytes as the payload
        payload = rng.randbytes(rng.randrange(1, 64))
        try:
            decode_batch(payload)
        except EventError as exc:
            return [b"", seq, payload], Counter({exc.reason: 1})


async def test_twenty_thousand_garbage_frames_among_valid_batches() -> None:
    rng = random.Random(20_000)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        async with KvEventSubscriber(KvIndex(BS)) as sub:
            sub.add_worker(EventSource(W, f"tcp://127.0.0.1:{port}"))
            stats, seq = sub.stats(W), 0
            while stats.last_seq is None:  # ZMQ's slow-joiner window
                pub.send_multipart(live(seq, []))
                seq += 1
                await asyncio.sleep(0.02)
            await until(lambda: stats.last_seq == seq - 1, "the priming batches")
            batches_before, before = stats.batches, dropped()
            seqs = iter(range(seq, 1 << 40))
            messages: list[list[bytes]] = []
            expected: Counter[str] = Counter()
            kept: list[int] = []
            gone: list[int] = []
            for i in range(20_000):
                message, reasons = garbage(rng, seqs)
                messages.append(message)
                expected += reasons
                if i % 50 == 49:  # a valid batch: a new prompt, now and then one evicted
                    events: list[KvEvent] = [stored(100 + i)]
                    if i % 500 == 499:
                        gone.append(kept.pop(0))
                        events.insert(0, BlockRemoved(stored(gone[-1]).block_hashes))
                    payload = encode_batch(events, 0.0)
                    if i % 200 == 199:  # with a bad event in the same batch
                        ts, evs, rank = msgpack.unpackb(payload)
                        payload = msgpack.packb([ts, [*evs, BAD_HASHES], rank])
                        expected["bad_event"] += 1
                    messages.append([b"", next(seqs).to_bytes(8, "big"), payload])
                    kept.append(100 + i)
            last = next(seqs)
            messages.append(live(last, [stored(99)]))
            kept.append(99)
            sequenced = sum(len(m) == 3 and len(m[1]) == 8 for m in messages)

            # Queued at once (the loop blocked while sending): the subscriber faces the whole
            # flood as a backlog, which without yielding would be one long loop step.
            for message in messages:
                pub.send_multipart(message)
            ticker = Ticker()
            await until(lambda: stats.last_seq == last, "the last valid batch", timeout=60)
            ticker.stop()

            delta = dropped() - before
            assert delta == expected, (delta, expected)  # no internal_error among them
            assert stats.batches - batches_before == sequenced  # none lost, none skipped
            assert stats.gaps_cleared == 0 and stats.restarts == 0
            assert [n for n in kept if depth(sub.index, n) != 2] == [], "valid batches lost"
            assert [n for n in gone if depth(sub.index, n)] == [], "BlockRemoved not applied"
            assert sub.index.block_count(W) == 2 * len(kept)
            assert ticker.worst < 0.2, f"the event loop stalled for {ticker.worst:.3f} s"
            pub.send_multipart(live(last + 1, [stored(98)]))
            await until(lambda: depth(sub.index, 98) == 2, "a batch after the flood")
    finally:
        pub.close(0)
        ctx.term()


# ---------------------------------------------------------------------------- restarts, gaps


class Engine:
    """An engine's event side: the real publisher and replay socket on fixed ports, replaced
    by a new one (seq 0, empty buffer) on :meth:`restart`, as by a new process."""

    def __init__(self, buffer_steps: int = 1000) -> None:
        self.ports, self.buffer_steps = (free_port(), free_port()), buffer_steps
        self._bind()

    def _bind(self) -> None:
        # A context per life: destroying it waits until the listening sockets are really
        # closed (zmq_close returns before), so that the next life can bind the same ports.
        self.ctx = zmq.Context()
        events, replay = (f"tcp://*:{p}" for p in self.ports)
        self.pub = ZmqEventPublisher(
            events, replay, buffer_steps=self.buffer_steps, context=self.ctx
        )

    def source(self) -> EventSource:
        return EventSource(W, *(f"tcp://127.0.0.1:{p}" for p in self.ports))

    def restart(self) -> None:
        self.close()
        self._bind()

    def store(self, ns: Iterable[int], *, send: bool = True) -> int:
        seq = -1
        for n in ns:
            seq = self.pub.publish_events([stored(n)], send=send)
        return seq

    def close(self) -> None:
        if not self.ctx.closed:
            self.pub.close()
            self.ctx.destroy(linger=0)


async def store_until(engine: Engine, ns: Iterator[int], seen: Callable[[], bool]) -> list[int]:
    """Publish a batch of ``ns`` every 50 ms until ``seen()`` (a SUB gets only what is sent
    after it has (re)connected); returns the prompts published."""
    out: list[int] = []
    while not seen():
        assert len(out) < 200, "the subscriber never saw the publisher"
        out.append(next(ns))
        engine.store(out[-1:])
        await asyncio.sleep(0.05)
    return out


@pytest.mark.parametrize("unseen", [0, 12, 60])
async def test_restart_with_sequence_reset_replaces_the_workers_blocks(unseen: int) -> None:
    """The old process gets to seq ~40. The new one's first batches are missed (``unseen``
    kept for replay only, plus any sent before the SUB reconnected); replay from 0 brings
    them. With 60 unseen the first batch seen is beyond the old last seq + 1, as in a gap;
    the replayed batch at the old last seq, not the one applied, tells a restart."""
    engine = Engine()
    try:
        async with KvEventSubscriber(KvIndex(BS)) as sub:
            sub.add_worker(engine.source())
            stats = sub.stats(W)
            old = await store_until(engine, iter(range(1000)), lambda: stats.batches > 0)
            old += range(1000, 1040)
            last = engine.store(range(1000, 1040))
            await until(lambda: stats.last_seq == last, "the first life's batches")
            assert all(depth(sub.index, n) == 2 for n in old)
            assert 12 + 1 < last < 60 - 1  # 0 and 12 unseen: seq goes back; 60: it does not

            engine.restart()
            new = [old[-1], *range(2000, 2000 + unseen)]  # one block the old cache had too
            engine.store(new, send=False)
            seen = stats.batches
            new += await store_until(engine, iter(range(3000, 4000)), lambda: stats.batches > seen)
            new += range(4000, 4010)
            final = engine.store(range(4000, 4010))
            await until(lambda: stats.last_seq == final, "the second life's batches")

            assert (stats.restarts, stats.gaps_replayed, stats.gaps_cleared) == (1, 0, 0)
            assert [n for n in new if depth(sub.index, n) != 2] == [], "new blocks missing"
            stale = [n for n in old if n not in new and depth(sub.index, n)]
            assert stale == [], "the old process's blocks survived"
            assert sub.index.block_count(W) == 2 * len(new)
    finally:
        engine.close()


@pytest.mark.parametrize("buffer_steps", [1000, 8])
async def test_lost_batches_are_replayed_or_the_worker_cleared(buffer_steps: int) -> None:
    """12 batches are never sent. A replay buffer that still holds them recovers them; one
    of 8 steps cannot, so the pre-gap blocks are cleared and what replay had is kept."""
    engine = Engine(buffer_steps)
    try:
        async with KvEventSubscriber(KvIndex(BS)) as sub:
            sub.add_worker(engine.source())
            stats = sub.stats(W)
            before = await store_until(engine, iter(range(1000)), lambda: stats.batches > 0)
            before += range(1000, 1010)
            last = engine.store(range(1000, 1010))
            await until(lambda: stats.last_seq == last, "the batches before the gap")
            lost = list(range(2000, 2012))
            engine.store(lost, send=False)
            first = engine.store([3000])  # the replay request goes out when this arrives
            await until(lambda: stats.last_seq == first, "the batch after the gap")
            final = engine.store(range(3001, 3005))
            await until(lambda: stats.last_seq == final, "the batches after it")

            if buffer_steps > len(lost):
                assert (stats.gaps_replayed, stats.gaps_cleared) == (1, 0)
                present, absent = before + lost, []
            else:  # the buffer held batch 3000 and the last 7 lost ones
                assert (stats.gaps_replayed, stats.gaps_cleared) == (0, 1)
                present, absent = lost[-7:], before + lost[:-7]
            present += range(3000, 3005)
            assert [n for n in present if depth(sub.index, n) != 2] == []
            assert [n for n in absent if depth(sub.index, n)] == []
            assert sub.index.block_count(W) == 2 * len(present)
    finally:
        engine.close()


# ---------------------------------------------------------------------------- whole processes


async def test_sigkilled_sim_restarted_on_its_ports_leaves_only_its_new_blocks_in_the_epp(
    tmp_path: Path, tiny_model: Path
) -> None:
    sim = H.SimProcess(tmp_path, tiny_model)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [sim.entry()]}))
    epp = H.EppProcess(tmp_path, endpoints, tiny_model)

    async def settled_blocks() -> int:
        """The sim's cached blocks as the EPP reports them, once they stop changing."""
        seen = [-1]
        while len(seen) < 100:
            seen.append(sum(w["cached_blocks"] for w in await epp.pool()))
            if seen[-1] == seen[-2] > 0:
                return seen[-1]
            await asyncio.sleep(0.3)
        raise AssertionError(f"the EPP's view of the sim never settled: {seen}")

    async def restarts() -> float:
        return (await epp.metrics()).get("kvpick_kv_event_publisher_restarts_total", 0.0)

    try:
        await sim.start()
        await epp.start()
        async with aiohttp.ClientSession() as http:

            async def ask(i: int) -> None:
                url = f"http://{sim.address}/v1/chat/completions"
                async with http.post(url, json=H.chat(i, system=i)) as resp:
                    assert resp.status == 200, await resp.text()

            for i in range(6):  # six prompts that share (almost) nothing
                await ask(i)
            per = await settled_blocks() / 6
            assert per > 20

            sim.kill()
            sim = H.SimProcess(tmp_path, tiny_model, sim.port, sim.events_port, sim.replay_port)
            await sim.start()
            # Batches published before the EPP's SUB has reconnected are lost; the next one
            # tells it of the restart, and replay from seq 0 brings back the rest.
            asked = 0
            while not await restarts():
                assert asked < 20, f"the EPP never saw the restart: {epp.log()[-3000:]}"
                await ask(100 + asked)
                asked += 1
                await asyncio.sleep(0.2)
            after = await settled_blocks()
        assert await restarts() == 1
        assert abs(after - asked * per) < per / 2, (per, asked, after)
    finally:
        epp.stop()
        sim.stop()
