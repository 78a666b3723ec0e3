"""The ext_proc wire format: the few protobuf messages the EPP exchanges with the gateway.

The EPP speaks ``envoy.service.ext_proc.v3.ExternalProcessor/Process``: a bidirectional
stream of ``ProcessingRequest`` (gateway → EPP) and ``ProcessingResponse`` (EPP → gateway).
Every response-body chunk of every streamed completion crosses this stream twice, so the
per-message cost decides how many token streams one EPP can relay. Generic protobuf
libraries build a full object tree per message; this module instead reads only the fields
the EPP uses and writes responses as byte strings, directly in the protobuf encoding.

The field numbers are those of Envoy's v3 API (``envoy/service/ext_proc/v3/
external_processor.proto``, ``envoy/config/core/v3/base.proto``, ``google/protobuf/
struct.proto``). ``envoy-data-plane``'s generated messages are the reference the tests
compare both directions against.

Guarantees:

* :func:`decode_request` accepts any valid ``ProcessingRequest`` encoding (unknown fields
  and repeated or out-of-order fields are handled as protobuf requires: the last value of a
  scalar wins, messages merge, repeated fields accumulate), and raises :class:`WireError`
  for anything that is not valid protobuf;
* every ``encode_*`` function returns the exact bytes of one ``ProcessingResponse``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# ProcessingRequest oneof "request" field numbers (also the kind of a decoded request).
REQUEST_HEADERS = 2
RESPONSE_HEADERS = 3
REQUEST_BODY = 4
RESPONSE_BODY = 5
REQUEST_TRAILERS = 6
RESPONSE_TRAILERS = 7
_METADATA_CONTEXT = 8
_ATTRIBUTES = 9
_OBSERVABILITY_MODE = 10
_PROTOCOL_CONFIG = 11

KIND_NAMES = {
    REQUEST_HEADERS: "request_headers",
    RESPONSE_HEADERS: "response_headers",
    REQUEST_BODY: "request_body",
    RESPONSE_BODY: "response_body",
    REQUEST_TRAILERS: "request_trailers",
    RESPONSE_TRAILERS: "response_trailers",
}

# ProcessingResponse oneof "response" field numbers.
_R_REQUEST_HEADERS = 1
_R_RESPONSE_HEADERS = 2
_R_REQUEST_BODY = 3
_R_RESPONSE_BODY = 4
_R_REQUEST_TRAILERS = 5
_R_RESPONSE_TRAILERS = 6
_R_IMMEDIATE = 7
_R_DYNAMIC_METADATA = 8

# ProcessingMode.BodySendMode
BODY_NONE = 0
BODY_STREAMED = 1
BODY_BUFFERED = 2
BODY_BUFFERED_PARTIAL = 3
BODY_FULL_DUPLEX_STREAMED = 4

# HeaderValueOption.HeaderAppendAction: replace a header the client may also have sent.
OVERWRITE_IF_EXISTS_OR_ADD = 2

_WT_VARINT = 0
_WT_I64 = 1
_WT_LEN = 2
_WT_I32 = 5


class WireError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


@dataclass(slots=True)
class ProtocolConfig:
    """How the gateway is configured to send bodies (sent on a stream's first message)."""

    request_body_mode: int = BODY_NONE
    response_body_mode: int = BODY_NONE
    send_body_without_waiting_for_header_response: bool = False


@dataclass(slots=True)
class ExtProcRequest:
    """One decoded ``ProcessingRequest``.

    ``kind`` is one of :data:`REQUEST_HEADERS` … :data:`RESPONSE_TRAILERS` (0 when the
    message had none). ``headers`` holds ``(name, value)`` pairs for header and trailer
    messages (values from ``raw_value`` when set, else ``value``, decoded as UTF-8 with
    replacement). ``metadata`` is ``filter_metadata`` as plain Python values;
    ``attributes`` likewise.
    """

    kind: int = 0
    headers: list[tuple[str, str]] | None = None
    body: bytes = b""
    end_of_stream: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    observability_mode: bool = False
    protocol_config: ProtocolConfig | None = None


# ------------------------------------------------------------------ reading


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def iter_fields(buf: bytes | memoryview) -> Iterable[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)``: an int for varint/fixed fields, a
    memoryview slice for length-delimited ones."""
    pos = 0
    end = len(buf)
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    while pos < end:
        key, pos = _varint(view, pos)
        number = key >> 3
        wt = key & 7
        if number == 0:
            raise WireError("field number 0")
        if wt == _WT_LEN:
            length, pos = _varint(view, pos)
            stop = pos + length
            if stop > end:
                raise WireError("length-delimited field runs past the end")
            yield number, wt, view[pos:stop]
            pos = stop
        elif wt == _WT_VARINT:
            if pos >= end:
                raise WireError("truncated varint")
            value, pos = _varint(view, pos)
            yield number, wt, value
        elif wt == _WT_I64:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            yield number, wt, bytes(view[pos : pos + 8])
            pos += 8
        elif wt == _WT_I32:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            yield number, wt, bytes(view[pos : pos + 4])
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wt}")


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", "replace")


def _header_map(buf: memoryview, out: list[tuple[str, str]]) -> None:
    for number, wt, value in iter_fields(buf):
        if number == 1 and wt == _WT_LEN:  # HeaderMap.headers: HeaderValue
            key = ""
            text = ""
            raw: memoryview | None = None
            for n, w, v in iter_fields(value):
                if w != _WT_LEN:
                    continue
                if n == 1:
                    key = _text(v)
                elif n == 2:
                    text = _text(v)
                elif n == 3:
                    raw = v
            out.append((key, _text(raw) if raw is not None and len(raw) else text))


def _value(buf: memoryview) -> Any:
    """A ``google.protobuf.Value`` as a Python value (None, float, str, bool, dict, list)."""
    result: Any = None
    for number, wt, value in iter_fields(buf):
        if number == 1:
            result = None
        elif number == 2 and wt == _WT_I64:
            result = struct.unpack("<d", value)[0]
        elif number == 3 and wt == _WT_LEN:
            result = _text(value)
        elif number == 4 and wt == _WT_VARINT:
            result = bool(value)
        elif number == 5 and wt == _WT_LEN:
            result = _struct(value)
        elif number == 6 and wt == _WT_LEN:
            result = [_value(v) for n, w, v in iter_fields(value) if n == 1 and w == _WT_LEN]
    return result


def _map_entry(buf: memoryview) -> tuple[str, memoryview | None]:
    key = ""
    val: memoryview | None = None
    for number, wt, value in iter_fields(buf):
        if wt != _WT_LEN:
            continue
        if number == 1:
            key = _text(value)
        elif number == 2:
            val = value
    return key, val


def _struct(buf: memoryview) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, wt, value in iter_fields(buf):
        if number == 1 and wt == _WT_LEN:  # map<string, Value> entry
            key, val = _map_entry(value)
            out[key] = None if val is None else _value(val)
    return out


def _struct_map(buf: memoryview, out: dict[str, Any]) -> None:
    """One entry of a ``map<string, Struct>`` field, merged into ``out``."""
    key, val = _map_entry(buf)
    decoded = {} if val is None else _struct(val)
    previous = out.get(key)
    if isinstance(previous, dict):
        previous.update(decoded)
    else:
        out[key] = decoded


def _body(buf: memoryview, req: ExtProcRequest) -> None:
    for number, wt, value in iter_fields(buf):
        if number == 1 and wt == _WT_LEN:
            req.body = bytes(value)
        elif number == 2 and wt == _WT_VARINT:
            req.end_of_stream = bool(value)


def _headers(buf: memoryview, req: ExtProcRequest) -> None:
    if req.headers is None:
        req.headers = []
    for number, wt, value in iter_fields(buf):
        if number == 1 and wt == _WT_LEN:
            _header_map(value, req.headers)
        elif number == 2 and wt == _WT_LEN:
            _struct_map(value, req.attributes)
        elif number == 3 and wt == _WT_VARINT:
            req.end_of_stream = bool(value)


def _trailers(buf: memoryview, req: ExtProcRequest) -> None:
    if req.headers is None:
        req.headers = []
    for number, wt, value in iter_fields(buf):
        if number == 1 and wt == _WT_LEN:
            _header_map(value, req.headers)


def _protocol_config(buf: memoryview) -> ProtocolConfig:
    cfg = ProtocolConfig()
    for number, wt, value in iter_fields(buf):
        if wt != _WT_VARINT:
            continue
        if number == 1:
            cfg.request_body_mode = value
        elif number == 2:
            cfg.response_body_mode = value
        elif number == 3:
            cfg.send_body_without_waiting_for_header_response = bool(value)
    return cfg


def decode_request(data: bytes) -> ExtProcRequest:
    """Decode one ``ProcessingRequest``; raises :class:`WireError` on invalid protobuf."""
    req = ExtProcRequest()
    try:
        for number, wt, value in iter_fields(data):
            if wt == _WT_LEN:
                if number in (REQUEST_BODY, RESPONSE_BODY):
                    req.kind = number
                    _body(value, req)
                elif number in (REQUEST_HEADERS, RESPONSE_HEADERS):
                    req.kind = number
                    _headers(value, req)
                elif number in (REQUEST_TRAILERS, RESPONSE_TRAILERS):
                    req.kind = number
                    _trailers(value, req)
                elif number == _METADATA_CONTEXT:
                    for n, w, v in iter_fields(value):
                        if n == 1 and w == _WT_LEN:  # filter_metadata
                            _struct_map(v, req.metadata)
                elif number == _ATTRIBUTES:
                    _struct_map(value, req.attributes)
                elif number == _PROTOCOL_CONFIG:
                    req.protocol_config = _protocol_config(value)
            elif number == _OBSERVABILITY_MODE and wt == _WT_VARINT:
                req.observability_mode = bool(value)
    except IndexError:
        raise WireError("truncated message") from None
    return req


# ------------------------------------------------------------------ writing

_SMALL_VARINTS = [bytes([i]) for i in range(128)]


def _enc_varint(value: int) -> bytes:
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _enc_varint(number << 3 | _WT_LEN) + _enc_varint(len(payload)) + payload


def _bool_field(number: int, value: bool) -> bytes:
    return _enc_varint(number << 3 | _WT_VARINT) + b"\x01" if value else b""


def _varint_field(number: int, value: int) -> bytes:
    return _enc_varint(number << 3 | _WT_VARINT) + _enc_varint(value) if value else b""


def _enc_str(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _enc_value(value: Any) -> bytes:
    if value is None:
        return b"\x08\x00"  # null_value, explicit because it is a oneof member
    if isinstance(value, bool):
        return b"\x20" + (b"\x01" if value else b"\x00")
    if isinstance(value, int | float):
        return b"\x11" + struct.pack("<d", float(value))
    if isinstance(value, str):
        return _len_field(3, value.encode("utf-8"))
    if isinstance(value, Mapping):
        return _len_field(5, _enc_struct(value))
    if isinstance(value, Sequence):
        return _len_field(6, b"".join(_len_field(1, _enc_value(v)) for v in value))
    raise TypeError(f"cannot encode {type(value).__name__} as google.protobuf.Value")


def _enc_struct(fields: Mapping[str, Any]) -> bytes:
    return b"".join(
        _len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, _enc_value(val)))
        for key, val in fields.items()
    )


def encode_struct(fields: Mapping[str, Any]) -> bytes:
    """A ``google.protobuf.Struct`` with ``fields`` (nested mappings become Structs)."""
    return _enc_struct(fields)


def _header_option(name: str, value: str | bytes) -> bytes:
    header = _len_field(1, name.encode("utf-8")) + _len_field(3, _enc_str(value))
    return _len_field(1, header) + _varint_field(3, OVERWRITE_IF_EXISTS_OR_ADD)


def _header_mutation(
    set_headers: Sequence[tuple[str, str | bytes]], remove_headers: Sequence[str]
) -> bytes:
    return b"".join(_len_field(1, _header_option(k, v)) for k, v in set_headers) + b"".join(
        _len_field(2, name.encode("utf-8")) for name in remove_headers
    )


def _common(
    set_headers: Sequence[tuple[str, str | bytes]] = (),
    remove_headers: Sequence[str] = (),
    clear_route_cache: bool = False,
    body: bytes | None = None,
) -> bytes:
    out = b""
    if set_headers or remove_headers:
        out += _len_field(2, _header_mutation(set_headers, remove_headers))
    if body is not None:
        out += _len_field(3, _len_field(1, body))  # BodyMutation.body (buffered mode)
    return out + _bool_field(5, clear_route_cache)


def _metadata(dynamic_metadata: Mapping[str, Any] | None) -> bytes:
    return (
        _len_field(_R_DYNAMIC_METADATA, _enc_struct(dynamic_metadata)) if dynamic_metadata else b""
    )


def encode_headers_response(
    *,
    request: bool = True,
    set_headers: Sequence[tuple[str, str | bytes]] = (),
    remove_headers: Sequence[str] = (),
    clear_route_cache: bool = False,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """A ``HeadersResponse`` to request (or response) headers. Every set header overwrites
    a header of the same name, so a value the client sent never survives next to ours."""
    common = _common(set_headers, remove_headers, clear_route_cache)
    number = _R_REQUEST_HEADERS if request else _R_RESPONSE_HEADERS
    return _len_field(number, _len_field(1, common)) + _metadata(dynamic_metadata)


def encode_streamed_body(
    body: bytes | memoryview,
    end_of_stream: bool,
    *,
    request: bool = True,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """A ``BodyResponse`` carrying one chunk as ``body_mutation.streamed_response`` (the
    FULL_DUPLEX_STREAMED way of passing a body on)."""
    streamed = _len_field(1, bytes(body)) + _bool_field(2, end_of_stream)
    common = _len_field(3, _len_field(3, streamed))  # CommonResponse.body_mutation
    number = _R_REQUEST_BODY if request else _R_RESPONSE_BODY
    return _len_field(number, _len_field(1, common)) + _metadata(dynamic_metadata)


def encode_buffered_body_response(
    *,
    request: bool = True,
    set_headers: Sequence[tuple[str, str | bytes]] = (),
    remove_headers: Sequence[str] = (),
    clear_route_cache: bool = False,
    body: bytes | None = None,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """A ``BodyResponse`` for BUFFERED mode: header mutations (the headers are still held
    by the gateway), and the whole new body when ``body`` is given."""
    common = _common(set_headers, remove_headers, clear_route_cache, body)
    number = _R_REQUEST_BODY if request else _R_RESPONSE_BODY
    return _len_field(number, _len_field(1, common)) + _metadata(dynamic_metadata)


def encode_trailers_response(*, request: bool = True) -> bytes:
    """An empty ``TrailersResponse``."""
    return _len_field(_R_REQUEST_TRAILERS if request else _R_RESPONSE_TRAILERS, b"")


def encode_immediate_response(
    status: int,
    body: bytes,
    *,
    headers: Sequence[tuple[str, str | bytes]] = (),
    details: str = "",
) -> bytes:
    """An ``ImmediateResponse``: the gateway answers the client with ``status`` and
    ``body`` and does not contact any upstream."""
    payload = _len_field(1, _varint_field(1, status))  # HttpStatus.code
    if headers:
        payload += _len_field(2, _header_mutation(headers, ()))
    payload += _len_field(3, body) if body else b""
    payload += _len_field(5, details.encode("utf-8")) if details else b""
    return _len_field(_R_IMMEDIATE, payload)
