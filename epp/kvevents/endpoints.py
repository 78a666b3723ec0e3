"""ZMQ endpoint conventions of the engines' KV event publishers (specs/kv-events.md §1.1-§1.2).

* An endpoint containing ``*`` or ``::``, or starting with ``ipc://`` or ``inproc://``, is
  bound; any other endpoint is connected to.
* Each data-parallel rank publishes on its own port: the TCP port of both the events and the
  replay endpoint is offset by the rank; ``inproc://x`` becomes ``inproc://x_dp<rank>``; port
  0 (OS-chosen) is left alone.
"""

from __future__ import annotations


def is_bind_endpoint(endpoint: str) -> bool:
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


def offset_endpoint(endpoint: str, dp_rank: int) -> str:
    """The endpoint data-parallel rank ``dp_rank`` uses, given rank 0's endpoint.

    Raises :class:`ValueError` for an endpoint that is neither ``tcp://host:port``,
    ``ipc://`` nor ``inproc://``.
    """
    if dp_rank < 0:
        raise ValueError(f"dp rank must be >= 0, got {dp_rank}")
    if dp_rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{dp_rank}"
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit() or host == "tcp":
            raise ValueError(f"tcp endpoint must end in :<port>: {endpoint!r}")
        if int(port) == 0:
            return endpoint
        return f"{host}:{int(port) + dp_rank}"
    if endpoint.startswith("ipc://"):
        return f"{endpoint}_dp{dp_rank}"
    raise ValueError(f"unsupported endpoint {endpoint!r}: use tcp://, ipc:// or inproc://")


def tcp_port(endpoint: str) -> int | None:
    """The port of a ``tcp://host:port`` endpoint, or None."""
    if not endpoint.startswith("tcp://"):
        return None
    _, _, port = endpoint.rpartition(":")
    return int(port) if port.isdigit() else None
