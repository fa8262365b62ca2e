"""Long calls run in a worker thread: the other sessions are served meanwhile.

A call that may touch more rows than ``long_call_rows`` (a page of 100,000 events, a batch
of 10,000, goal.delete of whatever the goal holds) would hold the event loop, and with it
every other client, for as long as it runs. These tests hold such a call in its thread (the
method as the daemon has it, run only once the test lets it) and check what the other
sessions get meanwhile; the last ones run real calls down the thread path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from omkd import db
from omkd.rpc.dispatch import NOT_NOW, Dispatcher, _success_pieces, _success_raw
from omkd.rpc.framing import Framing
from omkd.rpc.methods import METHODS, Method
from omkd.rpc.session import Session
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, goal, running_daemon, short_tempdir

WAIT = 10.0  # seconds; only reached when a test is about to fail


class Held:
    """A method of the table that, in whatever thread runs it, waits for ``release``."""

    def __init__(self, name: str, then: Callable[[Any, Any], Any] | None = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        original = METHODS[name]
        after = original.run if then is None else then

        def run(repos: Any, params: Any) -> Any:
            self.threads.append(threading.current_thread())
            self.started.set()
            if not self.release.wait(WAIT):
                raise AssertionError(f"{name} was never released")
            return after(repos, params)

        self.method: Method = dataclasses.replace(original, run=run)

    async def wait_started(self) -> None:
        assert await trio.to_thread.run_sync(self.started.wait, WAIT)


def hold(daemon: Daemon, name: str, then: Callable[[Any, Any], Any] | None = None) -> Held:
    held = Held(name, then)
    methods = dict(daemon.dispatcher.methods, **{name: held.method})
    daemon.dispatcher = Dispatcher(
        methods, turn=trio.lowlevel.checkpoint, long_call_rows=daemon.config.long_call_rows
    )
    return held


_open: list[RawClient] = []


@pytest.fixture
async def directory() -> AsyncIterator[Path]:
    """A directory for a daemon; the clients ``connect`` opened are closed after the test."""
    with short_tempdir() as path:
        yield path
        while _open:
            await _open.pop().aclose()


@pytest.fixture
async def daemon(directory: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(directory, lock_timeout=2.0) as d:
        yield d


@pytest.fixture
def long_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods of the calls that go to ``Session.run_long``, in order."""
    names: list[str] = []
    run_long = Session.run_long

    async def counted(
        session: Session, method: Method, params: Any, decode: Callable[[], Any] | None = None
    ) -> Any:
        names.append(method.name)
        return await run_long(session, method, params, decode)

    monkeypatch.setattr(Session, "run_long", counted)
    return names


async def connect(daemon: Daemon) -> RawClient:
    client = await RawClient.connect(daemon.config.socket_path)
    _open.append(client)
    return client


async def in_background(
    nursery: trio.Nursery, call: Callable[[], Any]
) -> Callable[[], dict[str, Any]]:
    """Start ``call`` (a coroutine function); return what gives its result once done."""
    box: list[dict[str, Any]] = []

    async def run() -> None:
        box.append(await call())

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()

    def result() -> dict[str, Any]:
        assert box, "the call has not answered"
        return box[0]

    return result


async def with_events(client: RawClient, goal_id: str, count: int) -> None:
    await client.call("goal.create", **goal(goal_id))
    events = [{"kind": "k", "payload": i} for i in range(count)]
    await client.call("event.append_batch", goal_id=goal_id, events=events)


