"""``kvpick worker sim`` options, and vLLM's ``--kv-events-config`` JSON with its defaults."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any

from workers.sim.engine_hash import HASH_ALGOS


class OptionsError(ValueError):
    """A flag value the simulator cannot use; the message says which and why."""


@dataclass(slots=True)
class KvEventsConfig:
    """vLLM's ``KVEventsConfig`` fields and defaults (specs/kv-events.md §7)."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # None: "zmq" when enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def active(self) -> bool:
        return self.resolved_publisher == "zmq"

    @property
    def resolved_publisher(self) -> str:
        if self.publisher is not None:
            return self.publisher
        return "zmq" if self.enable_kv_cache_events else "null"

    @classmethod
    def parse(cls, text: str) -> KvEventsConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionsError(f"--kv-events-config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise OptionsError("--kv-events-config must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise OptionsError(
                f"--kv-events-config: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        cfg = cls(**raw)
        if cfg.resolved_publisher not in ("zmq", "null"):
            raise OptionsError(
                f"--kv-events-config: publisher must be 'zmq' or 'null', got {cfg.publisher!r}"
            )
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 0:
                raise OptionsError(f"--kv-events-config: {name} must be an integer >= 0")
        return cfg


@dataclass(slots=True)
class SimOptions:
    model: str = "sim-model"
    served_model_names: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    tokenizer: str | None = None
    block_size: int = 16
    num_blocks: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    max_waiting: int = 1024
    speedup: float = 1.0
    dp_size: int = 1
    hash_algo: str = "sha256_cbor"
    kv_events: KvEventsConfig = field(default_factory=KvEventsConfig)
    kv_events_shape: str = "map"
    role: str = "both"
    kv_block_bytes: int = 4096
    side_channel_host: str = "localhost"
    side_channel_port: int = 5600
    kv_lease_s: float = 480.0
    kv_load_failure_policy: str = "recompute"
    engine_id: str | None = None
    vocab_size: int = 32000

    @property
    def names(self) -> list[str]:
        return self.served_model_names or [self.model]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="sim-model", help="model name the server reports (default: %(default)s)")
    a(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="name(s) clients may use; repeatable (default: the --model value)",
    )
    a("--host", default="0.0.0.0", help="HTTP listen address (default: %(default)s)")
    a("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    a(
        "--tokenizer",
        default=None,
        help="HF tokenizer folder or hub id in the local cache; enables text prompts, chat "
        "and detokenized output (default: token ids only)",
    )
    a("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    a("--num-blocks", type=int, default=2048, help="KV blocks per rank (default: %(default)s)")
    a("--max-num-seqs", type=int, default=256, help="max running sequences (default: 256)")
    a(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="token budget of one scheduler step (default: %(default)s)",
    )
    a(
        "--max-model-len",
        type=int,
        default=None,
        help="max prompt + output tokens (default: the whole cache)",
    )
    a(
        "--max-waiting",
        type=int,
        default=1024,
        help="queued requests per rank beyond which requests get 503 (default: %(default)s)",
    )
    a(
        "--speedup",
        type=float,
        default=1.0,
        help="divide every simulated step time by this (default: %(default)s)",
    )
    a("--dp-size", type=int, default=1, help="data-parallel ranks (default: %(default)s)")
    a(
        "--prefix-caching-hash-algo",
        dest="hash_algo",
        choices=HASH_ALGOS,
        default="sha256_cbor",
        help="how engine block hashes are computed, as vLLM's flag (default: %(default)s)",
    )
    a(
        "--kv-events-config",
        default=None,
        metavar="JSON",
        help="vLLM's KV events config, e.g. '{\"enable_kv_cache_events\": true, "
        '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' '
        "(default: no events)",
    )
    a(
        "--kv-events-shape",
        choices=("map", "array"),
        default="map",
        help="event encoding: 'map' (vLLM >= 0.32) or the older positional 'array' "
        "(default: %(default)s)",
    )
    a(
        "--role",
        choices=("prefill", "decode", "both"),
        default="both",
        help="disaggregation role; prefill and decode move KV over NIXL (default: both)",
    )
    a(
        "--kv-block-bytes",
        type=int,
        default=4096,
        help="bytes of simulated KV per block moved over NIXL (default: %(default)s)",
    )
    a(
        "--kv-load-failure-policy",
        choices=("recompute", "fail"),
        default="recompute",
        help="decode role: when prompt KV cannot be read from the prefill engine or arrives "
        "with the wrong content, compute the prompt here ('recompute', vLLM's default) or "
        "fail the request with 500 ('fail') (default: %(default)s)",
    )
    a(
        "--engine-id",
        default=None,
        help="prefill role: the engine id decode engines see in kv_transfer_params, as "
        "vLLM's kv_transfer_config engine_id; ranks add _dp<rank> (default: a random uuid)",
    )
    a("--vocab-size", type=int, default=32000, help="ids sampled without a tokenizer")


def from_args(args: argparse.Namespace, env: dict[str, str]) -> SimOptions:
    """Validated options; raises :class:`OptionsError`."""
    checks: list[tuple[bool, str]] = [
        (args.block_size >= 1, "--block-size must be >= 1"),
        (args.num_blocks >= 1, "--num-blocks must be >= 1"),
        (args.max_num_seqs >= 1, "--max-num-seqs must be >= 1"),
        (args.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be >= 1"),
        (args.max_waiting >= 0, "--max-waiting must be >= 0"),
        (args.speedup > 0, "--speedup must be > 0"),
        (args.dp_size >= 1, "--dp-size must be >= 1"),
        (0 <= args.port <= 65535, "--port must be in 0..65535"),
        (args.kv_block_bytes >= 1, "--kv-block-bytes must be >= 1"),
        (args.vocab_size >= 2, "--vocab-size must be >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise OptionsError(message)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise OptionsError("--max-model-len must be >= 2")
    events = KvEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None
    port_raw = env.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600")
    if not port_raw.isdigit() or int(port_raw) + args.dp_size - 1 > 65535:
        raise OptionsError(
            f"VLLM_NIXL_SIDE_CHANNEL_PORT must be a port number (0: any free port), and leave "
            f"room for {args.dp_size} rank(s); got {port_raw!r}"
        )
    lease_raw = env.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", "480")
    try:
        lease_s = float(lease_raw)
    except ValueError:
        lease_s = -1.0
    if not (lease_s > 0 and math.isfinite(lease_s)):
        raise OptionsError(
            "VLLM_NIXL_ABORT_REQUEST_TIMEOUT must be a finite number of seconds > 0, "
            f"got {lease_raw!r}"
        )
    return SimOptions(
        model=args.model,
        served_model_names=list(args.served_model_name),
        host=args.host,
        port=args.port,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        speedup=args.speedup,
        dp_size=args.dp_size,
        hash_algo=args.hash_algo,
        kv_events=events or KvEventsConfig(),
        kv_events_shape=args.kv_events_shape,
        role=args.role,
        kv_block_bytes=args.kv_block_bytes,
        side_channel_host=env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost"),
        side_channel_port=int(port_raw),
        kv_lease_s=lease_s,
        kv_load_failure_policy=args.kv_load_failure_policy,
        engine_id=args.engine_id,
        vocab_size=args.vocab_size,
    )


def describe(opts: SimOptions) -> dict[str, Any]:
    """The options as one log-friendly dict."""
    return {
        "model": opts.names,
        "port": opts.port,
        "dp_size": opts.dp_size,
        "blocks": opts.num_blocks,
        "block_size": opts.block_size,
        "speedup": opts.speedup,
        "role": opts.role,
        "kv_events": opts.kv_events.endpoint if opts.kv_events.active else None,
    }
