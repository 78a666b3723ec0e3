"""``kvpick worker``: start one engine worker.

``sim`` runs kvpick's CPU simulated engine in this process; ``vllm``, ``sglang`` and
``trtllm`` build the real engine's server command and exec it. Each engine registers its own
subcommand; building the parser imports no engine code.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="start an engine worker (the CPU simulator, or vLLM / SGLang / TensorRT-LLM)",
        description="Start one engine worker: 'sim' is kvpick's CPU simulated engine, which "
        "speaks vLLM's HTTP API, KV events and NIXL handoff; 'vllm', 'sglang' and 'trtllm' "
        "exec the real engine's server with the flags kvpick needs.",
    )
    engines = parser.add_subparsers(title="engines", metavar="ENGINE")
    from workers.launchers import cli as launchers
    from workers.sim import cli as sim

    sim.register(engines)
    launchers.register(engines)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
