"""The ``kvpick`` command: one entry point whose subcommands come from kvpick's packages.

Each package declares its subcommands in the ``kvpick.commands`` entry-point group of
``pyproject.toml``; an entry point names a function that takes the argparse subparsers
object and adds its command (with ``set_defaults(func=...)``). The root command therefore
never imports ``sidecar``, ``workers`` or ``bench`` itself, which keeps ``epp`` free of
dependencies on them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from epp import __version__

log = logging.getLogger("kvpick")

ENTRY_POINT_GROUP = "kvpick.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpick",
        description=(
            "kvpick: a KV-cache-aware Endpoint Picker for the Gateway API Inference "
            "Extension, with its sidecar and engine workers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kvpick {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load()(subparsers)
        except Exception as exc:  # one broken command must not take the whole CLI down
            print(f"kvpick: cannot load command {ep.name!r}: {exc}", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough_args", False):
        # A command that parses its own flags (``epp`` takes the reference EPP's spellings).
        args.passthrough = extra
    elif extra:
        # Reported by the command that was given them, with its usage, not the root's.
        leaf = _command_parser(parser, sys.argv[1:] if argv is None else list(argv))
        hint = getattr(args, "unknown_args_hint", None)
        leaf.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({hint})" if hint else ""))
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``argv`` names, following command names down."""
    current, rest = parser, argv
    while True:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            return current
        for i, token in enumerate(rest):
            if token in sub.choices:
                current, rest = sub.choices[token], rest[i + 1 :]
                break
        else:
            return current


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
