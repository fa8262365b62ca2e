"""Where ``omkd backup``, ``check`` and ``migrate`` find the database when given no --db
(contract, section 7, "as serve does"): ``$OMKD_DB``, else ``$XDG_STATE_HOME/omk/omk.db``,
else ``~/.local/state/omk/omk.db``. ``omkd serve`` is in test_serve_env.py.

Each command runs as a subprocess in an environment built here: HOME and the XDG directories
point into the test's own directory and no inherited OMKD_* variable leaks in.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from omkd.db import Database, GoalRecord, load_migrations

from proc_helpers import controlled_env

MakeGoal = Callable[..., GoalRecord]
MakeDb = Callable[[Path, str], Path]
LATEST_SCHEMA = load_migrations()[-1].version


def omkd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omkd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def read_only(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True))


def goal_ids(path: Path) -> list[str]:
    with read_only(path) as conn:
        return [row[0] for row in conn.execute("SELECT goal_id FROM goals ORDER BY goal_id")]


def user_version(path: Path) -> int:
    with read_only(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def make_db(make_goal: MakeGoal) -> MakeDb:
    """A migrated database at a path, holding one goal: which file a command used shows."""

    def make(path: Path, goal_id: str) -> Path:
        with Database.open(path) as database:
            database.goals.create(make_goal(goal_id))
        return path

    return make


def test_backup_and_check_use_omkd_db(tmp_path: Path, home: Path, make_db: MakeDb) -> None:
    env_db = make_db(tmp_path / "env" / "omk.db", "from-env")
    xdg = tmp_path / "from-xdg"
    make_db(xdg / "omk" / "omk.db", "from-xdg")  # the XDG default exists: $OMKD_DB wins
    env = controlled_env(home, OMKD_DB=env_db, XDG_STATE_HOME=xdg)

    dest = tmp_path / "copy.db"
    backup = omkd("backup", str(dest), env=env)
    assert backup.returncode == 0, backup.stderr
    assert goal_ids(dest) == ["from-env"] and user_version(dest) == LATEST_SCHEMA
    check = omkd("check", env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout == f"{env_db.resolve()}: ok\n"

    missing = tmp_path / "none" / "omk.db"
    refused = omkd("check", env={**env, "OMKD_DB": str(missing)})
    assert refused.returncode == 1 and f"no database at {missing.resolve()}" in refused.stderr


def test_backup_and_check_use_the_xdg_state_default(
    tmp_path: Path, home: Path, make_db: MakeDb
) -> None:
    xdg = tmp_path / "from-xdg"
    xdg_db = make_db(xdg / "omk" / "omk.db", "from-xdg")
    # The fallback exists too: $XDG_STATE_HOME wins over it.
    make_db(home / ".local" / "state" / "omk" / "omk.db", "from-home")
    env = controlled_env(home, XDG_STATE_HOME=xdg)

    dest = tmp_path / "copy.db"
    backup = omkd("backup", str(dest), env=env)
    assert backup.returncode == 0, backup.stderr
    assert goal_ids(dest) == ["from-xdg"] and user_version(dest) == LATEST_SCHEMA
    check = omkd("check", env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout == f"{xdg_db.resolve()}: ok\n"


@pytest.mark.parametrize("with_xdg", [True, False], ids=["xdg-state-home", "home-fallback"])
def test_migrate_creates_the_database_at_the_default(
    tmp_path: Path, home: Path, with_xdg: bool
) -> None:
    xdg = tmp_path / "xdg-state"
    xdg.mkdir()
    env = controlled_env(home, **({"XDG_STATE_HOME": xdg} if with_xdg else {}))
    expected = (xdg if with_xdg else home / ".local" / "state") / "omk" / "omk.db"

    result = omkd("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert "applied 001_initial.sql" in result.stdout
    assert expected.is_file() and user_version(expected) == LATEST_SCHEMA
    other = home / ".local" if with_xdg else xdg / "omk"
    assert not other.exists()  # nothing created at the other place
