"""systemd integration without the daemon: notify, watchdog, socket activation, unit files.

Sockets live under short mkdtemp(dir="/tmp") paths: pytest's tmp_path can pass the 107-byte
AF_UNIX limit. Socket activation runs in a child process, which owns its fd 3; this process's
fd 3 is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omkd import cli, systemd, units
from omkd.config import load_config

REPO = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 20.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="omk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its address."""
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(CHILD_TIMEOUT_S)
    yield sock, path
    sock.close()


# --- notify -------------------------------------------------------------------------------


def test_notify_sends_exact_datagram_to_path(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_notify_sends_to_abstract_socket() -> None:
    name = f"omkd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(CHILD_TIMEOUT_S)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_notify_without_notify_socket_returns_false(env: dict[str, str]) -> None:
    assert systemd.notify("READY=1", env=env) is False
    assert systemd.notify_ready(env=env) is False
    assert systemd.notify_watchdog(env=env) is False


def test_notify_to_missing_socket_raises(short_dir: Path) -> None:
    with pytest.raises(OSError):
        systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(short_dir / "absent")})


def test_notify_refuses_relative_address() -> None:
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        systemd.notify("READY=1", env={"NOTIFY_SOCKET": "relative/sock"})


def test_notify_helpers_send_documented_states(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path}
    pid = os.getpid()

    systemd.notify_ready("serving /x\nwith a newline", env=env)
    assert sock.recv(4096) == f"READY=1\nSTATUS=serving /x with a newline\nMAINPID={pid}".encode()
    systemd.notify_status("3 sessions", env=env)
    assert sock.recv(4096) == b"STATUS=3 sessions"
    systemd.notify_watchdog(env=env)
    assert sock.recv(4096) == b"WATCHDOG=1"
    systemd.notify_stopping(env=env)
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=shutting down"

    systemd.notify_reloading(env=env)
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0
    systemd.notify_starting("checking /x (1,500 MiB)", extend=67.5, env=env)
    assert sock.recv(4096) == b"STATUS=checking /x (1,500 MiB)\nEXTEND_TIMEOUT_USEC=67500000"


# --- watchdog -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, 0.5),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env) == expected


@pytest.mark.parametrize(
    "env", [{"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}]
)
def test_watchdog_interval_refuses_garbage(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="not an integer"):
        systemd.watchdog_interval(env)


# --- socket activation, in this process: only the cases that never touch fd 3 -------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": str(os.getpid())},
        {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"},
    ],
)
def test_listen_socket_not_activated(env: dict[str, str]) -> None:
    before = dict(env)
    assert systemd.listen_socket(env) is None
    assert env == before


def test_listen_socket_zero_fds_clears_environment() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": "", "X": "1"}
    assert systemd.listen_socket(env) is None
    assert env == {"X": "1"}


def test_listen_socket_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="LISTEN_PID"):
        systemd.listen_socket({"LISTEN_PID": "self", "LISTEN_FDS": "1"})


# --- socket activation, in a child whose fd 3 we set up ------------------------------------

