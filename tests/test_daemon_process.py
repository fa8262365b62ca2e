"""The daemon as a process: signals, a second daemon, stale sockets, peers, kills."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from omkd import server
from omkd.db import Database, EventInput, GoalRecord
from omkd.db.database import _DatabaseScope
from omkd.server import serve

from proc_helpers import DaemonProcess, SyncConnection, goal_params, sync_call
from rpc_helpers import make_config, short_tempdir


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tempdir() as directory:
        yield directory


def test_sigterm_rolls_back_checkpoints_and_exits_zero(workdir: Path) -> None:
    daemon = DaemonProcess(workdir).start()
    with SyncConnection(daemon.socket_path) as conn:
        conn.call("goal.create", **goal_params("kept"))
        conn.call("tx.begin")
        conn.call("goal.create", **goal_params("uncommitted"))
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    log = daemon.log()
    assert "received SIGTERM: stopping" in log and "rolling back 1 open transactions" in log
    assert not daemon.socket_path.exists()
    wal = Path(f"{daemon.db_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed with TRUNCATE
    with sqlite3.connect(daemon.db_path) as db:
        assert db.execute("SELECT goal_id FROM goals").fetchall() == [("kept",)]


def test_a_checkpoint_at_shutdown_that_a_reader_holds_back_is_logged(workdir: Path) -> None:
    daemon = DaemonProcess(workdir).start()
    with SyncConnection(daemon.socket_path) as conn:
        conn.call("goal.create", **goal_params("kept"))
    reader = sqlite3.connect(daemon.db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM goals").fetchone()  # holds its snapshot
        with SyncConnection(daemon.socket_path) as conn:
            conn.call("goal.create", **goal_params("later"))  # a frame it cannot truncate
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        reader.close()
    assert "WAL checkpoint at shutdown incomplete" in daemon.log()
    with sqlite3.connect(daemon.db_path) as db:  # nothing lost
        assert db.execute("SELECT count(*) FROM goals").fetchone() == (2,)
    db.close()


def test_sigint_also_stops_cleanly(workdir: Path) -> None:
    daemon = DaemonProcess(workdir).start()
    daemon.signal(signal.SIGINT)
    assert daemon.wait() == 0


def test_second_daemon_refused(workdir: Path) -> None:
    with DaemonProcess(workdir) as first:
        same_socket = DaemonProcess(workdir, db_path=workdir / "other.db").start(wait=False)
        assert same_socket.wait() != 0
        assert "already" in same_socket.log() and str(first.socket_path) in same_socket.log()
        same_db = DaemonProcess(workdir, socket_path=workdir / "other.sock").start(wait=False)
        assert same_db.wait() != 0
        assert f"database {first.db_path}" in same_db.log() and "already" in same_db.log()
        assert sync_call(first.socket_path, "daemon.ping")["result"] == "pong"


def test_second_daemon_refused_on_another_name_of_the_database(workdir: Path) -> None:
    with DaemonProcess(workdir) as first:
        link = workdir / "link.db"
        link.symlink_to(first.db_path)
        through_link = DaemonProcess(workdir, socket_path=workdir / "s2", db_path=link)
        assert through_link.start(wait=False).wait() != 0
        assert f"database {first.db_path} is already in use" in through_link.log()
        assert not Path(f"{link}.lock").exists()
        assert sync_call(first.socket_path, "daemon.ping")["result"] == "pong"
        hard = workdir / "hard.db"  # the same file under a name of its own
        hard.hardlink_to(first.db_path)
        through_hard_link = DaemonProcess(workdir, socket_path=workdir / "s3", db_path=hard)
        assert through_hard_link.start(wait=False).wait() != 0
        assert "a hard link" in through_hard_link.log()
        migrate = subprocess.run(
            [sys.executable, "-m", "omkd", "migrate", "--db", str(hard)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert migrate.returncode != 0 and "a hard link" in migrate.stderr
        assert sync_call(first.socket_path, "daemon.ping")["result"] == "pong"


def test_a_new_database_is_held_by_its_file_once_created(workdir: Path) -> None:
    with DaemonProcess(workdir) as first:  # created the file
        hard = workdir / "hard.db"
        hard.hardlink_to(first.db_path)
        second = DaemonProcess(workdir, socket_path=workdir / "s2", db_path=hard)
        assert second.start(wait=False).wait() != 0
        assert "a hard link" in second.log()
    with DaemonProcess(workdir, socket_path=workdir / "s2", db_path=hard) as after:
        assert sync_call(after.socket_path, "daemon.ping")["result"] == "pong"  # free again
        # ... and a file that existed before the daemon started is held from its start.
        original = DaemonProcess(workdir, socket_path=workdir / "s3").start(wait=False)
        assert original.wait() != 0 and "a hard link" in original.log()


def _tree(directory: Path) -> set[str]:
    """Every path under ``directory`` but the daemons' logs."""
    return {str(p) for p in directory.rglob("*") if not p.name.endswith(".log")}


