"""``kvpick worker trtllm``: ``trtllm-serve`` with block reuse, KV events and NIXL.

trtllm-serve takes most engine settings from an LLM-API options YAML, so the launcher writes
one and points ``--extra_llm_api_options`` at it::

    trtllm-serve serve MODEL --host H --port P [--tp_size N] [--served_model_name NAME]
        --extra_llm_api_options FILE [ENGINE_ARGS...]

    # FILE
    kv_cache_config:
      enable_block_reuse: true          # the prefix cache
      tokens_per_block: B               # the block size
      event_buffer_max_size: 1024       # > 0, or the engine keeps no KV events at all
      kv_events_config: {...}           # push mode: ZMQ publisher + replay (newer builds)
    enable_attention_dp: true           # --dp-size N > 1 (with --tp_size N)
    cache_transceiver_config:           # --role prefill|decode (context|generation)
      backend: NIXL
    disable_overlap_scheduler: true     # --role prefill (context servers)

A user YAML (``--llm-api-options``) is merged under kvpick's settings: kvpick's keys win and
every overridden key is reported. TensorRT-LLM facts are lower confidence than the other
engines' (specs/kv-events.md §6): the push publisher's payload format is unverified and older
builds reject ``kv_events_config`` (``--no-kv-events-push`` leaves it out; the pull API,
``POST /kv_cache_events``, stays available through ``event_buffer_max_size``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workers.launchers.common import (
    CommonOptions,
    EngineLauncher,
    LauncherError,
    LaunchPlan,
    check_passthrough,
    check_ports,
    common_options,
    missing_executable,
    positive_int,
)

DEFAULT_EVENT_BUFFER_MAX_SIZE = 1024
INSTALL = (
    "pip install 'kvpick[trtllm]' (TensorRT-LLM needs a CUDA GPU; see its installation "
    "guide for the CUDA and MPI prerequisites)"
)


@dataclass(frozen=True)
class TrtllmOptions:
    """Everything the trtllm-serve command and its options YAML are built from.
    ``extra_options`` is the user's own LLM-API options, already parsed."""

    common: CommonOptions
    options_path: Path
    extra_options: Mapping[str, Any] = field(default_factory=dict)
    kv_events_push: bool = True
    event_buffer_max_size: int = DEFAULT_EVENT_BUFFER_MAX_SIZE


MANAGED_FLAGS: dict[str, str] = {
    "--host": "use kvpick's --host",
    "--port": "use kvpick's --port",
    "--served_model_name": "use kvpick's --served-model-name",
    "--extra_llm_api_options": "use kvpick's --llm-api-options (merged into kvpick's file)",
    "--config": "use kvpick's --llm-api-options (merged into kvpick's file)",
}


def default_options_path(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"kvpick-trtllm-{port}.yaml"


def kvpick_options(opts: TrtllmOptions) -> dict[str, Any]:
    """The LLM-API options kvpick needs, before merging the user's."""
    c = opts.common
    kv_cache: dict[str, Any] = {
        "enable_block_reuse": True,
        "tokens_per_block": c.block_size,
        "event_buffer_max_size": opts.event_buffer_max_size,
    }
    if opts.kv_events_push:
        kv_cache["kv_events_config"] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            **c.kv_events_fields(),
        }
    options: dict[str, Any] = {"kv_cache_config": kv_cache}
    if c.dp_size > 1:
        options["enable_attention_dp"] = True
    if c.disaggregated:
        options["cache_transceiver_config"] = {"backend": "NIXL"}
    if c.role == "prefill":
        # Context servers run without the overlap scheduler (TensorRT-LLM's disaggregated
        # serving examples).
        options["disable_overlap_scheduler"] = True
    return options


def merge_options(
    user: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, Any], list[str]]:
    """``user`` with ``ours`` laid over it, recursively for nested mappings. Returns the
    merged mapping and the dotted keys where the user's value was replaced."""
    merged: dict[str, Any] = dict(user)
    replaced: list[str] = []
    for key, value in ours.items():
        path = f"{prefix}{key}"
        mine = merged.get(key)
        if isinstance(value, Mapping) and isinstance(mine, Mapping):
            merged[key], inner = merge_options(mine, value, path + ".")
            replaced += inner
            continue
        if key in merged and mine != value:
            replaced.append(path)
        merged[key] = value
    return merged, replaced


def render_options(options: Mapping[str, Any]) -> str:
    header = "# TensorRT-LLM LLM-API options written by 'kvpick worker trtllm'\n"
    return header + yaml.safe_dump(dict(options), sort_keys=False, default_flow_style=False)


