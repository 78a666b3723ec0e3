"""Booked load: what kvpick has routed to each worker and not yet seen finish.

This is Dynamo's active-sequence bookkeeping (specs/routing-and-disagg.md §2), kept per
worker ``(endpoint, dp rank)``:

* **decode side** — the request's unique block keys are reference-counted in the worker's
  active set, so requests sharing a prefix count its blocks once; ``decode_blocks`` is the
  size of that set;
* **prefill side** — ``prompt_tokens - cached_tokens`` of the request is added to the
  worker's ``prefill_tokens`` until :meth:`ActiveLoad.prefill_done` (the first response
  byte), or until the booking is released, whichever comes first;
* ``requests`` counts the worker's live bookings.

Every booking is a :class:`Booking` handle. The guarantee the rest of kvpick relies on:
**a booking is released exactly once on every path** — :meth:`ActiveLoad.free` on the
first call, :meth:`ActiveLoad.expire` after ``expiry_s`` without completion, or
:meth:`ActiveLoad.remove_worker` when its worker leaves. After any of those the handle is
inert: freeing it again, marking its prefill done or moving it does nothing. Consequently no
count ever goes negative, and once every booking is released every worker's view is zero.

Expiry walks bookings oldest first and stops at the first young one, so its cost is the
number expired, not the number booked. Bookings are kept in creation order, and creation
times never decrease (a clock reading earlier than the previous one is clamped to it), so
creation order is also time order even with an injected clock.

Not thread-safe: use it from the event loop that schedules.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from epp.scheduling.types import LoadView, Worker

DEFAULT_EXPIRY_S = 300.0
"""Dynamo's ``DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS``."""

_ZERO = LoadView()


@dataclass(eq=False, slots=True)
class Booking:
    """One request's booked load on one worker (a handle; compared by identity).

    ``keys`` are the request's unique block keys, in prompt order. ``prefill_tokens`` is
    what the booking adds to its worker's prefill load while ``prefill_pending``.
    ``active`` turns False when the booking is released, whichever way; it never turns
    back.
    """

    request_id: str
    worker: Worker
    keys: tuple[int, ...]
    prompt_tokens: int
    prefill_tokens: int
    created_at: float
    prefill_pending: bool
    active: bool = True


@dataclass(slots=True)
class _WorkerLoad:
    """Invariants: ``refs`` maps each key to the number of live bookings here holding it
    (always >= 1); ``prefill_tokens`` is the sum of ``prefill_tokens`` over the bookings
    here with prefill pending; ``bookings`` holds exactly the live bookings on this worker.
    """

    refs: dict[int, int] = field(default_factory=dict)
    prefill_tokens: int = 0
    bookings: dict[Booking, None] = field(default_factory=dict)


