"""Message order and body handling of one ext_proc stream (specs/epp-protocol.md §3)."""

from __future__ import annotations

import asyncio
import json

import envoy_data_plane.envoy.config.core.v3 as core
import envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 as pm
import envoy_data_plane.envoy.service.ext_proc.v3 as ep
import envoy_data_plane.google.protobuf as pb
import pytest

from epp import headers as H
from epp.extproc.stream import (
    BODY_CHUNK,
    LARGE_BODY,
    ExtProcStream,
    RequestInfo,
    Routed,
    RoutingError,
    StreamLimits,
)
from epp.response_usage import Usage

FD = pm.ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED
BUFFERED = pm.ProcessingModeBodySendMode.BUFFERED


class RecordingRouter:
    """A router that records the calls the stream makes and answers as told."""

    def __init__(self, *, body: bytes | None = None, error: Exception | None = None) -> None:
        self.body = body
        self.error = error
        self.infos: list[RequestInfo] = []
        self.calls: list[tuple] = []

    def route(self, info: RequestInfo) -> Routed:
        self.infos.append(info)
        if self.error is not None:
            raise self.error
        return Routed(
            destination="10.0.0.1:8000",
            set_headers=[(H.WORKER_INSTANCE_ID, "7")],
            body=self.body,
            metadata={"extra": "x"},
            state="S",
        )

    def response_headers(self, routed, status, served, streaming):
        self.calls.append(("response_headers", status, served, streaming))
        return [("x-added", "1")]

    def first_byte(self, routed):
        self.calls.append(("first_byte",))

    def finished(self, routed, outcome, usage=None):
        self.calls.append(("finished", outcome))
        self.usage = usage


def hdrs(pairs, eos=False, response=False, config=None, metadata=None) -> bytes:
    hm = core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    hh = ep.HttpHeaders(headers=hm, end_of_stream=eos)
    msg = (
        ep.ProcessingRequest(response_headers=hh)
        if response
        else ep.ProcessingRequest(request_headers=hh)
    )
    if config is not None:
        msg.protocol_config = ep.ProtocolConfiguration(
            request_body_mode=config[0], response_body_mode=config[1]
        )
    if metadata is not None:
        msg.metadata_context = core.Metadata(
            filter_metadata={
                ns: pb.Struct(fields={k: pb.Value(string_value=v) for k, v in d.items()})
                for ns, d in metadata.items()
            }
        )
    return bytes(msg)


def body(data: bytes, eos: bool, response: bool = False) -> bytes:
    hb = ep.HttpBody(body=data, end_of_stream=eos)
    return bytes(
        ep.ProcessingRequest(response_body=hb)
        if response
        else ep.ProcessingRequest(request_body=hb)
    )


def parse(out) -> list[ep.ProcessingResponse]:
    return [ep.ProcessingResponse.parse(o) for o in out]


POST = [(":method", "POST"), (":path", "/v1/chat/completions"), ("x-request-id", "r1")]


def set_headers(resp: ep.ProcessingResponse) -> dict[str, str]:
    hr = resp.request_headers or resp.request_body
    mut = hr.response.header_mutation
    return {o.header.key: o.header.raw_value.decode() for o in mut.set_headers}


def test_full_duplex_waits_for_the_whole_body_then_headers_then_chunks():
    router = RecordingRouter()
    s = ExtProcStream(router)
    assert s.handle(hdrs(POST)) == ()
    payload = b"a" * (BODY_CHUNK * 2 + 10)
    assert s.handle(body(payload[:100_000], False)) == ()
    out = parse(s.handle(body(payload[100_000:], True)))
    assert router.infos[0].body == payload
    assert router.infos[0].request_id == "r1"
    first, *chunks = out
    assert first.request_headers is not None
    assert first.request_headers.response.clear_route_cache is True
    got = set_headers(first)
    assert got[H.DESTINATION] == "10.0.0.1:8000"
    assert got["content-length"] == str(len(payload))
    assert got[H.WORKER_INSTANCE_ID] == "7"
    lb = first.dynamic_metadata.fields[H.LB_NAMESPACE].struct_value.fields
    assert lb[H.DESTINATION].string_value == "10.0.0.1:8000"
    assert lb["extra"].string_value == "x"
    assert len(chunks) == 3
    streamed = [c.request_body.response.body_mutation.streamed_response for c in chunks]
    assert b"".join(x.body for x in streamed) == payload
    assert all(len(x.body) <= BODY_CHUNK for x in streamed)
    assert [x.end_of_stream for x in streamed] == [False, False, True]


