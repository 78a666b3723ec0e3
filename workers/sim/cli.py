"""``kvpick worker sim``: start the simulated engine (HTTP server, engines, KV events)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from workers.sim.options import OptionsError, add_arguments, from_args

if TYPE_CHECKING:
    from workers.sim.app import SimApp

log = logging.getLogger("workers.sim")


def register(engines: argparse._SubParsersAction) -> None:
    parser = engines.add_parser(
        "sim",
        help="kvpick's CPU simulated engine (vLLM on the wire)",
        description="A CPU simulated engine that behaves like one vLLM server: paged KV "
        "cache with prefix caching and LRU eviction, continuous batching on a timing model, "
        "vLLM's OpenAI API and metrics, KV events exactly as vLLM publishes them, and "
        "prefill/decode handoff with NIXL. See docs/sim.md.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        opts = from_args(args, dict(os.environ))
    except OptionsError as exc:
        print(f"kvpick worker sim: {exc}", file=sys.stderr)
        return 2
    from workers.sim.app import SimApp, StartupError

    try:
        asyncio.run(_main(SimApp(opts)))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _main(app: SimApp) -> None:
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        with contextlib.suppress(Exception):
            await app.stop()
