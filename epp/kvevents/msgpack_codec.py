"""The msgpack wire format of KV event batches: vLLM (both event shapes) and SGLang.

This module is the single definition of that format (specs/kv-events.md §2-§5).

Decoding (:func:`decode_batch`) is lenient in what it accepts and strict in what it
returns:

* a batch is ``[ts, events, dp_rank]`` (the 3rd element optional, older SGLang), or the same
  fields as a map;
* an event is either a map tagged by ``"type"`` (vLLM >= PR #42892, SGLang 0.5.23) or a
  positional array whose first element is the class name (older vLLM and SGLang); both
  shapes may appear in one batch;
* unknown keys and extra trailing array elements are ignored, missing optional fields are
  ``None``; block hashes may be signed or unsigned ints or bytes, and are normalised;
* an event that cannot be decoded is left out and reported in ``EventBatch.rejected``; a
  payload that is not a batch at all raises :class:`EventError`.

Token ids are kept as their original msgpack bytes until something asks for them (see
:meth:`BlockStored.tokens`).

Encoding (:func:`encode_batch`) reproduces the engines' publishers byte for byte: msgspec
structs with vLLM 0.33's field order, tags and ``omit_defaults`` (map shape), vLLM's older
positional form (array shape), or SGLang 0.5.23's fields with signed hashes.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from epp.kvevents.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventError,
    KvEvent,
    engine_hash,
)
from epp.native import fast_decode_batch, u64s

Shape = Literal["map", "array"]
Dialect = Literal["vllm", "sglang"]

_NIL = b"\xc0"
_RAW_NIL = msgspec.Raw(_NIL)
_Hash = int | bytes

# --------------------------------------------------------------------------------------
# Decoding structs: every field but the hashes is optional, and fields kvpick does not act
# on are typed Any so that an engine's new value types never make an event unreadable.


class _MapStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: msgspec.Raw
    parent_block_hash: _Hash | None = None
    token_ids: msgspec.Raw = _RAW_NIL
    block_size: int | None = None
    lora_id: Any = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Any = None
    group_idx: int | None = None
    kv_cache_spec_kind: Any = None
    cache_salt: str | None = None  # SGLang


class _MapRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: msgspec.Raw
    medium: str | None = None
    group_idx: int | None = None


class _MapCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _ArrStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: msgspec.Raw
    parent_block_hash: _Hash | None = None
    token_ids: msgspec.Raw = _RAW_NIL
    block_size: int | None = None
    lora_id: Any = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Any = None
    group_idx: int | None = None
    kv_cache_spec_kind: Any = None


class _ArrRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: msgspec.Raw
    medium: str | None = None
    group_idx: int | None = None


class _ArrCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


_MapEvent = _MapStored | _MapRemoved | _MapCleared
_ArrEvent = _ArrStored | _ArrRemoved | _ArrCleared


class _BatchOfMaps(msgspec.Struct, array_like=True):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _BatchOfArrays(msgspec.Struct, array_like=True):
    ts: float
    events: list[_ArrEvent]
    data_parallel_rank: int | None = None


class _BatchOfRaw(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _MapBatchOfRaw(msgspec.Struct):
    ts: float = 0.0
    events: list[msgspec.Raw] = []
    data_parallel_rank: int | None = None
    attn_dp_rank: int | None = None


_decode_maps = msgspec.msgpack.Decoder(_BatchOfMaps).decode
_decode_arrays = msgspec.msgpack.Decoder(_BatchOfArrays).decode
_decode_raw = msgspec.msgpack.Decoder(_BatchOfRaw).decode
_decode_map_batch = msgspec.msgpack.Decoder(_MapBatchOfRaw).decode
_decode_map_event = msgspec.msgpack.Decoder(_MapEvent).decode
_decode_arr_event = msgspec.msgpack.Decoder(_ArrEvent).decode
_decode_any = msgspec.msgpack.Decoder().decode

_EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")

# msgspec raises UnicodeDecodeError (not DecodeError) for strings that are not UTF-8.
# ValidationError is a subclass of DecodeError, so it must always be caught first.
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError)


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _cache_salt(extra_keys: Any) -> str | None:
    """The cache salt vLLM puts in the first block's extra keys as ``("cache_salt", salt)``."""
    if not isinstance(extra_keys, list) or not extra_keys:
        return None
    first = extra_keys[0]
    if not isinstance(first, list | tuple):
        return None
    for key in first:
        if (
            isinstance(key, list | tuple)
            and len(key) >= 2
            and key[0] == "cache_salt"
            and isinstance(key[1], str)
        ):
            return key[1]
    return None