def test_rewritten_body_sets_its_own_content_length():
    router = RecordingRouter(body=b'{"new": true}')
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    out = parse(s.handle(body(b"{}", True)))
    assert set_headers(out[0])["content-length"] == "13"
    assert out[1].request_body.response.body_mutation.streamed_response.body == b'{"new": true}'


def test_repeated_end_of_stream_is_ignored():
    s = ExtProcStream(RecordingRouter())
    s.handle(hdrs(POST))
    assert len(s.handle(body(b"{}", True))) == 2
    assert s.handle(body(b"more", True)) == ()


def test_bodyless_request_is_routed_on_headers():
    router = RecordingRouter()
    s = ExtProcStream(router)
    out = parse(s.handle(hdrs([(":method", "GET"), (":path", "/v1/models")], eos=True)))
    assert len(out) == 1
    assert router.infos[0].body is None
    got = set_headers(out[0])
    assert got[H.DESTINATION] == "10.0.0.1:8000"
    assert "content-length" not in got
    assert H.REQUEST_ID in got  # none was sent, so one was made


def test_buffered_mode_answers_headers_at_once_and_mutates_on_the_body():
    router = RecordingRouter(body=b"XYZ")
    s = ExtProcStream(router)
    out = parse(s.handle(hdrs(POST, config=(BUFFERED, BUFFERED))))
    assert len(out) == 1 and out[0].request_headers is not None
    assert out[0].request_headers.response.header_mutation is None
    out = parse(s.handle(body(b"{}", True)))
    assert len(out) == 1
    common = out[0].request_body.response
    assert common.body_mutation.body == b"XYZ"
    assert common.clear_route_cache is True
    assert set_headers(out[0])[H.DESTINATION] == "10.0.0.1:8000"
    # response bodies are acknowledged, not echoed, in buffered mode
    s.handle(hdrs([(":status", "200")], response=True))
    out = parse(s.handle(body(b"resp", True, response=True)))
    assert out[0].response_body.response.body_mutation is None


def test_streamed_mode_is_refused_with_a_reason():
    s = ExtProcStream(RecordingRouter())
    streamed = pm.ProcessingModeBodySendMode.STREAMED
    out = parse(s.handle(hdrs(POST, config=(streamed, FD))))
    imm = out[0].immediate_response
    assert int(imm.status.code) == 500
    assert b"FULL_DUPLEX_STREAMED" in imm.body


def test_trailers_end_the_body():
    router = RecordingRouter()
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", False))
    trailers = ep.ProcessingRequest(request_trailers=ep.HttpTrailers(trailers=core.HeaderMap()))
    out = parse(s.handle(bytes(trailers)))
    assert out[0].request_headers is not None
    assert out[1].request_body.response.body_mutation.streamed_response.end_of_stream is False
    assert out[2].request_trailers is not None


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RoutingError(400, "bad json"), 400),
        (RoutingError(429, "shed"), 429),
        (RoutingError(503, "no endpoint"), 503),
        (RuntimeError("boom"), 500),
    ],
)
def test_errors_become_immediate_responses(error, status):
    router = RecordingRouter(error=error)
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    out = parse(s.handle(body(b"{}", True)))
    imm = out[0].immediate_response
    assert int(imm.status.code) == status
    doc = json.loads(imm.body)
    assert doc["error"]["code"] == status
    keys = {o.header.key: o.header.raw_value for o in imm.headers.set_headers}
    assert keys["content-type"] == b"application/json"
    assert ("retry-after" in keys) == (status == 429)
    # nothing more happens on this stream
    assert s.handle(body(b"x", True, response=True)) == ()
    s.close()
    assert router.calls == []


def test_client_steering_headers_are_removed_or_overwritten():
    router = RecordingRouter()
    s = ExtProcStream(router)
    sent = [
        *POST,
        (H.DESTINATION, "6.6.6.6:1"),
        (H.DESTINATION_SUBSET, "6.6.6.6:1"),
        (H.PREFILLER_HOST_PORT, "6.6.6.6:2"),
        (H.DP_RANK, "3"),
        (H.WORKER_INSTANCE_ID, "99"),
    ]
    s.handle(hdrs(sent))
    out = parse(s.handle(body(b"{}", True)))
    mut = out[0].request_headers.response.header_mutation
    removed = set(mut.remove_headers)
    got = set_headers(out[0])
    assert got[H.DESTINATION] == "10.0.0.1:8000"  # overwritten (OVERWRITE_IF_EXISTS_OR_ADD)
    assert got[H.WORKER_INSTANCE_ID] == "7"
    assert {H.DESTINATION_SUBSET, H.PREFILLER_HOST_PORT, H.DP_RANK} <= removed
    assert H.DESTINATION not in removed


