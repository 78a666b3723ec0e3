"""The sidecar's HTTP server: OpenAI routes in direct mode, in front of the pod's engines.

Per request (``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses``):

1. the body is read (over ``--max-body-bytes``: 413) and parsed (malformed: 400);
2. the route the EPP chose is read from the headers and ``nvext`` (:mod:`sidecar.routing`);
   a worker this pod does not have is a 400 that says so; no route: the least-loaded rank;
3. the **token path** sends the prompt's ids (``nvext.token_data``, checked, or tokenized
   here with the EPP's tokenizer) to the engine's ``/v1/completions`` as a token prompt, and
   shapes the answer as the client asked (:mod:`sidecar.shapes`). Requests the token path
   cannot carry exactly (:func:`sidecar.prompt.passthrough_reason`) take the **passthrough**
   path: the body, without ``nvext``, to the engine's own endpoint of the same name;
4. a disaggregated request first runs its prefill leg on the named prefill target (which must
   be on ``--prefill-allow``: else 403) and then decodes locally with the returned
   ``kv_transfer_params`` (:mod:`sidecar.disagg`).

Any other path is reverse-proxied to the engine unchanged. Routing headers never reach an
engine. A client that goes away closes the engine connection(s), which aborts the request in
the engine; an engine that fails mid-stream ends the stream with an error event and no
``[DONE]``, as vLLM does. Every request leaves the in-flight gauges where it found them.

HTTP stack: aiohttp, server and client. It is already kvpick's HTTP library, its client keeps
connections to the engines alive and streams bodies without buffering, and its HTTP/1.1
parser is the C one. The measurement against a plain asyncio/uvloop server is still to be
made (issue 13, with ``kvpick bench sidecar``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Literal

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import generate_latest

from epp import headers as H
from sidecar import disagg
from sidecar.errors import ApiError, error_body, error_response
from sidecar.metrics import SidecarMetrics
from sidecar.options import SidecarOptions
from sidecar.prompt import PromptBuilder, PromptError, passthrough_reason
from sidecar.routing import Route, RoutingError, engine_headers, read_route
from sidecar.shapes import Piece, Shaper, Usage
from sidecar.workers import Rank, RankTable

log = logging.getLogger("sidecar")
access = logging.getLogger("sidecar.access")

Api = Literal["chat", "completions", "responses"]
ENGINE_DP_HEADER = "X-data-parallel-rank"

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

# Sampling fields a chat or responses request carries unchanged into the engine's completions
# request (the token path); anything that changes what the prompt is goes passthrough instead.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "bad_words",
    "allowed_token_ids",
    "user",
    "priority",
    "cache_salt",
    "vllm_xargs",
)


class Sidecar:
    """One pod's sidecar; :meth:`start` listens, :meth:`stop` closes everything."""

    def __init__(self, opts: SidecarOptions, *, tokenizer: Any = None) -> None:
        self.opts = opts
        self.table = RankTable.build(list(opts.workers), opts.pod_instance_id)
        self.tokenizer = tokenizer
        self.metrics = SidecarMetrics()
        for rank in self.table.ranks:
            self.metrics.in_flight.labels(rank.label).set(0)
        self.healthy: dict[str, bool] = {w.url: False for w in opts.workers}
        self.max_model_len: int | None = None
        self.model_names: list[str] = []
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.port = opts.port
        self._health_task: asyncio.Task[None] | None = None
        self.builder = PromptBuilder(tokenizer, max_model_len=None, verify=opts.token_data_check)

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.opts.max_body_bytes)
        for path, api in (
            ("/v1/chat/completions", "chat"),
            ("/v1/completions", "completions"),
            ("/v1/responses", "responses"),
        ):
            app.router.add_post(path, self._api_handler(api))
        app.router.add_get("/health", self.health)
        app.router.add_get("/live", self.live)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        return app

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.opts.connect_timeout, connect=self.opts.connect_timeout
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        await self.check_workers()
        self._health_task = asyncio.create_task(self._health_loop())
        self.runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.opts.host, self.opts.port)
        await site.start()
        for addr in self.runner.addresses:
            if isinstance(addr, tuple):
                self.port = int(addr[1])
                break
        log.info(
            "sidecar listening on %s:%d for pod %s (instance id %d): %s; token_data check %s",
            self.opts.host,
            self.port,
            self.opts.pod_address,
            self.opts.pod_instance_id,
            ", ".join(f"{w.url} ({w.kind}, dp {w.dp_size})" for w in self.opts.workers),
            self.opts.token_data_check,
        )

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opts.health_interval)
            try:
                await self.check_workers()
            except Exception:  # the loop must outlive any one bad answer
                log.exception("worker health check failed")

    async def check_workers(self) -> None:
        """Ask every worker's ``/health`` (and, once, ``/v1/models`` for the context length)."""
        assert self.session is not None

        async def one(url: str) -> None:
            ok = False
            try:
                async with self.session.get(
                    url + "/health", timeout=aiohttp.ClientTimeout(total=2.0)
                ) as r:
                    ok = r.status == 200
                if ok and not self.model_names:
                    async with self.session.get(
                        url + "/v1/models", timeout=aiohttp.ClientTimeout(total=2.0)
                    ) as r:
                        doc = await r.json(content_type=None)
                    data = doc.get("data") or []
                    self.model_names = [m["id"] for m in data if isinstance(m, dict) and "id" in m]
                    lens = [m.get("max_model_len") for m in data if isinstance(m, dict)]
                    known = [n for n in lens if isinstance(n, int) and n > 0]
                    if known:
                        self.max_model_len = known[0]
                        self.builder.max_model_len = known[0]
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError):
                ok = False
            if ok != self.healthy.get(url):
                (log.info if ok else log.warning)("worker %s is %s", url, "up" if ok else "down")
            self.healthy[url] = ok

        await asyncio.gather(*(one(url) for url in self.healthy))

    async def health(self, _request: web.Request) -> web.Response:
        down = [url for url, ok in self.healthy.items() if not ok]
        body = {"status": "ready" if not down else "not ready", "workers": self.healthy}
        return web.json_response(body, status=200 if not down else 503)

    async def live(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            content_type="text/plain",
            charset="utf-8",
        )

    # ------------------------------------------------------------------ requests

    def _api_handler(self, api: Api):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.generate(request, api)

        return handler

    async def _read_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413, f"the request body is over --max-body-bytes ({self.opts.max_body_bytes} bytes)"
            ) from None
        try:
            body = _decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def generate(self, request: web.Request, api: Api) -> web.StreamResponse:
        started = time.perf_counter()
        path = "token"
        rank: Rank | None = None
        status = 500
        try:
            body = await self._read_body(request)
            try:
                route = read_route(request.headers, body)
                rank = self.table.lookup(route.instance_id, route.dp_rank)
            except (RoutingError, LookupError) as exc:
                raise ApiError(400, str(exc)) from None
            reason = passthrough_reason(api, body)
            if reason is None and self.tokenizer is None and not _has_ids(api, body):
                reason = "no tokenizer and no nvext.token_data"
            path = "passthrough" if reason else "token"
            request_id = request.headers.get(H.REQUEST_ID) or uuid.uuid4().hex
            rank.in_flight += 1
            self.metrics.in_flight.labels(rank.label).inc()
            try:
                resp = await self._serve(request, api, body, route, rank, request_id, reason)
            finally:
                rank.in_flight -= 1
                self.metrics.in_flight.labels(rank.label).dec()
            status = resp.status
            return resp
        except ApiError as exc:
            status = exc.status
            return error_response(exc)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's word for it)
            raise
        finally:
            self.metrics.requests.labels(api, path, str(status)).inc()
            self.metrics.duration.labels(api, path).observe(time.perf_counter() - started)
            access.info(
                "%s %s path=%s worker=%s status=%d %.1fms",
                request.method,
                request.path,
                path,
                rank.label if rank else "-",
                status,
                (time.perf_counter() - started) * 1e3,
            )

    async def _serve(
        self,
        request: web.Request,
        api: Api,
        body: dict[str, Any],
        route: Route,
        rank: Rank,
        request_id: str,
        passthrough: str | None,
    ) -> web.StreamResponse:
        headers = engine_headers(request.headers)
        headers[H.REQUEST_ID] = request_id
        if passthrough is None:
            try:
                prompt = self.builder.build(api, body)
            except PromptError as exc:
                raise ApiError(exc.status, exc.message, getattr(exc, "param", None)) from None
            self._count_prompt(prompt)
            ids: list[int] | None = prompt.token_ids
            engine_path = "/v1/completions"
            engine_body = self._token_body(api, body, ids)
        else:
            ids = None
            engine_path = request.path
            engine_body = {k: v for k, v in body.items() if k != "nvext"}
        prefill_cached: int | None = None
        if route.disaggregated:
            handoff = await disagg.run_prefill(
                self, route, engine_path, engine_body, headers, request_id
            )
            if handoff is not None:
                engine_body["kv_transfer_params"] = handoff.kv_transfer_params
                prefill_cached = handoff.cached_tokens
        url = rank.worker.url + engine_path
        if rank.engine_dp_header is not None:
            headers[ENGINE_DP_HEADER] = rank.engine_dp_header
        if passthrough is not None or api == "completions":
            return await self._relay(request, url, engine_body, headers, prefill_cached)
        return await self._shaped(
            request, api, body, url, engine_body, headers, ids, prefill_cached
        )

    def _count_prompt(self, prompt: Any) -> None:
        if prompt.source == "token_data":
            self.metrics.token_data.labels("used").inc()
        elif getattr(prompt, "mismatch", False):
            self.metrics.token_data.labels("mismatch").inc()
            log.warning("nvext.token_data did not match the prompt; tokenized it here instead")
        else:
            self.metrics.token_data.labels("tokenized").inc()

    def _token_body(self, api: Api, body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        """The engine's ``/v1/completions`` request that carries this request's ids."""
        if api == "completions":
            out = {k: v for k, v in body.items() if k != "nvext"}
            out["prompt"] = ids
            return out
        out = {k: body[k] for k in SAMPLING_FIELDS if k in body}
        out["model"] = body.get("model") or (self.model_names[0] if self.model_names else None)
        out["prompt"] = ids
        if api == "chat":
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            if body.get("logprobs"):
                out["logprobs"] = int(body.get("top_logprobs") or 0)
        else:
            limit = body.get("max_output_tokens")
        if limit is None and self.max_model_len is not None:
            limit = max(1, self.max_model_len - len(ids))  # vLLM's chat default: the rest
        if limit is not None:
            out["max_tokens"] = limit
        stream = bool(body.get("stream", False))
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}
        if body.get("return_token_ids"):
            out["return_token_ids"] = True
        if "kv_transfer_params" in body:
            out["kv_transfer_params"] = body["kv_transfer_params"]
        return out

    # ------------------------------------------------------------------ engine calls

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self.opts.request_timeout,
            sock_connect=self.opts.connect_timeout,
            connect=self.opts.connect_timeout,
        )

    async def _post(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        assert self.session is not None
        hdrs = dict(headers)
        hdrs["Content-Type"] = "application/json"
        try:
            return await self.session.post(
                url, data=_encode(body), headers=hdrs, timeout=self._timeout()
            )
        except aiohttp.ClientConnectorError as exc:
            self.metrics.engine_errors.labels("unreachable").inc()
            raise ApiError(
                503, f"the engine at {url} is unreachable: {exc.os_error or exc}"
            ) from None
        except TimeoutError:
            self.metrics.engine_errors.labels("timeout").inc()
            raise ApiError(504, f"the engine at {url} did not answer in time") from None
        except aiohttp.ClientError as exc:
            self.metrics.engine_errors.labels("broken").inc()
            raise ApiError(502, f"the engine at {url} failed: {exc}") from None

    async def _relay(
        self,
        request: web.Request,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        prefill_cached: int | None,
    ) -> web.StreamResponse:
        """The engine's answer, as it is (its own shape is the client's): JSON read whole,
        SSE relayed chunk by chunk. With a prefill leg, usage reports its cached tokens."""
        resp = await self._post(url, body, headers)
        async with resp:
            ctype = resp.headers.get("Content-Type", "application/json")
            if resp.status >= 500:
                self.metrics.engine_errors.labels("status_5xx").inc()
            if not ctype.startswith("text/event-stream"):
                try:
                    data = await resp.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.metrics.engine_errors.labels("broken").inc()
                    raise ApiError(
                        502, f"the engine at {url} broke off its answer: {exc}"
                    ) from None
                if prefill_cached is not None and resp.status == 200:
                    data = _with_cached(data, prefill_cached)
                return web.Response(body=data, status=resp.status, content_type="application/json")
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": ctype})
            await out.prepare(request)
            try:
                if prefill_cached is None:
                    async for chunk in resp.content.iter_any():
                        await out.write(chunk)
                else:
                    async for line in resp.content:
                        if line.startswith(b"data: {") and b'"usage"' in line:
                            line = (
                                b"data: " + _with_cached(line[6:].rstrip(), prefill_cached) + b"\n"
                            )
                        await out.write(line)
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.metrics.engine_errors.labels("broken").inc()
                log.warning("the engine at %s broke off a stream: %s", url, exc)
                err = error_body(502, f"the engine broke off the stream: {exc}")
                with contextlib.suppress(ConnectionError):
                    await out.write(b"data: " + _encode(err) + b"\n\n")
                return out
            await out.write_eof()
            return out

    async def _shaped(
        self,
        request: web.Request,
        api: Api,
        body: dict[str, Any],
        url: str,
        engine_body: dict[str, Any],
        headers: dict[str, str],
        ids: list[int] | None,
        prefill_cached: int | None,
    ) -> web.StreamResponse:
        """A chat or responses answer made from the engine's completions answer."""
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        shaper = Shaper(
            api,
            model=str(body.get("model") or engine_body.get("model") or ""),
            include_usage=bool(options.get("include_usage"))
            if isinstance(options, dict)
            else False,
            return_token_ids=bool(body.get("return_token_ids")),
            prompt_token_ids=ids,
            want_logprobs=bool(body.get("logprobs")),
            top_logprobs=int(body.get("top_logprobs") or 0),
            request=body,
        )
        resp = await self._post(url, engine_body, headers)
        async with resp:
            if resp.status != 200:
                if resp.status >= 500:
                    self.metrics.engine_errors.labels("status_5xx").inc()
                data = await resp.read()
                return web.Response(body=data, status=resp.status, content_type="application/json")
            if not stream:
                try:
                    doc = _decode(await resp.read())
                    choice = doc["choices"][0]
                    usage = _usage(doc.get("usage"), prefill_cached)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.metrics.engine_errors.labels("broken").inc()
                    raise ApiError(
                        502, f"the engine at {url} broke off its answer: {exc}"
                    ) from None
                except (msgspec.DecodeError, KeyError, IndexError, TypeError) as exc:
                    raise ApiError(
                        502, f"the engine at {url} answered in a shape not understood: {exc}"
                    ) from None
                piece = _piece(choice)
                out = shaper.full([piece], usage, kv_transfer_params=doc.get("kv_transfer_params"))
                return web.Response(body=_encode(out), content_type="application/json")
            out_stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out_stream.prepare(request)
            await out_stream.write(shaper.stream_start())
            usage = Usage(len(ids or ()), 0, prefill_cached)
            params = None
            try:
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    doc = _decode(line[6:])
                    for choice in doc.get("choices") or ():
                        await out_stream.write(shaper.stream_piece(_piece(choice)))
                    if doc.get("usage"):
                        usage = _usage(doc["usage"], prefill_cached)
                    if doc.get("kv_transfer_params"):
                        params = doc["kv_transfer_params"]
            except (TimeoutError, aiohttp.ClientError, msgspec.DecodeError) as exc:
                self.metrics.engine_errors.labels("broken").inc()
                log.warning("the engine at %s broke off a stream: %s", url, exc)
                with contextlib.suppress(ConnectionError):
                    await out_stream.write(
                        shaper.stream_error(f"the engine broke off the stream: {exc}", code=502)
                    )
                return out_stream
            await out_stream.write(shaper.stream_end(usage, kv_transfer_params=params))
            await out_stream.write_eof()
            return out_stream

    # ------------------------------------------------------------------ other paths

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Any other route, to the named (else the first) worker, unchanged."""
        assert self.session is not None
        try:
            route = read_route(request.headers, None)
            rank = (
                self.table.lookup(route.instance_id, route.dp_rank)
                if route.instance_id is not None or route.dp_rank is not None
                else self.table.ranks[0]
            )
        except (RoutingError, LookupError) as exc:
            return error_response(ApiError(400, str(exc)))
        headers = engine_headers(request.headers)
        if rank.engine_dp_header is not None:
            headers[ENGINE_DP_HEADER] = rank.engine_dp_header
        url = rank.worker.url + request.rel_url.path_qs
        status = 502
        try:
            data = await request.read() if request.can_read_body else None
            async with self.session.request(
                request.method, url, data=data, headers=headers, timeout=self._timeout()
            ) as resp:
                status = resp.status
                passed = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                }
                out = web.StreamResponse(status=resp.status, headers=passed)
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return error_response(ApiError(413, "the request body is over --max-body-bytes"))
        except aiohttp.ClientConnectorError as exc:
            status = 503
            return error_response(ApiError(503, f"the engine at {url} is unreachable: {exc}"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return error_response(ApiError(502, f"the engine at {url} failed: {exc}"))
        finally:
            self.metrics.requests.labels("other", "proxy", str(status)).inc()


def _has_ids(api: Api, body: dict[str, Any]) -> bool:
    nvext = body.get("nvext")
    if isinstance(nvext, dict) and nvext.get("token_data") is not None:
        return True
    if api == "completions":
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
            p = p[0]
        return isinstance(p, list) and bool(p) and all(isinstance(t, int) for t in p)
    return False


def _piece(choice: dict[str, Any]) -> Piece:
    return Piece(
        text=choice.get("text") or "",
        token_ids=choice.get("token_ids"),
        logprobs=choice.get("logprobs"),
        finish_reason=choice.get("finish_reason"),
        stop_reason=choice.get("stop_reason"),
    )


def _usage(raw: Any, prefill_cached: int | None) -> Usage:
    raw = raw or {}
    details = raw.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return Usage(
        int(raw.get("prompt_tokens") or 0),
        int(raw.get("completion_tokens") or 0),
        prefill_cached if prefill_cached is not None else cached,
    )


def _with_cached(data: bytes, cached: int) -> bytes:
    """An engine answer whose usage reports ``cached`` prompt tokens (the prefill leg's, as
    llm-d's sidecar reports them); anything not understood is passed on as it is."""
    try:
        doc = _decode(data)
        usage = doc.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            details["cached_tokens"] = cached
            usage["prompt_tokens_details"] = details
            return _encode(doc)
    except (msgspec.DecodeError, AttributeError):
        pass
    return data
