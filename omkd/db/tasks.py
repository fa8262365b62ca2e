"""The tasks repository: a goal's task graph, kept in creation order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omkd.db import _json
from omkd.db._codec import RowCodec, named_params
from omkd.db._conn import Conn, Scope
from omkd.db.errors import Conflict, GoalNotFound, InvalidData, TaskNotFound
from omkd_client.records import TaskRecord, now

__all__ = ["TaskRepository"]

COLUMNS = (
    "task_id, goal_id, title, description, kind, status, owner, read_set, write_set, "
    "depends_on, risk, acceptance, evidence, retry_count, max_retries, lease_expires_at, "
    "completed_at, created_at, updated_at"
)

GOAL_EXISTS = "SELECT count(*) FROM goals WHERE goal_id = ?"
INSERT = f"INSERT INTO tasks ({COLUMNS}) VALUES ({named_params(COLUMNS)})"
SELECT = f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?"
SELECT_BY_GOAL = f"SELECT {COLUMNS} FROM tasks WHERE goal_id = ? ORDER BY seq"
SELECT_EXISTING_IDS = (
    "SELECT task_id FROM tasks WHERE task_id IN (SELECT value FROM json_each(?)) ORDER BY seq"
)
UPDATE_STATUS = f"UPDATE tasks SET status = ?, updated_at = ? WHERE task_id = ? RETURNING {COLUMNS}"
DELETE_BY_GOAL = "DELETE FROM tasks WHERE goal_id = ?"

_codec = RowCodec(TaskRecord, COLUMNS)


class TaskRepository:
    """Tasks, on a Database (each call its own transaction) or inside a Transaction."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def create_batch(self, goal_id: str, tasks: list[TaskRecord]) -> int:
        """Store ``tasks`` for the goal, all or nothing; return how many were stored.

        Raises InvalidData (a task of another goal, a field of the wrong type), GoalNotFound,
        Conflict (a task_id that exists; data names it).
        """
        rows = _rows(goal_id, tasks, self._scope.encode_json)
        with self._scope.write() as conn:
            _check_batch(conn, goal_id, rows)
            _insert(conn, goal_id, rows)
        return len(rows)

    def get(self, task_id: str) -> TaskRecord | None:
        """Return the task, or None if there is none."""
        with self._scope.read() as conn:
            row = conn.query_one(SELECT, (task_id,))
        return _codec.record(row) if row is not None else None

    def get_by_goal(self, goal_id: str) -> list[TaskRecord]:
        """Return the goal's tasks in creation order ([] for an unknown goal)."""
        with self._scope.read() as conn:
            return _codec.records(conn.query(SELECT_BY_GOAL, (goal_id,)))

    def update_status(self, task_id: str, status: str) -> TaskRecord:
        """Set the task's status (updated_at now); return the task.

        Raises TaskNotFound, InvalidData.
        """
        if not isinstance(status, str):
            raise InvalidData("status", f"expected a string, got {type(status).__name__}")
        with self._scope.write() as conn:
            row = conn.query_one(UPDATE_STATUS, (status, now(), task_id))
        if row is None:
            raise TaskNotFound(task_id)
        return _codec.record(row)

    def update_task_graph(self, goal_id: str, tasks: list[TaskRecord]) -> int:
        """Make ``tasks`` exactly the goal's tasks, atomically; return how many there are.

        Raises InvalidData, GoalNotFound, Conflict (a task_id used by another goal).
        """
        rows = _rows(goal_id, tasks, self._scope.encode_json)
        with self._scope.write() as conn:
            _check_batch(conn, goal_id, rows)
            conn.change(DELETE_BY_GOAL, (goal_id,))
            _insert(conn, goal_id, rows)
        return len(rows)

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete the goal's tasks; return how many were deleted."""
        with self._scope.write() as conn:
            return conn.change(DELETE_BY_GOAL, (goal_id,))


def _rows(
    goal_id: str, tasks: list[TaskRecord], encode_json: Callable[[Any, str], str | None]
) -> list[dict[str, object]]:
    """Return the insert parameters of ``tasks`` after checking them (InvalidData)."""
    if not isinstance(tasks, list):
        raise InvalidData("tasks", "expected a list of tasks")
    rows = []
    for index, task in enumerate(tasks):
        if not isinstance(task, TaskRecord):
            raise InvalidData("tasks", f"item {index} is not a task", index=index)
        if task.goal_id != goal_id:
            raise InvalidData(
                "goal_id",
                f"task {task.task_id!r} belongs to goal {task.goal_id!r}, not {goal_id!r}",
                index=index,
                task_id=task.task_id,
            )
        rows.append(_codec.params(task, encode_json))
    return rows


def _check_batch(conn: Conn, goal_id: str, rows: list[dict[str, object]]) -> None:
    """GoalNotFound for an unknown goal, then Conflict for a task_id twice in ``rows``: a
    batch that is wrong in both ways is refused for the goal, what the caller fixes first."""
    if not conn.scalar(GOAL_EXISTS, (goal_id,)):
        raise GoalNotFound(goal_id)
    seen: set[object] = set()
    for row in rows:
        task_id = row["task_id"]
        if task_id in seen:
            raise Conflict(f"task {task_id!r} appears twice in the batch", kind="task", id=task_id)
        seen.add(task_id)


def _insert(conn: Conn, goal_id: str, rows: list[dict[str, object]]) -> None:
    """Insert the rows; a task_id that exists becomes a Conflict naming it."""
    try:
        conn.executemany(INSERT, rows, goal_id=goal_id)
    except Conflict as exc:
        # Rows of this batch inserted before the failure have later seqs than the task
        # that was there first, so the first by seq is the one in the way.
        ids = _json.encode_unchecked([row["task_id"] for row in rows], "tasks")
        taken = conn.query(SELECT_EXISTING_IDS, (ids,))
        if not taken:
            raise
        task_id = taken[0][0]
        raise Conflict(f"task {task_id!r} exists already", kind="task", id=task_id) from exc
