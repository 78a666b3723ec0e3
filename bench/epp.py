"""``kvpick bench epp``: what the EPP costs a request, and how much one EPP process carries.

One run starts 16 backends (:mod:`bench.backends`, publishing real KV events), one
``kvpick epp`` process (TLS, the test-built tokenizer, the endpoints file), an Envoy in front
of it (the Inference Gateway setup) and a second Envoy without ext_proc that routes on a
destination header the client sets itself: the baseline.

Figures (one JSON object on stdout; progress on stderr):

* ``added_p50_ms_1k`` / ``added_p99_ms_1k`` / ``added_p50_ms_8k`` / ``added_p99_ms_8k``:
  latency Envoy+EPP adds over Envoy routing directly, for chat requests whose prompts are
  about 1K and 8K tokens, one request in flight; the two gateways are measured alternately,
  request by request, and the figure is the difference of the percentiles.
* ``decisions_per_s``: routed requests (ext_proc streams with a 1K-token chat body, the
  response phase included) one EPP process completes per second of its own CPU time, with
  load clients in other processes keeping it saturated. ``decisions_per_s_wall`` and
  ``epp_cpu_share`` are the raw rate and the fraction of a core the EPP got; on this
  2-core machine the load clients compete with the EPP, so the CPU-normalised rate is the
  capacity of one EPP process on one core.
* ``stream_chunks_per_s``: response-body chunks one EPP process echoes per CPU-second in
  FULL_DUPLEX_STREAMED mode (every SSE chunk of every streamed response); measured the same
  way, with ``bare_grpc_echo_per_s``, a bare grpc.aio echo server driven by the same
  client, as the in-run baseline.
* ``wire_us_per_chunk`` / ``reference_wire_us_per_chunk``: decoding one response-body
  chunk message and encoding its echo with kvpick's codec, and with envoy-data-plane's
  generated messages (the reason for the codec).
* ``tcp_round_trip_p50_us``: a 200-byte TCP ping-pong between this process and an asyncio
  echo process, one message in flight. It is the machine's price for one hop between two
  processes (two wake-ups), which every ext_proc exchange pays; it puts the added latency
  in proportion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.abuse import ABUSES
from bench.procstat import cpu_seconds as _cpu_seconds
from bench.procstat import free_port
from bench.words import WORDS

TARGETS = {
    "added_p50_ms_1k": ("<=", 2.0),
    "added_p99_ms_1k": ("<=", 5.0),
    "decisions_per_s": (">=", 1000),
    "stream_chunks_per_s": (">=", 10000),
}

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
ABUSE_NAMES = list(ABUSES)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "epp",
        help="EPP: latency added over direct Envoy routing, decisions/s, stream chunks/s",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=16, help="backends (default: %(default)s)")
    p.add_argument(
        "--requests", type=int, default=300, help="latency samples per prompt size (default: 300)"
    )
    p.add_argument(
        "--seconds", type=float, default=6.0, help="length of each throughput phase (default: 6)"
    )
    p.add_argument(
        "--streams", type=int, default=64, help="concurrent ext_proc streams (default: 64)"
    )
    p.add_argument(
        "--clients", type=int, default=2, help="load-client processes (default: %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="a short run (for tests)")
    p.add_argument("--plaintext", action="store_true", help="no TLS between Envoy and the EPP")
    p.add_argument(
        "--epp-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for kvpick epp (repeatable; e.g. --epp-arg=--policy=random)",
    )
    p.add_argument("--skip-throughput", action="store_true", help="measure latency only")
    p.add_argument(
        "--abuse",
        metavar="NAME",
        choices=[*ABUSE_NAMES, "all"],
        help="instead: normal requests through Envoy while a hostile client works on the "
        "EPP's ext_proc port, against a baseline without it (bench/epp_abuse.py); one of "
        f"{', '.join(ABUSE_NAMES)}, or all (each in turn, and a table)",
    )
    p.add_argument(
        "--abuse-seconds",
        type=float,
        default=2.0,
        help="a quick abuse is repeated until it has lasted this long (default: %(default)s)",
    )
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[bench epp] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --------------------------------------------------------------------------- prompts


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _chat_prompts(tok: Any, target_tokens: int, count: int, seed: int) -> list[dict]:
    """Chat bodies of about ``target_tokens`` tokens: 8 shared system prompts (about 80% of
    the tokens), each request with its own user turn, so that later requests hit cached
    prefixes as real traffic does."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(target_tokens * 2)]
    user_words = max(8, target_tokens // 10)

    def body(i: int, n_words: int, j: int) -> dict:
        return {
            "model": "tiny",
            "max_tokens": 16,
            "messages": [
                {"role": "system", "content": f"system {i}: " + " ".join(words[:n_words])},
                {"role": "user", "content": f"question {j}: " + _text(rng, user_words)},
            ],
        }

    lo, hi = 1, len(words)  # system words giving about target_tokens in all
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.encode_chat(body(0, mid, 0)["messages"])) < target_tokens:
            lo = mid + 1
        else:
            hi = mid
    rng.shuffle(words)
    return [body(j % 8, lo, j) for j in range(count)]


