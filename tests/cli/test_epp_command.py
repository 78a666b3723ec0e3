"""``kvpick epp`` as a real process: the upstream Helm chart's arguments, health, /metrics,
SIGTERM, and the exit codes and messages of the ways it can fail to start."""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

import grpc
import pytest

from bench.epp import free_port
from epp.extproc import health

pytestmark = pytest.mark.timeout(120)

EPP = [sys.executable, "-m", "epp"]
KVPICK = pathlib.Path(sys.executable).with_name("kvpick")

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: kv-aware-scorer
- type: no-such-scorer
"""


def endpoints_file(tmp_path: pathlib.Path, text: str | None = None) -> pathlib.Path:
    path = tmp_path / "endpoints.yaml"
    path.write_text(text if text is not None else "endpoints:\n  - address: 127.0.0.1:18001\n")
    return path


def ports() -> list[str]:
    return [
        "--grpc-port",
        str(free_port()),
        "--grpc-health-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]


def run_epp(args: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EPP, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def health_status(port: int, service: str = "") -> int | None:
    """The health answer for ``service``, or None when nothing answers yet."""
    name = service.encode()
    request = b"\x0a" + bytes([len(name)]) + name if name else b""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            reply = ch.unary_unary("/grpc.health.v1.Health/Check")(request, timeout=1)
        except grpc.RpcError:
            return None
    return reply[1] if reply else 0


def test_helm_chart_arguments_start_serve_and_stop_on_sigterm(tmp_path: pathlib.Path) -> None:
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    # The chart's args (config/charts/inferencepool), plus kvpick's --endpoints-file, which
    # is where the endpoints come from until Kubernetes discovery exists.
    chart = [
        "--pool-name",
        "vllm-llama3-8b-instruct",
        "--pool-namespace",
        "default",
        "--zap-encoder",
        "json",
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
        "--tracing=false",
        "-v",
        "1",
        "--enable-pprof=true",
    ]
    args = [*chart, "--endpoints-file", str(endpoints_file(tmp_path)), "--secure-serving=false"]
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen([*EPP, *args], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 30
            status = None
            while status != health.SERVING:
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "no SERVING health answer in 30 s"
                status = health_status(health_port)
                if status != health.SERVING:
                    time.sleep(0.1)
            for name in ("inference-extension", "readiness", "liveness"):
                assert health_status(health_port, name) == health.SERVING
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                text = resp.read().decode()
            assert 'inference_pool_ready_pods{name="vllm-llama3-8b-instruct"}' in text
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 8
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # --zap-encoder json: every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    warnings = [r["msg"] for r in records if r["level"] == "warning"]
    for flag in ("--tracing", "--enable-pprof"):
        assert sum(f"flag {flag} is accepted" in m and "ignored" in m for m in warnings) == 1
    assert any(r["level"] == "debug" for r in records)  # -v 1
    assert any("stopping" in r["msg"] for r in records)


def test_pool_name_without_an_endpoints_file_is_refused_clearly(tmp_path: pathlib.Path) -> None:
    chart = ["--pool-name", "x", "--pool-namespace", "default", "--zap-encoder", "json"]
    # --pool-name alone: Kubernetes discovery is not there yet, and the message says so
    alone = run_epp([*chart, *ports(), "--secure-serving=false"])
    assert alone.returncode == 1
    assert "no endpoint discovery configured" in alone.stderr
    assert "Traceback" not in alone.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus-flag", "1"], "unknown flag --bogus-flag"),
        (["--grpc-prot", "9002"], "did you mean --grpc-port"),
        (["--grpc-port=abc"], "--grpc-port"),
        (["--secure-serving", "false"], "--secure-serving=false"),
    ],
)
def test_bad_flags_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = run_epp(args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_warnings_given_before_a_bad_flag_are_still_written() -> None:
    result = run_epp(["--tracing=false", "--grpc-port=abc"])
    assert result.returncode == 2
    assert "flag --tracing is accepted for compatibility" in result.stderr
    assert result.stderr.count("flag --tracing") == 1
    assert "--grpc-port" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("endpoints:\n  - address: nope\n", "expected host:port, got 'nope'"),
        ("endpoints: [\n", "not valid YAML"),
        ("endpoints:\n  - address: 127.0.0.1:1\n    colour: red\n", "unknown field(s) colour"),
    ],
)
def test_a_broken_endpoints_file_exits_1_with_a_message(
    tmp_path: pathlib.Path, text: str, message: str
) -> None:
    path = endpoints_file(tmp_path, text)
    result = run_epp(["--endpoints-file", str(path), "--secure-serving=false", *ports()])
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert str(path) in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Unclosed" not in result.stderr  # what had started was closed


def test_an_unknown_plugin_type_is_a_startup_error(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    result = run_epp(
        [
            "--endpoints-file",
            str(endpoints_file(tmp_path)),
            "--config-file",
            str(config),
            "--secure-serving=false",
            *ports(),
        ]
    )
    assert result.returncode == 1
    assert "unknown type 'no-such-scorer'" in result.stderr
    assert "kv-aware-scorer" in result.stderr  # the known types are listed
    assert "Traceback" not in result.stderr


def test_a_taken_port_is_a_startup_error_and_the_process_exits(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_epp(
            [
                "--endpoints-file",
                str(endpoints_file(tmp_path)),
                "--secure-serving=false",
                "--grpc-port",
                str(free_port()),
                "--grpc-health-port",
                str(free_port()),
                "--metrics-port",
                str(port),
            ]
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_exits_0() -> None:
    result = run_epp(["--help"])
    assert result.returncode == 0
    assert result.stdout.startswith("usage: kvpick epp")
    assert "--endpoints-file" in result.stdout and "--grpc-port" in result.stdout


@pytest.mark.skipif(not KVPICK.exists(), reason="the kvpick console script is not installed")
def test_the_kvpick_console_script_runs_the_same_command() -> None:
    result = subprocess.run(
        [str(KVPICK), "epp", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0
    assert "usage: kvpick epp" in result.stdout
    bad = subprocess.run(
        [str(KVPICK), "epp", "--bogus-flag"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2
    assert "unknown flag --bogus-flag" in bad.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        (b"-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n", "holds no certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
            "holds a certificate that cannot be read",
        ),
    ],
)
def test_an_unusable_client_ca_is_a_startup_error_naming_the_file(
    tmp_path: pathlib.Path, content: bytes | None, message: str
) -> None:
    ca = tmp_path / "ca.crt"
    if content is not None:
        ca.write_bytes(content)
    args = ["--endpoints-file", str(endpoints_file(tmp_path)), "--client-ca", str(ca), *ports()]
    result = run_epp(args)
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if "cannot start" in x]
    assert "--client-ca: " in line
    assert str(ca) in line
    assert message.format(path=ca) in line
    assert "Traceback" not in result.stderr


def test_client_ca_without_tls_exits_2(tmp_path: pathlib.Path) -> None:
    ca = tmp_path / "ca.crt"
    result = run_epp(["--secure-serving=false", "--client-ca", str(ca)])
    assert result.returncode == 2
    assert "--client-ca" in result.stderr
    assert "cannot be used with --secure-serving=false" in result.stderr
