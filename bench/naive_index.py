"""The baseline index: one dict of block keys per worker, scanned worker by worker.

This is the straightforward design (and what a first implementation usually is): to answer
a query, walk the prompt's keys in each worker's dict until the first miss. It costs
O(workers × matched depth) dict lookups per query, which is what kvpick's index is compared
against in ``kvpick bench index``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


class NaiveIndex:
    def __init__(self) -> None:
        self.workers: dict[Hashable, dict[int, int]] = {}

    def add(self, worker: Hashable, keys: Iterable[int], tier: int = 0) -> None:
        blocks = self.workers.setdefault(worker, {})
        for key in keys:
            blocks[key] = tier

    def find_matches(self, keys: Sequence[int]) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        for worker, blocks in self.workers.items():
            depth = 0
            for key in keys:
                if key not in blocks:
                    break
                depth += 1
            if depth:
                out[worker] = depth
        return out
