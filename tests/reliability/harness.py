"""The reliability suite's stack (bench/stack.py: every part its own process, the test
process only a client) and the traffic its tests send."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from bench.stack import (  # noqa: F401  (re-exported for the tests)
    BLOCK,
    ROOT,
    EppProcess,
    SimProcess,
    Stack,
    rss_bytes,
    stack,
    until,
)
from bench.words import WORDS

# ------------------------------------------------------------------------------ traffic


def chat(i: int, *, system: int = 0, words: int = 120, stream: bool = False) -> dict[str, Any]:
    """A normal chat request: one of a few shared system prompts and its own user turn
    (~1K tokens with the tiny tokenizer at the default length)."""
    sys_text = f"system {system}: " + " ".join(WORDS[(system + k) % len(WORDS)] for k in range(400))
    user = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))
    return {
        "model": "tiny",
        "max_tokens": 4,
        "stream": stream,
        "messages": [
            {"role": "system", "content": sys_text},
            {"role": "user", "content": f"question {i}: {user}"},
        ],
    }


async def timed_post(
    session: aiohttp.ClientSession, url: str, *, json_body: Any = None, data: Any = None
) -> tuple[int, float, bytes]:
    """(status, seconds, body) of one POST read to its end."""
    started = time.perf_counter()
    async with session.post(url, json=json_body, data=data) as resp:
        body = await resp.read()
        return resp.status, time.perf_counter() - started, body


async def normal_latencies(
    session: aiohttp.ClientSession, url: str, n: int, *, start: int = 0, gap: float = 0.0
) -> list[float]:
    """``n`` normal chat requests one after another; all must succeed."""
    out = []
    for i in range(n):
        status, seconds, body = await timed_post(
            session, url + "/v1/chat/completions", json_body=chat(start + i, system=i % 4)
        )
        assert status == 200, (status, body[:300])
        out.append(seconds)
        if gap:
            await asyncio.sleep(gap)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def env_without_pure() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "KVPICK_PURE_PYTHON"}
