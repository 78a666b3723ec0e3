"""Prefill → decode: the prefill leg of a disaggregated request, vLLM's NixlConnector way.

The decode pod's sidecar (this one) sends the request to the prefill target first, as vLLM's
protocol has it (specs/routing-and-disagg.md §7.1–§7.2): the same body with one output token
(``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens`` set to 1), not streamed,
``stream_options`` dropped, and ``kv_transfer_params`` asking for ``do_remote_decode``. The
prefill engine answers with the ``kv_transfer_params`` that locate its leased blocks; they go
verbatim into the local decode leg, whose engine reads the blocks over NIXL. One
``x-request-id`` travels on both legs.

Outcomes (``kvpick_sidecar_prefill{outcome}``):

* ``ok``: the handoff is returned;
* the prefill target is unreachable, timed out (``--prefill-timeout``), answered 5xx or
  without ``kv_transfer_params``: decode runs the whole request locally
  (``fallback_<reason>``), logged at WARNING;
* a 4xx from the prefill target goes to the client as it is (``client_error``): the request
  itself is wrong, and would be wrong locally too;
* a target not on ``--prefill-allow``: 403 (``refused``), logged, and nothing is sent.

The prefill target is normally another pod's sidecar (the EPP's ``x-prefiller-host-port`` is
a pool endpoint), which serves the leg on its own engine; an engine's own address works too.
A prefill instance id naming a worker of this pod prefills on that local rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from epp import headers as H
from sidecar.allow import split_host_port
from sidecar.errors import ApiError

if TYPE_CHECKING:
    from sidecar.routing import Route
    from sidecar.server import Sidecar

log = logging.getLogger("sidecar.disagg")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

# vLLM's step-1 parameters, as its proxy examples and llm-d send them.
PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass(frozen=True, slots=True)
class Handoff:
    kv_transfer_params: dict[str, Any]
    cached_tokens: int | None  # the prefill engine's prefix-cache hit, reported to the client


def prefill_body(engine_body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's body: ``engine_body`` with one output token, not streamed."""
    body = dict(engine_body)
    for limit in ("max_completion_tokens", "max_output_tokens"):
        if limit in body:
            body[limit] = 1
    if "max_output_tokens" not in body:
        body["max_tokens"] = 1
    body["stream"] = False
    body.pop("stream_options", None)
    body["kv_transfer_params"] = dict(PREFILL_PARAMS)
    return body


def _target(sidecar: Sidecar, route: Route, path: str) -> tuple[str, dict[str, str]]:
    extra: dict[str, str] = {}
    if route.prefill_host_port is not None:
        try:
            host, port = split_host_port(route.prefill_host_port)
        except ValueError as exc:
            raise ApiError(400, f"{H.PREFILLER_HOST_PORT}: {exc}") from None
        if not sidecar.opts.prefill_allow.allows(host, port):
            sidecar.metrics.prefill.labels("refused").inc()
            log.warning(
                "refused a prefill target not on --prefill-allow: %s", route.prefill_host_port
            )
            raise ApiError(
                403,
                f"prefill target {route.prefill_host_port} is not on this sidecar's "
                "--prefill-allow list",
            )
        if route.prefill_dp_rank is not None:
            extra["X-data-parallel-rank"] = str(route.prefill_dp_rank)
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"http://{netloc}{path}", extra
    try:
        rank = sidecar.table.lookup(route.prefill_instance_id, route.prefill_dp_rank)
    except LookupError as exc:
        raise ApiError(
            400, f"prefill: {exc}; a remote prefill worker is named by {H.PREFILLER_HOST_PORT}"
        ) from None
    if rank.engine_dp_header is not None:
        extra["X-data-parallel-rank"] = rank.engine_dp_header
    return rank.worker.url + path, extra


async def run_prefill(
    sidecar: Sidecar,
    route: Route,
    engine_path: str,
    engine_body: dict[str, Any],
    headers: dict[str, str],
    request_id: str,
) -> Handoff | None:
    """Run the prefill leg; the handoff for the decode leg, or None to decode locally."""
    assert sidecar.session is not None
    url, extra = _target(sidecar, route, engine_path)
    hdrs = {**headers, **extra, H.REQUEST_ID: request_id, "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(
        total=sidecar.opts.prefill_timeout, sock_connect=sidecar.opts.connect_timeout
    )
    reason: str
    try:
        async with sidecar.session.post(
            url, data=_encode(prefill_body(engine_body)), headers=hdrs, timeout=timeout
        ) as resp:
            data = await resp.read()
            status = resp.status
    except aiohttp.ClientConnectorError as exc:
        reason, detail = "unreachable", str(exc.os_error or exc)
    except TimeoutError:
        reason, detail = "timeout", f"no answer in {sidecar.opts.prefill_timeout:g} s"
    except aiohttp.ClientError as exc:
        reason, detail = "broken", str(exc)
    else:
        if 400 <= status < 500:
            sidecar.metrics.prefill.labels("client_error").inc()
            raise ApiError(status, _message(data) or f"the prefill leg answered {status}")
        if status >= 500:
            reason, detail = "5xx", f"status {status}: {_message(data)}"
        else:
            try:
                doc = _decode(data)
                params = doc.get("kv_transfer_params")
                cached = ((doc.get("usage") or {}).get("prompt_tokens_details") or {}).get(
                    "cached_tokens"
                )
            except (msgspec.DecodeError, AttributeError):
                params, cached = None, None
            if isinstance(params, dict):
                sidecar.metrics.prefill.labels("ok").inc()
                return Handoff(params, cached if isinstance(cached, int) else None)
            reason, detail = "no_params", "the answer has no kv_transfer_params"
    sidecar.metrics.prefill.labels(f"fallback_{reason}").inc()
    log.warning(
        "prefill on %s failed (%s: %s); decoding request %s locally",
        url,
        reason,
        detail,
        request_id,
    )
    return None


def _message(data: bytes) -> str:
    try:
        doc = _decode(data)
        return str(doc["error"]["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")
