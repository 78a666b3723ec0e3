"""kvpick's own Prometheus metrics (the GAIE-named ones arrive with the EPP).

Every metric kvpick exports is declared here, once, on the default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

KV_EVENTS_DROPPED = Counter(
    "kvpick_kv_events_dropped",
    "KV event input dropped as corrupt or unusable, by reason (blocks for block-level "
    "reasons, frames/batches/events otherwise).",
    ["reason"],
)
KV_EVENTS_IGNORED = Counter(
    "kvpick_kv_events_ignored",
    "Well-formed KV events kvpick deliberately does not index, by reason.",
    ["reason"],
)
KV_EVENT_BATCHES = Counter(
    "kvpick_kv_event_batches",
    "KV event batches applied to the index, by how they arrived (live or replay).",
    ["source"],
)
KV_EVENT_GAPS = Counter(
    "kvpick_kv_event_gaps",
    "Sequence gaps seen on worker event streams, by outcome: replayed (fully recovered "
    "through the replay socket) or cleared (the worker's blocks were dropped).",
    ["outcome"],
)
KV_EVENT_RESTARTS = Counter(
    "kvpick_kv_event_publisher_restarts",
    "Worker publishers seen restarting (sequence number going back); their blocks are "
    "cleared.",
)
KV_EVENT_BACKPRESSURE = Counter(
    "kvpick_kv_event_backpressure",
    "Times an event subscriber yielded to the event loop with messages still waiting, "
    "because it had used its time slice.",
)
KV_EVENT_WORKERS = Gauge(
    "kvpick_kv_event_workers",
    "Worker publishers (endpoint, dp rank) the EPP is subscribed to.",
)
DISCOVERY_ERRORS = Counter(
    "kvpick_discovery_errors",
    "Discovery updates that could not be used and were skipped (the last good state stays)",
    ["source"],
)
