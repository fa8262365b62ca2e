"""The records omkd stores and serves, shared by the daemon, its storage layer and clients.

Field names are the wire names and the Python attribute names (contract, section 1). Fields
typed ``Any`` hold any JSON value: native here, compact JSON text in SQLite. Times are integer
unix seconds and money is integer cents; decoding JSON with a float where an ``int`` belongs
is refused.

Defaults of ``now`` are taken when a record is built, which for a wire call is the moment the
daemon decodes it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec

# SQLite stores an integer in 64 bits: a larger one is refused as invalid (-32602 on the
# wire, naming the field), never sent on to overflow.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A number of rows to return (a limit): none or more.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# A goal's version: at most 2^53 - 1, the largest integer every JSON reader keeps exactly
# (counting writes up from it never overflows); the storage layer checks it too.
GoalVersion = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**53 - 1)]

__all__ = [
    "ArtifactRecord",
    "BudgetCheckpoint",
    "Count",
    "EventInput",
    "EventRecord",
    "GoalFilter",
    "GoalRecord",
    "GoalSummary",
    "Int64",
    "ProofRecord",
    "TaskRecord",
    "now",
]


def now() -> int:
    """Return the current time as integer unix seconds."""
    return int(time.time())


class _Record(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every record: keyword-only, unknown fields refused when decoding."""


class GoalRecord(_Record):
    goal_id: str
    status: str
    phase: str
    goal_text: str
    project_dir: str
    kind: str | None = None
    original_goal: str = ""
    normalized_goal: str = ""
    state_dir: str = ""
    policy: str = "local"
    delivery_policy: str = "local"
    merge_policy: str = "disabled"
    until_ready: bool = False
    slice_execution: bool = False
    max_agents: Int64 | None = None
    budget_time: str | None = None
    budget_tokens: Int64 | None = None
    budget_usd: Int64 | None = None
    cost_tracker_path: str | None = None
    terminal_criteria: Any = None
    failure: Any = None
    created_at: Int64 = msgspec.field(default_factory=now)
    updated_at: Int64 = msgspec.field(default_factory=now)
    completed_at: Int64 | None = None
    controller_pid: Int64 | None = None
    version: GoalVersion = 1


class GoalSummary(_Record):
    goal_id: str
    status: str
    phase: str
    goal_text: str
    created_at: Int64
    updated_at: Int64


class GoalFilter(_Record):
    """Filters of ``goals.list``; ``None`` means "any"."""

    status: str | None = None
    phase: str | None = None
    kind: str | None = None
    older_than: Int64 | None = None
    limit: Count | None = None


class TaskRecord(_Record):
    task_id: str
    goal_id: str
    kind: str
    title: str = ""
    description: str = ""
    status: str = "pending"
    owner: str | None = None
    read_set: Any = None
    write_set: Any = None
    depends_on: Any = None
    risk: str = ""
    acceptance: Any = None
    evidence: Any = None
    retry_count: Int64 = 0
    max_retries: Int64 = 3
    lease_expires_at: Int64 | None = None
    completed_at: Int64 | None = None
    created_at: Int64 = msgspec.field(default_factory=now)
    updated_at: Int64 = msgspec.field(default_factory=now)


class EventInput(_Record):
    """One event to append; the goal is given beside it."""

    kind: str
    payload: Any
    event_uuid: str | None = None
    run_id: str | None = None
    actor: str | None = None
    schema_version: Int64 = 1


class EventRecord(_Record):
    event_id: Int64  # assigned by the daemon: no default
    goal_id: str
    kind: str
    payload: Any
    created_at: Int64 = msgspec.field(default_factory=now)
    event_uuid: str | None = None
    run_id: str | None = None
    actor: str | None = None
    schema_version: Int64 = 1


class ProofRecord(_Record):
    goal_id: str
    status: str
    version: Int64 = 1
    readiness: str = ""
    summary: str = ""
    task_graph_summary: Any = None
    changed_files: Any = None
    commits: Any = None
    git: Any = None
    gates: Any = None
    gates_passed: Int64 = 0
    gates_total: Int64 = 0
    post_mutation_gates_ran: bool = False
    known_gaps: Any = None
    human_decisions_required: Any = None
    recovery_status: str | None = None
    delivery_metadata: Any = None
    review_artifacts: Any = None
    integration_evidence: Any = None
    oracle_evidence: Any = None
    generated_at: Int64 = msgspec.field(default_factory=now)


class BudgetCheckpoint(_Record):
    """A budget checkpoint; ``checkpoint_id`` is ``None`` until it is stored. Money in cents."""

    goal_id: str
    checkpoint_id: Int64 | None = None
    version: Int64 = 1
    label: str = ""
    status: str = ""
    phase: str = ""
    recorded_at: Int64 = msgspec.field(default_factory=now)
    budget_time: str | None = None
    total_budget_secs: Int64 | None = None
    elapsed_since_created_secs: Int64 = 0
    remaining_budget_secs: Int64 | None = None
    budget_tokens: Int64 | None = None
    used_tokens: Int64 = 0
    remaining_budget_tokens: Int64 | None = None
    budget_usd: Int64 | None = None
    estimated_cost_usd: Int64 = 0
    remaining_budget_usd: Int64 | None = None
    limit_value: Int64 | None = None
    used_value: Int64 | None = None
    created_at: Int64 = msgspec.field(default_factory=now)


class ArtifactRecord(_Record):
    """A registered artifact; ``artifact_id`` is ``None`` until it is stored."""

    goal_id: str
    kind: str
    path: str
    artifact_id: Int64 | None = None
    mime_type: str | None = None
    created_at: Int64 = msgspec.field(default_factory=now)
