"""The garbage collector while the EPP serves: what it keeps out of a collection, and how
long each collection holds the interpreter.

A full collection walks every container the interpreter tracks, and the event loop waits
for it. The EPP keeps most of its long-lived data where no collection walks it: token-id
caches hold tuples of ints (untracked), the KV index lives in native arrays. What is left is
the code and the objects made at start-up (modules, the tokenizer, the scheduler): they live
as long as the process, so :func:`settle` moves them to the permanent generation once the
EPP is ready, and no later collection looks at them again.

:func:`watch` observes every collection's pause into ``kvpick_gc_pause_seconds`` (by
generation), so that a stall from the collector can be told apart from one from the code.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from epp import metrics as M

_started: list[float] = [0.0]
_observe = [M.GC_PAUSE.labels(str(g)).observe for g in range(3)]


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _observe[info["generation"]](time.perf_counter() - _started[0])


def watch() -> None:
    """Start observing collections into ``kvpick_gc_pause_seconds``; idempotent."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def unwatch() -> None:
    """Stop observing collections (for tests and in-process restarts)."""
    if _on_collection in gc.callbacks:
        gc.callbacks.remove(_on_collection)


def settle() -> int:
    """Collect once, then move every object alive now to the permanent generation, where
    no collection walks it; returns how many objects were moved. Objects moved there are
    still freed by reference counting when they go; only a cycle among them would stay."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
