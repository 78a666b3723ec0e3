"""``kvpick bench``: the benchmark harnesses."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its figures as one JSON object",
        description="Benchmarks. Each prints one JSON object on stdout (progress on stderr) "
        "and compares kvpick against a baseline measured in the same run.",
    )
    benches = parser.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    from bench import epp, index, sim, soak

    epp.register(benches)
    index.register(benches)
    sim.register(benches)
    soak.register(benches)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
