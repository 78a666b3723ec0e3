"""Polls every model server's ``/metrics`` and keeps each dp rank's latest load figures.

:class:`MetricsScraper` runs one asyncio task per endpoint. Guarantees:

* **One poll at a time per endpoint**: a task awaits its poll before scheduling the next,
  so a slow server is never hit by overlapping requests. Polls start every ``interval``
  seconds (a poll that overruns is followed at once by the next, never by a burst), and
  each is bounded by ``timeout`` seconds end to end.
* **Cheap on the event loop**: all endpoints share one ``aiohttp.ClientSession`` (one
  keep-alive connection per endpoint, reused across polls), responses are asked for
  uncompressed plain text, and only the engine's wanted sample names are parsed
  (:func:`epp.datalayer.prom_text.parse`).
* **Reachability**: :meth:`MetricsScraper.unreachable` says whether an endpoint's latest
  poll failed to reach it (connection refused or reset, timeout); request handling leaves
  such endpoints out of the candidates until a poll reaches them again (failing polls are
  retried at least every ``max_backoff`` seconds, 1 s by default).
* **Failures keep the last good values**: a connection error, timeout, non-200 status,
  body over ``max_body_bytes`` or a body without the engine's metrics counts in
  ``kvpick_metrics_scrape_errors_total{reason}`` and leaves each rank's previous values in
  place; so does a good scrape for a rank it has nothing usable for. Values turn
  ``stale`` once their scrape is older than ``staleness`` seconds. A failing endpoint is
  retried with a backoff that doubles from ``interval`` up to ``max_backoff``.
* **Optional hook**: ``on_update(address, {rank: EndpointMetrics})`` runs after every good
  scrape; an exception from it is logged (once per run of failures) and polling goes on.
* **Quiet logs**: an endpoint's failure is logged when its state changes (ok → failing,
  one failure reason → another, failing → ok), not on every poll.
* **Prompt removal and clean shutdown**: :meth:`MetricsScraper.remove_endpoint` cancels the
  endpoint's task at once (a cancelled poll never writes values); :meth:`MetricsScraper.close`
  cancels and awaits every task and closes the session.

All methods are called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import Counter

from epp.datalayer import engine_metrics, prom_text
from epp.scheduling.types import EndpointMetrics, Worker

log = logging.getLogger(__name__)

_REASONS = ("connect", "timeout", "http_status", "too_large", "no_metrics", "internal")
SCRAPE_ERRORS = Counter(
    "kvpick_metrics_scrape_errors",
    "Model-server /metrics polls that produced no usable values, by reason ("
    + ", ".join(_REASONS)
    + ").",
    ["reason"],
)
# Exported at 0 from the start, so a rate() over a reason works before its first failure.
for _reason in _REASONS:
    SCRAPE_ERRORS.labels(_reason)

# Plain text v0.0.4: a prometheus_client server would otherwise pick OpenMetrics or gzip by
# content negotiation; compressing a body 20 times a second on both ends buys nothing on a
# cluster network.
_HEADERS = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}
_OK = "ok"
_UNREACHABLE = frozenset({"connect", "timeout"})

UpdateHook = Callable[[str, dict[int, EndpointMetrics]], None]
"""Called after each good scrape with the endpoint address and its ranks' new values."""


@dataclass(eq=False, slots=True)
class _Endpoint:
    address: str
    url: str
    engine: str
    dp_size: int
    wanted: frozenset[str]
    values: dict[int, EndpointMetrics] = field(default_factory=dict)
    state: str = "new"
    task: asyncio.Task[None] | None = None
    hook_failed: bool = False


