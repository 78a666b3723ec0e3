"""The ext_proc gRPC server with the Director behind it, spoken to over real gRPC.

An :class:`epp.app.EppApp` (static endpoints, no Envoy) serves ``ExternalProcessor/Process``;
the client writes envoy-data-plane's ``ProcessingRequest`` messages and parses the
``ProcessingResponse`` messages that come back. This covers what a real Envoy cannot easily
show: exact message order on one stream, the destination metadata next to the header, subset
hints in both shapes, the served-endpoint key, BUFFERED bodies above gRPC's default size
limit, health service names, client cancellation and TLS (specs/epp-protocol.md §1-§5).
Each test runs twice: on kvpick's HTTP/2 server and on grpc.aio (``--ext-proc-server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import pathlib
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import envoy_data_plane.envoy.config.core.v3 as core
import envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 as pm
import envoy_data_plane.envoy.service.ext_proc.v3 as ep
import envoy_data_plane.google.protobuf as pb
import grpc
import pytest
import yaml
from prometheus_client import REGISTRY

from epp import headers as H
from epp.app import EppApp
from epp.extproc import health, tls
from epp.extproc.stream import BODY_CHUNK
from epp.options import parse_epp_args

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from epp_stack import free_port, until

pytestmark = pytest.mark.timeout(90)

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
A, B, C, D = (f"127.0.0.1:{port}" for port in (18001, 18002, 18003, 18004))
ADDRESSES = (A, B, C, D)
BUFFERED = pm.ProcessingModeBodySendMode.BUFFERED
FULL_DUPLEX = pm.ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED
BIG = 64 * 1024 * 1024
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", BIG),
    ("grpc.max_send_message_length", BIG),
]


TRANSPORT: contextvars.ContextVar[str] = contextvars.ContextVar("transport", default="h2")


@pytest.fixture(autouse=True, params=["h2", "grpcio"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every test runs against both ext_proc server implementations."""
    token = TRANSPORT.set(request.param)
    yield request.param
    TRANSPORT.reset(token)


@contextlib.asynccontextmanager
async def running_epp(
    tmp_path: pathlib.Path,
    *,
    addresses: Sequence[str] = ADDRESSES,
    args: Sequence[str] = (),
    cert_dir: pathlib.Path | None = None,
) -> AsyncIterator[EppApp]:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [{"address": a} for a in addresses]}))
    argv = [
        "--endpoints-file",
        str(endpoints),
        "--grpc-port",
        str(free_port()),
        "--grpc-health-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]
    argv += ["--cert-path", str(cert_dir)] if cert_dir else ["--secure-serving=false"]
    argv += ["--ext-proc-server", TRANSPORT.get()]
    app = EppApp(parse_epp_args([*argv, *args], env={}), host="127.0.0.1")
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def channel_to(app: EppApp) -> AsyncIterator[grpc.aio.Channel]:
    assert app.server is not None
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.server.grpc_port}", options=CLIENT_OPTIONS
    ) as ch:
        yield ch


