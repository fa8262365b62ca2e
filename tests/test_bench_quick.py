"""The benchmark suite's quick mode, end to end: every scenario yields numbers and the JSON.

Timings are never asserted here (they drift by a factor of two from run to run); this only
keeps ``python -m bench`` from rotting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 180

# Figures of the daemon's own workings, which no baseline has; and of the servers' processes,
# which direct SQLite has none of (quick mode runs no floor writers).
DAEMON_ONLY_METRICS = {"writes per COMMIT", "server CPU per call", "server waiting for a CPU"}
# The daemon with a setting of its own beside the daemon as it is (no baseline of its own).
DAEMON_ONLY_SCENARIOS = (", the read on the event loop",)
SCENARIOS = [
    "round trip daemon.ping",
    "round trip goal.get",
    "round trip event.append",
    "round trip daemon.ping, one CPU",
    "round trip event.append, one CPU",
    "transaction of 100 event.append",
    "event.append_batch of 1,000",
    "event.append_batch of 10,000",
    "task.update_task_graph of 1,000",
    "page of 100 by cursor, 20,000-event log",
    "page of 100 by cursor, 1,000-event log",
    "8 writer processes, event.append",
    "32 writer processes, event.append",
    "300 idle connections",
    "backup of",
    "page of 2,000 events beside a writer",
]


def test_quick_mode_measures_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = _run_module("bench", "--quick", "--out", str(out))
    assert "targets" in done.stdout
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert results["machine"]["cpu_count"] >= 1
    assert results["machine"]["sqlite"]
    rows = results["rows"]
    for scenario in SCENARIOS:
        matching = [r for r in rows if r["scenario"].startswith(scenario)]
        assert matching, f"no rows for {scenario}"
        for row in matching:
            assert "omkd" in row["median"], row
            if row["metric"] not in DAEMON_ONLY_METRICS and not row["scenario"].endswith(
                DAEMON_ONLY_SCENARIOS
            ):
                assert len(row["median"]) >= 2, f"{scenario}: no baseline beside omkd"
            for variant, value in row["median"].items():
                assert isinstance(value, int | float), (scenario, row["metric"], variant)
    assert len(results["targets"]) == 10
    for target in results["targets"]:
        assert isinstance(target["value"], int | float), target
        assert isinstance(target["pass"], bool)


def test_inprocess_comparison_runs_for_both_methods() -> None:
    for method in ("daemon.ping", "event.append"):
        done = _run_module("bench.inprocess", "--calls", "50", "--reps", "2", "--method", method)
        lines = done.stdout.splitlines()
        assert lines[0].startswith(method)
        rows = [line.split() for line in lines[1:]]
        assert len(rows) == 2
        for row in rows:  # floor F omkd O omkd - floor D: three numbers, no assertion on them
            assert [row[0], row[2]] == ["floor", "omkd"]
            floor, omkd = float(row[1]), float(row[3])
            assert floor > 0 and omkd > 0


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository's root; fails the test if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
