"""The KV event subscriber: keeps a :class:`KvIndex` in step with every worker's publisher.

One asyncio task per worker publisher (one per (endpoint, dp rank)) holds a ZMQ SUB socket
connected to that rank's events endpoint and applies each batch to the index, tracking the
publisher's sequence numbers (specs/kv-events.md §1.5):

* **Gap** (a batch arrives with ``seq > last + 1``): the missing range is requested from the
  worker's replay socket (a DEALER to its ROUTER), applied in order, and the live batch after
  it; if the replay cannot cover the whole range (no replay socket, timeout, batches already
  dropped from the worker's buffer) the worker's blocks are cleared, since its cache state
  is unknown, and the gap is counted as ``cleared``.
* **Restart** (``seq <= last``: the engine restarted and numbers from 0 again): the worker's
  blocks are cleared, and the new process's earlier batches are replayed when it has any.
  A restarted engine may also already be past ``last + 1`` when its first batch arrives;
  so a gap's replay starts at ``last``, and a batch ``last`` that differs from the one
  applied means a restart too.
* **Joining late** (the first batch seen has ``seq > 0``): earlier batches are replayed when
  available; nothing is cleared, as nothing was known.
* **Subscribing** (a worker added, e.g. after the EPP itself restarted): everything the
  worker's replay buffer holds is asked for at once, without waiting for its next batch, so
  an idle engine's cache is known as soon as it answers. A live batch that was published
  while that replay ran arrives twice; it is recognised by its payload (the same bytes under
  the same number) and applied once.

Nothing stalls the event loop for long: a task yields after ``time_slice`` seconds of work
(counted as back-pressure when batches are still waiting), ZMQ's receive high-water mark
bounds what queues up (batches dropped there show up as a gap and are replayed), and the
index's retired worker bits are swept in bounded steps by a maintenance task. Corrupt input
(bad frames, undecodable batches or events, events the index cannot place) is counted in
``kvpick_kv_events_dropped_total{reason}`` and dropped; nothing raises out of a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from epp import metrics
from epp.kvevents import frames
from epp.kvevents.endpoints import offset_endpoint
from epp.kvevents.msgpack_codec import decode_batch
from epp.kvevents.types import EventError
from epp.kvindex import KvIndex
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_REPLAY_TAIL = 64
"""Batches of the replay at subscribe remembered to recognise their live duplicates."""


@dataclass(frozen=True, slots=True)
class EventSource:
    """Where one worker (an engine's data-parallel rank) publishes its KV events."""

    worker: Hashable
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""

    @classmethod
    def for_rank(
        cls,
        worker: Hashable,
        endpoint: str,
        replay_endpoint: str | None,
        dp_rank: int,
        topic: str = "",
    ) -> EventSource:
        """The source of rank ``dp_rank``, given rank 0's endpoints (ports offset by rank)."""
        return cls(
            worker,
            offset_endpoint(endpoint, dp_rank),
            None if replay_endpoint is None else offset_endpoint(replay_endpoint, dp_rank),
            topic,
        )


@dataclass(slots=True)
class SourceStats:
    """What one worker's stream has done so far."""

    last_seq: int | None = None
    topic: bytes = b""
    batches: int = 0
    replayed_batches: int = 0
    gaps_replayed: int = 0
    gaps_cleared: int = 0
    restarts: int = 0
    last_payload: bytes = field(default=b"", repr=False)
    replayed_tail: dict[int, bytes] = field(default_factory=dict, repr=False)
    """The last batches of the replay at subscribe, by seq: their live copies are duplicates."""


class KvEventSubscriber:
    """Feeds a :class:`KvIndex` from worker publishers; see the module docstring.

    Use inside a running event loop: ``await start()``, then :meth:`add_worker` /
    :meth:`remove_worker` as workers come and go, and ``await close()`` at the end.
    """

    def __init__(
        self,
        index: KvIndex,
        *,
        replay_timeout: float = 2.0,
        time_slice: float = 0.002,
        rcvhwm: int = 100_000,
        max_message_bytes: int = 256 << 20,
        sweep_budget: int = 2_000,
        sweep_interval: float = 0.05,
    ) -> None:
        self.index = index
        self.replay_timeout = replay_timeout
        self.time_slice = time_slice
        self.rcvhwm = rcvhwm
        self.max_message_bytes = max_message_bytes
        self.sweep_budget = sweep_budget
        self.sweep_interval = sweep_interval
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}
        self._sources: dict[Hashable, EventSource] = {}
        self._stats: dict[Hashable, SourceStats] = {}
        self._maintenance: asyncio.Task[None] | None = None
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain(), name="kv-index-sweep")

    async def close(self) -> None:
        """Stop every task and close the sockets (the index keeps its contents)."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks.values())
        if self._maintenance is not None:
            tasks.append(self._maintenance)
        await cancel_and_wait(*tasks)
        self._tasks.clear()
        metrics.KV_EVENT_WORKERS.set(0)
        self._ctx.term()

    async def __aenter__(self) -> KvEventSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- workers

    def add_worker(self, source: EventSource) -> None:
        """Subscribe to a worker's publisher (replacing any earlier source for it)."""
        if self._closed:
            raise RuntimeError("subscriber is closed")
        old = self._tasks.pop(source.worker, None)
        if old is not None:
            old.cancel()
            self.index.clear_worker(source.worker)
        self.index.add_worker(source.worker)
        self._sources[source.worker] = source
        self._stats[source.worker] = SourceStats(topic=source.topic.encode("utf-8"))
        self._tasks[source.worker] = asyncio.create_task(
            self._run(source), name=f"kv-events {source.worker}"
        )
        metrics.KV_EVENT_WORKERS.set(len(self._tasks))
        log.info(
            "subscribed to KV events of %s at %s (replay: %s)",
            source.worker,
            source.endpoint,
            source.replay_endpoint or "none",
        )

    async def remove_worker(self, worker: Hashable) -> None:
        """Unsubscribe and drop the worker's blocks from the index at once."""
        task = self._tasks.pop(worker, None)
        self._sources.pop(worker, None)
        self.index.remove_worker(worker)
        if task is not None:
            await cancel_and_wait(task)
            log.info("unsubscribed from KV events of %s; its blocks left the index", worker)
        metrics.KV_EVENT_WORKERS.set(len(self._tasks))

    def workers(self) -> list[Hashable]:
        return list(self._tasks)

    def stats(self, worker: Hashable) -> SourceStats:
        return self._stats[worker]

    # ---------------------------------------------------------------- the task

    async def _run(self, source: EventSource) -> None:
        stats = self._stats[source.worker]
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sub.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sub.setsockopt(zmq.SUBSCRIBE, stats.topic)
        sub.connect(source.endpoint)
        loop = asyncio.get_running_loop()
        try:
            if source.replay_endpoint is not None:
                await self._replay_at_subscribe(source, stats)
            slice_start = loop.time()
            while True:
                message = await sub.recv_multipart()
                try:
                    await self._on_message(source, stats, message)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not end the worker's stream
                    log.exception("error handling a KV event batch from %s", source.worker)
                    metrics.KV_EVENTS_DROPPED.labels("internal_error").inc()
                if loop.time() - slice_start > self.time_slice:
                    if sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        metrics.KV_EVENT_BACKPRESSURE.inc()
                    await asyncio.sleep(0)
                    slice_start = loop.time()
        finally:
            sub.close(linger=0)

    async def _on_message(
        self, source: EventSource, stats: SourceStats, message: list[bytes]
    ) -> None:
        try:
            live = frames.parse_live(message)
        except EventError as exc:
            metrics.KV_EVENTS_DROPPED.labels(exc.reason).inc()
            log.debug("bad frame from %s: %s", source.worker, exc)
            return
        if source.topic and live.topic != stats.topic:
            metrics.KV_EVENTS_IGNORED.labels("other_topic").inc()
            return
        seq = live.seq
        last = stats.last_seq
        if last is None:
            if seq > 0:
                await self._catch_up(source, stats, 0, seq, "join")
        elif seq <= last:
            if stats.replayed_tail.get(seq) == live.payload:
                metrics.KV_EVENTS_IGNORED.labels("duplicate").inc()
                return  # published during the replay at subscribe, and applied from it
            await self._restart(source, stats, seq)
        elif seq > last + 1:
            await self._catch_up(source, stats, last + 1, seq, "gap")
        if stats.last_seq is None or seq > stats.last_seq:
            self._apply(source, stats, seq, live.payload, "live")

    async def _replay_at_subscribe(self, source: EventSource, stats: SourceStats) -> None:
        items = await self._fetch_replay(source, 0, quiet=True)
        if not items or stats.last_seq is not None:
            return
        applied = 0
        for seq, payload in items:
            if stats.last_seq is None or seq > stats.last_seq:
                self._apply(source, stats, seq, payload, "replay")
                applied += 1
        stats.replayed_tail = dict(items[-_REPLAY_TAIL:])
        log.info(
            "KV events of %s: %d batches (up to %d) replayed at subscribe",
            source.worker,
            applied,
            stats.last_seq,
        )

    async def _restart(self, source: EventSource, stats: SourceStats, seq: int) -> None:
        log.warning(
            "KV event publisher of %s restarted (seq %d after %d): clearing its blocks",
            source.worker,
            seq,
            stats.last_seq,
        )
        metrics.KV_EVENT_RESTARTS.inc()
        stats.restarts += 1
        stats.last_seq = None
        self.index.clear_worker(source.worker)
        if seq > 0:
            await self._catch_up(source, stats, 0, seq, "restart")

    async def _catch_up(
        self, source: EventSource, stats: SourceStats, start: int, upto: int, why: str
    ) -> None:
        """Replay batches ``start .. upto-1``; clear the worker if they cannot all be had."""
        if why == "gap":
            # Also fetch the last batch applied: another payload under its number means
            # a restarted publisher (it numbers from 0 again, and is already past it).
            items = await self._fetch_replay(source, start - 1)
            if items and items[0][0] == start - 1 and items[0][1] != stats.last_payload:
                await self._restart(source, stats, upto)
                return
        else:
            items = await self._fetch_replay(source, start)
        wanted = [(s, p) for s, p in (items or ()) if start <= s < upto]
        covered = len(wanted) == upto - start and all(
            s == start + i for i, (s, _) in enumerate(wanted)
        )
        if why == "gap":
            if covered:
                metrics.KV_EVENT_GAPS.labels("replayed").inc()
                stats.gaps_replayed += 1
                log.info(
                    "KV events of %s: recovered batches %d-%d through replay",
                    source.worker,
                    start,
                    upto - 1,
                )
            else:
                metrics.KV_EVENT_GAPS.labels("cleared").inc()
                stats.gaps_cleared += 1
                log.warning(
                    "KV events of %s: batches %d-%d lost and not replayable (%s); "
                    "clearing its blocks",
                    source.worker,
                    start,
                    upto - 1,
                    "no replay socket"
                    if source.replay_endpoint is None
                    else "replay timed out"
                    if items is None
                    else f"replay had {len(wanted)} of them",
                )
                self.index.clear_worker(source.worker)
        elif not covered and why == "restart":
            metrics.KV_EVENT_GAPS.labels("cleared").inc()
            stats.gaps_cleared += 1
        for seq, payload in wanted:
            if stats.last_seq is None or seq > stats.last_seq:
                self._apply(source, stats, seq, payload, "replay")

    async def _fetch_replay(
        self, source: EventSource, start: int, *, quiet: bool = False
    ) -> list[tuple[int, bytes]] | None:
        """Ask the worker's replay socket for every batch from ``start`` on; None on failure
        (logged as a warning unless ``quiet``: at subscribe the worker may not be up yet)."""
        if source.replay_endpoint is None:
            return None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        dealer.connect(source.replay_endpoint)
        items: list[tuple[int, bytes]] = []
        try:
            # One deadline for the whole exchange, the send included (a DEALER blocks on
            # send while its peer is not connected). asyncio.timeout rather than
            # wait_for: on Python 3.11, wait_for can swallow a cancellation that lands as
            # a reply arrives, and remove_worker would then wait for this task forever.
            async with asyncio.timeout(self.replay_timeout):
                await dealer.send_multipart(frames.replay_request(start))
                while True:
                    item = frames.parse_replay(await dealer.recv_multipart())
                    if item.end:
                        return items
                    items.append((item.seq, item.payload))
        except TimeoutError:
            (log.debug if quiet else log.warning)(
                "KV event replay from %s timed out after %.1f s",
                source.replay_endpoint,
                self.replay_timeout,
            )
            return None
        except EventError as exc:
            metrics.KV_EVENTS_DROPPED.labels(exc.reason).inc()
            log.warning("bad replay reply from %s: %s", source.replay_endpoint, exc)
            return None
        finally:
            dealer.close(linger=0)

    def _apply(
        self, source: EventSource, stats: SourceStats, seq: int, payload: bytes, how: str
    ) -> None:
        if how == "live" and stats.replayed_tail:
            stats.replayed_tail = {}  # past the replay: no duplicate of it can follow
        stats.last_seq = seq
        stats.last_payload = payload
        stats.batches += 1
        if how == "replay":
            stats.replayed_batches += 1
        try:
            batch = decode_batch(payload)
        except EventError as exc:
            metrics.KV_EVENTS_DROPPED.labels(exc.reason).inc()
            log.debug("undecodable batch %d from %s: %s", seq, source.worker, exc)
            return
        for reason, detail in batch.rejected:
            metrics.KV_EVENTS_DROPPED.labels(reason).inc()
            log.debug("dropped an event of batch %d from %s: %s", seq, source.worker, detail)
        apply = self.index.apply
        worker = source.worker
        for event in batch.events:
            try:
                apply(worker, event)
            except Exception:
                log.exception("error applying a KV event from %s", worker)
                metrics.KV_EVENTS_DROPPED.labels("internal_error").inc()
        metrics.KV_EVENT_BATCHES.labels(how).inc()

    async def _maintain(self) -> None:
        index = self.index
        while True:
            if index.needs_sweep:
                index.sweep(self.sweep_budget)
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(self.sweep_interval)
