"""The hand-written ext_proc codec against envoy-data-plane's generated messages."""

from __future__ import annotations

import contextlib

import envoy_data_plane.envoy.config.core.v3 as core
import envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 as mode
import envoy_data_plane.envoy.service.ext_proc.v3 as ep
import envoy_data_plane.google.protobuf as pb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.extproc import wire

names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)
values = st.text(max_size=40)
header_lists = st.lists(st.tuples(names, values), max_size=8)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
structs = st.dictionaries(st.text(max_size=10), json_values, max_size=4)


def to_value(v: object) -> pb.Value:
    if v is None:
        return pb.Value(null_value=pb.NullValue.NULL_VALUE)
    if isinstance(v, bool):
        return pb.Value(bool_value=v)
    if isinstance(v, float | int):
        return pb.Value(number_value=float(v))
    if isinstance(v, str):
        return pb.Value(string_value=v)
    if isinstance(v, list):
        return pb.Value(list_value=pb.ListValue(values=[to_value(x) for x in v]))
    assert isinstance(v, dict)
    return pb.Value(struct_value=to_struct(v))


def to_struct(d: dict) -> pb.Struct:
    return pb.Struct(fields={k: to_value(v) for k, v in d.items()})


def header_map(pairs: list[tuple[str, str]], raw: bool) -> core.HeaderMap:
    if raw:
        items = [core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    else:
        items = [core.HeaderValue(key=k, value=v) for k, v in pairs]
    return core.HeaderMap(headers=items)


@settings(max_examples=150, deadline=None)
@given(
    pairs=header_lists,
    raw=st.booleans(),
    eos=st.booleans(),
    meta=st.dictionaries(st.text(max_size=12), structs, max_size=3),
    response=st.booleans(),
)
def test_headers_decode_like_the_reference(pairs, raw, eos, meta, response):
    hh = ep.HttpHeaders(headers=header_map(pairs, raw), end_of_stream=eos)
    msg = (
        ep.ProcessingRequest(response_headers=hh)
        if response
        else ep.ProcessingRequest(request_headers=hh)
    )
    if meta:
        msg.metadata_context = core.Metadata(
            filter_metadata={k: to_struct(v) for k, v in meta.items()}
        )
    got = wire.decode_request(bytes(msg))
    assert got.kind == (wire.RESPONSE_HEADERS if response else wire.REQUEST_HEADERS)
    assert got.headers == pairs
    assert got.end_of_stream is eos
    assert got.metadata == meta


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=3000), eos=st.booleans(), response=st.booleans())
def test_bodies_decode_like_the_reference(body, eos, response):
    hb = ep.HttpBody(body=body, end_of_stream=eos)
    msg = (
        ep.ProcessingRequest(response_body=hb)
        if response
        else ep.ProcessingRequest(request_body=hb)
    )
    got = wire.decode_request(bytes(msg))
    assert got.kind == (wire.RESPONSE_BODY if response else wire.REQUEST_BODY)
    assert got.body == body
    assert got.end_of_stream is eos


def test_trailers_protocol_config_attributes_and_observability():
    msg = ep.ProcessingRequest(
        request_trailers=ep.HttpTrailers(trailers=header_map([("grpc-status", "0")], True)),
        protocol_config=ep.ProtocolConfiguration(
            request_body_mode=mode.ProcessingModeBodySendMode.BUFFERED,
            response_body_mode=mode.ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED,
            send_body_without_waiting_for_header_response=True,
        ),
        attributes={"envoy.filters.http.ext_proc": to_struct({"upstream.address": "1.2.3.4:80"})},
        observability_mode=True,
    )
    got = wire.decode_request(bytes(msg))
    assert got.kind == wire.REQUEST_TRAILERS
    assert got.headers == [("grpc-status", "0")]
    assert got.protocol_config == wire.ProtocolConfig(
        wire.BODY_BUFFERED, wire.BODY_FULL_DUPLEX_STREAMED, True
    )
    assert got.attributes == {"envoy.filters.http.ext_proc": {"upstream.address": "1.2.3.4:80"}}
    assert got.observability_mode is True


