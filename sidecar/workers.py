"""The engine workers one sidecar fronts, and the data-parallel ranks they expose.

A worker is given as ``URL[,kind=vllm|sglang|trtllm|sim][,dp=N][,id=ID]``. The EPP names a
worker by ``(x-worker-instance-id, x-dp-rank)``; its instance id is derived from the pod's
address (:func:`epp.headers.worker_instance_id`), so by default every worker of the pod shares
the pod's id and the ranks are numbered across workers in the order they are given: with
``--worker A,dp=2 --worker B`` ranks 0 and 1 are A's ranks 0 and 1, and rank 2 is B. A worker
given its own ``id=`` numbers its ranks from 0 on its own.

Guarantees: every ``(instance id, rank)`` maps to exactly one ``(worker, local rank)``; a spec
that cannot be read is refused with a message naming the part that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

EngineKind = Literal["vllm", "sglang", "trtllm", "sim"]
KINDS: tuple[EngineKind, ...] = ("vllm", "sglang", "trtllm", "sim")
MAX_DP = 1024


class WorkerSpecError(ValueError):
    """A ``--worker`` value that cannot be read."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    url: str  # scheme://host:port, no trailing slash
    kind: EngineKind = "vllm"
    dp_size: int = 1
    instance_id: int | None = None  # None: the pod's id


def parse_worker(text: str) -> WorkerSpec:
    """Read one ``--worker`` value (see the module docstring)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise WorkerSpecError("empty --worker value")
    url = parts[0]
    if "://" not in url:
        url = "http://" + url
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname or split.port is None:
        raise WorkerSpecError(f"--worker {text!r}: the first part must be http://host:port")
    if split.path not in ("", "/"):
        raise WorkerSpecError(f"--worker {text!r}: give the engine's root URL, without a path")
    kind: str = "vllm"
    dp = 1
    ident: int | None = None
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            raise WorkerSpecError(f"--worker {text!r}: {part!r} is not key=value")
        if key == "kind":
            if value not in KINDS:
                raise WorkerSpecError(f"--worker {text!r}: kind must be one of {', '.join(KINDS)}")
            kind = value
        elif key in ("dp", "dp_size"):
            if not value.isdigit() or not 1 <= int(value) <= MAX_DP:
                raise WorkerSpecError(f"--worker {text!r}: dp must be an integer in 1..{MAX_DP}")
            dp = int(value)
        elif key in ("id", "instance_id"):
            if not value.isdigit():
                raise WorkerSpecError(f"--worker {text!r}: id must be a non-negative integer")
            ident = int(value)
        else:
            raise WorkerSpecError(f"--worker {text!r}: unknown key {key!r} (kind, dp, id)")
    base = f"{split.scheme}://{split.netloc}"
    return WorkerSpec(base, kind, dp, ident)  # type: ignore[arg-type]


@dataclass(slots=True, eq=False)
class Rank:
    """One data-parallel rank of one worker: where a request finally runs."""

    instance_id: int
    dp_rank: int  # as the EPP numbers it
    worker: WorkerSpec
    local_rank: int  # as the engine numbers it (X-data-parallel-rank)
    in_flight: int = 0

    @property
    def label(self) -> str:
        return f"{self.instance_id}/{self.dp_rank}"

    @property
    def engine_dp_header(self) -> str | None:
        """The engine's own rank header value, when the engine has several ranks."""
        return str(self.local_rank) if self.worker.dp_size > 1 else None


@dataclass(slots=True)
class RankTable:
    """Every rank of the pod, looked up by ``(instance id, dp rank)``."""

    pod_id: int
    ranks: list[Rank] = field(default_factory=list)
    _by_key: dict[tuple[int, int], Rank] = field(default_factory=dict)
    _per_id: dict[int, list[Rank]] = field(default_factory=dict)

    @classmethod
    def build(cls, specs: list[WorkerSpec], pod_id: int) -> RankTable:
        table = cls(pod_id)
        for spec in specs:
            ident = pod_id if spec.instance_id is None else spec.instance_id
            group = table._per_id.setdefault(ident, [])
            for local in range(spec.dp_size):
                rank = Rank(ident, len(group), spec, local)
                group.append(rank)
                table.ranks.append(rank)
                table._by_key[(ident, rank.dp_rank)] = rank
        return table

    def ids(self) -> list[int]:
        return list(self._per_id)

    def lookup(self, instance_id: int | None, dp_rank: int | None) -> Rank:
        """The rank the EPP named; :class:`LookupError` with the reason when this pod has none.
        Neither given: the least-loaded rank (fewest requests in flight, first on ties)."""
        if instance_id is None and dp_rank is None:
            return min(self.ranks, key=lambda r: r.in_flight)
        ident = self.pod_id if instance_id is None else instance_id
        group = self._per_id.get(ident)
        if group is None:
            known = ", ".join(str(i) for i in self._per_id)
            raise LookupError(f"worker instance {ident} is not served here (this pod has {known})")
        if dp_rank is None:
            if len(group) > 1:
                raise LookupError(
                    f"worker instance {ident} has {len(group)} data-parallel ranks; "
                    "name one with x-dp-rank"
                )
            return group[0]
        if dp_rank >= len(group):
            raise LookupError(
                f"worker instance {ident} has no data-parallel rank {dp_rank} "
                f"(ranks 0..{len(group) - 1})"
            )
        return group[dp_rank]
