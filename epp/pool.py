"""The pool: the model-server endpoints the EPP may route to, as discovery reports them.

Discovery (the endpoints file today, Kubernetes later) calls :meth:`Pool.apply` with each
change; request handling reads :meth:`Pool.workers` and filters by the subset hint.
Guarantees: an endpoint's workers appear and disappear together; the order of
:meth:`Pool.workers` is stable (sorted by address, then rank), so that round-robin and
tie-breaking are reproducible under a fixed random seed.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable

from epp.discovery.static import Endpoint, EndpointsChange, Worker


def split_host_port(value: str) -> tuple[str, int | None]:
    """``("10.0.0.1", 8000)`` from ``10.0.0.1:8000``; IPv6 in brackets; port None if absent."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return host, int(port) if port.isdigit() else None


class AddressFilter:
    """A set of allowed endpoints, as a subset hint or the conformance header gives them.

    An entry with a port allows exactly that ``ip:port``; an entry without one allows
    every port of that IP (several data-parallel ports of one pod may be listed apart).
    """

    __slots__ = ("_exact", "_hosts", "order")

    def __init__(self, entries: Iterable[str]) -> None:
        self._exact: set[tuple[str, int]] = set()
        self._hosts: set[str] = set()
        self.order: list[tuple[str, int | None]] = []
        for entry in entries:
            if not entry.strip():
                continue
            host, port = split_host_port(entry)
            key = (host, port)
            if key in self.order:
                continue
            self.order.append(key)
            if port is None:
                self._hosts.add(host)
            else:
                self._exact.add((host, port))

    def __bool__(self) -> bool:
        return bool(self.order)

    def allows(self, address: str) -> bool:
        host, port = split_host_port(address)
        return host in self._hosts or (port is not None and (host, port) in self._exact)


class Pool:
    """The current set of endpoints, by address."""

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._workers: list[tuple[Worker, Endpoint]] = []

    def apply(self, change: EndpointsChange) -> None:
        for ep in change.removed:
            self._endpoints.pop(ep.address, None)
        for _before, after in change.changed:
            self._endpoints[after.address] = after
        for ep in change.added:
            self._endpoints[ep.address] = ep
        self._workers = [
            (worker, ep)
            for address in sorted(self._endpoints)
            for ep in (self._endpoints[address],)
            for worker in ep.workers
        ]

    def endpoint(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def workers(self) -> list[tuple[Worker, Endpoint]]:
        """Every worker with its endpoint, in a stable order."""
        return self._workers

    def __len__(self) -> int:
        return len(self._endpoints)
