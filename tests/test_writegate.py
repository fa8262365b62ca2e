"""Group commit of single writes from concurrent sessions (omkd.rpc.writegate)."""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from omkd import db
from omkd.rpc import params as P
from omkd.rpc.dispatch import NOT_NOW, DeferredReply
from omkd.rpc.framing import Framing, encode_frame
from omkd.rpc.methods import METHODS
from omkd.rpc.outbox import Outbox
from omkd.rpc.session import Session
from omkd.rpc.writegate import Commit, WriteGate
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, goal, make_config, running_daemon, short_tempdir


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory) as d:
            yield d


async def clients(daemon: Daemon, n: int) -> list[RawClient]:
    """``n`` sessions, connected and idle (waiting in the poller), as clients between calls."""
    cs = [await RawClient.connect(daemon.config.socket_path) for _ in range(n)]
    await trio.testing.wait_all_tasks_blocked()
    return cs


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
    status = await cs[0].call("daemon.status")  # the same counters, for operators
    assert status["single_writes"] == daemon.gate.single_writes
    assert status["single_write_commits"] == daemon.gate.commits
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


def _append_message(goal_id: str, kind: str, request_id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "event.append",
        "params": {"goal_id": goal_id, "kind": kind, "payload": request_id},
    }


def _append_frame(goal_id: str, kind: str, request_id: int) -> bytes:
    message = _append_message(goal_id, kind, request_id)
    return encode_frame(Framing.LENGTH, json.dumps(message).encode())


def _batch_frame(*messages: dict[str, Any]) -> bytes:
    """A JSON-RPC batch: the poller hands it to the connection's own task."""
    return encode_frame(Framing.LENGTH, json.dumps(list(messages)).encode())


@asynccontextmanager
async def grouping_daemon(window: float = 30) -> AsyncIterator[tuple[Daemon, RawClient]]:
    """A daemon whose batches wait as long as a test needs, and a session that has just
    written (goal g1): a write of another session now counts as concurrent, and leads a
    batch."""
    with short_tempdir() as directory:
        async with running_daemon(directory, group_commit_window=window) as daemon:
            # A wake-up preempted past its time budget (a loaded machine) would end before
            # it has served every connection, and leave the commit to trio's idle point.
            daemon.poller.wakeup_budget = 60
            creator = await RawClient.connect(daemon.config.socket_path)
            await creator.call("goal.create", **goal("g1"))
            yield daemon, creator
            await creator.aclose()


def _send(client: RawClient, frame: bytes) -> None:
    """Put a request in the client's socket without letting the daemon run."""
    os.write(client.stream.socket.fileno(), frame)


async def test_writes_that_arrive_together_share_one_commit() -> None:
    async with grouping_daemon() as (daemon, _):
        cs = await clients(daemon, 8)
        before = (daemon.gate.single_writes, daemon.gate.commits, daemon.gate.prompt_commits)
        # Every request is in its socket before the daemon runs again: the poller serves
        # them all in one wake-up, the first write opens a batch and the others join it;
        # then every connection waits in the poller again, and one COMMIT serves all eight,
        # at once (no wait for trio's idle point).
        for n, c in enumerate(cs):
            _send(c, _append_frame("g1", f"w{n}", n))
        replies = [await c.reply() for c in cs]
        assert [r["result"]["kind"] for r in replies] == [f"w{n}" for n in range(8)]
        assert daemon.gate.single_writes - before[0] == 8
        assert daemon.gate.commits - before[1] == 1
        assert daemon.gate.prompt_commits - before[2] == 1
        await close(cs)


