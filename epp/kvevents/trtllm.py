"""TensorRT-LLM's JSON KV cache events, converted to kvpick's engine-neutral events.

TensorRT-LLM does not publish vLLM's msgpack batches. trtllm-serve's ``POST /kv_cache_events``
returns (and drains) a JSON list of items ``{"event_id", "data", "window_size",
["attention_dp_rank"]}`` whose ``data.type`` is ``created``, ``stored``, ``removed`` or
``updated`` (specs/kv-events.md §6). :class:`TrtllmEventConverter` turns such a list into
:class:`~epp.kvevents.types.EventBatch` objects, one per attention-DP rank, following the
conversion rules the spec records for Dynamo:

* ``stored``: blocks are taken in order, each block's token ids from ``tokens[].token_id``;
  the walk stops at the first block holding fewer than ``block_size`` tokens (a *partial*
  block: never announced, but remembered so that its later ``removed`` is dropped silently).
  A block holding more than ``block_size`` tokens makes the whole event unusable.
  ``parent_hash`` is the parent of the first block; ``cache_level`` becomes the medium
  (see :func:`medium_of_level`). Consecutive blocks on one level form one
  :class:`BlockStored`.
* ``removed``: one :class:`BlockRemoved` with the hashes that were not partial blocks.
* ``created`` and ``updated`` produce nothing (they are counted, not rejected).

What the conversion guarantees:

* Every block hash is normalised with :func:`~epp.kvevents.types.engine_hash` (JSON numbers
  may be signed; negative values become their two's complement), so hashes compare equal with
  the other codecs' output. Booleans, strings, floats and numbers outside the signed/unsigned
  64-bit range are rejected, as are non-integer token ids.
* An item that cannot be used is left out and reported as ``(reason, detail)`` in its batch's
  ``rejected`` list, never raised; no state changes for it except its ``event_id``. Only a
  payload that is not a JSON list raises :class:`~epp.kvevents.types.EventError`.
* ``event_id`` is consecutive per DP rank. A jump forward (missed events) or backward (the
  engine restarted) is reported in :attr:`TrtllmConversion.gaps` *and* an
  :class:`AllBlocksCleared` is put into that rank's batch at the point of the gap, because
  the endpoint cannot replay: applying the batch's events in order leaves the index with what
  is known for certain. The first ``event_id`` seen for a rank is accepted as is.

This format is **lower confidence** than the msgpack ones: the spec takes it from
TensorRT-LLM sources without a pinned release and it has not been checked against a running
engine. Newer optional block fields (``lora_id``, ``cache_salt``) are passed through when
present; ``mm_keys``, ``priority`` and ``token_extra_id`` are not carried (kvpick's block keys
are computed from token ids alone).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from epp.kvevents.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventError,
    KvEvent,
    engine_hash,
)

DEFAULT_MAX_TRACKED = 1 << 16
"""Default cap on the block hashes remembered per DP rank (partial blocks, non-GPU blocks)."""

_HASH_MIN = -(1 << 63)
_HASH_MAX = (1 << 64) - 1
_LEVEL_MEDIA = ("GPU", "CPU")

# Event types kvpick has no use for: ``created`` only states the pool sizes, and ``updated``
# (priority or cache-level changes, e.g. offload to host memory) is ignored as Dynamo does.
_IGNORED_TYPES = frozenset({"created", "updated"})


def medium_of_level(level: int | None) -> str | None:
    """The medium name for a TensorRT-LLM ``cache_level``.

    0 (primary, GPU memory) is ``"GPU"``, 1 (secondary, host memory) is ``"CPU"``; a missing
    level is ``None`` (the engine's own cache, i.e. the device). Any other level is kept as
    its decimal string, which :func:`epp.tiers.tier_of_medium` maps to the slowest tier (and
    logs once), so an unknown level is never credited as a fast one.
    """
    if level is None:
        return None
    if 0 <= level < len(_LEVEL_MEDIA):
        return _LEVEL_MEDIA[level]
    return str(level)


@dataclass(slots=True, frozen=True)
class SequenceGap:
    """A break in a DP rank's ``event_id`` sequence: ``expected`` was due, ``got`` arrived.

    ``got > expected``: events were missed. ``got < expected``: the sequence went back, which
    means the engine restarted (its cache is gone).
    """

    dp_rank: int
    expected: int
    got: int

    @property
    def restart(self) -> bool:
        return self.got < self.expected


@dataclass(slots=True)
class TrtllmConversion:
    """The result of converting one payload.

    ``batches`` holds one :class:`EventBatch` per DP rank that appears in the payload, in order
    of first appearance, with ``dp_rank`` set; events inside a batch keep the payload's order.
    Items whose DP rank cannot be read are reported in a batch with ``dp_rank=None`` (it has
    no events). ``gaps`` lists the sequence breaks met (already acted on in the batches, see
    the module docstring); ``ignored`` counts items that were valid but carry nothing kvpick
    uses (``created``, ``updated``, other attention windows).
    """

    batches: list[EventBatch] = field(default_factory=list)
    gaps: list[SequenceGap] = field(default_factory=list)
    ignored: int = 0


@dataclass(slots=True)
class _RankState:
    """What the converter remembers about one DP rank's stream."""

    last_event_id: int | None = None
    # Insertion-ordered sets (dicts), oldest first, so that the cap evicts the oldest entry.
    partial: dict[int, None] = field(default_factory=dict)
    # Hashes last stored on a level other than GPU, with that medium: TensorRT-LLM's
    # ``removed`` carries no level, and a removal must name the tier the block was stored in.
    off_device: dict[int, str] = field(default_factory=dict)


def _is_int(value: Any) -> bool:
    # JSON booleans arrive as bool, a subclass of int: reject them along with everything else.
    return value.__class__ is int


def _hash(value: Any, what: str) -> int:
    if not _is_int(value):
        raise EventError("bad_event", f"{what} must be an integer, got {type(value).__name__}")
    if not _HASH_MIN <= value <= _HASH_MAX:
        raise EventError("bad_event", f"{what} {value} is outside the 64-bit range")
    return engine_hash(value)


def _token_ids(tokens: Any, index: int) -> list[int]:
    if not isinstance(tokens, list):
        raise EventError("bad_event", f"blocks[{index}].tokens must be a list")
    try:
        ids = [token["token_id"] for token in tokens]
    except (KeyError, TypeError):
        raise EventError(
            "bad_event", f"blocks[{index}].tokens entries must be objects with a token_id"
        ) from None
    for token_id in ids:
        if not _is_int(token_id):
            raise EventError(
                "bad_event",
                f"blocks[{index}] token_id must be an integer, got {type(token_id).__name__}",
            )
    return ids


def _remember(tracked: dict[int, Any], key: int, value: Any, cap: int) -> None:
    tracked.pop(key, None)  # re-insert so that the entry becomes the newest
    tracked[key] = value
    if len(tracked) > cap:
        del tracked[next(iter(tracked))]


class TrtllmEventConverter:
    """Converts one TensorRT-LLM worker's event stream (all its DP ranks) into kvpick events.

    Keep one converter per worker endpoint and feed it every payload in arrival order: it
    carries per-rank state between calls (last ``event_id``, remembered hashes).

    ``block_size`` is the engine's ``tokens_per_block``. ``window_size``, when given, keeps
    only items for that attention window (models with several windows announce each window's
    pool separately; pass the full-attention one); items for other windows still advance the
    sequence and are counted as ignored.

    Memory is bounded: per DP rank at most ``max_tracked`` partial-block hashes and as many
    hashes of blocks stored outside GPU memory are remembered. An entry is forgotten when its
    block is removed, when its hash is stored again as a full (resp. GPU) block, when the
    rank restarts, or, past the cap, oldest first. Forgetting a partial hash early only means
    its later removal reaches the index as a removal of an unknown block (counted there, and
    harmless); forgetting a non-GPU medium means the removal names the GPU tier.
    """

    def __init__(
        self,
        block_size: int,
        *,
        window_size: int | None = None,
        max_tracked: int = DEFAULT_MAX_TRACKED,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        if max_tracked <= 0:
            raise ValueError(f"max_tracked must be positive, got {max_tracked}")
        self.block_size = block_size
        self.window_size = window_size
        self.max_tracked = max_tracked
        self._ranks: dict[int, _RankState] = {}

    def reset(self) -> None:
        """Forget all state (e.g. the worker was replaced); the next ids start fresh."""
        self._ranks.clear()

    def last_event_id(self, dp_rank: int) -> int | None:
        """The last ``event_id`` accepted from ``dp_rank``, or ``None`` if none was."""
        state = self._ranks.get(dp_rank)
        return None if state is None else state.last_event_id

    def tracked(self, dp_rank: int) -> int:
        """How many block hashes are remembered for ``dp_rank`` (for tests and metrics)."""
        state = self._ranks.get(dp_rank)
        return 0 if state is None else len(state.partial) + len(state.off_device)

    def convert(
        self, payload: list[Any] | bytes | bytearray | str, ts: float | None = None
    ) -> TrtllmConversion:
        """Convert one ``/kv_cache_events`` response (raw JSON or already parsed).

        ``ts`` stamps the batches (TensorRT-LLM's items carry no time); default: now.
        Raises :class:`EventError` with reason ``bad_json`` when the payload is not valid
        JSON and ``bad_batch`` when it is not a list; per-item problems are reported in the
        batches' ``rejected`` lists.
        """
        if isinstance(payload, bytes | bytearray | str):
            try:
                payload = json.loads(payload)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
                raise EventError("bad_json", str(exc) or type(exc).__name__) from None
        if not isinstance(payload, list):
            raise EventError(
                "bad_batch", f"a payload must be a JSON list, got {type(payload).__name__}"
            )
        stamp = time.time() if ts is None else float(ts)
        out = TrtllmConversion()
        by_rank: dict[int | None, EventBatch] = {}
        for index, item in enumerate(payload):
            self._convert_item(index, item, stamp, by_rank, out)
        out.batches = list(by_rank.values())
        return out

    # ---------------------------------------------------------------- per item

    def _convert_item(
        self,
        index: int,
        item: Any,
        ts: float,
        by_rank: dict[int | None, EventBatch],
        out: TrtllmConversion,
    ) -> None:
        rank, event_id, problem = _envelope(item)
        batch = by_rank.get(rank)
        if batch is None:
            batch = by_rank[rank] = EventBatch(ts, [], rank)
        if problem is not None:
            batch.rejected.append(("bad_event", f"item {index}: {problem}"))
            return
        assert rank is not None and event_id is not None

        state = self._ranks.get(rank)
        if state is None:
            state = self._ranks[rank] = _RankState()
        last = state.last_event_id
        if last is not None and event_id != last + 1:
            gap = SequenceGap(rank, last + 1, event_id)
            out.gaps.append(gap)
            batch.events.append(AllBlocksCleared())
            if gap.restart:
                # A restarted engine has an empty cache: nothing remembered still holds. After
                # a forward gap the remembered blocks may still exist, so they are kept.
                state.partial.clear()
                state.off_device.clear()
        state.last_event_id = event_id

        window = item.get("window_size")
        if self.window_size is not None and _is_int(window) and window != self.window_size:
            out.ignored += 1
            return
        try:
            events = self._convert_data(item.get("data"), state)
        except EventError as exc:
            batch.rejected.append((exc.reason, f"event {event_id}: {exc.detail}"))
            return
        if events is None:
            out.ignored += 1
        else:
            batch.events.extend(events)

    def _convert_data(self, data: Any, state: _RankState) -> list[KvEvent] | None:
        """The events for one item's ``data``; ``None`` when the type is ignored."""
        if not isinstance(data, dict):
            raise EventError("bad_event", "data must be an object")
        kind = data.get("type")
        if not isinstance(kind, str):
            raise EventError("bad_event", f"data.type must be a string, got {kind!r}")
        if kind == "stored":
            return self._stored(data, state)
        if kind == "removed":
            return self._removed(data, state)
        if kind in _IGNORED_TYPES:
            return None
        raise EventError("unknown_event_type", f"event type {kind!r}")

    def _stored(self, data: dict[str, Any], state: _RankState) -> list[KvEvent]:
        size = self.block_size
        parent_raw = data.get("parent_hash")
        parent = None if parent_raw is None else _hash(parent_raw, "parent_hash")
        blocks = data.get("blocks")
        if not isinstance(blocks, list):
            raise EventError("bad_event", "stored: blocks must be a list")

        # Validate everything first, then change state: a rejected event leaves none behind.
        hashes: list[int] = []
        tokens: list[int] = []
        media: list[str | None] = []
        extras: list[tuple[int | None, str | None]] = []  # (lora_id, cache_salt) per block
        partial: int | None = None
        for i, block in enumerate(blocks):
            if not isinstance(block, dict):
                raise EventError("bad_event", f"blocks[{i}] must be an object")
            block_hash = _hash(block.get("block_hash"), f"blocks[{i}].block_hash")
            ids = _token_ids(block.get("tokens"), i)
            if len(ids) > size:
                raise EventError(
                    "block_size_mismatch", f"blocks[{i}] holds {len(ids)} tokens, block size {size}"
                )
            if len(ids) < size:
                # Only the last block of a sequence can be partial; nothing after it is used.
                partial = block_hash
                break
            level = block.get("cache_level")
            if level is not None and not (_is_int(level) and level >= 0):
                raise EventError("bad_event", f"blocks[{i}].cache_level must be an integer >= 0")
            # Optional newer fields: used when well-formed, otherwise ignored (lenient).
            lora_id = block.get("lora_id")
            salt = block.get("cache_salt")
            hashes.append(block_hash)
            tokens.extend(ids)
            media.append(medium_of_level(level))
            extras.append(
                (
                    lora_id if _is_int(lora_id) else None,
                    salt if isinstance(salt, str) and salt else None,
                )
            )

        cap = self.max_tracked
        if partial is not None:
            _remember(state.partial, partial, None, cap)
        for block_hash, medium in zip(hashes, media, strict=True):
            state.partial.pop(block_hash, None)
            if medium is None or medium == "GPU":
                state.off_device.pop(block_hash, None)
            else:
                _remember(state.off_device, block_hash, medium, cap)

        # One BlockStored per run of blocks on the same level, each continuing the previous.
        events: list[KvEvent] = []
        start = 0
        for end in range(1, len(hashes) + 1):
            if end < len(hashes) and media[end] == media[start]:
                continue
            lora_id, salt = extras[start]
            events.append(
                BlockStored(
                    hashes[start:end],
                    parent,
                    tokens[start * size : end * size],
                    size,
                    media[start],
                    lora_id=lora_id,
                    cache_salt=salt,
                )
            )
            parent = hashes[end - 1]
            start = end
        return events

    def _removed(self, data: dict[str, Any], state: _RankState) -> list[KvEvent]:
        raw = data.get("block_hashes")
        if not isinstance(raw, list):
            raise EventError("bad_event", "removed: block_hashes must be a list")
        hashes = [_hash(value, f"block_hashes[{i}]") for i, value in enumerate(raw)]
        by_medium: dict[str | None, list[int]] = {}
        for block_hash in hashes:
            if block_hash in state.partial:
                # A partial block was never announced, so there is nothing to remove.
                del state.partial[block_hash]
                continue
            medium = state.off_device.pop(block_hash, None)
            by_medium.setdefault(medium, []).append(block_hash)
        return [BlockRemoved(group, medium) for medium, group in by_medium.items()]


def _envelope(item: Any) -> tuple[int | None, int | None, str | None]:
    """An item's (dp_rank, event_id, problem); ``problem`` is None when both are usable."""
    if not isinstance(item, dict):
        return None, None, f"an item must be an object, got {type(item).__name__}"
    rank = item.get("attention_dp_rank")
    if rank is None:
        rank = 0  # the field is only present when attention data parallelism is on
    elif not (_is_int(rank) and rank >= 0):
        return None, None, f"attention_dp_rank must be an integer >= 0, got {rank!r}"
    event_id = item.get("event_id")
    if not (_is_int(event_id) and event_id >= 0):
        return rank, None, f"event_id must be an integer >= 0, got {event_id!r}"
    return rank, event_id, None
