"""Processes the benchmarks (and tests) start and measure: CPU time from ``/proc``, a free
port, and waiting for an HTTP server to answer its health check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from typing import Any

import aiohttp


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (Linux ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces; fields after it are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(port: int, proc: Any, timeout: float = 60.0) -> None:
    """Return once ``GET http://127.0.0.1:<port>/health`` answers 200. Raises RuntimeError
    if ``proc`` (a ``subprocess.Popen`` or a ``multiprocessing.Process``) exits first, with
    its stderr when that was piped, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            alive = proc.poll() is None if hasattr(proc, "poll") else proc.is_alive()
            if not alive:
                stderr = getattr(proc, "stderr", None)
                detail = f": {stderr.read()}" if stderr is not None else ""
                raise RuntimeError(f"the server on port {port} exited at start{detail}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the server on port {port} was not healthy within {timeout:g} s")


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
    proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