async def test_a_group_commit_leaves_nothing_to_the_garbage_collector() -> None:
    # Each batch makes a Commit and a Transaction, and each joiner a DeferredReply and its
    # callback: in a reference cycle, only the collector's passes would free them.
    async with grouping_daemon() as (daemon, _):
        cs = await clients(daemon, 8)
        gc.collect()
        gc.disable()
        try:
            before = daemon.gate.commits
            for n, c in enumerate(cs):
                _send(c, _append_frame("g1", f"w{n}", n))
            replies = [await c.reply() for c in cs]
            for c in cs:  # each session lets go of its batch once it calls again
                assert await c.call("daemon.ping") == "pong"
            gc.set_debug(gc.DEBUG_SAVEALL)  # what is unreachable goes to gc.garbage
            gc.collect()
            ours = (Commit, DeferredReply, db.Transaction)
            left = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert [r["result"]["kind"] for r in replies] == [f"w{n}" for n in range(8)]
        assert daemon.gate.commits - before == 1
        assert left == []
        await close(cs)


async def test_a_batch_waits_for_a_write_from_a_connection_in_its_own_task() -> None:
    async with grouping_daemon() as (daemon, _):
        cs = await clients(daemon, 3)
        before = (daemon.gate.commits, daemon.gate.prompt_commits)
        # The third write comes in a JSON-RPC batch, which the poller hands to the
        # connection's own task: while that task is busy, not every connection waits in the
        # poller, so the open batch waits for trio's idle point, and the write joins it.
        _send(cs[0], _append_frame("g1", "first", 1))
        _send(cs[1], _append_frame("g1", "second", 2))
        _send(cs[2], _batch_frame(_append_message("g1", "third", 3)))
        first, second, third = [await c.reply() for c in cs]
        assert [first["result"]["kind"], second["result"]["kind"]] == ["first", "second"]
        assert third[0]["result"]["kind"] == "third"  # type: ignore[index]
        assert daemon.gate.commits - before[0] == 1
        assert daemon.gate.prompt_commits == before[1]
        await close(cs)


async def test_a_batch_waits_while_a_connection_is_busy_in_its_own_task() -> None:
    async with grouping_daemon() as (daemon, creator):
        await creator.call("goal.create", **goal("big", goal_text="x" * 4_000_000))
        reader, *cs = await clients(daemon, 3)
        # A reply larger than the socket takes, to a client that does not read yet: its
        # connection's task waits to send the rest, outside the poller. It might still
        # write (it may hold more requests), so a batch opened meanwhile is left to the
        # committer, which commits at trio's idle point instead of at once.
        await reader.send(
            {"jsonrpc": "2.0", "id": 1, "method": "goal.get", "params": {"goal_id": "big"}}
        )
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.poller.parked < len(daemon.sessions)
        before = (daemon.gate.commits, daemon.gate.prompt_commits)
        for n, c in enumerate(cs):
            _send(c, _append_frame("g1", f"w{n}", n))
        replies = [await c.reply() for c in cs]
        assert [r["result"]["kind"] for r in replies] == ["w0", "w1"]
        assert daemon.gate.commits - before[0] == 1
        assert daemon.gate.prompt_commits == before[1]
        assert len((await reader.reply())["result"]["goal_text"]) == 4_000_000
        await close([reader, *cs])


async def test_a_batch_does_not_wait_for_tasks_that_are_not_connections() -> None:
    async with grouping_daemon() as (daemon, _):  # (a window of 30 s)
        cs = await clients(daemon, 2)
        before = (daemon.gate.commits, daemon.gate.prompt_commits)
        # Something else keeps the daemon busy: trio's idle point never comes. Once both
        # writes are in and both connections wait in the poller, the batch commits anyway.
        async with never_idle():
            with trio.fail_after(20):
                for n, c in enumerate(cs):
                    _send(c, _append_frame("g1", f"w{n}", n))
                replies = [await c.reply() for c in cs]
        assert [r["result"]["kind"] for r in replies] == ["w0", "w1"]
        assert daemon.gate.commits - before[0] == 1
        assert daemon.gate.prompt_commits - before[1] == 1
        await close(cs)


async def test_a_lone_write_does_not_wait_for_the_window() -> None:
    async with grouping_daemon() as (daemon, creator):
        before = daemon.gate.commits
        async with never_idle():  # a batch waiting for the idle point would wait 30 s
            with trio.fail_after(20):
                for i in range(5):  # only the creator writes: no batch, no wait
                    await creator.call("event.append", goal_id="g1", kind="k", payload=i)
        assert daemon.gate.commits - before == 5


