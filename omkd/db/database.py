"""The Database handle, its Transactions, and maintenance: backup, checkpoint and checks.

Theory of operation: a Database holds two sqlite3 connections to one WAL file. The WRITER
runs every write and every Transaction; one ``threading.Lock`` (the write lock) guards it, so
writes are serialized and a Transaction holds the lock from ``BEGIN IMMEDIATE`` until it ends.
The READER, under its own lock and with ``query_only`` on, runs the reads made on the Database
itself: thanks to WAL they see the latest committed state and never wait for an open
Transaction. Nor for another thread's read: a read that finds the reader busy takes a spare
reader connection (opened the first time, kept for the next), so a long read in one thread
never holds up the quick ones of another.

Repositories are written once against a scope (see ``_conn.Scope``):

* on the Database, each write call is its own ``BEGIN IMMEDIATE`` ... ``COMMIT``, so multi-row
  calls are atomic on their own;
* on a Transaction, reads and writes use the writer (a transaction sees its own writes) and
  each call runs in a SAVEPOINT: a call that fails changes nothing and leaves the transaction
  open. If SQLite rolled the whole transaction back itself (disk full, I/O error), the
  Transaction closes, releases the write lock and raises StorageFailure(transaction_lost=True).

One Database may be shared by threads. A thread holding an open Transaction that calls a
write on the Database itself (or begins another transaction) gets Busy at once: it would
wait for its own lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, TypeVar, overload

from omkd.db import _json
from omkd.db._conn import (
    Conn,
    JsonEncoder,
    Row,
    Scope,
    connect,
    connect_read_only,
    rollback_quietly,
)
from omkd.db.artifacts import ArtifactRepository
from omkd.db.budgets import BudgetRepository
from omkd.db.errors import (
    Busy,
    DatabaseClosed,
    DbError,
    Interrupted,
    InvalidData,
    StorageFailure,
    TimeLimitExceeded,
    TransactionClosed,
)
from omkd.db.events import EventRepository
from omkd.db.goals import GoalRepository
from omkd.db.maintenance import (
    PRIVATE_FILE_MODE,
    backup_target,
    make_private_dirs,
    remove_stale_backups,
    sync_and_rename,
    temporary_backup,
)
from omkd.db.migrate import Migration, apply_migrations, load_migrations, refuse_foreign
from omkd.db.proofs import ProofRepository
from omkd.db.tasks import TaskRepository

__all__ = ["BUSY_TIMEOUT_MS", "Database", "Transaction", "backup_database", "migrate"]

BUSY_TIMEOUT_MS = 5000
"""How long SQLite waits for a lock held by another process before answering Busy."""
WAL_RETRY_S: Final = 0.01
"""Between tries to set journal_mode=WAL while another process holds the file."""

# SQLite VM steps between two looks at a read's time limit (``Database.time_limit``): a look
# costs a Python call, ~0.3 µs; 1,000 steps are ~50 rows of a page of small events, or ~15
# ms of a page of 15 KB ones.
TIME_LIMIT_STEPS: Final = 1000

MAX_IDLE_SPARE_READERS = 4
"""Spare reader connections kept open once their read ended (more are closed then)."""

SET_BUSY_TIMEOUT = "PRAGMA busy_timeout = {ms:d}"
GET_BUSY_TIMEOUT = "PRAGMA busy_timeout"
SET_FOREIGN_KEYS = "PRAGMA foreign_keys = ON"
GET_FOREIGN_KEYS = "PRAGMA foreign_keys"
SET_WAL = "PRAGMA journal_mode = WAL"
SET_WAL_AUTOCHECKPOINT = "PRAGMA wal_autocheckpoint = {pages:d}"
GET_PAGE_SIZE = "PRAGMA page_size"
SET_JOURNAL_SIZE_LIMIT = "PRAGMA journal_size_limit = {size:d}"
SET_QUERY_ONLY = "PRAGMA query_only = ON"
SET_SYNCHRONOUS = {"NORMAL": "PRAGMA synchronous = NORMAL", "FULL": "PRAGMA synchronous = FULL"}
SYNCHRONOUS_VALUES = {"NORMAL": 1, "FULL": 2}
GET_SYNCHRONOUS = "PRAGMA synchronous"
GET_USER_VERSION = "PRAGMA user_version"
CHECKPOINT = {
    mode: f"PRAGMA wal_checkpoint({mode})" for mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
}
QUICK_CHECK = "PRAGMA quick_check"
# The copy is a temporary file until it is synced and renamed: no journal, no syncs while
# it is written (sync_and_rename syncs it once, complete).
BACKUP_TARGET_PRAGMAS = ("PRAGMA journal_mode = OFF", "PRAGMA synchronous = OFF")
# The copied header says WAL, like the source; the backup is made one self-contained file
# (opening it with Database.open turns WAL back on).
BACKUP_SELF_CONTAINED = "PRAGMA journal_mode = DELETE"
BEGIN = "BEGIN IMMEDIATE"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
SAVEPOINT = "SAVEPOINT omkd_call"
RELEASE = "RELEASE omkd_call"
ROLLBACK_TO = "ROLLBACK TO omkd_call"


def _expect(conn: Conn, sql: str, expected: object, what: str) -> None:
    actual = conn.scalar(sql)
    if isinstance(actual, str):
        actual = actual.lower()
    if actual != expected:
        raise StorageFailure(f"could not set {what}: SQLite reports {actual!r}", setting=what)


def _set_wal(conn: Conn, timeout: float) -> None:
    # SQLite does not wait on the busy timeout to change the journal mode: several
    # processes opening a new file at once got Busy at once (3 opens in 210).
    deadline = time.monotonic() + timeout
    while True:
        try:
            _expect(conn, SET_WAL, "wal", "journal_mode=WAL")
            return
        except Busy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_S)


def _configure(conn: Conn, *, busy_timeout_ms: int, synchronous: str | None) -> None:
    """Set and check the pragmas; ``synchronous`` None marks the read-only reader."""
    conn.execute(SET_BUSY_TIMEOUT.format(ms=busy_timeout_ms))
    _expect(conn, GET_BUSY_TIMEOUT, busy_timeout_ms, "busy_timeout")
    conn.execute(SET_FOREIGN_KEYS)
    _expect(conn, GET_FOREIGN_KEYS, 1, "foreign_keys")
    if synchronous is None:
        conn.execute(SET_QUERY_ONLY)
        return
    refuse_foreign(conn)  # before WAL: another program's file is left as it was
    _set_wal(conn, busy_timeout_ms / 1000)
    conn.execute(SET_SYNCHRONOUS[synchronous])
    _expect(conn, GET_SYNCHRONOUS, SYNCHRONOUS_VALUES[synchronous], "synchronous")


def _checkpoint_result(row: Row | None) -> tuple[int, int, int]:
    """SQLite's (busy, log frames, checkpointed frames) from a wal_checkpoint pragma's row."""
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]))


def _commit(conn: Conn) -> None:
    """COMMIT, or roll back and raise StorageFailure: nothing of the transaction stays."""
    try:
        conn.execute(COMMIT)
    except DbError as exc:
        rollback_quietly(conn)
        raise StorageFailure(
            f"the commit failed and nothing was written: {exc}", transaction_lost=True
        ) from exc


_Repo = TypeVar("_Repo")


class _Repository(Generic[_Repo]):
    """A repository attribute, made from the instance's scope on first use and then kept in
    the instance (a group commit's Transaction mostly needs one of the six)."""

    def __init__(self, make: Callable[[Scope], _Repo]) -> None:
        self._make = make
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type) -> _Repository[_Repo]: ...

    @overload
    def __get__(self, instance: _Repositories, owner: type) -> _Repo: ...

    def __get__(self, instance: _Repositories | None, owner: type) -> _Repository[_Repo] | _Repo:
        if instance is None:
            return self
        repository = self._make(instance._scope)
        instance.__dict__[self._name] = repository  # found before this descriptor next time
        return repository


