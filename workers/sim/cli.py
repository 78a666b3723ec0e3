"""``kvpick worker sim`` (placeholder until the simulator lands)."""

from __future__ import annotations

import argparse


def register(engines: argparse._SubParsersAction) -> None:
    engines.add_parser("sim", help="kvpick's CPU simulated engine (vLLM on the wire)")
