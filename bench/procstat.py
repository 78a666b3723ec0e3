"""Facts about processes the benchmarks measure: CPU time from ``/proc`` and a free port."""

from __future__ import annotations

import os
import socket


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
