"""Group commit of single writes from concurrent sessions (omkd.rpc.writegate)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from omkd import db
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