async def test_other_sessions_are_served_while_a_goal_delete_runs(daemon: Daemon) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await with_events(a, "big", 10)
    await a.call("goal.create", **goal("other"))
    held = hold(daemon, "goal.delete")
    async with trio.open_nursery() as nursery:
        deleted = await in_background(nursery, lambda: a.request("goal.delete", {"goal_id": "big"}))
        await held.wait_started()
        # Reads, pings and a page of events answer; the delete is not committed yet.
        assert await b.call("daemon.ping") == "pong"
        assert (await b.call("goal.get", goal_id="big"))["goal_id"] == "big"
        assert len(await b.call("event.get_by_goal", goal_id="big", limit=100)) == 10
        assert (await b.call("daemon.status"))["sessions"] == 2
        assert not held.release.is_set()
        held.release.set()
    assert deleted()["result"] == {"deleted": True}
    assert held.threads and held.threads[0] is not threading.main_thread()
    assert await b.call("goal.get", goal_id="big") is None
    assert (await b.call("goal.get", goal_id="other"))["goal_id"] == "other"


async def test_writes_wait_in_line_behind_a_long_write_up_to_the_lock_timeout(
    directory: Path,
) -> None:
    async with running_daemon(directory, lock_timeout=0.3) as daemon:
        a, b, c = [await connect(daemon) for _ in range(3)]
        await with_events(a, "big", 3)
        await a.call("goal.create", **goal("g2"))
        held = hold(daemon, "goal.delete")
        async with trio.open_nursery() as nursery:
            await in_background(nursery, lambda: a.request("goal.delete", {"goal_id": "big"}))
            await held.wait_started()
            # A write waits for the long one, and answers busy past the lock timeout.
            error = await b.error("event.append", goal_id="g2", kind="k", payload=1)
            assert error["code"] == ErrorCode.BUSY
            later = await in_background(
                nursery, lambda: c.request("event.append", {"goal_id": "g2", "kind": "k",
                                                            "payload": 2})
            )  # fmt: skip
            held.release.set()
        assert "result" in later()  # it waited in line, and ran once the delete ended
        payloads = [e["payload"] for e in await b.call("event.get_by_goal", goal_id="g2")]
        assert payloads == [2]


async def test_a_long_call_inside_a_transaction_runs_in_it(daemon: Daemon) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await with_events(a, "big", 5)
    held = hold(daemon, "event.delete_by_goal")
    await a.call("tx.begin")
    await a.call("event.append", goal_id="big", kind="k", payload="in the transaction")
    async with trio.open_nursery() as nursery:
        deleted = await in_background(
            nursery, lambda: a.request("event.delete_by_goal", {"goal_id": "big"})
        )
        await held.wait_started()
        # Another session reads the committed state meanwhile, not the transaction's.
        assert len(await b.call("event.get_by_goal", goal_id="big")) == 5
        held.release.set()
    assert deleted()["result"] == {"deleted": 6}  # the transaction's own append too
    assert await a.call("event.get_by_goal", goal_id="big") == []  # seen inside it
    assert len(await b.call("event.get_by_goal", goal_id="big")) == 5
    await a.call("tx.commit")
    assert await b.call("event.get_by_goal", goal_id="big") == []


async def test_a_connection_closed_during_its_long_call_rolls_back_after_it(
    daemon: Daemon,
) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await with_events(a, "big", 4)
    held = hold(daemon, "event.delete_by_goal")
    await a.call("tx.begin")
    await a.send({"jsonrpc": "2.0", "id": 1, "method": "event.delete_by_goal",
                  "params": {"goal_id": "big"}})  # fmt: skip
    await held.wait_started()
    await a.aclose()  # gone while its call runs in the thread
    await trio.sleep(0.05)
    held.release.set()
    # The call ended, the transaction was rolled back and the write lock passed on.
    with trio.fail_after(WAIT):
        while (await b.call("daemon.status"))["active_transactions"]:
            await trio.sleep(0.01)
    assert len(await b.call("event.get_by_goal", goal_id="big")) == 4
    await b.call("event.append", goal_id="big", kind="k", payload="after")
    assert len(await b.call("event.get_by_goal", goal_id="big")) == 5


