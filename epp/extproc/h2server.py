"""A small gRPC server on HTTP/2, run on the asyncio loop itself.

Why not grpc.aio here: every message grpc.aio delivers crosses from its poller thread to
the event loop, and on a small VM a wake-up on another CPU costs hundreds of microseconds
(docs/benchmarks.md measures it). One ext_proc request needs at least three exchanges with
the gateway, each on the gateway's critical path. This server reads frames in the loop's
own ``data_received`` callback and answers in the same callback, one write per batch.

What it implements (RFC 9113 and the gRPC-over-HTTP/2 wire format), and what it guarantees:

* the connection preface, SETTINGS (ours sent first, the peer's acknowledged), PING,
  WINDOW_UPDATE, RST_STREAM, GOAWAY, HEADERS with CONTINUATION, padding, PRIORITY
  checked and otherwise ignored;
* flow control both ways: received bytes are credited back as they are consumed, the
  peer is held to the windows it was given (DATA beyond the connection window is a
  connection error FLOW_CONTROL_ERROR, beyond a stream's window a stream error), and
  nothing is sent beyond the peer's connection and stream windows (what does not fit
  waits for the peer's WINDOW_UPDATE, in order);
* length-prefixed gRPC messages reassembled across DATA frames; a message over the size
  limit ends its stream with RESOURCE_EXHAUSTED, a compressed one with UNIMPLEMENTED, an
  unknown method gets UNIMPLEMENTED, a handler that raises gets INTERNAL;
* every stream's handler is closed exactly once: on the client's end of stream, on
  RST_STREAM, or when the connection is lost;
* RFC 9113's errors where it names them, frame by frame (tests/integration/
  test_h2_conformance.py checks each): a connection error sends GOAWAY with the code and
  the last stream processed, stops reading frames, closes every handler, and closes the
  socket once the GOAWAY can have reached the peer (:meth:`H2Connection._linger`); a
  stream error sends RST_STREAM with the code and ends that stream only;
* per-connection abuse limits (:class:`H2Limits`): more streams reset by the client than
  ``max_resets_per_second`` (rapid reset, CVE-2023-44487), or more SETTINGS, PING,
  PRIORITY and empty DATA or CONTINUATION frames than ``max_control_frames_per_second``,
  within one second of the clock, get GOAWAY ENHANCE_YOUR_CALM. Every connection closed for
  an error is logged once (WARNING, with the peer and why) and counted in
  ``kvpick_extproc_connections_closed{reason}``, every stream reset with an error in
  ``kvpick_extproc_streams_ended_by_epp{reason}`` (reasons: the RFC code's lowercase name,
  ``rapid_reset``, ``control_flood``);
* bounded work per turn of the event loop: a connection parses frames and delivers
  messages for at most :data:`TURN_SECONDS` (and :data:`TURN_BYTES` of frames) before the
  loop serves others, and writes at most :data:`TURN_BYTES`; messages left over inside a
  frame wait on their stream, in order, for the connection's next turn (reading pauses
  meanwhile, so the peer is held back by TCP and HTTP/2 flow control, not by buffering
  here). One connection's backlog delays another connection's next message by at most
  about :data:`TURN_SECONDS` plus the one message being handled;
* a handler that raises :class:`~epp.extproc.stream_error.StreamError` ends its stream
  with the status it names (counted in ``kvpick_extproc_streams_ended_by_epp``);
* connection limits (:class:`H2Limits`): at most ``max_connections`` open (more are
  closed at once), a TLS handshake or plaintext preface within ``handshake_timeout``, and a
  connection with no open stream for ``idle_timeout`` told GOAWAY (first with the largest
  stream id, so a stream the peer sent meanwhile is still served) and closed; each counted
  in ``kvpick_extproc_connections_closed{reason}``;
* memory: a TLS connection reads through a 16 KiB buffer (one TLS record) instead of
  asyncio's 256 KiB, so an idle connection costs tens of kilobytes, and ``after_close``
  (the EPP's heap trimmer) runs when connections close.

Handlers are synchronous: ``handle(bytes)`` returns the messages to send back, and
``close()`` releases the stream. A handler factory is given the stream's ``emit`` callback,
through which the handler sends messages later, from another event-loop callback (a reply
computed off the loop, a timeout); ``emit`` on a stream or connection that has ended does
nothing. :class:`epp.extproc.stream.ExtProcStream` is such a handler.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import hpack

from epp import metrics as M
from epp.extproc.stream_error import StreamError

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Settings identifiers.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11
_ERROR_NAMES = {
    code: name.lower()
    for name, code in (
        ("NO_ERROR", NO_ERROR),
        ("PROTOCOL_ERROR", PROTOCOL_ERROR),
        ("INTERNAL_ERROR", INTERNAL_ERROR),
        ("FLOW_CONTROL_ERROR", FLOW_CONTROL_ERROR),
        ("STREAM_CLOSED", STREAM_CLOSED),
        ("FRAME_SIZE_ERROR", FRAME_SIZE_ERROR),
        ("REFUSED_STREAM", REFUSED_STREAM),
        ("CANCEL", CANCEL),
        ("COMPRESSION_ERROR", COMPRESSION_ERROR),
        ("ENHANCE_YOUR_CALM", ENHANCE_YOUR_CALM),
    )
}
"""The metric reason (and log wording) for each error code this server sends."""

# gRPC status codes.
GRPC_OK, GRPC_INTERNAL, GRPC_UNIMPLEMENTED, GRPC_RESOURCE_EXHAUSTED = 0, 13, 12, 8
GRPC_UNAVAILABLE = 14

MAX_WINDOW = 2**31 - 1
RECV_WINDOW = 16 * 1024 * 1024
"""What we let the peer send ahead, per stream and (raised at start) per connection."""
OUR_MAX_FRAME = 1 << 20
"""Larger DATA frames from the peer mean fewer frames to parse for a big body."""
MAX_HEADER_BLOCK = 256 * 1024
"""Both the header block we buffer (compressed) and the header list we decode, in bytes;
announced as SETTINGS_MAX_HEADER_LIST_SIZE."""
MAX_STREAMS = 1000
"""Announced as SETTINGS_MAX_CONCURRENT_STREAMS; a stream beyond it gets REFUSED_STREAM.
Each open stream costs about 2.4 KB, and Python's allocator keeps much of that after the
streams end (its arenas stay pinned), so one connection may hold at most this many: a
gateway with more requests in flight opens another connection, as Envoy's connection
pool does when it reaches a server's limit."""
TURN_BYTES = 256 * 1024
"""Bytes of frames one connection reads, and separately writes, per turn of the event loop;
the rest waits for the next turn, so that one connection's large body costs other
connections at most about a millisecond at a time."""
TURN_SECONDS = 0.0003
"""Time one connection may spend parsing frames and handling messages in one turn of the
event loop; checked after each frame and each message, so at least one goes through."""
TLS_READ_BUFFER = 16 * 1024
"""The read buffer of a TLS connection: one TLS record's worth of plaintext."""
TLS_BULK_READ_BUFFER = 256 * 1024
"""The read buffer while reads keep filling the small one (a large body arriving)."""
IDLE_SWEEP_SECONDS = 1.0
"""How often the listener looks for connections past their handshake or idle timeout."""
FINAL_GOAWAY_SECONDS = 1.0
"""After the first GOAWAY of an idle close, how long a stream the peer sent meanwhile can
still begin before the connection closes."""
LINGER_SECONDS = 1.0
"""After a connection error, how long the socket stays open (reading and discarding) so
that the GOAWAY reaches a peer that is still sending; the peer closing ends it sooner."""
CLOSED_STREAMS_KEPT = 32
"""Streams the client closed itself that a connection remembers, newest first, to tell a
frame on one of them (STREAM_CLOSED) from a late frame on one it reset (ignored)."""
SKIPPED_RANGES_KEPT = 8
"""Ranges of stream ids the client skipped that a connection remembers, to refuse a HEADERS
that reopens one (stream ids must increase)."""


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one listener lets its clients do (the ``--max-connections`` … flags)."""

    max_connections: int = 1024
    """Open connections; one beyond is closed as soon as it is accepted."""
    handshake_timeout: float = 10.0
    """Seconds from accept to a finished TLS handshake (plaintext: the HTTP/2 preface)."""
    idle_timeout: float | None = 300.0
    """Seconds a connection may have no open stream before GOAWAY and close; None: no
    limit."""
    max_resets_per_second: int = 1000
    """Streams still open here that the client may reset, per connection per second (rapid
    reset); beyond it GOAWAY ENHANCE_YOUR_CALM."""
    max_control_frames_per_second: int = 200
    """SETTINGS, PING, PRIORITY and empty DATA or CONTINUATION frames (without END_STREAM or
    END_HEADERS) per connection per second; beyond it GOAWAY ENHANCE_YOUR_CALM."""


class StreamHandler(Protocol):
    def handle(self, message: bytes) -> Sequence[bytes]: ...

    def close(self) -> None: ...


Emit = Callable[[Sequence[bytes]], None]
HandlerFactory = Callable[[Emit], StreamHandler]
"""Makes the handler of a new stream; the argument sends that stream's later replies."""


