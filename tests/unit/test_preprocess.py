"""The preprocessing pool: bounded, timed, cancellable, and off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import REGISTRY

from epp.preprocess import PoolFull, Preprocessor
from epp.token_budget import DeadlineReached, TokenBudget


def refusals(limit: str) -> float:
    return REGISTRY.get_sample_value("kvpick_request_limit_refusals_total", {"limit": limit}) or 0


async def test_jobs_run_in_threads_while_the_loop_goes_on():
    pool = Preprocessor(threads=1, queue=1, timeout=5)
    release = threading.Event()
    seen: list[str] = []

    def job(budget: TokenBudget) -> str:
        seen.append(threading.current_thread().name)
        release.wait(2)
        return "done"

    task = asyncio.ensure_future(pool.run(job))
    ticks = 0
    while not seen:
        await asyncio.sleep(0.001)
        ticks += 1
    assert pool.jobs == 1
    release.set()
    assert await task == "done"
    assert seen[0].startswith("kvpick-preprocess")
    assert pool.jobs == 0
    pool.close()


async def test_a_full_pool_refuses_at_once():
    pool = Preprocessor(threads=1, queue=1, timeout=5)
    release = threading.Event()
    before = refusals("preprocess_queue")
    running = [asyncio.ensure_future(pool.run(lambda b: release.wait(2))) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(PoolFull):
        await pool.run(lambda b: None)
    assert refusals("preprocess_queue") == before + 1
    release.set()
    await asyncio.gather(*running)
    pool.close()


async def test_a_job_past_its_time_is_answered_and_told_to_stop():
    pool = Preprocessor(threads=1, queue=4, timeout=0.1)
    stopped = threading.Event()
    before = refusals("preprocess_timeout")

    def slow(budget: TokenBudget) -> None:
        while True:  # a long encoding, checking its budget as the encoders do
            try:
                budget.check(0)
            except DeadlineReached:
                stopped.set()
                raise
            time.sleep(0.005)

    started = time.monotonic()
    with pytest.raises(DeadlineReached):
        await pool.run(slow)
    assert time.monotonic() - started < 0.5
    assert await asyncio.to_thread(stopped.wait, 2)
    assert refusals("preprocess_timeout") == before + 1
    # A job that waited in the queue past its time never starts.
    ran = []
    blocker = asyncio.ensure_future(pool.run(lambda b: time.sleep(0.2)))
    await asyncio.sleep(0.01)
    with pytest.raises(DeadlineReached):
        await pool.run(lambda b: ran.append(1))
    await asyncio.gather(blocker, return_exceptions=True)
    await asyncio.sleep(0.05)
    assert ran == []
    pool.close()


async def test_cancelling_the_caller_cancels_the_job():
    pool = Preprocessor(threads=1, queue=1, timeout=5)
    told = threading.Event()

    def job(budget: TokenBudget) -> None:
        while not (budget.cancelled is not None and budget.cancelled.is_set()):
            time.sleep(0.005)
        told.set()

    task = asyncio.ensure_future(pool.run(job))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(told.wait, 2)
    assert pool.jobs == 0
    pool.close()