def _hashes(raw: msgspec.Raw, kind: str) -> array:
    try:
        return u64s(raw)
    except ValueError as exc:
        raise EventError("bad_event", f"{kind}: block_hashes: {exc}") from None


def _internal(ev: Any) -> KvEvent:
    cls = ev.__class__
    if cls is _MapStored or cls is _ArrStored:
        raw = ev.token_ids
        parent = ev.parent_block_hash
        extra = ev.extra_keys
        if extra is not None and not isinstance(extra, list):
            extra = None
        salt = ev.cache_salt if cls is _MapStored else None
        if salt is None and extra:
            salt = _cache_salt(extra)
        kind = ev.kv_cache_spec_kind
        lora_id = ev.lora_id
        return BlockStored(
            _hashes(ev.block_hashes, "BlockStored"),
            None if parent is None else engine_hash(parent),
            None,
            ev.block_size,
            ev.medium,
            ev.lora_name,
            lora_id if lora_id.__class__ is int else None,
            salt,
            extra,
            ev.group_idx,
            kind if kind is None or kind.__class__ is str else None,
            None if raw == _RAW_NIL else raw,
        )
    if cls is _MapRemoved or cls is _ArrRemoved:
        return BlockRemoved(_hashes(ev.block_hashes, "BlockRemoved"), ev.medium, ev.group_idx)
    return AllBlocksCleared()


def _classify(raw: bytes, exc: Exception) -> tuple[str, str]:
    """Explain why one event failed to decode (error path only)."""
    try:
        obj = _decode_any(raw)
    except _UNREADABLE:
        return "bad_msgpack", str(exc)
    if isinstance(obj, dict):
        kind = obj.get("type")
    elif isinstance(obj, list) and obj:
        kind = obj[0]
    else:
        return "bad_event", f"an event must be a map or an array, got {type(obj).__name__}"
    if kind not in _EVENT_TYPES:
        return "unknown_event_type", f"event type {kind!r}"
    return "bad_event", f"{kind}: {exc}"