async def test_a_write_does_not_join_a_batch_past_a_transaction_waiting_for_the_gate() -> None:
    async with grouping_daemon() as (daemon, _):
        first, second, holder, last = await clients(daemon, 4)

        async def arrive_while_the_batch_is_open() -> None:
            for _ in range(3):
                await trio.lowlevel.checkpoint()
            await holder.send({"jsonrpc": "2.0", "id": 1, "method": "tx.begin"})  # in line
            for _ in range(3):
                await trio.lowlevel.checkpoint()
            _send(last, _append_frame("g1", "last", 1))

        # Two writes at once: their batch has a joiner, so it stays open until nothing else
        # can run; meanwhile a transaction queues for the gate, then another write arrives.
        _send(first, _append_frame("g1", "first", 1))
        _send(second, _append_frame("g1", "second", 1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(arrive_while_the_batch_is_open)
        assert (await first.reply())["result"]["kind"] == "first"
        assert (await second.reply())["result"]["kind"] == "second"
        assert (await holder.reply())["result"] == {"active": True}
        inside = await holder.call("event.append", goal_id="g1", kind="in tx", payload=0)
        await holder.call("tx.commit")
        after = (await last.reply())["result"]
        # Arrival order: the transaction queued first, so the last write waited for it.
        assert after["event_id"] > inside["event_id"]
        await close([first, second, holder, last])


async def test_a_session_that_never_blocks_delays_a_commit_by_the_window_only() -> None:
    async with grouping_daemon(window=0.01) as (daemon, _):
        cs = await clients(daemon, 2)
        before = daemon.gate.commits
        async with never_idle():
            with trio.fail_after(30):  # without the window, it would wait forever
                for i in range(5):
                    # Two writes at once, each in a JSON-RPC batch (the connections' own
                    # tasks run them): the batch has a joiner, and waits for an idle point
                    # that never comes.
                    for n, c in enumerate(cs):
                        _send(c, _batch_frame(_append_message("g1", f"c{n}", i)))
                    payloads = [(await c.reply())[0]["result"]["payload"] for c in cs]  # type: ignore[index]
                    assert payloads == [i, i]
        assert daemon.gate.commits - before < 10  # batches of two did wait, and committed
        await close(cs)


async def test_a_failing_write_leaves_the_rest_of_its_batch(daemon: Daemon) -> None:
    # A failing goal.create (its savepoint rolled back) and a failing event.append (one
    # statement, undone by SQLite itself) in batches with good appends.
    cs = await clients(daemon, 5)
    await cs[0].call("goal.create", **goal("g1"))
    errors: list[int] = []
    missing: list[int] = []

    async def appender(c: RawClient) -> None:
        for i in range(40):
            await c.call("event.append", goal_id="g1", kind="ok", payload=i)

    async def conflicter(c: RawClient) -> None:
        for _ in range(40):
            errors.append((await c.error("goal.create", **goal("g1")))["code"])

    async def stray(c: RawClient) -> None:
        for i in range(40):
            error = await c.error("event.append", goal_id="nope", kind="k", payload=i)
            missing.append(error["code"])

    async with trio.open_nursery() as nursery:
        for c in cs[:3]:
            nursery.start_soon(appender, c)
        nursery.start_soon(conflicter, cs[3])
        nursery.start_soon(stray, cs[4])
    assert errors == [ErrorCode.CONFLICT] * 40
    assert missing == [ErrorCode.NOT_FOUND] * 40
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
    """Every commit fails: a batch's (its transaction) and a lone write's (its append)."""

    def __init__(self, transaction: Any) -> None:
        self._transaction = transaction

    def transaction(self) -> _CommitFails:
        return _CommitFails(self._transaction())

    @property
    def events(self) -> Any:
        return self

    def append(self, *args: Any, **kwargs: Any) -> Any:
        raise db.StorageFailure("database or disk is full", transaction_lost=True)


# A write that joins another session's batch is answered by the batch's leader once the
# COMMIT is done, while the joiner's own task already waits for its next request.


async def _open_batch(daemon: Daemon) -> tuple[RawClient, RawClient]:
    """Two sessions: the first's write (sent, not yet run) will lead a batch the other's
    writes join when they are in its socket before the daemon runs."""
    leader, joiner = await clients(daemon, 2)
    for c in (leader, joiner):  # both connections served, and waiting for a request
        await c.request("daemon.ping")
    _send(leader, _append_frame("g1", "leader", 1))
    return leader, joiner


def _frame(message: Any) -> bytes:
    return encode_frame(Framing.LENGTH, json.dumps(message).encode())


async def test_a_joiner_sees_its_write_and_gets_its_replies_in_order() -> None:
    async with grouping_daemon() as (daemon, _):
        before = daemon.gate.commits
        leader, joiner = await _open_batch(daemon)
        read = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "event.get_by_goal",
            "params": {"goal_id": "g1"},
        }
        # Pipelined: a write that joins the batch, a read, a message that is not JSON.
        _send(
            joiner,
            _append_frame("g1", "joiner", 2)
            + _frame(read)
            + encode_frame(Framing.LENGTH, b"not json"),
        )
        assert (await leader.reply())["result"]["kind"] == "leader"
        written = await joiner.reply()
        assert written["id"] == 2
        assert written["result"]["kind"] == "joiner"
        listed = await joiner.reply()
        assert listed["id"] == 3
        # Both committed (which of the two led depends on which task trio ran first).
        assert sorted(e["kind"] for e in listed["result"]) == ["joiner", "leader"]
        assert (await joiner.reply())["error"]["code"] == ErrorCode.PARSE_ERROR
        assert daemon.gate.commits - before == 1  # the joiner did join
        await close([leader, joiner])


async def test_joiners_errors_and_notifications_answer_as_on_the_async_path() -> None:
    # Writes that meet an open batch take a synchronous path unless they need the async one
    # (bad params, a notification, a session still waiting for its COMMIT): same answers.
    async with grouping_daemon() as (daemon, creator):
        leader, joiner = await _open_batch(daemon)
        bad_params = {"jsonrpc": "2.0", "id": 2, "method": "event.append", "params": {"x": 1}}
        no_goal = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "event.append",
            "params": {"goal_id": "nope", "kind": "k", "payload": 1},
        }
        notification = {
            "jsonrpc": "2.0",
            "method": "event.append",
            "params": {"goal_id": "g1", "kind": "silent", "payload": 1},
        }
        _send(
            joiner,
            _frame(bad_params)
            + _frame(no_goal)
            + _frame(notification)
            + _append_frame("g1", "joiner", 4),
        )
        assert (await leader.reply())["result"]["kind"] == "leader"
        first = await joiner.reply()
        assert (first["id"], first["error"]["code"]) == (2, ErrorCode.INVALID_PARAMS)
        second = await joiner.reply()
        assert (second["id"], second["error"]["code"]) == (3, ErrorCode.NOT_FOUND)
        last = await joiner.reply()  # nothing for the notification
        assert (last["id"], last["result"]["kind"]) == (4, "joiner")
        events = await creator.call("event.get_by_goal", goal_id="g1")
        assert sorted(e["kind"] for e in events) == ["joiner", "leader", "silent"]
        await close([leader, joiner])


