"""``kvpick worker vllm``: ``vllm serve`` with prefix caching, KV events and NIXL.

The command (flags from vLLM 0.33's ``vllm serve``; see docs/launchers.md for the sources)::

    vllm serve MODEL --host H --port P --block-size B --enable-prefix-caching
        --kv-events-config '{"enable_kv_cache_events":true,"publisher":"zmq",...}'
        --data-parallel-size N
        [--served-model-name NAME] [--prefix-caching-hash-algo ALGO]
        [--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}']
        [ENGINE_ARGS...]

With ``--role prefill`` or ``decode`` the NixlConnector is configured (``kv_both`` on either
side, as llm-d and Dynamo do) and ``VLLM_NIXL_SIDE_CHANNEL_HOST`` / ``_PORT`` are set; the side
channel listens on PORT + data-parallel rank. ``--role both`` adds neither.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import dataclass

from workers.launchers.common import (
    CommonOptions,
    EngineLauncher,
    LaunchPlan,
    PortRange,
    check_passthrough,
    check_ports,
    common_options,
    missing_executable,
    port_number,
)

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_SIDE_CHANNEL_PORT = 5600
NIXL_TRANSFER_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
INSTALL = "pip install 'kvpick[vllm]' (vLLM needs a CUDA GPU)"


@dataclass(frozen=True)
class VllmOptions:
    """Everything ``vllm serve`` is built from. ``side_channel_host`` is only used for the
    prefill and decode roles."""

    common: CommonOptions
    prefix_caching_hash_algo: str | None = None
    side_channel_host: str = "localhost"
    side_channel_port: int = DEFAULT_SIDE_CHANNEL_PORT


MANAGED_FLAGS: dict[str, str] = {
    "--model": "use kvpick's --model",
    "--host": "use kvpick's --host",
    "--port": "use kvpick's --port",
    "--block-size": "use kvpick's --block-size",
    "--no-enable-prefix-caching": "kvpick needs prefix caching on",
    "--kv-events-config": "use kvpick's --kv-events-port, --kv-replay-port, --kv-topic, "
    "--kv-buffer-steps and --kv-hwm",
    "--kv-transfer-config": "use kvpick's --role",
    "--data-parallel-size": "use kvpick's --dp-size",
    "-dp": "use kvpick's --dp-size",
    "--served-model-name": "use kvpick's --served-model-name",
    "--prefix-caching-hash-algo": "use kvpick's --prefix-caching-hash-algo",
}


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def kv_events_config(opts: CommonOptions) -> dict[str, object]:
    """vLLM's ``--kv-events-config``: events on, the ZMQ publisher, kvpick's endpoints."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", **opts.kv_events_fields()}


def build_plan(opts: VllmOptions) -> LaunchPlan:
    """The ``vllm serve`` command for ``opts``; raises LauncherError on clashing ports or
    engine arguments that override kvpick's flags."""
    c = opts.common
    argv = [
        c.executable or "vllm",
        "serve",
        c.model,
        "--host",
        c.host,
        "--port",
        str(c.port),
        "--block-size",
        str(c.block_size),
        "--enable-prefix-caching",
        "--kv-events-config",
        _json(kv_events_config(c)),
        "--data-parallel-size",
        str(c.dp_size),
    ]
    if c.served_model_name is not None:
        argv += ["--served-model-name", c.served_model_name]
    if opts.prefix_caching_hash_algo is not None:
        argv += ["--prefix-caching-hash-algo", opts.prefix_caching_hash_algo]
    env: dict[str, str] = {}
    ports = c.common_ports()
    if c.disaggregated:
        argv += ["--kv-transfer-config", _json(NIXL_TRANSFER_CONFIG)]
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = opts.side_channel_host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(opts.side_channel_port)
        ports.append(
            PortRange(
                "NIXL side channel (ZMQ)",
                opts.side_channel_port,
                c.dp_size,
                "--nixl-side-channel-port",
            )
        )
    check_ports(c, ports)
    check_passthrough(c.passthrough, MANAGED_FLAGS)
    argv += c.passthrough
    return LaunchPlan(argv=argv, env=env, ports=ports)


def default_side_channel_host() -> str:
    """``$POD_IP`` when set (the Kubernetes downward API), else this host's address as its
    name resolves, else ``localhost`` (vLLM's own default, reachable only from this host)."""
    pod_ip = os.environ.get("POD_IP", "").strip()
    if pod_ip:
        return pod_ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "localhost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM")
    group.add_argument(
        "--prefix-caching-hash-algo",
        choices=HASH_ALGOS,
        default=None,
        help="vLLM's block hash function; sha256_cbor is the one other languages can "
        "reproduce (default: not passed, vLLM's own default, sha256)",
    )
    group.add_argument(
        "--nixl-side-channel-host",
        default=None,
        metavar="HOST",
        help="address the decode side reaches this engine's NIXL side channel on, as "
        "VLLM_NIXL_SIDE_CHANNEL_HOST; prefill/decode roles only (default: $POD_IP, else "
        "this host's resolved address)",
    )
    group.add_argument(
        "--nixl-side-channel-port",
        type=port_number,
        default=DEFAULT_SIDE_CHANNEL_PORT,
        metavar="PORT",
        help="base port of the NIXL side channel, as VLLM_NIXL_SIDE_CHANNEL_PORT; rank r "
        "listens on PORT+r; prefill/decode roles only (default: %(default)s)",
    )


def plan_from_args(args: argparse.Namespace) -> LaunchPlan:
    common = common_options(args)
    host = args.nixl_side_channel_host
    if host is None and common.disaggregated:
        host = default_side_channel_host()
    return build_plan(
        VllmOptions(
            common=common,
            prefix_caching_hash_algo=args.prefix_caching_hash_algo,
            side_channel_host=host or "localhost",
            side_channel_port=args.nixl_side_channel_port,
        )
    )


def find_missing(plan: LaunchPlan) -> str | None:
    return missing_executable(plan.argv[0], "vLLM", INSTALL)


LAUNCHER = EngineLauncher(
    name="vllm",
    help="exec vLLM's OpenAI server (vllm serve) with the flags kvpick needs",
    description="Build and exec 'vllm serve' with prefix caching on, the block size, KV "
    "events published over ZMQ (with a replay socket), data parallelism and, for the "
    "prefill/decode roles, the NixlConnector and its side-channel environment.",
    epilog="examples:\n"
    "  kvpick worker vllm --model Qwen/Qwen3-0.6B --dry-run\n"
    "  kvpick worker vllm --model Qwen/Qwen3-0.6B --role prefill --dp-size 2 \\\n"
    "      -- --tensor-parallel-size 2 --gpu-memory-utilization 0.85",
    executable_help="the vLLM command to run (default: 'vllm' on PATH)",
    add_arguments=add_arguments,
    plan=plan_from_args,
    find_missing=find_missing,
)
