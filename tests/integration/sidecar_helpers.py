"""Starting kvpick's sidecar in the test process in front of simulated engines."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

from sidecar.options import add_arguments, from_args
from sidecar.server import Sidecar


def sidecar_options(*argv: str, env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--host", "127.0.0.1", "--port", "0", *argv])
    return from_args(args, env or {})


@contextlib.asynccontextmanager
async def running_sidecar(
    *argv: str, tokenizer=None, env: dict[str, str] | None = None
) -> AsyncIterator[Sidecar]:
    sc = Sidecar(sidecar_options(*argv, env=env), tokenizer=tokenizer)
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


def gauge(sc: Sidecar, name: str, **labels: str) -> float:
    value = sc.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def in_flight(sc: Sidecar) -> float:
    return sum(r.in_flight for r in sc.table.ranks)
