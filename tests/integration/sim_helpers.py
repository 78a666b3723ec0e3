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

# A prefill engine's NIXL side channel on any free port, so that tests never collide.
NIXL_ENV = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": "0"}


def sim_options(*argv: str, env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--host", "127.0.0.1", "--port", "0", *argv])
    return from_args(args, NIXL_ENV if env is None else env)


@contextlib.asynccontextmanager
async def running_sim(*argv: str, env: dict[str, str] | None = None) -> AsyncIterator[SimApp]:
    app = SimApp(sim_options(*argv, env=env))
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