async def test_answer_now_answers_only_what_the_async_path_would_answer_the_same(
    daemon: Daemon,
) -> None:
    # The synchronous path of a request that will not wait, call by call: it answers reads,
    # pings, writes that go alone or join the open batch, and their errors, and leaves
    # everything else (untouched) to handle().
    daemon.db.goals.create(db.GoalRecord(**goal("g1")))
    session = Session(daemon, 99, Outbox(1 << 20), lambda frame: frame)
    other = Session(daemon, 98, Outbox(1 << 20), lambda frame: frame)
    now = daemon.dispatcher.answer_now

    def request(method: str, request_id: int | None = 1, **params: Any) -> bytes:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
        if request_id is not None:
            message["id"] = request_id
        return json.dumps(message).encode()

    def append(goal_id: str, request_id: int | None = 1, **extra: Any) -> bytes:
        return request("event.append", request_id, goal_id=goal_id, kind="k", payload=1, **extra)

    def result(reply: object) -> Any:
        assert isinstance(reply, bytes)
        return json.loads(reply)["result"]

    # A ping, a read, a write alone (nobody else writing): answered at once.
    assert result(now(request("daemon.ping", 3), session)) == "pong"
    assert result(now(request("goal.get", 4, goal_id="g1"), session))["goal_id"] == "g1"
    alone = result(now(append("g1", 5), session))
    assert [e.event_id for e in daemon.db.events.get_by_goal("g1")] == [alone["event_id"]]
    missing = now(append("nope", 6), session)
    assert isinstance(missing, bytes)
    assert (json.loads(missing)["id"], json.loads(missing)["error"]["code"]) == (
        6,
        ErrorCode.NOT_FOUND,
    )
    # Left to handle(): errors of the envelope or params, notifications, batches, session
    # methods that may wait, and a write that would wait for the gate.
    assert now(append("g1", bad=1), session) is NOT_NOW  # -32602 comes from handle()
    assert now(append("g1", None), session) is NOT_NOW  # a notification
    assert now(b"[" + append("g1") + b"]", session) is NOT_NOW  # a JSON-RPC batch
    assert now(b'{"jsonrpc":"2.0","id":1,"method":"tx.begin"}', session) is NOT_NOW
    assert now(request("no.such.method"), session) is NOT_NOW
    daemon.gate._grouping = True  # as batches that had joiners leave it
    daemon.gate._held = True  # as a transaction holding the gate leaves it
    assert now(append("g1", 7), other) is NOT_NOW
    daemon.gate._held = False
    # A write while several sessions write opens a batch; the committer commits it.
    opened = now(append("g1", 7), other)
    assert isinstance(opened, DeferredReply)
    with trio.fail_after(5):
        await opened.commit.done.wait()
    first = json.loads(opened.resolve())["result"]["event_id"]
    assert other.settled()
    daemon.gate._grouping = False
    batch = Commit(daemon.db.transaction())
    daemon.gate._batch = batch  # as a leader gathering joiners leaves it
    try:
        failed = now(append("nope", 7), session)
        assert isinstance(failed, bytes)
        assert json.loads(failed)["error"]["code"] == ErrorCode.NOT_FOUND
        joined = now(append("g1", 8), session)
        assert isinstance(joined, DeferredReply)
        assert session.pending_commit() is batch
        # Until that COMMIT, the session's next call waits: handle() settles it first.
        assert now(append("g1", 9), session) is NOT_NOW
        assert now(request("daemon.ping", 10), session) is NOT_NOW
    finally:
        daemon.gate._batch = None
        daemon.gate._commit(batch)  # (holds no gate: _commit releases what is free anyway)
    reply = json.loads(joined.resolve())
    assert (reply["id"], reply["result"]["kind"]) == (8, "k")
    stored = [e.event_id for e in daemon.db.events.get_by_goal("g1")]
    assert stored == [alone["event_id"], first, reply["result"]["event_id"]]
    assert result(now(request("daemon.ping", 11), session)) == "pong"  # settled now


