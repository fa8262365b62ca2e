"""Results of the methods that are not records, shared by the daemon and its clients."""

from __future__ import annotations

import msgspec

__all__ = [
    "BackupResult",
    "Created",
    "DaemonStatus",
    "DeletedCount",
    "DeletedFlag",
    "EventIds",
    "Replaced",
    "Subscribed",
    "TxActive",
    "TxCommitted",
    "TxRolledBack",
    "Unsubscribed",
]


class Created(msgspec.Struct):
    created: int


class Replaced(msgspec.Struct):
    replaced: int


class DeletedCount(msgspec.Struct):
    deleted: int


class DeletedFlag(msgspec.Struct):
    deleted: bool


class EventIds(msgspec.Struct):
    event_ids: list[int]


class Subscribed(msgspec.Struct):
    subscription: int
    # Where the subscription starts: its events are those after this id (the newest event
    # when it was opened, for "only new events"). Resubscribing after it loses nothing.
    after_event_id: int | None = None  # (None: a daemon older than this field)


class Unsubscribed(msgspec.Struct):
    unsubscribed: bool = True


class TxActive(msgspec.Struct):
    active: bool = True


class TxCommitted(msgspec.Struct):
    committed: bool = True


class TxRolledBack(msgspec.Struct):
    rolled_back: bool = True


class BackupResult(msgspec.Struct):
    """The result of ``db.backup``: where the copy is and how big."""

    path: str
    bytes: int


class DaemonStatus(msgspec.Struct):
    """The result of ``daemon.status``."""

    version: str
    schema_version: int
    db_path: str
    socket_path: str
    pid: int
    uptime_s: float
    sessions: int
    active_transactions: int
    # Since the daemon started: single writes (outside a transaction) and the COMMITs they
    # took; group commit makes the second smaller when sessions write at once.
    single_writes: int = 0
    single_write_commits: int = 0
