"""``kvpick sidecar``: run the per-pod OpenAI frontend in direct mode (see docs/sidecar.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from sidecar.options import OptionsError, add_arguments, from_args

log = logging.getLogger("sidecar")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="the per-pod OpenAI frontend in direct mode, in front of the pod's engines",
        description="The OpenAI-compatible frontend inside each model-server pod. It serves "
        "exactly the worker the EPP chose (x-worker-instance-id / x-dp-rank, or the Dynamo "
        "spellings), reuses the EPP's token ids (nvext.token_data) on the engine's token-in "
        "API, and runs prefill on the pod named by x-prefiller-host-port before decoding "
        "locally, the KV cache moving over NIXL. See docs/sidecar.md.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        opts = from_args(args, dict(os.environ))
    except OptionsError as exc:
        print(f"kvpick sidecar: {exc}", file=sys.stderr)
        return 2
    tokenizer = None
    if opts.tokenizer is not None:
        from epp.tokenizer import Tokenizer, TokenizerError

        try:
            tokenizer = Tokenizer.load(opts.tokenizer)
        except (TokenizerError, OSError) as exc:
            print(
                f"kvpick sidecar: cannot load --tokenizer {opts.tokenizer}: {exc}", file=sys.stderr
            )
            return 2
    from sidecar.server import Sidecar

    try:
        asyncio.run(_main(Sidecar(opts, tokenizer=tokenizer)))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _main(sidecar: object) -> None:
    from sidecar.server import Sidecar

    assert isinstance(sidecar, Sidecar)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        with contextlib.suppress(Exception):
            await sidecar.stop()