class ExtProc:
    """One ``Process`` stream: writes requests, collects every response as it arrives."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = channel.stream_stream(PROCESS)()
        self.got: list[ep.ProcessingResponse] = []
        self.ended = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            data = await self.call.read()
            if data is grpc.aio.EOF:
                self.ended = True
                return
            self.got.append(ep.ProcessingResponse.parse(data))

    async def send(self, *messages: ep.ProcessingRequest) -> None:
        for msg in messages:
            await self.call.write(bytes(msg))

    async def wait(self, n: int, timeout: float = 20.0) -> list[ep.ProcessingResponse]:
        await until(lambda: len(self.got) >= n or self._reader.done(), timeout, f"{n} replies")
        assert len(self.got) >= n, f"stream ended after {len(self.got)} replies"
        return self.got

    async def finish(self) -> None:
        await self.call.done_writing()
        await asyncio.wait_for(self._reader, 10)


def to_value(value: Any) -> pb.Value:
    if isinstance(value, str):
        return pb.Value(string_value=value)
    if isinstance(value, list):
        return pb.Value(list_value=pb.ListValue(values=[to_value(v) for v in value]))
    if isinstance(value, dict):
        return pb.Value(struct_value=to_struct(value))
    raise TypeError(value)


def to_struct(doc: dict[str, Any]) -> pb.Struct:
    return pb.Struct(fields={k: to_value(v) for k, v in doc.items()})


def metadata(namespaces: dict[str, dict[str, Any]]) -> core.Metadata:
    return core.Metadata(filter_metadata={ns: to_struct(d) for ns, d in namespaces.items()})


def request_headers(
    path: str = "/v1/completions",
    *,
    rid: str = "r-1",
    eos: bool = False,
    extra: Sequence[tuple[str, str]] = (),
    meta: dict[str, dict[str, Any]] | None = None,
    modes: tuple[pm.ProcessingModeBodySendMode, pm.ProcessingModeBodySendMode] | None = None,
) -> ep.ProcessingRequest:
    pairs = [(":method", "POST"), (":path", path), ("x-request-id", rid), *extra]
    hm = core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=hm, end_of_stream=eos))
    if meta is not None:
        msg.metadata_context = metadata(meta)
    if modes is not None:
        msg.protocol_config = ep.ProtocolConfiguration(
            request_body_mode=modes[0], response_body_mode=modes[1]
        )
    return msg


def response_headers(
    pairs: Sequence[tuple[str, str]], meta: dict[str, dict[str, Any]] | None = None
) -> ep.ProcessingRequest:
    hm = core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=hm))
    if meta is not None:
        msg.metadata_context = metadata(meta)
    return msg


def body(data: bytes, eos: bool, *, response: bool = False) -> ep.ProcessingRequest:
    hb = ep.HttpBody(body=data, end_of_stream=eos)
    return (
        ep.ProcessingRequest(response_body=hb)
        if response
        else ep.ProcessingRequest(request_body=hb)
    )


def set_headers(common: ep.CommonResponse) -> dict[str, str]:
    return {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}


def lb_destination(resp: ep.ProcessingResponse) -> str:
    lb = resp.dynamic_metadata.fields[H.LB_NAMESPACE].struct_value.fields
    return lb[H.DESTINATION].string_value


def completions(tokens: int = 64, start: int = 1000) -> bytes:
    return json.dumps({"model": "m", "prompt": list(range(start, start + tokens))}).encode()


async def route_once(
    channel: grpc.aio.Channel, payload: bytes, **headers_kw: Any
) -> tuple[ep.ProcessingResponse, list[ep.ProcessingResponse]]:
    """Send one request; return its headers reply and body replies (stream then closed)."""
    s = ExtProc(channel)
    await s.send(request_headers(**headers_kw), body(payload, True))
    got = await s.wait(1)
    first = got[0]
    if first.immediate_response is None:
        await until(
            lambda: any(
                r.request_body is not None
                and r.request_body.response.body_mutation.streamed_response.end_of_stream
                for r in s.got
            ),
            what="the last body chunk",
        )
    await s.finish()
    return s.got[0], s.got[1:]


def zero_load(app: EppApp) -> bool:
    return len(app.load) == 0 and all(app.load.view(w).requests == 0 for w, _ in app.pool.workers())


async def health_status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        name = service.encode()
        request = b"\x0a" + bytes([len(name)]) + name if name else b""
        reply = await check(request, timeout=5)
    return reply[1] if reply else 0


# ---------------------------------------------------------------------------- routing


async def test_fallbacks_header_and_metadata_carry_the_same_list(tmp_path: pathlib.Path) -> None:
    async with running_epp(tmp_path, args=["--fallbacks", "2"]) as app, channel_to(app) as ch:
        for i in range(3):
            payload = completions(start=100 * i)
            first, chunks = await route_once(ch, payload, rid=f"fb-{i}")
            hr = first.request_headers
            assert hr is not None
            got = set_headers(hr.response)
            assert got[H.DESTINATION] == lb_destination(first)
            addresses = got[H.DESTINATION].split(",")
            assert len(addresses) == 3 == len(set(addresses))
            assert set(addresses) <= set(ADDRESSES)
            assert hr.response.clear_route_cache is True
            new_body = b"".join(
                c.request_body.response.body_mutation.streamed_response.body for c in chunks
            )
            assert got["content-length"] == str(len(new_body))
        await until(lambda: zero_load(app), what="release")


async def test_subset_hint_as_a_list_and_as_a_comma_string(tmp_path: pathlib.Path) -> None:
    async with running_epp(tmp_path) as app, channel_to(app) as ch:
        for i in range(4):
            meta = {H.SUBSET_NAMESPACE: {H.DESTINATION_SUBSET: [C]}}
            first, _ = await route_once(ch, completions(start=i), rid=f"l-{i}", meta=meta)
            assert lb_destination(first) == C
        seen = set()
        for i in range(8):
            meta = {H.SUBSET_NAMESPACE: {H.DESTINATION_SUBSET: f"{B},{D}"}}
            first, _ = await route_once(ch, completions(start=i), rid=f"s-{i}", meta=meta)
            assert first.request_headers is not None
            assert set_headers(first.request_headers.response)[H.DESTINATION] == (
                lb_destination(first)
            )
            seen.add(lb_destination(first))
        assert seen <= {B, D}
        # present but empty: no candidates
        meta = {H.SUBSET_NAMESPACE: {H.DESTINATION_SUBSET: []}}
        first, rest = await route_once(ch, completions(), rid="empty", meta=meta)
        assert first.immediate_response is not None
        assert int(first.immediate_response.status.code) == 503
        assert rest == []


async def test_one_stream_in_order_with_the_served_endpoint(tmp_path: pathlib.Path) -> None:
    async with running_epp(tmp_path) as app, channel_to(app) as ch:
        prompt = list(range(30_000))
        payload = json.dumps({"model": "m", "prompt": prompt, "stream": True}).encode()
        s = ExtProc(ch)
        await s.send(request_headers(rid="order-1"))
        pieces = [payload[i : i + 50_000] for i in range(0, len(payload), 50_000)]
        await s.send(*(body(p, False) for p in pieces[:-1]))
        await asyncio.sleep(0.3)
        assert s.got == []  # nothing for the headers or the chunks until the body ends
        await s.send(body(pieces[-1], True))
        await until(
            lambda: (
                bool(s.got)
                and s.got[-1].request_body is not None
                and s.got[-1].request_body.response.body_mutation.streamed_response.end_of_stream
            ),
            what="the request-phase replies",
        )
        first, *chunks = s.got
        assert first.request_headers is not None
        got = set_headers(first.request_headers.response)
        picked = got[H.DESTINATION]
        assert picked == lb_destination(first)
        streamed = [c.request_body.response.body_mutation.streamed_response for c in chunks]
        assert all(c.request_body is not None for c in chunks)
        assert all(len(x.body) <= BODY_CHUNK for x in streamed)
        assert [x.end_of_stream for x in streamed] == [False] * (len(streamed) - 1) + [True]
        new_body = b"".join(x.body for x in streamed)
        assert len(streamed) == -(-len(new_body) // BODY_CHUNK) > 2
        assert got["content-length"] == str(len(new_body))
        sent = json.loads(new_body)
        assert sent["nvext"]["token_data"] == prompt
        assert sent["prompt"] == prompt and sent["stream"] is True
        assert app.load.view((picked, 0)).requests == 1

        # Response phase: the gateway served it from another endpoint (a retry).
        served = next(a for a in ADDRESSES if a != picked)
        n = len(s.got)
        mismatches = REGISTRY.get_sample_value("kvpick_served_endpoint_mismatch_total") or 0
        await s.send(
            response_headers(
                [(":status", "200"), ("content-type", "text/event-stream")],
                meta={H.LB_NAMESPACE: {H.DESTINATION_SERVED: served}},
            )
        )
        await s.wait(n + 1)
        assert s.got[n].response_headers is not None
        assert app.load.view((picked, 0)).requests == 0
        assert app.load.view((served, 0)).requests == 1
        assert REGISTRY.get_sample_value("kvpick_served_endpoint_mismatch_total") == mismatches + 1
        events = [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"]
        await s.send(body(events[0], False, response=True))
        await s.wait(n + 2)
        await s.send(body(events[1], True, response=True))
        await s.wait(n + 3)
        echoed = [r.response_body.response.body_mutation.streamed_response for r in s.got[n + 1 :]]
        assert [(x.body, x.end_of_stream) for x in echoed] == [
            (events[0], False),
            (events[1], True),
        ]
        await until(lambda: zero_load(app), what="release at the end of the response")
        await s.finish()
        assert s.ended and len(s.got) == n + 3


async def test_buffered_12mib_body_passes_the_raised_message_limits(
    tmp_path: pathlib.Path,
) -> None:
    # Above the default 10 MB --max-body-bytes: the limit raised with the gRPC ones.
    args = ["--max-body-bytes", "32MiB"]
    async with running_epp(tmp_path, args=args) as app, channel_to(app) as ch:
        prompt = list(range(100_000, 1_800_000))
        payload = json.dumps({"model": "m", "prompt": prompt}, separators=(",", ":")).encode()
        assert len(payload) > 12 * 1024 * 1024
        s = ExtProc(ch)
        await s.send(request_headers(rid="big", modes=(BUFFERED, BUFFERED)))
        await s.wait(1)
        assert s.got[0].request_headers is not None  # BUFFERED: headers answered at once
        mutation = s.got[0].request_headers.response.header_mutation
        assert mutation is None or not mutation.set_headers
        await s.send(body(payload, True))
        await s.wait(2, timeout=60)
        reply = s.got[1].request_body
        assert reply is not None
        got = set_headers(reply.response)
        assert got[H.DESTINATION] in ADDRESSES
        new_body = reply.response.body_mutation.body
        assert len(new_body) > 2 * len(payload) - 1024  # the prompt, and its ids as token_data
        assert got["content-length"] == str(len(new_body))
        assert json.loads(new_body)["nvext"]["token_data"][-1] == prompt[-1]
        assert app.load.view((got[H.DESTINATION], 0)).requests == 1  # no response yet
        await s.finish()
        assert len(s.got) == 2
        await until(lambda: zero_load(app), what="release at the end of the stream")


# ----------------------------------------------------------------------- health, errors


async def test_health_service_names(tmp_path: pathlib.Path) -> None:
    async with running_epp(tmp_path, args=["--health-checking"]) as app:
        assert app.server is not None
        port = app.server.health_port
        for name in (
            "",
            "inference-extension",
            "envoy.service.ext_proc.v3.ExternalProcessor",
            "liveness",
            "readiness",
        ):
            assert await health_status(port, name) == health.SERVING, name
        # --health-checking: the ext_proc port answers too
        ext = "envoy.service.ext_proc.v3.ExternalProcessor"
        assert await health_status(app.server.grpc_port, ext) == health.SERVING
        app.draining = True
        assert await health_status(port, "readiness") == health.NOT_SERVING
        assert await health_status(port, "") == health.NOT_SERVING


async def test_client_cancel_mid_response_releases_the_booking(tmp_path: pathlib.Path) -> None:
    labels = {"model_name": "m", "target_model_name": "m", "error_code": "aborted"}
    before = REGISTRY.get_sample_value("inference_objective_request_error_total", labels) or 0
    async with running_epp(tmp_path) as app, channel_to(app) as ch:
        s = ExtProc(ch)
        await s.send(request_headers(rid="cancel-me"), body(completions(256), True))
        await s.wait(2)
        picked = lb_destination(s.got[0])
        assert app.load.view((picked, 0)).prefill_tokens == 256
        await s.send(response_headers([(":status", "200"), ("content-type", "text/event-stream")]))
        await s.send(body(b"data: {}\n\n", False, response=True))
        await s.wait(4)
        view = app.load.view((picked, 0))
        assert (view.requests, view.prefill_tokens) == (1, 0)  # first byte seen
        s.call.cancel()
        await until(lambda: zero_load(app), what="release after the client cancelled")
        after = REGISTRY.get_sample_value("inference_objective_request_error_total", labels)
        assert after == before + 1


async def test_bad_json_gets_an_immediate_400_with_a_json_body(tmp_path: pathlib.Path) -> None:
    async with running_epp(tmp_path) as app, channel_to(app) as ch:
        s = ExtProc(ch)
        await s.send(request_headers(rid="bad"), body(b'{"model": "m", "prompt": ', False))
        await s.send(body(b"oops", True))
        await s.wait(1)
        imm = s.got[0].immediate_response
        assert imm is not None
        assert int(imm.status.code) == 400
        err = json.loads(imm.body)["error"]
        assert err["code"] == 400
        assert "json" in err["message"].lower()
        hdrs = {o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}
        assert hdrs["content-type"] == "application/json"
        # whatever else arrives on the stream is ignored
        await s.send(response_headers([(":status", "200")]))
        await s.finish()
        assert len(s.got) == 1
        assert zero_load(app)


async def test_an_empty_message_ends_the_stream_with_invalid_argument(
    tmp_path: pathlib.Path,
) -> None:
    """On either transport: the stream ends with gRPC status INVALID_ARGUMENT, counted, and
    the EPP serves the next stream normally."""

    def ended() -> float:
        value = REGISTRY.get_sample_value(
            "kvpick_extproc_streams_ended_by_epp_total", {"reason": "empty_message"}
        )
        return value or 0.0

    async with running_epp(tmp_path) as app, channel_to(app) as ch:
        before = ended()
        call = ch.stream_stream(PROCESS)()
        await call.write(bytes(request_headers(rid="e1")))
        await call.write(b"")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in (info.value.details() or "")
        assert ended() == before + 1
        await until(lambda: zero_load(app), 5, "the booking released")
        first, _ = await route_once(ch, completions())
        assert lb_destination(first) in ADDRESSES


# ------------------------------------------------------------------------------- TLS


async def test_tls_with_the_configured_certificate(tmp_path: pathlib.Path) -> None:
    key, cert = tls.self_signed()
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "tls.key").write_bytes(key)
    (cert_dir / "tls.crt").write_bytes(cert)
    async with running_epp(tmp_path, cert_dir=cert_dir) as app:
        assert app.server is not None
        target = f"127.0.0.1:{app.server.grpc_port}"
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        options = [("grpc.ssl_target_name_override", "localhost"), *CLIENT_OPTIONS]
        async with grpc.aio.secure_channel(target, creds, options=options) as ch:
            first, chunks = await route_once(ch, completions(), rid="tls-1")
            assert lb_destination(first) in ADDRESSES
            assert chunks and chunks[-1].request_body is not None
        # a plaintext client cannot talk to the TLS port
        async with grpc.aio.insecure_channel(target) as plain:
            call = plain.stream_stream(PROCESS)()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.write(bytes(request_headers(eos=True)))
                await asyncio.wait_for(call.read(), 10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # the health port stays plaintext for kubelet probes
        assert await health_status(app.server.health_port, "") == health.SERVING
