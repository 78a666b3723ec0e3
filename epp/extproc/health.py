"""The gRPC health service (``grpc.health.v1.Health/Check``) gateways and kubelets probe.

Every service name answers with the EPP's readiness (specs/epp-protocol.md §1: the
reference EPP without leader election does the same): SERVING once discovery has synced,
NOT_SERVING before that and while draining. ``Watch`` is not implemented, as in the
reference. The two messages are tiny, so they are encoded here by hand rather than pulling
in generated stubs.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

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
    pos = 0
    name = ""
    try:
        while pos < len(data):
            key = data[pos]
            pos += 1
            if key & 7 == 2:
                length = 0
                shift = 0
                while True:
                    b = data[pos]
                    pos += 1
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if b < 0x80:
                        break
                if key >> 3 == 1:
                    name = data[pos : pos + length].decode("utf-8", "replace")
                pos += length
            elif key & 7 == 0:
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            else:
                return name
    except IndexError:
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
