"""The EPP's Prometheus metrics: the reference EPP's names (no prefix) and kvpick's own.

Every metric kvpick exports is declared here, once, on the default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
    "Worker publishers seen restarting (sequence number going back); their blocks are cleared.",
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

# --- The reference EPP's request metrics (specs/epp-protocol.md §12), same names and labels.
REQUESTS = Counter(
    "inference_objective_request",
    "Requests routed, by model, target model and priority.",
    ["model_name", "target_model_name", "priority"],
)
REQUEST_ERRORS = Counter(
    "inference_objective_request_error",
    "Requests that failed, by model, target model and error code.",
    ["model_name", "target_model_name", "error_code"],
)
RUNNING = Gauge(
    "inference_objective_running_requests",
    "Requests routed and not yet finished, by model.",
    ["model_name"],
)
REQUEST_DURATION = Histogram(
    "inference_objective_request_duration_seconds",
    "Time from routing to the end of the response, by model.",
    ["model_name", "target_model_name"],
    buckets=(0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4, 300),
)
# kvpick's buckets: the reference's are not part of any contract.
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                  65536, 131072, 262144, 524288, 1048576)  # fmt: skip
INPUT_TOKENS = Histogram(
    "inference_objective_input_tokens",
    "Prompt tokens per request, as the model server's response reported them.",
    ["model_name", "target_model_name"],
    buckets=_TOKEN_BUCKETS,
)
OUTPUT_TOKENS = Histogram(
    "inference_objective_output_tokens",
    "Generated tokens per request, as the model server's response reported them.",
    ["model_name", "target_model_name"],
    buckets=_TOKEN_BUCKETS,
)
PROMPT_CACHED_TOKENS = Histogram(
    "inference_objective_prompt_cached_tokens",
    "Prompt tokens the model server found in its prefix cache, per request.",
    ["model_name", "target_model_name"],
    buckets=(0, *_TOKEN_BUCKETS),
)
NTPOT = Histogram(
    "inference_objective_normalized_time_per_output_token_seconds",
    "Request duration divided by its generated tokens.",
    ["model_name", "target_model_name"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
SCHEDULER_E2E = Histogram(
    "inference_extension_scheduler_e2e_duration_seconds",
    "Time the EPP spends deciding one request (parse, tokenize, match, score, book).",
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1),
)
READY_PODS = Gauge(
    "inference_pool_ready_pods",
    "Endpoints in the pool, by pool name.",
    ["name"],
)
SERVED_MISMATCH = Counter(
    "kvpick_served_endpoint_mismatch",
    "Responses served by another endpoint than the one picked (gateway retries); the "
    "booked load moved to the serving endpoint.",
)

# --- Request limits and the preprocessing pool (docs/operations.md lists what each protects).
LIMIT_REFUSALS = Counter(
    "kvpick_request_limit_refusals",
    "Requests the EPP refused because they passed one of its limits, by limit: body_bytes "
    "(413), body_timeout (408), json_depth (400), context_length (400), preprocess_queue "
    "(429) or preprocess_timeout (504).",
    ["limit"],
)
for _limit in (
    "body_bytes",
    "body_timeout",
    "json_depth",
    "context_length",
    "preprocess_queue",
    "preprocess_timeout",
):
    LIMIT_REFUSALS.labels(_limit)  # exported at 0, so rate() works before the first one
PREPROCESS_JOBS = Gauge(
    "kvpick_preprocess_jobs",
    "Large requests being parsed and tokenized in the preprocessing threads, or waiting "
    "for one, by state (running, queued).",
    ["state"],
)
PREPROCESS_DURATION = Histogram(
    "kvpick_preprocess_duration_seconds",
    "Time a large request spent in the preprocessing pool, queueing included.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
EXTPROC_STREAMS = Gauge(
    "kvpick_extproc_streams",
    "ext_proc streams open now (one per HTTP request the gateway is processing).",
)
EXTPROC_CONNECTIONS = Gauge(
    "kvpick_extproc_connections",
    "Connections open now on the ext_proc port (the health port not included).",
)
EXTPROC_CONNECTIONS_CLOSED = Counter(
    "kvpick_extproc_connections_closed",
    "ext_proc connections the EPP closed itself, by reason: an RFC 9113 error code "
    "(protocol_error, flow_control_error, frame_size_error, compression_error, ...), "
    "rapid_reset, control_flood, max_connections, handshake_timeout, idle, "
    "client_certificate (refused by --client-ca; kvpick's own HTTP/2 server only).",
    ["reason"],
)
EXTPROC_STREAMS_ENDED = Counter(
    "kvpick_extproc_streams_ended_by_epp",
    "ext_proc streams the EPP ended with an error of its own, by reason "
    "(resource_exhausted, invalid_argument, flow_control_error, refused_stream, ...).",
    ["reason"],
)
LOOP_LAG = Histogram(
    "kvpick_event_loop_lag_seconds",
    "How late the event loop ran a callback scheduled 10 ms ahead, sampled continuously: "
    "the time any ext_proc message or KV event could have waited for the loop.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
GC_PAUSE = Histogram(
    "kvpick_gc_pause_seconds",
    "Time each garbage collection held the interpreter, by generation (0-2); a full "
    "collection (2) stops the event loop for as long as it runs.",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)
LOOP_LAG_MAX = Gauge(
    "kvpick_event_loop_lag_max_seconds",
    "The largest event-loop lag seen since the EPP started.",
)
