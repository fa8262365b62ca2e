"""Schema migrations: numbered SQL files applied in order, each in its own transaction.

Theory of operation: ``migrations/NNN_name.sql`` files are the schema's history. The database
records each applied file in ``schema_migrations`` (version, name, sha256) and its version in
``PRAGMA user_version``. Opening the database applies the files newer than ``user_version``,
each one with its bookkeeping in one ``BEGIN IMMEDIATE`` ... ``COMMIT``: a failing file leaves
the previous version intact. Statements run one by one (split with
``sqlite3.complete_statement``) because ``executescript`` would commit first. A database
newer than the newest file is refused (:class:`SchemaTooNew`), and so is one whose applied
files were edited since (:class:`MigrationMismatch`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import omkd
from omkd.db._conn import Conn, connect_read_only, rollback_quietly
from omkd.db.errors import DbError, MigrationFailed, MigrationMismatch, SchemaTooNew
from omkd_client.records import now

__all__ = [
    "Migration",
    "apply_migrations",
    "default_migrations_dir",
    "load_migrations",
    "pending_migrations",
]

_FILE_NAME = re.compile(r"^(\d{3,})_([A-Za-z0-9_]+)\.sql$")

CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    applied_at INTEGER NOT NULL
)"""
HAS_SCHEMA_MIGRATIONS = (
    "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'schema_migrations'"
)
SELECT_APPLIED = "SELECT version, name, sha256 FROM schema_migrations ORDER BY version"
SELECT_TABLES = (
    "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
)
INSERT_APPLIED = (
    "INSERT INTO schema_migrations (version, name, sha256, applied_at) VALUES (?, ?, ?, ?)"
)
SELECT_USER_VERSION = "PRAGMA user_version"
# PRAGMA takes no parameters: the version is formatted in, always as an int.
SET_USER_VERSION = "PRAGMA user_version = {version:d}"


@dataclass(frozen=True)
class Migration:
    """One migration file: its version, name, text and the sha256 of its bytes."""

    version: int
    name: str
    path: Path
    sql: str = field(repr=False)
    sha256: str

    def __str__(self) -> str:
        return self.filename

    @property
    def filename(self) -> str:
        """Return the file's name, e.g. ``001_initial.sql``."""
        return self.path.name

    def statements(self) -> list[str]:
        """Return the file's statements, split where SQLite sees a complete statement.

        Raises MigrationFailed when text is left over that is not a complete statement.
        """
        statements: list[str] = []
        buffer = ""
        for line in self.sql.splitlines(keepends=True):
            buffer += line
            if sqlite3.complete_statement(buffer):
                statements.append(buffer.strip())
                buffer = ""
        if _strip_comments(buffer):
            raise MigrationFailed(
                f"migration {self.filename} ends with an incomplete statement",
                file=self.filename,
                version=self.version,
            )
        for statement in statements:
            if _ENDS_TRANSACTION.match(_strip_comments(statement)):
                raise MigrationFailed(
                    f"migration {self.filename} begins or ends a transaction itself "
                    f"({statement.split(None, 1)[0]}): each migration runs in one transaction "
                    "of its own, which such a statement would cut in two; remove it",
                    file=self.filename,
                    version=self.version,
                )
        return statements


def _strip_comments(text: str) -> str:
    text = _BLOCK_COMMENT.sub(" ", text)
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return " ".join(lines).strip()


_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
# A statement that begins or ends a transaction (ROLLBACK TO a savepoint does neither).
_ENDS_TRANSACTION = re.compile(r"(?i)(BEGIN|COMMIT|END)\b|ROLLBACK\b(?!\s+(TRANSACTION\s+)?TO\b)")