class _Repositories:
    """The six repositories, the same on a Database and on a Transaction: only the scope
    (each call its own transaction, or inside one) differs."""

    _scope: Scope
    goals = _Repository(GoalRepository)
    tasks = _Repository(TaskRepository)
    events = _Repository(EventRepository)
    proofs = _Repository(ProofRepository)
    budgets = _Repository(BudgetRepository)
    artifacts = _Repository(ArtifactRepository)

    def _bind_repositories(self, scope: Scope) -> None:
        """Make the repositories work in ``scope`` (those already made are dropped)."""
        self._scope = scope
        for name in _REPOSITORY_NAMES:
            self.__dict__.pop(name, None)


_REPOSITORY_NAMES: Final = tuple(
    name for name, value in vars(_Repositories).items() if isinstance(value, _Repository)
)


class Database(_Repositories):
    """One SQLite database in WAL mode, shared by threads; see the module's docstring.

    Open it with :meth:`open`; close it with :meth:`close` or a ``with`` block.
    """

    def __init__(
        self,
        path: Path,
        writer: Conn,
        reader: Conn,
        *,
        lock_timeout: float | None,
        migrations_applied: list[Migration],
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        synchronous: str = "NORMAL",
        check_json: bool = True,
    ) -> None:
        self._path = path
        self._encode_json: JsonEncoder = _json.encode if check_json else _json.encode_unchecked
        self._writer = writer
        self._reader = reader
        self._write_lock = threading.Lock()
        # The thread holding it: its Thread, not its ident, which a later thread may reuse.
        self._write_owner: threading.Thread | None = None
        self._read_lock = threading.Lock()
        self._spare_readers: list[Conn] = []  # idle ones; those in use are their thread's
        self._spares_in_use: set[Conn] = set()
        self._spare_lock = threading.Lock()
        # .reads: the connections this thread reads on (with their limits); .time_limit
        self._local = threading.local()
        self._checkpointer: Conn | None = None  # opened by the first checkpoint_concurrently
        self._checkpoint_lock = threading.Lock()
        self._busy_timeout_ms = busy_timeout_ms
        self._synchronous = synchronous
        self._lock_timeout = lock_timeout
        self._closed = False
        self._transaction: Transaction | None = None
        self.migrations_applied = migrations_applied
        """The migrations this open applied (empty when the schema was current)."""
        self._bind_repositories(_DatabaseScope(self))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        migrations_dir: Path | None = None,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        lock_timeout: float | None = None,
        wal_autocheckpoint: int | None = None,
        wal_size_limit: int | None = None,
        check_json: bool = True,
    ) -> Database:
        """Open (creating it and its directory if needed) and migrate the database at ``path``.

        Sets and checks journal_mode=WAL, foreign_keys=ON, ``synchronous`` ("NORMAL" or
        "FULL") and busy_timeout. ``lock_timeout`` bounds how long a write or ``transaction()``
        waits for the write lock (None: as long as it takes) before raising Busy.
        ``wal_autocheckpoint`` is the WAL size in pages past which a commit checkpoints
        (SQLite's default, 1000, when None; 0 never): raise it when something else calls
        :meth:`checkpoint_concurrently`, so that commits do not pay for checkpoints.
        ``wal_size_limit``, in pages: when the WAL starts over, its file is cut back to this
        size (SQLite's journal_size_limit; None: never cut). ``check_json`` False skips the
        check that the values of JSON fields are JSON (no NaN, bytes, dates, sets, ...: they
        raise InvalidData), for a caller whose values all come from a JSON decoder (the
        daemon's, from msgspec): the check costs about three times the encoding.

        Raises InvalidData (bad option), SchemaTooNew, MigrationMismatch, MigrationFailed,
        Busy, StorageFailure (not a database, unwritable, ...). Nothing stays open on error.
        """
        if synchronous not in SET_SYNCHRONOUS:
            raise InvalidData("synchronous", "must be NORMAL or FULL")
        path = Path(path).expanduser()
        try:
            make_private_dirs(path.parent)
        except OSError as exc:
            raise StorageFailure(f"cannot create {path.parent}: {exc}") from exc
        path = path.resolve()
        # A new file is its user's alone (0600, whatever the umask; SQLite would make it
        # 0644), and so are its -wal and -shm, which SQLite gives the file's mode.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageFailure(f"cannot create {path}: {exc.strerror}") from exc
        migrations = load_migrations(migrations_dir)
        with contextlib.ExitStack() as stack:
            writer = connect(str(path))
            stack.callback(writer.close)
            _configure(writer, busy_timeout_ms=busy_timeout_ms, synchronous=synchronous)
            if wal_autocheckpoint is not None:
                if wal_autocheckpoint < 0:
                    raise InvalidData("wal_autocheckpoint", "must not be negative")
                writer.execute(SET_WAL_AUTOCHECKPOINT.format(pages=wal_autocheckpoint))
            if wal_size_limit is not None:
                if wal_size_limit < 0:
                    raise InvalidData("wal_size_limit", "must not be negative")
                page_size = writer.query_one(GET_PAGE_SIZE)
                assert page_size is not None
                writer.execute(SET_JOURNAL_SIZE_LIMIT.format(size=wal_size_limit * page_size[0]))
            applied = apply_migrations(writer, migrations)
            reader = connect(str(path))
            stack.callback(reader.close)
            _configure(reader, busy_timeout_ms=busy_timeout_ms, synchronous=None)
            stack.pop_all()
        return cls(
            path,
            writer,
            reader,
            lock_timeout=lock_timeout,
            migrations_applied=applied,
            busy_timeout_ms=busy_timeout_ms,
            synchronous=synchronous,
            check_json=check_json,
        )

    @property
    def path(self) -> Path:
        """The database file's resolved path."""
        return self._path

    @property
    def schema_version(self) -> int:
        """The schema version (``PRAGMA user_version``)."""
        with _DatabaseScope(self).read() as conn:
            return int(conn.scalar(GET_USER_VERSION))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def transaction_active(self) -> bool:
        """Whether a Transaction is open on this Database."""
        tx = self._transaction
        return tx is not None and tx.active

    def transaction(self, timeout: float | None = None) -> Transaction:
        """Begin a Transaction holding the write lock until its commit or rollback.

        Waits for the write lock up to ``timeout`` seconds (default: the Database's
        lock_timeout; None waits as long as it takes). Raises Busy, DatabaseClosed.
        """
        tx = Transaction(self, self._begin(self._lock_timeout if timeout is None else timeout))
        self._transaction = tx
        return tx

    def backup_to(self, dest: str | os.PathLike[str]) -> int:
        """Copy the committed database to ``dest`` (absolute); return the bytes written.

        ``backup_database`` on this Database's file: one consistent snapshot, taken on a
        connection of its own while other threads keep reading and writing (WAL). Raises
        what it raises, and DatabaseClosed.
        """
        self._check_open()
        return backup_database(self._path, dest)

    def checkpoint(self, mode: str = "TRUNCATE") -> tuple[int, int, int]:
        """Checkpoint the WAL; return SQLite's (busy, log frames, checkpointed frames).

        Waits for the write lock like a write. Raises InvalidData for an unknown mode.
        """
        if mode not in CHECKPOINT:
            raise InvalidData("mode", f"must be one of {', '.join(CHECKPOINT)}")
        self._acquire_write(self._lock_timeout)
        try:
            return _checkpoint_result(self._writer.query_one(CHECKPOINT[mode]))
        finally:
            self._release_write()

    def checkpoint_concurrently(self) -> tuple[int, int, int]:
        """Checkpoint what the WAL holds (PASSIVE) on a connection of its own, without the
        write lock: writers and readers go on meanwhile, and its fsyncs are not theirs.

        For a thread other than the writers' (the daemon runs it in a worker thread). Returns
        SQLite's (busy, log frames, checkpointed frames). Raises DatabaseClosed, DbError.
        """
        with self._checkpoint_lock:
            self._check_open()
            if self._checkpointer is None:
                conn = connect(str(self._path))
                try:
                    _configure(
                        conn, busy_timeout_ms=self._busy_timeout_ms, synchronous=self._synchronous
                    )
                except BaseException:
                    conn.close()
                    raise
                self._checkpointer = conn
            return _checkpoint_result(self._checkpointer.query_one(CHECKPOINT["PASSIVE"]))

    @property
    def total_changes(self) -> int:
        """Rows inserted, updated or deleted through this Database since it was opened."""
        self._check_open()
        return self._writer.raw.total_changes

    def quick_check(self) -> list[str]:
        """Return the problems ``PRAGMA quick_check`` finds (empty when the file is fine)."""
        with _DatabaseScope(self).read() as conn:
            return [r[0] for r in conn.query(QUICK_CHECK) if r[0] != "ok"]

    def interrupt(self) -> None:
        """Interrupt the statement running on the writer (it raises Interrupted)."""
        if not self._closed:
            self._writer.raw.interrupt()

    def interrupt_reads(self) -> None:
        """Interrupt the reads running outside a transaction, in any thread (each raises
        Interrupted); reads begun afterwards run as usual. (The daemon, stopping, ends its
        long reads so.)"""
        with self._spare_lock:
            if self._closed:
                return
            conns = [self._reader, *self._spares_in_use]
            for conn in conns:
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile
                    conn.raw.interrupt()

    def time_limit(self, seconds: float) -> AbstractContextManager[None]:
        """In this block, on this thread, each read made outside a transaction stops with
        TimeLimitExceeded once it has run ``seconds`` (SQLite looks every
        ``TIME_LIMIT_STEPS`` steps of its statement). For a caller that would rather run a
        long read elsewhere than wait for it here (the daemon's event loop)."""
        return _TimeLimit(self._local, seconds)

    def close(self) -> None:
        """Roll back an open Transaction, then close both connections. Idempotent."""
        if self._closed:
            return
        tx = self._transaction
        if tx is not None:
            with contextlib.suppress(TransactionClosed):
                tx.rollback()
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
            self._reader.close()
        with self._spare_lock:  # (one in use is closed when its read ends)
            spares, self._spare_readers = self._spare_readers, []
        for conn in spares:
            conn.close()
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Database {str(self._path)!r} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise DatabaseClosed()

    def _begin(self, timeout: float | None) -> Conn:
        """Take the write lock and begin a transaction on the writer; return the writer."""
        self._acquire_write(timeout)
        try:
            self._writer.execute(BEGIN)
        except BaseException:
            self._release_write()
            raise
        return self._writer

    def _acquire_write(self, timeout: float | None) -> None:
        """Take the write lock, waiting up to ``timeout`` s (None: forever); Busy if not had,
        at once if this thread holds it already (it would wait for itself)."""
        if self._write_owner is threading.current_thread():
            raise Busy(
                "this thread holds the write lock already, in an open Transaction: make the "
                "call on that Transaction, or end it first"
            )
        if not self._write_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise Busy(
                f"the database was busy for {timeout} s: another transaction holds it",
                timeout=timeout,
            )
        self._write_owner = threading.current_thread()
        if self._closed:
            self._release_write()
            raise DatabaseClosed()

    def _release_write(self) -> None:
        self._write_owner = None
        self._write_lock.release()

    def _take_spare_reader(self) -> Conn:
        with self._spare_lock:
            self._check_open()
            if self._spare_readers:
                conn = self._spare_readers.pop()
                self._spares_in_use.add(conn)
                return conn
        conn = connect(str(self._path))
        try:
            _configure(conn, busy_timeout_ms=self._busy_timeout_ms, synchronous=None)
        except BaseException:
            conn.close()
            raise
        with self._spare_lock:
            self._spares_in_use.add(conn)
        return conn

    def _return_spare_reader(self, conn: Conn) -> None:
        with self._spare_lock:
            self._spares_in_use.discard(conn)
            if not self._closed and len(self._spare_readers) < MAX_IDLE_SPARE_READERS:
                self._spare_readers.append(conn)
                return
        conn.close()

    def _end_transaction(self, tx: Transaction) -> None:
        if self._transaction is tx:
            self._transaction = None
        self._release_write()


