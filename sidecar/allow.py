"""Which prefill targets the sidecar may call: the guard against a forged prefill header.

``x-prefiller-host-port`` makes the sidecar open a connection to the host it names. A client
that could set it (a gateway that lets the header through, a caller inside the cluster) could
otherwise make the sidecar call any host. The sidecar therefore calls only targets on its
allow-list: entries are CIDRs (``10.0.0.0/8``, ``10.1.2.3``) that an IP literal must fall in,
or host names (``prefill-0.pool``, optionally ``:port``) that must match exactly. Names are
never resolved for the check, so a name cannot be made to point elsewhere between check and
call. An empty list allows nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


class AllowListError(ValueError):
    """A ``--prefill-allow`` entry that cannot be read."""


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); :class:`ValueError` if malformed."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{value!r} is not [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"{value!r} is not host:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: the port must be in 1..65535")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class AllowList:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    names: frozenset[str] = frozenset()  # "host" or "host:port", lower case

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        nets = []
        names = set()
        for raw in entries:
            for entry in (e.strip() for e in raw.split(",")):
                if not entry:
                    continue
                try:
                    nets.append(ipaddress.ip_network(entry, strict=False))
                    continue
                except ValueError:
                    pass
                host = entry.lower()
                label = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
                if not label or not all(c.isalnum() or c in "-._" for c in label):
                    raise AllowListError(
                        f"--prefill-allow {entry!r} is neither a CIDR nor a host name"
                    )
                names.add(host)
        return cls(tuple(nets), frozenset(names))

    def __bool__(self) -> bool:
        return bool(self.networks or self.names)

    def allows(self, host: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            name = host.lower()
            return name in self.names or f"{name}:{port}" in self.names
        return any(ip in net for net in self.networks)
