"""The budgets repository: a goal's budget checkpoints in insertion order (money in cents)."""

from __future__ import annotations

from omkd.db._codec import RowCodec, named_params
from omkd.db._conn import Scope
from omkd_client.records import BudgetCheckpoint

__all__ = ["BudgetRepository"]

COLUMNS = (
    "checkpoint_id, goal_id, version, label, status, phase, recorded_at, budget_time, "
    "total_budget_secs, elapsed_since_created_secs, remaining_budget_secs, budget_tokens, "
    "used_tokens, remaining_budget_tokens, budget_usd, estimated_cost_usd, "
    "remaining_budget_usd, limit_value, used_value, created_at"
)
# checkpoint_id is NULL in the parameters: SQLite assigns it.
INSERT = (
    f"INSERT INTO budget_checkpoints ({COLUMNS}) VALUES ({named_params(COLUMNS)}) "
    f"RETURNING {COLUMNS}"
)
SELECT_BY_GOAL = (
    f"SELECT {COLUMNS} FROM budget_checkpoints WHERE goal_id = ? ORDER BY checkpoint_id"
)
DELETE_BY_GOAL = "DELETE FROM budget_checkpoints WHERE goal_id = ?"

_codec = RowCodec(BudgetCheckpoint, COLUMNS)


class BudgetRepository:
    """Budget checkpoints, on a Database (each call its own transaction) or in a Transaction."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def append_checkpoint(self, checkpoint: BudgetCheckpoint) -> BudgetCheckpoint:
        """Store a checkpoint and return it with its new checkpoint_id.

        A checkpoint_id given by the caller is ignored: the database assigns it. Raises
        GoalNotFound, InvalidData (money as a float, for one).
        """
        params = _codec.params(checkpoint, self._scope.encode_json)
        params["checkpoint_id"] = None
        with self._scope.write() as conn:
            row = conn.query_one(INSERT, params, goal_id=checkpoint.goal_id)
        assert row is not None
        return _codec.record(row)

    def get_by_goal(self, goal_id: str) -> list[BudgetCheckpoint]:
        """Return the goal's checkpoints in insertion order ([] for an unknown goal)."""
        with self._scope.read() as conn:
            return _codec.records(conn.query(SELECT_BY_GOAL, (goal_id,)))

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete the goal's checkpoints; return how many were deleted."""
        with self._scope.write() as conn:
            return conn.change(DELETE_BY_GOAL, (goal_id,))
