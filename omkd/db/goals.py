"""The goals repository: a goal's row and its version counting.

A goal's ``version`` counts its writes: every write adds 1 to the stored version, ``upsert``
of an existing goal too whatever version was sent, except ``heartbeat``, which only touches
``updated_at``. ``create`` and the insert branch of ``upsert`` store the version sent.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from omkd.db._codec import RowCodec, field_of, named_params
from omkd.db._conn import Scope
from omkd.db.errors import GoalNotFound, InvalidData, VersionConflict
from omkd.db.events import RAISE_HIGH_WATER
from omkd_client.records import GoalFilter, GoalRecord, GoalSummary, now

__all__ = ["GoalRepository"]

COLUMNS = (
    "goal_id, status, phase, kind, original_goal, normalized_goal, goal_text, project_dir, "
    "state_dir, policy, delivery_policy, merge_policy, until_ready, slice_execution, "
    "max_agents, budget_time, budget_tokens, budget_usd, cost_tracker_path, "
    "terminal_criteria, failure, created_at, updated_at, completed_at, controller_pid, version"
)
# Every column a write may set, i.e. all but goal_id and created_at.
_SET_COLUMNS = (
    "status = :status, phase = :phase, kind = :kind, original_goal = :original_goal, "
    "normalized_goal = :normalized_goal, goal_text = :goal_text, project_dir = :project_dir, "
    "state_dir = :state_dir, policy = :policy, delivery_policy = :delivery_policy, "
    "merge_policy = :merge_policy, until_ready = :until_ready, "
    "slice_execution = :slice_execution, max_agents = :max_agents, "
    "budget_time = :budget_time, budget_tokens = :budget_tokens, budget_usd = :budget_usd, "
    "cost_tracker_path = :cost_tracker_path, terminal_criteria = :terminal_criteria, "
    "failure = :failure, updated_at = :updated_at, completed_at = :completed_at, "
    "controller_pid = :controller_pid"
)

INSERT = f"INSERT INTO goals ({COLUMNS}) VALUES ({named_params(COLUMNS)}) RETURNING {COLUMNS}"
UPSERT = (
    f"INSERT INTO goals ({COLUMNS}) VALUES ({named_params(COLUMNS)}) "
    f"ON CONFLICT (goal_id) DO UPDATE SET {_SET_COLUMNS.replace(':', 'excluded.')}, "
    f"version = goals.version + 1 RETURNING {COLUMNS}"
)
SELECT = f"SELECT {COLUMNS} FROM goals WHERE goal_id = ?"
SELECT_VERSION = "SELECT version FROM goals WHERE goal_id = ?"
UPDATE = (
    f"UPDATE goals SET {_SET_COLUMNS}, version = version + 1 "
    f"WHERE goal_id = :goal_id AND version = :expected_version RETURNING {COLUMNS}"
)
UPDATE_STATUS = (
    "UPDATE goals SET status = ?, phase = ?, updated_at = ?, version = version + 1 "
    f"WHERE goal_id = ? RETURNING {COLUMNS}"
)
HEARTBEAT = f"UPDATE goals SET updated_at = ? WHERE goal_id = ? RETURNING {COLUMNS}"
LIST = (
    "SELECT goal_id, status, phase, goal_text, created_at, updated_at FROM goals "
    "WHERE (:status IS NULL OR status = :status) AND (:phase IS NULL OR phase = :phase) "
    "AND (:kind IS NULL OR kind = :kind) "
    "AND (:older_than IS NULL OR updated_at < :older_than) "
    "ORDER BY updated_at DESC, goal_id LIMIT coalesce(:limit, -1)"
)
DELETE = "DELETE FROM goals WHERE goal_id = ?"

_codec = RowCodec(GoalRecord, COLUMNS)
_FIXED_FIELDS = frozenset({"goal_id", "version", "created_at"})
EDITABLE_FIELDS = frozenset(GoalRecord.__struct_fields__) - _FIXED_FIELDS


# The largest version a goal may be given: the largest integer every JSON reader keeps
# exactly (JavaScript's too). Counting writes up from it never reaches SQLite's 2^63 - 1,
# where version + 1 would fail every later write of the goal.
MAX_VERSION: Final = 2**53 - 1


def _check_str(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise InvalidData(field, f"expected a string, got {type(value).__name__}")


def _check_version(goal: GoalRecord) -> None:
    if goal.version > MAX_VERSION:
        raise InvalidData("version", f"must be at most {MAX_VERSION} (2^53 - 1)")


class GoalRepository:
    """Goals, on a Database (each call its own transaction) or inside a Transaction."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def create(self, goal: GoalRecord) -> GoalRecord:
        """Store a new goal and return it as stored.

        Raises Conflict if the goal_id exists, InvalidData for a field of the wrong type (or
        a version over MAX_VERSION).
        """
        params = _codec.params(goal, self._scope.encode_json)
        _check_version(goal)
        with self._scope.write() as conn:
            row = conn.query_one(INSERT, params, subject=("goal", goal.goal_id))
        assert row is not None
        return _codec.record(row)

    def upsert(self, goal: GoalRecord) -> GoalRecord:
        """Store ``goal``, replacing an existing one; return it as stored.

        An existing goal keeps its ``created_at`` and gets version = old version + 1, whatever
        version was sent (refused over MAX_VERSION all the same). Raises InvalidData.
        """
        params = _codec.params(goal, self._scope.encode_json)
        _check_version(goal)
        with self._scope.write() as conn:
            row = conn.query_one(UPSERT, params, subject=("goal", goal.goal_id))
        assert row is not None
        return _codec.record(row)

    def get(self, goal_id: str) -> GoalRecord | None:
        """Return the goal, or None if there is none."""
        with self._scope.read() as conn:
            row = conn.query_one(SELECT, (goal_id,))
        return _codec.record(row) if row is not None else None

    def update_status(self, goal_id: str, status: str, phase: str) -> GoalRecord:
        """Set status and phase (updated_at now, version + 1); return the goal.

        Raises GoalNotFound, InvalidData.
        """
        _check_str(status, "status")
        _check_str(phase, "phase")
        with self._scope.write() as conn:
            row = conn.query_one(UPDATE_STATUS, (status, phase, now(), goal_id))
        if row is None:
            raise GoalNotFound(goal_id)
        return _codec.record(row)

    def update(self, goal_id: str, expected_version: int, changes: dict[str, Any]) -> GoalRecord:
        """Apply ``changes`` if the goal is at ``expected_version``; return the goal.

        ``changes`` may name any Goal field but goal_id, version and created_at; updated_at is
        now unless given. The stored version becomes expected_version + 1. Raises
        GoalNotFound, VersionConflict (data: goal_id, expected, actual), InvalidData naming
        the field.
        """
        if not isinstance(expected_version, int) or isinstance(expected_version, bool):
            raise InvalidData("expected_version", "expected an integer")
        _check_changes(changes)
        with self._scope.write() as conn:
            row = conn.query_one(SELECT, (goal_id,))
            if row is None:
                raise GoalNotFound(goal_id)
            current = _codec.record(row)
            if current.version != expected_version:
                raise VersionConflict(goal_id, expected_version, current.version)
            params = _codec.params(_apply_changes(current, changes), self._scope.encode_json)
            params["expected_version"] = expected_version
            updated = conn.query_one(UPDATE, params)
        assert updated is not None
        return _codec.record(updated)

    def heartbeat(self, goal_id: str) -> GoalRecord:
        """Set updated_at to now, leaving the version; return the goal. Raises GoalNotFound."""
        with self._scope.write() as conn:
            row = conn.query_one(HEARTBEAT, (now(), goal_id))
        if row is None:
            raise GoalNotFound(goal_id)
        return _codec.record(row)

    def list(self, filt: GoalFilter | None = None) -> list[GoalSummary]:
        """Return summaries of the goals matching ``filt``, newest updated_at first.

        Ties are ordered by goal_id; ``older_than`` keeps updated_at < it. Raises InvalidData.
        """
        filt = _checked_filter(filt or GoalFilter())
        with self._scope.read() as conn:
            rows = conn.query(LIST, msgspec.structs.asdict(filt))
        return [
            GoalSummary(
                goal_id=r[0],
                status=r[1],
                phase=r[2],
                goal_text=r[3],
                created_at=r[4],
                updated_at=r[5],
            )
            for r in rows
        ]

    def delete(self, goal_id: str) -> None:
        """Delete the goal with its tasks, events, proof, checkpoints and artifacts, at once.

        Raises GoalNotFound.
        """
        with self._scope.write() as conn:
            conn.execute(RAISE_HIGH_WATER)  # its events go too: their ids stay used
            if conn.change(DELETE, (goal_id,)) == 0:
                raise GoalNotFound(goal_id)


def _check_changes(changes: object) -> None:
    if not isinstance(changes, dict):
        raise InvalidData("changes", "expected an object of Goal fields")
    for name in changes:
        if name in _FIXED_FIELDS:
            raise InvalidData(name, f"{name} cannot be changed")
        if name not in EDITABLE_FIELDS:
            raise InvalidData(name, "not a Goal field")


def _apply_changes(goal: GoalRecord, changes: dict[str, Any]) -> GoalRecord:
    values = msgspec.structs.asdict(goal)
    values["updated_at"] = now()
    values.update(changes)
    try:
        return msgspec.convert(values, GoalRecord, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidData(field_of(exc, "changes"), str(exc)) from exc


def _checked_filter(filt: GoalFilter) -> GoalFilter:
    try:
        msgspec.convert(msgspec.structs.asdict(filt), GoalFilter, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidData(field_of(exc, "filter"), str(exc)) from exc
    if filt.limit is not None and filt.limit < 0:
        raise InvalidData("limit", "must not be negative")
    return filt
