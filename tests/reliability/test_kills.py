"""Processes killed under load: the EPP (Envoy fails closed; the restarted EPP rebuilds its
view from the engines' KV event replay and their metrics) and an engine (no request is
sent to it once it is gone)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import harness as H
import pytest

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

CHAT = "/v1/chat/completions"


@dataclass
class Load:
    """Closed-loop traffic of normal requests, each one recorded."""

    session: aiohttp.ClientSession
    url: str
    workers: int = 4
    log: list[tuple[float, int, float]] = field(default_factory=list)
    """(sent at, status, seconds); status 0 for a transport error."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _run(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                status, seconds, _ = await H.timed_post(
                    self.session, self.url + CHAT, json_body=H.chat(i, system=i % 4)
                )
            except aiohttp.ClientError:
                status, seconds = 0, time.monotonic() - sent
            self.log.append((sent, status, seconds))
            i += self.workers

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._run(k)) for k in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def sent_between(self, start: float, end: float) -> list[tuple[float, int, float]]:
        return [r for r in self.log if start <= r[0] < end]


async def _cached_tokens(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    async with session.post(url + CHAT, json=body) as resp:
        assert resp.status == 200, await resp.text()
        usage = json.loads(await resp.read())["usage"]
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def test_kill_9_of_the_epp_fails_closed_and_the_restarted_one_routes_right(
    tmp_path: Path, tiny_model: Path
) -> None:
    async with H.stack(tmp_path, tiny_model) as st, aiohttp.ClientSession() as s:
        # Four system prompts, each now cached on the engine the EPP sent it to.
        probes = [H.chat(10_000 + k, system=k) for k in range(4)]
        for body in probes:
            await _cached_tokens(s, st.url, body)
        assert all([await _cached_tokens(s, st.url, b) >= 256 for b in probes])
        load = Load(s, st.url)
        load.start()
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        st.epp.kill()
        await asyncio.sleep(1.5)
        down = load.sent_between(killed + 0.2, time.monotonic())
        assert down, "no request was tried while the EPP was down"
        # Fail closed, and fast: no request reaches an engine unrouted, none hangs.
        assert all(status >= 500 or status == 0 for _, status, _ in down), down
        assert max(seconds for _, _, seconds in down) < 1.0, down
        restarted = time.monotonic()
        await st.epp.start()
        ready = time.monotonic()
        # Every probe lands where its prompt is cached, from replay and scraping alone
        # (the engines publish nothing new for them).
        while True:
            hits = [await _cached_tokens(s, st.url, b) >= 256 for b in probes]
            if all(hits) or time.monotonic() - restarted > 10:
                break
            await asyncio.sleep(0.1)
        routed_right = time.monotonic() - restarted
        await asyncio.sleep(1.0)
        await load.stop()
        assert all(hits), hits
        assert routed_right < 5.0, (routed_right, ready - restarted)
        after = load.sent_between(ready + 0.5, time.monotonic())
        assert after and all(status == 200 for _, status, _ in after), after
        log = st.epp.log()
        assert "replayed at subscribe" in log, log[-2000:]
        await H.until(st.idle, timeout=10, what="every booking released")


async def test_a_killed_engine_gets_no_request_after_a_second(
    tmp_path: Path, tiny_model: Path
) -> None:
    async with H.stack(tmp_path, tiny_model, sims=3) as st, aiohttp.ClientSession() as s:
        await H.normal_latencies(s, st.url, 12)
        load = Load(s, st.url, workers=6)
        load.start()
        await asyncio.sleep(1.0)
        victim = st.sims[0]
        killed = time.monotonic()
        victim.kill()
        await asyncio.sleep(3.0)
        await load.stop()
        before = [r for r in load.sent_between(killed - 1.0, killed) if r[0] + r[2] < killed]
        after = load.sent_between(killed + 1.0, time.monotonic())
        assert before and all(status == 200 for _, status, _ in before)
        # Only the other engines are asked: a request routed to the dead one would fail.
        assert len(after) > 20 and all(status == 200 for _, status, _ in after), after
        pool = {w["worker"]: w for w in await st.epp.pool()}
        assert pool[victim.address]["reachable"] is False
        assert all(pool[e.address]["reachable"] for e in st.sims[1:])
        await H.until(st.idle, timeout=10, what="every booking released")
