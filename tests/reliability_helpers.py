"""Helpers for tests/test_reliability.py: a daemon with resource limits, a strict client,
writer processes and the ledger they leave behind."""

from __future__ import annotations

import json
import resource
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proc_helpers import DaemonProcess, recv_frame

WRITER = Path(__file__).with_name("reliability_writer.py")


class LimitedDaemon(DaemonProcess):
    """A daemon subprocess started under lowered soft rlimits, optionally with a config file.

    ``limits`` maps an ``resource.RLIMIT_*`` to the soft value to set in the child; the hard
    limit is left alone (these machines cannot raise it back).
    """

    def __init__(
        self,
        directory: Path,
        *args: str,
        limits: dict[int, int] | None = None,
        config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if config:
            config_path = directory / "omkd.toml"
            config_path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
            args = (*args, "--config", str(config_path))
        super().__init__(directory, *args, **kwargs)
        self.limits = limits or {}

    def start(self, wait: bool = True) -> LimitedDaemon:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stderr=log, stdout=log, env=self.env, preexec_fn=self._apply_limits
            )
        if wait:
            self.wait_ready()
        return self

    def _apply_limits(self) -> None:
        for which, soft in self.limits.items():
            _, hard = resource.getrlimit(which)
            resource.setrlimit(which, (soft, hard))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def set_soft_limit(self, which: int, soft: int) -> None:
        """Change the running daemon's soft limit from outside (prlimit(2), same uid)."""
        _, hard = resource.prlimit(self.pid, which)
        resource.prlimit(self.pid, which, (soft, hard))

    def memory_kb(self, key: str = "VmRSS") -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the daemon, in KiB, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} in /proc/{self.pid}/status")


def _toml(value: Any) -> str:
    return json.dumps(value)  # numbers, strings and booleans are written alike


class Garbage(Exception):
    """The daemon sent something that is not a well-formed reply to what was asked."""


class StrictConnection:
    """A length-framed client that checks every reply: JSON, jsonrpc 2.0, the id asked,
    exactly one of result and error. A closed connection raises ConnectionError."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params is not None:
            message["params"] = params
        body = json.dumps(message).encode()
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        return self.next_id

    def receive(self, expected_id: int) -> dict[str, Any]:
        raw = recv_frame(self.sock)
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise Garbage(f"not JSON: {raw[:200]!r}") from exc
        check_reply(reply, expected_id)
        return reply  # type: ignore[no-any-return]

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.receive(self.send(method, params))

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        reply = self.request(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> StrictConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_reply(reply: Any, expected_id: Any = ...) -> None:
    """Raise Garbage unless ``reply`` is one well-formed JSON-RPC 2.0 response."""
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0" or "id" not in reply:
        raise Garbage(f"not a JSON-RPC response: {reply!r:.200}")
    if ("result" in reply) == ("error" in reply) or set(reply) - {
        "jsonrpc",
        "id",
        "result",
        "error",
    }:
        raise Garbage(f"not exactly one of result and error: {reply!r:.200}")
    if expected_id is not ... and reply["id"] != expected_id:
        raise Garbage(f"reply to id {reply['id']!r}, expected {expected_id!r}")
    if "error" in reply:
        error = reply["error"]
        if not (
            isinstance(error, dict)
            and isinstance(error.get("code"), int)
            and isinstance(error.get("message"), str)
        ):
            raise Garbage(f"malformed error object: {error!r:.200}")


def start_writers(
    daemon: DaemonProcess,
    directory: Path,
    modes: Iterable[str],
    *,
    seconds: float = 0.0,
    prefix: str = "",
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start one tests/reliability_writer.py process per mode; each writes its ledger.

    A ``hold`` writer prints "holding" on its stdout (a pipe) once its transaction has writes.
    """
    writers = []
    for number, mode in enumerate(modes):
        ledger = directory / f"ledger-{prefix}{number}-{mode}.txt"
        with open(ledger.with_suffix(".err"), "wb") as errors:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WRITER),
                    str(daemon.socket_path),
                    str(ledger),
                    mode,
                    f"{prefix}w{number}",
                    str(seconds),
                ],
                stdout=subprocess.PIPE if mode == "hold" else subprocess.DEVNULL,
                stderr=errors,
            )
        writers.append((proc, ledger))
    return writers


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def ledger_lines(ledger: Path) -> int:
    try:
        return ledger.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@dataclass
class Ledger:
    """What the writers recorded: acknowledged keys, transactions whose outcome is unknown
    (the commit was sent, no reply came), writes of transactions never committed, errors."""

    acked: set[str] = field(default_factory=set)
    in_doubt: list[set[str]] = field(default_factory=list)
    uncommitted: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    calls: int = 0
    closed: int = 0

    @classmethod
    def read(cls, paths: Iterable[Path]) -> Ledger:
        ledger = cls()
        for path in paths:
            ledger._read_one(path)
        return ledger

    def _read_one(self, path: Path) -> None:
        pending: dict[str, set[str]] = {}  # transaction number -> its keys
        committing: dict[str, set[str]] = {}
        for line in path.read_text().splitlines():
            word, _, rest = line.partition(" ")
            if word == "ack":
                self.acked.add(rest)
            elif word == "tx-write":
                number, key = rest.split(" ", 1)
                pending.setdefault(number, set()).add(key)
            elif word == "commit-sent":
                committing[rest] = pending.pop(rest, set())
            elif word == "commit-acked":
                self.acked |= committing.pop(rest)
            elif word == "commit-failed":
                self.uncommitted |= committing.pop(rest)
            elif word == "error":
                self.errors.append(f"{path.name}: {rest}")
            elif word == "garbage":
                self.garbage.append(f"{path.name}: {rest}")
            elif word == "closed":
                self.closed += 1
            elif word == "calls":
                self.calls += int(rest)
        for keys in pending.values():  # a transaction whose commit was never sent
            self.uncommitted |= keys
        self.in_doubt.extend(committing.values())


def stored_keys(db_path: Path) -> set[str]:
    """Every goal, event and task key in the database file, as the writers name them."""
    with sqlite3.connect(db_path) as db:
        keys = {f"goal:{g}" for (g,) in db.execute("SELECT goal_id FROM goals")}
        keys |= {
            f"event:{u}"
            for (u,) in db.execute("SELECT event_uuid FROM events WHERE event_uuid IS NOT NULL")
        }
        keys |= {f"task:{t}" for (t,) in db.execute("SELECT task_id FROM tasks")}
    return keys


def integrity(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return [row[0] for row in db.execute("PRAGMA integrity_check")]


def check_nothing_lost(ledger: Ledger, db_path: Path) -> set[str]:
    """Assert the ledger's promises against the file; return the stored keys."""
    stored = stored_keys(db_path)
    lost = ledger.acked - stored
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:5]}"
    leaked = ledger.uncommitted & stored
    assert not leaked, f"uncommitted writes stored: {sorted(leaked)[:5]}"
    for keys in ledger.in_doubt:  # unknown outcome, but all or nothing
        assert keys <= stored or not keys & stored, f"half a transaction stored: {keys}"
    assert integrity(db_path) == ["ok"]
    return stored
