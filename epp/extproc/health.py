"""The gRPC health service (``grpc.health.v1.Health/Check``) gateways and kubelets probe.

Every service name answers with the EPP's readiness (specs/epp-protocol.md §1: the
reference EPP without leader election does the same): SERVING once discovery has synced,
NOT_SERVING before that and while draining. ``Watch`` is not implemented, as in the
reference. The two messages are tiny, so they are read with :mod:`epp.extproc.wire`'s field
reader and written by hand rather than through generated stubs.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from epp.extproc import wire

SERVICE = "grpc.health.v1.Health"

UNKNOWN = 0
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3

# Service names the reference EPP and its Helm chart probe; any other name answers too.
KNOWN_SERVICES = (
    "",
    "readiness",
    "liveness",
    "inference-extension",
    "envoy.service.ext_proc.v3.ExternalProcessor",
)


def decode_service(data: bytes) -> str:
    """The ``service`` field of a ``HealthCheckRequest``; empty when absent or malformed."""
    name = ""
    try:
        for number, wire_type, value in wire.iter_fields(data):
            if number == 1 and wire_type == 2:
                name = bytes(value).decode("utf-8", "replace")
    except (wire.WireError, IndexError):
        return name
    return name


def encode_status(status: int) -> bytes:
    """A ``HealthCheckResponse`` with ``status``."""
    return bytes((0x08, status)) if status else b""


def health_handler(is_serving: Callable[[str], bool]) -> grpc.GenericRpcHandler:
    """A handler for the health service; ``is_serving(service_name)`` decides the answer."""

    async def check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return encode_status(SERVING if is_serving(decode_service(request)) else NOT_SERVING)

    return grpc.method_handlers_generic_handler(
        SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
