"""``kvpick bench soak`` end to end: a short soak through real Envoy, the EPP and sim engines."""

from __future__ import annotations

import json
import math
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


def test_a_short_soak_reports_every_window(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "soak.json"
    proc = kvpick(
        "bench",
        "soak",
        "--duration",
        "20",
        "--window",
        "5",
        "--rate",
        "50",
        "--warmup",
        "3",
        "--json-out",
        str(out),
        "--no-check",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result

    windows = result["windows"]
    assert [w["window"] for w in windows] == [1, 2, 3, 4]
    for w in windows:
        # 50 requests/s for 5 s, Poisson arrivals: far from 0, not far from 250.
        assert 150 <= w["requests"] <= 350, w
        assert w["direct_requests"] == w["requests"]  # --direct-share 1: every one mirrored
        assert w["errors"] == 0, w.get("error_samples")
        assert 0 < w["via_epp_p50_ms"] <= w["via_epp_p99_ms"] < 10_000
        assert 0 < w["direct_p50_ms"] <= w["direct_p99_ms"] < 10_000
        for key in ("added_p50_ms", "added_p99_ms", "paired_added_p99_ms"):
            assert math.isfinite(w[key]), (key, w)
        assert w["epp_rss_mb"] > 10 and w["sims_rss_mb"] > 10
        assert 0 < w["epp_cpu_cores"] <= 2.5
        assert w["machine_busy_cores"] > 0
        assert w["epp_loop_lag_over_20ms"] >= w["epp_loop_lag_over_50ms"] >= 0

    assert result["total_errors"] == 0
    assert result["total_requests"] == sum(w["requests"] for w in windows)
    assert 40 <= result["achieved_rate_per_s"] <= 60
    assert "rate_note" not in result
    assert result["p99_drift_of"] == "via_epp_p99_ms / direct_p99_ms"
    first, last = windows[0], windows[-1]
    ratio = [w["via_epp_p99_ms"] / w["direct_p99_ms"] for w in (first, last)]
    assert math.isclose(
        result["p99_drift_pct"], 100 * (ratio[1] - ratio[0]) / ratio[0], abs_tol=0.02
    )
    assert math.isclose(
        result["added_p99_drift_ms"], last["added_p99_ms"] - first["added_p99_ms"], abs_tol=0.01
    )
    keys = ("p99_drift_pct", "via_epp_p99_drift_pct", "rss_growth_pct", "added_p50_ms")
    for key in keys:
        assert math.isfinite(result[key]), key
    assert set(result["by_kind"]) == {"short", "chat_1k", "doc_8k"}
    assert result["by_kind"]["short"]["requests"] > result["by_kind"]["doc_8k"]["requests"]
    assert set(result["targets"]) == {"total_errors", "p99_drift_pct", "rss_growth_pct"}
    assert result["targets"]["total_errors"]["met"] is True
    assert result["passed"] == all(t["met"] for t in result["targets"].values())
    assert result["workload"]["rate_per_s"] == 50 and result["workload"]["sims"] == 2
    assert result["workload"]["nice"] == 10
    assert "window 4/4" in proc.stderr


def test_bad_arguments_exit_2_with_a_reason() -> None:
    proc = kvpick("bench", "soak", "--rate", "0", timeout=60)
    assert proc.returncode == 2 and "must be > 0" in proc.stderr
    proc = kvpick("bench", "soak", "--direct-share", "1.5", timeout=60)
    assert proc.returncode == 2 and "--direct-share must be in [0, 1]" in proc.stderr
    proc = kvpick("bench", "soak", "--nice", "20", timeout=60)
    assert proc.returncode == 2 and "--nice must be in [0, 19]" in proc.stderr


def _window(via_p99: float, direct_p99: float, rss: float, errors: int = 0) -> dict[str, float]:
    return {
        "requests": 100,
        "direct_requests": 100,
        "errors": errors,
        "added_p99_ms": via_p99 - direct_p99,
        "via_epp_p99_ms": via_p99,
        "direct_p99_ms": direct_p99,
        "epp_rss_mb": rss,
    }


def test_the_targets_are_one_sided_and_read_first_against_last_window() -> None:
    from bench.soak import summarize

    totals = {"warmup_errors": 0, "achieved_rate_per_s": 200.0}
    # The via-EPP p99 over the direct one: 60/50 = 1.2 first, 132/100 = 1.32 last (+10 %),
    # although both paths' p99 doubled (the machine, not the EPP).
    steady = summarize(
        [_window(60, 50, 80), _window(90, 60, 85), _window(132, 100, 87)], totals, 200
    )
    assert steady["p99_drift_pct"] == 10.0 and steady["rss_growth_pct"] == 8.75
    assert steady["via_epp_p99_drift_pct"] == 120.0
    assert steady["added_p99_drift_ms"] == 22.0
    assert steady["passed"] is True and "rate_note" not in steady
    assert steady["added_p99_window_spread_pct"] == 73.3  # (32 - 10) / 30, the median

    faster = summarize([_window(60, 50, 80), _window(45, 50, 70)], totals, 200)
    assert faster["p99_drift_pct"] == -25.0 and faster["passed"] is True

    # The EPP's path slowing down while the baseline holds still fails.
    slower = summarize([_window(60, 50, 80), _window(75, 50, 90, errors=1)], totals, 200)
    assert slower["p99_drift_pct"] == 25.0
    assert slower["targets"]["p99_drift_pct"]["met"] is False
    assert slower["targets"]["rss_growth_pct"]["met"] is False
    assert slower["targets"]["total_errors"] == {"value": 1, "target": "== 0", "met": False}
    assert slower["passed"] is False

    missing = summarize([_window(60, math.nan, 80), _window(60, 50, 80)], totals, 200)
    assert math.isnan(missing["p99_drift_pct"])
    assert missing["targets"]["p99_drift_pct"]["met"] is False

    short = summarize([_window(60, 50, 80)], {**totals, "achieved_rate_per_s": 150.0}, 200)
    assert "150" in short["rate_note"]
