"""``kvpick bench sim`` end to end: a real sim process and the floor server, one short phase."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def kvpick(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_sim_prints_capacity_per_speedup_and_the_floor():
    proc = kvpick("bench", "sim", "--speedups", "10", "--duration", "2", "--concurrency", "16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["concurrency"] == 16
    assert result["requests_per_s_x10"] > 0
    # Every request computes part of its prompt and generates 16-128 tokens.
    assert result["sim_tokens_per_s_x10"] > result["generated_tokens_per_s_x10"] >= 16
    assert 0 < result["sim_cpu_share_x10"] <= 1.5
    assert result["requests_per_core_s_x10"] >= result["requests_per_s_x10"] * 0.6
    assert result["floor_requests_per_core_s"] > 0
    assert result["sim_cost_vs_floor"] > 0
    assert "speedup 10" in proc.stderr and "floor" in proc.stderr


def test_bench_sim_rejects_bad_speedups():
    proc = kvpick("bench", "sim", "--speedups", "fast", timeout=60)
    assert proc.returncode != 0
    assert "--speedups must be numbers" in proc.stderr
