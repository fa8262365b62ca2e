"""The proofs repository: at most one proof per goal, replaced by each upsert."""

from __future__ import annotations

from omkd.db._codec import RowCodec, named_params
from omkd.db._conn import Scope
from omkd_client.records import ProofRecord

__all__ = ["ProofRepository"]

COLUMNS = (
    "goal_id, version, status, readiness, summary, task_graph_summary, changed_files, "
    "commits, git, gates, gates_passed, gates_total, post_mutation_gates_ran, known_gaps, "
    "human_decisions_required, recovery_status, delivery_metadata, review_artifacts, "
    "integration_evidence, oracle_evidence, generated_at"
)
_UPDATE_ALL = ", ".join(
    f"{name} = excluded.{name}" for name in COLUMNS.split(", ") if name != "goal_id"
)

UPSERT = (
    f"INSERT INTO proofs ({COLUMNS}) VALUES ({named_params(COLUMNS)}) "
    f"ON CONFLICT (goal_id) DO UPDATE SET {_UPDATE_ALL} RETURNING {COLUMNS}"
)
SELECT = f"SELECT {COLUMNS} FROM proofs WHERE goal_id = ?"
DELETE = "DELETE FROM proofs WHERE goal_id = ?"

_codec = RowCodec(ProofRecord, COLUMNS)


class ProofRepository:
    """Proofs, on a Database (each call its own transaction) or inside a Transaction."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def upsert(self, proof: ProofRecord) -> ProofRecord:
        """Store the goal's proof, replacing any previous one; return it as stored.

        Raises GoalNotFound, InvalidData.
        """
        params = _codec.params(proof, self._scope.encode_json)
        with self._scope.write() as conn:
            row = conn.query_one(UPSERT, params, goal_id=proof.goal_id)
        assert row is not None
        return _codec.record(row)

    def get(self, goal_id: str) -> ProofRecord | None:
        """Return the goal's proof, or None."""
        with self._scope.read() as conn:
            row = conn.query_one(SELECT, (goal_id,))
        return _codec.record(row) if row is not None else None

    def delete(self, goal_id: str) -> int:
        """Delete the goal's proof; return 1 if there was one, else 0."""
        with self._scope.write() as conn:
            return conn.change(DELETE, (goal_id,))
