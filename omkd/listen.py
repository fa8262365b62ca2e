"""The daemon's hold on its socket and database: locks, binding, peer credentials.

A second daemon must refuse to start, and say why, whether it aims at the same socket or the
same database. Each is guarded by an exclusive ``flock`` on a lock file beside it, held for
the daemon's life (the kernel drops it if the daemon is killed, so a stale lock never blocks
a restart). The socket is bound under a temporary name, made 0600, put in listening state
and only then renamed into place, so a client never finds a socket that refuses it.

A refused start leaves nothing behind: ``check_lock`` looks at a lock without creating it,
and ``hold_socket_path`` makes every refusal about the socket, so the daemon can run both
before it creates or migrates its database.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from omkd.db.maintenance import make_private_dirs

__all__ = [
    "PASSING_ERRNOS",
    "StartupError",
    "check_lock",
    "hold_lock",
    "hold_socket_path",
    "open_unix_listener",
    "peer_uid",
    "prepare_socket_directory",
    "remove_socket",
]

_SOCKET_MODE: Final = 0o600
_UNIX_PATH_MAX: Final = 107
_UCRED: Final = struct.Struct("3i")


# Start failures that may pass by themselves (a StartupError not lasting): systemd may
# start the daemon again.
PASSING_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM, errno.EAGAIN, errno.EINTR}
)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do. ``lasting``: starting
    again will not help until someone acts (a damaged database, another daemon, a bad
    path); else it may (out of descriptors, a full disk, a lock held for a moment)."""

    def __init__(self, message: str, *, lasting: bool = True) -> None:
        super().__init__(message)
        self.lasting = lasting


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (directories made 0700 as needed).

    Raises StartupError naming the daemon that holds it.
    """
    lock_path = _lock_path(path)
    make_private_dirs(lock_path.parent)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _SOCKET_MODE)
    try:
        _lock_or_refuse(fd, path, what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class FileLock:
    """An exclusive flock on a database file itself, taken once the file exists.

    ``<path>.lock`` goes by the name; this goes by the file, so a second daemon on another
    name of it (a hard link) is refused too. (SQLite's own locks are POSIX record locks,
    which flock does not touch.) The descriptor stays open until ``close``: closing any
    descriptor of the file would drop the POSIX locks SQLite holds on it in this process,
    so it is closed only after the database.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None

    def take(self) -> None:
        """Take the lock if the file exists and it is not held yet; StartupError if another
        process holds it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"the database {self.path} is already in use by another omkd, under another "
                f"name of the same file (a hard link); stop it first, or give this one "
                f"another --db"
            ) from None
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_lock(path: str | os.PathLike[str], what: str) -> None:
    """Raise StartupError, as ``hold_lock`` would, if another omkd holds ``<path>.lock``.

    Creates nothing: a missing or unopenable lock file is nobody's (``hold_lock`` reports a
    file it cannot create when it is taken for real). The lock is held only for the check.
    """
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _lock_or_refuse(fd, path, what)
    finally:
        os.close(fd)  # releases the lock


def _lock_path(path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(path)}.lock")


def _lock_or_refuse(fd: int, path: str | os.PathLike[str], what: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise StartupError(
            f"the {what} {os.fspath(path)} is already in use by another omkd (pid "
            f"{holder}); stop it first, or give this one another --{_flag(what)}"
        ) from None


def _flag(what: str) -> str:
    return "db" if what == "database" else "socket"


@contextlib.contextmanager
def hold_socket_path(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of the socket at ``path`` once the daemon is known to be able to serve there.

    Refuses, with StartupError, a path too long for AF_UNIX, a directory of another user, a
    path locked by another omkd and a socket a live process accepts on; a stale socket file
    is removed. Creates the socket's directory (0700) and lock file, nothing else: the
    socket itself is bound later, by ``open_unix_listener``.
    """
    path = Path(path)
    _check_length(path)
    prepare_socket_directory(path)  # before its lock file goes there
    with hold_lock(path, "socket"):
        _refuse_live_socket(path)
        yield


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise StartupError(f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes")


def open_unix_listener(path: str | os.PathLike[str], backlog: int) -> socket.socket:
    """Return a listening Unix stream socket at ``path``, mode 0600.

    A stale socket file (nobody accepts on it) is replaced; a live one raises StartupError.
    """
    path = Path(path)
    _check_length(path)
    prepare_socket_directory(path)
    _refuse_live_socket(path)
    # Bound under a temporary name, listening, then renamed into place: a client never
    # finds the socket before it listens. A path near the length limit leaves no room for
    # the longer name: then it is bound in place (a client may be refused for a moment).
    temporary = path
    for name in (f".{path.name}.{os.getpid()}.tmp", f".{secrets.token_hex(6)}.tmp"):
        if len(os.fsencode(path.with_name(name))) <= _UNIX_PATH_MAX:
            temporary = path.with_name(name)
            break
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(temporary))
        os.chmod(temporary, _SOCKET_MODE)
        sock.listen(backlog)
        if temporary != path:
            os.replace(temporary, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise StartupError(
            f"cannot listen on {path}: {exc.strerror or exc}",
            lasting=exc.errno not in PASSING_ERRNOS,
        ) from exc
    return sock


def prepare_socket_directory(socket_path: str | os.PathLike[str]) -> None:
    """Create the socket's directory (0700) if missing; refuse one of another user.

    /tmp/omk-<uid> can be made by anyone before the daemon first runs: a directory of another
    user could let them replace the socket, so it is refused, never "fixed"; so is one every
    user may write (/tmp itself, even for root), where another user could take the socket's
    name while the daemon is stopped. Raises StartupError.
    """
    directory = Path(socket_path).parent
    make_private_dirs(directory)
    info = directory.stat()
    owner = info.st_uid
    if info.st_mode & stat.S_IWOTH:  # /tmp itself, for root too
        raise StartupError(
            f"the socket directory {directory} is writable by every user: another user "
            f"could take the socket's name in it while the daemon is stopped; use a "
            f"directory of your own (the default is $XDG_RUNTIME_DIR/omk, else "
            f"/tmp/omk-{os.getuid()})"
        )
    if owner != os.getuid():
        # Even /tmp (root's, sticky): another user could take the socket's name there while
        # the daemon is stopped, and clients would talk to them.
        raise StartupError(
            f"the socket directory {directory} belongs to uid {owner}, not to this user "
            f"(uid {os.getuid()}): another user could take the socket's name in it; use a "
            f"directory of your own (the default is $XDG_RUNTIME_DIR/omk, else "
            f"/tmp/omk-{os.getuid()})"
        )


def _refuse_live_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or choose --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot probe existing socket {path}: {exc.strerror}") from exc
        path.unlink(missing_ok=True)  # stale: left by a daemon that was killed
        return
    finally:
        probe.close()
    raise StartupError(f"another daemon is already listening on {path}")


def remove_socket(path: str | os.PathLike[str]) -> None:
    """Remove the socket file at ``path`` (the socket lock guarantees it is ours)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def peer_uid(sock: socket.socket | object) -> int | None:
    """Return the uid of the peer of a connected Unix socket (SO_PEERCRED), None if unknown."""
    getsockopt = getattr(sock, "getsockopt", None)
    if getsockopt is None:
        return None
    try:
        raw = getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)
