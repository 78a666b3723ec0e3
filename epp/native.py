"""The hot paths' compiled helpers (KV events, request bodies), or their pure-Python twins.

``epp._kvnative`` (C, built from ``epp/native/`` at install time) parses msgpack token-id and
block-hash arrays straight into machine words, hashes blocks with XXH3-64, and provides
:class:`U64Map`, a compact u64-keyed hash table. When the extension was not built, or
``KVPICK_PURE_PYTHON=1`` is set, the pure-Python versions below run instead: same results,
same errors, a few times slower. :data:`NATIVE` says which is in use; the test suite runs
both and compares them.

Guarantees of both implementations:

* :func:`tokens_u32` returns token ids packed as u32 little-endian, or raises ``ValueError``
  for anything but a msgpack array of integers in ``[0, 2**32)``; :func:`pack_u32` does the
  same for a sequence of Python ints;
* :func:`u64s` returns engine block hashes as ``array('Q')``: integers modulo ``2**64``, bin
  strings by their last eight bytes big-endian (a shorter one whole); ``ValueError`` for
  anything else, an empty bin included;
* :func:`block_keys` returns XXH3-64 of each full block of packed u32 token ids, with the
  given seed, as ``array('Q')``;
* :class:`U64Map` maps ints in ``[0, 2**64)`` to objects (see its methods);
* :func:`json_depth_exceeds` says whether a JSON text nests arrays and objects deeper than a
  limit, brackets inside strings not counted and nothing else validated (the compiled one
  releases the GIL while it scans).

:data:`fast_decode_batch` is the one helper with no pure-Python twin: the compiled decoder of
the common shape of a KV event batch, which returns None for anything else so that
:func:`epp.kvevents.msgpack_codec.decode_batch` (the definition of the format) takes over.
It is None when the extension is not in use.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
from array import array
from collections.abc import Iterable
from typing import Any

import msgspec
import xxhash

from epp.kvevents.types import engine_hashes

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
_decode_any = msgspec.msgpack.Decoder().decode


def py_pack_u32(ids: Any) -> bytes:
    try:
        packed = array("I", ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None
    if packed.itemsize != 4:  # pragma: no cover - platforms where C unsigned int is not 32-bit
        return struct.pack(f"<{len(packed)}I", *packed)
    if sys.byteorder == "big":  # pragma: no cover - kvpick's targets are little-endian
        packed.byteswap()
    return packed.tobytes()


def py_tokens_u32(raw: Any) -> bytes:
    try:
        ids = _decode_any(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(ids, list):
        raise ValueError("expected a msgpack array")
    if any(i.__class__ is not int for i in ids):
        raise ValueError("expected an integer")
    return py_pack_u32(ids)


def py_u64s(raw: Any) -> array:
    try:
        values = _decode_any(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(values, list):
        raise ValueError("expected a msgpack array")
    return array("Q", engine_hashes(values))  # EventError is a ValueError


def py_block_keys(packed: Any, block_size: int, seed: int) -> array:
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    if not 0 <= seed <= _U64:
        raise OverflowError(f"seed must be in [0, 2**64), got {seed}")
    data = bytes(packed)
    width = 4 * block_size
    xxh3 = xxhash.xxh3_64_intdigest
    ends = range(width, len(data) + 1, width)
    return array("Q", [xxh3(data[end - width : end], seed) for end in ends])


# A string literal (escapes included, possibly unterminated at the end) or one bracket.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?$)|[\[\]{}]', re.DOTALL)


def py_json_depth_exceeds(text: Any, limit: int) -> bool:
    depth = 0
    for match in _JSON_TOKENS.finditer(bytes(text)):
        c = match.group()
        if c == b"[" or c == b"{":
            depth += 1
            if depth > limit:
                return True
        elif c == b"]" or c == b"}":
            depth -= 1
    return False


def as_u64_array(values: Iterable[int]) -> array:
    """``values`` as ``array('Q')``, without a copy when they already are one.

    OverflowError for values outside ``[0, 2**64)``."""
    if values.__class__ is array and values.typecode == "Q":  # type: ignore[attr-defined]
        return values  # type: ignore[return-value]
    return array("Q", values)


class PyU64Map(dict):
    """The pure-Python :class:`U64Map`: a dict with the extension type's extra methods."""

    __slots__ = ()

    def __setitem__(self, key: int, value: object) -> None:
        dict.__setitem__(self, as_u64_array([key])[0], value)

    def insert_new(self, keys: Iterable[int], value: object) -> int:
        """Map keys to ``value`` in order, stopping at the first key already present (a
        repeat within ``keys`` included); returns how many were inserted."""
        done = 0
        setitem = dict.__setitem__
        for key in as_u64_array(keys):
            if key in self:
                break
            setitem(self, key, value)
            done += 1
        return done

    def assign(self, keys: Iterable[int], value: object) -> None:
        """Map every key to ``value``, replacing what was there."""
        self.update(dict.fromkeys(as_u64_array(keys), value))

    def discard_if(self, keys: Iterable[int], value: object) -> int:
        """Remove the keys that map to ``value`` (identity); returns how many."""
        gone = 0
        for key in keys:
            if self.get(key) is value:
                del self[key]
                gone += 1
        return gone

    def items(self) -> list[tuple[int, object]]:  # type: ignore[override]
        return list(dict.items(self))


def _load() -> Any:
    if os.environ.get("KVPICK_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from epp import _kvnative
    except ImportError as exc:
        log.warning("kvpick's compiled helpers are not built (%s); using pure Python", exc)
        return None
    return _kvnative


_ext = _load()
NATIVE: bool = _ext is not None
"""True when the compiled helpers are in use."""

if _ext is not None:
    tokens_u32 = _ext.tokens_u32
    pack_u32 = _ext.pack_u32
    u64s = _ext.u64s
    block_keys = _ext.block_keys
    json_depth_exceeds = _ext.json_depth_exceeds
    U64Map: type = _ext.U64Map
    fast_decode_batch: Any = _ext.decode_batch
else:
    tokens_u32 = py_tokens_u32
    pack_u32 = py_pack_u32
    u64s = py_u64s
    block_keys = py_block_keys
    json_depth_exceeds = py_json_depth_exceeds
    U64Map = PyU64Map
    fast_decode_batch = None
