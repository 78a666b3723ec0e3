"""Static discovery driving the KV event subscriber over real ZMQ: an endpoint added to the
endpoints file is subscribed (its blocks reach the index under the worker (address, rank)),
and an endpoint removed from the file leaves the index at once."""

from __future__ import annotations

import pathlib
import sys

from epp.discovery.kv_sources import sync_event_sources
from epp.discovery.static import EndpointsFileWatcher
from epp.kvevents.subscriber import KvEventSubscriber
from epp.kvindex import KvIndex

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_subscriber_zmq import BS, PublisherProc, assert_same, reference, wait_for


def entry(address: str, pub: PublisherProc) -> str:
    return (
        f"  - address: {address}\n"
        f"    kv_events: {pub.endpoint}\n"
        f"    replay: {pub.replay_endpoint}\n"
    )


async def test_endpoints_file_adds_and_removes_event_sources(tmp_path):
    index = KvIndex(BS)
    sub = KvEventSubscriber(index, replay_timeout=1.0)
    await sub.start()
    pubs = [await PublisherProc(seed=71).start(), await PublisherProc(seed=72).start()]
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints:\n" + entry("10.0.0.1:8000", pubs[0]))

    async def on_change(change) -> None:
        await sync_event_sources(sub, change)

    watcher = EndpointsFileWatcher(str(path), on_change, interval=0.05)
    await watcher.start()
    a, b = ("10.0.0.1:8000", 0), ("10.0.0.2:8000", 0)
    try:
        assert index.workers() == [a]
        path.write_text(
            "endpoints:\n" + entry("10.0.0.1:8000", pubs[0]) + entry("10.0.0.2:8000", pubs[1])
        )
        await wait_for(lambda: index.has_worker(b), 10, "the second endpoint to be subscribed")

        # The first batches may be published before the SUB sockets are connected: the
        # subscriber's late-join replay recovers them, so every batch reaches the index.
        await pubs[0].publish(40)
        await pubs[1].publish(40)
        await wait_for(lambda: sub.stats(a).last_seq == 39, 30, "worker a's batches")
        await wait_for(lambda: sub.stats(b).last_seq == 39, 30, "worker b's batches")
        assert_same(index, reference(pubs[0].segments, a), pubs[0].segments, a)
        assert_same(index, reference(pubs[1].segments, b), pubs[1].segments, b)

        path.write_text("endpoints:\n" + entry("10.0.0.2:8000", pubs[1]))
        await wait_for(lambda: not index.has_worker(a), 10, "the removed endpoint to leave")
        assert index.block_count(a) == 0 and index.block_count(b) > 0
    finally:
        await watcher.close()
        await sub.close()
        for pub in pubs:
            await pub.close()
