"""JSON fields round-trip as native values; storage failures surface as StorageFailure."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import re
import resource
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omkd.db import (
    Database,
    EventInput,
    EventRecord,
    GoalRecord,
    InvalidData,
    ProofRecord,
    StorageFailure,
    TaskRecord,
    TransactionClosed,
)

MakeGoal = Callable[..., GoalRecord]

SAMPLES: list[Any] = [
    {"text": "héllo wörld ✓ 日本語 🚀", "quote": "\"'\\", "ctrl": "\x00\x1f\n"},
    [[[[[[[[[[{"deep": [1, [2, [3, [4]]]]}]]]]]]]]]],
    {"big": 2**70, "negative": -(2**80), "edge": 2**63, "min": -(2**63) - 1},
    [True, False, None, 0, -1, 1.5, -0.25, 1e300, "", [], {}],
    "just a string",
    12345678901234567890123456789,
    None,
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**90), max_value=2**90)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    with Database.open(tmp_path_factory.mktemp("json") / "omk.db") as database:
        database.goals.create(
            GoalRecord(goal_id="g", status="s", phase="p", goal_text="t", project_dir="/")
        )
        yield database


@pytest.mark.parametrize("value", SAMPLES)
def test_json_fields_round_trip_natively(db: Database, make_goal: MakeGoal, value: Any) -> None:
    goal = db.goals.create(make_goal("g1", terminal_criteria=value, failure=[value]))
    assert db.goals.get("g1") == goal
    assert goal.terminal_criteria == value and goal.failure == [value]
    db.tasks.create_batch("g1", [TaskRecord(task_id="t", goal_id="g1", kind="k", evidence=value)])
    assert db.tasks.get("t").evidence == value  # type: ignore[union-attr]
    db.proofs.upsert(ProofRecord(goal_id="g1", status="s", git=value))
    assert db.proofs.get("g1").git == value  # type: ignore[union-attr]
    event = db.events.append("g1", "k", value)
    db.events.append_batch("g1", [EventInput(kind="k", payload=value)])
    stored = db.events.get_by_goal("g1")
    assert [e.payload for e in stored] == [value, value]
    assert stored[0] == event
    page = msgspec.json.decode(db.events.get_by_goal_json("g1"))
    assert [e["payload"] for e in page] == [value, value]


def test_get_by_goal_json_matches_get_by_goal(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    db.goals.create(make_goal("g2"))
    for i, value in enumerate(SAMPLES * 3):
        db.events.append("g1" if i % 3 else "g2", f"k{i}", value, actor="a", run_id=None)
    for args in (
        {},
        {"limit": 4},
        {"after_event_id": 5},
        {"after_event_id": 5, "limit": 2},
        {"since": 0, "limit": 0},
    ):
        records = db.events.get_by_goal("g1", **args)
        raw = db.events.get_by_goal_json("g1", **args)
        assert msgspec.json.decode(raw, type=list[EventRecord]) == records
    assert db.events.get_by_goal_json("g1", limit=0) == b"[]"


@settings(max_examples=60, deadline=None)
@given(value=json_values)
def test_any_json_value_round_trips(shared_db: Database, value: Any) -> None:
    event = shared_db.events.append("g", "k", value)
    (stored,) = shared_db.events.get_by_goal("g", after_event_id=event.event_id - 1)
    assert stored.payload == value
    (from_json,) = msgspec.json.decode(
        shared_db.events.get_by_goal_json("g", after_event_id=event.event_id - 1)
    )
    assert from_json["payload"] == value


class _Level(enum.IntEnum):
    HIGH = 2


NOT_JSON: list[tuple[Any, str]] = [
    (float("nan"), "nan"),
    ({"score": [1.0, float("inf")]}, "['score'][1]: inf"),
    (b"bytes", "a bytes"),
    ({"when": datetime.datetime(2026, 1, 1)}, "['when']: a datetime"),
    ({1, 2}, "a set"),
    ({1: "one"}, "key 1"),
    (decimal.Decimal("1.5"), "a Decimal"),
    (uuid.UUID(int=1), "a UUID"),
]


@pytest.mark.parametrize(("value", "problem"), NOT_JSON)
def test_what_is_not_json_is_refused_not_changed(
    db: Database, make_goal: MakeGoal, value: Any, problem: str
) -> None:
    """msgspec would store NaN as null, bytes as base64, a date as a string, ...: values
    read back as something else. Every JSON field refuses them, naming the field and
    where in the value; nothing is written."""
    db.goals.create(make_goal("g1"))
    with pytest.raises(InvalidData, match=re.escape(problem)) as info:
        db.events.append("g1", "k", value)
    assert info.value.field == "payload"
    with pytest.raises(InvalidData, match=re.escape(problem)) as info:
        db.events.append_batch(
            "g1", [EventInput(kind="k", payload=1), EventInput(kind="k", payload=value)]
        )
    assert info.value.field == "payload" and info.value.data["index"] == 1
    with pytest.raises(InvalidData) as info:
        db.goals.create(make_goal("g2", terminal_criteria=value))
    assert info.value.field == "terminal_criteria"
    with pytest.raises(InvalidData) as info:
        db.tasks.create_batch(
            "g1", [TaskRecord(task_id="t", goal_id="g1", kind="k", read_set=value)]
        )
    assert info.value.field == "read_set"
    with pytest.raises(InvalidData) as info:
        db.proofs.upsert(ProofRecord(goal_id="g1", status="s", gates=[value]))
    assert info.value.field == "gates"
    with db.transaction() as tx, pytest.raises(InvalidData):
        tx.events.append("g1", "k", value)
    assert db.events.get_by_goal("g1") == [] and db.goals.get("g2") is None
    assert db.tasks.get_by_goal("g1") == [] and db.proofs.get("g1") is None


def test_what_json_extends_is_stored_as_json(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    value = {"level": _Level.HIGH, "pair": (1, 2), "ordered": collections.OrderedDict(a=1)}
    db.events.append("g1", "k", value)
    assert db.events.get_by_goal("g1")[0].payload == {
        "level": 2,
        "pair": [1, 2],
        "ordered": {"a": 1},
    }
    deep: list[Any] = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(InvalidData, match="nested deeper than 500 levels"):
        db.events.append("g1", "k", deep)


def test_a_database_told_its_values_are_json_does_not_check_them(
    db_path: Path, make_goal: MakeGoal
) -> None:
    # The daemon's values come from msgspec's JSON decoder: the check would only cost.
    with Database.open(db_path, check_json=False) as db:
        db.goals.create(make_goal("g1"))
        db.events.append("g1", "k", {"a": [1, "x", None]})
        assert db.events.get_by_goal("g1")[0].payload == {"a": [1, "x", None]}
        with pytest.raises(InvalidData):  # what msgspec cannot encode at all still fails
            db.events.append("g1", "k", object())


def test_bools_come_back_as_bools(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1", until_ready=True))
    goal = db.goals.get("g1")
    assert goal is not None and goal.until_ready is True and goal.slice_execution is False


@pytest.fixture
def small_file_limit() -> Iterator[Callable[[int | None], None]]:
    """Lower the soft file size limit (a full disk, as SQLite sees it); None restores it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def lower(limit: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if limit is None else limit, hard))

    yield lower
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_storage_failure_inside_a_transaction_loses_it(
    db_path: Path, make_goal: MakeGoal, small_file_limit: Callable[[int | None], None]
) -> None:
    with Database.open(db_path) as db:
        db.goals.create(make_goal("g1"))
        db.checkpoint()
        tx = db.transaction()
        tx.events.append("g1", "before", 1)
        small_file_limit(db_path.stat().st_size + 256 * 1024)
        with pytest.raises(StorageFailure) as info:
            for _ in range(100):
                tx.events.append("g1", "big", "x" * 100_000)
        small_file_limit(None)
        assert info.value.transaction_lost is True
        assert info.value.data["transaction_lost"] is True
        assert not tx.active and not db.transaction_active
        with pytest.raises(TransactionClosed):
            tx.commit()
        assert db.events.get_by_goal("g1") == []
        db.events.append("g1", "after", 2)  # the write lock was released
        assert db.quick_check() == []


def test_a_page_longer_than_sqlite_builds_is_invalid_data_naming_limit(
    db: Database, make_goal: MakeGoal
) -> None:
    # SQLite builds a string of at most SQLITE_LIMIT_LENGTH bytes (1,000,000,000): a page
    # without a limit of a log larger than that was an internal error (-32603 on the wire).
    db.goals.create(make_goal("g1"))
    db.events.append_batch("g1", [EventInput(kind="k", payload="x" * 100) for _ in range(50)])
    db._reader.raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 2000)
    with pytest.raises(InvalidData) as info:
        db.events.get_by_goal_json("g1")
    assert info.value.field == "limit" and "read the log in pages" in str(info.value)
    assert msgspec.json.decode(db.events.get_by_goal_json("g1", limit=5))[4]["payload"] == "x" * 100
