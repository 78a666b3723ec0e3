"""kvpick block keys: the one definition of how token ids become index keys.

The scheme is Dynamo's router hashing (specs/kv-events.md §9.4), so that kvpick's keys are
interchangeable with Dynamo's:

* A *block* is ``block_size`` consecutive token ids. Only full blocks are hashed; a partial
  tail block never gets a key (engines never announce partial blocks either).
* The *block hash* of a block is XXH3-64 over its token ids packed as unsigned 32-bit
  little-endian integers, with a seed that starts at 1337 and has the LoRA adapter name
  (``+ xxh3_64(name, seed=0)``) and the cache salt (``+ xxh3_64(salt, seed=1)``) folded in,
  wrapping modulo 2**64. Empty strings count as absent.
* The *sequence hash* (the key the index stores) chains block hashes so that a block's key
  depends on every block before it: ``seq[0] = block[0]`` and
  ``seq[i] = XXH3-64(LE_u64(seq[i-1]) || LE_u64(block[i]), seed=1337)``.

Equal token blocks under different prefixes therefore get different keys, and a key
identifies a whole prefix, not just one block.

Speed: token ids are packed once with :mod:`array` (a C loop) and every block is hashed in
one C call (:func:`epp.native.block_keys`); only the chain is a Python loop over blocks
(never over tokens). Block hashes come back as ``array('Q')``, which the index compares
slice by slice with ``memcmp``.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence

import xxhash

from epp import native

DEFAULT_BLOCK_SIZE = 16
CHAIN_SEED = 1337
"""Seed of every sequence-hash step and the base of every block-hash seed."""

_U64 = (1 << 64) - 1
_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack


def chain_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """Return the block-hash seed for a LoRA adapter name and a cache salt.

    With neither (or empty strings) the seed is :data:`CHAIN_SEED`.
    """
    seed = CHAIN_SEED
    if lora_name:
        seed = (seed + _xxh3(lora_name.encode("utf-8"), 0)) & _U64
    if cache_salt:
        seed = (seed + _xxh3(cache_salt.encode("utf-8"), 1)) & _U64
    return seed


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Pack token ids as unsigned 32-bit little-endian integers.

    Raises :class:`ValueError` when an id is negative, not below 2**32, or not an integer.
    """
    if isinstance(token_ids, bytes | bytearray | memoryview):
        token_ids = list(token_ids)  # one id per byte, not raw machine words
    return native.pack_u32(token_ids)


def block_hashes_packed(
    packed: bytes, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = CHAIN_SEED
) -> array:
    """Block hashes of every full block in ``packed`` (output of :func:`pack_tokens`)."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    return native.block_keys(packed, block_size, seed)


def block_hashes(
    token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, seed: int = CHAIN_SEED
) -> array:
    """Block hashes of every full block of ``token_ids``, as ``array('Q')``; the partial tail
    is ignored."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    full = len(token_ids) - len(token_ids) % block_size
    if full == 0:
        return array("Q")
    whole = token_ids if full == len(token_ids) else token_ids[:full]
    return block_hashes_packed(pack_tokens(whole), block_size, seed)


def chain(parent: int | None, hashes: Sequence[int]) -> list[int]:
    """Sequence hashes of ``hashes`` (block hashes) continuing from ``parent``.

    ``parent`` is the sequence hash of the block before the first one, or ``None`` when the
    first block starts the sequence.
    """
    out: list[int] = []
    if not hashes:
        return out
    append = out.append
    xxh3 = _xxh3
    pack = _pack_pair
    it = iter(hashes)
    if parent is None:
        prev = next(it)
        append(prev)
    else:
        prev = parent
    for bh in it:
        prev = xxh3(pack(prev, bh), CHAIN_SEED)
        append(prev)
    return out


def sequence_hashes(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """The sequence hashes of a prompt's full blocks, in order (Dynamo's router keys).

    kvpick's own index takes :func:`block_hashes` instead; see :mod:`epp.kvindex.index`.
    """
    return chain(None, block_hashes(token_ids, block_size, chain_seed(lora_name, cache_salt)))
