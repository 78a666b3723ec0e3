"""The decision log: why each request went where it went.

Every routing decision becomes one :class:`DecisionRecord`: one INFO log line (the chosen
worker, its cost and cached blocks, and the runners-up) and an entry in a bounded ring that
the debug endpoint (``/debug/decisions`` on the metrics port) serves as JSON, with every
candidate's overlap, load and score.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class CandidateRecord:
    """One candidate as the scheduler saw it."""

    worker: str
    role: str
    cached_blocks: int
    cached_by_tier: dict[str, int]
    prefill_tokens: int
    decode_blocks: int
    requests: int
    waiting: int | None
    kv_usage: float | None
    score: float
    cost: float | None
    parts: dict[str, float] = field(default_factory=dict)


Ranked = list[tuple[str, float, float | None, int]]
"""Candidates best first: ``(worker label, score, cost or None, cached blocks)``."""


class DecisionRecord:
    """One routed request.

    The ranking (:attr:`ranked`) and the per-candidate detail (:attr:`candidates`,
    :attr:`prefill_candidates`) are built on first access, from the scheduler's own objects,
    so that recording a decision nobody reads costs little; the log line needs only
    ``ranked``.
    """

    __slots__ = (
        "_build",
        "_built",
        "_rank",
        "_ranked",
        "chosen",
        "destination",
        "elapsed_ms",
        "mode",
        "model",
        "prefill",
        "prompt_blocks",
        "prompt_tokens",
        "request_id",
        "time",
    )

    def __init__(
        self,
        *,
        request_id: str,
        model: str,
        mode: str,
        destination: str,
        chosen: str,
        prefill: str | None,
        prompt_tokens: int,
        prompt_blocks: int,
        elapsed_ms: float,
        rank: Callable[[], Ranked],
        build: Callable[[], tuple[list[CandidateRecord], list[CandidateRecord]]],
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.mode = mode
        self.destination = destination
        self.chosen = chosen
        self.prefill = prefill
        self.prompt_tokens = prompt_tokens
        self.prompt_blocks = prompt_blocks
        self.elapsed_ms = elapsed_ms
        self._rank = rank
        self._ranked: Ranked | None = None
        self.time = time.time()
        self._build = build
        self._built: tuple[list[CandidateRecord], list[CandidateRecord]] | None = None

    @property
    def ranked(self) -> Ranked:
        """The decode (or aggregated) stage's candidates, best first."""
        if self._ranked is None:
            self._ranked = self._rank()
        return self._ranked

    def _details(self) -> tuple[list[CandidateRecord], list[CandidateRecord]]:
        if self._built is None:
            self._built = self._build()
        return self._built

    @property
    def candidates(self) -> list[CandidateRecord]:
        """Every candidate of the decode (or aggregated) stage, as the scheduler saw it."""
        return self._details()[0]

    @property
    def prefill_candidates(self) -> list[CandidateRecord]:
        """Every candidate of the prefill stage (empty when not disaggregated)."""
        return self._details()[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "mode": self.mode,
            "destination": self.destination,
            "chosen": self.chosen,
            "prefill": self.prefill,
            "prompt_tokens": self.prompt_tokens,
            "prompt_blocks": self.prompt_blocks,
            "elapsed_ms": self.elapsed_ms,
            "time": self.time,
            "candidates": [asdict(c) for c in self.candidates],
            "prefill_candidates": [asdict(c) for c in self.prefill_candidates],
        }

    def log_line(self, limit: int = 4) -> str:
        """``selected worker W: cost C, cached K of N blocks; others: …`` (best first)."""
        head = f"request {self.request_id} model {self.model}: "
        chosen = next((r for r in self.ranked if r[0] == self.chosen), None)
        if chosen is None:
            head += f"selected {self.destination}"
        else:
            head += f"selected worker {chosen[0]}: {_describe(chosen, self.prompt_blocks)}"
        others = [r for r in self.ranked if r is not chosen]
        if others:
            head += "; others: " + ", ".join(
                f"{r[0]} {_describe(r, self.prompt_blocks)}" for r in others[:limit]
            )
            if len(others) > limit:
                head += f", +{len(others) - limit} more"
        if self.prefill:
            head += f"; prefill on {self.prefill}"
        return head


def _describe(r: tuple[str, float, float | None, int], blocks: int) -> str:
    cost = "" if r[2] is None else f"cost {r[2]:.1f}, "
    return f"{cost}score {r[1]:.3f}, cached {r[3]} of {blocks} blocks"


class DecisionLog:
    """The last ``size`` decisions, oldest first."""

    def __init__(self, size: int = 256) -> None:
        self._ring: deque[DecisionRecord] = deque(maxlen=max(size, 0))

    def add(self, record: DecisionRecord) -> None:
        self._ring.append(record)

    def recent(self, n: int | None = None) -> list[DecisionRecord]:
        items = list(self._ring)
        return items if n is None else items[-n:] if n > 0 else []

    def __len__(self) -> int:
        return len(self._ring)
