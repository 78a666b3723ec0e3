"""What the three launchers share: their common flags, the built command, and running it.

A launcher turns ``kvpick worker ENGINE ...`` into a :class:`LaunchPlan` (the engine's own
server command, the environment variables it needs, the files it reads) and then either prints
the plan (``--dry-run``) or writes the files and replaces this process with the engine
(``os.execvpe``). Building a plan is pure: it reads neither the environment nor the file system,
so the commands can be checked table-driven without the engines installed.

Guarantees:

* Flags that mean the same thing have the same name in every launcher
  (:func:`add_common_arguments`).
* Inputs are checked before anything runs: bad values, port ranges that overlap (the KV events
  and replay ports of every data-parallel rank, the HTTP port, the NIXL side channel or the
  bootstrap port) and engine arguments after ``--`` that would silently override a flag kvpick
  sets are reported as :class:`LauncherError` (exit 2), never a traceback.
* A missing engine is reported with the executable's name and how to install it (exit 127).
* The dry-run output is a shell script: the files (as here-documents), the environment
  (``export``) and, on its last line, the command as :func:`shlex.join` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
DEFAULT_BLOCK_SIZE = 16
DEFAULT_KV_EVENTS_PORT = 5557

EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

_HEREDOC_END = "KVPICK_EOF"


class LauncherError(Exception):
    """A reason not to start the engine, with the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class PortRange:
    """``count`` consecutive TCP ports from ``first`` (one per data-parallel rank, or one)."""

    what: str
    first: int
    count: int = 1
    flag: str = ""

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def overlaps(self, other: PortRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.count == 1 else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class LaunchPlan:
    """The engine command kvpick runs: ``argv`` (``argv[0]`` is looked up on PATH), the
    environment variables set on top of the inherited ones, the files written before the
    engine starts (path → text), the ports the engine listens on, and notes for the user."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)
    ports: list[PortRange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class CommonOptions:
    """The flags every launcher takes, already checked (see :func:`common_options`).

    ``kv_replay_port`` is None when the replay socket is turned off (``--no-kv-replay``).
    ``passthrough`` holds the arguments after ``--``, without the ``--``.
    """

    model: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    served_model_name: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_events_port: int = DEFAULT_KV_EVENTS_PORT
    kv_replay_port: int | None = DEFAULT_KV_EVENTS_PORT + 1
    kv_topic: str = ""
    kv_buffer_steps: int | None = None
    kv_hwm: int | None = None
    role: Role = "both"
    dp_size: int = 1
    executable: str | None = None
    passthrough: tuple[str, ...] = ()

    @property
    def disaggregated(self) -> bool:
        return self.role != "both"

    @property
    def events_endpoint(self) -> str:
        return f"tcp://*:{self.kv_events_port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.kv_replay_port is None else f"tcp://*:{self.kv_replay_port}"

    def kv_events_fields(self) -> dict[str, object]:
        """The publisher fields the three engines spell alike (endpoint, replay_endpoint,
        topic, and buffer_steps / hwm when given), in that order."""
        fields: dict[str, object] = {"endpoint": self.events_endpoint}
        if self.replay_endpoint is not None:
            fields["replay_endpoint"] = self.replay_endpoint
        fields["topic"] = self.kv_topic
        if self.kv_buffer_steps is not None:
            fields["buffer_steps"] = self.kv_buffer_steps
        if self.kv_hwm is not None:
            fields["hwm"] = self.kv_hwm
        return fields

    def common_ports(self) -> list[PortRange]:
        """HTTP, KV events and (if on) KV replay: the ports every engine opens."""
        ports = [
            PortRange("HTTP (OpenAI API)", self.port, 1, "--port"),
            PortRange("KV events (ZMQ PUB)", self.kv_events_port, self.dp_size, "--kv-events-port"),
        ]
        if self.kv_replay_port is not None:
            ports.append(
                PortRange(
                    "KV event replay (ZMQ ROUTER)",
                    self.kv_replay_port,
                    self.dp_size,
                    "--kv-replay-port",
                )
            )
        return ports


# --- argparse ---------------------------------------------------------------------------


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, executable_help: str) -> None:
    """The flags all three launchers share, with the same names and defaults."""
    parser.add_argument(
        "--model",
        required=True,
        help="model to serve: a Hugging Face id or a local path (required)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model name the OpenAI API answers to (default: the engine's, i.e. --model)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address the engine's HTTP server binds (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help="the engine's HTTP (OpenAI API) port (default: %(default)s)",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="TOKENS",
        help="tokens per KV-cache block; must equal the EPP's --block-size (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-events-port",
        type=port_number,
        default=DEFAULT_KV_EVENTS_PORT,
        metavar="PORT",
        help="base port of the KV events publisher, bound as tcp://*:PORT; data-parallel "
        "rank r publishes on PORT+r (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-replay-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="base port of the KV events replay socket (rank r on PORT+r); must not overlap "
        "the events ports (default: --kv-events-port + --dp-size, e.g. 5558 with one rank)",
    )
    parser.add_argument(
        "--no-kv-replay",
        action="store_true",
        help="do not open a replay socket (the EPP then clears a worker's blocks after a "
        "missed batch instead of replaying it)",
    )
    parser.add_argument(
        "--kv-topic",
        default="",
        metavar="TOPIC",
        help="ZMQ topic of the KV events (default: empty)",
    )
    parser.add_argument(
        "--kv-buffer-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="batches kept for replay (default: the engine's, 10000)",
    )
    parser.add_argument(
        "--kv-hwm",
        type=positive_int,
        default=None,
        metavar="N",
        help="high-water mark of the events PUB socket (default: the engine's, 100000)",
    )
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="both",
        help="prefill/decode disaggregation role: 'both' serves whole requests and adds "
        "no KV-transfer configuration; 'prefill' and 'decode' add the engine's NIXL "
        "transfer settings (default: %(default)s)",
    )
    parser.add_argument(
        "--dp-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="data-parallel ranks in this engine; each rank publishes its own KV events "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--executable",
        default=None,
        metavar="PATH",
        help=executable_help,
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the files, environment and command as a shell script, then exit 0 "
        "without writing or starting anything",
    )
    parser.add_argument(
        "engine_args",
        nargs=argparse.REMAINDER,
        metavar="-- ENGINE_ARG",
        help="arguments after '--' are appended to the engine's command verbatim",
    )


def passthrough_from(engine_args: Sequence[str]) -> tuple[str, ...]:
    """The arguments after ``--``. Anything else that reached the REMAINDER positional was a
    stray argument before ``--``, which is an error rather than a silent passthrough."""
    args = list(engine_args)
    if not args:
        return ()
    if args[0] != "--":
        raise LauncherError(
            f"unexpected argument {args[0]!r}: put arguments for the engine after '--'"
        )
    return tuple(args[1:])


def common_options(args: argparse.Namespace) -> CommonOptions:
    """Check the shared flags and resolve the computed defaults (the replay port)."""
    if not args.model.strip():
        raise LauncherError("--model must not be empty")
    if args.no_kv_replay and args.kv_replay_port is not None:
        raise LauncherError("--kv-replay-port and --no-kv-replay contradict each other")
    replay: int | None
    if args.no_kv_replay:
        replay = None
    elif args.kv_replay_port is None:
        replay = args.kv_events_port + args.dp_size
    else:
        replay = args.kv_replay_port
    return CommonOptions(
        model=args.model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        block_size=args.block_size,
        kv_events_port=args.kv_events_port,
        kv_replay_port=replay,
        kv_topic=args.kv_topic,
        kv_buffer_steps=args.kv_buffer_steps,
        kv_hwm=args.kv_hwm,
        role=args.role,
        dp_size=args.dp_size,
        executable=args.executable,
        passthrough=passthrough_from(args.engine_args),
    )


# --- checks -----------------------------------------------------------------------------


def check_ports(opts: CommonOptions, ports: Sequence[PortRange]) -> None:
    """Every range fits below 65536 and no two ranges share a port."""
    for port in ports:
        if port.last > 65535:
            raise LauncherError(
                f"{port.flag} {port.first} with --dp-size {opts.dp_size} needs ports "
                f"{port}, past 65535"
            )
    for i, a in enumerate(ports):
        for b in ports[i + 1 :]:
            if not a.overlaps(b):
                continue
            if {a.flag, b.flag} == {"--kv-events-port", "--kv-replay-port"}:
                events, replay = (a, b) if a.flag == "--kv-events-port" else (b, a)
                raise LauncherError(
                    f"--kv-replay-port {replay.first} overlaps the KV events ports: with "
                    f"--dp-size {opts.dp_size} the events use {events} and the replay sockets "
                    f"{replay} (each data-parallel rank adds its rank to both); use "
                    f"--kv-replay-port {events.last + 1} or higher"
                )
            raise LauncherError(
                f"port clash: {a.what} ({a.flag} → {a}) and {b.what} ({b.flag} → {b}) share a port"
            )


def check_passthrough(passthrough: Sequence[str], managed: dict[str, str]) -> None:
    """Refuse engine arguments after ``--`` that set what kvpick sets itself: the engine
    would take the later value and silently undo kvpick's configuration.

    ``managed`` maps an engine flag to the kvpick flag (or explanation) to use instead.
    A flag matches as ``--flag``, ``--flag=value`` or vLLM's ``--flag.key`` form.
    """
    for arg in passthrough:
        for flag, instead in managed.items():
            if arg == flag or arg.startswith((flag + "=", flag + ".")):
                raise LauncherError(
                    f"engine argument {arg!r} after '--' would override what kvpick sets; {instead}"
                )


# --- output and exec --------------------------------------------------------------------


def describe_ports(ports: Iterable[PortRange]) -> str:
    return "; ".join(f"{p} {p.what}" for p in ports)


def render_dry_run(engine: str, plan: LaunchPlan) -> str:
    """The plan as a shell script whose last line is the command (``shlex.join``)."""
    lines = [
        f"# kvpick worker {engine} --dry-run: nothing was written or started",
        f"# ports to open: {describe_ports(plan.ports)}",
    ]
    lines += [f"# note: {note}" for note in plan.notes]
    for path, text in plan.files.items():
        quoted = shlex.quote(str(path))
        lines.append(f"# file {path}")
        lines.append(f"cat > {quoted} <<'{_HEREDOC_END}'")
        lines.append(text.rstrip("\n"))
        lines.append(_HEREDOC_END)
    lines += [f"export {name}={shlex.quote(value)}" for name, value in plan.env.items()]
    lines.append(plan.command_line)
    return "\n".join(lines) + "\n"


def missing_executable(program: str, engine_name: str, install: str) -> str | None:
    """None when ``program`` is an executable on PATH (or an executable path); otherwise the
    message saying what is missing and how to install it."""
    if shutil.which(program) is not None:
        return None
    return (
        f"{engine_name} is not installed here: no executable {program!r} on PATH. "
        f"Install it with {install}, or point --executable at it."
    )


@dataclass(frozen=True)
class EngineLauncher:
    """One ``kvpick worker ENGINE`` subcommand.

    ``plan`` turns parsed arguments into a checked :class:`LaunchPlan` (raising
    :class:`LauncherError`); ``find_missing`` returns None when the engine can be started,
    else the message to print.
    """

    name: str
    help: str
    description: str
    epilog: str
    executable_help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    plan: Callable[[argparse.Namespace], LaunchPlan]
    find_missing: Callable[[LaunchPlan], str | None]

    def register(self, engines: argparse._SubParsersAction) -> None:
        parser = engines.add_parser(
            self.name,
            help=self.help,
            description=textwrap.fill(self.description, width=88),
            epilog=self.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_common_arguments(parser, self.executable_help)
        self.add_arguments(parser)
        parser.set_defaults(
            func=self.run,
            unknown_args_hint=f"the engine's own flags go after '--': "
            f"kvpick worker {self.name} --model M -- --some-engine-flag",
        )

    def run(self, args: argparse.Namespace) -> int:
        prefix = f"kvpick worker {self.name}"
        try:
            plan = self.plan(args)
        except LauncherError as exc:
            print(f"{prefix}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        if args.dry_run:
            sys.stdout.write(render_dry_run(self.name, plan))
            sys.stdout.flush()
            return 0
        missing = self.find_missing(plan)
        if missing is not None:
            print(f"{prefix}: error: {missing}", file=sys.stderr)
            return EXIT_NOT_FOUND
        return execute(prefix, plan)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a new file beside ``path`` and rename it over ``path``: readers never
    see half a file, and a file or symlink already at ``path`` is replaced, not written
    through (the default location is in the shared temporary directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def execute(prefix: str, plan: LaunchPlan) -> int:
    """Write the plan's files, then replace this process with the engine. Returns only when
    that fails, with the exit code to leave with."""
    for path, text in plan.files.items():
        try:
            write_atomically(path, text)
        except OSError as exc:
            print(f"{prefix}: error: cannot write {path}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"{prefix}: wrote {path}", file=sys.stderr)
    for note in plan.notes:
        print(f"{prefix}: note: {note}", file=sys.stderr)
    print(f"{prefix}: ports to open: {describe_ports(plan.ports)}", file=sys.stderr)
    for name, value in plan.env.items():
        print(f"{prefix}: env {name}={shlex.quote(value)}", file=sys.stderr)
    print(f"{prefix}: exec {plan.command_line}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(plan.argv[0], plan.argv, {**os.environ, **plan.env})
    except FileNotFoundError:
        print(f"{prefix}: error: {plan.argv[0]!r} not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as exc:
        print(f"{prefix}: error: cannot run {plan.argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE
    return 1  # pragma: no cover - execvpe does not return