async def test_a_joiner_that_stops_sending_still_gets_its_reply() -> None:
    async with grouping_daemon() as (daemon, _):
        leader, joiner = await _open_batch(daemon)
        _send(joiner, _append_frame("g1", "joiner", 2))
        joiner.stream.socket.shutdown(socket.SHUT_WR)  # as `socat` does at end of input
        assert (await leader.reply())["result"]["kind"] == "leader"
        assert (await joiner.reply())["result"]["kind"] == "joiner"
        assert await joiner.recv_raw() is None  # then the daemon closes the connection
        await close([leader, joiner])


async def test_a_joiner_that_leaves_before_the_commit_harms_no_one() -> None:
    async with grouping_daemon() as (daemon, creator):
        before = daemon.gate.commits
        leader, joiner = await _open_batch(daemon)
        _send(joiner, _append_frame("g1", "joiner", 2))
        await joiner.aclose()  # its socket may be closed (and its number reused) before the reply
        others = await clients(daemon, 3)  # new connections, new sockets
        assert (await leader.reply())["result"]["kind"] == "leader"
        for n, c in enumerate(others):  # each gets its own reply, nothing of the joiner's
            reply = await c.request(
                "event.append", {"goal_id": "g1", "kind": f"o{n}", "payload": n}
            )
            assert reply["result"]["kind"] == f"o{n}"
        events = await creator.call("event.get_by_goal", goal_id="g1")
        assert sorted(e["kind"] for e in events[:2]) == ["joiner", "leader"]
        assert [e["kind"] for e in events[2:]] == ["o0", "o1", "o2"]
        assert daemon.gate.commits - before >= 1
        await close([leader, *others])


