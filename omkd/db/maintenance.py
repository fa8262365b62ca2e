"""Maintenance helpers: backup destinations, durable renames, and checking a database file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from omkd.db._conn import connect_read_only
from omkd.db.errors import DbError, InvalidData, StorageFailure

__all__ = [
    "PRIVATE_FILE_MODE",
    "backup_target",
    "check_database",
    "make_private_dirs",
    "remove_stale_backups",
    "sync_and_rename",
    "temporary_backup",
]

_PRIVATE_DIR_MODE = 0o700  # the directories omkd creates: its user's alone
PRIVATE_FILE_MODE = 0o600  # the database and backup files omkd creates: its user's alone
INTEGRITY_CHECK = "PRAGMA integrity_check"
# A backup's temporary file, locked (flock) by the backup writing it, and the journal
# SQLite may keep beside it.
_TEMPORARY_BACKUP = re.compile(r"\.omkd-backup\.[0-9a-f]{32}\.tmp(-journal)?")
FOREIGN_KEY_CHECK = "PRAGMA foreign_key_check"
# Files beside a database that SQLite applies to it when it opens it (a WAL, a hot journal).
_HOT_SUFFIXES = ("-wal", "-journal")


def backup_target(dest: object, live: Path) -> Path:
    """Return the resolved backup destination; InvalidData if it is not an acceptable one.

    Refused: a relative path; the live database or its -wal, -shm or -journal file (by
    path, symbolic link or hard link); anything but a regular file (a directory, a socket,
    a FIFO); a file that a process holds an ``flock`` on (a running omkd's lock files:
    replacing one would let a second daemon start on the same database); a path with a
    -wal or -journal file beside it (SQLite would apply it to the copy when opening it); a
    missing directory.
    """
    if not isinstance(dest, str | os.PathLike):
        raise InvalidData("dest", "expected a path")
    path = Path(dest)
    if "\0" in str(path):  # the OS takes no NUL in a path
        raise InvalidData("dest", "contains a NUL character", dest=str(dest))
    if not path.is_absolute():
        raise InvalidData("dest", f"{str(dest)!r} is not an absolute path", dest=str(dest))
    try:
        target = path.resolve()
        problem = _destination_problem(target, live)
    except OSError as exc:  # a name too long, a loop of symbolic links, ...
        problem = f"{path}: {exc.strerror}"
    if problem is not None:
        raise InvalidData("dest", problem, dest=str(dest))
    return target


def _destination_problem(target: Path, live: Path) -> str | None:
    if _is_live_file(target, live):
        return f"{target} is the live database"
    if target.is_dir():
        return f"{target} is a directory"
    if target.exists() and not target.is_file():
        return f"{target} is not a regular file"
    if _locked(target):
        return f"{target} is locked by a running process (a lock file?)"
    for suffix in _HOT_SUFFIXES:
        beside = target.with_name(target.name + suffix)
        if os.path.lexists(beside):
            return (
                f"{beside} exists: a program has {target} open, or did not close it cleanly, "
                f"and SQLite would apply that file to the copy when opening it; back up to "
                f"another path, or remove {beside} if nothing uses {target}"
            )
    if not target.parent.is_dir():
        return f"directory {target.parent} does not exist"
    return None


def _is_live_file(target: Path, live: Path) -> bool:
    for name in (live, *(live.with_name(live.name + s) for s in ("-wal", "-shm", "-journal"))):
        if target == name:
            return True
        with contextlib.suppress(OSError):  # either missing: not the same file
            if target.samefile(name):  # a hard link
                return True
    return False


def _locked(target: Path) -> bool:
    """True if some process holds an flock on ``target`` (taken and dropped at once).

    Only ever opened once ``target`` is known not to be one of the live database's files:
    closing a descriptor drops the POSIX locks SQLite holds on that file in this process.
    """
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:  # missing or unreadable: writing the copy reports what matters
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the lock if it was had
    return False


@contextlib.contextmanager
def temporary_backup(target: Path) -> Iterator[Path]:
    """A new file beside ``target`` for a backup to be written to before its rename, held
    with an ``flock`` for the block (so no other backup takes it for one left by a killed
    process) and removed if the block raises. StorageFailure if it cannot be created."""
    name = f".omkd-backup.{uuid.uuid4().hex}"
    path = target.with_name(f"{name}.tmp")
    # Locked before it takes the name remove_stale_backups looks for: created under another.
    unnamed = target.with_name(f"{name}.new")
    try:
        fd = os.open(unnamed, os.O_CREAT | os.O_EXCL | os.O_RDWR, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise StorageFailure(f"cannot write the backup {target}: {exc}", dest=str(target)) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(unnamed, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                unnamed.unlink()
            raise StorageFailure(
                f"cannot write the backup {target}: {exc}", dest=str(target)
            ) from exc
        yield path
    except BaseException:
        for leftover in (path, path.with_name(path.name + "-journal")):
            with contextlib.suppress(OSError):  # the copy's own error is the one to raise
                leftover.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def remove_stale_backups(directory: Path) -> list[Path]:
    """Remove the temporary files (and their -journal) that backups into ``directory`` left
    when their process was killed: those no process holds the lock of (any process, in any
    pid namespace sharing the file system's locks); return them."""
    removed = []
    with contextlib.suppress(OSError):  # an unreadable directory: the backup will say so
        for entry in os.scandir(directory):
            if _TEMPORARY_BACKUP.fullmatch(entry.name) is None:
                continue
            if _in_progress(entry.path.removesuffix("-journal")):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _in_progress(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # a -journal left without its file
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or cannot tell
        return True
    finally:
        os.close(fd)
    return False


def sync_and_rename(temporary: Path, target: Path) -> None:
    """fsync the file, rename it onto ``target`` and fsync the directory: OSError translated."""
    try:
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageFailure(f"cannot write the backup {target}: {exc}", dest=str(target)) from exc


def check_database(path: str | os.PathLike[str]) -> list[str]:
    """Return the problems of the database file at ``path``: empty when it is fine.

    Runs ``PRAGMA integrity_check`` and ``PRAGMA foreign_key_check`` on a read-only
    connection; a missing or unreadable file is reported as a problem, not raised.
    """
    file = Path(path)
    if not file.is_file():
        return [f"no database file at {file}"]
    try:
        conn = connect_read_only(file)
    except DbError as exc:
        return [f"cannot open {file}: {exc}"]
    try:
        problems = [r[0] for r in conn.query(INTEGRITY_CHECK) if r[0] != "ok"]
        for table, rowid, parent, _ in conn.query(FOREIGN_KEY_CHECK):
            problems.append(f"{table} row {rowid} references a missing row of {parent}")
        return problems
    except DbError as exc:
        return [f"cannot check {file}: {exc}"]
    finally:
        conn.close()


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents with mode 0700; leave existing ones alone."""
    missing = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            os.chmod(d, _PRIVATE_DIR_MODE)  # exactly 0700, whatever the umask
