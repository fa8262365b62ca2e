"""Contract section 1: what a record holds when it is given only its required fields.

Checked twice: over the wire (each record as the write answers it and as it reads back) and
through ``omkd.db``'s repositories. Times defaulting to "now" must be the clock at the call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from omkd.db import (
    BudgetCheckpoint,
    Database,
    EventInput,
    EventRecord,
    GoalRecord,
    ProofRecord,
    TaskRecord,
)

from rpc_helpers import RawClient, goal, running_daemon, short_tempdir

GOAL_DEFAULTS: dict[str, Any] = {
    "policy": "local",
    "delivery_policy": "local",
    "merge_policy": "disabled",
    "until_ready": False,
    "slice_execution": False,
    "kind": None,
    "max_agents": None,
    "budget_time": None,
    "budget_tokens": None,
    "budget_usd": None,
    "original_goal": "",
    "normalized_goal": "",
    "state_dir": "",
    "version": 1,
}
TASK_DEFAULTS: dict[str, Any] = {
    "title": "",
    "description": "",
    "status": "pending",
    "risk": "",
    "retry_count": 0,
    "max_retries": 3,
    "owner": None,
}
PROOF_DEFAULTS: dict[str, Any] = {
    "version": 1,
    "readiness": "",
    "summary": "",
    "gates_passed": 0,
    "gates_total": 0,
    "post_mutation_gates_ran": False,
}
BUDGET_DEFAULTS: dict[str, Any] = {
    "version": 1,
    "label": "",
    "status": "",
    "phase": "",
    "elapsed_since_created_secs": 0,
    "used_tokens": 0,
    "estimated_cost_usd": 0,
}
EVENT_DEFAULTS: dict[str, Any] = {"schema_version": 1}
ARTIFACT_DEFAULTS: dict[str, Any] = {"mime_type": None}


def assert_fields(record: dict[str, Any], expected: dict[str, Any]) -> None:
    """Each expected field has its value and its JSON type (false is not 0, 1 is not true)."""
    got = {name: (type(record[name]), record[name]) for name in expected}
    assert got == {name: (type(value), value) for name, value in expected.items()}


class Clock:
    """The unix seconds before and after a call: a "now" default must fall between."""

    def __init__(self) -> None:
        self.start = int(time.time())
        self.end = self.start

    def stop(self) -> None:
        self.end = int(time.time())

    def assert_now(self, record: dict[str, Any], *fields: str) -> None:
        for name in fields:
            value = record[name]
            assert type(value) is int and self.start <= value <= self.end, (name, value)


@pytest.fixture
async def client() -> AsyncIterator[RawClient]:
    with short_tempdir() as directory:
        async with running_daemon(directory) as daemon:
            c = await RawClient.connect(daemon.config.socket_path)
            yield c
            await c.aclose()


async def test_goal_defaults_on_the_wire(client: RawClient) -> None:
    clock = Clock()
    created = await client.call("goal.create", **goal("g1"))
    clock.stop()
    for record in (created, await client.call("goal.get", goal_id="g1")):
        assert_fields(record, GOAL_DEFAULTS)
        clock.assert_now(record, "created_at", "updated_at")
        assert record["created_at"] == record["updated_at"]


async def test_child_record_defaults_on_the_wire(client: RawClient) -> None:
    await client.call("goal.create", **goal("g1"))
    clock = Clock()
    assert await client.call(
        "task.create_batch", goal_id="g1", tasks=[{"task_id": "t1", "kind": "code"}]
    ) == {"created": 1}
    proof = await client.call("proof.upsert", goal_id="g1", status="draft")
    checkpoint = await client.call("budget.append_checkpoint", goal_id="g1")
    event = await client.call("event.append", goal_id="g1", kind="k", payload={"n": 1})
    await client.call("event.append_batch", goal_id="g1", events=[{"kind": "k", "payload": 2}])
    artifact = await client.call("artifact.register", goal_id="g1", kind="log", path="/a.log")
    clock.stop()

    task = await client.call("task.get", task_id="t1")
    assert_fields(task, {**TASK_DEFAULTS, "goal_id": "g1"})
    clock.assert_now(task, "created_at", "updated_at")
    for record in (proof, await client.call("proof.get", goal_id="g1")):
        assert_fields(record, PROOF_DEFAULTS)
        clock.assert_now(record, "generated_at")
    (stored_checkpoint,) = await client.call("budget.get_by_goal", goal_id="g1")
    assert type(checkpoint["checkpoint_id"]) is int
    for record in (checkpoint, stored_checkpoint):
        assert_fields(record, BUDGET_DEFAULTS)
        clock.assert_now(record, "recorded_at", "created_at")
    events = await client.call("event.get_by_goal", goal_id="g1")
    assert len(events) == 2 and events[0]["event_id"] == event["event_id"]
    for record in (event, *events):
        assert_fields(record, EVENT_DEFAULTS)
        clock.assert_now(record, "created_at")
    (stored_artifact,) = await client.call("artifact.get_by_goal", goal_id="g1")
    for record in (artifact, stored_artifact):
        assert_fields(record, ARTIFACT_DEFAULTS)
        clock.assert_now(record, "created_at")


def test_defaults_through_the_storage_api(
    db: Database, make_goal: Callable[..., GoalRecord]
) -> None:
    def as_dict(record: msgspec.Struct) -> dict[str, Any]:
        return msgspec.structs.asdict(record)

    clock = Clock()
    db.goals.create(make_goal("g1"))
    db.tasks.create_batch("g1", [TaskRecord(task_id="t1", goal_id="g1", kind="code")])
    db.proofs.upsert(ProofRecord(goal_id="g1", status="draft"))
    db.budgets.append_checkpoint(BudgetCheckpoint(goal_id="g1"))
    db.events.append("g1", "k", None)
    db.events.append_batch("g1", [EventInput(kind="k", payload=[])])
    db.artifacts.register("g1", "log", "/a.log")
    clock.stop()

    stored_goal = db.goals.get("g1")
    stored_task = db.tasks.get("t1")
    stored_proof = db.proofs.get("g1")
    assert stored_goal is not None and stored_task is not None and stored_proof is not None
    assert_fields(as_dict(stored_goal), GOAL_DEFAULTS)
    clock.assert_now(as_dict(stored_goal), "created_at", "updated_at")
    assert_fields(as_dict(stored_task), TASK_DEFAULTS)
    clock.assert_now(as_dict(stored_task), "created_at", "updated_at")
    assert_fields(as_dict(stored_proof), PROOF_DEFAULTS)
    clock.assert_now(as_dict(stored_proof), "generated_at")
    (checkpoint,) = db.budgets.get_by_goal("g1")
    assert_fields(as_dict(checkpoint), BUDGET_DEFAULTS)
    clock.assert_now(as_dict(checkpoint), "recorded_at", "created_at")
    events = db.events.get_by_goal("g1")
    assert len(events) == 2
    for event in events:
        assert_fields(as_dict(event), EVENT_DEFAULTS)
        clock.assert_now(as_dict(event), "created_at")
    (artifact,) = db.artifacts.get_by_goal("g1")
    assert_fields(as_dict(artifact), ARTIFACT_DEFAULTS)
    clock.assert_now(as_dict(artifact), "created_at")


def test_records_built_with_keywords_take_the_defaults() -> None:
    # Contract section 2: record classes are built with keyword arguments and the defaults
    # of section 1. An event's id is the daemon's to assign (no default); its created_at
    # defaulted to nothing.
    clock = Clock()
    event = EventRecord(event_id=1, goal_id="g1", kind="k", payload=None)
    task = TaskRecord(task_id="t1", goal_id="g1", kind="code")
    clock.stop()
    assert_fields(msgspec.structs.asdict(event), EVENT_DEFAULTS)
    clock.assert_now(msgspec.structs.asdict(event), "created_at")
    assert_fields(msgspec.structs.asdict(task), TASK_DEFAULTS)
    with pytest.raises(TypeError, match="event_id"):
        EventRecord(goal_id="g1", kind="k", payload=None)  # type: ignore[call-arg]