class _DatabaseScope:
    """Reads on the reader; each write its own transaction on the writer."""

    def __init__(self, db: Database) -> None:
        self._read = _Read(db)
        self._own_transaction = _OwnTransaction(db)
        self._autocommit = _Autocommit(db)
        self.encode_json: JsonEncoder = db._encode_json

    def read(self) -> _Read:
        return self._read

    def write(self) -> _OwnTransaction:
        return self._own_transaction

    def statement(self) -> _Autocommit:
        return self._autocommit


class _Read:
    """A read call outside a transaction: the reader connection, or a spare one when another
    thread reads on the reader (or this one does, in a read of its own around this one);
    stopped past the thread's time limit, if it set one (``Database.time_limit``)."""

    __slots__ = ("_db",)

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> Conn:
        db = self._db
        if db._read_lock.acquire(blocking=False):
            if db._closed:
                db._read_lock.release()
                raise DatabaseClosed()
            conn = db._reader
        else:
            conn = db._take_spare_reader()
        local = db._local
        seconds: float | None = getattr(local, "time_limit", None)
        limit = None if seconds is None else _Limit(conn, seconds)
        try:
            local.reads.append((conn, limit))
        except AttributeError:  # this thread's first read
            local.reads = [(conn, limit)]
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db = self._db
        conn, limit = db._local.reads.pop()  # this thread's innermost read
        passed = limit is not None and limit.stop(conn)
        if conn is db._reader:
            db._read_lock.release()
        else:
            db._return_spare_reader(conn)
        if passed and isinstance(exc, Interrupted):
            assert limit is not None
            raise TimeLimitExceeded(limit.seconds) from exc


