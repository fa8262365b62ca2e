"""Run the whole suite: ``python -m bench [--quick] [--out FILE] [--keep]``.

Starts what it needs under a fresh directory in /tmp (the floor server, the daemon as
``python -m omkd serve``, writer processes), builds the databases, runs every scenario with
its baselines, prints the table and writes the JSON results (bench/results.json by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench import report, scenarios
from bench.clientlib import client_available

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (about 30 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only",
        action="append",
        choices=["round_trips", "transaction", "batches", "task_graph", "writers", "rss",
                 "pages", "backup", "long_read"],
        help="run only these scenarios (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    workdir = Path(tempfile.mkdtemp(prefix="omkd-bench-", dir="/tmp"))
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    bench = scenarios.Bench(sizes, workdir, client_available(), progress)
    if not bench.with_client:
        bench.notes.append("omkd_client is not importable: no bundled-client figures")
    wanted = set(args.only or [])

    def on(name: str) -> bool:
        return not wanted or name in wanted

    try:
        logs = on("pages") or on("backup") or on("long_read")
        progress(f"building databases in {workdir}")
        scenarios.build_databases(bench, logs=logs)
        if logs:
            progress(
                f"large database: {sizes.big_log:,} events, "
                f"{bench.info['big_db_bytes'] / 2**20:,.0f} MiB "
                f"in {bench.info['big_db_build_s']:.1f} s"
            )
        with scenarios.servers(bench) as (floor, daemon):
            with scenarios.placed(bench, scenarios.TWO_CPUS, floor, daemon):
                for name, scenario in (
                    ("round_trips", scenarios.round_trips),
                    ("transaction", scenarios.transaction_of_100),
                    ("batches", scenarios.append_batches),
                    ("task_graph", scenarios.task_graph),
                ):
                    if on(name):
                        _guarded(bench, name, lambda s=scenario: s(bench, floor, daemon))
            if on("round_trips"):
                one_cpu = scenarios.ONE_CPU
                with scenarios.placed(bench, one_cpu, floor, daemon):
                    trips = scenarios.round_trips
                    _guarded(bench, "round_trips", lambda: trips(bench, floor, daemon, one_cpu))
            if on("writers"):  # unpinned: the writer processes share every CPU with them
                writers = scenarios.concurrent_writers
                _guarded(bench, "writers", lambda: writers(bench, floor, daemon))
        for name, alone in (
            ("rss", scenarios.idle_connections),
            ("pages", scenarios.pages),
            ("backup", scenarios.backup_under_writers),
            ("long_read", scenarios.long_read),
        ):
            if on(name):
                _guarded(bench, name, lambda s=alone: s(bench))
    finally:
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    targets = report.evaluate_targets(
        bench.rows, sizes.big_log, sizes.small_log, sizes.idle_connections
    )
    document: dict[str, Any] = {
        "suite": "omkd bench",
        "mode": "quick" if args.quick else "full",
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": report.machine(),
        "sizes": dataclasses.asdict(sizes),
        "info": bench.info,
        "notes": bench.notes,
        "targets": targets,
        "rows": [row.as_json() for row in bench.rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
    print(report.table(bench.rows, targets, document))
    print(f"\nresults: {args.out} ({elapsed:.0f} s)")
    for note in bench.notes:
        print(f"note: {note}")
    return 1 if any(n.startswith("FAILED") for n in bench.notes) else 0


def _guarded(bench: scenarios.Bench, name: str, run: Callable[[], None]) -> None:
    """Run one scenario; a failure is noted (with its traceback on stderr), not fatal."""
    try:
        run()
    except Exception as exc:
        traceback.print_exc()
        bench.notes.append(f"FAILED {name}: {type(exc).__name__}: {exc}")
        bench.progress(f"scenario {name} failed: {exc!r}; going on")
