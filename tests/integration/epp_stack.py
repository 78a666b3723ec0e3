"""A whole gateway stack for integration tests: real Envoy, the EPP, small backends.

:func:`epp_stack` starts :class:`bench.backends.ModelBackend` servers (each publishing
real vLLM-format KV events over ZMQ), writes the endpoints file, runs the EPP in this
process (:class:`epp.app.EppApp`, so tests can look at its index and bookkeeping) and an
Envoy process configured as an Inference Gateway in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench.backends import ModelBackend
from bench.epp import free_port
from epp.app import EppApp
from epp.options import parse_epp_args
from gateway.envoy_config import GatewayConfig
from gateway.envoy_proc import EnvoyProcess


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


@dataclass
class Stack:
    app: EppApp
    envoy: EnvoyProcess
    backends: list[ModelBackend]
    endpoints_file: Path

    @property
    def url(self) -> str:
        return self.envoy.url

    def backend(self, name: str) -> ModelBackend:
        return next(b for b in self.backends if b.name == name)

    def by_address(self, address: str) -> ModelBackend:
        return next(b for b in self.backends if b.address == address)


@contextlib.asynccontextmanager
async def epp_stack(
    tmp_path: Path,
    *,
    backends: int = 3,
    roles: Sequence[str] | None = None,
    epp_args: Sequence[str] = (),
    tokenizer: Path | None = None,
    gateway: dict[str, Any] | Callable[[list[ModelBackend]], dict[str, Any]] | None = None,
    secure: bool = True,
    backend_kwargs: dict[str, Any] | None = None,
    extra_endpoints: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[Stack]:
    """``extra_endpoints`` are endpoints-file entries of servers the caller runs (simulated
    engines, for instance), listed after the started backends."""
    started: list[ModelBackend] = []
    app: EppApp | None = None
    envoy: EnvoyProcess | None = None
    try:
        for i in range(backends):
            b = ModelBackend(name=f"b{i}", **(backend_kwargs or {}))
            await b.start()
            started.append(b)
        entries = []
        for i, b in enumerate(started):
            extra = {"role": roles[i]} if roles else {}
            entries.append(b.endpoint_entry(**extra))
        entries += [dict(e) for e in extra_endpoints]
        endpoints_file = tmp_path / "endpoints.yaml"
        endpoints_file.write_text(yaml.safe_dump({"endpoints": entries}))
        argv = [
            "--endpoints-file",
            str(endpoints_file),
            "--grpc-port",
            str(free_port()),
            "--grpc-health-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            f"--secure-serving={'true' if secure else 'false'}",
        ]
        if tokenizer is not None:
            argv += ["--tokenizer", str(tokenizer)]
        argv += list(epp_args)
        opts = parse_epp_args(argv, env={})
        app = EppApp(opts, host="127.0.0.1")
        await app.start()
        assert app.server is not None
        cfg = GatewayConfig(
            listen_port=free_port(),
            admin_port=free_port(),
            epp_port=app.server.grpc_port,
            epp_tls=secure,
        )
        if gateway:
            cfg = replace(cfg, **(gateway(started) if callable(gateway) else gateway))
        envoy = EnvoyProcess(cfg, workdir=str(tmp_path / "envoy"))
        (tmp_path / "envoy").mkdir(exist_ok=True)
        await asyncio.to_thread(envoy.start)
        # The EPP's subscriptions connect asynchronously; wait until every publisher is live
        # so the first requests' events are not lost to ZMQ's slow joiner.
        assert app.subscriber is not None
        publishers = sum(1 for e in entries if e.get("kv_events"))
        await until(lambda: len(app.subscriber.workers()) >= publishers, what="subscriptions")
        await asyncio.sleep(0.2)
        yield Stack(app, envoy, started, endpoints_file)
    finally:
        if envoy is not None:
            envoy.stop()
        if app is not None:
            await app.stop()
        for b in started:
            await b.close()
