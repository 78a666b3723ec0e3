"""Keeping the KV event subscriber's sources in step with discovery.

:func:`sync_event_sources` is the one place that turns discovered endpoints into
:class:`~epp.kvevents.subscriber.EventSource` subscriptions: one per data-parallel rank of
every endpoint with a ``kv_events`` publisher. A removed endpoint's workers leave the index at
once; an endpoint whose publisher, replay socket or rank count changed is resubscribed from
scratch (its blocks are dropped, since they were announced by another publisher).
"""

from __future__ import annotations

from epp.discovery.static import Endpoint, EndpointsChange
from epp.kvevents.subscriber import EventSource, KvEventSubscriber


def _event_config(ep: Endpoint) -> tuple[str | None, str | None, int]:
    return ep.kv_events, ep.replay, ep.dp_size


def _subscribe(subscriber: KvEventSubscriber, ep: Endpoint) -> None:
    if ep.kv_events is None:
        return
    for worker in ep.workers:
        endpoint, replay = ep.event_endpoints(worker[1])
        subscriber.add_worker(EventSource(worker, endpoint, replay))


async def _unsubscribe(subscriber: KvEventSubscriber, ep: Endpoint) -> None:
    for worker in ep.workers:
        await subscriber.remove_worker(worker)


async def sync_event_sources(subscriber: KvEventSubscriber, change: EndpointsChange) -> None:
    """Apply one discovery change to the subscriber (and through it, to the index)."""
    for ep in change.removed:
        await _unsubscribe(subscriber, ep)
    for before, after in change.changed:
        if _event_config(before) != _event_config(after):
            await _unsubscribe(subscriber, before)
            _subscribe(subscriber, after)
    for ep in change.added:
        _subscribe(subscriber, ep)
