"""The method table: every method of the contract, its params and result types, and what runs.

Repository methods are declared as a plain function of (repositories, params): the session
decides where it runs (the read connection, the write lock, or its own transaction). Session
methods (tx.*, subscriptions, daemon.*, db.backup, rpc.discover) are coroutines given the
session itself. Nothing here imports trio: the session is a protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from omkd.rpc import params as P
from omkd.rpc.errors import InvalidParams
from omkd_client.codes import ErrorCode
from omkd_client.records import (
    ArtifactRecord,
    BudgetCheckpoint,
    EventRecord,
    GoalFilter,
    GoalRecord,
    GoalSummary,
    ProofRecord,
    TaskRecord,
)

if TYPE_CHECKING:
    from omkd.db import Database, Transaction

    Repos = Database | Transaction

__all__ = ["METHODS", "Access", "Method", "RepoFn", "SessionLike"]


class Access(enum.Enum):
    READ = "read"  # outside a transaction: the latest committed state, never waits
    WRITE = "write"  # takes the write lock, or runs inside the session's transaction
    SESSION = "session"  # the session's own business


class SessionLike(Protocol):
    """What session methods need of a session (implemented by ``omkd.rpc.session``)."""

    async def tx_begin(self) -> P.TxActive: ...
    async def tx_commit(self) -> P.TxCommitted: ...
    async def tx_rollback(self) -> P.TxRolledBack: ...
    async def subscribe(self, p: P.EventSubscribe) -> P.Subscribed: ...
    async def unsubscribe(self, p: P.Unsubscribe) -> P.Unsubscribed: ...
    async def backup(self, p: P.BackupParams) -> P.BackupResult: ...
    async def status(self) -> P.DaemonStatus: ...
    async def discover(self) -> msgspec.Raw: ...


RepoFn = Callable[["Repos", Any], Any]
SessionFn = Callable[[SessionLike, Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    params: type[msgspec.Struct]
    result: Any  # a type, for rpc.discover
    access: Access
    run: RepoFn | SessionFn
    summary: str
    errors: tuple[ErrorCode, ...] = ()
    appends_events: bool = False
    # Answered even when the session's transaction was aborted (contract, section 5).
    when_aborted: bool = False
    # A session method that never waits, answered at once by Dispatcher.answer_now.
    now: Callable[[SessionLike, Any], Any] | None = None
    # How many rows a repository call may touch, from its params: None when it cannot tell
    # (all of a goal's). Past the daemon's long_call_rows the call runs in a worker thread.
    # None (the field): a call of a row or a few.
    rows: Callable[[Any], int | None] | None = None
    # Deletes the events of the goal its params name (``goal_id``): the subscriptions queue
    # those they have still to send first. Its ``rows`` must say "all of the goal's" (None):
    # it then runs as a long call, and a single write has the write gate to itself.
    deletes_events: bool = False


_NF = ErrorCode.NOT_FOUND
_CONFLICT = ErrorCode.CONFLICT


def _goal_delete(r: Repos, p: P.GoalId) -> P.DeletedFlag:
    r.goals.delete(p.goal_id)  # raises GoalNotFound
    return P.DeletedFlag(True)


def _task_records(p: P.TaskBatch) -> list[TaskRecord]:
    records = []
    for index, item in enumerate(p.tasks):
        fields = msgspec.structs.asdict(item)
        if fields["goal_id"] is None:
            fields["goal_id"] = p.goal_id
        elif fields["goal_id"] != p.goal_id:
            detail = f"a batch holds the tasks of one goal: {p.goal_id!r}"
            raise InvalidParams(
                f"task {item.task_id!r} belongs to goal {fields['goal_id']!r}, not to "
                f"{p.goal_id!r}: {detail}",
                {
                    "field": f"tasks[{index}].goal_id",
                    "detail": detail,
                    "task_id": item.task_id,
                    "goal_id": fields["goal_id"],
                },
            )
        records.append(TaskRecord(**fields))
    return records


def _event_append(r: Repos, p: P.EventAppend) -> EventRecord:
    return r.events.append(
        p.goal_id,
        p.kind,
        p.payload,
        event_uuid=p.event_uuid,
        run_id=p.run_id,
        actor=p.actor,
        schema_version=p.schema_version,
    )


def _event_page(r: Repos, p: P.EventQuery) -> msgspec.Raw:
    page = r.events.get_by_goal_json(
        p.goal_id, since=p.since, after_event_id=p.after_event_id, limit=p.limit, tail=p.tail
    )
    return msgspec.Raw(page)


def _budget_append(r: Repos, p: P.BudgetAppend) -> BudgetCheckpoint:
    return r.budgets.append_checkpoint(BudgetCheckpoint(**msgspec.structs.asdict(p)))


def _repo(
    name: str,
    params: type[msgspec.Struct],
    result: Any,
    access: Access,
    run: RepoFn,
    summary: str,
    *errors: ErrorCode,
    appends_events: bool = False,
    rows: Callable[[Any], int | None] | None = None,
    deletes_events: bool = False,
) -> Method:
    return Method(
        name,
        params,
        result,
        access,
        run,
        summary,
        errors,
        appends_events,
        rows=rows,
        deletes_events=deletes_events,
    )


def _all_of_the_goal(p: Any) -> None:
    return None  # as many rows as the goal has: no telling from the params


def _page_rows(p: P.EventQuery) -> int | None:
    if p.since is not None:  # created_at is in no index: the goal's log is scanned for it
        return None
    return p.limit if p.tail is None else p.tail


def _session(
    name: str,
    params: type[msgspec.Struct],
    result: Any,
    run: SessionFn,
    summary: str,
    *errors: ErrorCode,
    when_aborted: bool = False,
    now: Callable[[SessionLike, Any], Any] | None = None,
) -> Method:
    return Method(
        name, params, result, Access.SESSION, run, summary, errors, False, when_aborted, now
    )


R, W = Access.READ, Access.WRITE

# fmt: off
_TABLE: tuple[Method, ...] = (
    _repo("goal.create", GoalRecord, GoalRecord, W, lambda r, p: r.goals.create(p),
          "Create a goal; fails if goal_id exists.", _CONFLICT),
    _repo("goal.upsert", GoalRecord, GoalRecord, W, lambda r, p: r.goals.upsert(p),
          "Create a goal or replace it; an existing goal's version goes up by one."),
    _repo("goal.get", P.GoalId, GoalRecord | None, R, lambda r, p: r.goals.get(p.goal_id),
          "A goal, or null if there is none with that id."),
    _repo("goal.update_status", P.GoalUpdateStatus, GoalRecord, W,
          lambda r, p: r.goals.update_status(p.goal_id, p.status, p.phase),
          "Set a goal's status and phase; updated_at becomes now.", _NF),
    _repo("goal.update", P.GoalUpdate, GoalRecord, W,
          lambda r, p: r.goals.update(p.goal_id, p.expected_version, p.changes),
          "Change goal fields if the stored version is expected_version.",
          _NF, ErrorCode.VERSION_CONFLICT),
    _repo("goal.heartbeat", P.GoalId, GoalRecord, W, lambda r, p: r.goals.heartbeat(p.goal_id),
          "Touch a goal's updated_at; its version does not change.", _NF),
    _repo("goal.list", GoalFilter, list[GoalSummary], R, lambda r, p: r.goals.list(p),
          "Goal summaries, newest updated_at first, filtered.", rows=lambda p: p.limit),
    _repo("goal.delete", P.GoalId, P.DeletedFlag, W, _goal_delete,
          "Delete a goal with its tasks, events, proof, checkpoints and artifacts.", _NF,
          rows=_all_of_the_goal, deletes_events=True),
    _repo("task.create_batch", P.TaskBatch, P.Created, W,
          lambda r, p: P.Created(r.tasks.create_batch(p.goal_id, _task_records(p))),
          "Create tasks of one goal, all or nothing.", _NF, _CONFLICT,
          rows=lambda p: len(p.tasks)),
    _repo("task.get", P.TaskId, TaskRecord | None, R, lambda r, p: r.tasks.get(p.task_id),
          "A task, or null."),
    _repo("task.get_by_goal", P.GoalId, list[TaskRecord], R,
          lambda r, p: r.tasks.get_by_goal(p.goal_id), "A goal's tasks in creation order.",
          rows=_all_of_the_goal),
    _repo("task.update_status", P.TaskUpdateStatus, TaskRecord, W,
          lambda r, p: r.tasks.update_status(p.task_id, p.status), "Set a task's status.", _NF),
    _repo("task.update_task_graph", P.TaskBatch, P.Replaced, W,
          lambda r, p: P.Replaced(r.tasks.update_task_graph(p.goal_id, _task_records(p))),
          "Replace a goal's tasks with these, atomically.", _NF, _CONFLICT,
          rows=_all_of_the_goal),
    _repo("task.delete_by_goal", P.GoalId, P.DeletedCount, W,
          lambda r, p: P.DeletedCount(r.tasks.delete_by_goal(p.goal_id)),
          "Delete a goal's tasks.", rows=_all_of_the_goal),
    _repo("event.append", P.EventAppend, EventRecord, W, _event_append,
          "Append an event to a goal's log.", _NF, appends_events=True),
    _repo("event.append_batch", P.EventAppendBatch, P.EventIds, W,
          lambda r, p: P.EventIds(r.events.append_batch(p.goal_id, p.events)),
          "Append events, all or nothing.", _NF, appends_events=True,
          rows=lambda p: len(p.events)),
    _repo("event.get_by_goal", P.EventQuery, list[EventRecord], R, _event_page,
          "A page of a goal's events by event_id (the oldest, or with tail the newest); "
          "[] for an unknown goal.", rows=_page_rows),
    _repo("event.delete_by_goal", P.GoalId, P.DeletedCount, W,
          lambda r, p: P.DeletedCount(r.events.delete_by_goal(p.goal_id)),
          "Delete a goal's events.", rows=_all_of_the_goal, deletes_events=True),
    _repo("proof.upsert", ProofRecord, ProofRecord, W, lambda r, p: r.proofs.upsert(p),
          "Store a goal's proof, replacing any earlier one.", _NF),
    _repo("proof.get", P.GoalId, ProofRecord | None, R, lambda r, p: r.proofs.get(p.goal_id),
          "A goal's proof, or null."),
    _repo("proof.delete", P.GoalId, P.DeletedCount, W,
          lambda r, p: P.DeletedCount(r.proofs.delete(p.goal_id)), "Delete a goal's proof."),
    _repo("budget.append_checkpoint", P.BudgetAppend, BudgetCheckpoint, W, _budget_append,
          "Record a budget checkpoint (money in cents).", _NF),
    _repo("budget.get_by_goal", P.GoalId, list[BudgetCheckpoint], R,
          lambda r, p: r.budgets.get_by_goal(p.goal_id), "A goal's checkpoints in order.",
          rows=_all_of_the_goal),
    _repo("budget.delete_by_goal", P.GoalId, P.DeletedCount, W,
          lambda r, p: P.DeletedCount(r.budgets.delete_by_goal(p.goal_id)),
          "Delete a goal's checkpoints.", rows=_all_of_the_goal),
    _repo("artifact.register", P.ArtifactRegister, ArtifactRecord, W,
          lambda r, p: r.artifacts.register(p.goal_id, p.kind, p.path, p.mime_type),
          "Register an artifact of a goal.", _NF),
    _repo("artifact.get_by_goal", P.ArtifactQuery, list[ArtifactRecord], R,
          lambda r, p: r.artifacts.get_by_goal(p.goal_id, p.kind),
          "A goal's artifacts in order, optionally of one kind.", rows=_all_of_the_goal),
    _repo("artifact.delete", P.ArtifactId, P.DeletedFlag, W,
          lambda r, p: P.DeletedFlag(r.artifacts.delete(p.artifact_id)),
          "Delete an artifact; deleted is false if there was none."),
    _repo("artifact.delete_by_goal", P.GoalId, P.DeletedCount, W,
          lambda r, p: P.DeletedCount(r.artifacts.delete_by_goal(p.goal_id)),
          "Delete a goal's artifacts.", rows=_all_of_the_goal),
    _session("event.subscribe", P.EventSubscribe, P.Subscribed,
             lambda s, p: s.subscribe(p),
             "Receive event.appended notifications for committed events."),
    _session("event.unsubscribe", P.Unsubscribe, P.Unsubscribed,
             lambda s, p: s.unsubscribe(p), "End a subscription.", _NF),
    _session("tx.begin", P.NoParams, P.TxActive, lambda s, p: s.tx_begin(),
             "Open a transaction owned by this connection.",
             ErrorCode.TRANSACTION_ACTIVE, ErrorCode.BUSY),
    _session("tx.commit", P.NoParams, P.TxCommitted, lambda s, p: s.tx_commit(),
             "Commit this connection's transaction.",
             ErrorCode.NO_TRANSACTION, ErrorCode.TRANSACTION_ABORTED, ErrorCode.STORAGE_FAILURE,
             when_aborted=True),
    _session("tx.rollback", P.NoParams, P.TxRolledBack, lambda s, p: s.tx_rollback(),
             "Roll back this connection's transaction, or end an aborted one.",
             ErrorCode.NO_TRANSACTION, when_aborted=True),
    _session("db.backup", P.BackupParams, P.BackupResult, lambda s, p: s.backup(p),
             "Write a consistent copy of the database to an absolute path.",
             ErrorCode.INVALID_PARAMS, ErrorCode.STORAGE_FAILURE),
    _session("daemon.ping", P.NoParams, str, lambda s, p: _pong(),
             "Answer \"pong\".", when_aborted=True, now=lambda s, p: "pong"),
    _session("daemon.status", P.NoParams, P.DaemonStatus, lambda s, p: s.status(),
             "The daemon's version, paths, pid, uptime and live counts.", when_aborted=True),
    _session("rpc.discover", P.NoParams, dict[str, Any], lambda s, p: s.discover(),
             "An OpenRPC document of every method.", when_aborted=True),
)
# fmt: on


async def _pong() -> str:
    return "pong"


METHODS: Mapping[str, Method] = {m.name: m for m in _TABLE}