async def test_a_joiner_batch_message_answers_every_element() -> None:
    async with grouping_daemon() as (daemon, _):
        leader, joiner = await _open_batch(daemon)
        elements = [
            {
                "jsonrpc": "2.0",
                "id": n,
                "method": "event.append",
                "params": {"goal_id": "g1", "kind": f"b{n}", "payload": n},
            }
            for n in (10, 11)
        ]
        _send(joiner, _frame(elements))
        assert (await leader.reply())["result"]["kind"] == "leader"
        replies = await joiner.recv()
        assert [(r["id"], r["result"]["kind"]) for r in replies] == [(10, "b10"), (11, "b11")]
        await close([leader, joiner])


async def test_a_joiner_reply_larger_than_the_socket_buffer_arrives_whole() -> None:
    async with grouping_daemon() as (daemon, _):
        leader, joiner = await _open_batch(daemon)
        payload = "p" * (4 << 20)  # more than a Unix socket's buffer: written in parts
        message = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "event.append",
            "params": {"goal_id": "g1", "kind": "big", "payload": payload},
        }
        async with trio.open_nursery() as nursery:  # the request too is larger than the buffer
            nursery.start_soon(joiner.send_bytes, _frame(message))
            assert (await leader.reply())["result"]["kind"] == "leader"
        reply = await joiner.reply()
        assert reply["result"]["payload"] == payload
        await close([leader, joiner])


async def test_writes_that_queued_behind_a_transaction_group_again_once_it_ends() -> None:
    async with grouping_daemon() as (daemon, _):
        holder, *writers = await clients(daemon, 5)
        await holder.call("tx.begin")
        counts: dict[str, int] = {}

        async def writer(c: RawClient, n: int) -> None:
            for i in range(40):
                await c.call("event.append", goal_id="g1", kind=f"w{n}", payload=i)

        async with trio.open_nursery() as nursery:
            for n, c in enumerate(writers):
                nursery.start_soon(writer, c, n)
            await trio.testing.wait_all_tasks_blocked()  # every writer in line for the gate
            counts["before"] = daemon.gate.commits
            await holder.call("tx.commit")
        writes = 4 * 40
        commits = daemon.gate.commits - counts["before"]
        # Writers that found the gate taken lead one batch each; then new writes join
        # batches again (they used to keep queueing behind each other: one COMMIT a write).
        assert commits <= writes // 2
        await close([holder, *writers])


async def test_writes_in_line_behind_a_transaction_commit_together_in_arrival_order() -> None:
    async with grouping_daemon() as (daemon, _):
        holder, *writers = await clients(daemon, 6)
        await holder.call("tx.begin")
        for n, c in enumerate(writers):  # each in line before the next is sent
            _send(c, _append_frame("g1", f"w{n}", n))
            with trio.fail_after(10):
                while len(daemon.gate._line) < n + 1:
                    await trio.sleep(0.001)
        before = daemon.gate.commits  # (a transaction's COMMIT is not counted)
        await holder.call("tx.commit")
        replies = [await c.reply() for c in writers]
        assert [r["result"]["kind"] for r in replies] == [f"w{n}" for n in range(5)]
        assert daemon.gate.commits - before == 1  # one batch: the first led, the rest joined
        ids = [r["result"]["event_id"] for r in replies]
        assert ids == sorted(ids)  # written in the order they came
        await close([holder, *writers])