class ActiveLoad:
    """Per-worker booked load; see the module docstring for the guarantees."""

    def __init__(
        self,
        *,
        expiry_s: float = DEFAULT_EXPIRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if expiry_s <= 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s}")
        self.expiry_s = expiry_s
        self._clock = clock
        self._workers: dict[Worker, _WorkerLoad] = {}
        # Live bookings in creation order (= time order, see the module docstring).
        self._live: OrderedDict[Booking, None] = OrderedDict()
        self._last_time = float("-inf")

    def __len__(self) -> int:
        """The number of live bookings."""
        return len(self._live)

    def book(
        self,
        request_id: str,
        worker: Worker,
        block_keys: Iterable[int],
        prompt_tokens: int,
        cached_tokens: int,
        *,
        prefill: bool = True,
    ) -> Booking:
        """Book a request on ``worker`` and return its handle.

        The request's unique ``block_keys`` join the worker's active set; with ``prefill``
        (the default), ``max(0, prompt_tokens - cached_tokens)`` joins its prefill load until
        :meth:`prefill_done`. ``prefill=False`` books the decode side only: the decode worker
        of a disaggregated request, whose prefill runs on another worker.
        """
        now = self._clock()
        if now < self._last_time:
            now = self._last_time
        self._last_time = now
        booking = Booking(
            request_id=request_id,
            worker=worker,
            keys=tuple(dict.fromkeys(block_keys)),
            prompt_tokens=prompt_tokens,
            prefill_tokens=max(0, prompt_tokens - cached_tokens) if prefill else 0,
            created_at=now,
            prefill_pending=prefill,
        )
        self._attach(booking)
        self._live[booking] = None
        return booking

    def prefill_done(self, booking: Booking) -> bool:
        """The request's prefill finished: take its tokens off the worker's prefill load.

        Returns True the first time on a live booking with prefill pending, else False
        (and changes nothing).
        """
        if not (booking.active and booking.prefill_pending):
            return False
        booking.prefill_pending = False
        self._workers[booking.worker].prefill_tokens -= booking.prefill_tokens
        return True

    def free(self, booking: Booking) -> bool:
        """Release a booking: its blocks, its pending prefill tokens and its request slot.

        Returns True when this call released it; False when it was already released (freed,
        expired, or its worker removed), in which case nothing changes.
        """
        if not booking.active:
            return False
        self._detach(booking)
        booking.active = False
        del self._live[booking]
        return True

    def move(self, booking: Booking, worker: Worker, *, cached_tokens: int | None = None) -> bool:
        """Re-book a live booking on ``worker`` (the gateway served the request elsewhere).

        The booking keeps its handle, its creation time (expiry still counts from the first
        booking) and its prefill state. A pending prefill keeps its token count unless
        ``cached_tokens`` — the cache hit on the new worker — is given. Returns False (and
        does nothing) for a released booking or when ``worker`` is already its worker.
        """
        if not booking.active or booking.worker == worker:
            return False
        self._detach(booking)
        if cached_tokens is not None and booking.prefill_pending:
            booking.prefill_tokens = max(0, booking.prompt_tokens - cached_tokens)
        booking.worker = worker
        self._attach(booking)
        return True

    def view(self, worker: Worker) -> LoadView:
        """The worker's booked load now (all zero for a worker with no live booking)."""
        state = self._workers.get(worker)
        if state is None:
            return _ZERO
        return LoadView(
            prefill_tokens=state.prefill_tokens,
            decode_blocks=len(state.refs),
            requests=len(state.bookings),
        )

    def new_blocks(self, worker: Worker, block_keys: Iterable[int]) -> int:
        """How many of the request's unique ``block_keys`` are not in the worker's active set.

        Pass a ``set`` or ``frozenset`` to skip de-duplicating the keys on every call.
        """
        unique = block_keys if isinstance(block_keys, set | frozenset) else set(block_keys)
        state = self._workers.get(worker)
        if state is None:
            return len(unique)
        return len(unique.difference(state.refs))

    def expire(self, now: float | None = None) -> list[Booking]:
        """Release and return the live bookings older than ``expiry_s`` (oldest first).

        Costs O(expired): bookings are walked in creation order and the walk stops at the
        first one young enough to keep.
        """
        if now is None:
            now = self._clock()
        cutoff = now - self.expiry_s
        expired: list[Booking] = []
        live = self._live
        while live:
            oldest = next(iter(live))
            if oldest.created_at >= cutoff:
                break
            self.free(oldest)
            expired.append(oldest)
        return expired

    def remove_worker(self, worker: Worker) -> list[Booking]:
        """Drop a worker and release all its live bookings; their handles become inert.

        Returns the bookings released (empty when the worker had none).
        """
        state = self._workers.pop(worker, None)
        if state is None:
            return []
        released = list(state.bookings)
        for booking in released:
            booking.active = False
            del self._live[booking]
        return released

    def _attach(self, booking: Booking) -> None:
        state = self._workers.get(booking.worker)
        if state is None:
            state = self._workers[booking.worker] = _WorkerLoad()
        refs = state.refs
        get = refs.get
        for key in booking.keys:
            refs[key] = get(key, 0) + 1
        if booking.prefill_pending:
            state.prefill_tokens += booking.prefill_tokens
        state.bookings[booking] = None

    def _detach(self, booking: Booking) -> None:
        state = self._workers[booking.worker]
        refs = state.refs
        for key in booking.keys:
            left = refs[key] - 1
            if left:
                refs[key] = left
            else:
                del refs[key]
        if booking.prefill_pending:
            state.prefill_tokens -= booking.prefill_tokens
        del state.bookings[booking]
        if not state.bookings:
            # An idle worker keeps no state, so workers that come and go leave nothing
            # behind; view() of an unknown worker is zero anyway.
            del self._workers[booking.worker]
