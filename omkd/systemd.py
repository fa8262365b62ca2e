"""The three systemd protocols omkd speaks: readiness notification, watchdog, socket activation.

Stdlib only, no trio: the daemon calls these from its event loop (each call is one
non-blocking syscall or two) and the tests call them directly. Hand-rolled rather than the
PyPI ``sdnotify`` package, which swallows every error: here a missing ``$NOTIFY_SOCKET`` is
the only quiet case, and every other failure raises.

References: sd_notify(3), sd_watchdog_enabled(3), sd_listen_fds(3).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping

__all__ = [
    "SD_LISTEN_FDS_START",
    "listen_socket",
    "notify",
    "notify_ready",
    "notify_reloading",
    "notify_starting",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "watchdog_interval",
]

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes to a socket-activated process."""

WATCHDOG_PING_FRACTION = 0.5
"""Ping at this fraction of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends."""

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

NOTIFY_WAIT_S = 1.0
"""How long READY=1 and STOPPING=1 wait for room in systemd's queue (sd_notify(3) blocks;
a lost READY=1 leaves the unit starting until its timeout). Other notifications never wait."""


def notify(state: str, *, env: Mapping[str, str] = os.environ, wait: float = 0.0) -> bool:
    """Send one sd_notify(3) datagram, such as ``"READY=1"``, to ``$NOTIFY_SOCKET``.

    ``$NOTIFY_SOCKET`` is a filesystem path or, when it starts with ``@``, an abstract socket
    name.

    Returns True once the datagram is sent, False when ``$NOTIFY_SOCKET`` is unset or empty
    (the process was not started by systemd with ``Type=notify``).

    Raises ValueError when ``$NOTIFY_SOCKET`` is neither an absolute path nor an ``@`` name,
    and OSError when the send fails (no such socket, permission denied). The socket is
    non-blocking, so a receiver that has fallen behind raises BlockingIOError instead of
    stalling the caller's event loop; with ``wait``, it waits that many seconds for room
    first (then TimeoutError).
    """
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = b"\0" + os.fsencode(address[1:])
    elif address.startswith("/"):
        target = os.fsencode(address)
    else:
        raise ValueError(
            f"NOTIFY_SOCKET={address!r} is neither an absolute path nor an @abstract name"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(wait or 0.0)  # (0: non-blocking)
        sock.sendto(state.encode(), target)
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.splitlines())


def notify_ready(status: str = "serving", *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd the daemon can serve: ``READY=1``, ``STATUS=status`` and ``MAINPID``.

    Send it only once the listening socket accepts connections and the database is open.
    Returns and raises as notify().
    """
    state = f"READY=1\nSTATUS={_one_line(status)}\nMAINPID={os.getpid()}"
    return notify(state, env=env, wait=NOTIFY_WAIT_S)


def notify_status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Set the free-form status line ``systemctl status`` shows. Returns and raises as notify()."""
    return notify(f"STATUS={_one_line(text)}", env=env)


def notify_stopping(status: str = "shutting down", *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd the daemon has begun to shut down: ``STOPPING=1`` and a status line.

    Returns and raises as notify().
    """
    return notify(f"STOPPING=1\nSTATUS={_one_line(status)}", env=env, wait=NOTIFY_WAIT_S)


def notify_starting(status: str, *, extend: float, env: Mapping[str, str] = os.environ) -> bool:
    """Say what the start is doing, and give it ``extend`` seconds more from now
    (``EXTEND_TIMEOUT_USEC``, systemd 236 and later: a long check of a large database must
    not be killed by TimeoutStartSec). Returns and raises as notify()."""
    usec = int(extend * 1_000_000)
    return notify(f"STATUS={_one_line(status)}\nEXTEND_TIMEOUT_USEC={usec}", env=env)


def notify_watchdog(*, env: Mapping[str, str] = os.environ) -> bool:
    """Send one watchdog keep-alive, ``WATCHDOG=1``. Returns and raises as notify()."""
    return notify("WATCHDOG=1", env=env)


def notify_reloading(status: str = "reloading", *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd a reload has begun: ``RELOADING=1`` with ``MONOTONIC_USEC``.

    ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd 253 and later) and
    ignored by older managers. Follow it with notify_ready() when the reload is done.
    Returns and raises as notify().
    """
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    state = f"RELOADING=1\nSTATUS={_one_line(status)}\nMONOTONIC_USEC={now_usec}"
    return notify(state, env=env)


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} set by systemd is not an integer") from None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Return how often to send ``WATCHDOG=1``, in seconds, or None when not to.

    The interval is half of ``$WATCHDOG_USEC``. None when ``$WATCHDOG_USEC`` is unset,
    empty or zero, or when ``$WATCHDOG_PID`` names another process. Raises ValueError when
    either variable is set but not an integer.
    """
    if not env.get("WATCHDOG_USEC"):
        return None
    if env.get("WATCHDOG_PID") and _int_var(env, "WATCHDOG_PID") != os.getpid():
        return None
    usec = _int_var(env, "WATCHDOG_USEC")
    if usec <= 0:
        return None
    return usec / 1_000_000 * WATCHDOG_PING_FRACTION


def listen_socket(env: MutableMapping[str, str] = os.environ) -> socket.socket | None:
    """Take the listening socket systemd passed to this process, if any.

    When ``$LISTEN_PID`` is this process and ``$LISTEN_FDS`` is at least 1, the socket at
    fd 3 is checked to be a listening AF_UNIX SOCK_STREAM socket, set non-blocking and
    close-on-exec, and returned; the caller owns it and closes it. ``LISTEN_PID``,
    ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are then removed from ``env``, so a child process
    does not take them for its own.

    omkd listens on one socket: more than one (two ``ListenStream=``) is refused, as their
    clients would wait on a socket nobody accepts on.

    Returns None when the process was not socket-activated: the variables are unset,
    ``$LISTEN_PID`` names another process (``env`` is then left as it is), or
    ``$LISTEN_FDS`` is 0.

    Raises ValueError, with a message naming what was found, when the variables are not
    integers or fd 3 is not an open, listening Unix stream socket.
    """
    if not env.get("LISTEN_PID") or not env.get("LISTEN_FDS"):
        return None
    if _int_var(env, "LISTEN_PID") != os.getpid():
        return None
    count = _int_var(env, "LISTEN_FDS")
    for name in _LISTEN_VARS:
        env.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        raise ValueError(
            f"systemd passed {count} sockets (LISTEN_FDS={count}): omkd listens on one, so "
            "give its socket unit one ListenStream="
        )
    return _adopt_listener(SD_LISTEN_FDS_START)


def _adopt_listener(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(f"systemd passed LISTEN_FDS but fd {fd} is not open: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"fd {fd} passed by systemd is not a socket (mode {mode:#o})")
    sock = socket.socket(fileno=fd)
    problem = None
    if sock.family != socket.AF_UNIX:
        problem = f"a {getattr(sock.family, 'name', sock.family)} socket, not AF_UNIX"
    elif sock.type != socket.SOCK_STREAM:
        problem = f"a {getattr(sock.type, 'name', sock.type)} socket, not SOCK_STREAM"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "a Unix stream socket that is not listening"
    if problem is not None:
        sock.detach()  # Leave fd 3 to its owner; we only refuse it.
        raise ValueError(
            f"fd {fd} passed by systemd is {problem}: omkd needs ListenStream= on a path"
        )
    sock.setblocking(False)
    sock.set_inheritable(False)
    return sock