async def test_single_writes_transactions_and_wal_restarts_together_lose_nothing() -> None:
    # Everything that takes the gate at once: single writes (grouped), transactions that
    # commit or roll back, and the WAL restart holding it in between.
    with short_tempdir() as directory:
        overrides = {"checkpoint_interval": 0.01, "wal_restart_pages": 16}
        async with running_daemon(directory, **overrides) as daemon:
            creator = await RawClient.connect(daemon.config.socket_path)
            await creator.call("goal.create", **goal("g1"))
            acknowledged: list[str] = []
            rolled_back: list[str] = []

            async def single(n: int) -> None:
                c = await RawClient.connect(daemon.config.socket_path)
                for i in range(60):
                    kind = f"s{n}.{i}"
                    await c.call("event.append", goal_id="g1", kind=kind, payload=i)
                    acknowledged.append(kind)
                await c.aclose()

            async def transactional(n: int) -> None:
                c = await RawClient.connect(daemon.config.socket_path)
                for i in range(15):
                    await c.call("tx.begin")
                    kinds = [f"t{n}.{i}.{j}" for j in range(3)]
                    for kind in kinds:
                        await c.call("event.append", goal_id="g1", kind=kind, payload=i)
                    if i % 3 == 2:
                        await c.call("tx.rollback")
                        rolled_back.extend(kinds)
                    else:
                        await c.call("tx.commit")
                        acknowledged.extend(kinds)
                await c.aclose()

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for n in range(6):
                        nursery.start_soon(single, n)
                    for n in range(2):
                        nursery.start_soon(transactional, n)
            events = await creator.call("event.get_by_goal", goal_id="g1", limit=10_000)
            stored = [e["kind"] for e in events]
            assert sorted(stored) == sorted(acknowledged)  # nothing lost, nothing rolled back
            assert not set(stored) & set(rolled_back)
            for n in range(6):  # each session's writes in its own order
                mine = [int(k.split(".")[1]) for k in stored if k.startswith(f"s{n}.")]
                assert mine == list(range(60))
            assert daemon.gate.commits < daemon.gate.single_writes  # they did group
            await creator.aclose()


async def test_a_writer_cancelled_as_its_turn_comes_passes_the_gate_on() -> None:
    with short_tempdir() as directory:
        async with running_daemon(directory, lock_timeout=2) as daemon:
            gate = daemon.gate
            await gate.acquire()
            cancelled = trio.CancelScope()

            async def waiter() -> None:
                with cancelled:
                    await gate.acquire()
                    gate.release()  # not reached: cancelled while in line

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()  # in line
                cancelled.cancel()  # its task is woken with Cancelled...
                gate.release()  # ...and handed the gate before it runs
            with trio.fail_after(1):  # the gate is free again, not held by nobody
                await gate.acquire()
            gate.release()


async def test_a_batch_opened_as_the_committer_stops_is_still_committed() -> None:
    with short_tempdir() as directory:
        config = make_config(directory)
        with db.Database.open(directory / "omk.db") as database:
            database.goals.create(db.GoalRecord(**goal("g1")))
            gate = WriteGate(database, config)
            append = METHODS["event.append"]
            params = P.EventAppend(goal_id="g1", kind="k", payload=1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gate.run_committer)
                await trio.testing.wait_all_tasks_blocked()
                gate._grouping = True  # several sessions write: a write opens a batch
                done = gate.write_now(append, params, object())
                assert done is not None
                event, _, batch = done
                assert batch is not None and not batch.done.is_set()
                nursery.cancel_scope.cancel()  # the daemon stops before the committer runs
            assert batch.done.is_set() and batch.error is None
            assert [e.event_id for e in database.events.get_by_goal("g1")] == [event.event_id]
            # (The committer may have had its turn before the cancellation came, and found
            # no joiner: several sessions write still.)
            gate._grouping = True
            assert gate.write_now(append, params, object()) is None  # no committer: no batch