def _decode_one(raw: bytes) -> KvEvent:
    if not raw:
        raise EventError("bad_event", "empty event")
    first = raw[0]
    try:
        if _is_map(first):
            return _internal(_decode_map_event(raw))
        if _is_array(first):
            return _internal(_decode_arr_event(raw))
    except (*_UNREADABLE, msgspec.ValidationError) as exc:
        raise EventError(*_classify(raw, exc)) from None
    raise EventError("bad_event", "an event must be a msgpack map or array")


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one KV event batch payload (the third ZMQ frame).

    Raises :class:`EventError` (reason ``bad_msgpack`` or ``bad_batch``) when the payload is
    not a batch; individual undecodable events are reported in ``rejected`` instead.
    """
    if fast_decode_batch is not None:
        decoded = fast_decode_batch(payload, BlockStored, BlockRemoved, AllBlocksCleared)
        if decoded is not None:
            return EventBatch(*decoded)
    if not payload:
        raise EventError("bad_batch", "empty payload")
    first = payload[0]
    if _is_array(first):
        # Fast paths: a whole batch of one event shape, decoded in one C call.
        for fast in (_decode_maps, _decode_arrays):
            try:
                batch = fast(payload)
            except _UNREADABLE:
                continue
            try:
                events = [_internal(ev) for ev in batch.events]
            except EventError:
                break  # fall back to per-event decoding to keep the good events
            return EventBatch(batch.ts, events, batch.data_parallel_rank)
        try:
            raw_batch: Any = _decode_raw(payload)
        except msgspec.ValidationError as exc:
            raise EventError("bad_batch", str(exc)) from None
        except _UNREADABLE as exc:
            raise EventError("bad_msgpack", str(exc)) from None
        dp_rank = raw_batch.data_parallel_rank
    elif _is_map(first):
        try:
            raw_batch = _decode_map_batch(payload)
        except msgspec.ValidationError as exc:
            raise EventError("bad_batch", str(exc)) from None
        except _UNREADABLE as exc:
            raise EventError("bad_msgpack", str(exc)) from None
        dp_rank = raw_batch.data_parallel_rank
        if dp_rank is None:
            dp_rank = raw_batch.attn_dp_rank
    else:
        try:
            _decode_any(payload)
        except _UNREADABLE as exc:
            raise EventError("bad_msgpack", str(exc)) from None
        raise EventError("bad_batch", "a batch must be a msgpack array [ts, events, dp_rank]")

    out = EventBatch(raw_batch.ts, [], dp_rank)
    for raw in raw_batch.events:
        try:
            out.events.append(_decode_one(bytes(raw)))
        except EventError as exc:
            out.rejected.append((exc.reason, exc.detail))
    return out


# --------------------------------------------------------------------------------------
# Encoding structs: field order, tags and defaults as the engines declare them.


class _VllmStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class _VllmRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[_Hash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _VllmCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True, gc=False):
    pass


class _VllmOldStored(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _VllmOldRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: list[_Hash]
    medium: str | None
    group_idx: int | None = None


class _VllmOldCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True, gc=False):
    pass


class _SglStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class _SglRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[int]
    medium: str | None = None


class _WireBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _wire_event(ev: KvEvent, shape: Shape, dialect: Dialect) -> Any:
    if isinstance(ev, BlockStored):
        tokens = ev.tokens()
        block_size = ev.block_size if ev.block_size is not None else 0
        if dialect == "sglang":
            return _SglStored(
                [_signed64(h) for h in ev.block_hashes],
                None if ev.parent_hash is None else _signed64(ev.parent_hash),
                tokens,
                block_size,
                ev.lora_id,
                medium=ev.medium,
                cache_salt=ev.cache_salt,
                lora_name=ev.lora_name,
            )
        cls = _VllmStored if shape == "map" else _VllmOldStored
        return cls(
            list(ev.block_hashes),
            ev.parent_hash,
            tokens,
            block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
            extra_keys=ev.extra_keys,
            group_idx=ev.group_idx,
            kv_cache_spec_kind=ev.kv_cache_spec_kind,
        )
    if isinstance(ev, BlockRemoved):
        if dialect == "sglang":
            return _SglRemoved([_signed64(h) for h in ev.block_hashes], ev.medium)
        cls = _VllmRemoved if shape == "map" else _VllmOldRemoved
        return cls(list(ev.block_hashes), ev.medium, group_idx=ev.group_idx)
    if isinstance(ev, AllBlocksCleared):
        return _VllmCleared() if shape == "map" or dialect == "sglang" else _VllmOldCleared()
    raise TypeError(f"not a KV event: {ev!r}")


def encode_batch(
    events: Sequence[KvEvent],
    ts: float,
    dp_rank: int | None = 0,
    *,
    shape: Shape = "map",
    dialect: Dialect = "vllm",
) -> bytes:
    """Encode one batch exactly as the engine's publisher would.

    ``shape="map"`` is vLLM >= 0.32 (and the only SGLang 0.5.23 shape); ``shape="array"`` is
    vLLM's older positional form. ``dialect="sglang"`` uses SGLang's fields and signed
    hashes. vLLM always writes the 3rd batch element (msgspec keeps it for array structs).
    """
    if shape not in ("map", "array"):
        raise ValueError(f"shape must be 'map' or 'array', got {shape!r}")
    if dialect not in ("vllm", "sglang"):
        raise ValueError(f"dialect must be 'vllm' or 'sglang', got {dialect!r}")
    wire = [_wire_event(ev, shape, dialect) for ev in events]
    return _encoder.encode(_WireBatch(float(ts), wire, dp_rank))
