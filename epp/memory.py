"""Giving memory back: the C allocator's settings, and trimming after large requests.

A large request body passes through the EPP in pieces: tens of kilobytes per ext_proc
message, then one buffer, the decoded document, the rendered prompt and the forwarded body.
glibc's malloc serves the pieces from its heap and, once they are freed, keeps the pages;
with its default dynamic threshold, a freed large block also raises the size below which
later blocks come from the heap rather than from their own mapping. Left alone, the
process's RSS after one 10 MB request stays tens of megabytes above where it was, and grows
further with every thread's own arena.

So, on glibc (nothing is done elsewhere, and any failure only logs):

* :func:`tune_allocator` fixes the mmap threshold at 1 MiB (large blocks always get their
  own mapping, returned to the system when freed) and caps malloc's arenas, so that the
  preprocessing threads do not each keep a heap of their own;
* :class:`Trimmer` calls ``malloc_trim(0)`` shortly after a large request finishes, which
  returns the free pages of the heap to the system. Trims are coalesced: at most one per
  ``min_interval`` seconds, run in a thread so that the event loop never waits for one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# 1 MiB, not lower: asyncio reads sockets into 256 KiB buffers, and mapping (and page
# faulting) one per read cost 0.7 ms per request in `kvpick bench epp`.
MMAP_THRESHOLD = 1024 * 1024
ARENA_MAX = 4


def _libc() -> ctypes.CDLL | None:
    try:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to tune


_LIBC = _libc()


def tune_allocator() -> bool:
    """Apply the settings above; True when the allocator took them."""
    if _LIBC is None:
        return False
    ok = all(
        _LIBC.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.debug("the C allocator refused a mallopt setting")
    return ok


def trim() -> bool:
    """Return the free pages of malloc's heaps to the system now; True when some were."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


class Trimmer:
    """Coalesces trim requests; see the module docstring. Use from the event loop."""

    def __init__(self, *, delay: float = 0.05, min_interval: float = 1.0) -> None:
        self.delay = delay
        self.min_interval = min_interval
        self._scheduled = False
        self._last = float("-inf")
        self.trims = 0

    def request(self) -> None:
        """Trim soon (once the request's objects are gone), unless one is already due."""
        if _LIBC is None or self._scheduled:
            return
        self._scheduled = True
        wait = max(self.delay, self._last + self.min_interval - time.monotonic())
        asyncio.get_running_loop().call_later(wait, self._start)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, trim)
        future.add_done_callback(self._done)

    def _done(self, _future: asyncio.Future[bool]) -> None:
        self._scheduled = False
        self._last = time.monotonic()
        self.trims += 1
