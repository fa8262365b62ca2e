"""The six repositories on a Database: each call its own transaction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from omkd.db import (
    BudgetCheckpoint,
    Conflict,
    Database,
    EventInput,
    EventRecord,
    GoalFilter,
    GoalNotFound,
    GoalRecord,
    InvalidData,
    ProofRecord,
    TaskNotFound,
    TaskRecord,
    VersionConflict,
)
from omkd.db.goals import MAX_VERSION

MakeGoal = Callable[..., GoalRecord]


def task(task_id: str, goal_id: str = "g1", **fields: object) -> TaskRecord:
    return TaskRecord(task_id=task_id, goal_id=goal_id, kind="code", **fields)  # type: ignore[arg-type]


@pytest.fixture
def goal(db: Database, make_goal: MakeGoal) -> GoalRecord:
    return db.goals.create(make_goal("g1"))


# goals


def test_goal_create_get_and_conflict(db: Database, make_goal: MakeGoal) -> None:
    sent = make_goal("g1", kind="feature", until_ready=True, budget_usd=1250, max_agents=3)
    stored = db.goals.create(sent)
    assert stored == sent
    assert db.goals.get("g1") == sent
    assert db.goals.get("missing") is None
    with pytest.raises(Conflict) as info:
        db.goals.create(make_goal("g1"))
    assert info.value.data["kind"] == "goal" and info.value.data["id"] == "g1"


def test_goal_update_status_bumps_version(db: Database, goal: GoalRecord) -> None:
    updated = db.goals.update_status("g1", "done", "deliver")
    assert (updated.status, updated.phase, updated.version) == ("done", "deliver", 2)
    assert updated.updated_at >= goal.updated_at
    assert db.goals.get("g1") == updated
    with pytest.raises(GoalNotFound) as info:
        db.goals.update_status("missing", "done", "x")
    assert info.value.data == {"kind": "goal", "id": "missing"}


def test_goal_upsert_counts_versions_whatever_was_sent(db: Database, make_goal: MakeGoal) -> None:
    first = db.goals.upsert(make_goal("g1", created_at=100, updated_at=100))
    assert first.version == 1
    second = db.goals.upsert(make_goal("g1", status="blocked", version=42, created_at=999))
    assert (second.status, second.version, second.created_at) == ("blocked", 2, 100)
    third = db.goals.upsert(make_goal("g1", version=1))
    assert third.version == 3
    heartbeat = db.goals.heartbeat("g1")
    assert heartbeat.version == 3
    assert db.goals.update_status("g1", "s", "p").version == 4
    with pytest.raises(GoalNotFound):
        db.goals.heartbeat("missing")


def test_a_goal_version_leaves_room_for_its_writes(db: Database, make_goal: MakeGoal) -> None:
    largest = db.goals.create(make_goal("g1", version=MAX_VERSION))
    assert db.goals.update_status("g1", "s", "p").version == largest.version + 1
    for write in (db.goals.create, db.goals.upsert):
        with pytest.raises(InvalidData) as info:
            write(make_goal("g2", version=2**63 - 1))  # SQLite's largest: no write after it
        assert info.value.data["field"] == "version"
    assert db.goals.get("g2") is None


def test_goal_heartbeat_only_touches_updated_at(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1", updated_at=10))
    beat = db.goals.heartbeat("g1")
    assert beat.updated_at > 10
    assert beat == db.goals.get("g1")
    assert beat.version == 1 and beat.status == "running"


def test_goal_update_with_expected_version(db: Database, goal: GoalRecord) -> None:
    updated = db.goals.update(
        "g1", 1, {"status": "review", "failure": {"why": "flaky"}, "budget_usd": 500}
    )
    assert updated.version == 2
    assert (updated.status, updated.failure, updated.budget_usd) == (
        "review",
        {"why": "flaky"},
        500,
    )
    assert updated.created_at == goal.created_at
    pinned = db.goals.update("g1", 2, {"updated_at": 5, "completed_at": 6})
    assert (pinned.updated_at, pinned.completed_at, pinned.version) == (5, 6, 3)
    assert db.goals.get("g1") == pinned


def test_goal_update_version_conflict(db: Database, goal: GoalRecord) -> None:
    db.goals.update_status("g1", "s", "p")
    with pytest.raises(VersionConflict) as info:
        db.goals.update("g1", 1, {"status": "stale"})
    assert info.value.data == {
        "kind": "goal", "id": "g1", "goal_id": "g1", "expected": 1, "actual": 2
    }  # fmt: skip
    assert db.goals.get("g1").status == "s"  # type: ignore[union-attr]
    with pytest.raises(GoalNotFound):
        db.goals.update("missing", 1, {"status": "x"})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"version": 9}, "version"),
        ({"goal_id": "other"}, "goal_id"),
        ({"created_at": 1}, "created_at"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"budget_usd": 1.5}, "budget_usd"),
        ({"until_ready": 1}, "until_ready"),
        ({"status": None}, "status"),
    ],
)
def test_goal_update_refuses_bad_changes(
    db: Database, goal: GoalRecord, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidData) as info:
        db.goals.update("g1", 1, changes)
    assert info.value.data["field"] == field
    assert db.goals.get("g1") == goal


def test_goal_list_filters_and_order(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("a", status="running", updated_at=30, kind="k1"))
    db.goals.create(make_goal("b", status="done", updated_at=10))
    db.goals.create(make_goal("c", status="running", updated_at=20, phase="verify"))
    db.goals.create(make_goal("d", status="running", updated_at=30))
    assert [s.goal_id for s in db.goals.list()] == ["a", "d", "c", "b"]
    running = db.goals.list(GoalFilter(status="running"))
    assert [s.goal_id for s in running] == ["a", "d", "c"]
    assert running[0].goal_text == "text of a" and running[0].updated_at == 30
    assert [s.goal_id for s in db.goals.list(GoalFilter(phase="verify"))] == ["c"]
    assert [s.goal_id for s in db.goals.list(GoalFilter(kind="k1"))] == ["a"]
    assert [s.goal_id for s in db.goals.list(GoalFilter(older_than=30))] == ["c", "b"]
    assert [s.goal_id for s in db.goals.list(GoalFilter(limit=2))] == ["a", "d"]
    assert db.goals.list(GoalFilter(status="nope")) == []
    with pytest.raises(InvalidData):
        db.goals.list(GoalFilter(limit=-1))


def test_goal_delete(db: Database, goal: GoalRecord) -> None:
    db.goals.delete("g1")
    assert db.goals.get("g1") is None
    with pytest.raises(GoalNotFound):
        db.goals.delete("g1")


def test_goal_delete_cascades_to_all_five_child_tables(db: Database, make_goal: MakeGoal) -> None:
    for goal_id in ("g1", "g2"):
        db.goals.create(make_goal(goal_id))
        db.tasks.create_batch(goal_id, [task(f"{goal_id}-t", goal_id)])
        db.events.append(goal_id, "k", {"n": 1})
        db.proofs.upsert(ProofRecord(goal_id=goal_id, status="ok"))
        db.budgets.append_checkpoint(BudgetCheckpoint(goal_id=goal_id))
        db.artifacts.register(goal_id, "log", f"/tmp/{goal_id}.log")
    db.goals.delete("g1")
    assert db.tasks.get_by_goal("g1") == []
    assert db.tasks.get("g1-t") is None
    assert db.events.get_by_goal("g1") == []
    assert db.proofs.get("g1") is None
    assert db.budgets.get_by_goal("g1") == []
    assert db.artifacts.get_by_goal("g1") == []
    # The other goal keeps everything.
    assert len(db.tasks.get_by_goal("g2")) == 1
    assert len(db.events.get_by_goal("g2")) == 1
    assert db.proofs.get("g2") is not None
    assert len(db.budgets.get_by_goal("g2")) == 1
    assert len(db.artifacts.get_by_goal("g2")) == 1


def test_money_as_float_is_refused(db: Database, make_goal: MakeGoal) -> None:
    import msgspec

    wire = b'{"goal_id": "g1", "status": "s", "phase": "p", "goal_text": "t",'
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(wire + b' "project_dir": "/", "budget_usd": 1.5}', type=GoalRecord)
    with pytest.raises(InvalidData) as info:
        db.goals.create(make_goal("g1", budget_usd=1.5))
    assert info.value.data["field"] == "budget_usd"
    assert db.goals.get("g1") is None
    db.goals.create(make_goal("g1"))
    with pytest.raises(InvalidData) as info:
        db.budgets.append_checkpoint(BudgetCheckpoint(goal_id="g1", estimated_cost_usd=0.5))  # type: ignore[arg-type]
    assert info.value.data["field"] == "estimated_cost_usd"
    assert db.budgets.get_by_goal("g1") == []


def test_wrong_types_are_refused_naming_the_field(db: Database, make_goal: MakeGoal) -> None:
    with pytest.raises(InvalidData) as info:
        db.goals.create(make_goal("g1", max_agents="3"))
    assert info.value.data["field"] == "max_agents"
    with pytest.raises(InvalidData) as info:
        db.goals.create(make_goal("g1", failure={"x": object()}))
    assert info.value.data["field"] == "failure"


# tasks


def test_task_create_batch_get_and_order(db: Database, goal: GoalRecord) -> None:
    tasks = [task(f"t{i}", title=f"task {i}", depends_on=[f"t{i - 1}"]) for i in (3, 1, 2)]
    assert db.tasks.create_batch("g1", tasks) == 3
    assert db.tasks.get_by_goal("g1") == tasks
    assert db.tasks.get("t1") == tasks[1]
    assert db.tasks.get("missing") is None
    assert db.tasks.get_by_goal("missing") == []


def test_task_batch_with_a_task_of_another_goal_is_refused(
    db: Database, make_goal: MakeGoal
) -> None:
    db.goals.create(make_goal("g1"))
    db.goals.create(make_goal("g2"))
    with pytest.raises(InvalidData) as info:
        db.tasks.create_batch("g1", [task("t1"), task("t2", "g2")])
    assert info.value.data["field"] == "goal_id"
    assert db.tasks.get_by_goal("g1") == [] and db.tasks.get("t1") is None


def test_task_batch_unknown_goal_and_duplicates(db: Database, goal: GoalRecord) -> None:
    with pytest.raises(GoalNotFound):
        db.tasks.create_batch("missing", [task("t1", "missing")])
    with pytest.raises(GoalNotFound):  # wrong in both ways: the goal is what to fix first
        db.tasks.create_batch("missing", [task("t1", "missing"), task("t1", "missing")])
    with pytest.raises(GoalNotFound):
        db.tasks.update_task_graph("missing", [task("t1", "missing"), task("t1", "missing")])
    db.tasks.create_batch("g1", [task("t1")])
    with pytest.raises(Conflict) as info:
        db.tasks.create_batch("g1", [task("t2"), task("t3"), task("t1")])
    assert info.value.data["id"] == "t1"
    with pytest.raises(Conflict) as info:
        db.tasks.create_batch("g1", [task("t4"), task("t4")])
    assert info.value.data["id"] == "t4"
    # All or nothing: t2, t3 and t4 were not kept.
    assert [t.task_id for t in db.tasks.get_by_goal("g1")] == ["t1"]


def test_task_batch_is_atomic_when_a_row_fails_in_sqlite(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    db.goals.create(make_goal("g2"))
    db.tasks.create_batch("g2", [task("taken", "g2")])
    with pytest.raises(Conflict):
        db.tasks.create_batch("g1", [task("a"), task("b"), task("taken")])
    assert db.tasks.get_by_goal("g1") == []


def test_task_update_status(db: Database, goal: GoalRecord) -> None:
    db.tasks.create_batch("g1", [task("t1", updated_at=1)])
    updated = db.tasks.update_status("t1", "running")
    assert updated.status == "running" and updated.updated_at > 1
    assert db.tasks.get("t1") == updated
    with pytest.raises(TaskNotFound) as info:
        db.tasks.update_status("missing", "running")
    assert info.value.data == {"kind": "task", "id": "missing"}


def test_task_graph_replace(db: Database, goal: GoalRecord) -> None:
    db.tasks.create_batch("g1", [task("old1"), task("old2")])
    new = [task("new1"), task("old2", title="kept id, new body")]
    assert db.tasks.update_task_graph("g1", new) == 2
    assert db.tasks.get_by_goal("g1") == new
    assert db.tasks.get("old1") is None
    assert db.tasks.update_task_graph("g1", []) == 0
    assert db.tasks.get_by_goal("g1") == []
    with pytest.raises(GoalNotFound):
        db.tasks.update_task_graph("missing", [])


def test_task_graph_replace_is_atomic(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    db.goals.create(make_goal("g2"))
    db.tasks.create_batch("g1", [task("mine")])
    db.tasks.create_batch("g2", [task("theirs", "g2")])
    with pytest.raises(Conflict):
        db.tasks.update_task_graph("g1", [task("fresh"), task("theirs")])
    assert [t.task_id for t in db.tasks.get_by_goal("g1")] == ["mine"]


def test_task_delete_by_goal(db: Database, goal: GoalRecord) -> None:
    db.tasks.create_batch("g1", [task("t1"), task("t2")])
    assert db.tasks.delete_by_goal("g1") == 2
    assert db.tasks.delete_by_goal("g1") == 0
    assert db.tasks.get_by_goal("g1") == []


# events


def test_hundred_events_in_order(db: Database, goal: GoalRecord) -> None:
    appended = [db.events.append("g1", "step", {"n": i}, actor="agent") for i in range(100)]
    ids = [e.event_id for e in appended]
    assert ids == sorted(ids) and len(set(ids)) == 100
    read = db.events.get_by_goal("g1")
    assert read == appended
    assert [e.payload["n"] for e in read] == list(range(100))
    assert db.events.last_event_id() == ids[-1]


def test_event_fields_round_trip(db: Database, goal: GoalRecord) -> None:
    event = db.events.append(
        "g1", "k", ["x"], event_uuid="u-1", run_id="r-1", actor="me", schema_version=2
    )
    (stored,) = db.events.get_by_goal("g1")
    assert stored == event
    assert (stored.event_uuid, stored.run_id, stored.actor, stored.schema_version) == (
        "u-1",
        "r-1",
        "me",
        2,
    )


def _event_fields(e: EventInput | EventRecord) -> tuple[Any, ...]:
    return (e.kind, e.payload, e.event_uuid, e.run_id, e.actor, e.schema_version)


def test_event_optional_fields_each_alone_or_none_round_trip(
    db: Database, goal: GoalRecord
) -> None:
    # An event with none of event_uuid, run_id and actor is inserted by another statement
    # than one with any of them: every combination stores what was given.
    optional: list[dict[str, Any]] = [
        {},
        {"event_uuid": "u"},
        {"run_id": "r"},
        {"actor": "a"},
        {"event_uuid": "u", "actor": "a", "schema_version": 3},
    ]
    inputs = [EventInput(kind=f"k{i}", payload={"i": i}, **f) for i, f in enumerate(optional)]
    expected = [_event_fields(e) for e in inputs]
    appended = [
        db.events.append(
            "g1",
            e.kind,
            e.payload,
            event_uuid=e.event_uuid,
            run_id=e.run_id,
            actor=e.actor,
            schema_version=e.schema_version,
        )
        for e in inputs
    ]
    assert [_event_fields(e) for e in appended] == expected
    assert [_event_fields(e) for e in db.events.get_by_goal("g1")] == expected
    # The same as one batch that mixes them, and a batch with none of them.
    plain = [EventInput(kind=f"p{i}", payload=i) for i in range(3)]
    for batch in (inputs, plain):
        ids = db.events.append_batch("g1", batch)
        stored = db.events.get_by_goal("g1", after_event_id=ids[0] - 1)
        assert [e.event_id for e in stored] == ids
        assert [_event_fields(e) for e in stored] == [_event_fields(e) for e in batch]


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("goal_id", {"goal_id": 1}),
        ("kind", {"kind": None}),
        ("event_uuid", {"event_uuid": 5}),
        ("run_id", {"run_id": b"r"}),
        ("actor", {"actor": 1.5}),
        ("schema_version", {"schema_version": "1"}),
        ("schema_version", {"schema_version": True}),
    ],
)
def test_event_append_refuses_a_wrong_type_and_writes_nothing(
    db: Database, goal: GoalRecord, field: str, arguments: dict[str, Any]
) -> None:
    call: dict[str, Any] = {"goal_id": "g1", "kind": "k", "payload": 1, **arguments}
    with pytest.raises(InvalidData) as info:
        db.events.append(**call)
    assert info.value.data["field"] == field
    assert db.events.get_by_goal("g1") == []


def test_event_pagination(db: Database, goal: GoalRecord) -> None:
    ids = [db.events.append("g1", "k", i).event_id for i in range(10)]
    page = db.events.get_by_goal("g1", after_event_id=ids[2], limit=3)
    assert [e.event_id for e in page] == ids[3:6]
    assert [e.event_id for e in db.events.get_by_goal("g1", after_event_id=ids[-1])] == []
    assert len(db.events.get_by_goal("g1", limit=0)) == 0
    stamp = page[0].created_at
    assert db.events.get_by_goal("g1", since=stamp + 1000) == []
    assert len(db.events.get_by_goal("g1", since=stamp - 1000)) == 10
    with pytest.raises(InvalidData):
        db.events.get_by_goal("g1", limit=-5)
    with pytest.raises(InvalidData):
        db.events.get_by_goal("g1", after_event_id="3")  # type: ignore[arg-type]


def test_event_since_uses_created_at(db: Database, goal: GoalRecord) -> None:
    db.events.append("g1", "k", 1)
    db._writer.raw.execute("UPDATE events SET created_at = 100")
    db.events.append("g1", "k", 2)
    assert [e.payload for e in db.events.get_by_goal("g1", since=101)] == [2]
    assert [e.payload for e in db.events.get_by_goal("g1", since=100)] == [1, 2]


def test_event_append_unknown_goal(db: Database) -> None:
    with pytest.raises(GoalNotFound) as info:
        db.events.append("missing", "k", {})
    assert info.value.data == {"kind": "goal", "id": "missing"}
    with pytest.raises(GoalNotFound):
        db.events.append_batch("missing", [EventInput(kind="k", payload=1)])
    assert db.events.last_event_id() == 0


def test_event_append_batch(db: Database, goal: GoalRecord) -> None:
    before = db.events.append("g1", "first", None).event_id
    batch = [EventInput(kind=f"k{i}", payload={"i": i}, run_id="r") for i in range(5)]
    ids = db.events.append_batch("g1", batch)
    assert ids == list(range(before + 1, before + 6))
    stored = db.events.get_by_goal("g1", after_event_id=before)
    assert [e.event_id for e in stored] == ids
    assert [(e.kind, e.payload, e.run_id) for e in stored] == [
        (f"k{i}", {"i": i}, "r") for i in range(5)
    ]
    assert db.events.append_batch("g1", []) == []


def test_event_append_batch_is_atomic(db: Database, goal: GoalRecord) -> None:
    bad = [EventInput(kind="ok", payload=1), EventInput(kind=7, payload=2)]  # type: ignore[arg-type]
    with pytest.raises(InvalidData) as info:
        db.events.append_batch("g1", bad)
    assert info.value.data["field"] == "kind" and info.value.data["index"] == 1
    unencodable = [EventInput(kind="ok", payload=1), EventInput(kind="ok", payload=object())]
    with pytest.raises(InvalidData):
        db.events.append_batch("g1", unencodable)
    assert db.events.get_by_goal("g1") == []


def test_event_append_batch_rolls_back_when_sqlite_refuses_a_row(
    db: Database, goal: GoalRecord
) -> None:
    db._writer.raw.execute(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.kind = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
    )
    batch = [EventInput(kind="ok", payload=i) for i in range(3)]
    with pytest.raises(Conflict):
        db.events.append_batch("g1", [*batch, EventInput(kind="poison", payload=0)])
    assert db.events.get_by_goal("g1") == []
    assert len(db.events.append_batch("g1", batch)) == 3


def test_event_tail_and_last_event_id(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    db.goals.create(make_goal("g2"))
    assert db.events.last_event_id() == 0
    ids = [db.events.append(g, "k", i).event_id for i, g in enumerate(["g1", "g2"] * 3)]
    assert [e.event_id for e in db.events.tail(0)] == ids
    assert [e.event_id for e in db.events.tail(ids[1], goal_id="g1")] == [ids[2], ids[4]]
    assert [e.event_id for e in db.events.tail(ids[0], limit=2)] == ids[1:3]
    assert db.events.last_event_id() == ids[-1]


def test_event_delete_by_goal_and_missing_goal_reads(db: Database, goal: GoalRecord) -> None:
    for i in range(3):
        db.events.append("g1", "k", i)
    assert db.events.delete_by_goal("g1") == 3
    assert db.events.get_by_goal("g1") == []
    assert db.events.get_by_goal("missing") == []
    assert db.events.get_by_goal_json("missing") == b"[]"
    assert db.events.delete_by_goal("missing") == 0
    # ids are never reused after deletion
    assert db.events.append("g1", "k", 0).event_id == 4


def _delete_events(db: Database, how: str) -> None:
    if how == "events.delete_by_goal":
        db.events.delete_by_goal("g2")
    elif how == "goals.delete":
        db.goals.delete("g2")  # the cascade takes the events
    else:  # both, in a transaction
        with db.transaction() as tx:
            tx.events.delete_by_goal("g2")
            tx.goals.delete("g2")


@pytest.mark.parametrize("how", ["events.delete_by_goal", "goals.delete", "in a transaction"])
@pytest.mark.parametrize("then", ["append", "append_batch", "append in a transaction"])
def test_event_ids_are_never_reused_after_the_newest_events_are_deleted(
    db: Database, goal: GoalRecord, make_goal: MakeGoal, how: str, then: str
) -> None:
    db.goals.create(make_goal("g2"))
    db.events.append("g1", "k", "kept")
    newest = db.events.append_batch("g2", [EventInput(kind="k", payload=i) for i in range(3)])
    _delete_events(db, how)
    if then == "append":
        ids = [db.events.append("g1", "k", "next").event_id]
    elif then == "append_batch":
        ids = db.events.append_batch("g1", [EventInput(kind="k", payload=i) for i in range(3)])
    else:
        with db.transaction() as tx:
            ids = [tx.events.append("g1", "k", i).event_id for i in range(2)]
    assert ids[0] == newest[-1] + 1 and ids == list(range(ids[0], ids[0] + len(ids)))
    assert [e.event_id for e in db.events.get_by_goal("g1")][1:] == ids


def test_event_ids_stay_used_after_a_rolled_back_delete_and_a_reopen(
    db: Database, goal: GoalRecord, db_path: Path
) -> None:
    first = db.events.append("g1", "k", 1).event_id
    tx = db.transaction()
    tx.events.delete_by_goal("g1")
    tx.rollback()  # nothing deleted: the high-water mark is back where it was too
    assert [e.event_id for e in db.events.get_by_goal("g1")] == [first]
    db.events.delete_by_goal("g1")
    db.close()
    with Database.open(db_path) as reopened:
        assert reopened.events.append("g1", "k", 2).event_id == first + 1


@pytest.mark.parametrize(
    "call",
    [
        lambda db: db.events.get_by_goal("g1", limit=2**70),
        lambda db: db.events.get_by_goal("g1", after_event_id=-(2**63) - 1),
        lambda db: db.events.append("g1", "k", 1, schema_version=2**63),
        lambda db: db.goals.list(GoalFilter(older_than=2**64)),
        lambda db: db.goals.update("g1", 1, {"max_agents": 2**63}),
        lambda db: db.budgets.append_checkpoint(BudgetCheckpoint(goal_id="g1", used_tokens=2**63)),
        lambda db: db.tasks.create_batch("g1", [task("t1", retry_count=2**63)]),
    ],
)
def test_integers_beyond_64_bits_are_invalid_data(
    db: Database, goal: GoalRecord, call: Callable[[Database], object]
) -> None:
    with pytest.raises(InvalidData):
        call(db)
    assert db.events.get_by_goal("g1") == [] and db.tasks.get_by_goal("g1") == []
    assert db.budgets.get_by_goal("g1") == [] and db.goals.get("g1") == goal


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("schema_version", lambda db: db.events.append("g1", "k", 1, schema_version=2**63)),
        ("since", lambda db: db.events.get_by_goal("g1", since=2**64)),
        ("after_event_id", lambda db: db.events.get_by_goal("g1", after_event_id=-(2**64))),
        ("artifact_id", lambda db: db.artifacts.delete(2**70)),
        ("after_event_id", lambda db: db.events.tail(2**64, "g1")),
    ],
)
def test_an_integer_beyond_64_bits_is_named_by_its_field(
    db: Database, goal: GoalRecord, field: str, call: Callable[[Database], object]
) -> None:
    with pytest.raises(InvalidData) as info:
        call(db)
    assert info.value.field == field  # ("value" for the positional ones)


def test_a_lone_surrogate_in_a_string_field_is_invalid_data(
    db: Database, make_goal: MakeGoal
) -> None:
    # No UTF-8 for SQLite: it escaped as UnicodeEncodeError, outside DbError.
    bad = "half \ud800 a pair"
    db.goals.create(make_goal("g1"))
    calls: list[tuple[str, Callable[[], object]]] = [
        ("goal_text", lambda: db.goals.create(make_goal("g2", goal_text=bad))),
        ("value", lambda: db.events.append("g1", bad, 1)),  # (a positional parameter)
        ("value", lambda: db.events.append_batch("g1", [EventInput(kind=bad, payload=1)])),
        ("title", lambda: db.tasks.create_batch(
            "g1", [TaskRecord(task_id="t", goal_id="g1", kind="k", title=bad)])),
        ("value", lambda: db.goals.get(bad)),
    ]  # fmt: skip
    for field, call in calls:
        with pytest.raises(InvalidData, match="lone surrogate") as info:
            call()
        assert info.value.field == field
    assert db.events.get_by_goal("g1") == [] and db.tasks.get_by_goal("g1") == []
    assert db.goals.get("g2") is None


def test_a_negative_tail_limit_is_refused(db: Database, goal: GoalRecord) -> None:
    db.events.append("g1", "k", 1)
    with pytest.raises(InvalidData) as info:
        db.events.tail(0, limit=-1)
    assert info.value.field == "limit"


# proofs, budgets, artifacts


def test_proof_upsert_twice_get_delete(db: Database, goal: GoalRecord) -> None:
    first = db.proofs.upsert(
        ProofRecord(goal_id="g1", status="draft", gates={"lint": True}, gates_total=2)
    )
    assert db.proofs.get("g1") == first
    second = db.proofs.upsert(
        ProofRecord(
            goal_id="g1",
            status="ready",
            version=2,
            gates_passed=2,
            gates_total=2,
            post_mutation_gates_ran=True,
            changed_files=["a.py", "b.py"],
        )
    )
    assert db.proofs.get("g1") == second
    assert (second.status, second.gates, second.post_mutation_gates_ran) == ("ready", None, True)
    assert db.proofs.delete("g1") == 1
    assert db.proofs.delete("g1") == 0
    assert db.proofs.get("g1") is None
    with pytest.raises(GoalNotFound):
        db.proofs.upsert(ProofRecord(goal_id="missing", status="x"))


def test_five_budget_checkpoints_in_order(db: Database, goal: GoalRecord) -> None:
    stored = [
        db.budgets.append_checkpoint(
            BudgetCheckpoint(goal_id="g1", label=f"cp{i}", used_tokens=i * 100, budget_usd=900)
        )
        for i in range(5)
    ]
    ids = [cp.checkpoint_id or 0 for cp in stored]
    assert 0 not in ids and ids == sorted(ids)
    assert db.budgets.get_by_goal("g1") == stored
    assert [cp.label for cp in db.budgets.get_by_goal("g1")] == [f"cp{i}" for i in range(5)]
    assert db.budgets.get_by_goal("missing") == []
    with pytest.raises(GoalNotFound):
        db.budgets.append_checkpoint(BudgetCheckpoint(goal_id="missing"))
    assert db.budgets.delete_by_goal("g1") == 5
    assert db.budgets.get_by_goal("g1") == []


def test_artifacts_by_kind_and_delete(db: Database, goal: GoalRecord) -> None:
    log = db.artifacts.register("g1", "log", "/tmp/a.log", "text/plain")
    diff = db.artifacts.register("g1", "diff", "/tmp/a.diff")
    log2 = db.artifacts.register("g1", "log", "/tmp/b.log")
    assert db.artifacts.get_by_goal("g1") == [log, diff, log2]
    assert db.artifacts.get_by_goal("g1", "log") == [log, log2]
    assert db.artifacts.get_by_goal("g1", kind="diff") == [diff]
    assert db.artifacts.get_by_goal("g1", "none") == []
    assert log.mime_type == "text/plain" and diff.mime_type is None
    assert log.artifact_id is not None
    assert db.artifacts.delete(log.artifact_id) is True
    assert db.artifacts.delete(log.artifact_id) is False
    assert db.artifacts.delete_by_goal("g1") == 2
    with pytest.raises(GoalNotFound):
        db.artifacts.register("missing", "log", "/x")


def test_event_cursor_reads_use_the_index(db: Database) -> None:
    from omkd.db import events

    tails = (events.SELECT_TAIL, events.SELECT_TAIL_JSON)
    for sql in (events.SELECT_PAGE, events.SELECT_PAGE_JSON, events.TAIL_GOAL, *tails):
        params = ("g1",) + (1,) * (sql.count("?") - 1)
        plan = db._reader.raw.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        details = " | ".join(str(row[-1]) for row in plan)
        assert "events_goal (goal_id=? AND event_id>?)" in details, details


def test_event_tail_is_the_newest_events_ascending(db: Database, goal: GoalRecord) -> None:
    ids = db.events.append_batch("g1", [EventInput(kind="k", payload=i) for i in range(10)])
    newest = db.events.get_by_goal("g1", tail=3)
    assert [e.event_id for e in newest] == ids[-3:]
    as_json = msgspec.json.decode(db.events.get_by_goal_json("g1", tail=3))
    assert [e["event_id"] for e in as_json] == ids[-3:]
    assert db.events.get_by_goal("g1", after_event_id=ids[8], tail=5) == newest[-1:]
    assert db.events.get_by_goal("g1", tail=0) == []
    with pytest.raises(InvalidData):
        db.events.get_by_goal("g1", tail=3, limit=3)
    with pytest.raises(InvalidData):
        db.events.get_by_goal("g1", tail=-1)
