"""Block hashes as vLLM computes them for prefix caching, and the 64-bit values it publishes.

vLLM hashes each full block as ``hash_fn((parent_digest, tuple(token_ids), extra_keys))``,
where ``parent_digest`` is the previous block's full 32-byte digest, or, for the first
block, ``NONE_HASH = hash_fn(seed)`` with seed ``PYTHONHASHSEED`` when set and the string
``"vllm-none-hash"`` otherwise (specs/kv-events.md §9.1). Two ``hash_fn`` choices are here:

* ``sha256_cbor``: SHA-256 of canonical CBOR. Only one shape is ever encoded (a text seed,
  or a 3-array of a byte string, an array of non-negative ints and null), so the encoder
  below writes that shape directly instead of pulling in a CBOR library;
* ``sha256``: SHA-256 of ``pickle.dumps(obj, protocol=5)`` (vLLM's default, Python only).

The published event value is the digest's last eight bytes as an unsigned big-endian int.
Both are checked against vLLM 0.33's known-answer vectors in the tests. Extra keys (LoRA,
multimodal, cache salt) are not modelled: the simulator serves a base model only.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Sequence
from typing import Literal

HashAlgo = Literal["sha256_cbor", "sha256"]
HASH_ALGOS: tuple[HashAlgo, ...] = ("sha256_cbor", "sha256")
NONE_HASH_SEED = "vllm-none-hash"


def _cbor_head(major: int, value: int) -> bytes:
    """A canonical CBOR item head: the shortest encoding of ``value`` (RFC 8949 §4.2.1)."""
    if value < 24:
        return bytes((major << 5 | value,))
    if value < 0x100:
        return bytes((major << 5 | 24, value))
    if value < 0x10000:
        return bytes((major << 5 | 25,)) + struct.pack(">H", value)
    if value < 0x100000000:
        return bytes((major << 5 | 26,)) + struct.pack(">I", value)
    return bytes((major << 5 | 27,)) + struct.pack(">Q", value)


def _cbor_text(text: str) -> bytes:
    raw = text.encode()
    return _cbor_head(3, len(raw)) + raw


# Encoded token ids, filled as ids are met: a vocabulary's worth at most, and it makes a
# block's encoding one dict lookup per token instead of a function call.
_UINTS: dict[int, bytes] = {}


def _cbor_uints(token_ids: Sequence[int]) -> list[bytes]:
    try:
        return [_UINTS[t] for t in token_ids]
    except (KeyError, TypeError):
        pass
    for t in token_ids:
        if t not in _UINTS:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"token ids must be non-negative integers, got {t!r}")
            _UINTS[t] = _cbor_head(0, t)
    return [_UINTS[t] for t in token_ids]


def _cbor_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """``[parent, [token ids...], null]`` in canonical CBOR."""
    head = b"\x83" + _cbor_head(2, len(parent)) + parent + _cbor_head(4, len(token_ids))
    return b"".join((head, *_cbor_uints(token_ids), b"\xf6"))


def _seed() -> str:
    return os.environ.get("PYTHONHASHSEED") or NONE_HASH_SEED


def none_hash(algo: HashAlgo = "sha256_cbor", seed: str | None = None) -> bytes:
    """The root digest every hash chain starts from."""
    seed = _seed() if seed is None else seed
    if algo == "sha256_cbor":
        return hashlib.sha256(_cbor_text(seed)).digest()
    if algo == "sha256":
        return hashlib.sha256(pickle.dumps(seed, protocol=5)).digest()
    raise ValueError(f"unknown hash algorithm {algo!r}; choose one of {', '.join(HASH_ALGOS)}")


def block_digest(parent: bytes, token_ids: Sequence[int], algo: HashAlgo = "sha256_cbor") -> bytes:
    """The 32-byte digest of one full block after ``parent``'s."""
    if algo == "sha256_cbor":
        return hashlib.sha256(_cbor_block(parent, token_ids)).digest()
    if algo == "sha256":
        obj = (parent, tuple(token_ids), None)
        return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()
    raise ValueError(f"unknown hash algorithm {algo!r}; choose one of {', '.join(HASH_ALGOS)}")


def event_value(digest: bytes) -> int:
    """The block hash as vLLM publishes it with integer hashes: the last 8 bytes, unsigned."""
    return int.from_bytes(digest[-8:], "big")


class BlockHasher:
    """Digests of a token sequence's full blocks, chained from :func:`none_hash`."""

    def __init__(self, block_size: int, algo: HashAlgo = "sha256_cbor") -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.algo = algo
        self.root = none_hash(algo)

    def digests(
        self, token_ids: Sequence[int], start: int = 0, parent: bytes | None = None
    ) -> list[bytes]:
        """Digests of the full blocks of ``token_ids`` from block index ``start`` on, given
        the digest of block ``start - 1`` (``parent``; the root when ``start`` is 0)."""
        bs = self.block_size
        prev = self.root if parent is None else parent
        out: list[bytes] = []
        for i in range(start, len(token_ids) // bs):
            prev = block_digest(prev, token_ids[i * bs : (i + 1) * bs], self.algo)
            out.append(prev)
        return out
