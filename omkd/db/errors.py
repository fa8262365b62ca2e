"""Errors of the storage layer, all under :class:`DbError`.

Every error carries ``data``: a dict of JSON-friendly details (the kind and id of a missing
record, the field of invalid data, the versions of a conflict) so the daemon can put them on
the wire as they are. Messages say what happened and, where it helps, what to do.

Whose fault: :class:`NotFound`, :class:`Conflict`, :class:`VersionConflict`,
:class:`InvalidData` and :class:`TransactionClosed` are the caller's; :class:`Busy` is another
process holding the database; :class:`StorageFailure` is the disk or the file itself.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Busy",
    "Conflict",
    "DatabaseClosed",
    "DbError",
    "GoalNotFound",
    "Interrupted",
    "InvalidData",
    "MigrationFailed",
    "MigrationMismatch",
    "NotFound",
    "SchemaTooNew",
    "StorageFailure",
    "TaskNotFound",
    "TimeLimitExceeded",
    "TransactionClosed",
    "VersionConflict",
]


class DbError(Exception):
    """Base of every storage error; ``data`` holds structured details."""

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data


class NotFound(DbError):
    """A record that the call needs does not exist; ``data`` = {"kind", "id"}."""

    def __init__(self, kind: str, id: Any) -> None:
        super().__init__(f"{kind} {id!r} not found", kind=kind, id=id)
        self.kind = kind
        self.id = id


class GoalNotFound(NotFound):
    """The goal does not exist."""

    def __init__(self, goal_id: Any) -> None:
        super().__init__("goal", goal_id)


class TaskNotFound(NotFound):
    """The task does not exist."""

    def __init__(self, task_id: Any) -> None:
        super().__init__("task", task_id)


class Conflict(DbError):
    """The id exists already, or a constraint refused the write."""


class VersionConflict(DbError):
    """An optimistic update expected another version.

    ``data`` = {"kind": "goal", "id", "goal_id" (the id again), "expected", "actual"}.
    """

    def __init__(self, goal_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"goal {goal_id!r} is at version {actual}, not {expected}: re-read it and retry",
            kind="goal",
            id=goal_id,
            goal_id=goal_id,
            expected=expected,
            actual=actual,
        )


class InvalidData(DbError):
    """A value has the wrong type or shape; ``data["field"]`` names it, ``data["detail"]``
    says what is wrong with it."""

    def __init__(self, field: str, message: str, **data: Any) -> None:
        super().__init__(f"invalid {field}: {message}", field=field, detail=message, **data)
        self.field = field


class TransactionClosed(DbError):
    """The transaction was committed, rolled back or lost: start a new one."""

    def __init__(self, message: str = "the transaction is closed: start a new one") -> None:
        super().__init__(message)


class DatabaseClosed(DbError):
    """The Database was closed: open it again."""

    def __init__(self) -> None:
        super().__init__("the database is closed")


class SchemaTooNew(DbError):
    """The database was migrated by newer code; ``data`` = {"db_version", "code_version"}."""

    def __init__(self, db_version: int, code_version: int) -> None:
        super().__init__(
            f"database schema version {db_version} is newer than this omkd knows "
            f"({code_version}): upgrade omkd",
            db_version=db_version,
            code_version=code_version,
        )


class MigrationFailed(DbError):
    """A migration failed and was rolled back; the database keeps its old version."""


class MigrationMismatch(DbError):
    """An applied migration no longer matches its file (edited, renamed or removed)."""


class StorageFailure(DbError):
    """Disk full, I/O error or a corrupt file.

    ``transaction_lost`` is true when SQLite rolled back the whole enclosing transaction
    itself: nothing of it was written, and the Transaction object is closed.
    """

    def __init__(self, message: str, *, transaction_lost: bool = False, **data: Any) -> None:
        super().__init__(message, transaction_lost=transaction_lost, **data)
        self.transaction_lost = transaction_lost


class Busy(DbError):
    """The database is locked by another process, or the write lock was not had in time."""


class Interrupted(DbError):
    """The statement was interrupted by ``Database.interrupt()``; nothing of it was written."""


class TimeLimitExceeded(DbError):
    """A read ran past the limit of ``Database.time_limit`` and was stopped; it returned
    nothing (run it again without the limit, elsewhere)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the read ran past its time limit of {seconds:g} s", seconds=seconds)
        self.seconds = seconds