class _ScrapeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class MetricsScraper:
    """Keeps each registered endpoint's per-rank :class:`EndpointMetrics` current."""

    def __init__(
        self,
        *,
        interval: float = 0.05,
        timeout: float = 10.0,
        staleness: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_backoff: float = 1.0,
        max_body_bytes: int = 8 << 20,
        on_update: UpdateHook | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0 or staleness <= 0:
            raise ValueError("interval, timeout and staleness must be positive")
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._staleness = staleness
        self._clock = clock
        self._max_backoff = max(max_backoff, interval)
        self._max_body = max_body_bytes
        self._on_update = on_update
        self._endpoints: dict[str, _Endpoint] = {}
        self._session: aiohttp.ClientSession | None = None
        # Cancelled tasks not yet finished, so close() can await them too.
        self._retired: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- registration ---------------------------------------------------------------------

    def set_endpoint(self, address: str, url: str, engine: str, dp_size: int = 1) -> None:
        """Poll ``url`` for ``address`` (its ``dp_size`` ranks), replacing an earlier entry.

        Re-registering with the same url, engine and dp_size changes nothing. Otherwise the
        old poll task is cancelled and a new one started; the last values of ranks below the
        new ``dp_size`` are kept until the new source reports. ValueError for an unknown
        engine or a dp_size below 1; RuntimeError after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("MetricsScraper is closed")
        if dp_size < 1:
            raise ValueError(f"dp_size must be at least 1, got {dp_size}")
        wanted = engine_metrics.wanted_names(engine)
        old = self._endpoints.get(address)
        if old is not None:
            if (old.url, old.engine, old.dp_size) == (url, engine, dp_size):
                return
            self._retire(old)
        entry = _Endpoint(address, url, engine, dp_size, wanted)
        if old is not None:
            entry.values = {rank: m for rank, m in old.values.items() if rank < dp_size}
        self._endpoints[address] = entry
        if self._session is not None:
            self._launch(entry)

    def remove_endpoint(self, address: str) -> None:
        """Stop polling ``address`` now and forget its values (unknown addresses are fine)."""
        entry = self._endpoints.pop(address, None)
        if entry is not None:
            self._retire(entry)

    def endpoints(self) -> list[str]:
        """The registered addresses."""
        return list(self._endpoints)

    # -- reading --------------------------------------------------------------------------

    def get(self, worker: Worker) -> EndpointMetrics | None:
        """The last good values for ``(address, dp rank)``; None if that rank has never been
        scraped successfully (or the endpoint is not registered). ``stale`` is True when
        those values are older than the staleness threshold."""
        entry = self._endpoints.get(worker[0])
        if entry is None:
            return None
        metrics = entry.values.get(worker[1])
        if metrics is None:
            return None
        if self._clock() - metrics.scraped_at > self._staleness:
            return dataclasses.replace(metrics, stale=True)
        return metrics

    def unreachable(self, address: str) -> bool:
        """Whether the endpoint's latest poll could not reach it at all (connection refused
        or reset, or no answer in time): a server that is down, whose requests would fail.
        An endpoint never polled yet, or answering with errors or odd metrics, is not."""
        entry = self._endpoints.get(address)
        return entry is not None and entry.state in _UNREACHABLE

    def state(self, address: str) -> str | None:
        """``"new"`` before the first poll ends, ``"ok"`` after a good one, else the reason
        of the latest failure; None for an unknown address."""
        entry = self._endpoints.get(address)
        return None if entry is None else entry.state

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and start polling every registered endpoint."""
        if self._closed:
            raise RuntimeError("MetricsScraper is closed")
        if self._session is not None:
            return
        # No pool-wide connection cap: each endpoint's task holds at most one connection,
        # and a cap would make endpoints wait on each other.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=_HEADERS
        )
        for entry in self._endpoints.values():
            self._launch(entry)

    async def close(self) -> None:
        """Cancel and await every poll task, then close the session. Idempotent."""
        self._closed = True
        for entry in self._endpoints.values():
            self._retire(entry)
        tasks = list(self._retired)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retired.difference_update(tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- polling --------------------------------------------------------------------------

    def _launch(self, entry: _Endpoint) -> None:
        entry.task = asyncio.get_running_loop().create_task(
            self._run(entry), name=f"metrics-scrape {entry.address}"
        )

    def _retire(self, entry: _Endpoint) -> None:
        task, entry.task = entry.task, None
        if task is None or task.done():
            return
        task.cancel()
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _run(self, entry: _Endpoint) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        failures = 0
        while True:
            try:
                ok = await self._poll(entry)
            except Exception as exc:
                # A bug must not end the endpoint's polling for good; counted and logged
                # like any other failure (once per state change).
                self._failed(entry, "internal", repr(exc), exc_info=True)
                ok = False
            now = loop.time()
            if ok:
                failures = 0
                # Fixed rate while healthy; a poll that overran its slot is not made up for.
                due = max(due + self._interval, now)
            else:
                due = now + min(self._interval * (1 << min(failures, 20)), self._max_backoff)
                failures += 1
            await asyncio.sleep(due - now)

    async def _poll(self, entry: _Endpoint) -> bool:
        """One scrape of ``entry``; True when it produced values."""
        try:
            text = await self._fetch(entry.url)
        except _ScrapeError as exc:
            self._failed(entry, exc.reason, str(exc))
            return False
        scraped_at = self._clock()
        parsed = prom_text.parse(text, entry.wanted)
        values = engine_metrics.extract(
            entry.engine,
            parsed.samples,
            entry.dp_size,
            scraped_at=scraped_at,
            previous=entry.values,
        )
        if not values:
            self._failed(
                entry,
                "no_metrics",
                f"no {entry.engine} load metrics in the response "
                f"({len(parsed.samples)} wanted samples, {parsed.bad_lines} unreadable lines)",
            )
            return False
        entry.values.update(values)
        if entry.state != _OK:
            if entry.state != "new":
                log.info("metrics scrape of %s (%s) recovered", entry.address, entry.url)
            entry.state = _OK
        if self._on_update is not None:
            self._notify(entry, values)
        return True

    async def _fetch(self, url: str) -> str:
        session = self._session
        assert session is not None
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise _ScrapeError("http_status", f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > self._max_body:
                        raise _ScrapeError("too_large", f"body over {self._max_body} bytes")
        except TimeoutError:
            raise _ScrapeError(
                "timeout", f"no complete response in {self._timeout.total}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _ScrapeError("connect", f"{type(exc).__name__}: {exc}") from None
        # Garbage bytes become replacement characters, which no wanted line matches.
        return body.decode("utf-8", errors="replace")

    def _failed(
        self, entry: _Endpoint, reason: str, detail: str, *, exc_info: bool = False
    ) -> None:
        SCRAPE_ERRORS.labels(reason).inc()
        if entry.state != reason:
            log.warning(
                "metrics scrape of %s (%s) failing: %s (%s); keeping its last values",
                entry.address,
                entry.url,
                reason,
                detail,
                exc_info=exc_info,
            )
            entry.state = reason

    def _notify(self, entry: _Endpoint, values: dict[int, EndpointMetrics]) -> None:
        assert self._on_update is not None
        try:
            self._on_update(entry.address, values)
        except Exception:
            # Log the first failure only: the hook runs 20 times a second per endpoint.
            if not entry.hook_failed:
                log.exception("metrics on_update hook failed for %s", entry.address)
                entry.hook_failed = True
        else:
            entry.hook_failed = False