def test_unknown_fields_are_skipped():
    known = bytes(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"abc", end_of_stream=True)))
    # field 99 varint, field 98 fixed64, field 97 fixed32, field 96 bytes
    extra = b"\x98\x06\x05" + b"\x91\x06" + b"\x00" * 8 + b"\x8d\x06" + b"\x00" * 4
    extra += b"\x82\x06\x02hi"
    got = wire.decode_request(extra + known)
    assert got.body == b"abc" and got.end_of_stream


@pytest.mark.parametrize(
    "data",
    [
        b"\x22",
        b"\x22\x05ab",
        b"\x22\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        b"\x07",
        b"\x00\x01",
    ],
)
def test_garbage_raises_wire_error(data):
    with pytest.raises(wire.WireError):
        wire.decode_request(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_wire_error(data):
    with contextlib.suppress(wire.WireError):
        wire.decode_request(data)


@settings(max_examples=100, deadline=None)
@given(
    sets=st.lists(st.tuples(names, values), max_size=5),
    removes=st.lists(names, max_size=3),
    clear=st.booleans(),
    meta=st.dictionaries(st.text(max_size=12), structs, max_size=2),
    request=st.booleans(),
)
def test_headers_response_parses_in_the_reference(sets, removes, clear, meta, request):
    data = wire.encode_headers_response(
        request=request,
        set_headers=sets,
        remove_headers=removes,
        clear_route_cache=clear,
        dynamic_metadata=meta,
    )
    msg = ep.ProcessingResponse.parse(data)
    hr = msg.request_headers if request else msg.response_headers
    assert hr is not None
    common = hr.response
    assert common is not None
    got_sets = [] if common.header_mutation is None else common.header_mutation.set_headers
    assert [(o.header.key, o.header.raw_value.decode()) for o in got_sets] == sets
    assert all(
        o.append_action == core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
        for o in got_sets
    )
    got_removes = [] if common.header_mutation is None else common.header_mutation.remove_headers
    assert got_removes == removes
    assert common.clear_route_cache is clear
    if meta:
        assert msg.dynamic_metadata == to_struct(meta)
    else:
        assert msg.dynamic_metadata is None


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=5000), eos=st.booleans(), request=st.booleans())
def test_streamed_body_parses_in_the_reference(body, eos, request):
    msg = ep.ProcessingResponse.parse(wire.encode_streamed_body(body, eos, request=request))
    br = msg.request_body if request else msg.response_body
    assert br is not None and br.response is not None
    streamed = br.response.body_mutation.streamed_response
    assert streamed.body == body
    assert streamed.end_of_stream is eos


def test_buffered_body_response_and_trailers_and_immediate():
    msg = ep.ProcessingResponse.parse(
        wire.encode_buffered_body_response(
            set_headers=[("a", "b")],
            clear_route_cache=True,
            body=b"new",
            dynamic_metadata={"n": {"k": "v"}},
        )
    )
    common = msg.request_body.response
    assert common.body_mutation.body == b"new"
    assert common.header_mutation.set_headers[0].header.key == "a"
    assert common.clear_route_cache is True
    assert msg.dynamic_metadata == to_struct({"n": {"k": "v"}})

    empty = ep.ProcessingResponse.parse(wire.encode_buffered_body_response(request=False))
    assert empty.response_body is not None and empty.response_body.response is not None

    assert ep.ProcessingResponse.parse(wire.encode_trailers_response()).request_trailers is not None
    resp_tr = ep.ProcessingResponse.parse(wire.encode_trailers_response(request=False))
    assert resp_tr.response_trailers is not None

    imm = ep.ProcessingResponse.parse(
        wire.encode_immediate_response(
            429, b'{"x":1}', headers=[("retry-after", "1")], details="kvpick_ResourceExhausted"
        )
    ).immediate_response
    assert int(imm.status.code) == 429
    assert imm.body == b'{"x":1}'
    assert imm.headers.set_headers[0].header.key == "retry-after"
    assert imm.details == "kvpick_ResourceExhausted"


@settings(max_examples=100, deadline=None)
@given(structs)
def test_struct_round_trip(d):
    parsed = pb.Struct.parse(wire.encode_struct(d))
    assert parsed == to_struct(d)
