"""Params of every method as msgspec types, with the shared result types re-exported.

The dispatcher decodes params with these types (unknown fields refused) and rpc.discover
derives its JSON Schema from the very same types, so the two cannot drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from omkd_client.records import BudgetCheckpoint, Count, EventInput, Int64, TaskRecord
from omkd_client.results import (
    BackupResult,
    Created,
    DaemonStatus,
    DeletedCount,
    DeletedFlag,
    EventIds,
    Replaced,
    Subscribed,
    TxActive,
    TxCommitted,
    TxRolledBack,
    Unsubscribed,
)

# The result types live with the client (shared, not copied); the method table names them here.
__all__ = [
    "ArtifactId",
    "ArtifactQuery",
    "ArtifactRegister",
    "BackupParams",
    "BackupResult",
    "BudgetAppend",
    "Created",
    "DaemonStatus",
    "DeletedCount",
    "DeletedFlag",
    "EventAppend",
    "EventAppendBatch",
    "EventIds",
    "EventQuery",
    "EventSubscribe",
    "GoalId",
    "GoalUpdate",
    "GoalUpdateStatus",
    "NoParams",
    "Params",
    "Replaced",
    "Subscribed",
    "TaskBatch",
    "TaskId",
    "TaskItem",
    "TaskUpdateStatus",
    "TxActive",
    "TxCommitted",
    "TxRolledBack",
    "Unsubscribe",
    "Unsubscribed",
    "derive_struct",
]


def derive_struct(
    base: type[msgspec.Struct],
    name: str,
    *,
    optional: frozenset[str] = frozenset(),
    drop: frozenset[str] = frozenset(),
) -> type[msgspec.Struct]:
    """Return a struct with ``base``'s fields, less ``drop``, with ``optional`` ones defaulting
    to None: a record's shape for a params type that differs in one field."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(base):
        if f.name in drop:
            continue
        if f.name in optional:
            fields.append((f.name, f.type | None, None))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
        elif f.default is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, f.default))
        else:
            fields.append((f.name, f.type))
    return msgspec.defstruct(name, fields, kw_only=True, forbid_unknown_fields=True)


if TYPE_CHECKING:  # the same attributes, as far as the type checker needs
    TaskItem = TaskRecord
    BudgetAppend = BudgetCheckpoint
else:
    # A task of a batch may omit its goal_id; a checkpoint's id is assigned, never sent.
    TaskItem = derive_struct(TaskRecord, "TaskItem", optional=frozenset({"goal_id"}))
    BudgetAppend = derive_struct(
        BudgetCheckpoint, "BudgetAppend", drop=frozenset({"checkpoint_id"})
    )


class Params(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every params type."""


class NoParams(Params):
    pass


class GoalId(Params):
    goal_id: str


class GoalUpdateStatus(Params):
    goal_id: str
    status: str
    phase: str


class GoalUpdate(Params):
    goal_id: str
    expected_version: Int64
    changes: dict[str, Any]


class TaskBatch(Params):
    goal_id: str
    tasks: list[TaskItem]


class TaskId(Params):
    task_id: str


class TaskUpdateStatus(Params):
    task_id: str
    status: str


class EventAppend(Params):
    goal_id: str
    kind: str
    payload: Any
    event_uuid: str | None = None
    run_id: str | None = None
    actor: str | None = None
    schema_version: Int64 = 1


class EventAppendBatch(Params):
    goal_id: str
    events: list[EventInput]


class EventQuery(Params):
    goal_id: str
    since: Int64 | None = None
    after_event_id: Int64 | None = None
    limit: Count | None = None
    tail: Count | None = None


class EventSubscribe(Params):
    goal_id: str | None = None
    after_event_id: Int64 | None = None


class Unsubscribe(Params):
    subscription: Int64


class ArtifactRegister(Params):
    goal_id: str
    kind: str
    path: str
    mime_type: str | None = None


class ArtifactQuery(Params):
    goal_id: str
    kind: str | None = None


class ArtifactId(Params):
    artifact_id: Int64


class BackupParams(Params):
    dest: str
