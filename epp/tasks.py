"""Stopping background tasks without losing the caller's own cancellation."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: asyncio.Task[object]) -> None:
    """Cancel ``tasks`` and wait until each has finished.

    Their own CancelledError is expected and absorbed, but a cancellation of the *caller*
    is re-raised. Simply suppressing CancelledError around ``await task`` would swallow
    it: the caller would then run on (a polling loop forever, in the case that made this
    helper) while whoever cancelled it waits for it to end.
    """
    for task in tasks:
        task.cancel()
    current = asyncio.current_task()
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling():
                raise
