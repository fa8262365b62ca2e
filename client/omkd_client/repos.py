"""Typed repositories, in a sync and an async flavour with the same names and arguments.

Each method is a one-line shell over an ``ops`` function, run by the client that owns the
repository (or by a transaction, which runs it on its client inside the transaction). Method
names are the wire names: ``goals.update_status`` is ``goal.update_status``.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from omkd_client import ops
from omkd_client.ops import DaemonStatus, Op
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

if TYPE_CHECKING:
    from omkd_client.sync_client import Subscription
    from omkd_client.trio_client import AsyncSubscription

__all__ = [
    "Artifacts",
    "AsyncArtifacts",
    "AsyncBudgets",
    "AsyncDaemon",
    "AsyncEvents",
    "AsyncGoals",
    "AsyncProofs",
    "AsyncRunner",
    "AsyncTasks",
    "Budgets",
    "Daemon",
    "Events",
    "Goals",
    "Proofs",
    "Runner",
    "Tasks",
]

T = TypeVar("T")


class Runner(Protocol):
    def __call__(self, op: Op[T], /) -> T: ...


class AsyncRunner(Protocol):
    def __call__(self, op: Op[T], /) -> Awaitable[T]: ...


R = TypeVar("R", Runner, AsyncRunner)


class _Repo(Generic[R]):
    __slots__ = ("_run",)

    def __init__(self, run: R) -> None:
        self._run: R = run


class Goals(_Repo[Runner]):
    """``goals``: typed calls of the ``goal.*`` methods."""

    def create(self, goal: GoalRecord) -> GoalRecord:
        """Create a goal; Conflict if goal_id exists."""
        return self._run(ops.goal_create(goal))

    def upsert(self, goal: GoalRecord) -> GoalRecord:
        """Create or replace a goal; an existing one's version goes up by one."""
        return self._run(ops.goal_upsert(goal))

    def get(self, goal_id: str) -> GoalRecord | None:
        """Return the goal, or None."""
        return self._run(ops.goal_get(goal_id))

    def update_status(self, goal_id: str, status: str, phase: str) -> GoalRecord:
        """Set status and phase; NotFound if missing."""
        return self._run(ops.goal_update_status(goal_id, status, phase))

    def update(self, goal_id: str, expected_version: int, changes: Mapping[str, Any]) -> GoalRecord:
        """Change fields if the version matches; VersionConflict if not, NotFound if missing."""
        return self._run(ops.goal_update(goal_id, expected_version, changes))

    def heartbeat(self, goal_id: str) -> GoalRecord:
        """Touch updated_at (the version does not change); NotFound if missing."""
        return self._run(ops.goal_heartbeat(goal_id))

    def list(
        self,
        filter: GoalFilter | None = None,
        *,
        status: str | None = None,
        phase: str | None = None,
        kind: str | None = None,
        older_than: int | None = None,
        limit: int | None = None,
    ) -> builtins.list[GoalSummary]:
        """Goal summaries, newest updated_at first; keywords override ``filter``."""
        return self._run(
            ops.goal_list(
                filter, status=status, phase=phase, kind=kind, older_than=older_than, limit=limit
            )
        )

    def delete(self, goal_id: str) -> bool:
        """Delete a goal and everything of it; NotFound if missing."""
        return self._run(ops.goal_delete(goal_id))