async def test_a_long_read_runs_in_a_thread_and_others_read_meanwhile(daemon: Daemon) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await with_events(a, "g1", 3)
    held = hold(daemon, "event.get_by_goal")
    async with trio.open_nursery() as nursery:
        page = await in_background(
            nursery, lambda: a.request("event.get_by_goal", {"goal_id": "g1"})
        )  # no limit: all of the goal's events
        await held.wait_started()
        assert (await b.call("goal.get", goal_id="g1"))["goal_id"] == "g1"
        await b.call("event.append", goal_id="g1", kind="k", payload="meanwhile")
        held.release.set()
    assert len(page()["result"]) == 4  # its read began once released, after the append
    # A page within long_call_rows is answered on the event loop, in no thread.
    short = await b.call("event.get_by_goal", goal_id="g1", limit=2)
    assert [e["payload"] for e in short] == [0, 1]
    assert len(held.threads) == 2 and held.threads[1] is threading.main_thread()


async def test_a_long_read_interrupted_as_the_daemon_stops_ends_quietly(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Stopping, the daemon cancels every connection, then interrupts the reads running in
    # worker threads (Database.interrupt_reads): such a read raises Interrupted, which is
    # the stop going on, not an internal error to log.
    def interrupted(repos: Any, params: Any) -> Any:
        raise db.Interrupted("the statement was interrupted: interrupted")

    async with running_daemon(directory) as daemon:
        held = hold(daemon, "event.get_by_goal", interrupted)
        reader = await connect(daemon)
        await reader.send({"jsonrpc": "2.0", "id": 1, "method": "event.get_by_goal",
                           "params": {"goal_id": "g1"}})  # fmt: skip
        await held.wait_started()
        threading.Timer(0.5, held.release.set).start()  # once the daemon is being stopped
    assert held.release.is_set()
    assert "internal error" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_every_bulk_method_down_the_thread_path(
    directory: Path, long_calls: list[str]
) -> None:
    # long_call_rows 0: every call that has a row count at all runs in a thread.
    async with running_daemon(directory, long_call_rows=0) as daemon:
        a, watcher = await connect(daemon), await connect(daemon)
        await a.call("goal.create", **goal("g1"))
        await watcher.call("event.subscribe", goal_id="g1")
        ids = await a.call("event.append_batch", goal_id="g1", events=_events(3))
        assert len(ids["event_ids"]) == 3
        notified = [(await watcher.notification())["params"]["event"] for _ in range(3)]
        assert [e["payload"] for e in notified] == [0, 1, 2]
        events = await a.call("event.get_by_goal", goal_id="g1", limit=2)
        assert [e["payload"] for e in events] == [0, 1]
        tasks = [{"task_id": f"t{i}", "kind": "code"} for i in range(2)]
        assert await a.call("task.create_batch", goal_id="g1", tasks=tasks) == {"created": 2}
        graph = [{"task_id": "t9", "kind": "code"}]
        assert await a.call("task.update_task_graph", goal_id="g1", tasks=graph) == {"replaced": 1}
        assert [g["goal_id"] for g in await a.call("goal.list")] == ["g1"]
        await a.call("budget.append_checkpoint", goal_id="g1")
        await a.call("artifact.register", goal_id="g1", kind="log", path="/x")
        assert await a.call("budget.delete_by_goal", goal_id="g1") == {"deleted": 1}
        assert await a.call("artifact.delete_by_goal", goal_id="g1") == {"deleted": 1}
        assert await a.call("task.delete_by_goal", goal_id="g1") == {"deleted": 1}
        assert await a.call("event.delete_by_goal", goal_id="g1") == {"deleted": 3}
        error = await a.error("goal.delete", goal_id="nope")
        assert error["code"] == ErrorCode.NOT_FOUND
        assert await a.call("goal.delete", goal_id="g1") == {"deleted": True}
        assert await a.call("goal.list") == []
        assert long_calls == [
            "event.append_batch", "event.get_by_goal", "task.create_batch",
            "task.update_task_graph", "goal.list", "budget.delete_by_goal",
            "artifact.delete_by_goal", "task.delete_by_goal", "event.delete_by_goal",
            "goal.delete", "goal.delete", "goal.list",
        ]  # fmt: skip
        assert daemon.gate.single_writes >= 9


async def test_a_page_past_its_time_limit_on_the_loop_runs_again_in_a_thread(
    directory: Path, long_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page within long_call_rows may still be long in bytes (1,000 events of 15 KB): on
    # the event loop it is stopped past long_call_seconds, then run in a thread; 0 s stops
    # any page of more than a few rows at the first look.
    limited: list[float | None] = []
    run_read = Session.run_read

    def counted(session: Session, method: Method, params: Any, limit: Any = None) -> Any:
        limited.append(limit)
        return run_read(session, method, params, limit)

    monkeypatch.setattr(Session, "run_read", counted)
    async with running_daemon(directory, long_call_seconds=0) as daemon:
        a = await connect(daemon)
        await with_events(a, "g1", 300)
        limited.clear()
        page = await a.call("event.get_by_goal", goal_id="g1", limit=300)
        assert [e["payload"] for e in page] == list(range(300))
        # Stopped once on the loop (answer_now), then run in a thread, not on the loop again.
        assert long_calls == ["event.get_by_goal"] and limited == [0]
        params = {"goal_id": "g1", "after_event_id": 100, "limit": 300}
        await a.send([{"jsonrpc": "2.0", "id": 1, "method": "event.get_by_goal", "params": params}])
        in_a_batch = json.loads(await a.recv_raw() or b"")
        assert [e["payload"] for e in in_a_batch[0]["result"]] == list(range(100, 300))
        assert long_calls == ["event.get_by_goal"] * 2 and limited == [0, 0]
        # A goal's row is no page: no limit. In a transaction a read runs on the transaction.
        assert (await a.call("goal.get", goal_id="g1"))["goal_id"] == "g1"
        await a.call("tx.begin")
        assert len(await a.call("event.get_by_goal", goal_id="g1", limit=300)) == 300
        await a.call("tx.rollback")
        assert long_calls == ["event.get_by_goal"] * 2 and limited == [0, 0, None, 0]


async def test_a_call_with_long_params_runs_in_a_thread(
    directory: Path, long_calls: list[str]
) -> None:
    async with running_daemon(directory, long_call_bytes=1000) as daemon:
        a = await connect(daemon)
        created = await a.call("goal.create", **goal("g1", goal_text="x" * 2000))
        assert created["goal_text"] == "x" * 2000
        await a.call("goal.create", **goal("g2"))  # short: on the event loop
        assert (await a.call("goal.get", goal_id="g1"))["goal_text"] == "x" * 2000
        # Decoded in the thread too: bad params still answer -32602 naming the field.
        bad = goal("g3", goal_text="y" * 2000)
        del bad["project_dir"]
        error = await a.error("goal.create", **bad)
        assert error["code"] == ErrorCode.INVALID_PARAMS
        assert error["data"]["field"] == "project_dir"
        assert error["data"]["method"] == "goal.create"
        assert await a.call("goal.get", goal_id="g3") is None
    assert long_calls == ["goal.create", "goal.create"]


@pytest.mark.parametrize("framing", [Framing.LENGTH, Framing.LINE])
async def test_a_long_reply_goes_out_in_pieces_as_the_same_bytes(
    directory: Path, framing: Framing
) -> None:
    # A result past 1 MiB is written as pieces (the envelope's head, the result, its tail),
    # never copied into one buffer: the client must see the one reply it always saw.
    async with running_daemon(directory) as daemon:
        a = await connect(daemon)
        await a.call("goal.create", **goal("g1"))
        payload = "p" * 1000
        for _ in range(3):
            events = [{"kind": "k", "payload": payload} for _ in range(500)]
            await a.call("event.append_batch", goal_id="g1", events=events)
        reader = await RawClient.connect(daemon.config.socket_path, framing)
        _open.append(reader)
        request = {"jsonrpc": "2.0", "id": "page", "method": "event.get_by_goal",
                   "params": {"goal_id": "g1"}}  # fmt: skip
        await reader.send(request)
        raw = await reader.recv_raw()
        assert raw is not None and len(raw) > 1024 * 1024
        reply = json.loads(raw)
        assert reply["id"] == "page" and len(reply["result"]) == 1500
        assert raw == json.dumps(reply, separators=(",", ":")).encode()  # compact, one message
        paged = []
        for after in (0, 500, 1000):
            paged += await a.call(
                "event.get_by_goal", goal_id="g1", after_event_id=after, limit=500
            )
        assert reply["result"] == paged
        # In a batch, and followed by a short call on the same connection.
        await reader.send([request, {"jsonrpc": "2.0", "id": 2, "method": "daemon.ping"}])
        batch = json.loads(await reader.recv_raw() or b"")
        assert [r["id"] for r in batch] == ["page", 2] and batch[0]["result"] == paged
        await reader.send({"jsonrpc": "2.0", "id": 3, "method": "daemon.ping"})
        assert (await reader.reply())["result"] == "pong"


def test_reply_pieces_are_the_reply() -> None:
    result = msgspec.Raw(b'[{"a":1}]')
    for id in (b"7", b'"x"', b"null"):
        pieces = _success_pieces(result, msgspec.Raw(id))
        assert b"".join(pieces) == _success_raw(result, msgspec.Raw(id))


def _request(method: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


class _Session:
    """Enough of a session for answer_now to tell what it would run now."""

    aborted = False
    long_read_next = False

    def settled(self) -> bool:
        return True

    def run_read(self, method: Method, params: Any, time_limit: float | None = None) -> str:
        return "read now"

    def write_now(self, method: Method, params: Any) -> tuple[str, None]:
        return "written now", None


def _events(count: int) -> list[dict[str, Any]]:
    return [{"kind": "k", "payload": i} for i in range(count)]


@pytest.mark.parametrize(
    ("method", "params", "now"),
    [
        ("event.get_by_goal", {"goal_id": "g", "limit": 1000}, True),
        ("event.get_by_goal", {"goal_id": "g", "limit": 1001}, False),
        ("event.get_by_goal", {"goal_id": "g", "tail": 1001}, False),
        ("event.get_by_goal", {"goal_id": "g"}, False),  # all of the goal's
        ("goal.list", {"limit": 10}, True),
        ("goal.list", {}, False),
        ("goal.get", {"goal_id": "g"}, True),  # a row
        ("event.append_batch", {"goal_id": "g", "events": _events(10)}, True),
        # Over 16 KiB of params: decoded once, on the async path, which tells then.
        ("event.append_batch", {"goal_id": "g", "events": _events(800)}, False),
        ("goal.delete", {"goal_id": "g"}, False),  # whatever the goal holds
        ("task.update_task_graph", {"goal_id": "g", "tasks": []}, False),
        ("task.get_by_goal", {"goal_id": "g"}, False),
        ("budget.get_by_goal", {"goal_id": "g"}, False),
        ("artifact.get_by_goal", {"goal_id": "g"}, False),
        # created_at is in no index: a page filtered by it may scan the goal's whole log.
        ("event.get_by_goal", {"goal_id": "g", "since": 1, "limit": 10}, False),
        ("goal.create", goal("g"), True),
        ("goal.create", goal("g", goal_text="x" * 300_000), False),  # past long_call_bytes
    ],
)
def test_which_calls_answer_now_leaves_to_the_async_path(
    method: str, params: dict[str, Any], now: bool
) -> None:
    dispatcher = Dispatcher(long_call_rows=1000)
    answer = dispatcher.answer_now(_request(method, params), _Session())  # type: ignore[arg-type]
    assert (answer is not NOT_NOW) == now
