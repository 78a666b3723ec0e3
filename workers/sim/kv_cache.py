"""The simulator's paged KV cache: fixed blocks, prefix caching by hash chain, LRU eviction.

It behaves like vLLM's block pool as far as anyone outside can tell:

* a block is cached (findable by later requests, announced with ``BlockStored``) once it is
  full; partial blocks are never cached or announced;
* a block nobody references stays cached in an LRU free list; allocating a new block takes
  the least recently freed one and, if it was cached, announces ``BlockRemoved`` for it
  (one hash per event, as vLLM does);
* a sequence's blocks are released last-block-first, so a sequence's tail is evicted before
  its head; blocks holding no cached content go to the front of the free list;
* ``reset`` empties the prefix cache (``AllBlocksCleared``) only when no block is in use.

One deliberate difference: when a block fills with content another block already caches
(two requests with the same new prefix in flight at once), the sequence switches to the
cached block and frees its own copy, which is neither cached nor announced. vLLM may hold
both copies; here the cache's contents and the events always agree one to one (what
subscribers are tested against), and a cached parent can never be evicted while a running
sequence extends it, so every announced block's parent is in the cache.

Events accumulate in :attr:`KvCache.events` until the engine drains them once per step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.kvevents.types import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from workers.sim.engine_hash import BlockHasher, event_value


@dataclass(slots=True)
class SeqKv:
    """One sequence's hold on the cache: its blocks in order and the digests of those that
    are full (``digests[i]`` belongs to ``blocks[i]``)."""

    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    hit_blocks: int = 0


class KvCache:
    """``num_blocks`` blocks of ``block_size`` tokens (see the module docstring)."""

    def __init__(
        self, num_blocks: int, block_size: int, hasher: BlockHasher, medium: str = "GPU"
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hasher = hasher
        self.medium = medium
        self._ref = [0] * num_blocks
        self._digest: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.events: list[KvEvent] = []
        self.query_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0

    # ------------------------------------------------------------------ views

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a running sequence (vLLM's kv cache usage)."""
        return self.used_blocks / self.num_blocks

    def cached_hashes(self) -> set[int]:
        """The event values of every cached block: what a subscriber's index should hold."""
        return {event_value(d) for d in self._cached}

    def match(self, digests: Sequence[bytes], limit: int | None = None) -> int:
        """How many leading blocks of ``digests`` are cached, at most ``limit`` (no side
        effect)."""
        n = 0
        for d in digests if limit is None else digests[:limit]:
            if d not in self._cached:
                break
            n += 1
        return n

    def blocks_needed(self, seq: SeqKv, num_tokens: int) -> int:
        """New blocks ``seq`` needs to hold ``num_tokens`` tokens."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.blocks))

    # -------------------------------------------------------------- changes

    def admit(self, seq: SeqKv, prompt_digests: Sequence[bytes], hits: int) -> None:
        """Give a new sequence the first ``hits`` blocks of its prompt, which :meth:`match`
        found cached. Counts the prefix-cache query and hits in tokens."""
        for d in prompt_digests[:hits]:
            bid = self._cached[d]
            if self._ref[bid] == 0:
                del self._free[bid]
            self._ref[bid] += 1
            seq.blocks.append(bid)
            seq.digests.append(d)
        seq.hit_blocks = hits
        self.query_tokens += len(prompt_digests) * self.block_size
        self.hit_tokens += hits * self.block_size

    def can_admit(self, prompt_digests: Sequence[bytes], hits: int, num_tokens: int) -> bool:
        """Whether a sequence whose first ``hits`` prompt blocks are cached could be
        admitted now and hold ``num_tokens`` tokens."""
        revived = sum(1 for d in prompt_digests[:hits] if self._ref[self._cached[d]] == 0)
        need = -(-num_tokens // self.block_size) - hits
        return need <= len(self._free) - revived

    def grow(self, seq: SeqKv, num_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_tokens`` tokens in all; False (and no change) when
        there are not enough free blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            bid, _ = self._free.popitem(last=False)
            old = self._digest[bid]
            if old is not None:
                self._digest[bid] = None
                del self._cached[old]
                self.evictions += 1
                self.events.append(
                    BlockRemoved([event_value(old)], medium=self.medium, group_idx=0)
                )
            self._ref[bid] = 1
            seq.blocks.append(bid)
        return True

    def commit(
        self,
        seq: SeqKv,
        token_ids: Sequence[int],
        num_computed: int,
        known: Sequence[bytes] = (),
    ) -> None:
        """Blocks of ``seq`` that ``num_computed`` computed tokens fill become cached and
        are announced in one ``BlockStored``. ``known`` may give the digests of the leading
        blocks of ``token_ids`` (computed at submit), which are then not hashed again."""
        bs = self.block_size
        full = min(num_computed // bs, len(seq.blocks))
        start = len(seq.digests)
        if full <= start:
            return
        new = list(known[start:full])
        if start + len(new) < full:
            at = start + len(new)
            parent = new[-1] if new else (seq.digests[-1] if seq.digests else None)
            new += self.hasher.digests(token_ids[: full * bs], at, parent)
        stored: list[int] = []
        for i, d in enumerate(new, start):
            seq.digests.append(d)
            bid = seq.blocks[i]
            other = self._cached.get(d)
            if other is not None:
                # The same content is cached in another block already: hold that one
                # instead, so that a cached parent can never be evicted under a running
                # sequence, and free this copy.
                if self._ref[other] == 0:
                    del self._free[other]
                self._ref[other] += 1
                seq.blocks[i] = other
                self._ref[bid] -= 1
                if self._ref[bid] == 0:
                    self._free[bid] = None
                    self._free.move_to_end(bid, last=False)
                continue
            self._digest[bid] = d
            self._cached[d] = bid
            stored.append(i)
        if not stored:
            return
        # One event per contiguous run, so that each event's parent is the block before it.
        runs: list[list[int]] = [[stored[0]]]
        for i in stored[1:]:
            if i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            lo, hi = run[0], run[-1] + 1
            parent_hash = event_value(seq.digests[lo - 1]) if lo > 0 else None
            self.events.append(
                BlockStored(
                    [event_value(seq.digests[i]) for i in run],
                    parent_hash,
                    list(token_ids[lo * bs : hi * bs]),
                    bs,
                    medium=self.medium,
                    extra_keys=[None] * len(run),  # vLLM 0.33: one (empty) entry per block
                    group_idx=0,
                )
            )

    def release(self, seq: SeqKv) -> None:
        """Drop ``seq``'s references, last block first; unreferenced cached blocks stay
        cached (least recently freed evicted first), others are reused first."""
        for bid in reversed(seq.blocks):
            self._ref[bid] -= 1
            if self._ref[bid] == 0:
                self._free[bid] = None
                if self._digest[bid] is None:
                    self._free.move_to_end(bid, last=False)
        seq.blocks.clear()
        seq.digests.clear()

    def reset(self) -> bool:
        """Forget every cached block (``AllBlocksCleared``); False when blocks are in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._digest = [None] * self.num_blocks
        self.events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events
