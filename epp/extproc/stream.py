"""One ext_proc stream (one HTTP request through the gateway): message order and bodies.

:class:`ExtProcStream` turns each incoming ``ProcessingRequest`` into the responses the
gateway expects, in the order specs/epp-protocol.md §3 gives, and leaves the routing
decision to a :class:`Router`:

* FULL_DUPLEX_STREAMED request bodies (the Inference Extension's mode, and the default
  when the gateway does not say): nothing is sent while the body arrives; after the last
  chunk come exactly one headers response (destination header, ``envoy.lb`` metadata,
  ``clear_route_cache``, ``Content-Length``) and then the body in ``streamed_response``
  chunks of at most :data:`BODY_CHUNK` bytes, ``end_of_stream`` on the last;
* BUFFERED request bodies: the headers get an empty reply at once, and the reply to the
  whole body carries the header mutations and the new body;
* bodyless requests (headers with ``end_of_stream``) are routed on the headers alone;
* response headers are answered at once; response-body chunks are echoed one by one in
  FULL_DUPLEX_STREAMED mode and acknowledged otherwise; trailers get empty replies;
* a repeated end of stream, and anything after the request was answered with an
  ImmediateResponse, is ignored;
* :meth:`ExtProcStream.close` always tells the router how the exchange ended, so booked
  load is released exactly once on every path (complete, error, reset, cancel).

Bounded input (:class:`StreamLimits`): a request body is refused with a 413
ImmediateResponse as soon as its declared ``content-length`` or the bytes received so far
pass ``max_body_bytes`` (nothing more of it is kept), and with a 408 when it has not
arrived in full ``body_timeout`` seconds after its headers. Both count in
``kvpick_request_limit_refusals_total``.

Bounded work (:data:`MESSAGE_ALLOWANCE`): a stream carries one HTTP request, so it may
carry :data:`MESSAGE_ALLOWANCE` messages plus one more for every :data:`BYTES_PER_MESSAGE`
bytes of messages it has carried; a stream past that (a flood of tiny or empty messages)
ends with RESOURCE_EXHAUSTED. An empty ``ProcessingRequest``, or one with no request field,
ends its stream with INVALID_ARGUMENT. Both raise
:class:`~epp.extproc.stream_error.StreamError` from :meth:`ExtProcStream.handle`.

Routing off the event loop: :meth:`Router.route` may return an awaitable instead of a
:class:`Routed` (the director does so for large bodies, whose parsing and tokenizing run
in worker threads). The stream then answers later through its ``emit`` callback, still in
the order the gateway's messages came: a reply to request trailers that arrive meanwhile
waits behind the routing reply. Closing the stream cancels a pending routing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from epp import headers as H
from epp import metrics as M
from epp.extproc import wire
from epp.extproc.stream_error import INVALID_ARGUMENT, RESOURCE_EXHAUSTED, StreamError
from epp.response_usage import Usage, UsageTail

log = logging.getLogger(__name__)

BODY_CHUNK = 62_000
"""Largest body chunk sent back to the gateway (a margin under Envoy's 64 KiB)."""

_json = msgspec.json.Encoder()


class RoutingError(Exception):
    """The request gets an ImmediateResponse with ``status`` and a JSON body saying why."""

    def __init__(self, status: int, reason: str, kind: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind or _ERROR_KINDS.get(status, "Internal")


_ERROR_KINDS = {
    400: "BadRequest",
    404: "NotFound",
    408: "RequestTimeout",
    413: "PayloadTooLarge",
    429: "ResourceExhausted",
    500: "Internal",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}

DEFAULT_MAX_BODY_BYTES = 10_000_000
"""The request body limit when none is configured: 10 MB, the Inference Extension's
lightweight EPP's limit (specs/numbers.md §4)."""
DEFAULT_BODY_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-stream input limits; None switches one off."""

    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    """A request body larger than this is refused with 413 (``--max-body-bytes``)."""
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT
    """Seconds from the request headers to the end of the body before a 408
    (``--request-body-timeout``)."""


MESSAGE_ALLOWANCE = 1024
"""Messages any stream may carry whatever their size: far more than the headers, trailers
and response phases of a request need, and than a body sent in small chunks."""
BYTES_PER_MESSAGE = 12
"""Each this many bytes carried allow one more message: a body or a streamed response in
messages of this size or larger is never cut short, however long it is (the smallest SSE
event, ``data: {}`` and its blank line, makes a 14-byte message)."""

LARGE_BODY = 1 << 20
"""A request body this large makes the stream call its ``after_large`` hook once the
request phase is over (the EPP trims the allocator's heap then)."""

Emit = Callable[[Sequence[bytes]], None]
"""Sends replies the stream produces outside :meth:`ExtProcStream.handle` (after a routing
that ran off the event loop, or a timeout)."""


@dataclass(slots=True)
class RequestInfo:
    """What the router gets to decide on.

    ``headers`` maps lower-case names to values (the last one wins); ``body`` is None for
    a bodyless request; ``metadata`` is the stream's ``filter_metadata``.
    """

    request_id: str
    path: str
    method: str
    headers: dict[str, str]
    body: bytes | bytearray | None
    """The whole request body; the router owns it (the stream keeps no other reference).
    A router may set it to None once it has put the body to forward in ``Routed.body``,
    so that a large original is freed as early as possible."""
    metadata: Mapping[str, Any]


@dataclass(slots=True)
class Routed:
    """A routing decision as the stream applies it.

    ``destination`` is the ``ip:port[,ip:port…]`` value of the destination header and
    metadata; ``body`` replaces the request body when not None; ``set_headers`` are added
    (overwriting); ``state`` is the router's own bookkeeping handle, handed back in the
    response-phase calls.
    """

    destination: str
    set_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | bytearray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    state: Any = None
    body_messages: list[bytes] | None = None
    """The body to forward (``body``, or the original when ``body`` is None) already encoded
    by :func:`encode_body`: a router that prepares large bodies off the event loop does so
    there. Used when the body ends the request (not in BUFFERED mode or before trailers)."""


class Router(Protocol):
    """What the stream needs from request handling (implemented by the director)."""

    def route(self, info: RequestInfo) -> Routed | Awaitable[Routed]:
        """Pick endpoints; raise :class:`RoutingError` for an ImmediateResponse. An
        awaitable result (resolving to a Routed, or raising RoutingError) is awaited on the
        event loop and answered through the stream's ``emit``."""
        ...

    def response_headers(
        self, routed: Routed, status: int, served: str | None, streaming: bool
    ) -> list[tuple[str, str]]:
        """The response started; returns headers to add to it."""
        ...

    def first_byte(self, routed: Routed) -> None:
        """The first response-body byte arrived (prefill is done)."""
        ...

    def finished(self, routed: Routed, outcome: str, usage: Usage | None = None) -> None:
        """The exchange is over: ``complete``, ``error`` or ``aborted``, with the token
        usage the response reported when it did. Called once."""
        ...


def error_body(status: int, kind: str, reason: str) -> bytes:
    """The JSON body of an ImmediateResponse (OpenAI's error shape)."""
    return _json.encode({"error": {"message": reason, "type": kind, "code": status}})


def _served_endpoint(req: wire.ExtProcRequest) -> str | None:
    lb = req.metadata.get(H.LB_NAMESPACE)
    if isinstance(lb, dict):
        served = lb.get(H.DESTINATION_SERVED)
        if isinstance(served, str) and served:
            return served
    # Envoy can send the upstream address as an attribute (response_attributes:
    # [upstream.address]); gateways that do not write the served key still get it right.
    for attrs in req.attributes.values():
        if isinstance(attrs, dict):
            addr = attrs.get("upstream.address")
            if isinstance(addr, str) and addr:
                return addr
    return None


class ExtProcStream:
    """The state of one ext_proc stream; feed it with :meth:`handle`.

    ``emit`` sends replies produced later (a routing that ran off the event loop, a body
    timeout); without it, routing always completes inside :meth:`handle` and no body
    timeout is armed.
    """

    __slots__ = (
        "_aborted",
        "_after_large",
        "_body",
        "_body_timer",
        "_carried",
        "_closed",
        "_done_request",
        "_emit",
        "_finished",
        "_first_byte_seen",
        "_headers",
        "_held",
        "_large",
        "_limits",
        "_messages",
        "_metadata",
        "_pairs",
        "_pending",
        "_request_mode",
        "_response_mode",
        "_response_status",
        "_routed",
        "_router",
        "_usage_tail",
    )

    def __init__(
        self,
        router: Router,
        limits: StreamLimits | None = None,
        emit: Emit | None = None,
        after_large: Callable[[], None] | None = None,
    ) -> None:
        self._router = router
        self._limits = limits if limits is not None else _NO_LIMITS
        self._emit = emit
        self._after_large = after_large
        self._large = False
        self._messages = 0
        self._carried = 0
        M.EXTPROC_STREAMS.inc()
        self._pairs: list[tuple[str, str]] = []
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._metadata: dict[str, Any] = {}
        self._request_mode = wire.BODY_FULL_DUPLEX_STREAMED
        self._response_mode = wire.BODY_FULL_DUPLEX_STREAMED
        self._routed: Routed | None = None
        self._done_request = False  # the request phase was answered (routed or refused)
        self._aborted = False  # an ImmediateResponse was sent: nothing more to do
        self._first_byte_seen = False
        self._finished = False
        self._closed = False
        self._response_status = 0
        self._usage_tail: UsageTail | None = None
        self._pending: asyncio.Future[Any] | None = None  # routing off the loop
        self._held: list[bytes] = []  # replies waiting behind the pending routing
        self._body_timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        """Whether a routing decision is still being made off the event loop."""
        return self._pending is not None

    # ------------------------------------------------------------- dispatch

    def handle(self, data: bytes) -> Sequence[bytes]:
        """The responses to one encoded ``ProcessingRequest`` (possibly none); raises
        :class:`StreamError` when the stream must end (see the module docstring)."""
        self._messages += 1
        self._carried += len(data)
        if self._messages > MESSAGE_ALLOWANCE + self._carried // BYTES_PER_MESSAGE:
            raise StreamError(
                RESOURCE_EXHAUSTED,
                "message_allowance",
                f"{self._messages} messages carrying {self._carried} bytes on one ext_proc "
                "stream: more than one HTTP request produces",
            )
        if not data:
            raise StreamError(INVALID_ARGUMENT, "empty_message", "empty ProcessingRequest")
        if self._aborted:
            return ()
        try:
            req = wire.decode_request(data)
        except wire.WireError as exc:
            log.warning("undecodable ext_proc message: %s", exc)
            return self._refuse(RoutingError(400, f"undecodable ext_proc message: {exc}"))
        if req.metadata:
            for key, value in req.metadata.items():
                self._metadata[key] = value
        if req.protocol_config is not None:
            # Present means the gateway states its modes; NONE (0) then really is NONE.
            self._request_mode = req.protocol_config.request_body_mode
            self._response_mode = req.protocol_config.response_body_mode
        kind = req.kind
        if kind == wire.RESPONSE_BODY:
            return self._response_body(req)
        if kind == wire.REQUEST_BODY:
            return self._request_body(req)
        if kind == wire.REQUEST_HEADERS:
            return self._request_headers(req)
        if kind == wire.RESPONSE_HEADERS:
            return self._response_headers(req)
        if kind == wire.REQUEST_TRAILERS:
            return self._request_trailers()
        if kind == wire.RESPONSE_TRAILERS:
            self._finish("complete" if self._response_status < 400 else "error")
            return (wire.encode_trailers_response(request=False),)
        raise StreamError(
            INVALID_ARGUMENT, "no_request_field", "ProcessingRequest without a request field"
        )

    def close(self) -> None:
        """The stream ended: release whatever the exchange still holds."""
        if not self._closed:
            M.EXTPROC_STREAMS.dec()
        self._closed = True
        self._cancel_body_timer()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._body = bytearray()
        self._large_done()
        self._finish("aborted")

    def _large_done(self) -> None:
        if self._large:
            self._large = False
            if self._after_large is not None:
                self._after_large()

    # -------------------------------------------------------------- request

    def _request_headers(self, req: wire.ExtProcRequest) -> Sequence[bytes]:
        pairs = req.headers or []
        self._pairs = pairs
        self._headers = {k.lower(): v for k, v in pairs}
        mode = self._request_mode
        if req.end_of_stream or mode == wire.BODY_NONE:
            return self._route(None, final=True)
        limit = self._limits.max_body_bytes
        declared = self._headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            return self._too_large(int(declared))
        if mode == wire.BODY_STREAMED:
            return self._refuse(
                RoutingError(
                    500,
                    "the gateway sends the request body in STREAMED mode; configure "
                    "FULL_DUPLEX_STREAMED (or BUFFERED) for the EPP's ext_proc filter",
                )
            )
        timeout = self._limits.body_timeout
        if timeout is not None and self._emit is not None:
            self._body_timer = asyncio.get_running_loop().call_later(timeout, self._body_late)
        if mode == wire.BODY_BUFFERED or mode == wire.BODY_BUFFERED_PARTIAL:
            return (wire.encode_headers_response(),)
        return ()  # FULL_DUPLEX_STREAMED: the reply waits for the whole body

    def _request_body(self, req: wire.ExtProcRequest) -> Sequence[bytes]:
        if self._done_request:
            return ()  # a chunk after the end of the body (a repeated end_of_stream)
        if req.body:
            limit = self._limits.max_body_bytes
            if limit is not None and len(self._body) + len(req.body) > limit:
                return self._too_large(len(self._body) + len(req.body))
            self._body += req.body
            if len(self._body) >= LARGE_BODY:
                self._large = True
        if not req.end_of_stream:
            return ()
        return self._route(self._take_body(), final=True)

    def _take_body(self) -> bytearray:
        # Handed over, not copied: a copy of a large body costs a page fault per page.
        body, self._body = self._body, bytearray()
        return body

    def _too_large(self, size: int) -> Sequence[bytes]:
        M.LIMIT_REFUSALS.labels("body_bytes").inc()
        self._body = bytearray()
        self._large = True
        self._large_done()
        limit = self._limits.max_body_bytes
        return self._refuse(
            RoutingError(
                413,
                f"the request body is larger than this gateway accepts (at least {size:,} "
                f"bytes; the limit is {limit:,})",
            )
        )

    def _body_late(self) -> None:
        self._body_timer = None
        if self._done_request or self._closed:
            return
        M.LIMIT_REFUSALS.labels("body_timeout").inc()
        got = len(self._body)
        self._body = bytearray()
        self._large_done()
        log.info("request body not complete after %gs (%d bytes so far): 408",
                 self._limits.body_timeout or 0, got)  # fmt: skip
        replies = self._refuse(
            RoutingError(
                408,
                f"the request body did not arrive within {self._limits.body_timeout:g} "
                f"seconds ({got:,} bytes received)",
            )
        )
        if self._emit is not None:
            self._emit(replies)

    def _cancel_body_timer(self) -> None:
        timer, self._body_timer = self._body_timer, None
        if timer is not None:
            timer.cancel()

    def _request_trailers(self) -> Sequence[bytes]:
        if self._done_request:
            reply = wire.encode_trailers_response()
            if self._pending is not None:
                self._held.append(reply)  # answered after the routing reply
                return ()
            return (reply,)
        # The body ended without end_of_stream because trailers end the request.
        out = list(self._route(self._take_body(), final=False))
        if self._aborted:
            return out
        if self._pending is not None:
            self._held.append(wire.encode_trailers_response())
            return out
        out.append(wire.encode_trailers_response())
        return out

    def _request_info(self, body: bytes | bytearray | None) -> RequestInfo:
        h = self._headers
        request_id = h.get(H.REQUEST_ID) or ""
        return RequestInfo(
            request_id=request_id,
            path=h.get(":path") or h.get("x-original-path") or h.get("x-forwarded-path") or "",
            method=h.get(":method", ""),
            headers=h,
            body=body,
            metadata=self._metadata,
        )

    def _route(self, body: bytes | bytearray | None, *, final: bool) -> Sequence[bytes]:
        self._done_request = True
        self._cancel_body_timer()
        info = self._request_info(body)
        had_body = body is not None
        del body  # from here on only ``info`` holds it, and the router may let it go
        generated_id = not info.request_id
        if generated_id:
            info.request_id = str(uuid.uuid4())
        try:
            result = self._router.route(info)
        except RoutingError as exc:
            return self._refuse(exc)
        except Exception:
            log.exception("routing request %s failed", info.request_id)
            return self._refuse(RoutingError(500, "internal error while routing"))
        if isinstance(result, Routed):
            out = self._apply(info, result, had_body, final=final, generated_id=generated_id)
            self._large_done()
            return out
        if not inspect.isawaitable(result):
            log.error("router returned %r for request %s", type(result), info.request_id)
            return self._refuse(RoutingError(500, "internal error while routing"))
        if self._emit is None:
            raise RuntimeError("an asynchronous routing needs a stream with an emit callback")
        pending = asyncio.ensure_future(result)
        self._pending = pending
        pending.add_done_callback(
            lambda fut: self._routed_later(fut, info, had_body, final, generated_id)
        )
        return ()

    def _routed_later(
        self,
        fut: asyncio.Future[Any],
        info: RequestInfo,
        had_body: bool,
        final: bool,
        generated_id: bool,
    ) -> None:
        if self._pending is not fut:
            # Closed meanwhile: a decision made anyway is released at once.
            if not fut.cancelled() and fut.exception() is None:
                self._release_orphan(fut.result())
            return
        self._pending = None
        replies: Sequence[bytes]
        if fut.cancelled():
            replies = self._refuse(RoutingError(500, "routing was cancelled"))
        elif isinstance(exc := fut.exception(), RoutingError):
            replies = self._refuse(exc)
        elif exc is not None:
            log.error("routing request %s failed", info.request_id, exc_info=exc)
            replies = self._refuse(RoutingError(500, "internal error while routing"))
        else:
            replies = self._apply(
                info, fut.result(), had_body, final=final, generated_id=generated_id
            )
        held, self._held = self._held, []
        out = [*replies, *held] if held and not self._aborted else list(replies)
        assert self._emit is not None
        self._emit(out)
        del out, replies
        self._large_done()

    def _release_orphan(self, routed: Any) -> None:
        if isinstance(routed, Routed):
            try:
                self._router.finished(routed, "aborted")
            except Exception:
                log.exception("completion hook failed")

    def _apply(
        self,
        info: RequestInfo,
        routed: Routed,
        had_body: bool,
        *,
        final: bool,
        generated_id: bool,
    ) -> Sequence[bytes]:
        self._routed = routed
        set_headers: list[tuple[str, str]] = [(H.DESTINATION, routed.destination)]
        set_headers.extend(routed.set_headers)
        if generated_id:
            set_headers.append((H.REQUEST_ID, info.request_id))
        new_body = info.body if routed.body is None else routed.body
        if had_body and new_body is not None:
            set_headers.append(("content-length", str(len(new_body))))
        already = {name for name, _ in set_headers}
        # Every header the EPP owns that the client sent and the EPP did not set itself.
        remove = [name for name in self._headers if H.is_steering(name) and name not in already]
        metadata = {H.LB_NAMESPACE: {H.DESTINATION: routed.destination, **routed.metadata}}
        mode = self._request_mode
        if not had_body:
            return (
                wire.encode_headers_response(
                    set_headers=set_headers,
                    remove_headers=remove,
                    clear_route_cache=True,
                    dynamic_metadata=metadata,
                ),
            )
        if mode == wire.BODY_BUFFERED or mode == wire.BODY_BUFFERED_PARTIAL:
            return (
                wire.encode_buffered_body_response(
                    set_headers=set_headers,
                    remove_headers=remove,
                    clear_route_cache=True,
                    body=None if routed.body is None else new_body,
                    dynamic_metadata=metadata,
                ),
            )
        out = [
            wire.encode_headers_response(
                set_headers=set_headers,
                remove_headers=remove,
                clear_route_cache=True,
                dynamic_metadata=metadata,
            )
        ]
        assert new_body is not None
        if routed.body_messages is not None and final:
            out.extend(routed.body_messages)
        else:
            out.extend(_chunks(new_body, end_of_stream=final, request=True))
        routed.body = routed.body_messages = None  # sent on: not kept for the exchange
        return out

    def _refuse(self, exc: RoutingError) -> Sequence[bytes]:
        self._done_request = True
        self._aborted = True
        self._cancel_body_timer()
        self._held = []
        self._finish("error")
        resp_headers: list[tuple[str, str]] = [("content-type", "application/json")]
        if exc.status == 429:
            resp_headers.append(("retry-after", "1"))
        return (
            wire.encode_immediate_response(
                exc.status,
                error_body(exc.status, exc.kind, exc.reason),
                headers=resp_headers,
                details=f"kvpick_{exc.kind}",
            ),
        )

    # ------------------------------------------------------------- response

    def _response_headers(self, req: wire.ExtProcRequest) -> Sequence[bytes]:
        status = 0
        streaming = False
        for name, value in req.headers or ():
            lname = name.lower()
            if lname == ":status":
                status = int(value) if value.isdigit() else 0
            elif lname == "content-type":
                streaming = "text/event-stream" in value
        self._response_status = status
        extra: list[tuple[str, str]] = []
        if self._routed is not None:
            try:
                extra = self._router.response_headers(
                    self._routed, status, _served_endpoint(req), streaming
                )
            except Exception:
                log.exception("response hook failed")
        if req.end_of_stream:
            self._finish("complete" if status < 400 else "error")
        return (wire.encode_headers_response(request=False, set_headers=extra),)

    def _response_body(self, req: wire.ExtProcRequest) -> Sequence[bytes]:
        if not self._first_byte_seen and (req.body or req.end_of_stream):
            self._first_byte_seen = True
            if self._routed is not None:
                try:
                    self._router.first_byte(self._routed)
                except Exception:
                    log.exception("first-byte hook failed")
        if self._routed is not None and self._response_status < 400 and req.body:
            if self._usage_tail is None:
                self._usage_tail = UsageTail()
            self._usage_tail.feed(req.body)
        if req.end_of_stream:
            self._finish("complete" if self._response_status < 400 else "error")
        if self._response_mode != wire.BODY_FULL_DUPLEX_STREAMED:
            return (wire.encode_buffered_body_response(request=False),)
        if len(req.body) <= BODY_CHUNK:
            return (wire.encode_streamed_body(req.body, req.end_of_stream, request=False),)
        return _chunks(req.body, end_of_stream=req.end_of_stream, request=False)

    def _finish(self, outcome: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._routed is not None:
            tail, self._usage_tail = self._usage_tail, None
            usage = None
            if tail is not None and outcome == "complete":
                try:
                    usage = tail.usage()
                except Exception:  # the usage is a nicety; the bookkeeping below is not
                    log.debug("unreadable usage in a response", exc_info=True)
            try:
                self._router.finished(self._routed, outcome, usage)
            except Exception:
                log.exception("completion hook failed")


_NO_LIMITS = StreamLimits(max_body_bytes=None, body_timeout=None)


def encode_body(body: bytes | bytearray) -> list[bytes]:
    """A whole new request body as the FULL_DUPLEX_STREAMED responses that carry it (for
    :attr:`Routed.body_messages`); thread-safe."""
    return _chunks(body, end_of_stream=True, request=True)


def _chunks(body: bytes | bytearray, *, end_of_stream: bool, request: bool) -> list[bytes]:
    """``body`` as streamed body responses of at most :data:`BODY_CHUNK` bytes each."""
    if not body:
        return [wire.encode_streamed_body(b"", end_of_stream, request=request)]
    view = memoryview(body)
    n = len(body)
    return [
        wire.encode_streamed_body(
            view[i : i + BODY_CHUNK], end_of_stream and i + BODY_CHUNK >= n, request=request
        )
        for i in range(0, n, BODY_CHUNK)
    ]