def build_plan(opts: TrtllmOptions) -> LaunchPlan:
    """The trtllm-serve command and its options file for ``opts``; raises LauncherError on
    clashing ports or engine arguments that override kvpick's flags."""
    c = opts.common
    options, replaced = merge_options(opts.extra_options, kvpick_options(opts))
    argv = [
        c.executable or "trtllm-serve",
        "serve",
        c.model,
        "--host",
        c.host,
        "--port",
        str(c.port),
    ]
    if c.dp_size > 1:
        # Attention data parallelism: the tensor-parallel size is the world size, one
        # attention-DP rank (with its own KV cache and events) per GPU.
        argv += ["--tp_size", str(c.dp_size)]
    if c.served_model_name is not None:
        argv += ["--served_model_name", c.served_model_name]
    argv += ["--extra_llm_api_options", str(opts.options_path)]

    ports = c.common_ports() if opts.kv_events_push else c.common_ports()[:1]
    notes = [f"--llm-api-options value for {key} replaced by kvpick's" for key in replaced]
    if not opts.kv_events_push:
        notes.append(
            "KV events are not pushed (--no-kv-events-push): they are only kept for "
            "POST /kv_cache_events, and --kv-events-port / --kv-replay-port are unused"
        )
    check_ports(c, ports)
    managed = dict(MANAGED_FLAGS)
    if c.dp_size > 1:
        managed["--tp_size"] = managed["--tensor_parallel_size"] = (
            "--dp-size sets the tensor-parallel size for attention data parallelism"
        )
    check_passthrough(c.passthrough, managed)
    argv += c.passthrough
    return LaunchPlan(
        argv=argv,
        files={opts.options_path: render_options(options)},
        ports=ports,
        notes=notes,
    )


def load_user_options(path: Path) -> dict[str, Any]:
    """The user's LLM-API options YAML as a mapping (empty file → empty mapping)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LauncherError(f"cannot read --llm-api-options {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise LauncherError(f"--llm-api-options {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LauncherError(f"--llm-api-options {path} must hold a mapping of options")
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT-LLM")
    group.add_argument(
        "--llm-api-options",
        type=Path,
        default=None,
        metavar="FILE",
        help="your own LLM-API options YAML, merged under kvpick's (kvpick's keys win; "
        "each replaced key is reported)",
    )
    group.add_argument(
        "--options-out",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write the generated options YAML (default: "
        "$TMPDIR/kvpick-trtllm-<port>.yaml)",
    )
    group.add_argument(
        "--kv-events-push",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="publish KV events over ZMQ (kv_cache_config.kv_events_config, newer builds); "
        "--no-kv-events-push leaves it out for builds that reject it (default: push)",
    )
    group.add_argument(
        "--event-buffer-max-size",
        type=positive_int,
        default=DEFAULT_EVENT_BUFFER_MAX_SIZE,
        metavar="N",
        help="KV events the engine buffers (kv_cache_config.event_buffer_max_size; must be "
        "> 0 for any events) (default: %(default)s)",
    )


def plan_from_args(args: argparse.Namespace) -> LaunchPlan:
    common = common_options(args)
    extra = load_user_options(args.llm_api_options) if args.llm_api_options else {}
    return build_plan(
        TrtllmOptions(
            common=common,
            options_path=args.options_out or default_options_path(common.port),
            extra_options=extra,
            kv_events_push=args.kv_events_push,
            event_buffer_max_size=args.event_buffer_max_size,
        )
    )


def find_missing(plan: LaunchPlan) -> str | None:
    return missing_executable(plan.argv[0], "TensorRT-LLM", INSTALL)


LAUNCHER = EngineLauncher(
    name="trtllm",
    help="exec TensorRT-LLM's OpenAI server (trtllm-serve) with the flags kvpick needs",
    description="Build and exec 'trtllm-serve serve' with an LLM-API options YAML that turns "
    "on block reuse, sets tokens_per_block to the block size, keeps and publishes KV events, "
    "and for the prefill (context) / decode (generation) roles selects the NIXL cache "
    "transceiver. The YAML is written before the engine starts; --dry-run prints it instead.",
    epilog="examples:\n"
    "  kvpick worker trtllm --model Qwen/Qwen3-0.6B --dry-run\n"
    "  kvpick worker trtllm --model Qwen/Qwen3-0.6B --role prefill --dp-size 2 \\\n"
    "      --llm-api-options my-options.yaml -- --max_batch_size 64",
    executable_help="the trtllm-serve command to run (default: 'trtllm-serve' on PATH)",
    add_arguments=add_arguments,
    plan=plan_from_args,
    find_missing=find_missing,
)
