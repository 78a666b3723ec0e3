"""Static discovery: the model-server endpoints listed in a YAML file, reloaded on change.

The file (``--endpoints-file``)::

    endpoints:
      - address: 127.0.0.1:8001          # where the gateway sends traffic (host:port)
        kv_events: tcp://127.0.0.1:5557   # the worker's publisher; dp rank r uses port + r
        replay: tcp://127.0.0.1:5558      # optional replay socket (same offset rule)
        role: both                        # prefill | decode | both (default both)
        dp_size: 1                        # data-parallel ranks behind the address (default 1)
        engine: vllm                      # vllm | sglang | trtllm | sim (default vllm)
        metrics: http://127.0.0.1:8001/metrics   # optional

Guarantees:

* :func:`parse_endpoints` accepts exactly that shape and rejects anything else with an
  :class:`EndpointsFileError` that names the entry and the field (an unknown key is an error,
  so a typo never silently drops a setting);
* :class:`EndpointsFileWatcher` loads the file at start (a bad file then is a startup
  error), polls it, and on every change that parses reports what was added, removed and
  changed; a change that does not parse is logged and counted, and the last good set stays
  in force (a half-written file never empties the pool);
* a worker is ``(address, dp_rank)``, as everywhere in kvpick.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from epp import metrics
from epp.kvevents.endpoints import offset_endpoint
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "both"]
Engine = Literal["vllm", "sglang", "trtllm", "sim"]
Worker = tuple[str, int]

ROLES: tuple[str, ...] = ("prefill", "decode", "both")
ENGINES: tuple[str, ...] = ("vllm", "sglang", "trtllm", "sim")
MAX_DP_SIZE = 1024
_FIELDS = ("address", "kv_events", "replay", "role", "dp_size", "engine", "metrics")


class EndpointsFileError(ValueError):
    """The endpoints file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model-server endpoint (a pod's serving port) and what kvpick needs to know of it."""

    address: str
    kv_events: str | None = None
    replay: str | None = None
    role: Role = "both"
    dp_size: int = 1
    engine: Engine = "vllm"
    metrics: str | None = None

    @property
    def workers(self) -> list[Worker]:
        """The engine workers behind the address, one per data-parallel rank."""
        return [(self.address, rank) for rank in range(self.dp_size)]

    def event_endpoints(self, dp_rank: int) -> tuple[str, str | None]:
        """The publisher and replay endpoints of rank ``dp_rank``."""
        if self.kv_events is None:
            raise ValueError(f"{self.address} has no kv_events endpoint")
        replay = None if self.replay is None else offset_endpoint(self.replay, dp_rank)
        return offset_endpoint(self.kv_events, dp_rank), replay


@dataclass(frozen=True, slots=True)
class EndpointsChange:
    """What one reload changed, by address."""

    added: tuple[Endpoint, ...] = ()
    removed: tuple[Endpoint, ...] = ()
    changed: tuple[tuple[Endpoint, Endpoint], ...] = ()  # (before, after)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _host_port(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EndpointsFileError(f"{where}: expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise EndpointsFileError(f"{where}: bad IPv6 address in {value!r}") from None
    elif ":" in host:
        raise EndpointsFileError(f"{where}: write IPv6 addresses in brackets, got {value!r}")
    if not 0 < int(port) < 65536:
        raise EndpointsFileError(f"{where}: port out of range in {value!r}")
    return host, int(port)


def _zmq_endpoint(value: Any, where: str, dp_size: int) -> str:
    if not isinstance(value, str) or not value.startswith("tcp://"):
        raise EndpointsFileError(f"{where}: expected tcp://host:port, got {value!r}")
    _, port = _host_port(value[len("tcp://") :], where)
    if port + dp_size - 1 > 65535:
        raise EndpointsFileError(f"{where}: ports {port}..{port + dp_size - 1} do not fit")
    return value


def _endpoint(entry: Any, where: str) -> Endpoint:
    if not isinstance(entry, Mapping):
        raise EndpointsFileError(f"{where}: expected a mapping, got {type(entry).__name__}")
    unknown = sorted(str(k) for k in entry if k not in _FIELDS)
    if unknown:
        raise EndpointsFileError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)})"
        )
    address = entry.get("address")
    if not isinstance(address, str):
        raise EndpointsFileError(f"{where}: 'address' (host:port) is required")
    where = f"{where} ({address})"
    _host_port(address, f"{where}: address")
    dp_size = entry.get("dp_size", 1)
    if not isinstance(dp_size, int) or isinstance(dp_size, bool) or not 1 <= dp_size <= MAX_DP_SIZE:
        raise EndpointsFileError(f"{where}: dp_size must be an integer in 1..{MAX_DP_SIZE}")
    role = entry.get("role", "both")
    if role not in ROLES:
        raise EndpointsFileError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    engine = entry.get("engine", "vllm")
    if engine not in ENGINES:
        raise EndpointsFileError(
            f"{where}: engine must be one of {', '.join(ENGINES)}, got {engine!r}"
        )
    kv_events = entry.get("kv_events")
    if kv_events is not None:
        kv_events = _zmq_endpoint(kv_events, f"{where}: kv_events", dp_size)
    replay = entry.get("replay")
    if replay is not None:
        if kv_events is None:
            raise EndpointsFileError(f"{where}: 'replay' needs 'kv_events'")
        replay = _zmq_endpoint(replay, f"{where}: replay", dp_size)
    metrics_url = entry.get("metrics")
    if metrics_url is not None and (
        not isinstance(metrics_url, str) or not metrics_url.startswith(("http://", "https://"))
    ):
        raise EndpointsFileError(f"{where}: metrics must be an http(s) URL, got {metrics_url!r}")
    return Endpoint(address, kv_events, replay, role, dp_size, engine, metrics_url)


