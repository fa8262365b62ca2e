"""Every typed call of the contract as an ``Op``: the wire method, its params, how to decode.

The sync and trio repositories (``omkd_client.repos``) are one-line shells over these, so the
two flavours cannot drift: what goes on the wire and what comes back is decided here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import msgspec

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
from omkd_client.results import (
    BackupResult,
    Created,
    DaemonStatus,
    DeletedCount,
    DeletedFlag,
    EventIds,
    Replaced,
    Subscribed,
)

__all__ = ["BackupResult", "DaemonStatus", "Op"]

T = TypeVar("T")


class Op(msgspec.Struct, Generic[T], frozen=True):
    """One call: ``method`` with ``params`` (a mapping or a Struct); ``decode`` its result.
    (A Struct, not a frozen dataclass, for the cost of making one per call.)"""

    method: str
    params: Any
    decode: Callable[[bytes], T]


def _as(kind: Any) -> Callable[[bytes], Any]:
    decoder = msgspec.json.Decoder(kind)
    return decoder.decode


def _field(kind: type[msgspec.Struct], name: str) -> Callable[[bytes], Any]:
    decoder = msgspec.json.Decoder(kind)
    return lambda raw: getattr(decoder.decode(raw), name)


def _params(**values: Any) -> dict[str, Any]:
    """Named params with the unset (None) optional ones left out."""
    return {k: v for k, v in values.items() if v is not None}


_goal = _as(GoalRecord)
_maybe_goal = _as(GoalRecord | None)
_summaries = _as(list[GoalSummary])
_task = _as(TaskRecord)
_maybe_task = _as(TaskRecord | None)
_tasks = _as(list[TaskRecord])
_event = _as(EventRecord)
_events = _as(list[EventRecord])
_proof = _as(ProofRecord)
_maybe_proof = _as(ProofRecord | None)
_checkpoint = _as(BudgetCheckpoint)
_checkpoints = _as(list[BudgetCheckpoint])
_artifact = _as(ArtifactRecord)
_artifacts = _as(list[ArtifactRecord])
_count = _field(DeletedCount, "deleted")
_subscribed = msgspec.json.Decoder(Subscribed).decode
_created = _field(Created, "created")
_replaced = _field(Replaced, "replaced")
_event_ids = _field(EventIds, "event_ids")
_str = _as(str)
_status = _as(DaemonStatus)
_backup = _as(BackupResult)
_document = _as(dict[str, Any])
_flag = _field(DeletedFlag, "deleted")
_any = _as(Any)

# -- goals


def goal_create(goal: GoalRecord) -> Op[GoalRecord]:
    return Op("goal.create", goal, _goal)


def goal_upsert(goal: GoalRecord) -> Op[GoalRecord]:
    return Op("goal.upsert", goal, _goal)


def goal_get(goal_id: str) -> Op[GoalRecord | None]:
    return Op("goal.get", {"goal_id": goal_id}, _maybe_goal)


def goal_update_status(goal_id: str, status: str, phase: str) -> Op[GoalRecord]:
    return Op("goal.update_status", {"goal_id": goal_id, "status": status, "phase": phase}, _goal)


def goal_update(goal_id: str, expected_version: int, changes: Mapping[str, Any]) -> Op[GoalRecord]:
    params = {"goal_id": goal_id, "expected_version": expected_version, "changes": dict(changes)}
    return Op("goal.update", params, _goal)


def goal_heartbeat(goal_id: str) -> Op[GoalRecord]:
    return Op("goal.heartbeat", {"goal_id": goal_id}, _goal)


def goal_list(filter: GoalFilter | None = None, **filters: Any) -> Op[list[GoalSummary]]:
    values = msgspec.structs.asdict(filter) if filter is not None else {}
    values.update({k: v for k, v in filters.items() if v is not None})
    return Op("goal.list", _params(**values), _summaries)


def goal_delete(goal_id: str) -> Op[bool]:
    return Op("goal.delete", {"goal_id": goal_id}, _flag)


# -- tasks


def task_create_batch(goal_id: str, tasks: Sequence[TaskRecord]) -> Op[int]:
    return Op("task.create_batch", {"goal_id": goal_id, "tasks": list(tasks)}, _created)


def task_get(task_id: str) -> Op[TaskRecord | None]:
    return Op("task.get", {"task_id": task_id}, _maybe_task)


def task_get_by_goal(goal_id: str) -> Op[list[TaskRecord]]:
    return Op("task.get_by_goal", {"goal_id": goal_id}, _tasks)


def task_update_status(task_id: str, status: str) -> Op[TaskRecord]:
    return Op("task.update_status", {"task_id": task_id, "status": status}, _task)


def task_update_task_graph(goal_id: str, tasks: Sequence[TaskRecord]) -> Op[int]:
    params = {"goal_id": goal_id, "tasks": list(tasks)}
    return Op("task.update_task_graph", params, _replaced)


def task_delete_by_goal(goal_id: str) -> Op[int]:
    return Op("task.delete_by_goal", {"goal_id": goal_id}, _count)


# -- events


def event_append(
    goal_id: str,
    kind: str,
    payload: Any,
    *,
    event_uuid: str | None = None,
    run_id: str | None = None,
    actor: str | None = None,
    schema_version: int | None = None,
) -> Op[EventRecord]:
    params = _params(event_uuid=event_uuid, run_id=run_id, actor=actor,
                     schema_version=schema_version)  # fmt: skip
    params.update(goal_id=goal_id, kind=kind, payload=payload)
    return Op("event.append", params, _event)


def event_append_batch(goal_id: str, events: Sequence[EventInput]) -> Op[list[int]]:
    return Op("event.append_batch", {"goal_id": goal_id, "events": list(events)}, _event_ids)


def event_get_by_goal(
    goal_id: str,
    *,
    since: int | None = None,
    after_event_id: int | None = None,
    limit: int | None = None,
    tail: int | None = None,
) -> Op[list[EventRecord]]:
    params = _params(
        goal_id=goal_id, since=since, after_event_id=after_event_id, limit=limit, tail=tail
    )
    return Op("event.get_by_goal", params, _events)


def event_delete_by_goal(goal_id: str) -> Op[int]:
    return Op("event.delete_by_goal", {"goal_id": goal_id}, _count)


def event_subscribe(goal_id: str | None, after_event_id: int | None) -> Op[Subscribed]:
    params = _params(goal_id=goal_id, after_event_id=after_event_id)
    return Op("event.subscribe", params, _subscribed)


def event_unsubscribe(subscription: int) -> Op[Any]:
    return Op("event.unsubscribe", {"subscription": subscription}, _any)


# -- proofs, budgets, artifacts


def proof_upsert(proof: ProofRecord) -> Op[ProofRecord]:
    return Op("proof.upsert", proof, _proof)


def proof_get(goal_id: str) -> Op[ProofRecord | None]:
    return Op("proof.get", {"goal_id": goal_id}, _maybe_proof)


def proof_delete(goal_id: str) -> Op[int]:
    return Op("proof.delete", {"goal_id": goal_id}, _count)


def budget_append_checkpoint(checkpoint: BudgetCheckpoint) -> Op[BudgetCheckpoint]:
    params = msgspec.structs.asdict(checkpoint)
    del params["checkpoint_id"]  # assigned by the daemon, never sent
    return Op("budget.append_checkpoint", params, _checkpoint)


def budget_get_by_goal(goal_id: str) -> Op[list[BudgetCheckpoint]]:
    return Op("budget.get_by_goal", {"goal_id": goal_id}, _checkpoints)


def budget_delete_by_goal(goal_id: str) -> Op[int]:
    return Op("budget.delete_by_goal", {"goal_id": goal_id}, _count)


def artifact_register(
    goal_id: str, kind: str, path: str, mime_type: str | None = None
) -> Op[ArtifactRecord]:
    params = _params(goal_id=goal_id, kind=kind, path=path, mime_type=mime_type)
    return Op("artifact.register", params, _artifact)


def artifact_get_by_goal(goal_id: str, kind: str | None = None) -> Op[list[ArtifactRecord]]:
    return Op("artifact.get_by_goal", _params(goal_id=goal_id, kind=kind), _artifacts)


def artifact_delete(artifact_id: int) -> Op[bool]:
    return Op("artifact.delete", {"artifact_id": artifact_id}, _flag)


def artifact_delete_by_goal(goal_id: str) -> Op[int]:
    return Op("artifact.delete_by_goal", {"goal_id": goal_id}, _count)


# -- the daemon and the session


def daemon_ping() -> Op[str]:
    return Op("daemon.ping", None, _str)


def daemon_status() -> Op[DaemonStatus]:
    return Op("daemon.status", None, _status)


def db_backup(dest: str) -> Op[BackupResult]:
    return Op("db.backup", {"dest": dest}, _backup)


def rpc_discover() -> Op[dict[str, Any]]:
    return Op("rpc.discover", None, _document)


def tx(method: str) -> Op[Any]:
    """``tx.begin``, ``tx.commit`` or ``tx.rollback``."""
    return Op(method, None, _any)


def generic(method: str, params: Mapping[str, Any] | None) -> Op[Any]:
    """Any method, its result decoded as plain JSON."""
    return Op(method, dict(params) if params else None, _any)
