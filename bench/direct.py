"""Direct SQLite: what an ``omk`` process opening the database file itself would do.

The file gets omkd's schema (``omkd.db.Database.open`` applies the migrations), then is used
through plain ``sqlite3`` with the daemon's pragmas (WAL, synchronous=NORMAL, foreign keys)
and the daemon's own statements, imported from omkd.db so the SQL cannot drift.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Final

import msgspec

from omkd.db import Database, GoalRecord
from omkd.db import events as event_sql
from omkd.db import goals as goal_sql
from omkd.db import tasks as task_sql

# Each process's busy timeout: long enough that no write of the benchmark ever fails.
DIRECT_BUSY_TIMEOUT_MS: Final = 30_000
# The benchmark's events have no event_uuid, run_id or actor: omkd.db inserts such an event
# with this statement (event_row gives its parameters), and the events of a batch after the
# first with the second.
INSERT_EVENT: Final = event_sql.INSERT_BARE
INSERT_FOLLOWING_EVENT: Final = event_sql.INSERT_BARE_FOLLOWING
SELECT_PAGE_JSON: Final = event_sql.SELECT_PAGE_JSON
SELECT_GOAL: Final = goal_sql.SELECT
INSERT_TASK: Final = task_sql.INSERT
DELETE_TASKS: Final = task_sql.DELETE_BY_GOAL
GOAL_EXISTS: Final = task_sql.GOAL_EXISTS
_ENCODE: Final = msgspec.json.encode


def create_database(path: Path, goal_ids: list[str]) -> None:
    """Create ``path`` with omkd's schema and the given goals."""
    with Database.open(path) as db:
        for goal_id in goal_ids:
            db.goals.create(make_goal(goal_id))


def make_goal(goal_id: str) -> GoalRecord:
    return GoalRecord(
        goal_id=goal_id, status="running", phase="bench", goal_text="bench", project_dir="/tmp"
    )


def connect(path: Path, busy_timeout_ms: int = DIRECT_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A connection in autocommit mode with the daemon's pragmas."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def event_row(goal_id: str, kind: str, payload: Any, created_at: int) -> tuple[Any, ...]:
    """The INSERT_EVENT parameters of one event, as omkd.db builds them."""
    return event_sql.insert_row(goal_id, kind, _ENCODE(payload).decode(), created_at)


def append(conn: sqlite3.Connection, goal_id: str, payload: Any, created_at: int) -> int:
    """One autocommit insert (SQLite wraps it in its own transaction)."""
    row = event_row(goal_id, "step", payload, created_at)
    event_id = conn.execute(INSERT_EVENT, row).lastrowid
    assert event_id is not None
    return event_id


def append_batch(
    conn: sqlite3.Connection, goal_id: str, payloads: list[Any], created_at: int
) -> None:
    """``executemany`` in one transaction, payloads encoded as the daemon stores them (the
    first event inserted on its own, as omkd.db does: it takes the next event id)."""
    rows = [event_row(goal_id, "step", p, created_at) for p in payloads]
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(INSERT_EVENT, rows[0])
    conn.executemany(INSERT_FOLLOWING_EVENT, rows[1:])
    conn.execute("COMMIT")


def replace_task_graph(conn: sqlite3.Connection, goal_id: str, tasks: list[dict[str, Any]]) -> None:
    """The statements of ``task.update_task_graph`` in one transaction."""
    rows = [_task_row(goal_id, t) for t in tasks]
    conn.execute("BEGIN IMMEDIATE")
    if not conn.execute(GOAL_EXISTS, (goal_id,)).fetchone()[0]:
        raise LookupError(goal_id)
    conn.execute(DELETE_TASKS, (goal_id,))
    conn.executemany(INSERT_TASK, rows)
    conn.execute("COMMIT")


_TASK_DEFAULTS: Final = {
    "title": "",
    "description": "",
    "status": "pending",
    "owner": None,
    "read_set": None,
    "write_set": None,
    "depends_on": None,
    "risk": "",
    "acceptance": None,
    "evidence": None,
    "retry_count": 0,
    "max_retries": 3,
    "lease_expires_at": None,
    "completed_at": None,
}
_TASK_JSON_FIELDS: Final = ("read_set", "write_set", "depends_on", "acceptance", "evidence")


def _task_row(goal_id: str, task: dict[str, Any]) -> dict[str, Any]:
    row = dict(_TASK_DEFAULTS)
    row.update(task)
    row["goal_id"] = goal_id
    for name in _TASK_JSON_FIELDS:
        if row[name] is not None:
            row[name] = _ENCODE(row[name]).decode()
    row.setdefault("created_at", 0)
    row.setdefault("updated_at", row["created_at"])
    return row


def page(conn: sqlite3.Connection, goal_id: str, after_event_id: int, limit: int) -> bytes:
    """A page of events as the daemon builds it (one JSON array from SQLite)."""
    row = conn.execute(SELECT_PAGE_JSON, (goal_id, after_event_id, None, None, limit)).fetchone()
    return bytes(row[0])


def get_goal(conn: sqlite3.Connection, goal_id: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(SELECT_GOAL, (goal_id,)).fetchone()
    return row
