"""omkd's storage layer: SQLite in WAL mode behind six repositories.

Synchronous, thread-safe and unaware of trio or the wire. Start with :meth:`Database.open`;
see ``omkd.db.database`` for how reads, writes and transactions share the file.

JSON fields (an event's payload, a goal's terminal_criteria, ...) take JSON values: dicts
with string keys, lists (and tuples), strings, ints, finite floats, bools, None, and their
subclasses. Anything else (NaN, bytes, a datetime, a set, an int key ...) raises
InvalidData naming the field, rather than being stored as something it would not read back
as.
"""

from omkd.db.database import BUSY_TIMEOUT_MS, Database, Transaction, backup_database, migrate
from omkd.db.errors import (
    Busy,
    Conflict,
    DatabaseClosed,
    DbError,
    GoalNotFound,
    Interrupted,
    InvalidData,
    MigrationFailed,
    MigrationMismatch,
    NotFound,
    SchemaTooNew,
    StorageFailure,
    TaskNotFound,
    TimeLimitExceeded,
    TransactionClosed,
    VersionConflict,
)
from omkd.db.maintenance import check_database
from omkd.db.migrate import Migration, default_migrations_dir, load_migrations, pending_migrations
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
    "BUSY_TIMEOUT_MS",
    "ArtifactRecord",
    "BudgetCheckpoint",
    "Busy",
    "Conflict",
    "Database",
    "DatabaseClosed",
    "DbError",
    "EventInput",
    "EventRecord",
    "GoalFilter",
    "GoalNotFound",
    "GoalRecord",
    "GoalSummary",
    "Interrupted",
    "InvalidData",
    "Migration",
    "MigrationFailed",
    "MigrationMismatch",
    "NotFound",
    "ProofRecord",
    "SchemaTooNew",
    "StorageFailure",
    "TaskNotFound",
    "TaskRecord",
    "TimeLimitExceeded",
    "Transaction",
    "TransactionClosed",
    "VersionConflict",
    "backup_database",
    "check_database",
    "default_migrations_dir",
    "load_migrations",
    "migrate",
    "pending_migrations",
]
