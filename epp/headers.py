"""Header and metadata names the EPP reads or writes: one definition for the whole project.

The sidecar reads the worker headers from here too, so the two sides cannot drift apart.
"""

from __future__ import annotations

import xxhash

# Inference Extension protocol (specs/epp-protocol.md §2).
DESTINATION = "x-gateway-destination-endpoint"
DESTINATION_SUBSET = "x-gateway-destination-endpoint-subset"
DESTINATION_SERVED = "x-gateway-destination-endpoint-served"
DESTINATION_FALLBACK = "x-gateway-destination-endpoint-fallback"  # legacy v0.3 single fallback
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"

# Control headers a client may send (GAIE name, llm-d alias).
OBJECTIVE = ("x-gateway-inference-objective", "x-llm-d-inference-objective")
FAIRNESS_ID = ("x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id")
MODEL_REWRITE = ("x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite")

REQUEST_ID = "x-request-id"

# EPP → sidecar (DESIGN.md, "Fixed interfaces"; specs/routing-and-disagg.md §5).
WORKER_INSTANCE_ID = "x-worker-instance-id"
DP_RANK = "x-dp-rank"
PREFILLER_HOST_PORT = "x-prefiller-host-port"
PREFILL_DP_RANK = "x-prefill-dp-rank"
ROUTING_MODE = "x-dynamo-routing-mode"

# Every request header through which a client could steer routing or impersonate the EPP:
# the EPP overwrites or removes all of them before the request reaches a model server.
STEERING = (
    DESTINATION,
    DESTINATION_SUBSET,
    DESTINATION_SERVED,
    DESTINATION_FALLBACK,
    WORKER_INSTANCE_ID,
    DP_RANK,
    PREFILLER_HOST_PORT,
    PREFILL_DP_RANK,
    ROUTING_MODE,
    "x-data-parallel-rank",
    "x-prefill-instance-id",
    "x-dynamo-worker-instance-id",
    "x-dynamo-dp-rank",
    "x-dynamo-prefill-instance-id",
    "x-dynamo-prefill-dp-rank",
    "x-data-parallel-host-port",
    "x-kv-cache-source-host-port",
    "x-encoder-hosts-ports",
)

# Whole header families the EPP owns: any client-sent header that starts with one of these is
# removed (or overwritten by the EPP's own value), whatever gateway is in front, so that no
# spelling of a routing header the EPP did not set reaches a model server or its sidecar.
STEERING_PREFIXES = (
    "x-gateway-destination-endpoint",
    "x-dynamo-",
    "x-prefiller-",
    "x-prefill-",
    "x-data-parallel-",
)
_STEERING = frozenset(STEERING)


def is_steering(name: str) -> bool:
    """Whether a (lower-case) request header name is one the EPP owns (see
    :data:`STEERING` and :data:`STEERING_PREFIXES`)."""
    return name in _STEERING or name.startswith(STEERING_PREFIXES)


# Conformance hooks (specs/epp-protocol.md §7).
TEST_ENDPOINT_SELECTION = "test-epp-endpoint-selection"
CONFORMANCE_SERVED = "x-conformance-test-served-endpoint"


def worker_instance_id(address: str) -> int:
    """The ``x-worker-instance-id`` of an endpoint: a stable 53-bit id (JSON-safe, like
    Dynamo's worker ids) derived from its ``ip:port``; the dp rank travels separately."""
    return xxhash.xxh64_intdigest(address.encode("utf-8")) & ((1 << 53) - 1)
