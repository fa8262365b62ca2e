"""``omkd serve`` under systemd's protocols, end to end, without systemd as PID 1.

``systemd-socket-activate`` does what ``omkd.socket`` does: it binds the socket, waits for the
first connection, then execs ``omkd serve`` with the socket as fd 3 (so the daemon keeps the
tool's pid). A datagram socket owned by the test stands in for ``$NOTIFY_SOCKET`` and
receives what the daemon tells systemd: ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``.

The tool passes only ``PATH``, ``HOME``, ``USER``, ``TERM`` and the ``-E`` variables to its
command; everything else the daemon needs is given with ``-E``.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proc_helpers import SyncConnection, goal_params, sync_call
from rpc_helpers import short_tempdir

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package: systemd)",
)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20.0
# As systemd would set it for WatchdogSec=0.2s: the daemon pings every 0.1 s.
WATCHDOG_USEC = 200_000
WATCHDOG_WINDOW_S = 1.0


class ActivatedDaemon:
    """``systemd-socket-activate -l SOCK -E NOTIFY_SOCKET=... python -m omkd serve --db DB``.

    Started through ``sh -c 'exec ...'`` so that ``$$``, the shell's pid, is also the pid of
    the tool and of the daemon it execs: ``WATCHDOG_PID`` can then name it as systemd would.
    """

    def __init__(self, directory: Path, *, watchdog: bool = False) -> None:
        self.socket_path = directory / "omkd.sock"
        self.db_path = directory / "omk.db"
        self.log_path = directory / "activate.log"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(directory / "notify"))
        env = {"NOTIFY_SOCKET": str(directory / "notify"), "PYTHONPATH": str(REPO)}
        if watchdog:
            env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        words = ["systemd-socket-activate", "-l", str(self.socket_path)]
        for name, value in env.items():
            words += ["-E", f"{name}={value}"]
        if watchdog:
            words += ["-E", "WATCHDOG_PID=$$"]  # expanded by sh: left unquoted below
        words += [sys.executable, "-m", "omkd", "serve", "--db", str(self.db_path)]
        script = "exec " + " ".join(w if w.endswith("=$$") else shlex.quote(w) for w in words)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["sh", "-c", script], stdout=log, stderr=log)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while "Listening on" not in self.log():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, f"not listening in time: {self.log()}"
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def maybe_receive(self, timeout: float) -> dict[str, str] | None:
        """The next notification as its ``NAME=value`` assignments; None after ``timeout``."""
        self.notify.settimeout(timeout)
        try:
            datagram = self.notify.recv(4096).decode()
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in datagram.split("\n"))

    def receive(self, timeout: float = TIMEOUT_S) -> dict[str, str]:
        """The next notification; fails the test when none comes within ``timeout``."""
        notification = self.maybe_receive(timeout)
        assert notification is not None, f"no notification in {timeout} s: {self.log()}"
        return notification

    def ready(self) -> dict[str, str]:
        """READY=1, past what the start said before it (its check of the database)."""
        notification = self.receive()
        while "READY" not in notification:
            assert set(notification) <= {"STATUS", "EXTEND_TIMEOUT_USEC"}, notification
            notification = self.receive()
        return notification

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tempdir() as directory:
        yield directory


@pytest.fixture
def activated(workdir: Path) -> Iterator[ActivatedDaemon]:
    daemon = ActivatedDaemon(workdir)
    yield daemon
    daemon.close()


@pytest.fixture
def activated_with_watchdog(workdir: Path) -> Iterator[ActivatedDaemon]:
    daemon = ActivatedDaemon(workdir, watchdog=True)
    yield daemon
    daemon.close()


def test_first_connection_starts_daemon_that_answers_and_reports_ready(
    activated: ActivatedDaemon,
) -> None:
    assert not activated.db_path.exists()  # nothing runs until a client connects
    with SyncConnection(activated.socket_path, timeout=TIMEOUT_S) as conn:
        assert conn.call("daemon.ping") == "pong"
        created = conn.call("goal.create", **goal_params("g1"))
        status = conn.call("daemon.status")
    assert created["goal_id"] == "g1" and created["version"] == 1
    assert status["pid"] == activated.proc.pid  # exec'd: the tool's pid is the daemon's
    assert status["socket_path"] == str(activated.socket_path)
    starting = activated.receive()  # the check of the database may take long: said so
    assert starting["STATUS"] == f"checking {activated.db_path} (0 MiB)"
    assert int(starting["EXTEND_TIMEOUT_USEC"]) >= 30_000_000
    ready = activated.receive()
    assert ready == {
        "READY": "1",
        "STATUS": f"serving {activated.db_path}",
        "MAINPID": str(activated.proc.pid),
    }
    # Later clients reach the same daemon through the same socket.
    assert sync_call(activated.socket_path, "goal.get", {"goal_id": "g1"})["result"]["goal_id"]
    assert "Execing" in activated.log()


def test_watchdog_pings_at_half_watchdog_usec(activated_with_watchdog: ActivatedDaemon) -> None:
    daemon = activated_with_watchdog
    with SyncConnection(daemon.socket_path, timeout=TIMEOUT_S) as conn:
        assert daemon.ready()["READY"] == "1"
        environ = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"WATCHDOG_PID={daemon.proc.pid}".encode() in environ  # as systemd sets it
        end = time.monotonic() + WATCHDOG_WINDOW_S
        pings = 0
        while (left := end - time.monotonic()) > 0:
            notification = daemon.maybe_receive(left)
            if notification is None:
                break
            assert notification == {"WATCHDOG": "1"}
            pings += 1
        assert conn.call("daemon.ping") == "pong"
    expected = WATCHDOG_WINDOW_S / (WATCHDOG_USEC / 1_000_000 / 2)
    # A rate check, loose on purpose: about 10 pings in the window on an idle loop.
    assert expected / 2 <= pings <= expected * 1.5, pings


def test_sigterm_notifies_stopping_rolls_back_and_exits_zero(
    activated: ActivatedDaemon,
) -> None:
    with SyncConnection(activated.socket_path, timeout=TIMEOUT_S) as conn:
        conn.call("goal.create", **goal_params("kept"))
        assert activated.ready()["READY"] == "1"
        conn.call("tx.begin")
        conn.call("goal.create", **goal_params("uncommitted"))
        activated.proc.send_signal(signal.SIGTERM)
        assert activated.receive() == {"STOPPING": "1", "STATUS": "shutting down"}
        assert activated.proc.wait(TIMEOUT_S) == 0
        assert conn.sock.recv(1) == b""  # the daemon closed the session on its way out
    log = activated.log()
    assert "received SIGTERM: stopping" in log and "rolling back 1 open transactions" in log
    # The socket belongs to systemd (RemoveOnStop=): the daemon leaves its file alone.
    assert activated.socket_path.is_socket()
    wal = Path(f"{activated.db_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed with TRUNCATE
    with contextlib.closing(sqlite3.connect(activated.db_path)) as db:
        assert db.execute("SELECT goal_id FROM goals").fetchall() == [("kept",)]
