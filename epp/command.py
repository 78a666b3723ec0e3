"""``kvpick epp`` (also ``python -m epp``): run the Endpoint Picker.

The arguments after ``epp`` go to :func:`epp.options.parse_epp_args` untouched, because the
reference EPP's flags come in spellings argparse cannot take (``-poolName``, single-dash
long flags, Go-style booleans).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from epp.options import HelpRequested, OptionsError, epp_help, parse_epp_args


class _JsonFormatter(logging.Formatter):
    """One JSON object per line (``--zap-encoder json``), with zap's key names."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))


class _Held(logging.Handler):
    """Holds what a logger writes inside ``with``, to be written later with :meth:`replay`:
    the flag parser's warnings (one per ignored flag) then come out in the format the flags
    ask for (``--zap-encoder json``)."""

    def __init__(self, logger: str) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(logger)

    def __enter__(self) -> _Held:
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = True

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        for record in self.records:
            logging.getLogger(record.name).handle(record)


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` (the flags after ``epp``), run the EPP until SIGTERM; the exit code."""
    if not logging.getLogger().handlers:
        configure_logging("INFO", "console")
    with _Held("epp.options") as held:
        try:
            opts = parse_epp_args(argv)
        except HelpRequested as exc:
            print(exc)
            return 0
        except OptionsError as exc:
            error: OptionsError | None = exc
        else:
            error = None
    if error is not None:
        held.replay()
        print(f"kvpick epp: {error}", file=sys.stderr)
        return 2
    configure_logging(opts.log_level, opts.log_format)
    held.replay()
    if opts.ignored:
        logging.getLogger("epp").debug("flags ignored: %s", ", ".join(opts.ignored))

    # gRPC's C core logs every failed TLS handshake at its default verbosity, one line per
    # connection: a client retrying in a loop against --ext-proc-server=grpcio (say, one
    # without the certificate --client-ca asks for) would flood the log. It reads this once,
    # when grpc is first imported, just below; GRPC_VERBOSITY set by the operator wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from epp.app import EppApp, StartupError  # the heavy imports only once the flags are good

    try:
        asyncio.run(EppApp(opts).run())
    except (StartupError, OSError, ValueError) as exc:
        logging.getLogger("epp").error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "epp",
        help="run the Endpoint Picker (ext_proc :9002, health :9003, metrics :9090)",
        description=epp_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.set_defaults(func=lambda args: run(args.passthrough), passthrough_args=True)
