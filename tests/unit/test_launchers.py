"""The engine launchers' commands, checked table-driven against each engine's documented flags
(vLLM 0.33 ``vllm serve``, SGLang 0.5.23 server arguments, TensorRT-LLM ``trtllm-serve`` and
its LLM-API options; sources in docs/launchers.md). The engines are not installed here, so the
built argv, environment and files are the thing under test."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.launchers import cli, sglang, trtllm, vllm
from workers.launchers.common import (
    CommonOptions,
    LauncherError,
    LaunchPlan,
    PortRange,
    check_passthrough,
    render_dry_run,
    write_atomically,
)

OPTIONS_PATH = Path("/tmp/kvpick-test/options.yaml")


def parser() -> argparse.ArgumentParser:
    """A stand-in for ``kvpick worker``: the launchers registered on a fresh subparsers."""
    root = argparse.ArgumentParser(prog="worker")
    cli.register(root.add_subparsers())
    return root


def plan_for(argv: list[str]) -> LaunchPlan:
    """Parse ``ENGINE ...`` as the CLI does and build the plan."""
    args = parser().parse_args(argv)
    launcher = {x.name: x for x in cli.LAUNCHERS}[argv[0]]
    return launcher.plan(args)


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


# --- the commands, one row per engine × role × data parallelism ---------------------------

VLLM_EVENTS_DP1 = (
    '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",'
    '"replay_endpoint":"tcp://*:5558","topic":""}'
)
VLLM_EVENTS_DP2 = VLLM_EVENTS_DP1.replace("5558", "5559")
NIXL = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
SGL_EVENTS_DP1 = (
    '{"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":""}'
)
SGL_EVENTS_DP2 = SGL_EVENTS_DP1.replace("5558", "5559")

# fmt: off
COMMANDS: list[tuple[str, list[str], list[str], dict[str, str]]] = [
    (
        "vllm both dp1",
        ["vllm", "--model", "org/m"],
        ["vllm", "serve", "org/m", "--host", "0.0.0.0", "--port", "8000", "--block-size", "16",
         "--enable-prefix-caching", "--kv-events-config", VLLM_EVENTS_DP1,
         "--data-parallel-size", "1"],
        {},
    ),
    (
        "vllm prefill dp2",
        ["vllm", "--model", "org/m", "--role", "prefill", "--dp-size", "2",
         "--nixl-side-channel-host", "10.0.0.9"],
        ["vllm", "serve", "org/m", "--host", "0.0.0.0", "--port", "8000", "--block-size", "16",
         "--enable-prefix-caching", "--kv-events-config", VLLM_EVENTS_DP2,
         "--data-parallel-size", "2", "--kv-transfer-config", NIXL],
        {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.9", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600"},
    ),
    (
        "vllm decode, every optional flag",
        ["vllm", "--model", "/models/m", "--role", "decode", "--host", "10.0.0.2",
         "--port", "8001", "--block-size", "32", "--served-model-name", "llama",
         "--prefix-caching-hash-algo", "sha256_cbor", "--nixl-side-channel-host", "10.0.0.2",
         "--nixl-side-channel-port", "5700", "--kv-topic", "kv@pod-a",
         "--kv-buffer-steps", "500", "--kv-hwm", "2000", "--executable", "/opt/bin/vllm"],
        ["/opt/bin/vllm", "serve", "/models/m", "--host", "10.0.0.2", "--port", "8001",
         "--block-size", "32", "--enable-prefix-caching", "--kv-events-config",
         '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",'
         '"replay_endpoint":"tcp://*:5558","topic":"kv@pod-a","buffer_steps":500,"hwm":2000}',
         "--data-parallel-size", "1", "--served-model-name", "llama",
         "--prefix-caching-hash-algo", "sha256_cbor", "--kv-transfer-config", NIXL],
        {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.2", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5700"},
    ),
    (
        "sglang both dp1",
        ["sglang", "--model", "org/m", "--executable", "/usr/bin/python3"],
        ["/usr/bin/python3", "-m", "sglang.launch_server", "--model-path", "org/m",
         "--host", "0.0.0.0", "--port", "8000", "--page-size", "16",
         "--kv-events-config", SGL_EVENTS_DP1, "--dp-size", "1", "--enable-metrics"],
        {},
    ),
    (
        "sglang prefill dp2",
        ["sglang", "--model", "org/m", "--role", "prefill", "--dp-size", "2",
         "--executable", "python3"],
        ["python3", "-m", "sglang.launch_server", "--model-path", "org/m",
         "--host", "0.0.0.0", "--port", "8000", "--page-size", "16",
         "--kv-events-config", SGL_EVENTS_DP2, "--dp-size", "2", "--enable-metrics",
         "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl",
         "--disaggregation-bootstrap-port", "8998"],
        {},
    ),
    (
        "sglang decode, own bootstrap port and name",
        ["sglang", "--model", "org/m", "--role", "decode", "--bootstrap-port", "9000",
         "--served-model-name", "m", "--block-size", "64", "--executable", "python3"],
        ["python3", "-m", "sglang.launch_server", "--model-path", "org/m",
         "--host", "0.0.0.0", "--port", "8000", "--page-size", "64",
         "--kv-events-config", SGL_EVENTS_DP1, "--dp-size", "1", "--enable-metrics",
         "--served-model-name", "m", "--disaggregation-mode", "decode",
         "--disaggregation-transfer-backend", "nixl", "--disaggregation-bootstrap-port", "9000"],
        {},
    ),
    (
        "trtllm both dp1",
        ["trtllm", "--model", "org/m", "--options-out", str(OPTIONS_PATH)],
        ["trtllm-serve", "serve", "org/m", "--host", "0.0.0.0", "--port", "8000",
         "--extra_llm_api_options", str(OPTIONS_PATH)],
        {},
    ),
    (
        "trtllm prefill dp2",
        ["trtllm", "--model", "org/m", "--role", "prefill", "--dp-size", "2",
         "--options-out", str(OPTIONS_PATH), "--served-model-name", "m"],
        ["trtllm-serve", "serve", "org/m", "--host", "0.0.0.0", "--port", "8000",
         "--tp_size", "2", "--served_model_name", "m",
         "--extra_llm_api_options", str(OPTIONS_PATH)],
        {},
    ),
]
# fmt: on


@pytest.mark.parametrize(
    ("argv", "expected", "env"), [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS]
)
def test_the_command_each_launcher_builds(
    argv: list[str], expected: list[str], env: dict[str, str]
) -> None:
    plan = plan_for(argv)
    assert plan.argv == expected
    assert plan.env == env


def test_vllm_events_json_turns_events_on_with_the_zmq_publisher() -> None:
    plan = plan_for(["vllm", "--model", "m", "--dp-size", "3", "--kv-events-port", "6000"])
    config = json.loads(flag_value(plan.argv, "--kv-events-config"))
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:6000",
        "replay_endpoint": "tcp://*:6003",
        "topic": "",
    }


def test_sglang_events_json_names_the_zmq_publisher_and_no_vllm_only_field() -> None:
    # specs/kv-events.md §7: without "publisher":"zmq" SGLang 0.5.23 starts the null
    # publisher and fails; "enable_kv_cache_events" does not exist in SGLang's config.
    plan = plan_for(["sglang", "--model", "m", "--kv-topic", "t"])
    config = json.loads(flag_value(plan.argv, "--kv-events-config"))
    assert config["publisher"] == "zmq"
    assert "enable_kv_cache_events" not in config
    assert config["topic"] == "t"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_no_kv_replay_leaves_the_replay_endpoint_out(engine: str) -> None:
    plan = plan_for([engine, "--model", "m", "--no-kv-replay"])
    config = json.loads(flag_value(plan.argv, "--kv-events-config"))
    assert "replay_endpoint" not in config
    assert [p.flag for p in plan.ports] == ["--port", "--kv-events-port"]


@pytest.mark.parametrize("engine", ["vllm", "sglang", "trtllm"])
@pytest.mark.parametrize("dp", [1, 2, 3, 8])
@pytest.mark.parametrize("events", [5557, 20080])
def test_default_replay_ports_start_after_every_ranks_events_port(
    engine: str, dp: int, events: int
) -> None:
    plan = plan_for([engine, "--model", "m", "--dp-size", str(dp), "--kv-events-port", str(events)])
    ports = {p.flag: p for p in plan.ports}
    assert ports["--kv-events-port"].first == events
    assert ports["--kv-events-port"].last == events + dp - 1
    assert ports["--kv-replay-port"].first == events + dp  # kv-events.md §1.2
    assert not ports["--kv-events-port"].overlaps(ports["--kv-replay-port"])


def test_the_ports_each_role_opens() -> None:
    def opened(argv: list[str]) -> dict[str, str]:
        return {p.flag: str(p) for p in plan_for(argv).ports}

    events = {"--port": "8000", "--kv-events-port": "5557-5558", "--kv-replay-port": "5559-5560"}
    assert opened(["vllm", "--model", "m", "--dp-size", "2"]) == events
    assert opened(["vllm", "--model", "m", "--dp-size", "2", "--role", "prefill"]) == {
        **events,
        "--nixl-side-channel-port": "5600-5601",
    }
    assert opened(["sglang", "--model", "m", "--dp-size", "2", "--role", "prefill"]) == {
        **events,
        "--bootstrap-port": "8998",
    }
    # The bootstrap server runs on the prefill side only.
    assert opened(["sglang", "--model", "m", "--dp-size", "2", "--role", "decode"]) == events
    assert opened(["trtllm", "--model", "m", "--dp-size", "2", "--role", "decode"]) == events
    assert opened(["trtllm", "--model", "m", "--no-kv-events-push"]) == {"--port": "8000"}


# --- validation ---------------------------------------------------------------------------

BAD_INPUTS: list[tuple[list[str], str]] = [
    (["vllm", "--model", "m", "--dp-size", "2", "--kv-replay-port", "5558"], "5559 or higher"),
    (["sglang", "--model", "m", "--kv-replay-port", "5557"], "overlaps the KV events ports"),
    (["trtllm", "--model", "m", "--dp-size", "4", "--kv-replay-port", "5554"], "5561 or higher"),
    (["vllm", "--model", "m", "--kv-events-port", "65535", "--dp-size", "2"], "past 65535"),
    (
        [
            "vllm",
            "--model",
            "m",
            "--kv-replay-port",
            "65535",
            "--dp-size",
            "2",
            "--kv-events-port",
            "6000",
        ],
        "past 65535",
    ),
    (["vllm", "--model", "m", "--kv-events-port", "7999", "--dp-size", "2"], "port clash"),
    (
        ["vllm", "--model", "m", "--role", "prefill", "--nixl-side-channel-port", "5558"],
        "NIXL side channel",
    ),
    (["sglang", "--model", "m", "--role", "prefill", "--bootstrap-port", "8000"], "port clash"),
    (["vllm", "--model", "m", "--no-kv-replay", "--kv-replay-port", "6000"], "contradict"),
    (["vllm", "--model", " "], "--model must not be empty"),
    (["vllm", "--model", "m", "stray"], "put arguments for the engine after '--'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_inputs_are_launcher_errors_with_a_reason(argv: list[str], message: str) -> None:
    with pytest.raises(LauncherError) as err:
        plan_for(argv)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_a_side_channel_port_is_only_checked_when_the_role_uses_it() -> None:
    plan = plan_for(["vllm", "--model", "m", "--nixl-side-channel-port", "5558"])
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in plan.env


@pytest.mark.parametrize(
    "argv",
    [
        ["vllm", "--model", "m", "--dp-size", "0"],
        ["vllm", "--model", "m", "--block-size", "-16"],
        ["vllm", "--model", "m", "--port", "0"],
        ["vllm", "--model", "m", "--kv-events-port", "70000"],
        ["sglang", "--model", "m", "--bootstrap-port", "x"],
        ["trtllm", "--model", "m", "--role", "context"],
        ["vllm", "--model", "m", "--prefix-caching-hash-algo", "md5"],
        ["trtllm", "--model", "m", "--event-buffer-max-size", "0"],
        ["vllm"],
    ],
)
def test_bad_flag_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


# --- arguments after '--' ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["vllm", "sglang", "trtllm"])
def test_arguments_after_double_dash_end_the_command_verbatim(engine: str) -> None:
    extra = ["--max-num-seqs", "64", "a b", "--json={\"k\": 'v'}", "--", "-x"]
    plan = plan_for([engine, "--model", "m", "--", *extra])
    assert plan.argv[-len(extra) :] == extra
    assert shlex.split(plan.command_line) == plan.argv


CONFLICTS: list[tuple[str, list[str], str]] = [
    ("vllm", ["--port", "9000"], "use kvpick's --port"),
    ("vllm", ["--block-size=32"], "use kvpick's --block-size"),
    ("vllm", ["--kv-events-config.endpoint", "tcp://*:1"], "--kv-events-port"),
    ("vllm", ["--no-enable-prefix-caching"], "prefix caching on"),
    ("vllm", ["-dp", "2"], "--dp-size"),
    ("vllm", ["--kv-transfer-config", "{}"], "--role"),
    ("sglang", ["--page-size", "1"], "use kvpick's --block-size"),
    ("sglang", ["--disable-radix-cache"], "prefix cache on"),
    ("sglang", ["--disaggregation-transfer-backend", "mooncake"], "NIXL"),
    ("sglang", ["--model", "x"], "--model"),
    ("trtllm", ["--config", "x.yaml"], "--llm-api-options"),
    ("trtllm", ["--extra_llm_api_options=x.yaml"], "--llm-api-options"),
]


@pytest.mark.parametrize(("engine", "extra", "instead"), CONFLICTS)
def test_engine_arguments_that_override_kvpick_are_refused(
    engine: str, extra: list[str], instead: str
) -> None:
    with pytest.raises(LauncherError) as err:
        plan_for([engine, "--model", "m", "--", *extra])
    assert instead in str(err.value)
    assert extra[0] in str(err.value)


def test_a_flag_that_only_shares_a_prefix_is_not_a_conflict() -> None:
    check_passthrough(["--portal", "--block-sizes"], {"--port": "", "--block-size": ""})


def test_trtllm_tensor_parallelism_is_free_until_dp_size_sets_it() -> None:
    plan = plan_for(["trtllm", "--model", "m", "--", "--tp_size", "4"])
    assert plan.argv[-2:] == ["--tp_size", "4"]
    with pytest.raises(LauncherError, match="attention data parallelism"):
        plan_for(["trtllm", "--model", "m", "--dp-size", "2", "--", "--tp_size", "4"])


# --- TensorRT-LLM's options file -----------------------------------------------------------


def trtllm_options(plan: LaunchPlan) -> dict[str, Any]:
    path = Path(flag_value(plan.argv, "--extra_llm_api_options"))
    assert list(plan.files) == [path]
    return yaml.safe_load(plan.files[path])


@pytest.mark.parametrize(
    ("role", "dp", "transceiver", "no_overlap", "attention_dp"),
    [
        ("both", 1, False, False, False),
        ("both", 4, False, False, True),
        ("prefill", 2, True, True, True),
        ("decode", 1, True, False, False),
    ],
)
def test_trtllm_options_per_role_and_dp(
    role: str, dp: int, transceiver: bool, no_overlap: bool, attention_dp: bool
) -> None:
    plan = plan_for(
        ["trtllm", "--model", "m", "--role", role, "--dp-size", str(dp), "--block-size", "64"]
    )
    options = trtllm_options(plan)
    kv = options["kv_cache_config"]
    assert kv["enable_block_reuse"] is True
    assert kv["tokens_per_block"] == 64
    assert kv["event_buffer_max_size"] > 0
    assert kv["kv_events_config"] == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": f"tcp://*:{5557 + dp}",
        "topic": "",
    }
    assert ("cache_transceiver_config" in options) is transceiver
    if transceiver:
        assert options["cache_transceiver_config"] == {"backend": "NIXL"}
    assert options.get("disable_overlap_scheduler", False) is no_overlap
    assert options.get("enable_attention_dp", False) is attention_dp
    assert ("--tp_size" in plan.argv) is attention_dp


def test_trtllm_without_push_keeps_only_the_pull_buffer() -> None:
    plan = plan_for(["trtllm", "--model", "m", "--no-kv-events-push"])
    kv = trtllm_options(plan)["kv_cache_config"]
    assert "kv_events_config" not in kv
    assert kv["event_buffer_max_size"] == 1024
    assert any("--no-kv-events-push" in note for note in plan.notes)


def test_trtllm_default_options_path_is_per_port(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    plan = plan_for(["trtllm", "--model", "m", "--port", "8123"])
    assert flag_value(plan.argv, "--extra_llm_api_options") == str(
        tmp_path / "kvpick-trtllm-8123.yaml"
    )


def test_trtllm_merges_the_users_options_under_kvpicks(tmp_path: Path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(
        "max_batch_size: 64\n"
        "kv_cache_config:\n"
        "  free_gpu_memory_fraction: 0.7\n"
        "  tokens_per_block: 32\n"
        "  enable_block_reuse: true\n"
        "cache_transceiver_config:\n"
        "  backend: UCX\n"
        "  max_tokens_in_buffer: 8192\n"
    )
    plan = plan_for(["trtllm", "--model", "m", "--role", "decode", "--llm-api-options", str(user)])
    options = trtllm_options(plan)
    assert options["max_batch_size"] == 64
    assert options["kv_cache_config"]["free_gpu_memory_fraction"] == 0.7
    assert options["kv_cache_config"]["tokens_per_block"] == 16
    assert options["cache_transceiver_config"] == {"backend": "NIXL", "max_tokens_in_buffer": 8192}
    replaced = sorted(n.split()[3] for n in plan.notes)
    # Only the values kvpick changed are reported, not the ones it agreed with.
    assert replaced == ["cache_transceiver_config.backend", "kv_cache_config.tokens_per_block"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "must hold a mapping"), ("a: [\n", "not valid YAML")],
)
def test_trtllm_rejects_unusable_user_options(tmp_path: Path, text: str, message: str) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(text)
    with pytest.raises(LauncherError, match=message):
        plan_for(["trtllm", "--model", "m", "--llm-api-options", str(user)])
    with pytest.raises(LauncherError, match="cannot read"):
        plan_for(["trtllm", "--model", "m", "--llm-api-options", str(tmp_path / "none")])


def test_merge_options_is_recursive_and_leaves_its_inputs_alone() -> None:
    user = {"a": {"b": 1, "c": 2}, "d": 3}
    ours = {"a": {"b": 9}, "e": 4}
    merged, replaced = trtllm.merge_options(user, ours)
    assert merged == {"a": {"b": 9, "c": 2}, "d": 3, "e": 4}
    assert replaced == ["a.b"]
    assert user == {"a": {"b": 1, "c": 2}, "d": 3}


# --- the vLLM side channel host -------------------------------------------------------------


def test_vllm_side_channel_host_defaults_to_pod_ip(monkeypatch) -> None:
    monkeypatch.setenv("POD_IP", "10.9.8.7")
    plan = plan_for(["vllm", "--model", "m", "--role", "decode"])
    assert plan.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.9.8.7"
    explicit = plan_for(
        ["vllm", "--model", "m", "--role", "decode", "--nixl-side-channel-host", "h"]
    )
    assert explicit.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "h"


def test_vllm_side_channel_host_without_pod_ip_is_this_hosts_address(monkeypatch) -> None:
    monkeypatch.delenv("POD_IP", raising=False)
    monkeypatch.setattr("socket.gethostname", lambda: "worker-0")
    monkeypatch.setattr("socket.gethostbyname", lambda name: {"worker-0": "10.1.1.1"}[name])
    assert vllm.default_side_channel_host() == "10.1.1.1"

    def unresolvable(name: str) -> str:
        raise OSError("no such host")

    monkeypatch.setattr("socket.gethostbyname", unresolvable)
    assert vllm.default_side_channel_host() == "localhost"


# --- building plans directly (no argparse) --------------------------------------------------


def test_builders_take_options_objects() -> None:
    common = CommonOptions(model="m", dp_size=2, kv_replay_port=5559, role="prefill")
    assert "--kv-transfer-config" in vllm.build_plan(vllm.VllmOptions(common)).argv
    assert sglang.build_plan(sglang.SglangOptions(common)).argv[:3] == [
        "python3",
        "-m",
        "sglang.launch_server",
    ]
    plan = trtllm.build_plan(trtllm.TrtllmOptions(common, options_path=OPTIONS_PATH))
    assert list(plan.files) == [OPTIONS_PATH]


# --- dry-run output --------------------------------------------------------------------------


def test_dry_run_is_a_script_ending_in_the_command() -> None:
    plan = LaunchPlan(
        argv=["engine", "serve", "it's", "--json", '{"a": 1}'],
        env={"A": "x y", "B": "1"},
        files={Path("/tmp/a b.yaml"): "k: v\n"},
        ports=[PortRange("HTTP", 8000, 1, "--port"), PortRange("events", 5557, 2, "--x")],
        notes=["something to know"],
    )
    text = render_dry_run("vllm", plan)
    lines = text.splitlines()
    assert shlex.split(lines[-1]) == plan.argv
    assert "export A='x y'" in lines
    assert "export B=1" in lines
    assert "# ports to open: 8000 HTTP; 5557-5558 events" in lines
    assert "# note: something to know" in lines
    start = lines.index("cat > '/tmp/a b.yaml' <<'KVPICK_EOF'")
    assert lines[start + 1 : start + 3] == ["k: v", "KVPICK_EOF"]


def test_run_reports_a_missing_engine_with_exit_127(capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(["vllm", "--model", "m", "--executable", "/nonexistent/vllm"])
    assert vllm.LAUNCHER.run(args) == 127
    err = capsys.readouterr().err
    assert "'/nonexistent/vllm'" in err
    assert "pip install 'kvpick[vllm]'" in err


def test_run_reports_a_launcher_error_with_exit_2(capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(["vllm", "--model", "m", "--", "--port", "1"])
    assert vllm.LAUNCHER.run(args) == 2
    assert capsys.readouterr().err.startswith("kvpick worker vllm: error: engine argument")


def test_the_options_file_replaces_a_symlink_instead_of_writing_through_it(
    tmp_path: Path,
) -> None:
    target = tmp_path / "target"
    target.write_text("precious\n")
    link = tmp_path / "sub" / "options.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    write_atomically(link, "k: v\n")
    assert target.read_text() == "precious\n"
    assert not link.is_symlink()
    assert link.read_text() == "k: v\n"
    assert [p.name for p in link.parent.iterdir()] == ["options.yaml"]  # no temporary left
