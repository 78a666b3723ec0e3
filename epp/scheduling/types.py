"""The objects scheduling works on: what the director hands to a policy, and what comes back.

The director (request handling) builds one :class:`SchedulingRequest` per request and one
:class:`Candidate` per eligible worker, with that worker's KV overlap (from the index), its
booked load (from :class:`epp.scheduling.load.ActiveLoad`) and its scraped model-server
metrics already filled in. A policy never reaches into the index, the bookkeeping or the
scraper itself; everything it may look at is here, which is what makes a decision
reproducible and explainable from the decision log.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from epp.kvindex.index import Overlap

Worker = tuple[str, int]
"""An engine worker: ``(endpoint address "ip:port", data-parallel rank)``."""


@dataclass(frozen=True, slots=True)
class LoadView:
    """A worker's load as kvpick booked it (requests it routed and has not seen finish).

    * ``prefill_tokens``: prompt tokens of booked requests still in prefill, minus the
      tokens they found cached when they were booked;
    * ``decode_blocks``: unique KV blocks of all booked requests on the worker;
    * ``requests``: booked requests.
    """

    prefill_tokens: int = 0
    decode_blocks: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """What the model server's own ``/metrics`` last said (one endpoint, or one dp rank).

    ``kv_usage`` is a fraction in 0..1. ``block_size`` / ``num_blocks`` are None when the
    engine does not expose them. ``scraped_at`` is ``time.monotonic()`` of the scrape;
    ``stale`` is set by the scraper when the last good scrape is older than its staleness
    threshold (the values are then the last known ones).
    """

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_blocks: int | None = None
    running_lora: tuple[str, ...] = ()
    waiting_lora: tuple[str, ...] = ()
    max_lora: int | None = None
    scraped_at: float = 0.0
    stale: bool = False


NO_OVERLAP = Overlap(0)
NO_LOAD = LoadView()


@dataclass(slots=True)
class Candidate:
    """One worker a request may go to, with everything scheduling may consider.

    ``overlap`` counts the leading prompt blocks the worker holds, per tier;
    ``new_blocks`` is how many of the request's blocks are not already among the worker's
    booked (active) blocks; ``metrics`` is None when the endpoint has no metrics source.
    """

    worker: Worker
    role: str = "both"
    overlap: Overlap = NO_OVERLAP
    load: LoadView = NO_LOAD
    new_blocks: int = 0
    metrics: EndpointMetrics | None = None

    @property
    def address(self) -> str:
        return self.worker[0]

    @property
    def dp_rank(self) -> int:
        return self.worker[1]


@dataclass(slots=True)
class SchedulingRequest:
    """A request as scheduling sees it.

    ``block_keys`` are the kvpick block hashes of the prompt's full blocks (empty when the
    prompt could not be tokenized); ``prompt_tokens`` is the prompt length in tokens (an
    estimate from the text length when there is no tokenizer); ``prefix_text`` is the text
    the approximate (GAIE-style) prefix scorer hashes; ``priority`` < 0 means sheddable.
    """

    request_id: str
    model: str
    block_keys: array = field(default_factory=lambda: array("Q"))
    prompt_tokens: int = 0
    block_size: int = 16
    prefix_text: bytes = b""
    priority: int = 0
    osl: int | None = None
    cache_salt: str | None = None

    @property
    def request_blocks(self) -> int:
        """``ceil(prompt_tokens / block_size)``: the prompt's blocks, the partial one too."""
        return -(-self.prompt_tokens // self.block_size)


@dataclass(slots=True)
class Score:
    """Why a candidate scored what it did, for the decision log and the debug endpoint.

    ``cost`` is the kv-aware cost (lower is better) when that scorer ran, else None;
    ``score`` is the weighted score the picker ranked by (higher is better).
    """

    worker: Worker
    score: float
    cost: float | None = None
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class ProfileResult:
    """What one scheduling profile chose: ``targets`` in preference order (primary first,
    then fallbacks), and the score of every candidate it considered."""

    profile: str
    targets: list[Candidate]
    scores: list[Score]


class SchedulingError(Exception):
    """No decision is possible; ``status`` is the HTTP status the client gets (429 shed,
    503 no endpoint) and ``reason`` says why."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
