"""Helpers for tests that run the daemon (or a client) as a separate process."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = 15.0


def sync_call(
    path: str | Path, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """One request on a fresh connection, length-prefixed; the whole reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        message = {"jsonrpc": "2.0", "method": method, "id": 1, "params": params or {}}
        body = json.dumps(message).encode()
        sock.sendall(struct.pack(">I", len(body)) + body)
        return json.loads(recv_frame(sock))  # type: ignore[no-any-return]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, size)


class DaemonProcess:
    """``python -m omkd serve`` in a subprocess, with its stderr captured to a file."""

    def __init__(
        self,
        directory: Path,
        *args: str,
        env: dict[str, str] | None = None,
        socket_path: Path | None = None,
        db_path: Path | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.socket_path = socket_path or directory / "omkd.sock"
        self.db_path = db_path or directory / "omk.db"
        self.log_path = directory / f"omkd-{time.monotonic_ns()}.log"
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.preexec = preexec  # run in the child before omkd starts
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "omkd",
            "serve",
            "--socket",
            str(self.socket_path),
            "--db",
            str(self.db_path),
            *self.args,
        ]

    def start(self, wait: bool = True) -> DaemonProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stderr=log, stdout=log, env=self.env, preexec_fn=self.preexec
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"omkd exited {self.proc.returncode}: {self.log()}")
            try:
                if sync_call(self.socket_path, "daemon.ping").get("result") == "pong":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"omkd did not answer within {STARTUP_TIMEOUT} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a daemon that should have ended: none left behind
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SyncConnection:
    """A persistent length-prefixed connection, for sessions that span calls."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.next_id = 0

    def request(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        body = json.dumps(
            {"jsonrpc": "2.0", "method": method, "id": self.next_id, "params": params}
        ).encode()
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        return json.loads(recv_frame(self.sock))  # type: ignore[no-any-return]

    def call(self, method: str, **params: Any) -> Any:
        reply = self.request(method, **params)
        assert "result" in reply, reply
        return reply["result"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SyncConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def goal_params(goal_id: str) -> dict[str, Any]:
    return {
        "goal_id": goal_id,
        "status": "active",
        "phase": "plan",
        "goal_text": "t",
        "project_dir": "/p",
    }


# What a daemon or command run by a test must not inherit from whoever runs the tests: where
# omkd finds its database and socket, and systemd's activation and notification variables.
SCRUBBED_ENV = (
    "OMKD_DB",
    "OMKD_SOCKET",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


def controlled_env(home: Path, **variables: Path) -> dict[str, str]:
    """This process's environment less SCRUBBED_ENV, with HOME=``home`` and ``variables``."""
    env = {name: value for name, value in os.environ.items() if name not in SCRUBBED_ENV}
    env["HOME"] = str(home)
    env.update({name: str(value) for name, value in variables.items()})
    return env
