"""``kvpick bench epp --abuse``: one short abuse run end to end (sim engines, the EPP, real
Envoy, the abuser in its own process)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from bench.epp_abuse import table

ROOT = pathlib.Path(__file__).resolve().parents[2]


def kvpick(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_one_abuse_reports_latency_against_its_baseline_memory_and_the_answer() -> None:
    proc = kvpick("bench", "epp", "--abuse", "garbage-preface", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["abuse"] == "garbage-preface"
    assert r["baseline_requests"] == 30 and r["after_errors"] == 0
    assert 0 < r["baseline_p50_ms"] <= r["baseline_p99_ms"] < 5000
    assert r["during_requests"] > 0 and r["during_errors"] == 0
    assert 0 < r["during_p50_ms"] <= r["during_p99_ms"] <= r["during_max_ms"]
    assert 0 < r["after_p50_ms"] <= r["after_p99_ms"]
    assert r["epp_alive"] is True
    assert 10 < r["epp_rss_mb_before"] <= r["epp_rss_mb_peak"]
    assert r["epp_rss_mb_after"] > 10
    # The abuser ran (at least once: 50 connections) and its report came back whole.
    res = r["abuse_result"]
    assert res["abuse"] == "garbage-preface" and res["rounds"] >= 1
    assert res["connections"] == 50 and set(res["cases"]) >= {"http1", "random"}
    assert r["server_answer"].endswith(f"{res['closed_by_server']}/50 closed by the server")
    assert r["workload"]["abuse_seconds"] == 1.0
    assert "garbage-preface: running" in proc.stderr
    row = table([r]).splitlines()[2]
    assert row.startswith("| `garbage-preface` |") and r["server_answer"] in row


def test_an_unknown_abuse_is_refused_with_the_names() -> None:
    proc = kvpick("bench", "epp", "--abuse", "nope", timeout=60)
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr and "rapid-reset" in proc.stderr