def test_response_phase_echo_hooks_and_single_completion():
    router = RecordingRouter()
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    served = {H.LB_NAMESPACE: {H.DESTINATION_SERVED: "10.0.0.2:8000"}}
    out = parse(
        s.handle(
            hdrs(
                [(":status", "200"), ("content-type", "text/event-stream")],
                response=True,
                metadata=served,
            )
        )
    )
    added = {o.header.key for o in out[0].response_headers.response.header_mutation.set_headers}
    assert added == {"x-added"}
    chunks = [b"data: 1\n\n", b"data: 2\n\n", b""]
    echoed = []
    for i, c in enumerate(chunks):
        (o,) = parse(s.handle(body(c, i == len(chunks) - 1, response=True)))
        sr = o.response_body.response.body_mutation.streamed_response
        echoed.append((sr.body, sr.end_of_stream))
    assert echoed == [(chunks[0], False), (chunks[1], False), (b"", True)]
    s.close()
    assert router.calls == [
        ("response_headers", 200, "10.0.0.2:8000", True),
        ("first_byte",),
        ("finished", "complete"),
    ]


def test_large_response_chunk_is_split():
    s = ExtProcStream(RecordingRouter())
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    s.handle(hdrs([(":status", "200")], response=True))
    big = b"z" * (BODY_CHUNK + 1)
    out = parse(s.handle(body(big, True, response=True)))
    parts = [o.response_body.response.body_mutation.streamed_response for o in out]
    assert [len(p.body) for p in parts] == [BODY_CHUNK, 1]
    assert [p.end_of_stream for p in parts] == [False, True]


def test_stream_reset_before_the_response_releases_once():
    router = RecordingRouter()
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    s.close()
    s.close()
    assert router.calls == [("finished", "aborted")]


def test_error_status_is_reported_as_error():
    router = RecordingRouter()
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    s.handle(hdrs([(":status", "500")], response=True))
    s.handle(body(b"oops", True, response=True))
    assert router.calls[-1] == ("finished", "error")


def test_undecodable_message_is_a_400():
    s = ExtProcStream(RecordingRouter())
    out = parse(s.handle(b"\x22\x05ab"))
    assert int(out[0].immediate_response.status.code) == 400


@pytest.mark.parametrize(
    ("status", "chunks", "expected"),
    [
        (
            "200",
            [
                b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
                b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,'
                b'"prompt_tokens_details":{"cached_tokens":8}}}\n\ndata: [DONE]\n\n',
            ],
            Usage(12, 3, 8),
        ),
        ("200", [b'{"choices":[],"usage":', b'{"prompt_tokens":5,"completion_tokens":2}}'],
         Usage(5, 2)),
        ("200", [b"data: 1\n\n", b"data: [DONE]\n\n"], None),
        ("500", [b'{"usage":{"prompt_tokens":5,"completion_tokens":2}}'], None),
    ],
    ids=["sse", "json-split", "none", "error-status"],
)  # fmt: skip
def test_response_usage_reaches_the_router(status, chunks, expected):
    router = RecordingRouter()
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    s.handle(hdrs([(":status", status)], response=True))
    for i, c in enumerate(chunks):
        s.handle(body(c, i == len(chunks) - 1, response=True))
    assert router.calls[-1] == ("finished", "complete" if status == "200" else "error")
    assert router.usage == expected


# ------------------------------------------------------------------ limits and later replies

LIMITED = StreamLimits(max_body_bytes=1000, body_timeout=None)


def immediate_status(out) -> int:
    (resp,) = parse(out)
    return int(resp.immediate_response.status.code)


def test_a_body_over_the_limit_is_refused_as_soon_as_it_passes_it():
    router = RecordingRouter()
    s = ExtProcStream(router, LIMITED)
    s.handle(hdrs(POST))
    assert s.handle(body(b"x" * 600, False)) == ()
    out = s.handle(body(b"x" * 600, False))  # 1,200 bytes: over, before the end of the body
    assert immediate_status(out) == 413
    doc = json.loads(parse(out)[0].immediate_response.body)
    assert "1,000" in doc["error"]["message"]
    assert s.handle(body(b"x" * 600, True)) == ()  # the rest is dropped unread
    assert router.infos == []
    assert len(s._body) == 0


