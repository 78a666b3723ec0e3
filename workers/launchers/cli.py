"""``kvpick worker vllm|sglang|trtllm`` (placeholder until the launchers land)."""

from __future__ import annotations

import argparse


def register(engines: argparse._SubParsersAction) -> None:
    for name in ("vllm", "sglang", "trtllm"):
        engines.add_parser(name, help=f"exec a {name} server (not built yet)")
