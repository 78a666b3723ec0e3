"""The decision log: why each request went where it went.

Every routing decision becomes one :class:`DecisionRecord`: one INFO log line (the chosen
worker, its cost and cached blocks, and the runners-up) and an entry in a bounded ring that
the debug endpoint (``/debug/decisions`` on the metrics port) serves as JSON, with every
candidate's overlap, load and score.
"""

from __future__ import annotations

import time
from collections import deque
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


@dataclass(slots=True)
class DecisionRecord:
    """One routed request."""

    request_id: str
    model: str
    mode: str
    destination: str
    chosen: str
    prefill: str | None
    prompt_tokens: int
    prompt_blocks: int
    candidates: list[CandidateRecord]
    prefill_candidates: list[CandidateRecord]
    elapsed_ms: float
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def log_line(self, limit: int = 4) -> str:
        """``selected worker W: cost C, cached K of N blocks; others: …`` (best first)."""
        ranked = sorted(self.candidates, key=lambda c: -c.score)
        chosen = next((c for c in ranked if c.worker == self.chosen), None)
        head = f"request {self.request_id} model {self.model}: "
        if chosen is None:
            head += f"selected {self.destination}"
        else:
            head += f"selected worker {chosen.worker}: {_describe(chosen, self.prompt_blocks)}"
        others = [c for c in ranked if c is not chosen][:limit]
        if others:
            head += "; others: " + ", ".join(
                f"{c.worker} {_describe(c, self.prompt_blocks)}" for c in others
            )
            if len(ranked) - 1 > limit:
                head += f", +{len(ranked) - 1 - limit} more"
        if self.prefill:
            head += f"; prefill on {self.prefill}"
        return head


def _describe(c: CandidateRecord, blocks: int) -> str:
    cost = "" if c.cost is None else f"cost {c.cost:.1f}, "
    return f"{cost}score {c.score:.3f}, cached {c.cached_blocks} of {blocks} blocks"


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