def test_a_declared_length_over_the_limit_is_refused_at_the_headers():
    router = RecordingRouter()
    s = ExtProcStream(router, LIMITED)
    out = s.handle(hdrs([*POST, ("content-length", "5000")]))
    assert immediate_status(out) == 413
    assert s.handle(body(b"x" * 10, True)) == ()
    assert router.infos == []


def test_a_body_at_the_limit_is_routed():
    router = RecordingRouter()
    s = ExtProcStream(router, LIMITED)
    s.handle(hdrs([*POST, ("content-length", "1000")]))
    s.handle(body(b"x" * 500, False))
    out = parse(s.handle(body(b"x" * 500, True)))
    assert out[0].request_headers is not None
    assert len(router.infos[0].body) == 1000


def test_client_headers_of_the_eps_families_are_all_removed():
    router = RecordingRouter()
    s = ExtProcStream(router)
    sent = [
        *POST,
        ("x-dynamo-foo", "1"),
        ("x-dynamo-worker-instance-id", "2"),
        ("x-prefiller-anything", "3"),
        ("x-prefill-dp-rank", "4"),
        ("x-data-parallel-rank", "5"),
        ("x-gateway-destination-endpoint-fallback", "6.6.6.6:1"),
        ("x-dp-rank", "7"),
        ("x-unrelated", "kept"),
    ]
    s.handle(hdrs(sent))
    out = parse(s.handle(body(b"{}", True)))
    mut = out[0].request_headers.response.header_mutation
    removed = set(mut.remove_headers)
    got = set_headers(out[0])
    assert removed == {
        "x-dynamo-foo",
        "x-dynamo-worker-instance-id",
        "x-prefiller-anything",
        "x-prefill-dp-rank",
        "x-data-parallel-rank",
        "x-gateway-destination-endpoint-fallback",
        "x-dp-rank",
    }
    assert "x-unrelated" not in removed and "x-unrelated" not in got


