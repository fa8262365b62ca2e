"""Measure omkd.db's event paths on a temporary database.

Run: python bench/db_bench.py [--events N]. Prints one line per measurement; times drift run
to run by a factor of two, so compare only within one run.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from omkd.db import Database, EventInput, GoalRecord

PAYLOAD = {"step": "edit", "files": ["a.py", "b.py"], "tokens": 1234, "ok": True}
PAGE = 100
READ_REPEATS = 200


def timed(label: str, count: int, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    print(f"{label:<52} {elapsed * 1e3:9.1f} ms total {elapsed / count * 1e6:9.1f} µs each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--log-size", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Database.open(Path(tmp) / "bench.db") as db:
        for goal_id in ("single", "batch", "log", "tx"):
            db.goals.create(
                GoalRecord(goal_id=goal_id, status="s", phase="p", goal_text="t", project_dir="/")
            )
        n = args.events
        timed(
            f"{n} single db.events.append (autocommit each)",
            n,
            lambda: [db.events.append("single", "step", PAYLOAD) for _ in range(n)],
        )

        def in_tx() -> None:
            with db.transaction() as tx:
                for _ in range(n):
                    tx.events.append("tx", "step", PAYLOAD)

        timed(f"{n} tx.events.append inside one transaction", n, in_tx)
        batch = [EventInput(kind="step", payload=PAYLOAD) for _ in range(n)]
        timed(f"one append_batch of {n}", n, lambda: db.events.append_batch("batch", batch))

        log = [EventInput(kind="step", payload=PAYLOAD) for _ in range(args.log_size)]
        cursor = db.events.append_batch("log", log)[-PAGE - 1]
        # 100,000 live records would make every garbage collection slow the reads below.
        del log
        gc.collect()
        assert len(db.events.get_by_goal("log", after_event_id=cursor)) == PAGE
        timed(
            f"last {PAGE} of {args.log_size}: get_by_goal (x{READ_REPEATS})",
            READ_REPEATS,
            lambda: [
                db.events.get_by_goal("log", after_event_id=cursor) for _ in range(READ_REPEATS)
            ],
        )
        timed(
            f"last {PAGE} of {args.log_size}: get_by_goal_json (x{READ_REPEATS})",
            READ_REPEATS,
            lambda: [
                db.events.get_by_goal_json("log", after_event_id=cursor)
                for _ in range(READ_REPEATS)
            ],
        )


if __name__ == "__main__":
    main()
