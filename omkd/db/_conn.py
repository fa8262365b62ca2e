"""The one funnel every SQL statement goes through, and the scope repositories run in.

:class:`Conn` wraps a ``sqlite3.Connection``; its ``execute``/``query`` methods are the only
place that runs SQL and the only place ``sqlite3.Error`` becomes a :class:`DbError` (chained
with ``from exc``). A :class:`Scope` hands a repository the connection to read or write with:
the Database's scope makes each write its own transaction, a Transaction's scope makes each
call a savepoint inside it (a write of one statement needs neither, see ``Scope``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final, Protocol

from omkd.db.errors import (
    Busy,
    Conflict,
    DatabaseClosed,
    DbError,
    GoalNotFound,
    Interrupted,
    InvalidData,
    StorageFailure,
)

__all__ = [
    "Conn",
    "Params",
    "Row",
    "Scope",
    "connect",
    "connect_read_only",
    "rollback_quietly",
    "translate",
]

Params = Sequence[Any] | dict[str, Any]
Row = tuple[Any, ...]

# Primary result codes (the low byte of an extended code) that mean the storage itself failed.
_STORAGE_CODES = {
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_PERM,
}
_DUPLICATE_NAMES = {"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"}
_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


INT64_RANGE: Final = range(-(2**63), 2**63)


def out_of_range(rows: Iterable[Params]) -> InvalidData:
    """The InvalidData for statement parameters holding an integer SQLite cannot store (64
    bits at most), naming its field when the parameters are named."""
    for params in rows:
        items = params.items() if isinstance(params, Mapping) else enumerate(params)
        for name, value in items:
            if type(value) is int and value not in INT64_RANGE:
                field = name if isinstance(name, str) else "value"
                return InvalidData(field, f"{value} is out of the 64-bit integer range")
    return InvalidData("value", "an integer is out of the 64-bit integer range")


def unencodable(rows: Iterable[Params]) -> InvalidData:
    """The InvalidData for statement parameters holding a string that is not valid Unicode
    (a lone surrogate: no UTF-8 for SQLite), naming its field when the parameters are
    named."""
    for params in rows:
        items = params.items() if isinstance(params, Mapping) else enumerate(params)
        for name, value in items:
            if isinstance(value, str) and not _encodable(value):
                field = name if isinstance(name, str) else "value"
                return InvalidData(field, f"{value!r} is not valid Unicode text (a lone surrogate)")
    return InvalidData("value", "a string is not valid Unicode text (a lone surrogate)")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def translate(
    exc: sqlite3.Error, *, goal_id: str | None = None, subject: tuple[str, Any] | None = None
) -> Exception:
    """Return the DbError for a sqlite3 error (the caller raises it ``from exc``).

    ``goal_id`` is the parent goal of a row being inserted: a foreign-key failure then means
    that goal is missing. ``subject`` is (kind, id) of the row written, named in a Conflict.
    Programming errors (bad SQL, wrong parameter count) are bugs and come back unchanged.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or ""
    message = str(exc)
    details: dict[str, Any] = {"sqlite_error": name} if name else {}
    if subject is not None:
        details.update(kind=subject[0], id=subject[1])
    if code is None:
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in message:
            return DatabaseClosed()
        return exc
    primary = code & 0xFF
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY" and goal_id is not None:
        return GoalNotFound(goal_id)
    if primary == sqlite3.SQLITE_CONSTRAINT:
        if subject and name in _DUPLICATE_NAMES:
            return Conflict(f"{subject[0]} {subject[1]!r} exists already", **details)
        return Conflict(f"the write was refused: {message}", **details)
    if primary in _BUSY_CODES:
        return Busy(f"the database is locked by another process: {message}", **details)
    if primary == sqlite3.SQLITE_INTERRUPT:
        return Interrupted(f"the statement was interrupted: {message}", **details)
    if primary in _STORAGE_CODES:
        return StorageFailure(f"storage failure: {message}", **details)
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return exc
    return DbError(f"SQLite error: {message}", **details)


