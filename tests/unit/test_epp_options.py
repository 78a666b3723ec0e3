"""The ``kvpick epp`` command line (epp.options): spellings, Go booleans and durations, the
environment, the accepted-but-ignored reference flags, validation, and the argument lists real
deployers pass."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.options import (
    BY_NAME,
    FLAGS,
    EppOptions,
    HelpRequested,
    OptionsError,
    epp_help,
    parse_epp_args,
    parse_go_duration,
    parse_size,
    spellings,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "epp-flags.md"
NO_ENV: dict[str, str] = {}


def parse(*argv: str, env: dict[str, str] | None = None) -> EppOptions:
    return parse_epp_args(list(argv), env=NO_ENV if env is None else env)


def error_of(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(OptionsError) as info:
        parse(*argv, env=env)
    return str(info.value)


def ignored_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "epp.options" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "default-plugins.yaml"
    path.write_text("apiVersion: inference.networking.x-k8s.io/v1alpha1\n")
    return str(path)


# --- Deployers' argument lists -----------------------------------------------------------------


def test_upstream_helm_chart_args(config_file: str, caplog: pytest.LogCaptureFixture) -> None:
    argv = [
        "--pool-name", "vllm-llama3-8b-instruct",
        "--pool-namespace", "default",
        "--pool-group", "inference.networking.k8s.io",
        "--zap-encoder", "json",
        "--config-file", config_file,
        "--tracing=false",
        "-v", "1",
        "--grpc-port", "9002",
        "--grpc-health-port", "9003",
        "--metrics-port", "9090",
        "--enable-pprof=true",
    ]  # fmt: skip
    caplog.set_level(logging.WARNING, logger="epp.options")
    opts = parse_epp_args(argv, env={"NAMESPACE": "other"})
    assert opts.pool_name == "vllm-llama3-8b-instruct"
    assert opts.pool_namespace == "default"  # the flag beats $NAMESPACE
    assert opts.pool_group == "inference.networking.k8s.io"
    assert opts.log_format == "json"
    assert opts.config_file == config_file
    assert opts.verbosity == 1
    assert opts.log_level == "DEBUG"
    assert (opts.grpc_port, opts.grpc_health_port, opts.metrics_port) == (9002, 9003, 9090)
    assert opts.secure_serving is True
    assert opts.discovery == "pool"
    assert opts.ignored == ("--tracing", "--enable-pprof")
    assert ignored_warnings(caplog) == [
        "flag --tracing is accepted for compatibility with the reference EPP and ignored: "
        "kvpick does not emit OpenTelemetry traces yet",
        "flag --enable-pprof is accepted for compatibility with the reference EPP and ignored: "
        "Go profiling endpoint; kvpick is a Python process (profile it with py-spy)",
    ]


def test_upstream_chart_engine_variants_with_literal_quotes(
    config_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The chart renders these without a shell, so the quotes reach the process.
    argv = [
        "--pool-name", "pool",
        "--total-queued-requests-metric=\"trtllm_num_requests_waiting\"",
        "--kv-cache-usage-percentage-metric=\"trtllm_kv_cache_utilization\"",
        "--model-server-metrics-path=\"/prometheus/metrics\"",
        "--lora-info-metric", "",
        "--zap-encoder", "json",
        "--config-file", config_file,
        "--ha-enable-leader-election",
        "--tracing=false",
        "--metrics-endpoint-auth=false",
    ]  # fmt: skip
    caplog.set_level(logging.WARNING, logger="epp.options")
    opts = parse_epp_args(argv, env=NO_ENV)
    assert opts.model_server_metrics_path == "/prometheus/metrics"
    assert opts.ignored == (
        "--total-queued-requests-metric",
        "--kv-cache-usage-percentage-metric",
        "--lora-info-metric",
        "--ha-enable-leader-election",
        "--tracing",
        "--metrics-endpoint-auth",
    )
    assert len(ignored_warnings(caplog)) == 6
    metric_warnings = [w for w in ignored_warnings(caplog) if "-metric " in w]
    assert all(
        w.endswith("kvpick chooses metric names per endpoint engine") for w in metric_warnings
    )


def test_dynamo_chart_single_dash_kebab() -> None:
    opts = parse(
        "-pool-name", "p", "-pool-namespace", "ns", "-grpc-port", "9002", "-grpc-health-port",
        "9003",
    )  # fmt: skip
    assert (opts.pool_name, opts.pool_namespace) == ("p", "ns")
    assert (opts.grpc_port, opts.grpc_health_port) == (9002, 9003)


def test_legacy_camel_case() -> None:
    opts = parse("-poolName", "p", "-grpcPort", "9002", "-secureServing=false")
    assert opts.pool_name == "p"
    assert opts.grpc_port == 9002
    assert opts.secure_serving is False
    assert opts.sources["pool_name"] == "-poolName"


def test_legacy_v0_flags_are_accepted_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="epp.options")
    opts = parse("-poolName", "p", "-targetEndpointKey", "x-gateway-destination-endpoint",
                 "-refreshPodsInterval", "10s", "-refreshMetricsInterval", "100ms")  # fmt: skip
    assert opts.refresh_metrics_interval == pytest.approx(0.1)
    assert opts.ignored == ("--target-endpoint-key", "--refresh-pods-interval")


# --- Spellings -------------------------------------------------------------------------------

# (flag, raw value, field, expected value)
SPELLING_CASES = [
    ("pool-name", "my-pool", "pool_name", "my-pool"),
    ("grpc-port", "9100", "grpc_port", 9100),
    ("refresh-metrics-interval", "1m30s", "refresh_metrics_interval", 90.0),
    ("block-size", "32", "block_size", 32),
    ("kv-events-port", "6000", "kv_events_port", 6000),
    ("endpoint-target-ports", "8000,8001", "endpoint_target_ports", (8000, 8001)),
    ("served-model-name", "llama", "served_model_names", ("llama",)),
    ("overlap-credit", "0.5", "overlap_credit", 0.5),
    ("model-server-metrics-scheme", "https", "model_server_metrics_scheme", "https"),
]


def spell(name: str, dashes: str, style: int) -> str:
    return dashes + spellings(name)[style]


@given(
    case=st.sampled_from(SPELLING_CASES),
    dashes=st.sampled_from(["-", "--"]),
    style=st.integers(0, 2),
    joined=st.booleans(),
)
def test_every_spelling_sets_the_field(
    case: tuple[str, str, str, object], dashes: str, style: int, joined: bool
) -> None:
    name, raw, field_name, expected = case
    flag = spell(name, dashes, style)
    argv = [f"{flag}={raw}"] if joined else [flag, raw]
    if field_name == "endpoint_target_ports":
        argv = ["--endpoint-selector", "app=x", *argv]
    opts = parse(*argv)
    assert getattr(opts, field_name) == expected
    assert opts.sources[field_name] == flag


@given(
    spec=st.sampled_from([s for s in FLAGS if s.kind == "bool"]),
    dashes=st.sampled_from(["-", "--"]),
    style=st.integers(0, 2),
)
def test_every_bool_spelling_is_a_bare_true_never_eating_the_next_argument(
    spec: object, dashes: str, style: int
) -> None:
    assert isinstance(spec, type(FLAGS[0]))
    flag = spell(spec.name, dashes, style)
    opts = parse(flag, "--grpc-port", "9100")
    assert opts.grpc_port == 9100
    if spec.field is not None:
        assert getattr(opts, spec.field) is True
    else:
        assert opts.ignored == (spec.flag,)


def test_spellings_are_kebab_snake_camel() -> None:
    assert spellings("model-server-metrics-path") == (
        "model-server-metrics-path",
        "model_server_metrics_path",
        "modelServerMetricsPath",
    )


def test_no_spelling_names_two_flags() -> None:
    seen: dict[str, str] = {}
    for spec in FLAGS:
        for spelling in spellings(spec.name):
            assert seen.setdefault(spelling, spec.name) == spec.name


def test_repeated_flag_last_wins_and_lists_accumulate() -> None:
    opts = parse(
        "--block-size=8", "--block_size", "64", "--served-model-name", "a,b",
        "-servedModelName=c", "--served-model-name", " d , ,e",
    )  # fmt: skip
    assert opts.block_size == 64
    assert opts.served_model_names == ("a", "b", "c", "d", "e")


def test_value_may_be_empty_or_contain_equals_signs() -> None:
    opts = parse("--endpoint-selector", "app=vllm,env=prod", "--endpoint-target-ports=8000")
    assert opts.endpoint_selector == "app=vllm,env=prod"
    opts = parse("--endpoint-selector=app=vllm", "--endpoint-target-ports", "8000")
    assert opts.endpoint_selector == "app=vllm"
    assert parse("--cert-path=", "--tokenizer", "").cert_path is None


def test_empty_pool_namespace_falls_back_to_env_as_in_the_reference() -> None:
    assert parse("--pool-namespace=", env={"NAMESPACE": "team-a"}).pool_namespace == "team-a"
    assert parse("--pool-namespace=").pool_namespace == "default"


# --- Booleans --------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["1", "t", "T", "true", "TRUE", "True"])
def test_go_true_words(word: str) -> None:
    assert parse("--secure-serving=false", f"--health-checking={word}").health_checking is True


@pytest.mark.parametrize("word", ["0", "f", "F", "false", "FALSE", "False"])
def test_go_false_words(word: str) -> None:
    assert parse(f"--secure-serving={word}").secure_serving is False


@pytest.mark.parametrize("word", ["yes", "no", "on", "", "tRUE", "2"])
def test_other_bool_words_are_errors(word: str) -> None:
    message = error_of(f"--secure-serving={word}")
    assert message.startswith(f"--secure-serving={word!r}: expects true or false")


@pytest.mark.parametrize("word", ["false", "true", "0", "1", "False", "T"])
def test_separate_bool_value_is_an_error_showing_the_equals_form(word: str) -> None:
    message = error_of("--pool-name", "p", "-secure-serving", word)
    assert f"write -secure-serving={word}" in message
    assert "boolean" in message


def test_separate_bool_word_after_an_ignored_bool_is_an_error_too() -> None:
    assert "write --tracing=false" in error_of("--tracing", "false")


def test_no_prefix_turns_a_bool_off() -> None:
    assert parse("--no-token-data").token_data is False
    assert parse("-no_token_data").token_data is False
    assert parse("--noTokenData").token_data is False
    assert parse("--token-data=false").token_data is False
    assert parse("--no-secure-serving").secure_serving is False
    assert "takes no value" in error_of("--no-token-data=true")


def test_no_prefix_is_only_for_bools() -> None:
    assert error_of("--no-block-size").startswith("unknown flag --no-block-size")


def test_token_data_from_env() -> None:
    assert parse(env={"KVPICK_TOKEN_DATA": "false"}).token_data is False
    assert parse("--token-data", env={"KVPICK_TOKEN_DATA": "false"}).token_data is True


# --- Durations and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("50ms", 0.05),
        ("2s", 2.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("300us", 0.0003),
        ("300µs", 0.0003),
        ("1500ns", 1.5e-6),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1h2m3.5s", 3723.5),
        ("-2s", -2.0),
        ("+1m", 60.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "50", "1.5", "s", "1x", "1 s", "1s ", "ms50", "1d", "-"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_duration_flags_are_float_seconds() -> None:
    opts = parse("--refresh-metrics-interval=100ms", "--metrics-staleness-threshold", "1m",
                 "--drain-timeout=0")  # fmt: skip
    assert opts.refresh_metrics_interval == pytest.approx(0.1)
    assert opts.metrics_staleness_threshold == 60.0
    assert opts.drain_timeout == 0.0


def test_reference_duration_without_unit_is_an_error() -> None:
    message = error_of("--drain-timeout=30")
    assert message == (
        "--drain-timeout='30': a duration needs a unit (ns, us, ms, s, m, h), e.g. 50ms or 2s"
    )


def test_kvpick_duration_takes_seconds_or_go_duration() -> None:
    assert parse("--active-request-expiry=120").active_request_expiry == 120.0
    assert parse("--active-request-expiry=2m").active_request_expiry == 120.0
    assert parse(env={"KVPICK_ACTIVE_REQUEST_EXPIRY": "1.5"}).active_request_expiry == 1.5


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4194304", 4194304),
        ("10MiB", 10 * 2**20),
        ("10Mi", 10 * 2**20),
        ("25MB", 25_000_000),
        ("1Gi", 2**30),
        ("64k", 64_000),
        ("1e6", 1_000_000),
        ("1.5Ki", 1536),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "10 MiB", "-1", "10XB", "0.5"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_grpc_message_size_flags() -> None:
    opts = parse("--grpc-max-recv-msg-size=32MiB")
    assert opts.grpc_max_recv_msg_size == 32 * 2**20
    assert opts.grpc_max_recv_bytes == 32 * 2**20
    assert opts.grpc_max_send_msg_size is None
    assert opts.grpc_max_send_bytes == 64 * 2**20
    assert parse("--grpc-max-send-msg-size=0").grpc_max_send_msg_size is None
    assert "must be ≤ 2147483647" in error_of("--grpc-max-recv-msg-size=4Gi")


# --- Environment -----------------------------------------------------------------------------


def test_env_is_read_when_the_flag_is_absent(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    opts = parse(
        env={
            "KVPICK_BLOCK_SIZE": "32",
            "KVPICK_ENDPOINTS_FILE": str(endpoints),
            "KVPICK_POLICY": "least-loaded",
            "KVPICK_SERVED_MODEL_NAME": "a, b",
            "KVPICK_TEMPERATURE": "0.25",
            "KVPICK_BUSY_PREFILL_TOKENS": "100000",
        }
    )
    assert opts.block_size == 32
    assert opts.endpoints_file == str(endpoints)
    assert opts.discovery == "file"
    assert opts.policy == "least-loaded"
    assert opts.served_model_names == ("a", "b")
    assert opts.temperature == 0.25
    assert opts.busy_prefill_tokens == 100_000
    assert opts.sources["block_size"] == "env KVPICK_BLOCK_SIZE"
    assert opts.source("fallbacks") == "default"


def test_command_line_beats_env_beats_default() -> None:
    env = {"KVPICK_BLOCK_SIZE": "32", "KVPICK_SERVED_MODEL_NAME": "from-env"}
    opts = parse("--block-size", "64", "--served-model-name", "from-flag", env=env)
    assert opts.block_size == 64
    assert opts.served_model_names == ("from-flag",)
    assert parse(env=env).block_size == 32
    assert parse().block_size == 16


def test_empty_env_counts_as_unset() -> None:
    assert parse(env={"KVPICK_BLOCK_SIZE": "", "NAMESPACE": ""}).block_size == 16
    assert parse(env={"NAMESPACE": ""}).pool_namespace == "default"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("KVPICK_BLOCK_SIZE", "sixteen", "--block-size expects a whole number"),
        ("KVPICK_TOKEN_DATA", "yes", "--token-data expects true or false"),
        ("KVPICK_POLICY", "best", "--policy expects one of kv-aware"),
        ("KVPICK_OVERLAP_CREDIT", "nan", "--overlap-credit expects a number"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, value: str, expected: str) -> None:
    assert error_of(env={var: value}).startswith(f"{var}={value!r}: {expected}")


def test_out_of_range_env_value_names_the_variable() -> None:
    assert error_of(env={"KVPICK_BLOCK_SIZE": "0"}) == (
        "--block-size must be ≥ 1, got 0 (from KVPICK_BLOCK_SIZE)"
    )


def test_pool_namespace_from_env_namespace() -> None:
    assert parse(env={"NAMESPACE": "team-a"}).pool_namespace == "team-a"
    assert parse().pool_namespace == "default"
    assert parse("-poolNamespace=ns", env={"NAMESPACE": "team-a"}).pool_namespace == "ns"


def test_reference_flags_do_not_read_kvpick_env() -> None:
    assert parse(env={"KVPICK_GRPC_PORT": "1234"}).grpc_port == 9002


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPICK_DECISION_LOG_SIZE", "7")
    monkeypatch.delenv("NAMESPACE", raising=False)
    assert parse_epp_args([]).decision_log_size == 7


# --- Ignored and unknown flags ---------------------------------------------------------------


def test_each_ignored_flag_warns_once_whatever_the_spelling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="epp.options")
    opts = parse(
        "--tracing", "-tracing=false", "--enable-pprof=false", "-enablePprof",
        "--tls-min-version", "VersionTLS13", "--tls_min_version=VersionTLS12",
    )  # fmt: skip
    assert opts.ignored == ("--tracing", "--enable-pprof", "--tls-min-version")
    warnings = ignored_warnings(caplog)
    assert len(warnings) == 3
    assert warnings[2] == (
        "flag --tls-min-version is accepted for compatibility with the reference EPP and "
        "ignored: kvpick uses the gRPC library's TLS defaults"
    )


def test_every_ignored_flag_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="epp.options")
    argv: list[str] = []
    expected = []
    for spec in FLAGS:
        if spec.ignored is None:
            continue
        expected.append(spec.flag)
        argv += [spec.flag] if spec.kind == "bool" else [spec.flag, "whatever-value"]
    opts = parse(*argv)
    assert opts.ignored == tuple(expected)
    assert len(ignored_warnings(caplog)) == len(expected)
    assert {"--kv-cache-usage-percentage-metric", "--zap-devel", "--tracing"} <= set(expected)
    assert "--kubeconfig" not in expected  # kept for Kubernetes discovery


def test_cert_reload_flags_are_used(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="epp.options")
    opts = parse("--enable-cert-reload", "--cert-reload-interval", "500ms")
    assert opts.enable_cert_reload is True and opts.cert_reload_interval == 0.5
    assert opts.ignored == () and not ignored_warnings(caplog)
    assert parse().cert_reload_interval == 2.0


def test_no_warning_without_ignored_flags(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="epp.options")
    assert parse("--pool-name", "p", "--block-size=32").ignored == ()
    assert ignored_warnings(caplog) == []


@pytest.mark.parametrize(
    ("flag", "suggestion"),
    [
        ("--pool-nmae", "--pool-name"),
        ("-poolNmae", "--pool-name"),
        ("--blocksize", "--block-size"),
        ("--grpc_prot", "--grpc-port"),
        ("--secure-servng", "--secure-serving"),
        ("--no-token-dta", "--no-token-data"),
    ],
)
def test_unknown_flag_suggests_the_nearest(flag: str, suggestion: str) -> None:
    assert error_of(flag, "x") == (
        f"unknown flag {flag}; did you mean {suggestion}? (kvpick epp --help lists every flag)"
    )


def test_unknown_flag_without_a_near_name() -> None:
    message = error_of("--quux=1")
    assert message.startswith("unknown flag --quux")
    assert "did you mean" not in message


# --- Command-line shape ----------------------------------------------------------------------


def test_positional_arguments_are_errors() -> None:
    assert error_of("serve").startswith("unexpected argument 'serve'")
    assert error_of("--pool-name", "p", "extra").startswith("unexpected argument 'extra'")
    assert error_of("--", "x").startswith("unexpected argument 'x'")
    assert parse("--block-size=8", "--").block_size == 8


def test_missing_value() -> None:
    assert error_of("--pool-name") == "--pool-name needs a value (--pool-name=VALUE)"
    assert error_of("--pool-name", "--grpc-port", "1").startswith(
        "--pool-name needs a value but is followed by the flag --grpc-port"
    )


def test_value_beginning_with_a_dash_that_is_no_flag_is_taken() -> None:
    # taken as the value, then rejected by validation rather than as a missing value
    assert error_of("--fallbacks", "-1") == "--fallbacks must be ≥ 0, got -1"


def test_triple_dash_is_an_error() -> None:
    assert error_of("---pool-name=p").startswith("bad flag '---pool-name=p'")


@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_help_is_requested(flag: str) -> None:
    with pytest.raises(HelpRequested) as info:
        parse("--pool-name", "p", flag)
    assert str(info.value) == epp_help()


# --- Logging ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "level", "verbosity"),
    [
        ([], {}, "INFO", 0),
        (["-v", "1"], {}, "DEBUG", 1),
        (["--v=0"], {}, "INFO", 0),
        (["-v=4"], {}, "DEBUG", 4),
        (["--zap-log-level=debug"], {}, "DEBUG", 0),
        (["--zap-log-level", "error"], {}, "ERROR", 0),
        (["--zap-log-level=3"], {}, "DEBUG", 3),
        (["--zap-log-level=error", "-v", "2"], {}, "DEBUG", 2),
        (["-v", "1", "--log-level=warning"], {}, "WARNING", 1),
        ([], {"KVPICK_LOG_LEVEL": "error"}, "ERROR", 0),
        (["-v", "1"], {"KVPICK_LOG_LEVEL": "ERROR"}, "DEBUG", 1),
        (["--log-level=WARN"], {}, "WARNING", 0),
    ],
)
def test_log_level(argv: list[str], env: dict[str, str], level: str, verbosity: int) -> None:
    opts = parse(*argv, env=env)
    assert (opts.log_level, opts.verbosity) == (level, verbosity)


def test_log_format_and_bad_values() -> None:
    assert parse("--zap-encoder=console").log_format == "console"
    assert "expects one of console, json" in error_of("--zap-encoder=text")
    assert "expects debug, info" in error_of("--zap-log-level=0")
    assert error_of("-v", "-1") == "-v must be ≥ 0, got -1"


# --- Validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-port=0"], "--grpc-port must be ≥ 1, got 0"),
        (["--metrics-port", "65536"], "--metrics-port must be ≤ 65535, got 65536"),
        (["--grpc-port=abc"], "--grpc-port='abc': expects a whole number"),
        (["--kv-events-port=70000"], "--kv-events-port must be ≤ 65535, got 70000"),
        (["--kv-replay-port=0"], "--kv-replay-port must be ≥ 1, got 0"),
        (["--block-size=0"], "--block-size must be ≥ 1, got 0"),
        (["-blockSize", "0"], "--block-size must be ≥ 1, got 0 (from -blockSize)"),
        (["--fallbacks=-1"], "--fallbacks must be ≥ 0, got -1"),
        (["--overlap-credit=-0.5"], "--overlap-credit must be ≥ 0, got -0.5"),
        (["--host-credit=-1"], "--host-credit must be ≥ 0, got -1"),
        (["--disk-credit=-1"], "--disk-credit must be ≥ 0, got -1"),
        (["--external-credit=-1"], "--external-credit must be ≥ 0, got -1"),
        (["--credit-decay=-1"], "--credit-decay must be ≥ 0, got -1"),
        (["--temperature=-0.1"], "--temperature must be ≥ 0, got -0.1"),
        (["--temperature=inf"], "--temperature='inf': expects a number"),
        (["--busy-decode-blocks-frac=0"], "--busy-decode-blocks-frac must be > 0, got 0"),
        (["--max-num-batched-tokens=0"], "--max-num-batched-tokens must be ≥ 1, got 0"),
        (["--refresh-metrics-interval=0"], "--refresh-metrics-interval must be > 0, got 0"),
        (["--drain-timeout=-1s"], "--drain-timeout must be ≥ 0, got -1s"),
        (["--active-request-expiry=0"], "--active-request-expiry must be > 0, got 0"),
        (["--policy=fastest"], "--policy='fastest': expects one of kv-aware, random"),
        (["--pool-group=example.com"], "--pool-group='example.com': expects one of"),
        (["--model-server-metrics-path=metrics"], "--model-server-metrics-path must begin"),
        (["--model-server-metrics-scheme=ftp"], "--model-server-metrics-scheme='ftp'"),
    ],
)
def test_invalid_values(argv: list[str], message: str) -> None:
    assert error_of(*argv).startswith(message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-port=9090"], "--grpc-port and --metrics-port are both 9090"),
        (["--grpc-health-port=9002"], "--grpc-port and --grpc-health-port are both 9002"),
        (["--metrics-port=9003"], "--grpc-health-port and --metrics-port are both 9003"),
    ],
)
def test_listener_ports_must_differ(argv: list[str], message: str) -> None:
    assert error_of(*argv).startswith(message)


def test_port_bounds_are_inclusive() -> None:
    opts = parse("--grpc-port=1", "--metrics-port=65535", "--kv-replay-port=65535")
    assert (opts.grpc_port, opts.metrics_port, opts.kv_replay_port) == (1, 65535, 65535)


def test_config_file_and_text_are_exclusive(config_file: str) -> None:
    assert error_of("--config-file", config_file, "--config-text=plugins: []") == (
        "--config-file and --config-text cannot both be set; choose one"
    )
    assert parse("--config-text", "plugins: []").config_text == "plugins: []"


def test_config_file_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert error_of(f"--config-file={missing}") == f"--config-file {missing!r} is not a file"


def test_cert_path_needs_crt_and_key_when_serving_tls(tmp_path: Path) -> None:
    assert error_of("--cert-path", str(tmp_path / "x")).endswith("is not a directory")
    (tmp_path / "tls.crt").write_text("cert")
    assert error_of("--cert-path", str(tmp_path)).endswith("has no tls.key")
    (tmp_path / "tls.key").write_text("key")
    assert parse("--cert-path", str(tmp_path)).cert_path == str(tmp_path)


def test_cert_path_is_not_checked_without_tls(tmp_path: Path) -> None:
    opts = parse("--secure-serving=false", "--cert-path", str(tmp_path / "absent"))
    assert opts.secure_serving is False


def test_client_ca_needs_tls(tmp_path: Path) -> None:
    ca = str(tmp_path / "ca.crt")
    assert parse("--client-ca", ca).client_ca == ca  # the file is read when the port opens
    message = error_of("--secure-serving=false", "--client-ca", ca)
    assert message.startswith("--client-ca asks for client certificates")
    assert "cannot be used with --secure-serving=false" in message
    env = {"KVPICK_CLIENT_CA": ca}
    assert "(from KVPICK_CLIENT_CA)" in error_of("--secure-serving=false", env=env)
    assert parse("--secure-serving=false", "--client-ca=").client_ca is None


def test_served_model_names_repeat_and_split() -> None:
    opts = parse("--served-model-name", "llama,llama-8b", "--served-model-name=mistral")
    assert opts.served_model_names == ("llama", "llama-8b", "mistral")


def test_endpoint_selector_mode() -> None:
    opts = parse("--endpoint-selector", "app=vllm", "--endpoint-target-ports", "8000,8002",
                 "--endpoint-target-ports=8000,8004")  # fmt: skip
    assert opts.endpoint_target_ports == (8000, 8002, 8004)  # duplicates dropped, order kept
    assert opts.discovery == "selector"
    assert "needs 1 to 8 ports" in error_of("--endpoint-selector", "app=vllm")
    nine = ",".join(str(8000 + i) for i in range(9))
    assert "needs 1 to 8 ports" in error_of(
        "--endpoint-selector=a=b", f"--endpoint-target-ports={nine}"
    )
    assert "not a port" in error_of("--endpoint-selector=a=b", "--endpoint-target-ports=0")
    assert "comma-separated port" in error_of("--endpoint-target-ports=80,x")


def test_one_discovery_source(tmp_path: Path) -> None:
    endpoints = tmp_path / "e.yaml"
    endpoints.write_text("endpoints: []\n")
    assert error_of("--pool-name=p", "--endpoint-selector=a=b", "--endpoint-target-ports=1") == (
        "--pool-name and --endpoint-selector are both set; choose one way to find the endpoints"
    )
    assert "--endpoint-selector and --endpoints-file are both set" in error_of(
        "--endpoint-selector=a=b",
        "--endpoint-target-ports=1",
        env={"KVPICK_ENDPOINTS_FILE": str(endpoints)},
    )
    # The Helm chart always passes --pool-name: with an endpoints file, the file is the source
    both = parse("--pool-name=p", env={"KVPICK_ENDPOINTS_FILE": str(endpoints)})
    assert both.discovery == "file"
    assert both.pool_name == "p"
    assert parse().discovery is None


# --- The options object and the table --------------------------------------------------------


def test_defaults_match_the_table_and_the_brief() -> None:
    defaults = EppOptions()
    for spec in FLAGS:
        if spec.field is not None:
            assert getattr(defaults, spec.field) == spec.default, spec.name
    parsed = parse()
    for f in dataclasses.fields(EppOptions):
        if f.name != "sources":
            assert getattr(parsed, f.name) == getattr(defaults, f.name), f.name
    assert (parsed.refresh_metrics_interval, parsed.metrics_staleness_threshold) == (0.05, 2.0)
    assert (parsed.drain_timeout, parsed.active_request_expiry) == (30.0, 300.0)
    assert (parsed.block_size, parsed.kv_events_port, parsed.policy) == (16, 5557, "kv-aware")
    assert (parsed.host_credit, parsed.disk_credit, parsed.external_credit) == (0.75, 0.25, 0.25)
    assert parsed.max_num_batched_tokens == 8192


def test_every_options_field_has_a_flag() -> None:
    fields = {f.name for f in dataclasses.fields(EppOptions)} - {"ignored", "sources"}
    assert fields == {s.field for s in FLAGS if s.field is not None}


def test_options_are_frozen() -> None:
    opts = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.block_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        opts.sources["block_size"] = "x"  # type: ignore[index]


def test_own_flags_read_kvpick_env_and_reference_flags_do_not() -> None:
    for spec in FLAGS:
        if spec.own:
            assert spec.env == "KVPICK_" + spec.name.upper().replace("-", "_")
        elif spec.name != "pool-namespace":
            assert spec.env is None, spec.name


# --- Help and docs ---------------------------------------------------------------------------


def test_help_lists_flags_defaults_env_and_compat_section() -> None:
    text = epp_help()
    assert all(len(line) <= 100 for line in text.splitlines())
    for spec in FLAGS:
        assert re.search(rf"^  {re.escape(spec.flag)}(\s|$)", text, re.M), spec.name
        if spec.own:
            assert f"env {spec.env})" in " ".join(text.split()), spec.env
    compat = text.split("Accepted for compatibility with the reference EPP and ignored:")[1]
    assert "--ha-enable-leader-election" in compat
    assert "--block-size" not in compat
    flat = " ".join(text.split())
    assert "--block-size N tokens per KV block" in flat
    assert "(default 16; env KVPICK_BLOCK_SIZE)" in flat
    assert "--refresh-metrics-interval DURATION" in text and "(default 50ms)" in flat


def test_docs_cover_every_flag_and_env_var() -> None:
    docs = DOCS.read_text()
    for spec in FLAGS:
        assert f"`{spec.flag}" in docs, spec.name
        if spec.own:
            assert f"`{spec.env}`" in docs, spec.env
    assert "`$NAMESPACE`" in docs
    assert len(BY_NAME) == len(FLAGS)
