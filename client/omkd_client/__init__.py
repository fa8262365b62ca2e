"""omkd's bundled client: records, error codes, and sync and trio clients."""

from omkd_client.codes import ErrorCode
from omkd_client.records import (
    ArtifactRecord,
    BudgetCheckpoint,
    EventInput,
    EventRecord,
    GoalFilter,
    GoalRecord,
    GoalSummary,
    ProofRecord,
    TaskRecord,
)

__all__ = [
    "ArtifactRecord",
    "BudgetCheckpoint",
    "ErrorCode",
    "EventInput",
    "EventRecord",
    "GoalFilter",
    "GoalRecord",
    "GoalSummary",
    "ProofRecord",
    "TaskRecord",
]
