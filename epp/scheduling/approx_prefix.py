"""GAIE's approximate prefix-cache index: where kvpick *sent* which prompt prefixes.

It does not listen to the engines; it remembers its own routing decisions (the
``prefix-cache-scorer`` of GAIE's default profile, specs/epp-protocol.md §10):

* **Blocks are characters, not tokens.** The request's ``prefix_text`` (bytes) is cut into
  blocks of ``block_size_tokens × 4`` bytes (a token is about four characters; 16 → 64
  bytes), at most ``max_prefix_blocks`` of them; a partial last block is dropped.
* **Chained hashes.** ``h0 = xxh64(model ‖ cache_salt)`` and
  ``h_i = xxh64(block_i ‖ LE_u64(h_{i−1}))`` (seed 0), so a block's hash names its whole
  prefix, and different models or salts never share entries. The index keys are
  ``h_1 … h_n``.
* **Per-worker LRU.** Each worker remembers at most ``lru_capacity_per_server`` hashes,
  least recently recorded evicted first; a reverse map ``hash → workers`` answers lookups.
* **Matching.** Walking the request's hashes in order, a worker's match is the number of
  leading hashes it holds without a gap; the walk stops at the first hash no candidate
  holds. The score is ``match / total blocks``.
* **Recording.** After a pick, :meth:`ApproxPrefixIndex.record` inserts (or refreshes) the
  request's hashes for the chosen worker. They are touched last block first, so the first
  block is the most recently used: the LRU then gives up a prefix's tail before its head,
  which keeps what is left matchable (a head without its tail still matches; a tail without
  its head never does).

Guarantees: every worker holds at most ``lru_capacity_per_server`` hashes; the reverse map
names a worker for a hash exactly when that worker's LRU holds it; a removed worker is in
neither.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

from epp.scheduling.types import SchedulingRequest, Worker

DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
CHARS_PER_TOKEN = 4

_xxh64 = xxhash.xxh64_intdigest
_pack_u64 = struct.Struct("<Q").pack


def prefix_hashes(
    model: str,
    cache_salt: str | None,
    text: bytes,
    block_chars: int,
    max_blocks: int,
) -> list[int]:
    """The chained block hashes of ``text`` (see the module docstring); empty when the text
    is shorter than one block."""
    count = min(len(text) // block_chars, max_blocks)
    if count <= 0:
        return []
    seed_bytes = model.encode("utf-8") + (cache_salt or "").encode("utf-8")
    previous = _xxh64(seed_bytes)
    hashes: list[int] = []
    append = hashes.append
    for start in range(0, count * block_chars, block_chars):
        previous = _xxh64(text[start : start + block_chars] + _pack_u64(previous))
        append(previous)
    return hashes


class ApproxPrefixIndex:
    """Which worker was last sent which prompt prefix, with per-worker LRU eviction."""

    def __init__(
        self,
        *,
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
        max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
    ) -> None:
        if block_size_tokens < 1:
            raise ValueError(f"block size must be >= 1 token, got {block_size_tokens}")
        if max_prefix_blocks < 1:
            raise ValueError(f"max prefix blocks must be >= 1, got {max_prefix_blocks}")
        if lru_capacity_per_server < 1:
            raise ValueError(f"LRU capacity must be >= 1, got {lru_capacity_per_server}")
        self.block_chars = block_size_tokens * CHARS_PER_TOKEN
        self.max_prefix_blocks = max_prefix_blocks
        self.capacity = lru_capacity_per_server
        self._lru: dict[Worker, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[Worker]] = {}

    def hashes(self, req: SchedulingRequest) -> list[int]:
        """The request's block hashes under this index's block size and limits."""
        return prefix_hashes(
            req.model, req.cache_salt, req.prefix_text, self.block_chars, self.max_prefix_blocks
        )

    def match(self, hashes: Sequence[int], workers: Iterable[Worker]) -> dict[Worker, int]:
        """Each worker's number of leading ``hashes`` held without a gap.

        Every worker of ``workers`` is in the result (0 when it holds none). The walk stops
        at the first hash none of ``workers`` still matching holds.
        """
        matched = dict.fromkeys(workers, 0)
        alive = set(matched)
        holders_of = self._holders
        depth = 0
        for h in hashes:
            holders = holders_of.get(h)
            still = alive.intersection(holders) if holders else set()
            if len(still) != len(alive):
                for worker in alive.difference(still):
                    matched[worker] = depth
                alive = still
            if not alive:
                return matched
            depth += 1
        for worker in alive:
            matched[worker] = depth
        return matched

    def record(self, req: SchedulingRequest, worker: Worker) -> None:
        """Record that ``req`` was sent to ``worker`` (the post-schedule hook)."""
        self.record_hashes(self.hashes(req), worker)

    def record_hashes(self, hashes: Sequence[int], worker: Worker) -> None:
        """Insert ``hashes`` for ``worker`` as its most recently used, evicting its least
        recently used hashes beyond capacity."""
        if not hashes:
            return
        lru = self._lru.get(worker)
        if lru is None:
            lru = self._lru[worker] = OrderedDict()
        holders_of = self._holders
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            holders = holders_of.get(h)
            if holders is None:
                holders_of[h] = {worker}
            else:
                holders.add(worker)
        while len(lru) > self.capacity:
            old, _ = lru.popitem(last=False)
            self._drop_holder(old, worker)

    def remove_worker(self, worker: Worker) -> None:
        """Forget everything recorded for ``worker``."""
        lru = self._lru.pop(worker, None)
        if lru is None:
            return
        for h in lru:
            self._drop_holder(h, worker)

    def size(self, worker: Worker | None = None) -> int:
        """Hashes held by ``worker``, or distinct hashes held by anyone when None."""
        if worker is None:
            return len(self._holders)
        lru = self._lru.get(worker)
        return 0 if lru is None else len(lru)

    def _drop_holder(self, h: int, worker: Worker) -> None:
        holders = self._holders[h]
        holders.discard(worker)
        if not holders:
            del self._holders[h]
