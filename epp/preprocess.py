"""The preprocessing pool: where large requests are parsed and tokenized, off the event loop.

The event loop serves every ext_proc stream, so a request that takes milliseconds of CPU to
parse, render and tokenize would hold up every other request for that long. The director
sends requests whose bodies pass ``--offload-body-bytes`` here instead: a fixed number of
threads (``--preprocess-threads``) take them in arrival order, and the loop goes on
serving the others meanwhile.

Guarantees:

* **Bounded**: at most ``threads`` jobs run and ``queue`` wait; a job beyond that is refused
  at once with :class:`PoolFull` (the client gets 429 with ``retry-after``), counted in
  ``kvpick_request_limit_refusals_total{limit="preprocess_queue"}``.
* **A time budget per request**: ``timeout`` seconds from submission, waiting included. A job
  still queued when its time is up never starts; a running one is told through the
  :class:`~epp.token_budget.TokenBudget` it is given, which the encoders check as they go.
  The caller gets :class:`~epp.token_budget.DeadlineReached` once the budget is spent,
  whatever the thread is still doing (``limit="preprocess_timeout"``).
* **Cancellation**: cancelling :meth:`Preprocessor.run` (the client went away) cancels a
  queued job and tells a running one to stop at its next budget check.

Threads rather than processes: the tokenizers library releases the GIL while it encodes
text on its own, the word cache's work is short Python steps that the interpreter
interleaves with the loop's (the EPP lowers the switch interval so that the loop gets the
GIL back within a millisecond), and a thread shares the tokenizer's caches, where a process
would need its own copy and the body and token ids pickled both ways.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from epp import metrics as M
from epp.token_budget import DeadlineReached, TokenBudget

T = TypeVar("T")

DEFAULT_THREADS = 2
DEFAULT_QUEUE = 32
DEFAULT_TIMEOUT = 10.0


class PoolFull(Exception):
    """Every thread is busy and the queue is full."""


class Preprocessor:
    """A bounded thread pool with a time budget per job; see the module docstring."""

    def __init__(
        self,
        threads: int = DEFAULT_THREADS,
        queue: int = DEFAULT_QUEUE,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if threads < 1 or queue < 0:
            raise ValueError("a preprocessing pool needs at least one thread and a queue >= 0")
        self.threads = threads
        self.queue = queue
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kvpick-preprocess")
        self._jobs = 0  # submitted and not finished (running + queued); loop thread only
        self._running = 0  # touched by worker threads too
        self._lock = threading.Lock()

    @property
    def jobs(self) -> int:
        """Jobs running or waiting now."""
        return self._jobs

    async def run(self, fn: Callable[[TokenBudget], T]) -> T:
        """``fn(budget)`` in a pool thread; ``budget`` carries the deadline and the
        cancellation ``fn`` must honour (pass it to the tokenizer)."""
        if self._jobs >= self.threads + self.queue:
            M.LIMIT_REFUSALS.labels("preprocess_queue").inc()
            raise PoolFull(
                f"{self._jobs} large requests are being prepared or waiting; try again shortly"
            )
        loop = asyncio.get_running_loop()
        submitted = time.monotonic()
        deadline = None if self.timeout is None else submitted + self.timeout
        cancelled = threading.Event()
        budget = TokenBudget(None, deadline, cancelled)
        self._jobs += 1
        self._update_gauges()
        fut = loop.run_in_executor(self._executor, self._call, fn, budget)
        try:
            if deadline is None:
                return await fut
            try:
                # The thread cannot be interrupted: shield it, stop waiting, and let the
                # budget it checks stop it.
                async with asyncio.timeout(deadline - time.monotonic()):
                    return await asyncio.shield(fut)
            except TimeoutError:
                raise DeadlineReached(
                    f"preparing the request took longer than {self.timeout:g} seconds"
                ) from None
        except DeadlineReached:
            M.LIMIT_REFUSALS.labels("preprocess_timeout").inc()
            raise
        finally:
            cancelled.set()  # a job still running stops at its next check
            self._jobs -= 1
            self._update_gauges()
            M.PREPROCESS_DURATION.observe(time.monotonic() - submitted)

    def _call(self, fn: Callable[[TokenBudget], T], budget: TokenBudget) -> T:
        budget.check(0)  # its time may have run out in the queue, or its client gone
        with self._lock:
            self._running += 1
        try:
            return fn(budget)
        finally:
            with self._lock:
                self._running -= 1

    def _update_gauges(self) -> None:
        running = min(self._jobs, self.threads)
        M.PREPROCESS_JOBS.labels("running").set(running)
        M.PREPROCESS_JOBS.labels("queued").set(self._jobs - running)

    def close(self) -> None:
        """Stop taking jobs; queued ones are dropped, running ones finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
