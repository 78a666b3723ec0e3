"""``kvpick sidecar`` flags, their defaults, and the checked options they make."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.headers import worker_instance_id
from sidecar.allow import AllowList, AllowListError
from sidecar.workers import WorkerSpec, WorkerSpecError, parse_worker

WORKERS_ENV = "KVPICK_SIDECAR_WORKERS"  # space- or semicolon-separated --worker values
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY = 10_000_000  # as the EPP's --max-body-bytes


class OptionsError(ValueError):
    """A flag value the sidecar cannot start with."""


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    host: str
    port: int
    workers: tuple[WorkerSpec, ...]
    pod_address: str  # ip:port the EPP knows this pod by
    pod_instance_id: int
    tokenizer: str | None
    token_data_check: str  # off | range | fingerprint
    prefill_allow: AllowList
    max_body_bytes: int
    request_timeout: float
    prefill_timeout: float
    connect_timeout: float
    health_interval: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="listen port (default: %(default)s)"
    )
    parser.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL[,kind=K][,dp=N][,id=ID]",
        help="an engine worker in this pod, repeatable: its root URL, engine kind "
        "(vllm|sglang|trtllm|sim, default vllm), data-parallel ranks (default 1) and instance "
        f"id (default: the pod's). Also ${WORKERS_ENV}, values separated by spaces",
    )
    parser.add_argument(
        "--pod-address",
        default=None,
        metavar="IP:PORT",
        help="the address the EPP routes to for this pod, from which the worker instance id "
        "is derived (default: $POD_IP:--port, else --host:--port, else 127.0.0.1:--port)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer folder (or id in the local HF cache), the one the EPP uses: "
        "tokenizes requests that come without nvext.token_data and checks those that do "
        "(default: none; such requests then go to the engine's own OpenAI endpoint)",
    )
    parser.add_argument(
        "--token-data-check",
        choices=("off", "range", "fingerprint"),
        default="fingerprint",
        help="how nvext.token_data is checked: range (ids within the vocabulary, length within "
        "the context), fingerprint (also that it matches the prompt; needs --tokenizer), or "
        "off (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-allow",
        action="append",
        default=[],
        metavar="CIDR|HOST",
        help="prefill targets this sidecar may call for x-prefiller-host-port, repeatable or "
        "comma-separated: CIDRs for IP literals, exact host names otherwise. Empty (the "
        "default): every disaggregated request naming a remote prefill target gets 403",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY,
        help="largest request body accepted; larger gets 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds one request may take end to end, both legs (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-timeout",
        type=float,
        default=60.0,
        help="seconds the prefill leg may take before decode runs locally (default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to connect to an engine or prefill target (default: %(default)s)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the workers' /health (default: %(default)s)",
    )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> SidecarOptions:
    env = os.environ if env is None else env
    raw: Sequence[str] = list(args.worker)
    if not raw and env.get(WORKERS_ENV):
        raw = env[WORKERS_ENV].replace(";", " ").split()
    if not raw:
        raise OptionsError(f"give at least one --worker (or set {WORKERS_ENV})")
    try:
        workers = tuple(parse_worker(w) for w in raw)
        allow = AllowList.parse(args.prefill_allow)
    except (WorkerSpecError, AllowListError) as exc:
        raise OptionsError(str(exc)) from None
    if not 0 <= args.port < 65536:
        raise OptionsError("--port must be in 0..65535 (0: any free port)")
    for name in ("request_timeout", "prefill_timeout", "connect_timeout", "health_interval"):
        if getattr(args, name) <= 0:
            raise OptionsError(f"--{name.replace('_', '-')} must be positive")
    if args.max_body_bytes < 1024:
        raise OptionsError("--max-body-bytes must be at least 1024")
    if args.token_data_check == "fingerprint" and args.tokenizer is None:
        check = "range"  # nothing to compare with; said in the start-up log
    else:
        check = args.token_data_check
    address = args.pod_address
    if address is None:
        ip = env.get("POD_IP") or (args.host if args.host not in ("0.0.0.0", "::") else None)
        address = f"{ip or '127.0.0.1'}:{args.port}"
    return SidecarOptions(
        host=args.host,
        port=args.port,
        workers=workers,
        pod_address=address,
        pod_instance_id=worker_instance_id(address),
        tokenizer=args.tokenizer,
        token_data_check=check,
        prefill_allow=allow,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        prefill_timeout=args.prefill_timeout,
        connect_timeout=args.connect_timeout,
        health_interval=args.health_interval,
    )


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SidecarOptions:
    parser = argparse.ArgumentParser(prog="kvpick sidecar")
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)), env)
