"""Shared fixtures. Storage: a fresh database per test, closed afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omkd.db import Database, GoalRecord


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the test's database lives (not created yet)."""
    return tmp_path / "state" / "omk.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    """A freshly created and migrated database, closed after the test."""
    with Database.open(db_path) as database:
        yield database


@pytest.fixture
def make_goal() -> Callable[..., GoalRecord]:
    """Build a GoalRecord with the required fields filled in; keywords override them."""

    def make(goal_id: str = "g1", **fields: Any) -> GoalRecord:
        values: dict[str, Any] = {
            "status": "running",
            "phase": "plan",
            "goal_text": f"text of {goal_id}",
            "project_dir": "/srv/project",
        }
        values.update(fields)
        return GoalRecord(goal_id=goal_id, **values)

    return make
