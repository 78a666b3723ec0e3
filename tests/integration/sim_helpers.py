"""Starting kvpick's simulated engine in the test process, with its options spelled as on
the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from workers.sim.app import SimApp
from workers.sim.options import add_arguments, from_args


def sim_options(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(["--host", "127.0.0.1", "--port", "0", *argv]), {})


@contextlib.asynccontextmanager
async def running_sim(*argv: str) -> AsyncIterator[SimApp]:
    app = SimApp(sim_options(*argv))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def loopback(endpoint: str) -> str:
    """A bound ``tcp://0.0.0.0:P`` endpoint as a client connects to it."""
    return "tcp://127.0.0.1:" + endpoint.rsplit(":", 1)[1]


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)
