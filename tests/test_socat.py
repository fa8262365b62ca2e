"""A real socat session in line mode, as docs/CLIENT.md shows it: a request, a batch and a
notification, typed as JSON lines."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import IO, Any

import pytest

from client_helpers import Daemon, daemon_process, unique

SOCAT = shutil.which("socat")
LINE_TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(
    SOCAT is None, reason="socat is not installed (CI installs it: apt-get install socat)"
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with daemon_process() as d:
        yield d


class Lines:
    """socat's output lines, read by a thread (select cannot see into a text buffer)."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")

    def next(self) -> Any:
        line = self._lines.get(timeout=LINE_TIMEOUT)
        assert line, "socat ended"
        return json.loads(line)


def send(stream: IO[str], message: Any) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def test_socat_session(daemon: Daemon) -> None:
    assert SOCAT is not None
    gid = unique()
    goal = {"goal_id": gid, "status": "running", "phase": "plan", "goal_text": "t",
            "project_dir": "/src"}  # fmt: skip
    command = [SOCAT, "-t", "30", "-", f"UNIX-CONNECT:{daemon.socket_path}"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, bufsize=1) as socat:  # fmt: skip
        assert socat.stdin is not None and socat.stdout is not None
        lines = Lines(socat.stdout)
        send(socat.stdin, {"jsonrpc": "2.0", "method": "daemon.ping", "id": 1})
        assert lines.next() == {"jsonrpc": "2.0", "result": "pong", "id": 1}

        send(socat.stdin, [
            {"jsonrpc": "2.0", "method": "goal.create", "params": goal, "id": "a"},
            {"jsonrpc": "2.0", "method": "goal.get", "params": {"goal_id": gid}, "id": "b"},
            {"jsonrpc": "2.0", "method": "daemon.ping"},
            {"jsonrpc": "2.0", "method": "no.such", "id": "c"},
        ])  # fmt: skip
        batch = lines.next()
        assert [r["id"] for r in batch] == ["a", "b", "c"]
        assert batch[1]["result"]["goal_id"] == gid and batch[2]["error"]["code"] == -32601

        send(socat.stdin, {"jsonrpc": "2.0", "method": "event.subscribe",
                           "params": {"goal_id": gid}, "id": 2})  # fmt: skip
        subscription = lines.next()["result"]["subscription"]
        send(socat.stdin, {"jsonrpc": "2.0", "method": "event.append",
                           "params": {"goal_id": gid, "kind": "typed", "payload": {"by": "hand"}},
                           "id": 3})  # fmt: skip
        messages = [lines.next(), lines.next()]
        reply = next(m for m in messages if m.get("id") == 3)
        notification = next(m for m in messages if "id" not in m)
        assert notification["method"] == "event.appended"
        assert notification["params"]["subscription"] == subscription
        assert notification["params"]["event"] == reply["result"]

        socat.stdin.close()
        assert socat.wait(LINE_TIMEOUT) == 0


def test_socat_a_blank_line_first_and_no_newline_last(daemon: Daemon) -> None:
    assert SOCAT is not None
    command = [SOCAT, "-t", "30", "-", f"UNIX-CONNECT:{daemon.socket_path}"]
    ping = '{"jsonrpc":"2.0","method":"daemon.ping","id":%d}'
    typed = "\n" + ping % 1 + "\n" + ping % 2  # a blank line first, no newline last
    done = subprocess.run(command, input=typed, capture_output=True, text=True, timeout=60)
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert replies == [{"jsonrpc": "2.0", "result": "pong", "id": i} for i in (1, 2)]
