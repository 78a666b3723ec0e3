"""Direct mode: which worker (and which prefill target) a request names.

The EPP decides; the sidecar only reads the decision. Spellings accepted, headers winning
over the body as Dynamo's frontend does (specs/routing-and-disagg.md §5–§6):

* worker instance: headers ``x-worker-instance-id``, ``x-dynamo-worker-instance-id``,
  ``x-dynamo-decode-worker-id``, ``x-dynamo-backend-instance-id``; ``nvext.decode_worker_id``,
  ``nvext.backend_instance_id``;
* its DP rank: ``x-dp-rank``, ``x-dynamo-dp-rank``, ``x-data-parallel-rank``; ``nvext.dp_rank``;
* prefill target: ``x-prefiller-host-port`` (``ip:port``; of a comma list, the first);
* prefill instance: ``x-dynamo-prefill-instance-id``, ``x-prefill-instance-id``,
  ``x-dynamo-prefill-worker-id``; ``nvext.prefill_worker_id``;
* prefill DP rank: ``x-prefill-dp-rank``, ``x-dynamo-prefill-dp-rank``;
  ``nvext.prefill_dp_rank``;
* mode: ``x-dynamo-routing-mode``, ``aggregated`` or ``disaggregated``.

A DP rank of ``u32::MAX`` (4294967295) means unset, as in Dynamo. ``aggregated`` ignores any
prefill fields. A prefill *instance id* is usable only when it names a worker of this pod
(prefill on a colocated rank); a remote prefill worker must come as ``x-prefiller-host-port``.
Every header this module reads, and every other routing header the EPP owns
(:func:`epp.headers.is_steering`), is stripped before a request reaches an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp import headers as H

UNSET_RANK = 2**32 - 1

WORKER_HEADERS = (
    H.WORKER_INSTANCE_ID,
    "x-dynamo-worker-instance-id",
    "x-dynamo-decode-worker-id",
    "x-dynamo-backend-instance-id",
)
DP_HEADERS = (H.DP_RANK, "x-dynamo-dp-rank", "x-data-parallel-rank")
PREFILL_ID_HEADERS = (
    "x-dynamo-prefill-instance-id",
    "x-prefill-instance-id",
    "x-dynamo-prefill-worker-id",
)
PREFILL_DP_HEADERS = (H.PREFILL_DP_RANK, "x-dynamo-prefill-dp-rank")


class RoutingError(ValueError):
    """A routing header or field the sidecar cannot act on (400)."""


@dataclass(frozen=True, slots=True)
class Route:
    instance_id: int | None = None
    dp_rank: int | None = None
    prefill_host_port: str | None = None
    prefill_instance_id: int | None = None
    prefill_dp_rank: int | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefill_host_port is not None or self.prefill_instance_id is not None


def _first(headers: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return name, value.strip()
    return None


def _int(where: str, value: Any, *, rank: bool = False) -> int | None:
    if isinstance(value, str):
        if not value.isdigit():
            raise RoutingError(f"{where} must be a non-negative integer, got {value!r}")
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RoutingError(f"{where} must be a non-negative integer, got {value!r}")
    if rank and value == UNSET_RANK:
        return None
    if value >= 2**64:
        raise RoutingError(f"{where} is out of range")
    return value


def _pick(
    headers: Mapping[str, str],
    names: tuple[str, ...],
    nvext: Mapping[str, Any],
    fields: tuple[str, ...],
    *,
    rank: bool = False,
) -> int | None:
    found = _first(headers, names)
    if found is not None:
        return _int(found[0], found[1], rank=rank)
    for f in fields:
        if nvext.get(f) is not None:
            return _int(f"nvext.{f}", nvext[f], rank=rank)
    return None


def read_route(headers: Mapping[str, str], body: Mapping[str, Any] | None) -> Route:
    """The route a request names; ``headers`` must be looked up case-insensitively (lower-case
    names), as aiohttp's ``CIMultiDict`` does."""
    nvext = body.get("nvext") if body is not None else None
    if nvext is not None and not isinstance(nvext, Mapping):
        raise RoutingError("'nvext' must be an object")
    nvext = nvext or {}
    mode = headers.get(H.ROUTING_MODE)
    if mode is not None and mode.strip() not in ("aggregated", "disaggregated"):
        raise RoutingError(f"{H.ROUTING_MODE} must be aggregated or disaggregated, got {mode!r}")
    instance = _pick(headers, WORKER_HEADERS, nvext, ("decode_worker_id", "backend_instance_id"))
    dp = _pick(headers, DP_HEADERS, nvext, ("dp_rank",), rank=True)
    if mode is not None and mode.strip() == "aggregated":
        return Route(instance, dp)
    target = headers.get(H.PREFILLER_HOST_PORT)
    if target is not None:
        target = target.split(",")[0].strip() or None
    pre_id = _pick(headers, PREFILL_ID_HEADERS, nvext, ("prefill_worker_id",))
    pre_dp = _pick(headers, PREFILL_DP_HEADERS, nvext, ("prefill_dp_rank",), rank=True)
    if mode is not None and mode.strip() == "disaggregated" and target is None and pre_id is None:
        raise RoutingError(
            f"{H.ROUTING_MODE}: disaggregated needs {H.PREFILLER_HOST_PORT} "
            "or a prefill instance id"
        )
    return Route(instance, dp, target, pre_id, pre_dp)


def engine_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers an engine may see: routing headers, hop-by-hop headers and the
    ones the HTTP client sets itself are dropped."""
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if H.is_steering(low) or low in _DROP or low.startswith("x-worker-") or low == H.DP_RANK:
            continue
        out[name] = value
    return out


_DROP = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "accept-encoding",
        "expect",
    }
)
