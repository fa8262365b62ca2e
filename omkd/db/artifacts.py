"""The artifacts repository: files a goal produced, registered by path."""

from __future__ import annotations

from omkd.db._codec import RowCodec, validate
from omkd.db._conn import INT64_RANGE, Scope
from omkd.db.errors import InvalidData
from omkd_client.records import ArtifactRecord

__all__ = ["ArtifactRepository"]

COLUMNS = "artifact_id, goal_id, kind, path, mime_type, created_at"

INSERT = (
    "INSERT INTO artifacts (goal_id, kind, path, mime_type, created_at) "
    f"VALUES (?, ?, ?, ?, ?) RETURNING {COLUMNS}"
)
SELECT_BY_GOAL = (
    f"SELECT {COLUMNS} FROM artifacts WHERE goal_id = ? AND (? IS NULL OR kind = ?) "
    "ORDER BY artifact_id"
)
DELETE = "DELETE FROM artifacts WHERE artifact_id = ?"
DELETE_BY_GOAL = "DELETE FROM artifacts WHERE goal_id = ?"

_codec = RowCodec(ArtifactRecord, COLUMNS)


class ArtifactRepository:
    """Artifacts, on a Database (each call its own transaction) or inside a Transaction."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def register(
        self, goal_id: str, kind: str, path: str, mime_type: str | None = None
    ) -> ArtifactRecord:
        """Register an artifact (created_at now); return it with its new artifact_id.

        Raises GoalNotFound, InvalidData.
        """
        record = validate(
            ArtifactRecord(goal_id=goal_id, kind=kind, path=path, mime_type=mime_type)
        )
        params = (goal_id, kind, path, mime_type, record.created_at)
        with self._scope.write() as conn:
            row = conn.query_one(INSERT, params, goal_id=goal_id)
        assert row is not None
        return _codec.record(row)

    def get_by_goal(self, goal_id: str, kind: str | None = None) -> list[ArtifactRecord]:
        """Return the goal's artifacts, of ``kind`` if given, in insertion order."""
        with self._scope.read() as conn:
            return _codec.records(conn.query(SELECT_BY_GOAL, (goal_id, kind, kind)))

    def delete(self, artifact_id: int) -> bool:
        """Delete one artifact; return whether it existed. Raises InvalidData."""
        if not isinstance(artifact_id, int) or isinstance(artifact_id, bool):
            raise InvalidData("artifact_id", "expected an integer")
        if artifact_id not in INT64_RANGE:
            raise InvalidData("artifact_id", f"{artifact_id} is out of the 64-bit integer range")
        with self._scope.write() as conn:
            return conn.change(DELETE, (artifact_id,)) > 0

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete the goal's artifacts; return how many were deleted."""
        with self._scope.write() as conn:
            return conn.change(DELETE_BY_GOAL, (goal_id,))