# ------------------------------------------------------------------ ext_proc messages


def _stream_messages(body: bytes, response_chunks: int, chunk: bytes) -> tuple[list[bytes], int]:
    """The ProcessingRequests of one routed request, encoded once with envoy-data-plane;
    returns them and how many responses the EPP must send back."""
    import envoy_data_plane.envoy.config.core.v3 as core
    import envoy_data_plane.envoy.service.ext_proc.v3 as ep

    def headers(pairs: list[tuple[str, str]], response: bool = False) -> bytes:
        hm = core.HeaderMap(
            headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
        )
        hh = ep.HttpHeaders(headers=hm, end_of_stream=False)
        msg = (
            ep.ProcessingRequest(response_headers=hh)
            if response
            else ep.ProcessingRequest(request_headers=hh)
        )
        return bytes(msg)

    def body_msg(data: bytes, eos: bool, response: bool = False) -> bytes:
        hb = ep.HttpBody(body=data, end_of_stream=eos)
        msg = (
            ep.ProcessingRequest(response_body=hb)
            if response
            else ep.ProcessingRequest(request_body=hb)
        )
        return bytes(msg)

    msgs = [
        headers(
            [
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
            ]
        ),
        body_msg(body, True),
        headers([(":status", "200"), ("content-type", "text/event-stream")], response=True),
    ]
    for i in range(response_chunks):
        msgs.append(body_msg(chunk, i == response_chunks - 1, response=True))
    # replies: headers + request body chunks (one here) + response headers + each chunk
    replies = 1 + (len(body) // 62_000 + 1) + 1 + response_chunks
    return msgs, replies


def _load_client(
    target: str,
    cert: bytes | None,
    msgs: list[bytes],
    replies: int,
    streams: int,
    seconds: float,
    start_at: float,
    out: Any,
) -> None:
    """A load-client process: ``streams`` concurrent ext_proc streams, each replaying
    ``msgs`` and reading ``replies`` answers, again and again until time is up."""
    import grpc

    async def main() -> tuple[int, int]:
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
        if cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=cert)
            options.append(("grpc.ssl_target_name_override", "localhost"))
            channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        call_factory = channel.stream_stream(PROCESS)
        done = 0
        answers = 0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + seconds

        async def write_all(call: Any) -> None:
            for m in msgs:
                await call.write(m)
            await call.done_writing()

        async def worker() -> None:
            nonlocal done, answers
            while time.monotonic() < deadline:
                call = call_factory()
                # Write and read at once, as Envoy does: the EPP echoes response chunks
                # while later ones are still being sent.
                writer = asyncio.ensure_future(write_all(call))
                got = 0
                while got < replies:
                    r = await call.read()
                    if r is grpc.aio.EOF:
                        break
                    got += 1
                await writer
                answers += got
                done += 1

        await asyncio.gather(*(worker() for _ in range(streams)))
        await channel.close()
        return done, answers

    out.put(asyncio.run(main()))