def parse_endpoints(text: str, source: str = "endpoints file") -> dict[str, Endpoint]:
    """The endpoints of a file's text, by address. Raises :class:`EndpointsFileError`."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EndpointsFileError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, Mapping) or "endpoints" not in doc:
        raise EndpointsFileError(f"{source}: expected a mapping with an 'endpoints' list")
    extra = sorted(str(k) for k in doc if k != "endpoints")
    if extra:
        raise EndpointsFileError(f"{source}: unknown top-level key(s) {', '.join(extra)}")
    entries = doc["endpoints"]
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise EndpointsFileError(f"{source}: 'endpoints' must be a list")
    found: dict[str, Endpoint] = {}
    for i, entry in enumerate(entries):
        ep = _endpoint(entry, f"{source}: endpoints[{i}]")
        if ep.address in found:
            raise EndpointsFileError(f"{source}: endpoints[{i}]: {ep.address} is listed twice")
        found[ep.address] = ep
    return found


def diff_endpoints(
    before: Mapping[str, Endpoint], after: Mapping[str, Endpoint]
) -> EndpointsChange:
    """What turns ``before`` into ``after``."""
    return EndpointsChange(
        added=tuple(ep for a, ep in after.items() if a not in before),
        removed=tuple(ep for a, ep in before.items() if a not in after),
        changed=tuple(
            (before[a], ep) for a, ep in after.items() if a in before and before[a] != ep
        ),
    )


OnChange = Callable[[EndpointsChange], Awaitable[None] | None]


class EndpointsFileWatcher:
    """Keeps :attr:`endpoints` equal to the last good content of an endpoints file."""

    def __init__(self, path: str, on_change: OnChange, *, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self.endpoints: dict[str, Endpoint] = {}
        self._digest: bytes | None = None
        self._bad: object = None  # the last rejected content (or read error), logged once
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        """Set once the first load has been applied."""

    def _read(self) -> tuple[bytes, str]:
        with open(self.path, "rb") as f:
            raw = f.read()
        return hashlib.sha256(raw).digest(), raw.decode("utf-8", errors="replace")

    async def start(self) -> None:
        """Load the file and apply it; raises :class:`EndpointsFileError` if it is unusable."""
        try:
            digest, text = self._read()
        except OSError as exc:
            raise EndpointsFileError(f"cannot read {self.path}: {exc.strerror}") from None
        found = parse_endpoints(text, self.path)
        await self._apply(found, digest)
        self.synced.set()
        log.info("endpoints file %s: %d endpoint(s)", self.path, len(found))
        self._task = asyncio.create_task(self._poll(), name="endpoints-file")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def check(self) -> bool:
        """Reload if the file changed; returns True when a new set was applied."""
        try:
            digest, text = self._read()
        except OSError as exc:
            why = f"cannot read {self.path}: {exc.strerror}"
            return self._rejected(why, why)
        if digest == self._digest:
            return False
        try:
            found = parse_endpoints(text, self.path)
        except EndpointsFileError as exc:
            return self._rejected(str(exc), digest)
        change = await self._apply(found, digest)
        log.info(
            "endpoints file %s reloaded: %d added, %d removed, %d changed",
            self.path,
            len(change.added),
            len(change.removed),
            len(change.changed),
        )
        return True

    def _rejected(self, why: str, what: object) -> bool:
        if what != self._bad:
            log.error("%s; keeping the %d endpoint(s) loaded before", why, len(self.endpoints))
            metrics.DISCOVERY_ERRORS.labels("endpoints_file").inc()
        self._bad = what
        return False

    async def _apply(self, found: dict[str, Endpoint], digest: bytes) -> EndpointsChange:
        change = diff_endpoints(self.endpoints, found)
        self.endpoints = found
        self._digest = digest
        self._bad = None
        if change:
            result = self._on_change(change)
            if result is not None:
                await result
        return change

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a bug in a callback must not stop discovery
                log.exception("applying endpoints file %s failed", self.path)
