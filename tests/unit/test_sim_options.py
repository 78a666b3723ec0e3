"""``kvpick worker sim`` options: vLLM's config JSON and environment variables, checked."""

from __future__ import annotations

import argparse

import pytest

from workers.sim.options import OptionsError, add_arguments, from_args


def options(*argv: str, env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)), env or {})


def test_defaults_follow_vllm():
    opts = options()
    assert (opts.side_channel_host, opts.side_channel_port) == ("localhost", 5600)
    assert opts.kv_lease_s == 480.0
    assert opts.kv_load_failure_policy == "recompute" and opts.role == "both"
    assert not opts.kv_events.active


def test_nixl_environment_is_read():
    opts = options(
        "--role",
        "prefill",
        env={
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": "6000",
            "VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "12.5",
        },
    )
    assert (opts.side_channel_host, opts.side_channel_port, opts.kv_lease_s) == (
        "10.1.2.3",
        6000,
        12.5,
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"VLLM_NIXL_SIDE_CHANNEL_PORT": "x"}, "must be a port number"),
        (["--dp-size", "4"], {"VLLM_NIXL_SIDE_CHANNEL_PORT": "65534"}, "room for 4 rank"),
        ([], {"VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "inf"}, "finite number of seconds"),
        ([], {"VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "0"}, "finite number of seconds"),
        ([], {"VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "soon"}, "finite number of seconds"),
        (["--kv-block-bytes", "0"], {}, "--kv-block-bytes must be >= 1"),
        (["--kv-events-config", "{"], {}, "--kv-events-config"),
    ],
)
def test_bad_values_are_refused_with_the_reason(argv, env, message):
    with pytest.raises(OptionsError, match=message):
        options(*argv, env=env)