def _drive(
    target: str,
    cert: bytes | None,
    msgs: list[bytes],
    replies: int,
    streams: int,
    clients: int,
    seconds: float,
    pid: int,
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 2.0  # let every client connect first
    procs = [
        ctx.Process(
            target=_load_client,
            args=(target, cert, msgs, replies, max(1, streams // clients), seconds, start_at, q),
        )
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = _cpu_seconds(pid)
    t0 = time.monotonic()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    elapsed = time.monotonic() - t0
    cpu = _cpu_seconds(pid) - cpu0
    for p in procs:
        p.join(10)
    done = sum(r[0] for r in results)
    answers = sum(r[1] for r in results)
    return {"streams": done, "answers": answers, "wall_s": elapsed, "cpu_s": cpu}


# ----------------------------------------------------------------- echo baseline


def _echo_server(port_out: Any) -> None:
    import grpc

    async def main() -> None:
        async def process(requests, context):  # type: ignore[no-untyped-def]
            async for data in requests:
                yield data

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "envoy.service.ext_proc.v3.ExternalProcessor",
                    {"Process": grpc.stream_stream_rpc_method_handler(process)},
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


# ----------------------------------------------------------- machine reference


def _tcp_echo_server(port_out: Any) -> None:
    async def main() -> None:
        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)  # type: ignore[attr-defined]

        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
        port_out.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def _tcp_round_trip_us(rounds: int = 3000) -> float:
    """Median round trip of a 200-byte message to an echo process, in microseconds."""
    import socket

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_tcp_echo_server, args=(q,))
    proc.start()
    try:
        port = q.get(timeout=30)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = b"x" * 200
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                sock.sendall(msg)
                got = 0
                while got < len(msg):
                    got += len(sock.recv(65536))
                times.append(time.perf_counter() - t)
        return statistics.median(times[rounds // 10 :]) * 1e6
    finally:
        proc.terminate()
        proc.join(5)


# -------------------------------------------------------------------- the run


def _wire_costs(chunk: bytes) -> tuple[float, float]:
    import envoy_data_plane.envoy.service.ext_proc.v3 as ep

    from epp.extproc import wire

    msg = bytes(ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk, end_of_stream=False)))
    n = 20_000
    t = time.perf_counter()
    for _ in range(n):
        r = wire.decode_request(msg)
        wire.encode_streamed_body(r.body, r.end_of_stream, request=False)
    ours = (time.perf_counter() - t) / n * 1e6
    m = 2_000
    t = time.perf_counter()
    for _ in range(m):
        req = ep.ProcessingRequest.parse(msg)
        resp = ep.ProcessingResponse(
            response_body=ep.BodyResponse(
                response=ep.CommonResponse(
                    body_mutation=ep.BodyMutation(
                        streamed_response=ep.StreamedBodyResponse(
                            body=req.response_body.body,
                            end_of_stream=req.response_body.end_of_stream,
                        )
                    )
                )
            )
        )
        bytes(resp)
    ref = (time.perf_counter() - t) / m * 1e6
    return ours, ref


async def _latency(
    session: Any,
    epp_url: str,
    direct_url: str,
    bodies: list[bytes],
    forwarded: list[bytes],
    addresses: list[str],
) -> tuple[list[float], list[float]]:
    """Per-request latency through each gateway, alternating which goes first. The direct
    gateway gets ``forwarded[i]``, the body the EPP would send on for ``bodies[i]``."""
    via_epp: list[float] = []
    direct: list[float] = []
    rng = random.Random(3)
    for i, body in enumerate(bodies):
        dest = rng.choice(addresses)
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            headers = {"content-type": "application/json"}
            url = epp_url
            data = body
            if which == 1:
                headers["x-gateway-destination-endpoint"] = dest
                url = direct_url
                data = forwarded[i]
            t = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=data, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"request failed: {r.status}")
            (via_epp if which == 0 else direct).append((time.perf_counter() - t) * 1000)
    return via_epp, direct


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import grpc
    import yaml

    from bench.backends import ModelBackend
    from bench.tiny_tokenizer import build_tiny_model
    from epp.extproc import tls
    from epp.tokenizer import Tokenizer
    from gateway.envoy_config import GatewayConfig
    from gateway.envoy_proc import EnvoyProcess

    quick = args.quick
    n_requests = 30 if quick else args.requests
    seconds = 2.0 if quick else args.seconds
    work = Path(tempfile.mkdtemp(prefix="kvpick-bench-epp-"))
    _progress(f"workdir {work}")
    # A Llama-3.1-sized context, so the 8K prompts pass the EPP's context-length check
    # (which the figures then include) as they would on a real deployment.
    model = build_tiny_model(work / "model", "llama3", config={"model_max_length": 131072})
    tok = Tokenizer.load(str(model))
    certs = work / "certs"
    certs.mkdir()
    key, cert = tls.self_signed()
    (certs / "tls.key").write_bytes(key)
    (certs / "tls.crt").write_bytes(cert)

    backends = [ModelBackend(name=f"b{i}", record=False) for i in range(args.workers)]
    for b in backends:
        await b.start()
    endpoints = work / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [b.endpoint_entry() for b in backends]}))
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    epp_cmd = [
        sys.executable,
        "-m",
        "epp",
        "--endpoints-file",
        str(endpoints),
        "--tokenizer",
        str(model),
        "--cert-path",
        str(certs),
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
        *(["--secure-serving=false"] if args.plaintext else []),
        *args.epp_arg,
    ]
    epp_log = open(work / "epp.log", "wb")  # noqa: SIM115
    epp = subprocess.Popen(epp_cmd, stdout=epp_log, stderr=subprocess.STDOUT)
    envoys: list[EnvoyProcess] = []
    echo_proc = None
    result: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            deadline = time.monotonic() + 60
            while True:
                if epp.poll() is not None:
                    raise RuntimeError(f"the EPP exited: {(work / 'epp.log').read_text()[-2000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if await check(b"", timeout=1) == b"\x08\x01":
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("the EPP did not become ready")
                await asyncio.sleep(0.1)
        _progress(f"EPP ready (pid {epp.pid}); {len(backends)} backends")
        gw = GatewayConfig(
            listen_port=free_port(),
            admin_port=free_port(),
            epp_port=grpc_port,
            epp_tls=not args.plaintext,
        )
        direct = GatewayConfig(
            listen_port=free_port(), admin_port=free_port(), epp_port=grpc_port, ext_proc=False
        )
        for cfg, name in ((gw, "gw"), (direct, "direct")):
            (work / name).mkdir()
            e = EnvoyProcess(cfg, workdir=str(work / name))
            await asyncio.to_thread(e.start)
            envoys.append(e)
        addresses = [b.address for b in backends]
        await asyncio.sleep(0.5)

        connector = aiohttp.TCPConnector(limit=4)
        async with aiohttp.ClientSession(connector=connector) as session:
            for size in (1024, 8192):
                tag = f"{size // 1024}k"
                prompts = _chat_prompts(tok, size, n_requests + 20, seed=size)
                bodies = [json.dumps(p).encode() for p in prompts]
                # The baseline sends what the EPP forwards (the token ids in
                # nvext.token_data), so the backends do the same work on both paths
                # and the difference is the gateway's and the EPP's alone.
                token_ids = [tok.encode_chat(p["messages"]) for p in prompts]
                forwarded = [
                    json.dumps({**p, "nvext": {"token_data": list(t)}}).encode()
                    for p, t in zip(prompts, token_ids, strict=True)
                ]
                ids = [len(t) for t in token_ids[:20]]
                _progress(
                    f"latency {tag}: {n_requests} requests, ~{int(statistics.mean(ids))} tokens"
                )
                await _latency(
                    session, envoys[0].url, envoys[1].url, bodies[:20], forwarded[:20], addresses
                )
                via, base = await _latency(
                    session, envoys[0].url, envoys[1].url, bodies[20:], forwarded[20:], addresses
                )
                result[f"prompt_tokens_{tag}"] = int(statistics.mean(ids))
                result[f"epp_p50_ms_{tag}"] = round(_pct(via, 0.5), 3)
                result[f"epp_p99_ms_{tag}"] = round(_pct(via, 0.99), 3)
                result[f"direct_p50_ms_{tag}"] = round(_pct(base, 0.5), 3)
                result[f"direct_p99_ms_{tag}"] = round(_pct(base, 0.99), 3)
                result[f"added_p50_ms_{tag}"] = round(_pct(via, 0.5) - _pct(base, 0.5), 3)
                result[f"added_p99_ms_{tag}"] = round(_pct(via, 0.99) - _pct(base, 0.99), 3)

        for e in envoys:
            e.stop()
        envoys.clear()
        result["tcp_round_trip_p50_us"] = round(await asyncio.to_thread(_tcp_round_trip_us))
        if args.skip_throughput:
            return result

        target = f"127.0.0.1:{grpc_port}"
        body = json.dumps(_chat_prompts(tok, 1024, 1, seed=99)[0]).encode()
        msgs, replies = _stream_messages(body, 1, b'data: {"x": 1}\n\n')
        _progress(f"decisions: {args.streams} streams from {args.clients} processes, {seconds}s")
        channel_cert = None if args.plaintext else cert
        d = await asyncio.to_thread(
            _drive,
            target,
            channel_cert,
            msgs,
            replies,
            args.streams,
            args.clients,
            seconds,
            epp.pid,
        )
        result["decisions_per_s"] = round(d["streams"] / max(d["cpu_s"], 1e-9))
        result["decisions_per_s_wall"] = round(d["streams"] / d["wall_s"])
        result["decisions_epp_cpu_share"] = round(d["cpu_s"] / d["wall_s"], 2)

        chunk = (
            b"data: "
            + json.dumps({"choices": [{"delta": {"content": "x" * 40}}]}).encode()
            + b"\n\n"
        )
        small = json.dumps({"model": "tiny", "prompt": [1, 2, 3, 4]}).encode()
        per_stream = 200
        msgs, replies = _stream_messages(small, per_stream, chunk)
        _progress(f"stream chunks: {per_stream} chunks per response, {seconds}s")
        s = await asyncio.to_thread(
            _drive,
            target,
            channel_cert,
            msgs,
            replies,
            args.streams,
            args.clients,
            seconds,
            epp.pid,
        )
        chunks = s["streams"] * per_stream
        result["stream_chunks_per_s"] = round(chunks / max(s["cpu_s"], 1e-9))
        result["stream_chunks_per_s_wall"] = round(chunks / s["wall_s"])
        result["stream_epp_cpu_share"] = round(s["cpu_s"] / s["wall_s"], 2)

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        echo_proc = ctx.Process(target=_echo_server, args=(q,))
        echo_proc.start()
        echo_port = q.get(timeout=30)
        _progress("baseline: bare grpc.aio echo server, same client")
        echo_msgs = msgs[3:]  # only the response chunks: one echo per message
        b = await asyncio.to_thread(
            _drive,
            f"127.0.0.1:{echo_port}",
            None,
            echo_msgs,
            len(echo_msgs),
            args.streams,
            args.clients,
            seconds,
            echo_proc.pid,
        )
        result["bare_grpc_echo_per_s"] = round(b["answers"] / max(b["cpu_s"], 1e-9))
        result["bare_grpc_echo_per_s_wall"] = round(b["answers"] / b["wall_s"])
        ours, ref = _wire_costs(chunk)
        result["wire_us_per_chunk"] = round(ours, 2)
        result["reference_wire_us_per_chunk"] = round(ref, 2)
    finally:
        for e in envoys:
            e.stop()
        if echo_proc is not None:
            echo_proc.terminate()
            echo_proc.join(5)
        if epp.poll() is None:
            epp.send_signal(signal.SIGTERM)
            try:
                epp.wait(15)
            except subprocess.TimeoutExpired:
                epp.kill()
        epp_log.close()
        for b in backends:
            await b.close()
    result["workload"] = {
        "workers": args.workers,
        "latency_requests": n_requests,
        "throughput_seconds": seconds,
        "streams": args.streams,
        "load_clients": args.clients,
    }
    result["targets"] = {
        k: {"target": f"{op} {v}", "met": (result[k] <= v if op == "<=" else result[k] >= v)}
        for k, (op, v) in TARGETS.items()
    }
    return result


def run(args: argparse.Namespace) -> int:
    if args.abuse:
        from bench import epp_abuse

        return epp_abuse.run(args)
    result = asyncio.run(run_async(args))
    print(json.dumps(result, indent=2))
    return 0