# Puts fd SOURCE at 3, sets the variables as systemd would for this process, then reports
# what listen_socket() made of it as one JSON line.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    source, count = int(sys.argv[1]), sys.argv[2]
    if source >= 0:
        os.dup2(source, 3)
        os.close(source)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=count, LISTEN_FDNAMES="omkd")
    from omkd import systemd
    try:
        sock = systemd.listen_socket()
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}))
        raise SystemExit(0)
    print(json.dumps({
        "fileno": sock.fileno(),
        "blocking": sock.getblocking(),
        "inheritable": sock.get_inheritable(),
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }))
    """
)


def run_child(source: int, count: str = "1") -> dict[str, Any]:
    pass_fds = (source,) if source >= 0 else ()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), count],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_listen_socket_takes_listening_unix_socket(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(short_dir / "s"))
        listener.listen()
        result = run_child(listener.fileno())
    assert result == {"fileno": 3, "blocking": False, "inheritable": False, "env": []}


def test_listen_socket_refuses_several_sockets(short_dir: Path) -> None:
    # omkd accepts on one: the clients of a second would wait on a socket nobody accepts on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(short_dir / "s"))
        listener.listen()
        result = run_child(listener.fileno(), count="2")
    assert "passed 2 sockets" in result["error"] and "one ListenStream=" in result["error"]


def test_ready_and_stopping_wait_for_room_in_a_full_queue(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        env = {"NOTIFY_SOCKET": path}
        with pytest.raises(BlockingIOError):  # fill systemd's queue
            for _ in range(100_000):
                systemd.notify("STATUS=filler", env=env)
        with pytest.raises(BlockingIOError):
            systemd.notify_watchdog(env=env)  # a ping never waits
        threading.Timer(0.2, lambda: receiver.recv(4096)).start()  # room, a moment later
        assert systemd.notify_ready("serving", env=env)
        received = []
        receiver.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(receiver.recv(4096))
        assert received[-1].startswith(b"READY=1\n")


def test_listen_socket_refuses_socket_not_listening(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(short_dir / "s"))
        result = run_child(bound.fileno())
    assert "not listening" in result["error"]


def test_listen_socket_refuses_datagram_socket(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        dgram.bind(str(short_dir / "s"))
        result = run_child(dgram.fileno())
    assert "SOCK_DGRAM" in result["error"]


def test_listen_socket_refuses_tcp_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        result = run_child(tcp.fileno())
    assert "AF_INET" in result["error"]


def test_listen_socket_refuses_non_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        result = run_child(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "not a socket" in result["error"]


def test_listen_socket_refuses_closed_fd() -> None:
    result = run_child(-1)
    assert "not open" in result["error"]


# --- socket activation through systemd's own tool -------------------------------------------

# Run by systemd-socket-activate on the first connection: takes fd 3, reports readiness,
# then answers that connection with what it found.
ACTIVATED = textwrap.dedent(
    """
    import json, os
    from omkd import systemd
    listener = systemd.listen_socket()
    systemd.notify_ready("test")
    listener.setblocking(True)
    conn, _ = listener.accept()
    conn.sendall(json.dumps({"pid": os.getpid(), "fileno": listener.fileno()}).encode())
    conn.close()
    """
)


def read_line_within(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "systemd-socket-activate did not report its socket in time"
    line: str = stream.readline()
    return line


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package: systemd)",
)
def test_systemd_socket_activate_passes_socket_and_gets_ready(
    short_dir: Path, receiver: tuple[socket.socket, str]
) -> None:
    notify_sock, notify_path = receiver
    sock_path = str(short_dir / "omkd.sock")
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            sock_path,
            "-E",
            f"NOTIFY_SOCKET={notify_path}",
            "-E",
            f"PYTHONPATH={REPO}",
            sys.executable,
            "-c",
            ACTIVATED,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "Listening on" in read_line_within(proc.stderr, CHILD_TIMEOUT_S)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(CHILD_TIMEOUT_S)
            client.connect(sock_path)
            ready = notify_sock.recv(4096).decode()
            reply = json.loads(client.recv(4096))
        assert reply["fileno"] == 3
        assert ready == f"READY=1\nSTATUS=test\nMAINPID={reply['pid']}"
        assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# --- unit files -------------------------------------------------------------------------------


def service_line(text: str, key: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(key + "=")]


def test_render_units_sets_absolute_exec_start() -> None:
    rendered = units.render_units("/opt/omk/bin/omkd", ["--lock-timeout", "5"])
    assert set(rendered) == {"omkd.socket", "omkd.service"}
    service = rendered["omkd.service"]
    assert service_line(service, "ExecStart") == [
        "ExecStart=/opt/omk/bin/omkd serve --db %S/omk/omk.db --lock-timeout 5"
    ]
    assert service_line(service, "StateDirectory") == ["StateDirectory=omk"]
    assert service_line(service, "Type") == ["Type=notify"]
    assert "ListenStream=%t/omk/omkd.sock" in rendered["omkd.socket"]


def test_render_units_with_db_path_uses_read_write_paths() -> None:
    rendered = units.render_units(
        ["/usr/bin/python3", "-m", "omkd"], db_path="/home/a b/100%/omk/omk.db"
    )
    service = rendered["omkd.service"]
    assert service_line(service, "ExecStart") == [
        'ExecStart=/usr/bin/python3 -m omkd serve --db "/home/a b/100%%/omk/omk.db"'
    ]
    assert service_line(service, "ReadWritePaths") == ['ReadWritePaths="/home/a b/100%%/omk"']
    assert not service_line(service, "StateDirectory")
    assert not service_line(service, "StateDirectoryMode")


@pytest.mark.parametrize(
    ("exec_path", "db_path"),
    [("omkd", None), ([], None), ("/bin/omkd", "omk.db"), ("/bin/omk\nd", None)],
)
def test_render_units_refuses_bad_paths(exec_path: str | list[str], db_path: str | None) -> None:
    with pytest.raises(ValueError):
        units.render_units(exec_path, db_path=db_path)


def test_install_units_writes_units_and_db_dir(tmp_path: Path) -> None:
    db = tmp_path / "state" / "omk" / "omk.db"
    written = units.install_units(tmp_path / "user", db_path=db)
    assert written == [tmp_path / "user" / "omkd.socket", tmp_path / "user" / "omkd.service"]
    service = written[1].read_text()
    [exec_start] = service_line(service, "ExecStart")
    assert exec_start.startswith("ExecStart=" + units.omkd_command()[0] + " ")
    assert os.path.isabs(units.omkd_command()[0])
    assert f"--db {db}" in exec_start
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(written[0].stat().st_mode) == 0o644
    assert not list((tmp_path / "user").glob(".*.tmp"))


def test_install_units_defaults_follow_xdg(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    written = units.install_units(env=env)
    assert written[0].parent == tmp_path / "config" / "systemd" / "user"
    assert (tmp_path / "state" / "omk").is_dir()
    [exec_start] = service_line(written[1].read_text(), "ExecStart")
    assert exec_start.endswith(f" serve --db {tmp_path / 'state' / 'omk' / 'omk.db'}")


def test_install_units_default_db_is_the_one_serve_uses(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "OMKD_DB": str(tmp_path / "srv" / "x.db")}
    written = units.install_units(tmp_path / "user", env=env)
    [exec_start] = service_line(written[1].read_text(), "ExecStart")
    assert exec_start.endswith(f" --db {load_config(env=env).db_path}")
    assert (tmp_path / "srv").is_dir()


# --- omkd install-units -----------------------------------------------------------------------


def exec_start_words(service: Path) -> list[str]:
    [line] = service_line(service.read_text(), "ExecStart")
    return shlex.split(line.removeprefix("ExecStart="))


def test_cli_install_units_uses_the_database_serve_finds(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OMKD_DB", str(short_dir / "state" / "omk.db"))
    assert cli.main(["install-units", "--dest", str(short_dir / "user")]) == 0
    words = exec_start_words(short_dir / "user" / "omkd.service")
    assert words[words.index("--db") + 1] == load_config().db_path
    assert f"wrote {short_dir / 'user' / 'omkd.service'}" in capsys.readouterr().out


def test_cli_install_units_writes_absolute_exec_start_and_prints_commands(
    short_dir: Path,
) -> None:
    dest, db = short_dir / "user", short_dir / "state" / "omk.db"
    proc = subprocess.run(
        [sys.executable, "-m", "omkd", "install-units", "--dest", str(dest), "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["omkd.service", "omkd.socket"]
    words = exec_start_words(dest / "omkd.service")
    assert os.path.isabs(words[0]) and os.access(words[0], os.X_OK), words
    assert words[words.index("serve") :] == ["serve", "--db", str(db)]
    for command in [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now omkd.socket",
        "systemctl --user status omkd",
        "journalctl --user -u omkd",
    ]:
        assert command in proc.stdout.splitlines()
    if shutil.which("systemd-analyze") is not None:
        verify([dest / name for name in units.UNIT_NAMES], short_dir)


def test_cli_install_units_refuses_a_path_no_unit_can_hold_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["install-units", "--dest", str(tmp_path), "--db", "/srv/a\nb/omk.db"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "newline" in err
    assert not list(tmp_path.iterdir())


def test_a_database_under_tmp_gets_a_warning_at_install() -> None:
    for path in ("/tmp/omk.db", "/var/tmp/x/omk.db"):
        warning = units.private_tmp_warning(path)
        assert warning is not None and "PrivateTmp=yes" in warning
    assert units.private_tmp_warning("/home/u/.local/state/omk/omk.db") is None
    assert units.private_tmp_warning("/tmpfoo/omk.db") is None


def test_enable_instructions() -> None:
    text = units.enable_instructions()
    assert "systemctl --user daemon-reload" in text
    assert "systemctl --user enable --now omkd.socket" in text
    assert "journalctl --user -u omkd" in text


def test_modules_do_not_import_trio() -> None:
    code = "import sys; sys.modules['trio'] = None; import omkd.systemd, omkd.units"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=CHILD_TIMEOUT_S)


# --- systemd-analyze verify -----------------------------------------------------------------

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def verify(paths: list[Path], runtime_dir: Path, home: Path | None = None) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    if home is not None:
        env["HOME"] = str(home)
    proc = subprocess.run(
        ["systemd-analyze", "--user", "verify", *map(str, paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "omkd" not in proc.stderr, proc.stderr  # No warnings about our units either.


@needs_analyze
def test_installed_units_pass_systemd_analyze_verify(short_dir: Path) -> None:
    written = units.install_units(short_dir / "user", db_path=short_dir / "state" / "omk.db")
    verify(written, short_dir)


@needs_analyze
def test_shipped_units_pass_systemd_analyze_verify(short_dir: Path) -> None:
    # %h/.local/bin/omkd must exist and be executable for verify to accept ExecStart.
    home = short_dir / "home"
    script = home / ".local" / "bin" / "omkd"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    verify([REPO / "systemd" / name for name in units.UNIT_NAMES], short_dir, home)
