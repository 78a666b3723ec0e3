"""The bytes a simulated KV block holds: a pure function of the block's engine hash.

The simulator has no model, so it cannot compute real keys and values. What it needs instead
is content that (a) every process derives identically from the block hash alone, so a decode
engine can check byte for byte that the block NIXL delivered is the one the prefill engine
computed, and (b) differs between blocks everywhere, so a block read from the wrong slot, or
a half-finished transfer, never passes that check by accident.

Layout: the block is a little-endian array of 64-bit words. Word ``k`` is
``seed[k % 8] XOR (k * ODD)`` where ``seed`` is eight words derived from the hash by a
bijective mixer. Guarantees:

* deterministic across processes, platforms and Python versions (no ``hash()``, no
  randomness; only integer arithmetic modulo 2**64);
* for two hashes that differ modulo 2**64, *every* complete aligned 8-byte word differs
  (the mixer is a bijection, so each seed word differs, and both sides XOR the same offset
  term); only the trailing partial word of a size that is not a multiple of 8 may agree;
* the offset term makes the content vary along the block, so a block is not a repetition
  of one 64-byte pattern and a transfer landing at a wrong offset inside a slot is caught.

Cost: one numpy pass over the block (a few milliseconds for 4 MiB).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_MASK64 = (1 << 64) - 1
# Odd constants: the golden-ratio increment (splitmix64's) spaces the eight seed inputs,
# and an odd multiplier keeps ``k * _OFFSET_MUL`` a bijection of the word index.
_GOLDEN = 0x9E3779B97F4A7C15
_OFFSET_MUL = 0xD6E8FEB86659FD93
_SEED_WORDS = 8


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit integers with good avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=16)
def _offsets(nrows: int) -> np.ndarray:
    """The offset term ``k * ODD`` for ``nrows * 8`` words, shaped ``(nrows, 8)`` so one
    broadcast XOR with the seed row builds a whole block. Blocks of one engine all have the
    same size, so this is computed once per size."""
    import numpy as np

    out = np.arange(nrows * _SEED_WORDS, dtype="<u8") * np.uint64(_OFFSET_MUL)
    out = out.reshape(nrows, _SEED_WORDS)
    out.setflags(write=False)
    return out


def block_array(engine_hash: int, nbytes: int) -> np.ndarray:
    """The block's content as a fresh, writable ``uint8`` numpy array of ``nbytes``."""
    import numpy as np

    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    h = engine_hash & _MASK64
    seed = np.array(
        [_mix64((h + (j + 1) * _GOLDEN) & _MASK64) for j in range(_SEED_WORDS)],
        dtype="<u8",
    )
    nrows = -(-nbytes // (8 * _SEED_WORDS))
    # One pass: the broadcast XOR writes a new array; "<u8" pins the byte order so the
    # bytes are the same on a big-endian host.
    words = np.bitwise_xor(_offsets(nrows), seed, dtype="<u8")
    return words.reshape(-1).view(np.uint8)[:nbytes]


def block_content(engine_hash: int, nbytes: int) -> bytes:
    """The ``nbytes`` bytes a KV block with ``engine_hash`` holds (see the module doc)."""
    return block_array(engine_hash, nbytes).tobytes()
