"""Group commit of single writes from concurrent sessions (omkd.rpc.writegate)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from omkd import db
from omkd.rpc.framing import Framing, encode_frame
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, goal, running_daemon, short_tempdir


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory) as d:
            yield d


async def clients(daemon: Daemon, n: int) -> list[RawClient]:
    return [await RawClient.connect(daemon.config.socket_path) for _ in range(n)]


async def close(cs: list[RawClient]) -> None:
    for c in cs:
        await c.aclose()


async def test_concurrent_single_writes_commit_together_and_all_land(daemon: Daemon) -> None:
    cs = await clients(daemon, 8)
    await cs[0].call("goal.create", **goal("g1"))
    before = (daemon.gate.single_writes, daemon.gate.commits)

    async def writer(c: RawClient, n: int) -> None:
        for i in range(50):
            await c.call("event.append", goal_id="g1", kind=f"w{n}", payload=i)

    async with trio.open_nursery() as nursery:
        for n, c in enumerate(cs):
            nursery.start_soon(writer, c, n)
    writes = daemon.gate.single_writes - before[0]
    commits = daemon.gate.commits - before[1]
    assert writes == 400
    assert commits < writes  # some commits served several writes
    events = await cs[0].call("event.get_by_goal", goal_id="g1")
    assert len(events) == 400
    for n in range(8):  # each session's writes in its own order
        assert [e["payload"] for e in events if e["kind"] == f"w{n}"] == list(range(50))
    await close(cs)


@asynccontextmanager
async def never_idle() -> AsyncIterator[None]:
    """While the block runs, a task is runnable at every turn: the process is never idle."""
    stop = trio.Event()

    async def spin() -> None:
        while not stop.is_set():
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spin)
        try:
            yield
        finally:
            stop.set()


def _append_frame(goal_id: str, kind: str, request_id: int) -> bytes:
    message = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "event.append",
        "params": {"goal_id": goal_id, "kind": kind, "payload": request_id},
    }
    return encode_frame(Framing.LENGTH, json.dumps(message).encode())


async def test_writes_that_arrive_together_share_one_commit(daemon: Daemon) -> None:
    cs = await clients(daemon, 8)
    await cs[0].call("goal.create", **goal("g1"))
    before = (daemon.gate.single_writes, daemon.gate.commits)
    # Every request is in its socket before the daemon runs again: the first write's batch
    # waits until each of them has run, then one COMMIT serves all eight.
    for n, c in enumerate(cs):
        os.write(c.stream.socket.fileno(), _append_frame("g1", f"w{n}", n))
    replies = [await c.reply() for c in cs]
    assert [r["result"]["kind"] for r in replies] == [f"w{n}" for n in range(8)]
    assert daemon.gate.single_writes - before[0] == 8
    assert daemon.gate.commits - before[1] == 1
    await close(cs)


async def test_once_a_write_joined_the_batch_waits_until_nothing_else_can_run() -> None:
    with short_tempdir() as directory:
        async with running_daemon(directory, group_commit_window=5) as daemon:
            cs = await clients(daemon, 3)
            await cs[0].call("goal.create", **goal("g1"))
            before = daemon.gate.commits

            async def late() -> None:  # keeps the process busy, then sends a third write
                for _ in range(5):
                    await trio.lowlevel.checkpoint()
                os.write(cs[2].stream.socket.fileno(), _append_frame("g1", "late", 3))

            os.write(cs[0].stream.socket.fileno(), _append_frame("g1", "first", 1))
            os.write(cs[1].stream.socket.fileno(), _append_frame("g1", "second", 2))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(late)
            replies = [await c.reply() for c in cs]
            assert [r["result"]["kind"] for r in replies] == ["first", "second", "late"]
            assert daemon.gate.commits - before == 1
            await close(cs)


async def test_a_lone_write_does_not_wait_for_the_window() -> None:
    with short_tempdir() as directory:
        async with running_daemon(directory, group_commit_window=60) as daemon:
            cs = await clients(daemon, 2)  # another session is connected, but not writing
            await cs[0].call("goal.create", **goal("g1"))
            before = daemon.gate.commits
            async with never_idle():
                with trio.fail_after(30):  # each write waiting out the window would take 300 s
                    for i in range(5):
                        await cs[0].call("event.append", goal_id="g1", kind="k", payload=i)
            assert daemon.gate.commits - before == 5
            await close(cs)


async def test_a_write_does_not_join_a_batch_past_a_transaction_waiting_for_the_gate() -> None:
    with short_tempdir() as directory:
        async with running_daemon(directory, group_commit_window=5) as daemon:
            first, holder, last = await clients(daemon, 3)
            await first.call("goal.create", **goal("g1"))
            begin = {"jsonrpc": "2.0", "id": 1, "method": "tx.begin"}

            async def arrive_while_the_batch_is_open() -> None:
                for _ in range(3):
                    await trio.lowlevel.checkpoint()
                await holder.send(begin)  # in line for the gate behind the open batch
                for _ in range(3):
                    await trio.lowlevel.checkpoint()
                os.write(last.stream.socket.fileno(), _append_frame("g1", "last", 1))

            os.write(first.stream.socket.fileno(), _append_frame("g1", "first", 1))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(arrive_while_the_batch_is_open)
            assert (await first.reply())["result"]["kind"] == "first"
            assert (await holder.reply())["result"] == {"active": True}
            inside = await holder.call("event.append", goal_id="g1", kind="in tx", payload=0)
            await holder.call("tx.commit")
            after = (await last.reply())["result"]
            # Arrival order: the transaction queued first, so the last write waited for it.
            assert after["event_id"] > inside["event_id"]
            await close([first, holder, last])


async def test_a_session_that_never_blocks_delays_a_commit_by_the_window_only() -> None:
    with short_tempdir() as directory:
        async with running_daemon(directory, group_commit_window=0.01) as daemon:
            cs = await clients(daemon, 2)
            await cs[0].call("goal.create", **goal("g1"))
            async with never_idle():
                with trio.fail_after(30):  # without the window, it would wait forever
                    for i in range(5):  # two writes at once: the batch has a joiner, and waits
                        for n, c in enumerate(cs):
                            os.write(c.stream.socket.fileno(), _append_frame("g1", f"c{n}", i))
                        assert [(await c.reply())["result"]["payload"] for c in cs] == [i, i]
            assert len(await cs[1].call("event.get_by_goal", goal_id="g1")) == 10
            await close(cs)


async def test_a_failing_write_leaves_the_rest_of_its_batch(daemon: Daemon) -> None:
    cs = await clients(daemon, 4)
    await cs[0].call("goal.create", **goal("g1"))
    errors: list[int] = []

    async def appender(c: RawClient) -> None:
        for i in range(40):
            await c.call("event.append", goal_id="g1", kind="ok", payload=i)

    async def conflicter(c: RawClient) -> None:
        for _ in range(40):
            errors.append((await c.error("goal.create", **goal("g1")))["code"])

    async with trio.open_nursery() as nursery:
        for c in cs[:3]:
            nursery.start_soon(appender, c)
        nursery.start_soon(conflicter, cs[3])
    assert errors == [ErrorCode.CONFLICT] * 40
    assert len(await cs[0].call("event.get_by_goal", goal_id="g1")) == 120
    await close(cs)


class _CommitFails:
    """A transaction whose COMMIT fails as a full disk would: rolled back, StorageFailure."""

    def __init__(self, tx: db.Transaction) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def commit(self) -> None:
        self._tx.rollback()
        raise db.StorageFailure("database or disk is full")


async def test_a_failed_commit_fails_every_write_of_the_batch(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    cs = await clients(daemon, 6)
    await cs[0].call("goal.create", **goal("g1"))
    real = daemon.gate.db.transaction
    monkeypatch.setattr(daemon.gate, "db", _FailingDb(real))
    codes: list[int] = []

    async def writer(c: RawClient, n: int) -> None:
        for i in range(10):
            codes.append((await c.error("event.append", goal_id="g1", kind="k", payload=i))["code"])

    async with trio.open_nursery() as nursery:
        for n, c in enumerate(cs):
            nursery.start_soon(writer, c, n)
    assert codes == [ErrorCode.STORAGE_FAILURE] * 60
    monkeypatch.undo()
    assert await cs[0].call("event.get_by_goal", goal_id="g1") == []
    await cs[0].call("event.append", goal_id="g1", kind="k", payload=1)  # works again
    await close(cs)


class _FailingDb:
    def __init__(self, transaction: Any) -> None:
        self._transaction = transaction

    def transaction(self) -> _CommitFails:
        return _CommitFails(self._transaction())
