"""``kvpick worker sglang``: SGLang's server with paged radix cache, KV events and NIXL.

The command (flags from SGLang 0.5.23's server arguments; see docs/launchers.md)::

    PYTHON -m sglang.launch_server --model-path MODEL --host H --port P --page-size B
        --kv-events-config '{"publisher":"zmq","endpoint":...,"replay_endpoint":...,"topic":...}'
        --dp-size N --enable-metrics [--served-model-name NAME]
        [--disaggregation-mode prefill|decode --disaggregation-transfer-backend nixl
         --disaggregation-bootstrap-port 8998]
        [ENGINE_ARGS...]

The radix (prefix) cache is on by default in SGLang, so nothing is passed for it. The events
JSON always names ``"publisher":"zmq"``: SGLang's default publisher is ``"null"``, and a
vLLM-style JSON without it fails at start (specs/kv-events.md §7). The page size is the block
size, since SGLang hashes and announces whole pages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

from workers.launchers.common import (
    CommonOptions,
    EngineLauncher,
    LaunchPlan,
    PortRange,
    check_passthrough,
    check_ports,
    common_options,
    port_number,
)

DEFAULT_BOOTSTRAP_PORT = 8998
INSTALL = "pip install 'kvpick[sglang]' (SGLang needs a CUDA GPU)"
MODULE = "sglang.launch_server"

MANAGED_FLAGS: dict[str, str] = {
    "--model-path": "use kvpick's --model",
    "--model": "use kvpick's --model",
    "--host": "use kvpick's --host",
    "--port": "use kvpick's --port",
    "--page-size": "use kvpick's --block-size",
    "--disable-radix-cache": "kvpick needs the prefix cache on",
    "--kv-events-config": "use kvpick's --kv-events-port, --kv-replay-port, --kv-topic, "
    "--kv-buffer-steps and --kv-hwm",
    "--dp-size": "use kvpick's --dp-size",
    "--data-parallel-size": "use kvpick's --dp-size",
    "--dp": "use kvpick's --dp-size",
    "--served-model-name": "use kvpick's --served-model-name",
    "--disaggregation-mode": "use kvpick's --role",
    "--disaggregation-transfer-backend": "kvpick's prefill/decode handoff is NIXL",
    "--disaggregation-bootstrap-port": "use kvpick's --bootstrap-port",
}


@dataclass(frozen=True)
class SglangOptions:
    """Everything the SGLang server command is built from. ``python`` runs the server module;
    ``bootstrap_port`` is only used for the prefill and decode roles."""

    common: CommonOptions
    python: str = "python3"
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT


def kv_events_config(opts: CommonOptions) -> dict[str, object]:
    """SGLang's ``--kv-events-config``: the ZMQ publisher named explicitly, kvpick's endpoints.
    SGLang has no ``enable_kv_cache_events`` field; passing the flag is what turns events on."""
    return {"publisher": "zmq", **opts.kv_events_fields()}


def build_plan(opts: SglangOptions) -> LaunchPlan:
    """The SGLang server command for ``opts``; raises LauncherError on clashing ports or
    engine arguments that override kvpick's flags."""
    c = opts.common
    argv = [
        opts.python,
        "-m",
        MODULE,
        "--model-path",
        c.model,
        "--host",
        c.host,
        "--port",
        str(c.port),
        "--page-size",
        str(c.block_size),
        "--kv-events-config",
        json.dumps(kv_events_config(c), separators=(",", ":")),
        "--dp-size",
        str(c.dp_size),
        "--enable-metrics",
    ]
    if c.served_model_name is not None:
        argv += ["--served-model-name", c.served_model_name]
    ports = c.common_ports()
    if c.disaggregated:
        argv += [
            "--disaggregation-mode",
            c.role,
            "--disaggregation-transfer-backend",
            "nixl",
            "--disaggregation-bootstrap-port",
            str(opts.bootstrap_port),
        ]
        if c.role == "prefill":
            ports.append(
                PortRange(
                    "disaggregation bootstrap (HTTP)", opts.bootstrap_port, 1, "--bootstrap-port"
                )
            )
    check_ports(c, ports)
    check_passthrough(c.passthrough, MANAGED_FLAGS)
    argv += c.passthrough
    return LaunchPlan(argv=argv, ports=ports)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SGLang")
    group.add_argument(
        "--bootstrap-port",
        type=port_number,
        default=DEFAULT_BOOTSTRAP_PORT,
        metavar="PORT",
        help="SGLang's disaggregation bootstrap port, served by the prefill server and "
        "named by decode requests; prefill/decode roles only (default: %(default)s)",
    )


def plan_from_args(args: argparse.Namespace) -> LaunchPlan:
    return build_plan(
        SglangOptions(
            common=common_options(args),
            python=args.executable or sys.executable,
            bootstrap_port=args.bootstrap_port,
        )
    )


_PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sglang') else 3)"


def find_missing(plan: LaunchPlan) -> str | None:
    """None when the plan's Python exists and can import ``sglang`` (checked without importing
    it: SGLang's import pulls in torch and CUDA)."""
    python = plan.argv[0]
    if shutil.which(python) is None:
        return (
            f"SGLang cannot be started: no Python executable {python!r}. "
            f"Point --executable at the Python that has SGLang installed."
        )
    try:
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SGLang cannot be started: running {python!r} failed: {exc}"
    if probe.returncode != 0:
        return (
            f"SGLang is not installed for {python}: it cannot import 'sglang'. "
            f"Install it with {INSTALL}, or point --executable at a Python that has it."
        )
    return None


LAUNCHER = EngineLauncher(
    name="sglang",
    help="exec SGLang's server (python -m sglang.launch_server) with the flags kvpick needs",
    description="Build and exec 'python -m sglang.launch_server' with the page size set to "
    "the block size, KV events published over ZMQ (publisher 'zmq', with a replay socket), "
    "data parallelism, metrics on and, for the prefill/decode roles, SGLang's NIXL "
    "disaggregation settings.",
    epilog="examples:\n"
    "  kvpick worker sglang --model Qwen/Qwen3-0.6B --dry-run\n"
    "  kvpick worker sglang --model Qwen/Qwen3-0.6B --role prefill --dp-size 2 \\\n"
    "      -- --tp-size 2 --mem-fraction-static 0.8",
    executable_help="the Python interpreter that runs sglang.launch_server "
    "(default: the one running kvpick)",
    add_arguments=add_arguments,
    plan=plan_from_args,
    find_missing=find_missing,
)
