"""The simulator's HTTP server: vLLM's OpenAI-compatible API over the engines.

Routes: ``POST /v1/completions`` (prompt as token ids, or text with a tokenizer),
``POST /v1/chat/completions`` (needs a tokenizer, or ``nvext.token_data`` ids as the EPP
forwards them), ``GET /v1/models``, ``GET /health``, ``GET /metrics``,
``POST /reset_prefix_cache``. Responses follow vLLM's shapes, including
``usage.prompt_tokens_details.cached_tokens``, ``return_token_ids`` and SSE streaming with
``data: [DONE]``. Errors are vLLM's JSON error object with its status code.

With several data-parallel ranks a request goes to the rank named by the
``X-data-parallel-rank`` header (as vLLM accepts it), otherwise to the least loaded rank.
A client that disconnects cancels its request, which frees its blocks.

Disaggregation follows vLLM's NixlConnector protocol: ``kv_transfer_params`` with
``do_remote_decode`` (prefill role) runs the prompt with one output token, non-streaming, and
answers with the parameters of the leased blocks; ``do_remote_prefill`` (decode role) loads
those blocks over NIXL before decoding (see :mod:`workers.sim.kv_connector`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from workers.sim.engine import Engine, RequestRejected, Sequence_
from workers.sim.kv_connector import RemotePrefill
from workers.sim.metrics import SimCollector, TransferStats, exposition, registry_for

log = logging.getLogger(__name__)

DP_RANK_HEADER = "X-data-parallel-rank"
DEFAULT_COMPLETION_TOKENS = 16  # vLLM's /v1/completions default max_tokens


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or {
            400: "BadRequestError",
            404: "NotFoundError",
            503: "ServiceUnavailableError",
        }.get(status, "InternalServerError")


def error_response(exc: ApiError) -> web.Response:
    body = {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.status}}
    return web.json_response(body, status=exc.status)


@dataclass(slots=True)
class Parsed:
    api: str  # "completions" | "chat"
    model: str
    prompt: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    seed: int | None
    kv_transfer_params: dict[str, Any] | None


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer")
    return value


class SimServer:
    """Owns the engines' HTTP face; see the module docstring."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        model_names: Sequence[str],
        tokenizer: Any = None,
        hash_algo: str = "sha256_cbor",
        handoff: Callable[[Engine, Sequence_], dict[str, Any]] | None = None,
        transfers: Sequence[TransferStats] | None = None,
    ) -> None:
        """``handoff`` (prefill role) leases a finished prefill's blocks and returns the
        ``kv_transfer_params`` for the decode engine; decode-role engines have a loader.
        ``transfers`` adds the NIXL metrics."""
        self.engines = list(engines)
        self.names = list(model_names)
        self.tokenizer = tokenizer
        self.collector = SimCollector(self.engines, self.names[0], hash_algo, transfers)
        self.registry = registry_for(self.collector)
        self.handoff = handoff
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        return app

    # ------------------------------------------------------------- simple routes

    async def models(self, _request: web.Request) -> web.Response:
        limit = self.engines[0].config.context_limit
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.names[0],
                "parent": None,
                "max_model_len": limit,
            }
            for name in self.names
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=exposition(self.registry), content_type="text/plain", charset="utf-8"
        )

    async def reset_prefix_cache(self, _request: web.Request) -> web.Response:
        refused = [e.rank for e in self.engines if not e.reset_prefix_cache()]
        if refused:
            # vLLM logs and leaves the cache alone while blocks are in use.
            log.warning("prefix cache not reset on rank(s) %s: blocks in use", refused)
        return web.Response(status=200)

    # ---------------------------------------------------------------- parsing

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            return self.names[0]
        if model not in self.names:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return str(model)

    def _common(self, api: str, body: dict[str, Any], prompt: list[int]) -> Parsed:
        n = _int_field(body, "n")
        if n is not None and n != 1:
            raise ApiError(400, "the simulator generates one choice per request (n must be 1)")
        max_tokens = _int_field(body, "max_tokens")
        if api == "chat":
            max_tokens = _int_field(body, "max_completion_tokens") or max_tokens
        if max_tokens is None:
            limit = self.engines[0].config.context_limit
            max_tokens = DEFAULT_COMPLETION_TOKENS if api == "completions" else limit - len(prompt)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object")
        params = body.get("kv_transfer_params")
        if params is not None and not isinstance(params, dict):
            raise ApiError(400, "'kv_transfer_params' must be an object")
        return Parsed(
            api=api,
            model=self._model(body),
            prompt=prompt,
            max_tokens=max_tokens,
            stream=stream,
            include_usage=bool(options.get("include_usage", False)),
            return_token_ids=bool(body.get("return_token_ids", False)),
            seed=_int_field(body, "seed"),
            kv_transfer_params=params,
        )

    @staticmethod
    def _ids(value: Any, what: str) -> list[int] | None:
        if (
            isinstance(value, list)
            and value
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
        ):
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            raise ApiError(400, f"{what}: token ids must be non-negative integers")
        return None

    def _completion_prompt(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
            prompt = prompt[0]  # a batch of one
        ids = self._ids(prompt, "prompt")
        if ids is not None:
            return ids
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "text prompts need a tokenizer (start with --tokenizer)")
            ids = self.tokenizer.encode_prompt(prompt)
            if not ids:
                raise ApiError(400, "the prompt is empty")
            return ids
        if isinstance(prompt, list) and prompt and all(isinstance(p, list | str) for p in prompt):
            raise ApiError(400, "batched prompts are not supported: send one prompt per request")
        raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids")

    def _chat_prompt(self, body: dict[str, Any]) -> list[int]:
        nvext = body.get("nvext")
        if isinstance(nvext, dict) and nvext.get("token_data") is not None:
            ids = self._ids(nvext["token_data"], "nvext.token_data")
            if ids is None:
                raise ApiError(400, "nvext.token_data must be a non-empty list of token ids")
            return ids
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list")
        if self.tokenizer is None:
            raise ApiError(400, "chat requests need a tokenizer (start with --tokenizer)")
        try:
            return self.tokenizer.encode_chat(
                messages,
                tools=body.get("tools"),
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                chat_template_kwargs=body.get("chat_template_kwargs"),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    # ------------------------------------------------------------- generation

    def _engine(self, request: web.Request) -> Engine:
        raw = request.headers.get(DP_RANK_HEADER)
        if raw is not None:
            if not raw.strip().isdigit() or int(raw) >= len(self.engines):
                raise ApiError(
                    400, f"{DP_RANK_HEADER} must be a rank in 0..{len(self.engines) - 1}"
                )
            return self.engines[int(raw)]
        return min(self.engines, key=lambda e: e.load)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            parsed = self._common("completions", body, self._completion_prompt(body))
            return await self._generate(request, parsed)
        except ApiError as exc:
            return error_response(exc)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            parsed = self._common("chat", body, self._chat_prompt(body))
            return await self._generate(request, parsed)
        except ApiError as exc:
            return error_response(exc)

    async def _generate(self, request: web.Request, p: Parsed) -> web.StreamResponse:
        engine = self._engine(request)
        prefix = "cmpl" if p.api == "completions" else "chatcmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        transfer = p.kv_transfer_params or {}
        hold = bool(transfer.get("do_remote_decode"))
        remote = None
        if hold and transfer.get("do_remote_prefill"):
            raise ApiError(
                400, "kv_transfer_params cannot ask for both do_remote_decode and do_remote_prefill"
            )
        if hold:
            if self.handoff is None:
                raise ApiError(400, "kv_transfer_params.do_remote_decode needs --role prefill")
            p.max_tokens = 1
            p.stream = False
        elif transfer.get("do_remote_prefill"):
            if engine.loader is None:
                raise ApiError(400, "kv_transfer_params.do_remote_prefill needs --role decode")
            try:
                remote = RemotePrefill.from_params(
                    transfer, len(p.prompt), engine.config.block_size
                )
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
        try:
            seq = engine.submit(
                request_id, p.prompt, p.max_tokens, seed=p.seed, hold_blocks=hold, remote=remote
            )
        except RequestRejected as exc:
            if remote is not None and engine.loader is not None:
                engine.loader.abandon(remote)  # its blocks will never be read
            raise ApiError(exc.status, exc.message) from None
        params = None
        try:
            if p.stream:
                return await self._stream(request, p, engine, seq)
            ids = []
            while (token := await seq.out.get()) is not None:
                ids.append(token)
            self._check_failed(seq)
            if hold and self.handoff is not None:
                params = self.handoff(engine, seq)
            return web.json_response(self._full(p, request_id, seq, ids, params))
        finally:
            if not seq.done:
                engine.abort(request_id)  # the client went away mid-request
            if hold and params is None:
                engine.release_lease(request_id)  # no decode engine will ever ask for them

    @staticmethod
    def _check_failed(seq: Sequence_) -> None:
        if seq.finish_reason == "abort":
            raise ApiError(500, "the request was aborted")
        if seq.finish_reason == "error":
            raise ApiError(500, seq.error or "the request failed")

    def _detokenizer(self) -> Callable[[int], str]:
        """Text per output token, incrementally, as vLLM detokenizes (without a tokenizer
        the output has no text)."""
        if self.tokenizer is None:
            return lambda _token: ""
        return self.tokenizer.decode_stream()

    def _text(self, ids: list[int]) -> str:
        step = self._detokenizer()
        return "".join(step(t) for t in ids)

    def _usage(self, seq: Sequence_, completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": seq.prompt_len,
            "total_tokens": seq.prompt_len + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": seq.cached_tokens or 0},
        }

    def _full(
        self,
        p: Parsed,
        request_id: str,
        seq: Sequence_,
        ids: list[int],
        params: dict[str, Any] | None,
    ) -> dict[str, Any]:
        text = self._text(ids)
        if p.api == "completions":
            choice: dict[str, Any] = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
            }
            obj = "chat.completion"
        if p.return_token_ids:
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = seq.tokens[: seq.prompt_len]
        return {
            "id": request_id,
            "object": obj,
            "created": int(time.time()),
            "model": p.model,
            "choices": [choice],
            "usage": self._usage(seq, len(ids)),
            "kv_transfer_params": params,
        }

    async def _stream(
        self, request: web.Request, p: Parsed, engine: Engine, seq: Sequence_
    ) -> web.StreamResponse:
        # Headers wait for the first token, so that a request failing before it (a failed
        # KV load under the "fail" policy) still gets a status code that says so.
        first_token = await seq.out.get()
        if first_token is None:
            self._check_failed(seq)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        created = int(time.time())
        chat = p.api == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        rid = seq.request_id

        def chunk(choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": p.model,
                "choices": [choice] if choice is not None else [],
            }
            if usage is not None:
                data["usage"] = usage
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        if chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            first["finish_reason"] = None
            if p.return_token_ids:
                first["prompt_token_ids"] = seq.tokens[: seq.prompt_len]
            await resp.write(chunk(first))
        step = self._detokenizer()
        emitted: list[int] = []
        token = first_token
        while token is not None:
            emitted.append(token)
            delta = step(token)
            done = seq.done and seq.out.qsize() <= 1  # only the end marker left
            choice: dict[str, Any] = {"index": 0, "logprobs": None}
            if chat:
                choice["delta"] = {"content": delta}
            else:
                choice["text"] = delta
            choice["finish_reason"] = seq.finish_reason if done else None
            choice["stop_reason"] = None
            if p.return_token_ids:
                choice["token_ids"] = [token]
                if not chat and len(emitted) == 1:
                    choice["prompt_token_ids"] = seq.tokens[: seq.prompt_len]
            await resp.write(chunk(choice))
            token = await seq.out.get()
        if seq.finish_reason == "abort":
            raise ConnectionResetError("aborted")
        if p.include_usage:
            await resp.write(chunk(None, self._usage(seq, len(emitted))))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def serve(server: SimServer, host: str, port: int) -> web.AppRunner:
    """Start listening; the caller keeps the runner and calls ``cleanup()`` to stop."""
    # Stopping aborts every request first, so handlers end at once; the timeout only bounds
    # a request that arrives while the server closes.
    runner = web.AppRunner(
        server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("the server is not listening")