def test_refused_start_leaves_nothing_behind(workdir: Path) -> None:
    with DaemonProcess(workdir) as first:
        before = _tree(workdir)
        new_db = workdir / "new" / "omk.db"
        same_socket = DaemonProcess(workdir, db_path=new_db).start(wait=False)
        assert same_socket.wait() != 0
        assert f"socket {first.socket_path} is already in use" in same_socket.log()
        new_socket = workdir / "run" / "omkd.sock"
        same_db = DaemonProcess(workdir, socket_path=new_socket).start(wait=False)
        assert same_db.wait() != 0
        assert f"database {first.db_path} is already in use" in same_db.log()
        assert _tree(workdir) == before  # no database, socket, lock file or directory
        assert sync_call(first.socket_path, "daemon.ping")["result"] == "pong"


def test_stale_socket_of_a_killed_daemon_is_replaced(workdir: Path) -> None:
    first = DaemonProcess(workdir).start()
    first.signal(signal.SIGKILL)
    first.wait()
    assert first.socket_path.exists()  # left behind
    with DaemonProcess(workdir) as second:
        assert sync_call(second.socket_path, "daemon.ping")["result"] == "pong"


def test_killed_client_frees_the_write_lock_at_once(workdir: Path) -> None:
    with DaemonProcess(workdir, "--lock-timeout", "30") as daemon:
        script = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from proc_helpers import SyncConnection, goal_params
            conn = SyncConnection({str(daemon.socket_path)!r})
            conn.call("tx.begin")
            conn.call("goal.create", **goal_params("from-killed-client"))
            print("in transaction", flush=True)
            sys.stdin.read()
        """)
        client = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert client.stdout is not None
        assert client.stdout.readline() == b"in transaction\n"
        client.kill()
        client.wait()
        started = time.monotonic()
        with SyncConnection(daemon.socket_path) as conn:
            conn.call("goal.create", **goal_params("after"))
            # Well under the 30 s lock timeout: the lock was freed when the client died.
            assert time.monotonic() - started < 5
            assert conn.call("goal.get", goal_id="from-killed-client") is None
        assert client.stdin is not None
        client.stdin.close()
        client.stdout.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid with setpriv needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_another_uid_is_refused_even_with_loose_modes(workdir: Path) -> None:
    with DaemonProcess(workdir) as daemon:
        os.chmod(workdir, 0o755)
        os.chmod(daemon.socket_path, 0o777)  # someone loosened the modes
        probe = textwrap.dedent(f"""
            import socket, struct, json
            s = socket.socket(socket.AF_UNIX)
            s.connect({str(daemon.socket_path)!r})
            body = json.dumps({{"jsonrpc": "2.0", "method": "daemon.ping", "id": 1}}).encode()
            s.sendall(struct.pack(">I", len(body)) + body)
            print("reply:", s.recv(100))
        """)
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                probe,
            ],
            capture_output=True,
            timeout=30,
            cwd="/",
        )
        out = result.stdout.decode() + result.stderr.decode()
        assert "pong" not in out
        assert "reply: b''" in out or "Connection reset" in out or "Broken pipe" in out, out
        assert "refused a connection from uid 65534" in daemon.log()
        assert sync_call(daemon.socket_path, "daemon.ping")["result"] == "pong"


@pytest.mark.parametrize("page", [1, 100])  # past the header; in the middle of the events
def test_damaged_database_refused_with_advice(workdir: Path, page: int) -> None:
    db_path = workdir / "omk.db"
    with Database.open(db_path) as database:
        database.goals.create(GoalRecord(goal_id="g", status="s", phase="p", goal_text="t",
                                         project_dir="/"))  # fmt: skip
        events = [EventInput(kind="k", payload={"pad": "x" * 200, "i": i}) for i in range(8000)]
        database.events.append_batch("g", events)
    with open(db_path, "r+b") as f:  # clobber pages
        f.seek(page * 4096)
        f.write(os.urandom(20 * 4096))
    broken = DaemonProcess(workdir).start(wait=False)
    assert broken.wait() == 78  # refused: systemd does not restart it (RestartPreventExitStatus)
    log = broken.log()
    assert "is damaged" in log or "is unusable" in log
    assert "omkd check" in log and "backup" in log
    assert "Traceback" not in log


def test_a_directory_named_as_the_database_is_refused_creating_nothing(workdir: Path) -> None:
    target = workdir / "state"
    target.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "omkd", "serve", "--socket", str(workdir / "s.sock"),
         "--db", str(target)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 78
    assert f"database {target} is a directory" in done.stderr and "omkd check" not in done.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["state"]  # no lock, no socket


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root's capabilities with setpriv")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_a_database_file_it_may_not_write_is_refused(workdir: Path) -> None:
    # SQLite would open it read-only: the daemon served reads and failed every write.
    db_path = workdir / "omk.db"
    Database.open(db_path).close()
    db_path.chmod(0o444)
    done = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "omkd",
         "serve", "--socket", str(workdir / "s.sock"), "--db", str(db_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 78
    assert f"cannot open database {db_path} for writing: Permission denied" in done.stderr
    assert not (workdir / "s.sock").exists()


def test_a_watchdog_setting_that_is_no_number_is_one_line_exit_78(workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "omkd", "serve", "--socket", str(workdir / "s.sock"),
         "--db", str(workdir / "omk.db")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "WATCHDOG_USEC": "abc"},
    )  # fmt: skip
    assert done.returncode == 78
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "WATCHDOG_USEC='abc'" in done.stderr


async def test_a_signal_as_the_start_ends_is_never_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    # The start's signal watcher could take a SIGTERM that came as the start ended, and
    # the daemon then served on, deaf to it (9 runs in 20).
    async def started_as_signalled(
        config: object, *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
    ) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        task_status.started("the daemon")
        await trio.sleep_forever()

    monkeypatch.setattr(server, "run_daemon", started_as_signalled)
    monkeypatch.setattr(server, "_notify", lambda send: None)
    for _ in range(20):
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                daemon, stopping = await server._start(nursery, make_config(Path("/x")), signals)
                assert daemon == "the daemon"  # started: the stop is the serve loop's
                if not stopping:  # the signal is left for the serve loop
                    with trio.fail_after(5):
                        assert await signals.__anext__() == signal.SIGTERM
                nursery.cancel_scope.cancel()


def test_too_few_descriptors_at_start_is_no_damage_and_may_be_retried(workdir: Path) -> None:
    # SQLite says "unable to open database file": exit 78 and "restore from a backup" were
    # wrong for what may pass by itself; exit 1 lets systemd start it again.
    def few_descriptors() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (14, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    done = subprocess.run(
        [sys.executable, "-m", "omkd", "serve", "--socket", str(workdir / "s.sock"),
         "--db", str(workdir / "omk.db")],
        capture_output=True, text=True, timeout=60, preexec_fn=few_descriptors,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Too many open files" in done.stderr and "backup" not in done.stderr


ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"


async def test_a_stop_during_the_start_check_ends_it_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The start reads the whole file (quick_check: ~20 s for 1.5 GB with a cold cache); a
    # SIGTERM then waited for it. Here the check never ends unless interrupted.
    checking = threading.Event()

    def endless_check(database: Database) -> list[str]:
        checking.set()
        time.sleep(0.2)  # the stop comes before the statement begins (its interrupt is lost)
        with _DatabaseScope(database).read() as conn:
            conn.scalar(ENDLESS)
        return []

    monkeypatch.setattr(Database, "quick_check", endless_check)
    caplog.set_level(logging.INFO)
    with short_tempdir() as directory:
        config = make_config(directory)

        async def terminate_once_checking() -> None:
            assert await trio.to_thread.run_sync(checking.wait, 10)
            os.kill(os.getpid(), signal.SIGTERM)  # (trio's receiver is open by then)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminate_once_checking)
            with trio.fail_after(10):
                assert await serve(config) == 0
        assert not Path(config.socket_path).exists()
    assert "received SIGTERM while starting: stopping" in caplog.text
    assert "stopped before serving" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_socket_path_too_long(workdir: Path) -> None:
    long_path = workdir / ("x" * 120) / "omkd.sock"
    daemon = DaemonProcess(workdir, socket_path=long_path).start(wait=False)
    assert daemon.wait() != 0
    assert "longer than 107 bytes" in daemon.log()
    assert not daemon.db_path.exists() and not long_path.parent.exists()


def test_unix_socket_peer_check_helper() -> None:
    from omkd.listen import peer_uid

    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(a) == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_socket_directory_of_another_user_is_refused(workdir: Path) -> None:
    foreign = workdir / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    daemon = DaemonProcess(workdir, socket_path=foreign / "omkd.sock").start(wait=False)
    assert daemon.wait() != 0
    assert "belongs to uid 65534" in daemon.log() and "Traceback" not in daemon.log()
    assert list(foreign.iterdir()) == []  # not even a lock file was left in it


def _few_descriptors() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))


def test_running_out_of_descriptors_is_survived_and_logged_once(workdir: Path) -> None:
    daemon = DaemonProcess(workdir, preexec=_few_descriptors).start()
    try:
        clients = []
        for _ in range(60):  # more than the daemon can accept: the rest wait in the backlog
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(daemon.socket_path))
            clients.append(client)
        time.sleep(1.0)  # ~10 retries of accept, 0.1 s apart
        for client in clients:
            client.close()
        deadline = time.monotonic() + 10
        while sync_call(daemon.socket_path, "daemon.ping").get("result") != "pong":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        log = daemon.log()
        assert log.count("accept failed") == 1, log
        assert "accepting connections again, after" in log, log
    finally:
        daemon.stop()
    assert daemon.wait() == 0


def test_a_path_it_cannot_use_is_one_readable_line(workdir: Path) -> None:
    (workdir / "file").write_text("not a directory")
    for socket_path, db_path in (
        (workdir / "file" / "omkd.sock", workdir / "omk.db"),
        (workdir / "omkd.sock", workdir / "file" / "omk.db"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "omkd", "serve", "--socket", str(socket_path),
             "--db", str(db_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 78
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "cannot start: Not a directory" in done.stderr