class _Limit:
    """One read's time limit, watched from SQLite's progress handler on its connection."""

    __slots__ = ("_deadline", "_passed", "seconds")

    def __init__(self, conn: Conn, seconds: float) -> None:
        self.seconds = seconds
        self._deadline = time.perf_counter() + seconds
        self._passed = False
        conn.raw.set_progress_handler(self._check, TIME_LIMIT_STEPS)

    def stop(self, conn: Conn) -> bool:
        """Take the handler off ``conn``; whether the limit stopped the read."""
        conn.raw.set_progress_handler(None, 0)
        return self._passed

    def _check(self) -> bool:
        # SQLite's progress handler: True stops the statement (SQLITE_INTERRUPT).
        if time.perf_counter() > self._deadline:
            self._passed = True
        return self._passed


class _TimeLimit:
    """``Database.time_limit``: sets the thread's limit for the block (restores the outer)."""

    __slots__ = ("_local", "_outer", "_seconds")

    def __init__(self, local: threading.local, seconds: float) -> None:
        self._local = local
        self._seconds = seconds
        self._outer: float | None = None

    def __enter__(self) -> None:
        self._outer = getattr(self._local, "time_limit", None)
        self._local.time_limit = self._seconds

    def __exit__(self, *exc_info: object) -> None:
        self._local.time_limit = self._outer


