"""cancel_and_wait: tasks end, and the caller's own cancellation is never swallowed."""

from __future__ import annotations

import asyncio

from epp.tasks import cancel_and_wait


async def test_cancels_and_waits_for_every_task() -> None:
    ended: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # cleanup that takes a moment
            ended.append(name)

    tasks = [asyncio.create_task(worker(n)) for n in "abc"]
    await asyncio.sleep(0)
    await cancel_and_wait(*tasks)
    assert sorted(ended) == ["a", "b", "c"]
    assert all(t.cancelled() for t in tasks)


async def test_a_cancelled_caller_stays_cancelled() -> None:
    """The caller is cancelled while the task it stops is still cleaning up: the caller
    must end, not carry on (the polling loop that hung a test did exactly that)."""
    rounds = 0

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)

    async def poller() -> None:
        nonlocal rounds
        for _ in range(3):  # bounded, so that a swallowed cancellation fails, not hangs
            rounds += 1
            inner = asyncio.create_task(slow_to_stop())
            await asyncio.sleep(0)
            await cancel_and_wait(inner)

    outer = asyncio.create_task(poller())
    await asyncio.sleep(0.05)  # the poller is now waiting for its inner task
    outer.cancel()
    done, _ = await asyncio.wait({outer}, timeout=2)
    assert outer in done, "the cancelled caller kept running"
    assert outer.cancelled()
    assert rounds == 1


async def test_nothing_to_do() -> None:
    await cancel_and_wait()
