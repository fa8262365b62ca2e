"""`omkd migrate|backup|check` on a database without a running daemon."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from omkd import cli
from omkd.config import ConfigError
from omkd.listen import StartupError


def omkd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omkd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_migrate_backup_check(tmp_path: Path) -> None:
    db = tmp_path / "state" / "omk.db"
    first = omkd("migrate", "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert "applied 001_initial.sql" in first.stdout
    assert "applied 002_event_ids_without_autoincrement.sql" in first.stdout
    again = omkd("migrate", env={"OMKD_DB": str(db)})  # found through $OMKD_DB
    assert again.returncode == 0 and "up to date" in again.stdout
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO goals (goal_id, status, phase, goal_text, project_dir, created_at,"
            " updated_at) VALUES ('g1', 'a', 'p', 't', '/p', 1, 1)"
        )
    dest = tmp_path / "copy.db"
    backup = omkd("backup", str(dest), "--db", str(db))
    assert backup.returncode == 0, backup.stderr
    with sqlite3.connect(dest) as conn:
        assert conn.execute("SELECT goal_id FROM goals").fetchall() == [("g1",)]
    check = omkd("check", "--db", str(dest))
    assert check.returncode == 0 and "ok" in check.stdout


def test_backup_writes_a_relative_destination_where_it_is_run(tmp_path: Path) -> None:
    db = tmp_path / "omk.db"
    assert omkd("migrate", "--db", str(db)).returncode == 0
    (tmp_path / "backups").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "omkd", "backup", "copy.db", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path / "backups",
    )
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "backups" / "copy.db"
    assert f"wrote {copy}" in result.stdout
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 2


def test_backup_refuses_the_lock_file_of_a_running_daemon(tmp_path: Path) -> None:
    # Replacing <db>.lock (a new file, unlocked) would let a second daemon start on the
    # database; the lock is an flock, held here as the daemon holds it.
    db = tmp_path / "omk.db"
    assert omkd("migrate", "--db", str(db)).returncode == 0
    lock = tmp_path / "omk.db.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = omkd("backup", str(lock), "--db", str(db))
        assert result.returncode != 0
        assert "locked" in result.stderr and "Traceback" not in result.stderr
        assert os.path.samefile(lock, f"/proc/self/fd/{fd}")  # still the file locked
    finally:
        os.close(fd)
    assert omkd("backup", str(lock), "--db", str(db)).returncode == 0  # nobody holds it


def test_check_reports_a_damaged_file(tmp_path: Path) -> None:
    db = tmp_path / "omk.db"
    assert omkd("migrate", "--db", str(db)).returncode == 0
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO goals (goal_id, status, phase, goal_text, project_dir, created_at,"
            " updated_at) VALUES (?, 'a', 'p', ?, '/p', 1, 1)",
            [(f"g{i}", "x" * 500) for i in range(300)],
        )
    conn.close()  # the last connection checkpoints the WAL into the file
    with open(db, "r+b") as f:
        f.seek(8192)
        f.write(b"\x00garbage" * 1000)
    result = omkd("check", "--db", str(db))
    assert result.returncode != 0
    assert "problem" in result.stderr and "backup" in result.stderr
    assert "Traceback" not in result.stderr
    # A backup of it is written (a last resort) but is no good backup: said so, exit 1.
    copied = omkd("backup", "--db", str(db), str(tmp_path / "copy.db"))
    assert copied.returncode == 1 and (tmp_path / "copy.db").exists()
    assert "fails the integrity check" in copied.stderr and "Traceback" not in copied.stderr


@pytest.mark.parametrize("command", ["check", "backup"])
def test_missing_database_is_a_readable_error(tmp_path: Path, command: str) -> None:
    dest = tmp_path / "copy.db"
    args = [command, *([str(dest)] if command == "backup" else [])]
    missing = tmp_path / "state" / "none.db"
    result = omkd(*args, "--db", str(missing))
    assert result.returncode == 1
    assert "no database at" in result.stderr and "Traceback" not in result.stderr
    assert not missing.parent.exists() and not dest.exists()  # nothing created


def _old_database(path: Path) -> None:
    """A file omkd has not migrated: plain sqlite3, user_version 0, a table of its own."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('kept')")
    conn.close()


def _schema(path: Path) -> tuple[int, list[tuple[str, str]], list[tuple[str]]]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT type, name FROM sqlite_schema ORDER BY name").fetchall()
        return version, tables, conn.execute("SELECT body FROM notes").fetchall()
    finally:
        conn.close()


def test_backup_copies_an_old_database_without_migrating_it(tmp_path: Path) -> None:
    source, dest = tmp_path / "old.db", tmp_path / "copy.db"
    _old_database(source)
    before = source.read_bytes()
    result = omkd("backup", str(dest), "--db", str(source))
    assert result.returncode == 0, result.stderr
    assert source.read_bytes() == before  # not migrated, not touched
    assert _schema(source) == _schema(dest) == (0, [("table", "notes")], [("kept",)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "old.db"]


def test_check_leaves_an_old_database_as_it_is(tmp_path: Path) -> None:
    source = tmp_path / "old.db"
    _old_database(source)
    before = source.read_bytes()
    result = omkd("check", "--db", str(source))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert source.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["old.db"]


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("lock_timeout = 'x'\n")
    result = omkd("serve", "--config", str(config), "--db", str(tmp_path / "o.db"))
    assert result.returncode == 78  # refused to start: systemd does not restart it
    assert "invalid configuration" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help() -> None:
    assert omkd("--version").stdout.startswith("omkd ")
    help_text = omkd("serve", "--help").stdout
    assert "--lock-timeout" in help_text and "examples:" in help_text


def test_check_says_what_the_schema_is_besides_whether_the_file_is_sound(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    check = omkd("check", "--db", str(empty))
    assert check.returncode == 0 and "no omkd schema yet" in check.stdout
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    check = omkd("check", "--db", str(newer))
    assert check.returncode == 1 and "newer than this omkd knows" in check.stderr
    current = tmp_path / "current.db"
    assert omkd("migrate", "--db", str(current)).returncode == 0
    check = omkd("check", "--db", str(current))
    assert check.returncode == 0 and check.stdout == f"{current}: ok\n"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StartupError("another daemon serves it"), 78),
        (StartupError("cannot start: Too many open files", lasting=False), 1),
        (ConfigError("invalid configuration"), 78),
        (OSError(28, "No space left on device"), 1),
    ],
)
def test_serve_exits_78_only_for_what_starting_again_cannot_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception, code: int
) -> None:
    # 78 is the unit's RestartPreventExitStatus: a full disk or a lack of descriptors may
    # pass, and systemd should try again.
    async def failing(config: object) -> int:
        raise error

    monkeypatch.setattr("omkd.server.serve", failing)
    assert cli.main(["serve", "--socket", str(tmp_path / "s"), "--db", str(tmp_path / "d")]) == code
