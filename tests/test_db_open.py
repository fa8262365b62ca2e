"""Opening, pragmas, migrations and maintenance of omkd.db."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from omkd.db import (
    Database,
    DatabaseClosed,
    GoalRecord,
    InvalidData,
    MigrationFailed,
    MigrationMismatch,
    SchemaTooNew,
    check_database,
    default_migrations_dir,
    load_migrations,
    migrate,
    pending_migrations,
)

MakeGoal = Callable[..., GoalRecord]

SHIPPED = load_migrations(default_migrations_dir())
LATEST = SHIPPED[-1].version  # the schema version of a database opened by this code
NEXT = f"{LATEST + 1:03d}"  # the number a test's own extra migration takes


def _pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def _tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall()
    finally:
        conn.close()
    return {r[0] for r in rows}


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    """A copy of the shipped migrations that a test may extend or edit."""
    target = tmp_path / "migrations"
    shutil.copytree(default_migrations_dir(), target)
    return target


def test_open_creates_migrates_and_sets_pragmas(db_path: Path) -> None:
    assert not db_path.parent.exists()
    with Database.open(db_path) as db:
        assert db.path == db_path.resolve()
        assert db.schema_version == LATEST
        assert [m.name for m in db.migrations_applied] == [
            "initial",
            "event_ids_without_autoincrement",
        ]
        conn = db._writer.raw
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert db._reader.raw.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert _pragma(db_path, "journal_mode") == "wal"
    assert _pragma(db_path, "user_version") == LATEST
    assert {
        "goals",
        "tasks",
        "events",
        "proofs",
        "budget_checkpoints",
        "artifacts",
        "schema_migrations",
    } <= _tables(db_path)


def test_synchronous_full_and_bad_value(tmp_path: Path) -> None:
    with Database.open(tmp_path / "a.db", synchronous="FULL") as db:
        assert db._writer.raw.execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(InvalidData) as info:
        Database.open(tmp_path / "b.db", synchronous="OFF")
    assert info.value.data["field"] == "synchronous"


def test_reopen_is_a_no_op_and_keeps_data(db_path: Path, make_goal: MakeGoal) -> None:
    with Database.open(db_path) as db:
        db.goals.create(make_goal())
    with Database.open(db_path) as db:
        assert db.migrations_applied == []
        assert db.schema_version == LATEST
        assert db.goals.get("g1") is not None
    assert migrate(db_path) == []
    assert pending_migrations(db_path) == []
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT version, name FROM schema_migrations").fetchall() == [
        (m.version, m.name) for m in SHIPPED
    ]
    conn.close()


def test_migrate_helper_reports_what_it_applied(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    assert [m.version for m in pending_migrations(path)] == [m.version for m in SHIPPED]
    assert not path.exists()
    assert [m.filename for m in migrate(path)] == [m.filename for m in SHIPPED]
    assert migrate(path) == []


def test_a_new_migration_is_applied_on_open(db_path: Path, migrations_dir: Path) -> None:
    Database.open(db_path, migrations_dir=migrations_dir).close()
    (migrations_dir / f"{NEXT}_notes.sql").write_text(
        "-- a second migration\nCREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);\n"
        "CREATE INDEX notes_body ON notes (body);\n"
    )
    assert [m.version for m in pending_migrations(db_path, migrations_dir)] == [LATEST + 1]
    with Database.open(db_path, migrations_dir=migrations_dir) as db:
        assert [m.version for m in db.migrations_applied] == [LATEST + 1]
        assert db.schema_version == LATEST + 1
    assert "notes" in _tables(db_path)


def test_schema_too_new_names_both_versions(db_path: Path) -> None:
    Database.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(SchemaTooNew) as info:
        Database.open(db_path)
    assert info.value.data == {"db_version": 7, "code_version": LATEST}
    assert "7" in str(info.value) and str(LATEST) in str(info.value)


def test_failed_migration_keeps_the_old_version(db_path: Path, migrations_dir: Path) -> None:
    Database.open(db_path, migrations_dir=migrations_dir).close()
    (migrations_dir / f"{NEXT}_broken.sql").write_text(
        "CREATE TABLE half_done (id INTEGER PRIMARY KEY);\nINSERT INTO no_such_table VALUES (1);\n"
    )
    with pytest.raises(MigrationFailed) as info:
        Database.open(db_path, migrations_dir=migrations_dir)
    assert info.value.data["file"] == f"{NEXT}_broken.sql"
    assert f"{NEXT}_broken.sql" in str(info.value)
    assert _pragma(db_path, "user_version") == LATEST
    assert "half_done" not in _tables(db_path)
    # Fixing the file lets the next open apply it.
    (migrations_dir / f"{NEXT}_broken.sql").write_text("CREATE TABLE half_done (id INTEGER);\n")
    with Database.open(db_path, migrations_dir=migrations_dir) as db:
        assert db.schema_version == LATEST + 1


def test_failed_first_migration_leaves_an_empty_database(db_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "001_initial.sql").write_text("CREATE TABLE t (id INTEGER);\nNOT SQL AT ALL;\n")
    with pytest.raises(MigrationFailed):
        Database.open(db_path, migrations_dir=broken)
    assert _pragma(db_path, "user_version") == 0
    assert _tables(db_path) == set()


@pytest.mark.parametrize(
    "statement",
    ["COMMIT;", "/* a note */ END TRANSACTION;", "-- then\nBEGIN;", "ROLLBACK;"],
)
def test_a_migration_that_ends_its_transaction_is_refused_before_it_runs(
    db_path: Path, migrations_dir: Path, statement: str
) -> None:
    # Its statements before a COMMIT were committed, the rest failed, and the error said
    # "rolled back".
    Database.open(db_path, migrations_dir=migrations_dir).close()
    (migrations_dir / f"{NEXT}_commits.sql").write_text(
        f"CREATE TABLE first_half (id INTEGER);\n{statement}\nCREATE TABLE second (x);\n"
    )
    with pytest.raises(MigrationFailed, match="begins or ends a transaction itself"):
        Database.open(db_path, migrations_dir=migrations_dir)
    assert "first_half" not in _tables(db_path) and _pragma(db_path, "user_version") == LATEST
    (migrations_dir / f"{NEXT}_commits.sql").write_text(
        "SAVEPOINT s;\nCREATE TABLE kept (id INTEGER);\nROLLBACK TO s;\nRELEASE s;\n"
    )  # a savepoint of its own is fine
    with Database.open(db_path, migrations_dir=migrations_dir) as db:
        assert db.schema_version == LATEST + 1


def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    # It was given omkd's tables and switched to WAL for good.
    path = tmp_path / "photos.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(MigrationMismatch, match=r"holds tables \(photos\) but no omkd schema"):
        Database.open(path)
    assert _tables(path) == {"photos"} and _pragma(path, "journal_mode") == "delete"


def test_processes_opening_a_new_database_at_once_all_open_it(tmp_path: Path) -> None:
    # SQLite does not wait on the busy timeout to set journal_mode=WAL: one open in
    # seventy got Busy at once.
    script = "import sys\nfrom omkd.db import Database\nDatabase.open(sys.argv[1]).close()\n"
    for round in range(8):
        path = tmp_path / f"new-{round}.db"
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE)
            for _ in range(6)
        ]
        failures = [
            err.decode() for p in procs for _, err in [p.communicate(timeout=60)] if p.returncode
        ]
        assert failures == []
        assert _pragma(path, "user_version") == LATEST


def test_edited_migration_is_a_mismatch(db_path: Path, migrations_dir: Path) -> None:
    Database.open(db_path, migrations_dir=migrations_dir).close()
    initial = migrations_dir / "001_initial.sql"
    initial.write_text(initial.read_text() + "\n-- edited afterwards\n")
    with pytest.raises(MigrationMismatch) as info:
        Database.open(db_path, migrations_dir=migrations_dir)
    assert info.value.data["version"] == 1
    with pytest.raises(MigrationMismatch):
        pending_migrations(db_path, migrations_dir)


def test_migration_statements_split_without_executescript() -> None:
    for migration in load_migrations():
        statements = migration.statements()
        assert len(statements) > 6
        assert all(sqlite3.complete_statement(s) for s in statements)
        assert not any(s.upper().startswith(("BEGIN", "COMMIT")) for s in statements)


def test_check_database(db_path: Path, db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal())
    db.events.append("g1", "k", {})
    assert db.quick_check() == []
    assert check_database(db_path) == []
    assert check_database(db_path.parent / "missing.db") == [
        f"no database file at {db_path.parent / 'missing.db'}"
    ]
    garbage = db_path.parent / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    assert check_database(garbage)


def test_check_database_reports_dangling_rows(tmp_path: Path, make_goal: MakeGoal) -> None:
    path = tmp_path / "dangling.db"
    with Database.open(path) as db:
        db.goals.create(make_goal())
    conn = sqlite3.connect(path)  # foreign keys off: the file can be made inconsistent
    conn.execute(
        "INSERT INTO events (goal_id, kind, payload, created_at) VALUES ('ghost', 'k', '1', 0)"
    )
    conn.commit()
    conn.close()
    problems = check_database(path)
    assert len(problems) == 1 and "events" in problems[0] and "goals" in problems[0]


def test_closed_database_refuses_use(db_path: Path, make_goal: MakeGoal) -> None:
    db = Database.open(db_path)
    db.close()
    db.close()  # idempotent
    assert db.closed
    with pytest.raises(DatabaseClosed):
        db.goals.get("g1")
    with pytest.raises(DatabaseClosed):
        db.goals.create(make_goal())
    with pytest.raises(DatabaseClosed):
        db.transaction()


def test_storage_layer_imports_without_trio_or_the_wire() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('trio', 'jsonrpcserver', 'omkd.rpc'):\n"
        "    sys.modules[name] = None\n"
        "import omkd.db\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_migration_002_keeps_events_and_their_used_ids(
    db_path: Path, tmp_path: Path, make_goal: MakeGoal
) -> None:
    # A database at schema 1 (event_id AUTOINCREMENT), written as the code of then did,
    # whose newest events were deleted: ids 2 and 3 were used and must never come again.
    first_only = tmp_path / "first_only"
    first_only.mkdir()
    shutil.copy(default_migrations_dir() / "001_initial.sql", first_only)
    with Database.open(db_path, migrations_dir=first_only) as old:
        old.goals.create(make_goal("g1"))
        old.goals.create(make_goal("g2"))
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(
            "INSERT INTO events (event_uuid, run_id, goal_id, kind, actor, payload, created_at)"
            " VALUES (?, ?, ?, 'k', ?, ?, 7)",
            [("u", "r", "g1", "a", '{"n":1}'), (None, None, "g2", None, "2"),
             (None, None, "g2", None, "3")],
        )  # fmt: skip
        conn.execute("DELETE FROM events WHERE goal_id = 'g2'")
    conn.close()
    with Database.open(db_path) as db:
        assert [m.version for m in db.migrations_applied] == [2]
        (kept,) = db.events.get_by_goal("g1")
        assert (kept.event_id, kept.event_uuid, kept.run_id, kept.actor, kept.payload) == (
            1, "u", "r", "a", {"n": 1},
        )  # fmt: skip
        assert kept.created_at == 7 and kept.schema_version == 1
        assert db.events.append("g1", "k", 4).event_id == 4
        assert db.quick_check() == []
    conn = sqlite3.connect(db_path)
    try:
        (sql,) = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'events'").fetchone()
        assert "AUTOINCREMENT" not in sql.upper() and "STRICT" in sql.upper()
        assert conn.execute(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = 'events_goal'"
        ).fetchone() == (1,)
        sequences = {name for (name,) in conn.execute("SELECT name FROM sqlite_sequence")}
        assert "events" not in sequences
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


def test_open_makes_every_missing_directory_private(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o751)
    old_umask = os.umask(0o022)  # what would make a parent 0755
    try:
        with Database.open(tmp_path / "a" / "b" / "omk.db"):
            pass
    finally:
        os.umask(old_umask)
    for directory in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o751  # an existing one: left alone


def test_a_new_database_and_its_wal_are_the_users_alone(tmp_path: Path) -> None:
    # SQLite makes a new file 0644 (less the umask); a state daemon's data is its user's.
    previous = os.umask(0o022)
    try:
        with Database.open(tmp_path / "omk.db") as db:
            db.goals.list()
            names = sorted(p.name for p in tmp_path.iterdir())
            assert names == ["omk.db", "omk.db-shm", "omk.db-wal"]
            assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in names} == {0o600}
    finally:
        os.umask(previous)
    existing = tmp_path / "old.db"
    Database.open(existing).close()
    existing.chmod(0o640)
    Database.open(existing).close()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # an existing file keeps its mode
