"""A writer process for tests/test_reliability.py: writes to omkd and keeps a ledger.

Usage: reliability_writer.py SOCKET LEDGER MODE NAME SECONDS

MODE is ``single`` (goal.create and event.append, each its own transaction), ``tx``
(tx.begin, four writes, tx.commit), ``mixed`` (both, alternating) or ``hold`` (one
transaction left open until the daemon closes the connection; prints "holding" once its
writes are in). SECONDS > 0 stops after that long; 0 runs until the connection closes.

The ledger gets one line per fact, written before the next request is sent:
``ack KEY`` (a write the daemon acknowledged), ``tx-write N KEY`` (sent inside transaction
N), ``commit-sent N``, ``commit-acked N``, ``commit-failed N``, ``error CODE METHOD TEXT``,
``garbage TEXT`` (then exit 3), ``closed REASON``, ``calls N``. Keys are ``goal:ID``,
``event:UUID``, ``task:ID``. Standard library only, so that 32 of these start quickly.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Any, TextIO


class Garbage(Exception):
    pass


class Closed(Exception):
    pass


class Writer:
    def __init__(self, path: str, ledger: TextIO, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.ledger = ledger
        self.name = name
        self.ids = 0
        self.calls = 0

    def note(self, *words: object) -> None:
        self.ledger.write(" ".join(str(w) for w in words) + "\n")

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except OSError as exc:
                raise Closed(f"recv: {exc}") from exc
            if not chunk:
                raise Closed("end of stream" if not data else "end of stream mid-frame")
            data += chunk
        return data

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The reply; raises Closed when the connection ends, Garbage on a malformed reply."""
        self.ids += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.ids}
        if params is not None:
            message["params"] = params
        body = json.dumps(message).encode()
        try:
            self.sock.sendall(struct.pack(">I", len(body)) + body)
        except OSError as exc:
            raise Closed(f"send: {exc}") from exc
        (size,) = struct.unpack(">I", self._recv(4))
        raw = self._recv(size)
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise Garbage(f"not JSON: {raw[:200]!r}") from exc
        if (
            not isinstance(reply, dict)
            or reply.get("jsonrpc") != "2.0"
            or reply.get("id") != self.ids
            or ("result" in reply) == ("error" in reply)
        ):
            raise Garbage(f"bad reply to {method} #{self.ids}: {raw[:200]!r}")
        self.calls += 1
        if "error" in reply:
            error = reply["error"]
            self.note("error", error.get("code"), method, error.get("message"))
        return reply  # type: ignore[no-any-return]

    def write(self, method: str, params: dict[str, Any], key: str) -> None:
        if "result" in self.call(method, params):
            self.note("ack", key)

    # -- what each mode does once

    def own_goal(self) -> str:
        goal_id = f"{self.name}-goal"
        self.write("goal.upsert", goal(goal_id), f"goal:{goal_id}")
        return goal_id

    def single(self, i: int, own: str) -> None:
        uuid = f"{self.name}-e{i}"
        self.write(
            "event.append",
            {"goal_id": own, "kind": "single", "payload": {"i": i}, "event_uuid": uuid},
            f"event:{uuid}",
        )
        gid = f"{self.name}-g{i}"
        self.write("goal.create", goal(gid), f"goal:{gid}")

    def transaction(self, i: int, own: str, *, commit: bool = True) -> None:
        if "error" in self.call("tx.begin"):
            return
        gid, uuid, tid = f"{self.name}-tg{i}", f"{self.name}-te{i}", f"{self.name}-tt{i}"
        writes = [
            ("goal.create", goal(gid), f"goal:{gid}"),
            (
                "event.append",
                {"goal_id": own, "kind": "tx", "payload": {"i": i}, "event_uuid": uuid},
                f"event:{uuid}",
            ),
            (
                "task.create_batch",
                {"goal_id": gid, "tasks": [{"task_id": tid, "kind": "k"}]},
                f"task:{tid}",
            ),
            ("goal.update_status", {"goal_id": gid, "status": "done", "phase": "end"}, None),
        ]
        for method, params, key in writes:
            if key is not None:
                self.note("tx-write", i, key)
            self.call(method, params)
        if not commit:
            return
        self.note("commit-sent", i)
        reply = self.call("tx.commit")
        self.note("commit-acked" if "result" in reply else "commit-failed", i)


def goal(goal_id: str) -> dict[str, Any]:
    return {
        "goal_id": goal_id,
        "status": "active",
        "phase": "plan",
        "goal_text": "t",
        "project_dir": "/p",
    }


def run(writer: Writer, mode: str, seconds: float) -> None:
    own = writer.own_goal()
    if mode == "hold":
        writer.transaction(0, own, commit=False)
        writer.ledger.flush()
        print("holding", flush=True)
        writer._recv(1)  # until the daemon closes the connection
        return
    deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
    i = 0
    while time.monotonic() < deadline:
        i += 1
        if mode == "single" or (mode == "mixed" and i % 2):
            writer.single(i, own)
        else:
            writer.transaction(i, own)


def main() -> int:
    path, ledger_path, mode, name, seconds = sys.argv[1:6]
    with open(ledger_path, "w", buffering=1) as ledger:
        writer = Writer(path, ledger, name)
        try:
            run(writer, mode, float(seconds))
        except Closed as exc:
            writer.note("closed", exc)
        except Garbage as exc:
            writer.note("garbage", exc)
            return 3
        finally:
            writer.note("calls", writer.calls)
            writer.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