def default_migrations_dir() -> Path:
    """Return the migrations directory: inside the installed package, else the repository's."""
    packaged = importlib.resources.files("omkd") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(omkd.__file__).resolve().parent.parent / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Return the migrations found in ``directory`` (default: the shipped ones), by version.

    Raises MigrationFailed when the directory is missing or two files share a version.
    """
    directory = directory or default_migrations_dir()
    if not directory.is_dir():
        raise MigrationFailed(f"no migrations directory at {directory}", directory=str(directory))
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _FILE_NAME.match(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationFailed(
                f"migrations {found[version].filename} and {path.name} share version {version}",
                file=path.name,
                version=version,
            )
        data = path.read_bytes()
        found[version] = Migration(
            version, match.group(2), path, data.decode(), hashlib.sha256(data).hexdigest()
        )
    return [found[v] for v in sorted(found)]


def _user_version(conn: Conn) -> int:
    return int(conn.scalar(SELECT_USER_VERSION))


def refuse_foreign(conn: Conn) -> None:
    """Raise MigrationMismatch if the database holds tables but no omkd schema (another
    program's database: migrating it would add omkd's tables to it).

    The tables are read in one statement, one snapshot: a migration creates
    ``schema_migrations`` in the transaction of its tables, so omkd's tables never show
    without it. (Read apart, the version first, another process's first migration could
    commit between the reads: its tables seen, its version not; six processes opening a
    new file at once, one was refused so in a CI run.)"""
    tables = [row[0] for row in conn.query(SELECT_TABLES)]
    if not tables or "schema_migrations" in tables or _user_version(conn):
        return
    shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
    raise MigrationMismatch(
        f"the database holds tables ({shown}) but no omkd schema: it is not an omkd "
        "database (or not yet one); give omkd a file of its own",
        tables=tables[:20],
    )


def _check_applied(conn: Conn, migrations: list[Migration]) -> int:
    """Return the database's version after checking it against the files.

    Raises SchemaTooNew or MigrationMismatch.
    """
    current = _user_version(conn)
    newest = migrations[-1].version if migrations else 0
    if current > newest:
        raise SchemaTooNew(current, newest)
    by_version = {m.version: m for m in migrations}
    applied = conn.query(SELECT_APPLIED) if conn.scalar(HAS_SCHEMA_MIGRATIONS) else []
    if current and not applied:
        raise MigrationMismatch(
            f"the database is at version {current} but records no applied migration",
            db_version=current,
        )
    for version, name, sha256 in applied:
        migration = by_version.get(version)
        if migration is None or migration.sha256 != sha256 or migration.name != name:
            raise MigrationMismatch(
                f"applied migration {version:03d}_{name}.sql no longer matches its file: "
                "restore the file as it was, or use the omkd that migrated this database",
                version=version,
                name=name,
                sha256=sha256,
            )
    return current


def pending_of(conn: Conn, migrations: list[Migration]) -> list[Migration]:
    """Return the migrations not yet applied on ``conn``'s database (checks it first)."""
    current = _check_applied(conn, migrations)
    return [m for m in migrations if m.version > current]


def _apply_one(conn: Conn, migration: Migration) -> bool:
    """Apply one migration in its own transaction; return False if it was applied meanwhile."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = _user_version(conn)
        if current >= migration.version:
            conn.execute("ROLLBACK")
            return False
        conn.execute(CREATE_SCHEMA_MIGRATIONS)
        for statement in migration.statements():
            conn.execute(statement)
        conn.execute(INSERT_APPLIED, (migration.version, migration.name, migration.sha256, now()))
        conn.execute(SET_USER_VERSION.format(version=migration.version))
        conn.execute("COMMIT")
    except DbError as exc:
        rollback_quietly(conn)
        raise MigrationFailed(
            f"migration {migration.filename} failed and was rolled back "
            f"(the database keeps version {_user_version(conn)}): {exc}",
            file=migration.filename,
            version=migration.version,
        ) from exc
    return True


def apply_migrations(conn: Conn, migrations: list[Migration]) -> list[Migration]:
    """Apply the pending ``migrations`` on ``conn`` (autocommit mode); return those applied.

    Raises SchemaTooNew, MigrationMismatch, MigrationFailed (the failing file rolled back,
    earlier ones kept), or Busy when another process holds the write lock too long.
    """
    applied = []
    for migration in pending_of(conn, migrations):
        if _apply_one(conn, migration):
            applied.append(migration)
    return applied


def pending_migrations(path: str | Path, migrations_dir: Path | None = None) -> list[Migration]:
    """Return the migrations that opening the database at ``path`` would apply.

    Reads only; a missing file has every migration pending. Raises SchemaTooNew,
    MigrationMismatch, or StorageFailure for a file that is not a database.
    """
    migrations = load_migrations(migrations_dir)
    path = Path(path)
    if not path.exists():
        return migrations
    conn = connect_read_only(path)
    try:
        return pending_of(conn, migrations)
    finally:
        conn.close()
