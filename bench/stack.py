"""A whole gateway stack of separate processes, for benchmarks and the reliability suite.

:func:`stack` starts simulated engines (``kvpick worker sim``, publishing real KV events
with a replay socket), ``kvpick epp`` (TLS, the test-built tokenizer, an endpoints file)
and a real Envoy configured as an Inference Gateway in front of it. Separate processes so
that the EPP can be killed and restarted, its memory read from ``/proc``, and so that the
latencies the tests measure are not those of a client sharing its event loop with servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from bench.procstat import free_port, stop_process, wait_healthy
from epp.datalayer import prom_text
from gateway.envoy_config import GatewayConfig
from gateway.envoy_proc import EnvoyProcess

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


def rss_bytes(pid: int) -> int:
    """The resident set size of ``pid`` (``VmRSS`` in ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await _value(check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


async def _value(v: Any) -> Any:
    return await v if asyncio.iscoroutine(v) else v


@dataclass
class SimProcess:
    """One simulated engine process."""

    workdir: Path
    model: Path
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def entry(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "kv_events": f"tcp://127.0.0.1:{self.events_port}",
            "replay": f"tcp://127.0.0.1:{self.replay_port}",
            "engine": "vllm",
            "metrics": f"http://{self.address}/metrics",
        }

    async def start(self) -> None:
        events = {
            "enable_kv_cache_events": True,
            "endpoint": f"tcp://*:{self.events_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
        }
        argv = [sys.executable, "-m", "workers", "sim", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--speedup", "100", "--block-size", str(BLOCK)]
        argv += ["--num-blocks", "4096", "--tokenizer", str(self.model)]
        argv += ["--served-model-name", "tiny", "--kv-events-config", json.dumps(events)]
        log = open(self.workdir / f"sim-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        await wait_healthy(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace=5)


@dataclass
class EppProcess:
    """``python -m epp`` with the stack's endpoints file and the test-built tokenizer."""

    workdir: Path
    endpoints: Path
    model: Path
    args: Sequence[str] = ()
    grpc_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"epp-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "epp", "--endpoints-file", str(self.endpoints)]
        argv += ["--tokenizer", str(self.model), "--grpc-port", str(self.grpc_port)]
        argv += ["--grpc-health-port", str(self.health_port)]
        argv += ["--metrics-port", str(self.metrics_port), "--log-level", "INFO", *self.args]
        log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the EPP exited at start:\n{self.log()[-3000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if await check(b"", timeout=1) == b"\x08\x01":
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the EPP was not ready in {timeout}s:\n{self.log()}")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace=10)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    async def metrics(self) -> dict[str, float]:
        """Every sample, keyed ``name{label="v",...}`` (labels sorted), summed if repeated."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp,
        ):
            text = await resp.text()
        out: dict[str, float] = {}
        for s in prom_text.parse(text).samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            key = f"{s.name}{{{labels}}}" if labels else s.name
            out[key] = out.get(key, 0.0) + s.value
        return out

    async def pool(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.metrics_port}/debug/pool") as resp,
        ):
            return (await resp.json())["workers"]


@dataclass
class Stack:
    epp: EppProcess
    envoy: EnvoyProcess
    sims: list[SimProcess]
    workdir: Path

    @property
    def url(self) -> str:
        return self.envoy.url

    async def idle(self) -> bool:
        """No booking left, no ext_proc stream open, nothing in preprocessing."""
        m = await self.epp.metrics()
        workers = await self.epp.pool()
        return (
            all(w["booked"]["requests"] == 0 for w in workers)
            and m.get("kvpick_extproc_streams", 0) == 0
            and sum(v for k, v in m.items() if k.startswith("kvpick_preprocess_jobs")) == 0
        )


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path,
    model: Path,
    *,
    sims: int = 2,
    epp_args: Sequence[str] = (),
    gateway: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    engines = [SimProcess(tmp_path, model) for _ in range(sims)]
    epp: EppProcess | None = None
    envoy: EnvoyProcess | None = None
    try:
        await asyncio.gather(*(e.start() for e in engines))
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": [e.entry() for e in engines]}))
        epp = EppProcess(tmp_path, endpoints, model, epp_args)
        await epp.start()
        cfg = GatewayConfig(listen_port=free_port(), admin_port=free_port(), epp_port=epp.grpc_port)
        # All at once: some fields are checked together (a client certificate and its key).
        cfg = replace(cfg, **(gateway or {}))
        (tmp_path / "envoy").mkdir(exist_ok=True)
        envoy = EnvoyProcess(cfg, workdir=str(tmp_path / "envoy"))
        await asyncio.to_thread(envoy.start)
        yield Stack(epp, envoy, engines, tmp_path)
    finally:
        if envoy is not None:
            envoy.stop()
        if epp is not None:
            epp.stop()
        for e in engines:
            e.stop()
