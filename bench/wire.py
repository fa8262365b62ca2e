"""A minimal blocking client for the wire (length-prefixed JSON-RPC), and process helpers.

The raw client is what every omkd and floor measurement goes through when the bundled
client is not named: it encodes with msgspec, frames with a 4-byte big-endian length, and
decodes only the reply's envelope (the result stays raw bytes), so the client's own cost is
the same small amount whichever server answers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import msgspec

PREFIX: Final = struct.Struct(">I")
RECEIVE_BYTES: Final = 256 * 1024
STARTUP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 120.0
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
# See child_env: the variable that pads a subprocess's environment, and by how much a step.
LAYOUT_VARIABLE: Final = "OMKD_BENCH_LAYOUT"
LAYOUT_STEP_BYTES: Final = 7


class RpcError(Exception):
    """The server answered with a JSON-RPC error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error


class _Reply(msgspec.Struct):
    id: Any = None
    result: msgspec.Raw = msgspec.Raw()
    error: dict[str, Any] | None = None


_REPLY: Final = msgspec.json.Decoder(_Reply)
_ENCODER: Final = msgspec.json.Encoder()


def frame(message: Any) -> bytes:
    """Encode ``message`` (bytes are taken as JSON already) as one length-prefixed frame."""
    body = message if isinstance(message, bytes) else _ENCODER.encode(message)
    return PREFIX.pack(len(body)) + body


class RawClient:
    """One connection; ``call`` sends a request and waits for its reply (result as bytes)."""

    def __init__(self, path: str | Path, timeout: float | None = 600.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = bytearray()
        # Reads go into this kept buffer: a recv of RECEIVE_BYTES would allocate 256 KiB a
        # call, which glibc serves with mmap, mremap and munmap (the bundled client's fix).
        self._chunk = bytearray(RECEIVE_BYTES)
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, params: Any = None) -> bytes:
        """Return the framed request (params: a dict, or bytes of a JSON object)."""
        head = b'{"jsonrpc":"2.0","id":%d,"method":"%s"' % (next(self._ids), method.encode())
        if params is None:
            return frame(head + b"}")
        body = params if isinstance(params, bytes) else _ENCODER.encode(params)
        return frame(head + b',"params":' + body + b"}")

    def call(self, method: str, params: Any = None) -> bytes:
        """Send one request; return its result's raw JSON. Raises RpcError."""
        self.sock.sendall(self.request(method, params))
        return self.result(self.receive())

    def call_many(self, calls: list[tuple[str, Any]]) -> list[bytes]:
        """Pipeline: send every request at once, then read the replies in order."""
        self.sock.sendall(b"".join(self.request(m, p) for m, p in calls))
        return [self.result(self.receive()) for _ in calls]

    @staticmethod
    def result(reply: bytes) -> bytes:
        decoded = _REPLY.decode(reply)
        if decoded.error is not None:
            raise RpcError(decoded.error)
        return bytes(decoded.result)

    def receive(self) -> bytes:
        """Return the next frame's body."""
        buffer = self._buffer
        while True:
            if len(buffer) >= PREFIX.size:
                (size,) = PREFIX.unpack_from(buffer)
                end = PREFIX.size + size
                if len(buffer) >= end:
                    body = bytes(buffer[PREFIX.size : end])
                    del buffer[:end]
                    return body
            size = self.sock.recv_into(self._chunk)
            if not size:
                raise ConnectionError("the server closed the connection")
            buffer += memoryview(self._chunk)[:size]


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path | None) -> None:
    """Return once ``path`` accepts a connection; raise if ``proc`` died first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode} before serving: {detail}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing accepted on {path} within {STARTUP_TIMEOUT_S:g} s")


class Server:
    """A server subprocess (the daemon or the floor) on a Unix socket."""

    def __init__(self, argv: list[str], socket_path: Path, log_path: Path) -> None:
        self.argv = argv
        self.socket_path = socket_path
        self.log_path = log_path
        self._start(layout=0)

    def _start(self, layout: int) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
                env=child_env(layout),
            )
        try:
            wait_for_socket(self.socket_path, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def restart(self, layout: int) -> None:
        """Stop the server and start it again, its environment padded for ``layout`` (see
        ``child_env``)."""
        self.stop()
        self._start(layout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """The process's resident set (VmRSS) in KiB."""
        return status_kib(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        """SIGTERM, then wait; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_daemon(
    directory: Path, db_path: Path, name: str = "omkd", config: Path | None = None
) -> Server:
    """``python -m omkd serve`` on ``directory/<name>.sock`` and ``db_path``; with
    ``--config`` ``config``, else ``$OMKD_BENCH_CONFIG`` when that is set (to compare
    settings)."""
    sock = directory / f"{name}.sock"
    argv = [sys.executable, "-m", "omkd", "serve", "--socket", str(sock), "--db", str(db_path)]
    config_file = str(config) if config is not None else os.environ.get("OMKD_BENCH_CONFIG")
    if config_file:
        argv += ["--config", config_file]
    return Server(argv, sock, directory / f"{name}.log")


def start_floor(directory: Path) -> Server:
    """The floor server (bench/floor.py) on ``directory/floor.sock``."""
    sock = directory / "floor.sock"
    return Server([sys.executable, "-m", "bench.floor", str(sock)], sock, directory / "floor.log")


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_env(layout: int = 0) -> dict[str, str]:
    """The environment for subprocesses: this checkout (and its client) first on the path.

    ``layout`` pads the environment by ``layout * LAYOUT_STEP_BYTES`` bytes. The bytes of a
    process's arguments and environment shift its memory layout, and on these machines that
    once decided whole runs: in some layouts the clients' ``recv`` of 256 KiB got a fresh
    mmap every call (glibc's mmap threshold), and 8 writers reached the floor at 23,000
    instead of 32,000 calls/s (bench/README.md). Repetitions started with different padding
    show an effect of that kind as spread instead of drawing one layout for the whole run.
    """
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "client"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    if layout:
        env[LAYOUT_VARIABLE] = "x" * (layout * LAYOUT_STEP_BYTES)
    return env
