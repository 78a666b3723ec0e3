"""ActiveLoad (epp/scheduling/load.py): exact-once release on every path, against a model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from epp.scheduling.load import ActiveLoad, Booking
from epp.scheduling.types import LoadView

W1, W2, W3 = ("10.0.0.1:8000", 0), ("10.0.0.1:8000", 1), ("10.0.0.2:8000", 0)
WORKERS = (W1, W2, W3)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_book_prefill_done_free() -> None:
    load = ActiveLoad(clock=FakeClock())
    b = load.book("r1", W1, [1, 2, 3], prompt_tokens=48, cached_tokens=16)
    assert load.view(W1) == LoadView(prefill_tokens=32, decode_blocks=3, requests=1)
    assert load.prefill_done(b)
    assert not load.prefill_done(b)
    assert load.view(W1) == LoadView(prefill_tokens=0, decode_blocks=3, requests=1)
    assert load.free(b)
    assert not load.free(b)
    assert load.view(W1) == LoadView()
    assert len(load) == 0


def test_shared_blocks_are_ref_counted() -> None:
    load = ActiveLoad(clock=FakeClock())
    a = load.book("a", W1, [1, 2, 3], 48, 0)
    b = load.book("b", W1, [1, 2, 4, 4], 64, 32)  # duplicate key counted once
    assert load.view(W1).decode_blocks == 4
    assert load.new_blocks(W1, [1, 2, 5, 6, 6]) == 2  # 5 and 6
    assert load.new_blocks(W1, {1, 9}) == 1
    assert load.new_blocks(W2, [1, 2, 2]) == 2
    load.free(a)
    assert load.view(W1).decode_blocks == 3  # 1, 2 still held by b
    assert load.new_blocks(W1, [3]) == 1
    load.free(b)
    assert load.view(W1) == LoadView()


def test_prefill_false_books_decode_side_only() -> None:
    load = ActiveLoad(clock=FakeClock())
    b = load.book("r", W2, [7, 8], 32, 0, prefill=False)
    assert load.view(W2) == LoadView(prefill_tokens=0, decode_blocks=2, requests=1)
    assert not load.prefill_done(b)
    assert load.free(b)
    assert load.view(W2) == LoadView()


def test_free_releases_pending_prefill() -> None:
    load = ActiveLoad(clock=FakeClock())
    b = load.book("r", W1, [1], 100, 20)
    load.book("s", W1, [2], 10, 0)
    load.free(b)
    assert load.view(W1) == LoadView(prefill_tokens=10, decode_blocks=1, requests=1)


def test_cached_beyond_prompt_books_no_negative_prefill() -> None:
    load = ActiveLoad(clock=FakeClock())
    load.book("r", W1, [1], 16, 64)
    assert load.view(W1).prefill_tokens == 0


def test_expiry_releases_old_bookings_oldest_first() -> None:
    clock = FakeClock()
    load = ActiveLoad(expiry_s=300, clock=clock)
    old = load.book("old", W1, [1], 10, 0)
    clock.t += 100
    mid = load.book("mid", W2, [2], 10, 0)
    clock.t += 100
    young = load.book("young", W1, [3], 10, 0)
    assert load.expire(now=clock.t) == []
    assert load.expire(now=old.created_at + 300) == []  # exactly expiry_s old: kept
    assert load.expire(now=mid.created_at + 300.5) == [old, mid]
    assert not old.active and not mid.active and young.active
    assert not load.free(old)
    assert load.view(W2) == LoadView()
    assert load.view(W1) == LoadView(prefill_tokens=10, decode_blocks=1, requests=1)
    clock.t = young.created_at + 301
    assert load.expire() == [young]
    assert len(load) == 0


def test_expiry_order_survives_a_clock_going_backwards() -> None:
    clock = FakeClock(500.0)
    load = ActiveLoad(expiry_s=10, clock=clock)
    first = load.book("a", W1, [1], 1, 0)
    clock.t = 400.0  # a misbehaving clock: clamped to the previous reading
    second = load.book("b", W1, [2], 1, 0)
    assert second.created_at == first.created_at
    assert load.expire(now=511.0) == [first, second]


def test_move_rebooks_on_the_served_worker() -> None:
    clock = FakeClock()
    load = ActiveLoad(clock=clock)
    b = load.book("r", W1, [1, 2], 64, 32)
    created = b.created_at
    clock.t += 5
    assert load.move(b, W3)
    assert b.worker == W3 and b.created_at == created
    assert load.view(W1) == LoadView()
    assert load.view(W3) == LoadView(prefill_tokens=32, decode_blocks=2, requests=1)
    assert not load.move(b, W3)
    assert load.move(b, W2, cached_tokens=0)
    assert load.view(W2) == LoadView(prefill_tokens=64, decode_blocks=2, requests=1)
    load.prefill_done(b)
    assert load.move(b, W1, cached_tokens=0)  # prefill already done: stays done
    assert load.view(W1) == LoadView(prefill_tokens=0, decode_blocks=2, requests=1)
    assert load.free(b)
    assert not load.move(b, W2)
    assert all(load.view(w) == LoadView() for w in WORKERS)


def test_remove_worker_makes_handles_inert() -> None:
    load = ActiveLoad(clock=FakeClock())
    gone = [load.book(f"r{i}", W1, [i, 100], 10, 0) for i in range(3)]
    kept = load.book("k", W2, [100], 10, 0)
    assert set(load.remove_worker(W1)) == set(gone)
    assert load.remove_worker(W1) == []
    assert len(load) == 1
    for b in gone:
        assert not b.active
        assert not load.free(b)
        assert not load.prefill_done(b)
        assert not load.move(b, W2)
    assert load.view(W1) == LoadView()
    assert load.view(W2) == LoadView(prefill_tokens=10, decode_blocks=1, requests=1)
    assert load.expire(now=1e9) == [kept]


def test_invalid_expiry_rejected() -> None:
    with pytest.raises(ValueError):
        ActiveLoad(expiry_s=0)


@dataclass
class ModelBooking:
    worker: tuple[str, int]
    keys: frozenset[int]
    prompt: int
    pending: int  # prefill tokens still booked (0 when done or never booked)
    created: float


EXPIRY = 50.0


class ActiveLoadMachine(RuleBasedStateMachine):
    """Random interleavings of every operation; the model is a plain dict of live bookings
    from which each worker's expected view is recomputed from scratch."""

    bookings = Bundle("bookings")

    @initialize()
    def setup(self) -> None:
        self.clock = FakeClock()
        self.load = ActiveLoad(expiry_s=EXPIRY, clock=self.clock)
        self.live: dict[int, tuple[Booking, ModelBooking]] = {}
        self.counter = 0

    def expected(self, worker: tuple[str, int]) -> LoadView:
        mine = [m for _, m in self.live.values() if m.worker == worker]
        keys: set[int] = set()
        for m in mine:
            keys |= m.keys
        return LoadView(
            prefill_tokens=sum(m.pending for m in mine),
            decode_blocks=len(keys),
            requests=len(mine),
        )

    @rule(
        target=bookings,
        worker=st.sampled_from(WORKERS),
        keys=st.lists(st.integers(min_value=0, max_value=12), max_size=8),
        prompt=st.integers(min_value=0, max_value=200),
        cached=st.integers(min_value=0, max_value=250),
        prefill=st.booleans(),
    )
    def book(
        self, worker: tuple[str, int], keys: list[int], prompt: int, cached: int, prefill: bool
    ) -> Booking:
        self.counter += 1
        b = self.load.book(f"r{self.counter}", worker, keys, prompt, cached, prefill=prefill)
        pending = max(0, prompt - cached) if prefill else 0
        self.live[id(b)] = (b, ModelBooking(worker, frozenset(keys), prompt, pending, self.clock.t))
        return b

    @rule(b=bookings)
    def prefill_done(self, b: Booking) -> None:
        entry = self.live.get(id(b))
        was_pending = entry is not None and b.prefill_pending
        assert self.load.prefill_done(b) == was_pending
        if entry is not None:
            entry[1].pending = 0

    @rule(b=bookings)
    def free(self, b: Booking) -> None:
        assert self.load.free(b) == (id(b) in self.live)
        self.live.pop(id(b), None)
        assert not b.active

    @rule(
        b=bookings,
        worker=st.sampled_from(WORKERS),
        cached=st.none() | st.integers(min_value=0, max_value=250),
    )
    def move(self, b: Booking, worker: tuple[str, int], cached: int | None) -> None:
        entry = self.live.get(id(b))
        moved = self.load.move(b, worker, cached_tokens=cached)
        assert moved == (entry is not None and entry[1].worker != worker)
        if moved:
            m = entry[1]
            m.worker = worker
            if cached is not None and b.prefill_pending:
                m.pending = max(0, m.prompt - cached)

    @rule(dt=st.floats(min_value=0, max_value=40))
    def tick_and_expire(self, dt: float) -> None:
        self.clock.t += dt
        cutoff = self.clock.t - EXPIRY
        due = {k for k, (_, m) in self.live.items() if m.created < cutoff}
        expired = self.load.expire()
        assert {id(b) for b in expired} == due
        created = [b.created_at for b in expired]
        assert created == sorted(created)
        for k in due:
            del self.live[k]

    @rule(worker=st.sampled_from(WORKERS))
    def remove_worker(self, worker: tuple[str, int]) -> None:
        mine = {k for k, (_, m) in self.live.items() if m.worker == worker}
        removed = self.load.remove_worker(worker)
        assert {id(b) for b in removed} == mine
        for k in mine:
            del self.live[k]

    @rule(worker=st.sampled_from(WORKERS), keys=st.lists(st.integers(0, 14), max_size=8))
    def check_new_blocks(self, worker: tuple[str, int], keys: list[int]) -> None:
        active: set[int] = set()
        for _, m in self.live.values():
            if m.worker == worker:
                active |= m.keys
        assert self.load.new_blocks(worker, keys) == len(set(keys) - active)

    @invariant()
    def views_match_model(self) -> None:
        for worker in WORKERS:
            view = self.load.view(worker)
            assert view == self.expected(worker)
            assert view.prefill_tokens >= 0 and view.decode_blocks >= 0 and view.requests >= 0
        assert len(self.load) == len(self.live)

    def teardown(self) -> None:
        if not hasattr(self, "load"):
            return
        for b, _ in list(self.live.values()):
            assert self.load.free(b)
        for worker in WORKERS:
            assert self.load.view(worker) == LoadView()
        assert len(self.load) == 0


ActiveLoadMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestActiveLoadMachine = ActiveLoadMachine.TestCase