class Tasks(_Repo[Runner]):
    """``tasks``: typed calls of the ``task.*`` methods."""

    def create_batch(self, goal_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Create tasks of one goal, all or nothing; return how many."""
        return self._run(ops.task_create_batch(goal_id, tasks))

    def get(self, task_id: str) -> TaskRecord | None:
        """Return the task, or None."""
        return self._run(ops.task_get(task_id))

    def get_by_goal(self, goal_id: str) -> list[TaskRecord]:
        """A goal's tasks in creation order."""
        return self._run(ops.task_get_by_goal(goal_id))

    def update_status(self, task_id: str, status: str) -> TaskRecord:
        """Set a task's status; NotFound if missing."""
        return self._run(ops.task_update_status(task_id, status))

    def update_task_graph(self, goal_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Make these exactly the goal's tasks, atomically; return how many."""
        return self._run(ops.task_update_task_graph(goal_id, tasks))

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's tasks; return how many."""
        return self._run(ops.task_delete_by_goal(goal_id))


class Events(_Repo[Runner]):
    """``events``: typed calls of the ``event.*`` methods."""

    def __init__(self, run: Runner, subscribe: Callable[[str | None, int | None], Subscription]):
        super().__init__(run)
        self._subscribe = subscribe

    def subscribe(
        self, goal_id: str | None = None, after_event_id: int | None = None
    ) -> Subscription:
        """Subscribe to committed events (of one goal, or all with None): an iterator of
        EventRecord, first the backlog after ``after_event_id`` when given."""
        return self._subscribe(goal_id, after_event_id)

    def append(
        self,
        goal_id: str,
        kind: str,
        payload: Any,
        *,
        event_uuid: str | None = None,
        run_id: str | None = None,
        actor: str | None = None,
        schema_version: int | None = None,
    ) -> EventRecord:
        """Append an event; NotFound for an unknown goal."""
        return self._run(
            ops.event_append(
                goal_id,
                kind,
                payload,
                event_uuid=event_uuid,
                run_id=run_id,
                actor=actor,
                schema_version=schema_version,
            )
        )

    def append_batch(self, goal_id: str, events: Sequence[EventInput]) -> list[int]:
        """Append events, all or nothing; return their ids."""
        return self._run(ops.event_append_batch(goal_id, events))

    def get_by_goal(
        self,
        goal_id: str,
        *,
        since: int | None = None,
        after_event_id: int | None = None,
        limit: int | None = None,
        tail: int | None = None,
    ) -> list[EventRecord]:
        """A page of a goal's events by event_id ascending ([] for an unknown goal):
        the oldest ``limit`` of the range, or with ``tail`` the newest ``tail``."""
        return self._run(
            ops.event_get_by_goal(
                goal_id, since=since, after_event_id=after_event_id, limit=limit, tail=tail
            )
        )

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's events; return how many."""
        return self._run(ops.event_delete_by_goal(goal_id))


class Proofs(_Repo[Runner]):
    """``proofs``: typed calls of the ``proof.*`` methods."""

    def upsert(self, proof: ProofRecord) -> ProofRecord:
        """Store a goal's proof, replacing any earlier one."""
        return self._run(ops.proof_upsert(proof))

    def get(self, goal_id: str) -> ProofRecord | None:
        """Return the goal's proof, or None."""
        return self._run(ops.proof_get(goal_id))

    def delete(self, goal_id: str) -> int:
        """Delete the goal's proof; return 0 or 1."""
        return self._run(ops.proof_delete(goal_id))


class Budgets(_Repo[Runner]):
    """``budgets``: typed calls of the ``budget.*`` methods."""

    def append_checkpoint(self, checkpoint: BudgetCheckpoint) -> BudgetCheckpoint:
        """Record a checkpoint (its checkpoint_id is assigned)."""
        return self._run(ops.budget_append_checkpoint(checkpoint))

    def get_by_goal(self, goal_id: str) -> list[BudgetCheckpoint]:
        """A goal's checkpoints in insertion order."""
        return self._run(ops.budget_get_by_goal(goal_id))

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's checkpoints; return how many."""
        return self._run(ops.budget_delete_by_goal(goal_id))


class Artifacts(_Repo[Runner]):
    """``artifacts``: typed calls of the ``artifact.*`` methods."""

    def register(
        self, goal_id: str, kind: str, path: str, mime_type: str | None = None
    ) -> ArtifactRecord:
        """Register an artifact of a goal."""
        return self._run(ops.artifact_register(goal_id, kind, path, mime_type))

    def get_by_goal(self, goal_id: str, kind: str | None = None) -> list[ArtifactRecord]:
        """A goal's artifacts in order, optionally of one kind."""
        return self._run(ops.artifact_get_by_goal(goal_id, kind))

    def delete(self, artifact_id: int) -> bool:
        """Delete an artifact; False if there was none."""
        return self._run(ops.artifact_delete(artifact_id))

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's artifacts; return how many."""
        return self._run(ops.artifact_delete_by_goal(goal_id))


class Daemon(_Repo[Runner]):
    """``daemon``: typed calls of the ``daemon.*`` methods."""

    def ping(self) -> str:
        """Return "pong"."""
        return self._run(ops.daemon_ping())

    def status(self) -> DaemonStatus:
        """The daemon's version, paths, pid, uptime and live counts."""
        return self._run(ops.daemon_status())


class AsyncGoals(_Repo[AsyncRunner]):
    """``goals``: awaitable typed calls of the ``goal.*`` methods."""

    async def create(self, goal: GoalRecord) -> GoalRecord:
        """Create a goal; Conflict if goal_id exists."""
        return await self._run(ops.goal_create(goal))

    async def upsert(self, goal: GoalRecord) -> GoalRecord:
        """Create or replace a goal; an existing one's version goes up by one."""
        return await self._run(ops.goal_upsert(goal))

    async def get(self, goal_id: str) -> GoalRecord | None:
        """Return the goal, or None."""
        return await self._run(ops.goal_get(goal_id))

    async def update_status(self, goal_id: str, status: str, phase: str) -> GoalRecord:
        """Set status and phase; NotFound if missing."""
        return await self._run(ops.goal_update_status(goal_id, status, phase))

    async def update(
        self, goal_id: str, expected_version: int, changes: Mapping[str, Any]
    ) -> GoalRecord:
        """Change fields if the version matches; VersionConflict if not, NotFound if missing."""
        return await self._run(ops.goal_update(goal_id, expected_version, changes))

    async def heartbeat(self, goal_id: str) -> GoalRecord:
        """Touch updated_at (the version does not change); NotFound if missing."""
        return await self._run(ops.goal_heartbeat(goal_id))

    async def list(
        self,
        filter: GoalFilter | None = None,
        *,
        status: str | None = None,
        phase: str | None = None,
        kind: str | None = None,
        older_than: int | None = None,
        limit: int | None = None,
    ) -> builtins.list[GoalSummary]:
        """Goal summaries, newest updated_at first; keywords override ``filter``."""
        return await self._run(
            ops.goal_list(
                filter, status=status, phase=phase, kind=kind, older_than=older_than, limit=limit
            )
        )

    async def delete(self, goal_id: str) -> bool:
        """Delete a goal and everything of it; NotFound if missing."""
        return await self._run(ops.goal_delete(goal_id))


class AsyncTasks(_Repo[AsyncRunner]):
    """``tasks``: awaitable typed calls of the ``task.*`` methods."""

    async def create_batch(self, goal_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Create tasks of one goal, all or nothing; return how many."""
        return await self._run(ops.task_create_batch(goal_id, tasks))

    async def get(self, task_id: str) -> TaskRecord | None:
        """Return the task, or None."""
        return await self._run(ops.task_get(task_id))

    async def get_by_goal(self, goal_id: str) -> list[TaskRecord]:
        """A goal's tasks in creation order."""
        return await self._run(ops.task_get_by_goal(goal_id))

    async def update_status(self, task_id: str, status: str) -> TaskRecord:
        """Set a task's status; NotFound if missing."""
        return await self._run(ops.task_update_status(task_id, status))

    async def update_task_graph(self, goal_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Make these exactly the goal's tasks, atomically; return how many."""
        return await self._run(ops.task_update_task_graph(goal_id, tasks))

    async def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's tasks; return how many."""
        return await self._run(ops.task_delete_by_goal(goal_id))


class AsyncEvents(_Repo[AsyncRunner]):
    """``events``: awaitable typed calls of the ``event.*`` methods."""

    def __init__(
        self,
        run: AsyncRunner,
        subscribe: Callable[[str | None, int | None], Awaitable[AsyncSubscription]],
    ):
        super().__init__(run)
        self._subscribe = subscribe

    async def subscribe(
        self, goal_id: str | None = None, after_event_id: int | None = None
    ) -> AsyncSubscription:
        """Subscribe to committed events (of one goal, or all with None): an async iterator
        of EventRecord, first the backlog after ``after_event_id`` when given."""
        return await self._subscribe(goal_id, after_event_id)

    async def append(
        self,
        goal_id: str,
        kind: str,
        payload: Any,
        *,
        event_uuid: str | None = None,
        run_id: str | None = None,
        actor: str | None = None,
        schema_version: int | None = None,
    ) -> EventRecord:
        """Append an event; NotFound for an unknown goal."""
        return await self._run(
            ops.event_append(
                goal_id,
                kind,
                payload,
                event_uuid=event_uuid,
                run_id=run_id,
                actor=actor,
                schema_version=schema_version,
            )
        )

    async def append_batch(self, goal_id: str, events: Sequence[EventInput]) -> list[int]:
        """Append events, all or nothing; return their ids."""
        return await self._run(ops.event_append_batch(goal_id, events))

    async def get_by_goal(
        self,
        goal_id: str,
        *,
        since: int | None = None,
        after_event_id: int | None = None,
        limit: int | None = None,
        tail: int | None = None,
    ) -> list[EventRecord]:
        """A page of a goal's events by event_id ascending ([] for an unknown goal):
        the oldest ``limit`` of the range, or with ``tail`` the newest ``tail``."""
        return await self._run(
            ops.event_get_by_goal(
                goal_id, since=since, after_event_id=after_event_id, limit=limit, tail=tail
            )
        )

    async def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's events; return how many."""
        return await self._run(ops.event_delete_by_goal(goal_id))


class AsyncProofs(_Repo[AsyncRunner]):
    """``proofs``: awaitable typed calls of the ``proof.*`` methods."""

    async def upsert(self, proof: ProofRecord) -> ProofRecord:
        """Store a goal's proof, replacing any earlier one."""
        return await self._run(ops.proof_upsert(proof))

    async def get(self, goal_id: str) -> ProofRecord | None:
        """Return the goal's proof, or None."""
        return await self._run(ops.proof_get(goal_id))

    async def delete(self, goal_id: str) -> int:
        """Delete the goal's proof; return 0 or 1."""
        return await self._run(ops.proof_delete(goal_id))


class AsyncBudgets(_Repo[AsyncRunner]):
    """``budgets``: awaitable typed calls of the ``budget.*`` methods."""

    async def append_checkpoint(self, checkpoint: BudgetCheckpoint) -> BudgetCheckpoint:
        """Record a checkpoint (its checkpoint_id is assigned)."""
        return await self._run(ops.budget_append_checkpoint(checkpoint))

    async def get_by_goal(self, goal_id: str) -> list[BudgetCheckpoint]:
        """A goal's checkpoints in insertion order."""
        return await self._run(ops.budget_get_by_goal(goal_id))

    async def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's checkpoints; return how many."""
        return await self._run(ops.budget_delete_by_goal(goal_id))


class AsyncArtifacts(_Repo[AsyncRunner]):
    """``artifacts``: awaitable typed calls of the ``artifact.*`` methods."""

    async def register(
        self, goal_id: str, kind: str, path: str, mime_type: str | None = None
    ) -> ArtifactRecord:
        """Register an artifact of a goal."""
        return await self._run(ops.artifact_register(goal_id, kind, path, mime_type))

    async def get_by_goal(self, goal_id: str, kind: str | None = None) -> list[ArtifactRecord]:
        """A goal's artifacts in order, optionally of one kind."""
        return await self._run(ops.artifact_get_by_goal(goal_id, kind))

    async def delete(self, artifact_id: int) -> bool:
        """Delete an artifact; False if there was none."""
        return await self._run(ops.artifact_delete(artifact_id))

    async def delete_by_goal(self, goal_id: str) -> int:
        """Delete a goal's artifacts; return how many."""
        return await self._run(ops.artifact_delete_by_goal(goal_id))


class AsyncDaemon(_Repo[AsyncRunner]):
    """``daemon``: awaitable typed calls of the ``daemon.*`` methods."""

    async def ping(self) -> str:
        """Return "pong"."""
        return await self._run(ops.daemon_ping())

    async def status(self) -> DaemonStatus:
        """The daemon's version, paths, pid, uptime and live counts."""
        return await self._run(ops.daemon_status())
