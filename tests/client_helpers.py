"""Helpers for the client tests: a daemon in a subprocess, and fake servers that misbehave.

The sync client blocks, so its daemon runs in another process. Fake servers run in threads
and speak length-prefixed frames with a handler deciding each answer: a reply, silence, or
closing the connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omkd_client import GoalRecord

STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh directory under /tmp: AF_UNIX paths stop at 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="omkc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unique(prefix: str = "g") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_goal(goal_id: str | None = None, **fields: Any) -> GoalRecord:
    values: dict[str, Any] = {
        "status": "running",
        "phase": "plan",
        "goal_text": "write the client",
        "project_dir": "/src/project",
    }
    values.update(fields)
    return GoalRecord(goal_id=goal_id or unique(), **values)


def _ping(path: Path) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "method": "daemon.ping", "id": 1}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(struct.pack(">I", len(body)) + body)
            return b"pong" in sock.recv(4096)
    except OSError:
        return False


class Daemon:
    """``python -m omkd serve`` in a subprocess on ``directory``'s socket and database."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.socket_path = directory / "omkd.sock"
        self.db_path = directory / "omk.db"
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "omkd.log"

    def start(self) -> Daemon:
        command = [sys.executable, "-m", "omkd", "serve", "--socket", str(self.socket_path),
                   "--db", str(self.db_path), *self.args]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _ping(self.socket_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"omkd did not start: {self.log_path.read_text()}")
            time.sleep(POLL_INTERVAL)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextlib.contextmanager
def daemon_process(*args: str) -> Iterator[Daemon]:
    """A started daemon in a fresh short directory, stopped and removed afterwards."""
    with short_dir() as directory:
        daemon = Daemon(directory, *args).start()
        try:
            yield daemon
        finally:
            daemon.stop()


# -- fake servers

CLOSE = object()  # a handler's answer: close the connection without replying
SILENT = None  # a handler's answer: never reply

Handler = Callable[[dict[str, Any]], Any]


def frame(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def result(request: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request["id"], "result": value}


class FakeServer:
    """A Unix socket server in a thread; ``handler(request)`` answers each request with a
    message (or a list of messages) to send, ``SILENT`` or ``CLOSE``."""

    def __init__(self, directory: Path, handler: Handler, abstract: str | None = None) -> None:
        # An abstract socket is named as the daemon reports one: "@name".
        self.socket_path = Path(f"@{abstract}") if abstract else directory / "fake.sock"
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(f"\0{abstract}" if abstract else str(self.socket_path))
        self._listener.listen()
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(STOP_TIMEOUT)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while len(buffer) >= 4:
                (size,) = struct.unpack(">I", buffer[:4])
                if len(buffer) < 4 + size:
                    break
                request = json.loads(buffer[4 : 4 + size])
                buffer = buffer[4 + size :]
                self.requests.append(request)
                answer = self.handler(request)
                if answer is CLOSE:
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                messages = answer if isinstance(answer, list) else [answer]
                with contextlib.suppress(OSError):
                    conn.sendall(b"".join(frame(m) for m in messages if m is not None))


@contextlib.contextmanager
def fake_server(handler: Handler, abstract: str | None = None) -> Iterator[FakeServer]:
    """A started FakeServer in a fresh short directory (or on the abstract socket
    ``abstract``)."""
    with short_dir() as directory, FakeServer(directory, handler, abstract) as server:
        yield server


def omkctl(
    *args: str, input: str | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``omkctl`` entry point (as ``python -m omkd_client.cli``)."""
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "omkd_client.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
