"""A small OpenAI-shaped HTTP backend that publishes real vLLM-format KV events.

It stands behind the gateway in the EPP's integration tests and benchmarks, where what
matters is the gateway/EPP path, not generation: every completion request's prompt token ids
(``nvext.token_data`` from the EPP, or a token-id ``prompt``) become ``BlockStored`` events
for the full blocks this backend has not stored yet, published on a real ZMQ PUB socket with
kvpick's vLLM-compatible encoder, so the EPP's index learns what the backend caches exactly
as it would from vLLM. Responses are fixed-shape JSON or SSE streams. It does no inference;
the simulated engine (``kvpick worker sim``) is the faithful stand-in for an engine.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash
from aiohttp import web

from epp.kvevents.publisher import ZmqEventPublisher
from epp.kvevents.types import BlockStored

_U63 = (1 << 63) - 1


@dataclass(slots=True)
class SeenRequest:
    """One request as the backend received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ModelBackend:
    """One backend (an "endpoint"): ``await start()``, then use :attr:`address`."""

    name: str = "backend"
    block_size: int = 16
    host: str = "127.0.0.1"
    sse_events: int = 8
    sse_event_bytes: int = 64
    publish_events: bool = True
    record: bool = True
    requests: list[SeenRequest] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _publisher: ZmqEventPublisher | None = None
    _stored: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def kv_events(self) -> str | None:
        if self._publisher is None:
            return None
        return self._publisher.endpoint.replace("0.0.0.0", self.host)

    @property
    def replay(self) -> str | None:
        if self._publisher is None or self._publisher.replay_endpoint is None:
            return None
        return self._publisher.replay_endpoint.replace("0.0.0.0", self.host)

    def endpoint_entry(self, **extra: Any) -> dict[str, Any]:
        """This backend as an entry of the EPP's ``--endpoints-file``."""
        entry: dict[str, Any] = {"address": self.address}
        if self.kv_events is not None:
            entry["kv_events"] = self.kv_events
            entry["replay"] = self.replay
        entry.update(extra)
        return entry

    async def start(self) -> None:
        if self.publish_events:
            self._publisher = ZmqEventPublisher("tcp://*:0", "tcp://*:0")
        app = web.Application(client_max_size=256 << 20)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._complete)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    # ------------------------------------------------------------- handlers

    async def _models(self, request: web.Request) -> web.Response:
        self._remember(request, b"")
        return web.json_response(
            {"object": "list", "data": [{"id": "tiny", "object": "model"}]},
            headers={"x-backend": self.name},
        )

    def _remember(self, request: web.Request, body: bytes) -> None:
        if self.record:
            self.requests.append(
                SeenRequest(request.method, request.path, dict(request.headers), body)
            )

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._remember(request, body)
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "code": 400}}, status=400)
        if not isinstance(doc, dict):
            doc = {}
        tokens = _token_ids(doc)
        if tokens:
            self._store(tokens)
        headers = {"x-backend": self.name}
        if doc.get("stream"):
            resp = web.StreamResponse(
                headers={
                    "content-type": "text/event-stream",
                    "cache-control": "no-cache",
                    **headers,
                }
            )
            await resp.prepare(request)
            filler = "x" * max(0, self.sse_event_bytes - 40)
            for i in range(self.sse_events):
                event = {"id": "c", "choices": [{"index": 0, "delta": {"content": f"{i}{filler}"}}]}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "model": doc.get("model"),
                "backend": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1},
            },
            headers=headers,
        )

    def _store(self, tokens: list[int]) -> None:
        """Publish BlockStored for the prompt's full blocks this backend has not stored."""
        if self._publisher is None:
            return
        bs = self.block_size
        full = len(tokens) // bs
        h = xxhash.xxh64()
        parent: int | None = None
        new_hashes: list[int] = []
        new_tokens: list[int] = []
        first_parent: int | None = None
        for i in range(full):
            block = tokens[i * bs : (i + 1) * bs]
            h.update(struct.pack(f"<{bs}I", *block))
            engine_hash = h.intdigest() & _U63
            if engine_hash not in self._stored:
                if not new_hashes:
                    first_parent = parent
                self._stored.add(engine_hash)
                new_hashes.append(engine_hash)
                new_tokens.extend(block)
            elif new_hashes:
                break  # a stored block after a new one cannot happen in a prefix cache
            parent = engine_hash
        if new_hashes:
            self._publisher.publish_events(
                [
                    BlockStored(
                        block_hashes=new_hashes,
                        parent_hash=first_parent,
                        token_ids=new_tokens,
                        block_size=bs,
                        medium="GPU",
                    )
                ]
            )


def _token_ids(doc: dict[str, Any]) -> list[int]:
    nvext = doc.get("nvext")
    if isinstance(nvext, dict):
        data = nvext.get("token_data")
        if isinstance(data, list) and all(isinstance(t, int) for t in data):
            return data
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    return []


async def start_backends(n: int, **kwargs: Any) -> list[ModelBackend]:
    backends = [ModelBackend(name=f"b{i}", **kwargs) for i in range(n)]
    await asyncio.gather(*(b.start() for b in backends))
    return backends