def connect(database: str, *, uri: bool = False) -> Conn:
    """Return a new connection in autocommit mode, usable from any thread (guard it).

    Raises StorageFailure when the file cannot be opened.
    """
    try:
        raw = sqlite3.connect(database, uri=uri, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise translate(exc) from exc
    return Conn(raw)


def connect_read_only(path: Path) -> Conn:
    """Return a read-only connection to the existing file at ``path`` (``mode=ro``).

    It never creates the file nor writes to it. Raises StorageFailure when it cannot open.
    """
    return connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def rollback_quietly(conn: Conn) -> None:
    """Roll back the open transaction, if any, ignoring errors.

    Used on a path that is already failing: the error that led here is the one to report.
    """
    if conn.raw.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.raw.execute("ROLLBACK")


class Conn:
    """A sqlite3 connection seen through the funnel; ``raw`` is the connection itself."""

    __slots__ = ("raw",)

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    def execute(
        self,
        sql: str,
        params: Params = (),
        *,
        goal_id: str | None = None,
        subject: tuple[str, Any] | None = None,
    ) -> sqlite3.Cursor:
        """Run one statement and return its cursor; raises the translated DbError."""
        try:
            return self.raw.execute(sql, params)
        except sqlite3.Error as exc:
            raise translate(exc, goal_id=goal_id, subject=subject) from exc
        except OverflowError as exc:
            raise out_of_range([params]) from exc
        except UnicodeEncodeError as exc:
            raise unencodable([params]) from exc

    def executemany(
        self,
        sql: str,
        rows: Iterable[Params],
        *,
        goal_id: str | None = None,
        subject: tuple[str, Any] | None = None,
    ) -> int:
        """Run one statement for each of ``rows``; return the number of rows changed."""
        try:
            return self.raw.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise translate(exc, goal_id=goal_id, subject=subject) from exc
        except OverflowError as exc:
            raise out_of_range(rows) from exc
        except UnicodeEncodeError as exc:
            raise unencodable(rows) from exc

    def change(
        self,
        sql: str,
        params: Params = (),
        *,
        goal_id: str | None = None,
        subject: tuple[str, Any] | None = None,
    ) -> int:
        """Run a write statement; return the number of rows it changed."""
        return self.execute(sql, params, goal_id=goal_id, subject=subject).rowcount

    def query(
        self,
        sql: str,
        params: Params = (),
        *,
        goal_id: str | None = None,
        subject: tuple[str, Any] | None = None,
    ) -> list[Row]:
        """Run a statement and return all its rows (a RETURNING write too)."""
        try:
            return self.raw.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, goal_id=goal_id, subject=subject) from exc
        except OverflowError as exc:
            raise out_of_range([params]) from exc
        except UnicodeEncodeError as exc:
            raise unencodable([params]) from exc

    def query_one(
        self,
        sql: str,
        params: Params = (),
        *,
        goal_id: str | None = None,
        subject: tuple[str, Any] | None = None,
    ) -> Row | None:
        """Run a statement and return its first row, or None."""
        rows = self.query(sql, params, goal_id=goal_id, subject=subject)
        return rows[0] if rows else None

    def copy_to(self, dest: Conn) -> None:
        """Copy this database into ``dest`` with SQLite's online backup API, in one step.

        One step holds a read transaction for the whole copy, so it is a consistent snapshot;
        in WAL mode writers keep committing meanwhile (a copy in several steps would restart
        each time another connection writes, and might never finish under steady writes).
        """
        try:
            self.raw.backup(dest.raw, pages=-1)
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def scalar(self, sql: str, params: Params = ()) -> Any:
        """Return the first column of the first row (None if there is no row)."""
        row = self.query_one(sql, params)
        return row[0] if row is not None else None


JsonEncoder = Callable[[Any, str], str | None]
"""``omkd.db._json.encode`` or its unchecked twin: (value, field name) -> the text to store."""


class Scope(Protocol):
    """Where a repository's calls run: ``read()``, ``write()`` and ``statement()`` yield the
    connection.

    A write block is atomic: it all happens or, on an exception, none of it does. A
    ``statement()`` block is a write of exactly one statement that ``execute`` runs to its
    end (no RETURNING): SQLite makes one statement atomic by itself, so it needs neither a
    savepoint inside a transaction nor BEGIN and COMMIT outside one. ``encode_json`` turns
    the value of a JSON field into the text to store (``omkd.db._json.encode``, or its
    unchecked twin for a Database opened with ``check_json=False``).
    """

    encode_json: JsonEncoder

    def read(self) -> AbstractContextManager[Conn]: ...

    def write(self) -> AbstractContextManager[Conn]: ...

    def statement(self) -> AbstractContextManager[Conn]: ...