class ConnectionError_(Exception):
    """A connection-level protocol error: GOAWAY with ``code``, then close; ``reason`` is
    the metric label when it is not the code's own name (``rapid_reset``, ...)."""

    def __init__(self, code: int, why: str, reason: str | None = None) -> None:
        super().__init__(why)
        self.code = code
        self.reason = reason


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return (
        bytes((n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, ftype, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """One header as an HPACK literal that is never indexed, with a literal name: it
    touches no compression state, so it can be built once and sent on any connection."""
    return b"\x10" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


_RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")  # :status 200


def _status_block(code: int, message: str, *, with_headers: bool) -> bytes:
    block = _RESPONSE_HEADERS if with_headers else b""
    block += _literal(b"grpc-status", str(code).encode())
    if message:
        # gRPC percent-encodes the message (spaces included are fine as-is).
        block += _literal(b"grpc-message", quote(message, safe=" ").encode())
    return block


def _continued(held: bytearray, data: bytes) -> bytes | bytearray:
    """What to parse next: ``data`` itself, or ``held`` with ``data`` appended when a
    partial unit was held back from before (the caller tells them apart by identity)."""
    if held:
        held += data
        return held
    return data


def _grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class _Stream:
    __slots__ = (
        "backlog",
        "buf",
        "closed_local",
        "end_after_backlog",
        "handler",
        "headers_sent",
        "id",
        "pending",
        "recv_unacked",
        "remote_ended",
        "send_window",
    )

    def __init__(self, stream_id: int, handler: StreamHandler | None, send_window: int) -> None:
        self.id = stream_id
        self.handler = handler
        self.buf = bytearray()
        self.backlog: bytes | memoryview | None = None  # messages left for the next turn
        self.end_after_backlog = False  # END_STREAM came while the backlog waited
        self.send_window = send_window
        self.pending: list[tuple[bytes, bool]] = []  # (DATA payload, last) waiting for window
        self.recv_unacked = 0
        self.headers_sent = False
        self.closed_local = False
        self.remote_ended = False


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection from a gateway; see the module docstring for what it does."""

    def __init__(
        self,
        handlers: dict[bytes, HandlerFactory],
        max_message: int,
        server: H2Server,
    ) -> None:
        self._handlers = handlers
        self._max_message = max_message
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._inbuf = bytearray()
        self._preface_seen = False
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_BLOCK
        self._header_block: bytearray | None = None
        self._header_stream = 0
        self._header_end_stream = False
        self._peer_initial_window = 65_535
        self._peer_max_frame = 16_384
        self._conn_send_window = 65_535
        self._conn_recv_unacked = 0
        self._out: list[bytes] = []
        self._blocked: dict[int, _Stream] = {}  # streams with output waiting for window
        self._going_away = False
        self._closed = False
        self._input_backlog = False  # frames left unparsed until the next turn
        self._output_due = False  # output left for the next turn
        self._turn_out = 0  # bytes of frames written this turn
        self._deadline = 0.0  # perf_counter() at which this turn's input work should stop
        self._stalled: deque[_Stream] = deque()  # streams with messages left for next turn
        self._opened = time.monotonic()
        self._idle_since: float | None = None  # set by the listener's sweep
        self._close_at: float | None = None  # an idle close's final GOAWAY is due then
        self.peer = "?"
        # The frame layer's state (RFC 9113 checks and abuse limits).
        self._settings_seen = False  # the client's preface SETTINGS
        self._last_processed = 0  # the largest stream handed to a handler: GOAWAY's last id
        self._header_error = 0  # a stream error found in the HEADERS of the block in progress
        self._peer_closed: dict[int, bool] = {}  # stream -> the client reset it (not ended)
        self._skipped: list[tuple[int, int]] = []  # stream id ranges the client jumped over
        self._reset_second = 0  # the second of the clock the reset count is for
        self._resets = 0  # streams the client reset in that second
        self._control_second = 0
        self._controls = 0  # control frames in _control_second

    # ------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        server = self._server
        if len(server._connections) >= server.limits.max_connections:
            self._closed = True
            M.EXTPROC_CONNECTIONS_CLOSED.labels("max_connections").inc()
            server.note_refused(self.peer)
            transport.abort()
            return
        server._connections.add(self)
        M.EXTPROC_CONNECTIONS.set(len(server._connections))
        settings = b"".join(
            k.to_bytes(2, "big") + v.to_bytes(4, "big")
            for k, v in (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (S_INITIAL_WINDOW_SIZE, RECV_WINDOW),
                (S_MAX_FRAME_SIZE, OUR_MAX_FRAME),
                (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
            )
        )
        transport.write(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, (RECV_WINDOW - 65_535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        server = self._server
        if self in server._connections:
            server._connections.discard(self)
            M.EXTPROC_CONNECTIONS.set(len(server._connections))
            if server.after_close is not None:
                server.after_close()
        self._drop_streams()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # lingering after a connection error: what the peer still sends is dropped
        if self._input_backlog:
            self._inbuf += data  # parsed in turn, after what came first
            return
        self._turn_out = 0
        self._deadline = time.perf_counter() + TURN_SECONDS
        self._parse(data)

    def _continue_input(self) -> None:
        if self._closed:
            return
        self._input_backlog = False
        self._turn_out = 0
        self._deadline = time.perf_counter() + TURN_SECONDS
        if self._stalled and not self._drain_stalled():
            self._defer_input()
            self._flush()
            return
        self._parse(b"")
        if not self._input_backlog and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def _drain_stalled(self) -> bool:
        """Delivers the messages streams left from earlier turns, oldest first, within this
        turn's time; True when none is left."""
        stalled = self._stalled
        while stalled:
            st = stalled[0]
            data, st.backlog = st.backlog, None
            if data is not None and not st.closed_local:
                self._messages(st, data)
                if st.backlog is not None:
                    return False  # out of time again, inside this stream
            stalled.popleft()
            if st.end_after_backlog:
                st.end_after_backlog = False
                self._remote_end(st)
            if self._closed:
                return True
            if stalled and time.perf_counter() >= self._deadline:
                return False
        return True

    def _parse(self, data: bytes) -> None:
        # Frames are sliced straight out of ``data``; only a partial frame left over from
        # the previous read (or a backlog) makes the connection buffer bytes.
        leftover = self._inbuf
        buf = _continued(leftover, data)
        budget = TURN_BYTES
        try:
            if not self._preface_seen:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    if buf is data:
                        leftover += data
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._preface_seen = True
                pos = len(PREFACE)
            else:
                pos = 0
            end = len(buf)
            while end - pos >= 9:
                if budget <= 0:
                    self._defer_input()
                    break
                length = buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2]
                if length > OUR_MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                ftype = buf[pos + 3]
                flags = buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                budget -= 9 + length
                self._frame(ftype, flags, sid, bytes(payload) if buf is leftover else payload)
                if self._closed:
                    return
                if self._stalled or (end - pos >= 9 and time.perf_counter() >= self._deadline):
                    self._defer_input()
                    break
            if buf is leftover:
                del leftover[:pos]
            elif pos < len(buf):
                leftover += buf[pos:]
        except ConnectionError_ as exc:
            self._fail(exc.code, str(exc), exc.reason)
        self._flush()

    def _defer_input(self) -> None:
        """This turn's reading is done: stop reading and go on with the rest next turn."""
        self._input_backlog = True
        if self._transport is not None:
            self._transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._continue_input)

    def _flush(self) -> None:
        if self._out and self._transport is not None and not self._closed:
            out = self._out
            self._out = []
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self._going_away and not self._streams and not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()

    def _goaway(self, code: int) -> bytes:
        # The last stream id is the largest one processed, not the largest seen: streams
        # refused meanwhile must not raise it (a later GOAWAY may never name a higher id
        # than an earlier one).
        last = self._last_processed.to_bytes(4, "big")
        return _frame(GOAWAY, 0, 0, last + code.to_bytes(4, "big"))

    def _fail(self, code: int, why: str, reason: str | None = None) -> None:
        """A connection error: GOAWAY with ``code`` after what is queued, every handler
        closed now, no frame read after this one, the socket closed by :meth:`_linger`;
        logged and counted under ``reason`` (default: the code's name)."""
        if self._closed:
            return
        self._closed = True
        name = _ERROR_NAMES.get(code, "internal_error")
        M.EXTPROC_CONNECTIONS_CLOSED.labels(reason or name).inc()
        log.warning("closing HTTP/2 connection from %s with %s: %s", self.peer, name.upper(), why)
        self._out.append(self._goaway(code))
        out, self._out = self._out, []
        self._drop_streams()
        transport = self._transport
        if transport is not None:
            transport.write(b"".join(out))
            self._linger(transport)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Closes ``transport`` after a GOAWAY without losing the GOAWAY.

        Closing a socket with the peer's bytes unread (or still arriving) makes the kernel
        answer with a TCP reset, and a client that had not yet read the GOAWAY then gets
        the reset instead: a client that went on sending after its undecodable header
        block saw no GOAWAY at all. So the write side is shut where the transport can
        (plaintext: the peer reads the GOAWAY, then the end of the stream), reading goes
        on with everything dropped, and the socket closes when the peer closes or after
        :data:`LINGER_SECONDS`, whichever comes first."""
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()  # reading may have been paused for a backlog
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def _drop_streams(self) -> None:
        """Closes the handler of every stream still open, once, and forgets the streams."""
        streams, self._streams = self._streams, {}
        self._blocked.clear()
        self._stalled.clear()
        for st in streams.values():
            st.backlog = None
            self._close_handler(st)

    def go_away(self) -> None:
        """Tell the peer no new streams will be taken; close once the open ones end."""
        if self._closed or self._going_away:
            return
        self._going_away = True
        self._out.append(self._goaway(NO_ERROR))
        self._flush()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()  # also one lingering after a connection error

    # ---------------------------------------------------------------- frames

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._header_block is not None and ftype != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted")
        if not self._settings_seen:
            # The client's preface is the magic string and then a SETTINGS frame.
            if ftype != SETTINGS or flags & ACK:
                raise ConnectionError_(PROTOCOL_ERROR, "the preface is not followed by SETTINGS")
            self._settings_seen = True
        if ftype == DATA:
            self._on_data(flags, sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == SETTINGS:
            self._count_control()
            self._on_settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == PING:
            self._count_control()
            self._on_ping(flags, sid, payload)
        elif ftype == RST_STREAM:
            self._on_rst_stream(sid, payload)
        elif ftype == PRIORITY:
            self._count_control()
            self._on_priority(sid, payload)
        elif ftype == GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Unknown frame types are ignored, as the RFC requires.

    def _idle(self, sid: int) -> bool:
        """Whether stream ``sid`` is still idle: a client stream not yet opened, or any
        even (server-initiated) one, since this server opens none."""
        return sid > self._last_stream or sid % 2 == 0

    def _count_control(self) -> None:
        """Counts a control frame; past the limit in one second, ENHANCE_YOUR_CALM. A count
        per second of the clock (no timestamps kept), so a burst split across two seconds
        can reach twice the limit before it is stopped."""
        now = int(time.monotonic())
        if now != self._control_second:
            self._control_second = now
            self._controls = 0
        self._controls += 1
        limit = self._server.limits.max_control_frames_per_second
        if self._controls > limit:
            raise ConnectionError_(
                ENHANCE_YOUR_CALM,
                f"more than {limit} SETTINGS, PING, PRIORITY or empty frames in a second",
                "control_flood",
            )

    def _count_reset(self) -> None:
        """Counts a stream the client reset while it was open here; past the limit in one
        second, ENHANCE_YOUR_CALM (the rapid-reset defence). Counted as in
        :meth:`_count_control`."""
        now = int(time.monotonic())
        if now != self._reset_second:
            self._reset_second = now
            self._resets = 0
        self._resets += 1
        limit = self._server.limits.max_resets_per_second
        if self._resets > limit:
            raise ConnectionError_(
                ENHANCE_YOUR_CALM, f"more than {limit} streams reset in a second", "rapid_reset"
            )

    def _note_peer_closed(self, sid: int, reset: bool) -> None:
        """Remembers that the client ended (or reset) stream ``sid`` itself, so that a later
        DATA or HEADERS on it is its error, not a frame crossing our own RST_STREAM."""
        closed = self._peer_closed
        closed[sid] = reset
        if len(closed) > CLOSED_STREAMS_KEPT:
            del closed[next(iter(closed))]

    def _note_opened(self, sid: int) -> None:
        """Stream ``sid`` opens: the ids the client skipped on the way are closed for good."""
        expected = self._last_stream + 2 if self._last_stream else 1
        if sid > expected:
            self._skipped.append((expected, sid - 2))
            if len(self._skipped) > SKIPPED_RANGES_KEPT:
                del self._skipped[0]
        self._last_stream = sid

    def _closed_by_peer(self, sid: int, what: str) -> None:
        """Raises STREAM_CLOSED when the client itself closed ``sid`` (ended, reset, or
        skipped it) and then sent ``what`` on it. A stream this server reset gets nothing:
        the client may have sent frames before it saw the RST_STREAM."""
        reset = self._peer_closed.get(sid)
        if reset is None and not any(lo <= sid <= hi for lo, hi in self._skipped):
            return
        how = "skipped" if reset is None else "reset" if reset else "ended"
        raise ConnectionError_(STREAM_CLOSED, f"{what} on stream {sid}, which the client {how}")

    def _stream_error(self, sid: int, code: int, why: str) -> None:
        """A stream error on ``sid``. RST_STREAM must not name an idle stream, so there the
        error is the connection's (RFC 9113 §5.4.1 allows that for any stream error)."""
        st = self._streams.get(sid)
        if st is not None:
            self._reset(st, code)
        elif self._idle(sid):
            raise ConnectionError_(code, f"{why} (idle stream {sid})")
        else:
            self._reset_id(sid, code)

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"PING on stream {sid}")
        if len(payload) != 8:
            raise ConnectionError_(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
        if not flags & ACK:
            self._out.append(_frame(PING, ACK, 0, payload))

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if self._idle(sid):
            raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        self._note_peer_closed(sid, True)
        st = self._streams.pop(sid, None)
        if st is None:
            return  # closed here already: nothing was spared, nothing to count
        self._forget(st)
        self._close_handler(st)
        self._count_reset()

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")
        elif int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
            # RFC 7540 §5.3.1 (RFC 9113 keeps the frame, not this text; h2spec checks it).
            self._stream_error(sid, PROTOCOL_ERROR, f"stream {sid} depends on itself")
        # Otherwise ignored: priorities are advice, and this server has none to apply.

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"GOAWAY on stream {sid}")
        if len(payload) < 8:
            raise ConnectionError_(FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
        self._going_away = True

    def _strip_padding(self, flags: int, payload: bytes, fixed: int = 0) -> bytes:
        """``payload`` without its Pad Length field and padding; ``fixed`` bytes of fields
        the frame must carry come first and stay (HEADERS' priority fields)."""
        if flags & PADDED:
            if len(payload) < 1 + fixed:
                raise ConnectionError_(FRAME_SIZE_ERROR, "padded frame too short")
            pad = payload[0]
            if pad > len(payload) - 1 - fixed:
                raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - pad]
        if len(payload) < fixed:
            raise ConnectionError_(FRAME_SIZE_ERROR, "frame too short for its fields")
        return payload

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or sid % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        self._header_error = 0
        if flags & PRIORITY_FLAG:
            block = self._strip_padding(flags, payload, 5)
            if int.from_bytes(block[:4], "big") & 0x7FFFFFFF == sid:
                self._header_error = PROTOCOL_ERROR  # a stream depending on itself
            block = block[5:]
        else:
            block = self._strip_padding(flags, payload)
        if len(block) > MAX_HEADER_BLOCK:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        self._header_block = bytearray(block)
        self._header_stream = sid
        self._header_end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._end_headers()

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._header_block is None or sid != self._header_stream:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        if not payload and not flags & END_HEADERS:
            self._count_control()  # empty ones would otherwise never fill the block
        self._header_block += payload
        if len(self._header_block) > MAX_HEADER_BLOCK:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._end_headers()

    def _end_headers(self) -> None:
        assert self._header_block is not None
        block, self._header_block = bytes(self._header_block), None
        sid = self._header_stream
        end_stream = self._header_end_stream
        # Decoded whatever becomes of the stream: the decoder's table must follow the
        # client's encoder (RFC 9113 §4.3).
        try:
            pairs = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            # The decoder stopped part-way, so its table is lost with the connection.
            raise ConnectionError_(ENHANCE_YOUR_CALM, f"header list: {exc}") from exc
        except Exception as exc:  # hpack raises several types; all mean the same here
            raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        st = self._streams.get(sid)
        if st is not None:  # trailers from the client (gRPC clients rarely send any)
            if self._header_error:
                self._reset(st, self._header_error)
            elif st.remote_ended or st.end_after_backlog:
                self._reset(st, STREAM_CLOSED)  # half-closed (remote): a stream error
            elif not end_stream:
                self._reset(st, PROTOCOL_ERROR)  # trailers must end the request (§8.1)
            else:
                self._note_peer_closed(sid, False)
                if st.backlog is not None:
                    st.end_after_backlog = True  # after the messages still waiting
                else:
                    self._remote_end(st)
            return
        if sid <= self._last_stream:
            if any(lo <= sid <= hi for lo, hi in self._skipped):
                raise ConnectionError_(PROTOCOL_ERROR, f"stream {sid} opened after a higher one")
            self._closed_by_peer(sid, "HEADERS")
            return  # a stream this server reset: its late headers mean nothing
        self._note_opened(sid)
        if self._header_error:
            self._reset_id(sid, self._header_error)
            return
        if self._going_away or len(self._streams) >= MAX_STREAMS:
            self._reset_id(sid, REFUSED_STREAM)
            return
        self._last_processed = sid
        path = b""
        content_type = b""
        for name, value in pairs:
            if name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
        factory = self._handlers.get(path)
        st = _Stream(sid, None, self._peer_initial_window)
        self._streams[sid] = st
        if factory is None or not content_type.startswith(b"application/grpc"):
            why = f"unknown method {path.decode('latin-1')}" if factory is None else "not gRPC"
            self._finish(st, GRPC_UNIMPLEMENTED, why)
        else:
            try:
                st.handler = factory(lambda replies, st=st: self._emit(st, replies))
            except Exception:
                log.exception("stream handler could not be created")
                self._finish(st, GRPC_INTERNAL, "internal error")
        if end_stream:
            self._note_peer_closed(sid, False)
            self._remote_end(st)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        # What the client may still send is the window minus what it sent and we have not
        # credited back yet (every WINDOW_UPDATE sent subtracts its increment).
        if self._conn_recv_unacked + flow > RECV_WINDOW:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        st = self._streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._closed_by_peer(sid, "DATA")
        data = self._strip_padding(flags, payload)
        # Counted toward the connection window even when the stream is gone or in error.
        self._conn_recv_unacked += flow
        if self._conn_recv_unacked >= RECV_WINDOW // 2:
            self._out.append(
                _frame(WINDOW_UPDATE, 0, 0, self._conn_recv_unacked.to_bytes(4, "big"))
            )
            self._conn_recv_unacked = 0
        if not data and not flags & END_STREAM:
            self._count_control()
        if st is None:
            return  # a stream this server reset
        if st.remote_ended or st.end_after_backlog:
            self._reset(st, STREAM_CLOSED)  # half-closed (remote): a stream error
            return
        if st.recv_unacked + flow > RECV_WINDOW:
            self._reset(st, FLOW_CONTROL_ERROR)
            return
        st.recv_unacked += flow
        if st.recv_unacked >= RECV_WINDOW // 2 and not flags & END_STREAM:
            self._out.append(_frame(WINDOW_UPDATE, 0, sid, st.recv_unacked.to_bytes(4, "big")))
            st.recv_unacked = 0
        if st.backlog is not None:
            # Messages of this stream wait from an earlier frame; these come after them.
            st.backlog = bytes(st.backlog) + data
        elif not st.closed_local:
            self._messages(st, data)
        if flags & END_STREAM:
            self._note_peer_closed(sid, False)
            if st.backlog is not None:
                st.end_after_backlog = True
            else:
                self._remote_end(st)

    def _messages(self, st: _Stream, data: bytes | memoryview) -> None:
        """Delivers the whole gRPC messages ``data`` completes; keeps a partial one in
        ``st.buf``. Messages are sliced from ``data`` itself unless one spans frames. When
        the turn's time runs out with whole messages left, they are kept in
        ``st.backlog`` and the stream joins the connection's stalled streams."""
        held = st.buf
        src = _continued(held, data)
        pos = 0
        end = len(src)
        while end - pos >= 5 and not st.closed_local:
            size = int.from_bytes(src[pos + 1 : pos + 5], "big")
            if src[pos] != 0:
                self._finish(st, GRPC_UNIMPLEMENTED, "compressed messages are not accepted")
            elif size > self._max_message:
                self._finish(
                    st,
                    GRPC_RESOURCE_EXHAUSTED,
                    f"message of {size} bytes is over the limit of {self._max_message}",
                )
            elif end - pos - 5 >= size:
                message = src[pos + 5 : pos + 5 + size]
                pos += 5 + size
                self._deliver(st, message if type(message) is bytes else bytes(message))
                if end - pos >= 5 and not st.closed_local and time.perf_counter() >= self._deadline:
                    # Out of time: the rest waits for this connection's next turn.
                    st.backlog = bytes(src[pos:]) if src is held else memoryview(src)[pos:]
                    held.clear()
                    self._stalled.append(st)
                    return
                continue
            break
        if st.closed_local:
            held.clear()
        elif src is held:
            del held[:pos]
        elif pos < end:
            held += src[pos:]

    def _deliver(self, st: _Stream, message: bytes) -> None:
        handler = st.handler
        if handler is None:
            return
        try:
            replies = handler.handle(message)
        except StreamError as exc:
            M.EXTPROC_STREAMS_ENDED.labels(exc.reason).inc()
            log.info("ending stream %d from %s: %s", st.id, self.peer, exc)
            self._finish(st, exc.code, str(exc))
            return
        except Exception:
            log.exception("ext_proc stream %d failed", st.id)
            self._finish(st, GRPC_INTERNAL, "internal error")
            return
        self._send_replies(st, replies)

    def _emit(self, st: _Stream, replies: Sequence[bytes]) -> None:
        """A handler's replies sent outside ``handle`` (see the module docstring)."""
        if self._closed or st.closed_local or st.handler is None:
            return
        if not self._output_due:
            self._turn_out = 0
        self._send_replies(st, replies)
        self._flush()

    def _send_replies(self, st: _Stream, replies: Sequence[bytes]) -> None:
        limit = self._server.max_send
        for reply in replies:
            if limit is not None and len(reply) > limit:
                # As grpc does with a message over max_send_message_length.
                self._finish(
                    st,
                    GRPC_RESOURCE_EXHAUSTED,
                    f"response message of {len(reply)} bytes is over the send limit of {limit}",
                )
                return
            self._send_message(st, reply)

    def _remote_end(self, st: _Stream) -> None:
        st.remote_ended = True
        if not st.closed_local:
            if st.buf:
                self._finish(st, GRPC_INTERNAL, "stream ended inside a message")
            else:
                self._finish(st, GRPC_OK, "")
        if st.closed_local and not st.pending:
            self._streams.pop(st.id, None)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == S_ENABLE_PUSH:
                if value > 1:
                    raise ConnectionError_(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise ConnectionError_(
                            FLOW_CONTROL_ERROR, f"initial window overflows stream {st.id}"
                        )
            elif key == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, f"max frame size {value}")
                self._peer_max_frame = value
            # The other settings constrain what the peer accepts from a server that sends
            # no pushes and only small, literal header blocks: nothing to change here.
        self._out.append(_frame(SETTINGS, ACK, 0))
        self._drain_pending()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            st = self._streams.get(sid)
            if st is None:
                if self._idle(sid):
                    raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
                return  # closed: a late update for it is allowed and means nothing
            if inc == 0:
                self._reset(st, PROTOCOL_ERROR)
                return
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                self._reset(st, FLOW_CONTROL_ERROR)
                return
        self._drain_pending()

    # ---------------------------------------------------------------- output

    def _send_message(self, st: _Stream, message: bytes) -> None:
        if st.closed_local:
            return
        if not st.headers_sent:
            st.headers_sent = True
            self._out.append(_frame(HEADERS, END_HEADERS, st.id, _RESPONSE_HEADERS))
        self._send_data(st, _grpc_message(message))

    def _send_data(self, st: _Stream, data: bytes) -> None:
        if st.pending:
            st.pending.append((data, False))
            return
        rest = self._write_data(st, data)
        if rest:
            st.pending.append((rest, False))
            self._blocked[st.id] = st

    def _write_data(self, st: _Stream, data: bytes) -> bytes:
        """Writes as much of ``data`` as the windows and this turn's output budget allow;
        returns what is left."""
        room_now = TURN_BYTES - self._turn_out
        if len(data) <= min(self._conn_send_window, st.send_window, self._peer_max_frame, room_now):
            self._out.append(_frame(DATA, 0, st.id, data))  # the usual case: one frame
            self._conn_send_window -= len(data)
            st.send_window -= len(data)
            self._turn_out += len(data)
            return b""
        view = memoryview(data)  # frames are cut from a view: no copy of the remainder
        pos, end = 0, len(data)
        while pos < end:
            if self._turn_out >= TURN_BYTES:
                self._defer_output()
                return data[pos:]
            room = min(self._conn_send_window, st.send_window, self._peer_max_frame, end - pos)
            if room <= 0:
                return data[pos:]
            self._out.append(_frame(DATA, 0, st.id, view[pos : pos + room]))
            self._conn_send_window -= room
            st.send_window -= room
            self._turn_out += room
            pos += room
        return b""

    def _defer_output(self) -> None:
        if not self._output_due:
            self._output_due = True
            asyncio.get_running_loop().call_soon(self._continue_output)

    def _continue_output(self) -> None:
        self._output_due = False
        if self._closed:
            return
        self._turn_out = 0
        self._drain_pending()
        self._flush()

    def _drain_pending(self) -> None:
        for st in list(self._blocked.values()):
            while st.pending:
                if self._turn_out >= TURN_BYTES:
                    self._defer_output()
                    return
                data, trailers = st.pending[0]
                if trailers:
                    st.pending.pop(0)
                    self._out.append(_frame(HEADERS, END_HEADERS | END_STREAM, st.id, data))
                    continue
                rest = self._write_data(st, data)
                if rest:
                    st.pending[0] = (rest, False)
                    break
                st.pending.pop(0)
            if not st.pending:
                del self._blocked[st.id]
                if st.closed_local and st.remote_ended:
                    self._streams.pop(st.id, None)
            elif self._output_due:
                return  # the budget ran out inside this stream's output

    def _finish(self, st: _Stream, code: int, message: str) -> None:
        """Send the stream's trailers (trailers-only when no message went out) and close
        its handler; later messages on it are discarded."""
        if st.closed_local:
            return
        st.closed_local = True
        block = _status_block(code, message, with_headers=not st.headers_sent)
        st.headers_sent = True
        if st.pending:
            st.pending.append((block, True))
        else:
            self._out.append(_frame(HEADERS, END_HEADERS | END_STREAM, st.id, block))
        st.buf.clear()
        self._close_handler(st)
        if not st.remote_ended and code != GRPC_OK and not st.pending:
            # The client may still be sending; tell it to stop (the trailers went first).
            self._out.append(_frame(RST_STREAM, 0, st.id, NO_ERROR.to_bytes(4, "big")))
            st.remote_ended = True
        if st.remote_ended and not st.pending:
            self._streams.pop(st.id, None)

    def _reset(self, st: _Stream, code: int) -> None:
        """A stream error: RST_STREAM with ``code``, the stream forgotten and its handler
        closed; later frames on it are ignored."""
        self._streams.pop(st.id, None)
        self._forget(st)
        self._close_handler(st)
        self._reset_id(st.id, code)

    def _reset_id(self, sid: int, code: int) -> None:
        """RST_STREAM with ``code`` for a stream that has no state here, counted."""
        self._out.append(_frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))
        name = _ERROR_NAMES.get(code, "internal_error")
        M.EXTPROC_STREAMS_ENDED.labels(name).inc()
        log.debug("reset stream %d from %s with %s", sid, self.peer, name.upper())

    def _forget(self, st: _Stream) -> None:
        """Nothing more is sent or delivered on ``st``: no pending output, no messages left
        for a later turn, no end of stream to act on (the caller has removed it from
        the open streams)."""
        self._blocked.pop(st.id, None)
        st.pending.clear()
        st.backlog = None
        st.end_after_backlog = False
        st.closed_local = True

    def _close_handler(self, st: _Stream) -> None:
        handler, st.handler = st.handler, None
        if handler is not None:
            try:
                handler.close()
            except Exception:
                log.exception("closing ext_proc stream %d failed", st.id)

    def sweep(self, now: float, limits: H2Limits) -> None:
        """The listener's periodic look at this connection: the plaintext preface timeout,
        and the idle close (a first GOAWAY naming the largest stream id, then, once
        :data:`FINAL_GOAWAY_SECONDS` have passed with no stream open, the real one)."""
        if self._closed:
            return
        if not self._preface_seen:
            if now - self._opened >= limits.handshake_timeout:
                self._close_for("handshake_timeout", "no HTTP/2 preface in time")
            return
        if self._streams:
            self._idle_since = None
            return
        if self._close_at is not None:
            if now >= self._close_at:
                self._close_for("idle", "")
            return
        if limits.idle_timeout is None:
            return
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= limits.idle_timeout and not self._going_away:
            self._out.append(
                _frame(GOAWAY, 0, 0, MAX_WINDOW.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big"))
            )
            self._close_at = now + FINAL_GOAWAY_SECONDS
            self._flush()

    def _close_for(self, reason: str, why: str) -> None:
        """GOAWAY (NO_ERROR, the last stream id taken) and close, counted by ``reason``."""
        M.EXTPROC_CONNECTIONS_CLOSED.labels(reason).inc()
        if why:
            log.info("closing connection from %s: %s", self.peer, why)
        self._out.append(self._goaway(NO_ERROR))
        out, self._out = self._out, []
        self._closed = True
        self._drop_streams()
        if self._transport is not None:
            self._transport.write(b"".join(out))
            self._linger(self._transport)  # so that a peer still sending reads the GOAWAY

    @property
    def open_streams(self) -> int:
        return len(self._streams)


class _TlsProtocol(sslproto.SSLProtocol):
    """asyncio's TLS layer with a read buffer of :data:`TLS_READ_BUFFER` bytes (larger only
    while a large body arrives).

    asyncio gives every TLS connection a 256 KiB read buffer for as long as it is open;
    the listener makes its TLS connections itself (the same class asyncio uses, through its
    constructor) so that an idle one costs a small fraction of that. Reads stay one TLS
    record at a time, which is what OpenSSL decrypts in one step anyway."""

    max_size = TLS_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        # A read that filled the buffer means more is waiting: read in large steps while a
        # large body arrives (fewer callbacks per megabyte), and go back to the small
        # buffer at the first read that the small one would have held.
        if nbytes >= len(self._ssl_buffer):
            self.max_size = TLS_BULK_READ_BUFFER  # the next get_buffer() grows it
        elif nbytes < TLS_READ_BUFFER and len(self._ssl_buffer) > TLS_READ_BUFFER:
            self.max_size = TLS_READ_BUFFER
            self._ssl_buffer = bytearray(TLS_READ_BUFFER)
            self._ssl_buffer_view = memoryview(self._ssl_buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._app_protocol
        super().connection_lost(exc)
        # A connection that never finished its handshake never reached the H2Connection,
        # whose own close runs ``after_close``: its buffers are freed here, so trim here.
        if isinstance(conn, H2Connection) and conn._transport is None:
            after_close = conn._server.after_close
            if after_close is not None:
                after_close()

    def _check_handshake_timeout(self) -> None:
        if getattr(self, "_state", None) == sslproto.SSLProtocolState.DO_HANDSHAKE:
            M.EXTPROC_CONNECTIONS_CLOSED.labels("handshake_timeout").inc()
        super()._check_handshake_timeout()  # type: ignore[misc]


class H2Server:
    """Listens on one port and serves ``handlers`` (gRPC path → factory) over HTTP/2,
    TLS with ALPN ``h2`` when ``ssl_context`` is given, cleartext (prior knowledge)
    otherwise; ``limits`` bounds what clients may do (see the module docstring), and
    ``after_close`` runs whenever a connection closes."""

    def __init__(
        self,
        handlers: dict[str, HandlerFactory],
        *,
        max_message: int,
        ssl_context: ssl.SSLContext | None = None,
        max_send: int | None = None,
        limits: H2Limits | None = None,
        after_close: Callable[[], None] | None = None,
    ) -> None:
        self._handlers = {k.encode(): v for k, v in handlers.items()}
        self.limits = limits if limits is not None else H2Limits()
        self._max_message = max_message
        self.max_send = max_send  # None: no limit on the messages handlers send
        self._ssl = ssl_context
        self.after_close = after_close
        self._server: asyncio.Server | None = None
        self._connections: set[H2Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._refused_logged = 0.0
        self.port = 0

    def _protocol(self) -> asyncio.BaseProtocol:
        conn = H2Connection(self._handlers, self._max_message, self)
        if self._ssl is None:
            return conn
        return _TlsProtocol(
            asyncio.get_running_loop(),
            conn,
            self._ssl,
            None,
            server_side=True,
            ssl_handshake_timeout=self.limits.handshake_timeout,
        )

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            host=None if host in ("", "0.0.0.0", "::") else host,
            port=port,
            reuse_address=True,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.ensure_future(self._sweep())
        return self.port

    def note_refused(self, peer: str) -> None:
        """Logs a connection refused for ``max_connections``, at most once a second."""
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:
            self._refused_logged = now
            log.warning(
                "refusing a connection from %s: %d connections open (--max-connections)",
                peer,
                len(self._connections),
            )

    async def _sweep(self) -> None:
        """Closes plaintext connections that never sent the preface, and idle ones."""
        limits = self.limits
        while True:
            await asyncio.sleep(IDLE_SWEEP_SECONDS)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.sweep(now, limits)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new streams (GOAWAY), give open ones ``grace`` seconds, then close."""
        if self._server is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._server.close()
        for conn in list(self._connections):
            conn.go_away()
        deadline = asyncio.get_running_loop().time() + (grace or 0.0)
        while any(c.open_streams for c in self._connections):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        await asyncio.sleep(0)
        self._server = None
