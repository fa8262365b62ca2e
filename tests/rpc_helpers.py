"""Test helpers: an in-process daemon on a short socket path, and a raw JSON-RPC client."""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from omkd.config import Config, load_config
from omkd.rpc.framing import NEED_DATA, FrameDecoder, Framing, encode_frame
from omkd.server import Daemon, run_daemon


@contextmanager
def short_tempdir() -> Iterator[Path]:
    """A directory under /tmp: AF_UNIX paths stop at 107 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="omkd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(directory: Path, **overrides: Any) -> Config:
    fields = {"socket_path": str(directory / "omkd.sock"), "db_path": str(directory / "omk.db")}
    fields.update(overrides)
    return load_config(None, fields, env={})


@asynccontextmanager
async def running_daemon(directory: Path, **overrides: Any) -> AsyncIterator[Daemon]:
    """Run a daemon in this test's trio run; stopped (as by cancellation) on exit."""
    config = make_config(directory, **overrides)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, config)
        yield daemon
        nursery.cancel_scope.cancel()


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['code']}: {error['message']}")
        self.code: int = error["code"]
        self.error = error


class RawClient:
    """A bare client: frames and JSON by hand, so tests see exactly what is on the wire."""

    def __init__(self, stream: trio.SocketStream, framing: Framing = Framing.LENGTH) -> None:
        self.stream = stream
        self.framing = framing
        self.decoder = FrameDecoder(1 << 30)
        self.ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str | Path, framing: Framing = Framing.LENGTH) -> RawClient:
        return cls(await trio.open_unix_socket(str(path)), framing)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, message: Any) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        await self.stream.send_all(encode_frame(self.framing, raw))

    async def recv_raw(self) -> bytes | None:
        """The next frame's bytes; None at end of stream."""
        while True:
            message = self.decoder.next_message()
            if message is not NEED_DATA:
                assert isinstance(message, bytes)
                return message
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            if self.decoder.framing is None:
                self.decoder.framing = self.framing
            self.decoder.receive_data(data)

    async def recv(self) -> Any:
        raw = await self.recv_raw()
        assert raw is not None, "the daemon closed the connection"
        return json.loads(raw)

    async def reply(self) -> dict[str, Any]:
        """The next reply, keeping notifications that come before it."""
        while True:
            message = await self.recv()
            if isinstance(message, dict) and "id" not in message:
                self.notifications.append(message)
                continue
            return message  # type: ignore[no-any-return]

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(self.ids)}
        if params is not None:
            message["params"] = params
        await self.send(message)
        reply = await self.reply()
        assert reply["id"] == message["id"]
        return reply

    async def call(self, method: str, **params: Any) -> Any:
        """The method's result; raises RpcError with the reply's error."""
        reply = await self.request(method, params)
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]

    async def error(self, method: str, **params: Any) -> dict[str, Any]:
        """The error a call answers; fails the test if it succeeds."""
        reply = await self.request(method, params)
        assert "error" in reply, f"{method} succeeded: {reply}"
        return reply["error"]  # type: ignore[no-any-return]

    async def notification(self) -> dict[str, Any]:
        if self.notifications:
            return self.notifications.pop(0)
        message = await self.recv()
        assert "id" not in message, message
        return message  # type: ignore[no-any-return]


def goal(goal_id: str = "g1", **fields: Any) -> dict[str, Any]:
    base = {
        "goal_id": goal_id,
        "status": "active",
        "phase": "plan",
        "goal_text": f"goal {goal_id}",
        "project_dir": "/src/project",
    }
    base.update(fields)
    return base
