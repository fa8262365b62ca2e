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
from typing import Any

import msgspec

__all__ = [
    "ArtifactRecord",
    "BudgetCheckpoint",
    "EventInput",
    "EventRecord",
    "GoalFilter",
    "GoalRecord",
    "GoalSummary",
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
    max_agents: int | None = None
    budget_time: str | None = None
    budget_tokens: int | None = None
    budget_usd: int | None = None
    cost_tracker_path: str | None = None
    terminal_criteria: Any = None
    failure: Any = None
    created_at: int = msgspec.field(default_factory=now)
    updated_at: int = msgspec.field(default_factory=now)
    completed_at: int | None = None
    controller_pid: int | None = None
    version: int = 1


class GoalSummary(_Record):
    goal_id: str
    status: str
    phase: str
    goal_text: str
    created_at: int
    updated_at: int


class GoalFilter(_Record):
    """Filters of ``goals.list``; ``None`` means "any"."""

    status: str | None = None
    phase: str | None = None
    kind: str | None = None
    older_than: int | None = None
    limit: int | None = None


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
    retry_count: int = 0
    max_retries: int = 3
    lease_expires_at: int | None = None
    completed_at: int | None = None
    created_at: int = msgspec.field(default_factory=now)
    updated_at: int = msgspec.field(default_factory=now)


class EventInput(_Record):
    """One event to append; the goal is given beside it."""

    kind: str
    payload: Any
    event_uuid: str | None = None
    run_id: str | None = None
    actor: str | None = None
    schema_version: int = 1


class EventRecord(_Record):
    event_id: int
    goal_id: str
    kind: str
    payload: Any
    created_at: int
    event_uuid: str | None = None
    run_id: str | None = None
    actor: str | None = None
    schema_version: int = 1


class ProofRecord(_Record):
    goal_id: str
    status: str
    version: int = 1
    readiness: str = ""
    summary: str = ""
    task_graph_summary: Any = None
    changed_files: Any = None
    commits: Any = None
    git: Any = None
    gates: Any = None
    gates_passed: int = 0
    gates_total: int = 0
    post_mutation_gates_ran: bool = False
    known_gaps: Any = None
    human_decisions_required: Any = None
    recovery_status: str | None = None
    delivery_metadata: Any = None
    review_artifacts: Any = None
    integration_evidence: Any = None
    oracle_evidence: Any = None
    generated_at: int = msgspec.field(default_factory=now)


class BudgetCheckpoint(_Record):
    """A budget checkpoint; ``checkpoint_id`` is ``None`` until it is stored. Money in cents."""

    goal_id: str
    checkpoint_id: int | None = None
    version: int = 1
    label: str = ""
    status: str = ""
    phase: str = ""
    recorded_at: int = msgspec.field(default_factory=now)
    budget_time: str | None = None
    total_budget_secs: int | None = None
    elapsed_since_created_secs: int = 0
    remaining_budget_secs: int | None = None
    budget_tokens: int | None = None
    used_tokens: int = 0
    remaining_budget_tokens: int | None = None
    budget_usd: int | None = None
    estimated_cost_usd: int = 0
    remaining_budget_usd: int | None = None
    limit_value: int | None = None
    used_value: int | None = None
    created_at: int = msgspec.field(default_factory=now)


class ArtifactRecord(_Record):
    """A registered artifact; ``artifact_id`` is ``None`` until it is stored."""

    goal_id: str
    kind: str
    path: str
    artifact_id: int | None = None
    mime_type: str | None = None
    created_at: int = msgspec.field(default_factory=now)