class _OwnTransaction:
    """A write call outside a transaction: the write lock, and a SQLite transaction of its
    own, committed when the call succeeds. (A class, not a generator, like _Savepoint.)"""

    __slots__ = ("_db",)

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> Conn:
        return self._db._begin(self._db._lock_timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db = self._db
        try:
            if exc is not None:
                rollback_quietly(db._writer)
                return
            _commit(db._writer)
        finally:
            db._release_write()


class _Autocommit:
    """A write of one statement outside a transaction: the write lock, and SQLite's own
    transaction around the statement (no BEGIN and COMMIT of ours)."""

    __slots__ = ("_db",)

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> Conn:
        db = self._db
        db._acquire_write(db._lock_timeout)
        return db._writer

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db = self._db
        try:
            if exc is None:
                return
            rollback_quietly(db._writer)  # (SQLite ended its own transaction already)
            if isinstance(exc, StorageFailure):  # the disk, not the data: say what it cost
                raise StorageFailure(
                    f"the write failed and nothing was written: {exc}", transaction_lost=True
                ) from exc
        finally:
            db._release_write()


class Transaction(_Repositories):
    """A write transaction that may stay open across many calls and threads.

    Has the Database's repositories (``tx.goals``, ``tx.events``, ...), which read and write
    inside it. Calls on one Transaction are serialized. ``commit()`` or ``rollback()`` end it
    and release the write lock; as a context manager it commits on success and rolls back on
    an exception. Any use after its end raises TransactionClosed.
    """

    def __init__(self, db: Database, conn: Conn) -> None:
        self._db = db
        self._conn = conn
        self._lock = threading.Lock()
        self._active = True
        self._bind_repositories(_TransactionScope(self))

    @property
    def active(self) -> bool:
        """Whether the transaction is still open."""
        return self._active

    def commit(self) -> None:
        """Commit and end the transaction.

        Raises TransactionClosed if it has ended; StorageFailure (transaction_lost) if the
        commit failed, in which case it was rolled back and has ended too.
        """
        with self._use() as conn:
            try:
                _commit(conn)
            finally:
                self._finish()

    def rollback(self) -> None:
        """Roll back and end the transaction. Raises TransactionClosed if it has ended."""
        with self._use() as conn:
            try:
                conn.execute(ROLLBACK)
            except DbError:
                # SQLite undoes an unfinished transaction when the statement fails or the
                # connection closes; ending ours is what matters here.
                rollback_quietly(conn)
            finally:
                self._finish()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._active:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def __repr__(self) -> str:
        return f"<Transaction {'active' if self._active else 'closed'}>"

    @contextlib.contextmanager
    def _use(self) -> Iterator[Conn]:
        conn = self._hold()
        try:
            yield conn
        finally:
            self._lock.release()

    def _hold(self) -> Conn:
        """Take the transaction's lock for one call (the caller releases it); raises
        TransactionClosed, without the lock, if the transaction has ended."""
        self._lock.acquire()
        if not self._active:
            self._lock.release()
            raise TransactionClosed()
        return self._conn

    def _finish(self) -> None:
        self._active = False
        # The scope and the repositories made from it refer back to this transaction: let
        # go of them, or the cycle leaves every group commit's Transaction to the garbage
        # collector. Calls after the end still raise TransactionClosed.
        self._bind_repositories(_ENDED)
        self._db._end_transaction(self)

    def _lose(self, exc: BaseException) -> StorageFailure:
        """End the transaction SQLite rolled back; return the error to raise from ``exc``."""
        rollback_quietly(self._conn)
        self._finish()
        return StorageFailure(
            f"the transaction was rolled back by SQLite and nothing of it was written: {exc}",
            transaction_lost=True,
        )

    def _undo_call(self, exc: BaseException) -> None:
        """Undo a failed call's savepoint; raise StorageFailure if the transaction is gone."""
        if self._conn.raw.in_transaction:
            try:
                self._conn.execute(ROLLBACK_TO)
                self._conn.execute(RELEASE)
                return
            except DbError:
                pass
        raise self._lose(exc) from exc


class _Ended:
    """The scope of a transaction that has ended: every call raises TransactionClosed."""

    def read(self) -> AbstractContextManager[Conn]:
        raise TransactionClosed()

    write = statement = read

    def __init__(self) -> None:
        self.encode_json: JsonEncoder = _closed_encoder


def _closed_encoder(value: Any, field: str) -> str | None:
    raise TransactionClosed()


_ENDED: Final = _Ended()


class _TransactionScope:
    """Reads and writes on the writer, inside the transaction; each write call a savepoint,
    but for a write of one statement."""

    def __init__(self, tx: Transaction) -> None:
        self._read = _InTransaction(tx)
        self._savepoint = _Savepoint(tx)
        self.encode_json: JsonEncoder = tx._db._encode_json

    def read(self) -> _InTransaction:
        return self._read

    def statement(self) -> _InTransaction:
        # SQLite undoes a failed statement and keeps the transaction: no savepoint needed.
        return self._read

    def write(self) -> _Savepoint:
        return self._savepoint


class _InTransaction:
    """A read, or a write of one statement, inside a transaction: holds the transaction's
    lock; a failure that cost the transaction (SQLite rolled it back) ends it."""

    __slots__ = ("_tx",)

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def __enter__(self) -> Conn:
        return self._tx._hold()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx = self._tx
        try:
            if exc is not None and not tx._conn.raw.in_transaction:
                raise tx._lose(exc) from exc
        finally:
            tx._lock.release()


class _Savepoint:
    """A write call inside a transaction: holds the transaction's lock, and runs in a
    savepoint that the call's failure rolls back. (A class, not a generator: this is on the
    path of every write in a transaction, group commits included.)"""

    __slots__ = ("_tx",)

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def __enter__(self) -> Conn:
        tx = self._tx
        conn = tx._hold()
        try:
            conn.execute(SAVEPOINT)
        except BaseException as exc:
            lost = isinstance(exc, DbError) and not conn.raw.in_transaction
            error = tx._lose(exc) if lost else None  # SQLite rolled the transaction back
            tx._lock.release()
            if error is not None:
                raise error from exc
            raise
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx = self._tx
        try:
            if exc is not None:
                tx._undo_call(exc)  # raises StorageFailure if the transaction is gone
                return  # the call's own error goes on
            try:
                tx._conn.execute(RELEASE)
            except DbError as error:
                tx._undo_call(error)
                raise
        finally:
            tx._lock.release()


def migrate(path: str | os.PathLike[str], *, migrations_dir: Path | None = None) -> list[Migration]:
    """Open the database at ``path`` (creating it if needed), migrate it, close it.

    Returns the migrations applied (empty if it was current). Raises what ``open`` raises.
    """
    with Database.open(path, migrations_dir=migrations_dir) as db:
        return db.migrations_applied


def backup_database(
    path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
) -> int:
    """Copy the database file at ``path`` to ``dest`` (absolute) as it is; return its size.

    ``path`` is read on a read-only connection of its own: it is not created, migrated or
    written, so a file at any schema version (or none) is copied unchanged, and a daemon
    using it keeps reading and writing meanwhile (WAL). SQLite's online backup API copies
    it in one step, so the copy is one consistent snapshot. The copy goes to a temporary
    file in dest's directory, is synced, then renamed onto dest: dest is never a partial
    file, and the temporary file is removed on any failure (and those of backups into that
    directory whose process was killed, before this one begins: no process holds their
    lock). Like the database, the copy is its user's alone (0600). The copy is one
    self-contained file (journal_mode DELETE).

    Raises StorageFailure (no file at ``path``, not a database, unreadable, the copy cannot
    be written), InvalidData (``dest`` relative, ``path`` itself or its -wal/-shm, a
    directory, in a missing directory, a name the file system refuses), Busy.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise StorageFailure(f"no database at {source}", path=str(source))
    source = source.resolve()
    target = backup_target(dest, source)
    # Named apart from dest: any name dest may have leaves room for it (and SQLite's
    # -journal beside it) within the file system's limit.
    remove_stale_backups(target.parent)  # left by a backup whose process was killed
    conn = connect_read_only(source)
    try:
        conn.execute(SET_BUSY_TIMEOUT.format(ms=busy_timeout_ms))
        with temporary_backup(target) as temporary:
            copy = connect(str(temporary))
            try:
                for pragma in BACKUP_TARGET_PRAGMAS:
                    copy.execute(pragma)
                conn.copy_to(copy)
                copy.execute(BACKUP_SELF_CONTAINED)
            finally:
                copy.close()
            sync_and_rename(temporary, target)
        return target.stat().st_size
    finally:
        conn.close()