class LaterRouter(RecordingRouter):
    """Routes through an awaitable that completes when the test says so."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.gate: asyncio.Future | None = None

    def route(self, info):
        self.gate = asyncio.get_running_loop().create_future()

        async def later():
            await self.gate
            return RecordingRouter.route(self, info)

        return later()


async def test_a_routing_that_completes_later_is_emitted_in_order_with_held_trailers():
    router = LaterRouter()
    emitted: list[bytes] = []
    s = ExtProcStream(router, LIMITED, emitted.extend)
    s.handle(hdrs(POST))
    assert s.handle(body(b"{}", False)) == ()
    trailers = ep.ProcessingRequest(request_trailers=ep.HttpTrailers(trailers=core.HeaderMap()))
    assert not s.handle(bytes(trailers))  # ends the body; routing is now pending
    assert s.pending and emitted == []
    router.gate.set_result(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    out = parse(emitted)
    assert out[0].request_headers is not None
    assert out[1].request_body is not None
    assert out[-1].request_trailers is not None
    assert not s.pending
    # the exchange goes on as usual, and ends once
    s.handle(hdrs([(":status", "200")], response=True))
    s.handle(body(b"ok", True, response=True))
    assert router.calls[-1] == ("finished", "complete")


async def test_a_later_routing_error_is_an_immediate_response():
    router = LaterRouter(error=RoutingError(429, "shed"))
    emitted: list[bytes] = []
    s = ExtProcStream(router, LIMITED, emitted.extend)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    router.gate.set_result(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert immediate_status(emitted) == 429


async def test_closing_during_a_later_routing_cancels_it_and_releases_nothing_twice():
    router = LaterRouter()
    emitted: list[bytes] = []
    s = ExtProcStream(router, LIMITED, emitted.extend)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    s.close()
    router.gate.set_result(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert emitted == []
    assert router.calls == []  # never routed, so nothing to release


async def test_a_decision_made_after_close_is_released():
    router = LaterRouter()
    emitted: list[bytes] = []
    s = ExtProcStream(router, LIMITED, emitted.extend)
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    router.gate.set_result(None)
    task = s._pending
    await asyncio.sleep(0)  # the coroutine finishes; its done callback is scheduled
    assert task.done()
    s.close()
    await asyncio.sleep(0)
    assert emitted == []
    assert router.calls == [("finished", "aborted")]


async def test_a_body_that_does_not_arrive_in_time_gets_408():
    router = RecordingRouter()
    emitted: list[bytes] = []
    s = ExtProcStream(router, StreamLimits(max_body_bytes=None, body_timeout=0.05), emitted.extend)
    s.handle(hdrs(POST))
    s.handle(body(b"{", False))
    await asyncio.sleep(0.15)
    assert immediate_status(emitted) == 408
    assert s.handle(body(b"}", True)) == ()
    assert router.infos == []


async def test_a_body_in_time_disarms_the_timer():
    router = RecordingRouter()
    emitted: list[bytes] = []
    s = ExtProcStream(router, StreamLimits(max_body_bytes=None, body_timeout=0.05), emitted.extend)
    s.handle(hdrs(POST))
    assert len(s.handle(body(b"{}", True))) == 2
    await asyncio.sleep(0.1)
    assert emitted == []


def test_the_large_body_hook_runs_once_per_large_request():
    calls = []
    router = RecordingRouter()
    s = ExtProcStream(router, StreamLimits(max_body_bytes=None, body_timeout=None), None,
                      lambda: calls.append(1))  # fmt: skip
    s.handle(hdrs(POST))
    s.handle(body(b"x" * LARGE_BODY, True))
    s.close()
    assert calls == [1]
    small = ExtProcStream(router, None, None, lambda: calls.append(2))
    small.handle(hdrs(POST))
    small.handle(body(b"{}", True))
    small.close()
    assert calls == [1]


# ------------------------------------------------------------------ bounded work per stream


def test_an_empty_processing_request_ends_the_stream_with_invalid_argument():
    from epp.extproc.stream_error import INVALID_ARGUMENT, StreamError

    router = RecordingRouter()
    s = ExtProcStream(router)
    s.handle(hdrs(POST))
    with pytest.raises(StreamError) as info:
        s.handle(b"")
    assert info.value.code == INVALID_ARGUMENT and info.value.reason == "empty_message"


def test_a_processing_request_without_a_request_field_is_invalid_argument():
    from epp.extproc.stream_error import INVALID_ARGUMENT, StreamError

    only_metadata = bytes(
        ep.ProcessingRequest(metadata_context=core.Metadata(filter_metadata={"x": pb.Struct()}))
    )
    assert only_metadata  # not empty: it carries metadata, and no request
    with pytest.raises(StreamError) as info:
        ExtProcStream(RecordingRouter()).handle(only_metadata)
    assert info.value.code == INVALID_ARGUMENT and info.value.reason == "no_request_field"


def _in_response_phase() -> ExtProcStream:
    s = ExtProcStream(RecordingRouter())
    s.handle(hdrs(POST))
    s.handle(body(b"{}", True))
    s.handle(hdrs([(":status", "200")], response=True))
    return s


def test_a_flood_of_tiny_messages_is_resource_exhausted():
    from epp.extproc.stream import BYTES_PER_MESSAGE, MESSAGE_ALLOWANCE
    from epp.extproc.stream_error import RESOURCE_EXHAUSTED, StreamError

    s = _in_response_phase()
    tiny = body(b"x", False, response=True)
    sent = 3
    assert len(tiny) < BYTES_PER_MESSAGE
    with pytest.raises(StreamError) as info:
        for _ in range(10 * MESSAGE_ALLOWANCE):
            sent += 1
            s.handle(tiny)
    assert info.value.code == RESOURCE_EXHAUSTED and info.value.reason == "message_allowance"
    # Cut off past the allowance: the bytes the tiny messages carry buy some more.
    bound = MESSAGE_ALLOWANCE / (1 - len(tiny) / BYTES_PER_MESSAGE)
    assert MESSAGE_ALLOWANCE < sent <= 1.1 * bound  # (the first messages carried more)


def test_a_long_streamed_response_in_ordinary_chunks_is_never_cut_short():
    from epp.extproc.stream import MESSAGE_ALLOWANCE

    s = _in_response_phase()
    chunk = body(b"data: {}\n\n", False, response=True)  # the smallest SSE event
    for _ in range(10 * MESSAGE_ALLOWANCE):  # far more chunks than the allowance alone
        (o,) = parse(s.handle(chunk))
        assert o.response_body.response.body_mutation.streamed_response.body
    assert parse(s.handle(body(b"", True, response=True)))
