"""``kvpick worker vllm|sglang|trtllm`` run as users run them: ``--dry-run`` output, ``--help``,
exit codes and messages, and the real ``exec`` into a stand-in engine (a script that records
its argv, environment and options file), since the engines need GPUs and are not installed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.timeout(120)

KVPICK = Path(sys.executable).with_name("kvpick")
ENTRY_POINTS = {
    "kvpick": [str(KVPICK), "worker"],
    "python -m workers": [sys.executable, "-m", "workers"],
}
ENGINES = ("vllm", "sglang", "trtllm")

FAKE_ENGINE = """\
#!{python}
import json, os, sys
if sys.argv[1:2] == ["-c"]:  # the SGLang launcher's "can this Python import sglang?" probe
    sys.exit(int(os.environ.get("FAKE_PROBE_EXIT", "0")))
out = {{
    "pid": os.getpid(),
    "argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
    "env": {{k: v for k, v in os.environ.items() if k.startswith("VLLM_NIXL")}},
}}
if "--extra_llm_api_options" in sys.argv:
    with open(sys.argv[sys.argv.index("--extra_llm_api_options") + 1]) as f:
        out["options"] = f.read()
print(json.dumps(out))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def run(
    *args: str, entry: str = "kvpick", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENTRY_POINTS[entry], *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def command_of(stdout: str) -> list[str]:
    """The command a dry run prints: its last line, split as a shell would."""
    return shlex.split(stdout.splitlines()[-1])


def fake_engine(bin_dir: Path, name: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(FAKE_ENGINE.format(python=sys.executable))
    path.chmod(0o755)
    return path


def engine_args(engine: str, tmp_path: Path) -> list[str]:
    """Arguments that make the engine's command land in ``tmp_path``'s stand-ins."""
    if engine == "sglang":
        return ["--executable", str(tmp_path / "bin" / "python")]
    if engine == "trtllm":
        return ["--options-out", str(tmp_path / "options.yaml")]
    return ["--nixl-side-channel-host", "10.0.0.3"]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("engine", ENGINES)
def test_dry_run_prints_the_command_and_exits_0(engine: str, entry: str) -> None:
    out = run(
        engine, "--model", "org/m", "--role", "prefill", "--dp-size", "2", "--dry-run",
        entry=entry, env={"POD_IP": "10.0.0.7"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    argv = command_of(out.stdout)
    assert out.stdout.splitlines()[-1] == shlex.join(argv)
    assert "org/m" in argv
    if engine == "vllm":
        assert argv[:3] == ["vllm", "serve", "org/m"]
        assert argv[argv.index("--data-parallel-size") + 1] == "2"
        assert "export VLLM_NIXL_SIDE_CHANNEL_HOST=10.0.0.7" in out.stdout.splitlines()
        assert "export VLLM_NIXL_SIDE_CHANNEL_PORT=5600" in out.stdout.splitlines()
        events = json.loads(argv[argv.index("--kv-events-config") + 1])
        assert events["replay_endpoint"] == "tcp://*:5559"
    elif engine == "sglang":
        assert argv[1:3] == ["-m", "sglang.launch_server"]
        assert argv[argv.index("--disaggregation-mode") + 1] == "prefill"
        assert json.loads(argv[argv.index("--kv-events-config") + 1])["publisher"] == "zmq"
    else:
        assert argv[:3] == ["trtllm-serve", "serve", "org/m"]
        options = yaml.safe_load(out.stdout.split("<<'KVPICK_EOF'\n")[1].split("KVPICK_EOF")[0])
        assert options["cache_transceiver_config"] == {"backend": "NIXL"}
        assert options["kv_cache_config"]["kv_events_config"]["replay_endpoint"] == "tcp://*:5559"


@pytest.mark.parametrize("engine", ENGINES)
def test_help_explains_every_flag_with_its_default(engine: str) -> None:
    out = run(engine, "--help")
    assert out.returncode == 0
    body = out.stdout.split("options:", 1)[1]  # past the usage line
    listed = {line.split()[0].rstrip(",") for line in body.splitlines() if line.startswith("  -")}
    text = " ".join(out.stdout.split())  # argparse wraps lines
    common = [
        "--model", "--served-model-name", "--host", "--port", "--block-size",
        "--kv-events-port", "--kv-replay-port", "--no-kv-replay", "--kv-topic",
        "--kv-buffer-steps", "--kv-hwm", "--role", "--dp-size", "--executable", "--dry-run",
    ]  # fmt: skip
    own = {
        "vllm": [
            "--prefix-caching-hash-algo",
            "--nixl-side-channel-host",
            "--nixl-side-channel-port",
        ],
        "sglang": ["--bootstrap-port"],
        "trtllm": [
            "--llm-api-options",
            "--options-out",
            "--kv-events-push",
            "--event-buffer-max-size",
        ],
    }[engine]
    assert set(common + own) <= listed
    defaults = [
        "(default: 0.0.0.0)", "(default: 8000)", "(default: 16)", "(default: 5557)",
        "(default: both)", "(default: 1)", "(default: --kv-events-port + --dp-size",
    ]  # fmt: skip
    for default in defaults:
        assert default in text, default
    assert "-- ENGINE_ARG" in text


@pytest.mark.parametrize("engine", ENGINES)
def test_without_the_engine_installed_it_says_what_to_install(engine: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {"PATH": str(empty)}
    extra = ["--executable", str(tmp_path / "no" / "python")] if engine == "sglang" else []
    out = run(engine, "--model", "m", *extra, env=env)
    assert out.returncode == 127
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    expected = {"vllm": "'vllm'", "sglang": "python", "trtllm": "'trtllm-serve'"}[engine]
    assert expected in out.stderr
    if engine != "sglang":
        assert f"pip install 'kvpick[{engine}]'" in out.stderr


def test_sglang_python_without_sglang_is_reported(tmp_path: Path) -> None:
    python = fake_engine(tmp_path / "bin", "python")
    out = run("sglang", "--model", "m", "--executable", str(python), env={"FAKE_PROBE_EXIT": "3"})
    assert out.returncode == 127
    assert f"SGLang is not installed for {python}" in out.stderr
    assert "pip install 'kvpick[sglang]'" in out.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_exec_replaces_kvpick_with_the_dry_run_command(engine: str, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_engine(bin_dir, {"vllm": "vllm", "sglang": "python", "trtllm": "trtllm-serve"}[engine])
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_EXIT": "7"}
    args = [engine, "--model", "org/m", "--role", "decode", "--dp-size", "2"]
    args += engine_args(engine, tmp_path)
    passthrough = ["--", "--max-x", "4096", "two words"]

    dry = run(*args, "--dry-run", *passthrough, env=env)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "options.yaml").exists()  # a dry run writes nothing

    proc = subprocess.Popen(
        [*ENTRY_POINTS["kvpick"], *args, *passthrough],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 7, stderr  # the engine's own exit status
    seen: dict[str, Any] = json.loads(stdout)
    assert seen["pid"] == proc.pid  # exec'd in place, not spawned
    expected = command_of(dry.stdout)
    assert seen["argv"][1:] == expected[1:]
    assert Path(expected[0]).name == seen["argv"][0]
    assert seen["argv"][-3:] == ["--max-x", "4096", "two words"]
    assert f"exec {shlex.join(expected)}" in stderr
    if engine == "vllm":
        assert seen["env"] == {
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.3",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600",
        }
    if engine == "trtllm":
        written = (tmp_path / "options.yaml").read_text()
        assert seen["options"] == written
        assert f"wrote {tmp_path / 'options.yaml'}" in stderr
        assert written.rstrip("\n") in dry.stdout  # the dry run printed the same file


def test_the_dry_run_script_runs_the_same_engine_command(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_engine(bin_dir, "trtllm-serve")
    options = tmp_path / "dir with space" / "o.yaml"
    options.parent.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    dry = run(
        "trtllm", "--model", "m", "--role", "prefill", "--options-out", str(options),
        "--dry-run", "--", "--max_batch_size", "8", env=env,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    script = subprocess.run(
        ["sh", "-c", dry.stdout],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert script.returncode == 0, script.stderr
    seen = json.loads(script.stdout)
    assert seen["argv"] == command_of(dry.stdout)
    assert seen["options"] == options.read_text()
    assert yaml.safe_load(seen["options"])["disable_overlap_scheduler"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vllm", "--model", "m", "--dp-size", "2", "--kv-replay-port", "5558"],
         "use --kv-replay-port 5559 or higher"),
        (["sglang", "--model", "m", "--dp-size", "0"], "--dp-size: must be at least 1"),
        (["trtllm", "--model", "m", "--port", "65536"], "outside 1-65535"),
        (["vllm", "--model", "m", "--role", "prefil"], "invalid choice: 'prefil'"),
        (["vllm", "--model", "m", "--", "--block-size", "32"], "use kvpick's --block-size"),
        (["vllm", "--model", "m", "--nonsense"], "unrecognized arguments: --nonsense"),
        (["trtllm", "--model", "m", "--nonsense"], "kvpick worker trtllm: error"),
        (["sglang", "--model", "m", "--nonsense"], "flags go after '--'"),
        (["sglang", "--model", "m", "leftover"], "after '--'"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_a_reason_and_no_traceback(args: list[str], message: str) -> None:
    out = run(*args, "--dry-run")
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_unwritable_options_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_engine(bin_dir, "trtllm-serve")
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run(
        "trtllm", "--model", "m", "--options-out", str(blocker / "o.yaml"),
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert out.returncode == 1
    assert f"cannot write {blocker / 'o.yaml'}" in out.stderr
    assert "Traceback" not in out.stderr
