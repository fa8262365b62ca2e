"""Sessions and transactions (contract, section 5), over real sockets in one trio run."""

from __future__ import annotations

import copy
import json
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from omkd import db
from omkd.db.goals import GoalRepository
from omkd.rpc import session as session_module
from omkd.rpc.framing import Framing, encode_frame
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, RpcError, goal, running_daemon, short_tempdir

_open: list[RawClient] = []


async def close_clients() -> None:
    while _open:
        await _open.pop().aclose()


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory, lock_timeout=0.2, tx_idle_timeout=0.6) as d:
            yield d
            await close_clients()


async def connect(daemon: Daemon) -> RawClient:
    client = await RawClient.connect(daemon.config.socket_path)
    _open.append(client)
    return client


async def test_commit_makes_writes_visible(daemon: Daemon) -> None:
    a, b = await connect(daemon), await connect(daemon)
    assert await a.call("tx.begin") == {"active": True}
    await a.call("goal.create", **goal("g1"))
    await a.call("event.append", goal_id="g1", kind="k", payload=1)
    # Inside the transaction, the session sees its own writes; nobody else does, and
    # reading does not wait for the transaction.
    assert (await a.call("goal.get", goal_id="g1"))["goal_id"] == "g1"
    with trio.fail_after(0.15):  # under the lock timeout: reads never queue
        assert await b.call("goal.get", goal_id="g1") is None
        assert await b.call("event.get_by_goal", goal_id="g1") == []
    status = await b.call("daemon.status")
    assert status["active_transactions"] == 1 and status["sessions"] == 2
    assert await a.call("tx.commit") == {"committed": True}
    assert (await b.call("goal.get", goal_id="g1"))["goal_id"] == "g1"
    assert len(await b.call("event.get_by_goal", goal_id="g1")) == 1


async def test_rollback_discards(daemon: Daemon) -> None:
    a = await connect(daemon)
    await a.call("tx.begin")
    await a.call("goal.create", **goal("g1"))
    assert await a.call("tx.rollback") == {"rolled_back": True}
    assert await a.call("goal.get", goal_id="g1") is None


async def test_transaction_state_errors(daemon: Daemon) -> None:
    a = await connect(daemon)
    for method in ("tx.commit", "tx.rollback"):
        error = await a.error(method)
        assert error["code"] == ErrorCode.NO_TRANSACTION
        assert error["data"] == {"method": method}
    await a.call("tx.begin")
    assert (await a.error("tx.begin"))["code"] == ErrorCode.TRANSACTION_ACTIVE
    await a.call("tx.rollback")


async def test_failed_call_keeps_the_transaction(daemon: Daemon) -> None:
    a = await connect(daemon)
    await a.call("tx.begin")
    await a.call("goal.create", **goal("g1"))
    assert (await a.error("goal.create", **goal("g1")))["code"] == ErrorCode.CONFLICT
    tasks = [{"task_id": "t1", "kind": "k"}, {"task_id": "t1", "kind": "k"}]
    assert (await a.error("task.create_batch", goal_id="g1", tasks=tasks))["code"] == (
        ErrorCode.CONFLICT
    )
    await a.call("event.append", goal_id="g1", kind="k", payload=1)
    await a.call("tx.commit")
    assert await a.call("task.get", task_id="t1") is None  # the failed batch left nothing
    assert len(await a.call("event.get_by_goal", goal_id="g1")) == 1


async def test_writers_queue_behind_a_transaction_in_order(daemon: Daemon) -> None:
    owner = await connect(daemon)
    await owner.call("goal.create", **goal("g1"))
    await owner.call("tx.begin")
    await owner.call("event.append", goal_id="g1", kind="tx", payload=0)
    order: list[int] = []

    async def writer(i: int) -> None:
        c = await connect(daemon)
        await c.call("event.append", goal_id="g1", kind="queued", payload=i)
        order.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(writer, i)
            await trio.sleep(0.02)  # arrive in a known order
        await trio.sleep(0.1)
        assert order == []  # all still waiting for the transaction
        await owner.call("tx.commit")
    assert sorted(order) == [0, 1, 2]  # replies that come together are read in any order
    events = await owner.call("event.get_by_goal", goal_id="g1")
    assert [e["payload"] for e in events] == [0, 0, 1, 2]  # written in arrival order


async def test_lock_timeout_answers_busy(daemon: Daemon) -> None:
    owner, other = await connect(daemon), await connect(daemon)
    await owner.call("goal.create", **goal("g1"))
    await owner.call("tx.begin")
    error = await other.error("event.append", goal_id="g1", kind="k", payload=1)
    assert error["code"] == ErrorCode.BUSY
    assert error["data"]["lock_timeout_s"] == 0.2
    assert (await other.error("tx.begin"))["code"] == ErrorCode.BUSY
    await owner.call("tx.commit")
    await other.call("event.append", goal_id="g1", kind="k", payload=1)


async def test_disconnect_rolls_back_and_frees_the_lock(daemon: Daemon) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await a.call("tx.begin")
    await a.call("goal.create", **goal("g1"))
    await a.aclose()
    await b.call("goal.create", **goal("g2"))  # not busy: the lock was freed at once
    assert await b.call("goal.get", goal_id="g1") is None


async def test_idle_abort_then_recovery(daemon: Daemon) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await a.call("tx.begin")
    await a.call("goal.create", **goal("g1"))
    await trio.sleep(1.0)  # past the 0.6 s idle timeout
    # The lock is free for others, and the idle transaction's write is gone.
    await b.call("goal.create", **goal("g2"))
    assert await b.call("goal.get", goal_id="g1") is None
    error = await a.error("goal.get", goal_id="g2")
    assert error["code"] == ErrorCode.TRANSACTION_ABORTED
    assert await a.call("daemon.ping") == "pong"  # daemon.* still answer
    assert (await a.error("tx.begin"))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert (await a.error("no.such"))["code"] == ErrorCode.TRANSACTION_ABORTED  # every call
    assert await a.call("tx.rollback") == {"rolled_back": True}
    assert (await a.call("goal.get", goal_id="g2"))["goal_id"] == "g2"
    assert (await a.error("no.such"))["code"] == ErrorCode.METHOD_NOT_FOUND


async def test_bytes_of_an_unfinished_message_do_not_keep_a_transaction_alive(
    daemon: Daemon,
) -> None:
    # Idle is counted from the last whole message: a client trickling the bytes of one it
    # never finishes does not hold the write lock past the idle timeout.
    a, b = await connect(daemon), await connect(daemon)
    await a.call("tx.begin")
    await a.call("goal.create", **goal("g1"))
    frame = encode_frame(
        Framing.LENGTH, json.dumps({"jsonrpc": "2.0", "id": 9, "method": "daemon.ping"}).encode()
    )
    start = trio.current_time()
    for byte in frame[:12]:  # one byte every 0.1 s for 1.2 s, twice the idle timeout
        await a.send_bytes(bytes([byte]))
        await trio.sleep(0.1)
    assert trio.current_time() - start >= 1.2
    with trio.fail_after(0.15):  # under the lock timeout: the write lock is free
        await b.call("goal.create", **goal("g2"))
    assert await b.call("goal.get", goal_id="g1") is None  # rolled back
    await a.send_bytes(frame[12:])  # the message, finished, is answered as usual
    assert await a.recv() == {"jsonrpc": "2.0", "id": 9, "result": "pong"}
    assert (await a.error("goal.get", goal_id="g2"))["code"] == ErrorCode.TRANSACTION_ABORTED


async def test_commit_after_idle_abort_answers_aborted_and_ends_it(daemon: Daemon) -> None:
    a = await connect(daemon)
    await a.call("tx.begin")
    await trio.sleep(1.0)
    assert (await a.error("tx.commit"))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert await a.call("goal.list") == []  # the session is usable again


def lose_the_transaction_in_goal_get(self: GoalRepository, goal_id: str) -> None:
    """goal.get as it fails when SQLite rolls the whole transaction back on a read (an I/O
    error while reading a page): the transaction is gone before the error surfaces."""
    with self._scope.read() as conn:
        conn.raw.execute("ROLLBACK")
        raise db.StorageFailure("storage failure: disk I/O error")


@pytest.mark.parametrize("end", ["tx.rollback", "tx.commit"])
async def test_read_that_loses_the_transaction_aborts_the_session(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    a, b = await connect(daemon), await connect(daemon)
    await a.call("goal.create", **goal("g1"))
    await a.call("tx.begin")
    await a.call("goal.create", **goal("in-tx"))
    with monkeypatch.context() as patch:
        patch.setattr(GoalRepository, "get", lose_the_transaction_in_goal_get)
        error = await a.error("goal.get", goal_id="g1")
    assert error["code"] == ErrorCode.STORAGE_FAILURE
    assert error["data"]["transaction_lost"] is True
    # The session is aborted, whatever the call...
    for method, params in [("goal.get", {"goal_id": "g1"}), ("goal.list", {})]:
        assert (await a.error(method, **params))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert (await a.error("tx.begin"))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert await a.call("daemon.ping") == "pong"
    # ...and the write lock is free for others at once (not busy after the lock timeout).
    with trio.fail_after(0.15):
        await b.call("goal.create", **goal("g2"))
        assert await b.call("goal.get", goal_id="in-tx") is None
        assert (await b.call("daemon.status"))["active_transactions"] == 0
    if end == "tx.rollback":
        assert await a.call("tx.rollback") == {"rolled_back": True}
    else:
        assert (await a.error("tx.commit"))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert (await a.call("goal.get", goal_id="g2"))["goal_id"] == "g2"
    assert (await a.error("tx.commit"))["code"] == ErrorCode.NO_TRANSACTION  # it has ended
    await a.call("tx.begin")  # and the session can open a new one
    await a.call("tx.rollback")


async def test_subscription_sees_only_committed_events(daemon: Daemon) -> None:
    sub, writer = await connect(daemon), await connect(daemon)
    await writer.call("goal.create", **goal("g1"))
    sid = (await sub.call("event.subscribe", goal_id="g1"))["subscription"]
    await writer.call("tx.begin")
    await writer.call("event.append", goal_id="g1", kind="rolled-back", payload=1)
    await writer.call("tx.rollback")
    await writer.call("tx.begin")
    committed = await writer.call("event.append", goal_id="g1", kind="committed", payload=2)
    await writer.call("tx.commit")
    with trio.fail_after(2):
        note = await sub.notification()
    assert note["method"] == "event.appended"
    assert note["params"]["subscription"] == sid
    assert note["params"]["event"] == committed
    await writer.call("event.append", goal_id="g1", kind="single", payload=3)
    with trio.fail_after(2):
        assert (await sub.notification())["params"]["event"]["kind"] == "single"


async def test_subscription_backlog_goal_filter_and_unsubscribe(daemon: Daemon) -> None:
    sub, writer = await connect(daemon), await connect(daemon)
    for g in ("g1", "g2"):
        await writer.call("goal.create", **goal(g))
    first = await writer.call("event.append", goal_id="g1", kind="a", payload=1)
    await writer.call("event.append", goal_id="g2", kind="b", payload=2)
    await writer.call("event.append", goal_id="g1", kind="c", payload=3)
    sid = (await sub.call("event.subscribe", goal_id="g1", after_event_id=0))["subscription"]
    with trio.fail_after(2):
        kinds = [(await sub.notification())["params"]["event"]["kind"] for _ in range(2)]
    assert kinds == ["a", "c"]
    everything = await sub.call("event.subscribe", after_event_id=first["event_id"])
    with trio.fail_after(2):
        notes = [await sub.notification() for _ in range(2)]
    assert [n["params"]["event"]["kind"] for n in notes] == ["b", "c"]
    assert {n["params"]["subscription"] for n in notes} == {everything["subscription"]}
    assert await sub.call("event.unsubscribe", subscription=sid) == {"unsubscribed": True}
    assert (await sub.error("event.unsubscribe", subscription=sid))["code"] == (ErrorCode.NOT_FOUND)


async def test_nothing_of_a_subscription_comes_after_its_unsubscribe_reply(
    daemon: Daemon,
) -> None:
    sub, writer = await connect(daemon), await connect(daemon)
    await writer.call("goal.create", **goal("g1"))
    events = [{"kind": "k", "payload": i} for i in range(3000)]
    await writer.call("event.append_batch", goal_id="g1", events=events)
    subscribe = _requests(("event.subscribe", {"goal_id": "g1", "after_event_id": 0}))
    for started in (False, True):
        if started:  # the backlog is going out already
            await sub.send_bytes(subscribe)
            sid = (await sub.reply())["result"]["subscription"]
            await sub.notification()
            unsubscribe = ("event.unsubscribe", {"subscription": sid})
            await sub.send_bytes(_requests(unsubscribe, ("daemon.ping", {}), first=2))
        else:  # subscribe, unsubscribe and ping read at once, the subscription's id foreseen
            sid = next(copy.copy(session_module._subscription_ids))
            unsubscribe = ("event.unsubscribe", {"subscription": sid})
            await sub.send_bytes(subscribe + _requests(unsubscribe, ("daemon.ping", {}), first=2))
        replies: list[dict[str, object]] = []
        with trio.fail_after(5):
            while not replies or replies[-1]["id"] != 4:
                message = await sub.recv()
                if "id" not in message:
                    assert len(replies) < 2, "a notification after the unsubscribe reply"
                    continue
                replies.append(message)
                if message["id"] == 3:  # the feeder might run once the daemon has no more
                    await sub.send_bytes(_requests(("daemon.ping", {}), first=4))
        assert [r.get("result") for r in replies[-3:]] == [{"unsubscribed": True}, "pong", "pong"]
        sub.notifications.clear()


async def test_a_backlog_goes_out_a_page_at_a_time_others_served_between() -> None:
    # A subscriber replaying 200,000 events held every other client up to 300 ms: the
    # feeder filled the whole outbox (4 MiB) in one step of the event loop. (These 10,000
    # notifications fit in it.)
    with short_tempdir() as directory:
        async with running_daemon(directory, page_size=20) as daemon:
            sub, other = await connect(daemon), await connect(daemon)
            await other.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": i} for i in range(10_000)]
            last = (await other.call("event.append_batch", goal_id="g1", events=events))[
                "event_ids"
            ][-1]
            await sub.call("event.subscribe", goal_id="g1", after_event_id=0)
            assert await other.call("daemon.ping") == "pong"
            (subscription,) = [s for s in daemon.sessions if s._subscriptions]
            (fed,) = subscription._subscriptions.values()
            assert 0 < fed.cursor < last  # the ping was answered in the middle of the backlog
            with trio.fail_after(10):
                assert [(await sub.notification())["params"]["event"]["payload"]
                        for _ in range(10_000)] == list(range(10_000))  # fmt: skip
            await close_clients()


def _requests(*calls: tuple[str, dict[str, object]], first: int = 1) -> bytes:
    """Frames of requests (ids from ``first``), to send at once: the daemon reads them
    together."""
    return b"".join(
        encode_frame(
            Framing.LENGTH,
            json.dumps({"jsonrpc": "2.0", "id": i, "method": m, "params": p}).encode(),
        )
        for i, (m, p) in enumerate(calls, first)
    )


async def _replies(client: RawClient, count: int) -> list[dict[str, object]]:
    with trio.fail_after(5):
        return [await client.reply() for _ in range(count)]


async def _appended(client: RawClient, count: int) -> list[object]:
    """The payloads of the next ``count`` notifications, which must be event.appended."""
    payloads = []
    with trio.fail_after(5):
        for _ in range(count):
            note = await client.notification()
            assert note["method"] == "event.appended", note
            payloads.append(note["params"]["event"]["payload"])
    return payloads


async def test_events_deleted_before_a_subscription_sent_them_are_sent_first() -> None:
    # A subscription still sending its backlog (a page a turn), and events of another goal
    # appended, then deleted: they were never sent, nor was anything said. (Seen too with
    # an append and a delete read together: the delete committed before the feeder read.)
    with short_tempdir() as directory:
        async with running_daemon(directory, page_size=20) as daemon:
            sub, writer = await connect(daemon), await connect(daemon)
            for g in ("g1", "g2", "g3"):
                await writer.call("goal.create", **goal(g))
            backlog = [{"kind": "k", "payload": i} for i in range(3000)]
            await writer.call("event.append_batch", goal_id="g2", events=backlog)
            await sub.call("event.subscribe", after_event_id=0)  # all goals
            await writer.send_bytes(
                _requests(
                    ("event.append", {"goal_id": "g1", "kind": "k", "payload": "a"}),
                    ("event.append", {"goal_id": "g2", "kind": "k", "payload": "b"}),
                    ("event.delete_by_goal", {"goal_id": "g1"}),
                    ("event.append", {"goal_id": "g3", "kind": "k", "payload": "c"}),
                    ("goal.delete", {"goal_id": "g3"}),  # its events with it
                )
            )
            replies = await _replies(writer, 5)
            assert [r["result"] for r in replies[2::2]] == [{"deleted": 1}, {"deleted": True}]
            assert await _appended(sub, 3003) == [*range(3000), "a", "b", "c"]
            await close_clients()


async def test_events_a_transaction_appended_and_deleted_are_never_sent(daemon: Daemon) -> None:
    sub, writer = await connect(daemon), await connect(daemon)
    await writer.call("goal.create", **goal("g1"))
    await sub.call("event.subscribe", goal_id="g1")
    await writer.send_bytes(
        _requests(
            ("event.append", {"goal_id": "g1", "kind": "k", "payload": "committed"}),
            ("tx.begin", {}),
            ("event.append", {"goal_id": "g1", "kind": "k", "payload": "deleted in its tx"}),
            ("event.delete_by_goal", {"goal_id": "g1"}),
            ("tx.commit", {}),
            ("event.append", {"goal_id": "g1", "kind": "k", "payload": "last"}),
        )
    )
    replies = await _replies(writer, 6)
    assert replies[3]["result"] == {"deleted": 2} and replies[4]["result"] == {"committed": True}
    assert await _appended(sub, 2) == ["committed", "last"]


async def test_a_subscription_opened_in_the_deleting_transaction_gets_its_backlog(
    daemon: Daemon,
) -> None:
    # Its feeder starts once the replies before it are out: after the commit, here. The
    # events are gone by then; they wait for it in the subscription.
    sub, writer = await connect(daemon), await connect(daemon)
    await writer.call("goal.create", **goal("g1"))
    events = [{"kind": "k", "payload": i} for i in range(5)]
    await writer.call("event.append_batch", goal_id="g1", events=events)
    await sub.send_bytes(
        _requests(
            ("tx.begin", {}),
            ("event.subscribe", {"goal_id": "g1", "after_event_id": 0}),
            ("event.delete_by_goal", {"goal_id": "g1"}),
            ("tx.commit", {}),
        )
    )
    replies = await _replies(sub, 4)
    assert replies[2]["result"] == {"deleted": 5} and replies[3]["result"] == {"committed": True}
    assert await _appended(sub, 5) == list(range(5))
    assert await writer.call("event.get_by_goal", goal_id="g1") == []


async def test_a_subscriber_too_far_behind_a_deletion_is_told_what_it_missed() -> None:
    # It does not read: its outbox is full. The events it has not been sent are deleted:
    # it is sent what fits, then closed with a reason, never left with a silent gap.
    with short_tempdir() as directory:
        async with running_daemon(directory, outbox_bytes=16 * 1024) as daemon:
            sub, writer = await connect(daemon), await connect(daemon)
            await writer.call("goal.create", **goal("g1"))
            sid = (await sub.call("event.subscribe", goal_id="g1"))["subscription"]
            events = [{"kind": "k", "payload": {"n": i, "pad": "p" * 500}} for i in range(2000)]
            for start in range(0, 2000, 200):
                await writer.call("event.append_batch", goal_id="g1", events=events[start:][:200])
            await trio.testing.wait_all_tasks_blocked()  # the feeder waits for room
            assert await writer.call("event.delete_by_goal", goal_id="g1") == {"deleted": 2000}
            received: list[int] = []
            with trio.fail_after(10):
                while True:
                    note = await sub.notification()
                    if note["method"] != "event.appended":
                        break
                    received.append(note["params"]["event"]["payload"]["n"])
            assert note["method"] == "event.subscription_closed"
            assert note["params"]["subscription"] == sid
            reason = note["params"]["reason"]
            assert "deleted before this subscription could send them" in reason
            assert 0 < len(received) < 2000 and received == list(range(len(received)))
            assert f"after_event_id={received[-1] + 1}" in reason  # (event ids from 1)
            assert await sub.call("daemon.ping") == "pong"
            await close_clients()


async def test_events_held_for_a_subscription_go_out_first_and_never_after_its_end(
    daemon: Daemon,
) -> None:
    # What a deletion held for a subscription whose reply was not out yet went out when its
    # feeder first ran: after the events a second deletion queued meanwhile (6..10, 1..5),
    # after its close notice, after its unsubscribe reply.
    sub, writer = await connect(daemon), await connect(daemon)
    for g in ("g1", "g2"):
        await writer.call("goal.create", **goal(g))
        batch = [{"kind": "k", "payload": f"{g}.{i}"} for i in range(5)]
        await writer.call("event.append_batch", goal_id=g, events=batch)
    await sub.send_bytes(
        _requests(
            ("event.subscribe", {"after_event_id": 0}),
            ("event.delete_by_goal", {"goal_id": "g1"}),
        )
        + _requests(("event.delete_by_goal", {"goal_id": "g2"}))
    )
    with trio.fail_after(5):
        messages = [await sub.recv() for _ in range(13)]  # 3 replies, 10 notifications
    payloads = [m["params"]["event"]["payload"] for m in messages if "id" not in m]
    assert payloads == [f"g{g}.{i}" for g in (1, 2) for i in range(5)]
    assert next(m for m in messages if "id" in m)["id"] == 1  # the subscribe reply first
    # Subscribed with a deletion in one batch, unsubscribed in the next message: the held
    # events go out with the batch's reply, nothing after the unsubscribe reply.
    other = await connect(daemon)
    await writer.call("event.append_batch", goal_id="g1",
                      events=[{"kind": "k", "payload": i} for i in range(3)])  # fmt: skip
    sid = next(copy.copy(session_module._subscription_ids))
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "event.subscribe",
         "params": {"goal_id": "g1", "after_event_id": 0}},
        {"jsonrpc": "2.0", "id": 2, "method": "event.delete_by_goal", "params": {"goal_id": "g1"}},
    ]  # fmt: skip
    await other.send_bytes(
        encode_frame(Framing.LENGTH, json.dumps(batch).encode())
        + _requests(("event.unsubscribe", {"subscription": sid}), ("daemon.ping", {}))
    )
    with trio.fail_after(5):
        received = [await other.recv() for _ in range(5)]  # batch reply, 3 events, a reply
        after = []
        while not (after and after[-1].get("result") == "pong"):
            after.append(await other.recv())
    kinds = ["reply" if isinstance(m, list) or "id" in m else m["method"] for m in received]
    assert kinds == ["reply", "event.appended", "event.appended", "event.appended", "reply"]
    assert received[4]["result"] == {"unsubscribed": True}
    assert [m.get("result") for m in after] == ["pong"]  # nothing of it after the reply


async def test_what_a_deletion_holds_is_bounded_for_the_whole_session() -> None:
    # Each subscription held up to twice the outbox's bound: a batch of 40 subscribes and
    # a deletion took 240 MB. The bound is the session's.
    with short_tempdir() as directory:
        async with running_daemon(directory, outbox_bytes=16 * 1024) as daemon:
            sub, writer = await connect(daemon), await connect(daemon)
            await writer.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": "p" * 180} for _ in range(80)]  # ~20 KB of them
            await writer.call("event.append_batch", goal_id="g1", events=events)
            subscribe = ("event.subscribe", {"goal_id": "g1", "after_event_id": 0})
            await sub.send_bytes(
                _requests(("tx.begin", {}), *[subscribe] * 5,
                          ("event.delete_by_goal", {"goal_id": "g1"}), ("tx.commit", {}))
            )  # fmt: skip
            with trio.fail_after(10):
                replies = await _replies(sub, 8)
            assert replies[6]["result"] == {"deleted": 80}
            first = replies[1]["result"]["subscription"]
            with trio.fail_after(10):  # 80 events for the first, a notice for each other
                notes = [await sub.notification() for _ in range(84)]
            closed = [n["params"] for n in notes if n["method"] == "event.subscription_closed"]
            assert sorted(c["subscription"] for c in closed) == [
                r["result"]["subscription"] for r in replies[2:6]
            ]  # (the first holds ~20 KB; with a second, past 32 KB)
            assert all("deleted before this subscription could send" in c["reason"] for c in closed)
            appended = [n for n in notes if n["method"] == "event.appended"]
            assert [n["params"]["subscription"] for n in appended] == [first] * 80
            await close_clients()


async def test_a_deletion_with_subscriptions_behind_lets_the_others_be_served() -> None:
    # It read and queued their events in one step of the event loop: with 10 subscribers
    # behind by a goal of 200,000 events, a ping waited 1.1 s. It goes a page at a time.
    config = {"page_size": 20, "outbox_bytes": 512 * 1024}
    with short_tempdir() as directory:
        async with running_daemon(directory, **config) as daemon:
            sub, writer, other = await connect(daemon), await connect(daemon), await connect(daemon)
            await writer.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": i} for i in range(5000)]
            last = (await writer.call("event.append_batch", goal_id="g1", events=events))[
                "event_ids"
            ][-1]
            await sub.call("event.subscribe", goal_id="g1", after_event_id=0)  # never read
            await trio.testing.wait_all_tasks_blocked()  # its feeder waits for room
            (session,) = [s for s in daemon.sessions if s.subscribing]
            (fed,) = session._subscriptions.values()
            stalled = fed.cursor
            assert 0 < stalled < last
            await writer.send_bytes(_requests(("event.delete_by_goal", {"goal_id": "g1"})))
            with trio.fail_after(10):
                while fed.cursor == stalled:
                    await trio.sleep(0)
            assert stalled < fed.cursor < last  # this task ran while the deletion queued them
            assert await other.call("daemon.ping") == "pong"
            # Writes too: most of the queueing is done before the write gate is taken.
            await other.call("goal.create", **goal("g2"))
            assert await other.call("event.append", goal_id="g2", kind="k", payload=0)
            assert fed.cursor < last
            assert (await writer.reply())["result"] == {"deleted": 5000}
            assert fed.cursor == last and session._subscriptions  # all queued, not cut off
            await close_clients()


async def _appended_then(client: RawClient, sid: int, until_id: int) -> list[dict[str, object]]:
    """The notifications of subscription ``sid`` until the reply ``until_id`` (a ping)."""
    await client.send({"jsonrpc": "2.0", "id": until_id, "method": "daemon.ping"})
    notes = []
    with trio.fail_after(10):
        while True:
            message = await client.recv()
            if message.get("id") == until_id:
                return notes
            if "id" not in message and message["params"]["subscription"] == sid:
                notes.append(message)


@pytest.mark.parametrize("where", ["paged send", "transaction"])
async def test_a_subscription_made_during_a_deletion_gets_its_events_or_is_told(
    where: str,
) -> None:
    # Made while the deletion queued the events of the subscriptions behind a page at a
    # time (or, in a transaction, between the deletion and the COMMIT), with a backlog: it
    # was in no list, and lost what the deletion removed before its feeder read it, silently.
    config = {"page_size": 20, "outbox_bytes": 256 * 1024}
    with short_tempdir() as directory:
        async with running_daemon(directory, **config) as daemon:
            lag, writer, late = await connect(daemon), await connect(daemon), await connect(daemon)
            await writer.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": {"n": i, "pad": "p" * 300}} for i in range(4000)]
            for start in range(0, 4000, 500):
                await writer.call("event.append_batch", goal_id="g1", events=events[start:][:500])
            await lag.call("event.subscribe", goal_id="g1", after_event_id=0)  # never read
            await trio.testing.wait_all_tasks_blocked()
            (session,) = [s for s in daemon.sessions if s.subscribing]
            (fed,) = session._subscriptions.values()
            stalled = fed.cursor
            if where == "transaction":
                await writer.call("tx.begin")
                assert await writer.call("event.delete_by_goal", goal_id="g1") == {"deleted": 4000}
            else:
                await writer.send_bytes(_requests(("event.delete_by_goal", {"goal_id": "g1"})))
                with trio.fail_after(10):
                    while fed.cursor == stalled:
                        await trio.sleep(0)  # the deletion is queueing, a page a turn
            sid = (await late.call("event.subscribe", goal_id="g1", after_event_id=0))[
                "subscription"
            ]
            if where == "transaction":
                assert await writer.call("tx.commit") == {"committed": True}
            else:
                assert (await writer.reply())["result"] == {"deleted": 4000}
            notes = await _appended_then(late, sid, 99)
            got = [n["params"]["event"]["payload"]["n"] for n in notes
                   if n["method"] == "event.appended"]  # fmt: skip
            closed = [n for n in notes if n["method"] == "event.subscription_closed"]
            assert got == list(range(len(got)))
            assert got == list(range(4000)) or (
                len(closed) == 1 and "deleted before" in closed[0]["params"]["reason"]
            ), (len(got), closed)
            await close_clients()


async def test_a_subscription_made_while_a_deletion_runs_waits_for_it() -> None:
    # While the delete ran in its worker thread, a new subscription with a backlog read
    # the events the thread was deleting: it lost those deleted before it read them.
    with short_tempdir() as directory:
        async with running_daemon(directory) as daemon:
            writer, late = await connect(daemon), await connect(daemon)
            await writer.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": i} for i in range(2000)]
            await writer.call("event.append_batch", goal_id="g1", events=events)
            deleting = daemon.deleting = trio.Event()  # as a single write's deletion holds it
            await late.send(
                {"jsonrpc": "2.0", "id": 1, "method": "event.subscribe",
                 "params": {"goal_id": "g1", "after_event_id": 0}}
            )  # fmt: skip
            await trio.testing.wait_all_tasks_blocked()
            assert not late.decoder.has_message()  # no reply: it waits
            await writer.call("tx.begin")  # (deleting as the thread would; not held by it)
            await writer.call("event.delete_by_goal", goal_id="g1")
            await writer.call("tx.commit")
            daemon.end_deletion(deleting)
            assert (await late.reply())["result"]["after_event_id"] == 0
            assert await _appended_then(late, 1, 99) == []  # gone before it subscribed
            await close_clients()


def _hold_the_deletion_of(
    monkeypatch: pytest.MonkeyPatch, goal_id: str
) -> tuple[threading.Event, threading.Event]:
    """The worker thread of a deletion of ``goal_id`` waits for the second event before it
    deletes; the first says it is there."""
    entered, go = threading.Event(), threading.Event()
    encoded = session_module._encoded

    def held(run: Any, decode: Any, repos: Any, params: Any) -> Any:
        if getattr(params, "goal_id", None) == goal_id:
            entered.set()
            go.wait(20)
        return encoded(run, decode, repos, params)

    monkeypatch.setattr(session_module, "_encoded", held)
    return entered, go


async def test_a_deletion_that_gets_busy_leaves_a_running_one_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A second deletion answering Busy ended the first's hold on new subscriptions: one
    # made then, with a backlog, lost what the first deleted (1,431 of 300,000), unsaid.
    with short_tempdir() as directory:
        async with running_daemon(directory, lock_timeout=0.2) as daemon:
            a, b, late, writer = [await connect(daemon) for _ in range(4)]
            for g in ("big", "other"):
                await writer.call("goal.create", **goal(g))
            events = [{"kind": "k", "payload": i} for i in range(2000)]
            await writer.call("event.append_batch", goal_id="big", events=events)
            await writer.call("event.append", goal_id="other", kind="k", payload=0)
            entered, go = _hold_the_deletion_of(monkeypatch, "big")
            await a.send_bytes(_requests(("event.delete_by_goal", {"goal_id": "big"})))
            await trio.to_thread.run_sync(entered.wait, 5)
            error = await b.error("event.delete_by_goal", goal_id="other")
            assert error["code"] == ErrorCode.BUSY
            assert daemon.deleting is not None  # still held by the first
            await late.send_bytes(
                _requests(("event.subscribe", {"goal_id": "big", "after_event_id": 0}))
            )
            await trio.sleep(0.1)
            assert not any(s.subscribing for s in daemon.sessions)  # it waits
            go.set()
            assert (await a.reply())["result"] == {"deleted": 2000}
            sid = (await late.reply())["result"]["subscription"]
            assert await _appended_then(late, sid, 99) == []  # gone before it was made
            await close_clients()


async def test_a_deletion_that_gets_busy_closes_no_subscription() -> None:
    # Its pass before the write gate closed a subscriber far behind, saying its events were
    # deleted, though the deletion then answered Busy and deleted nothing.
    config = {"lock_timeout": 0.2, "outbox_bytes": 16 * 1024, "page_size": 20}
    with short_tempdir() as directory:
        async with running_daemon(directory, **config) as daemon:
            sub, holder, writer = [await connect(daemon) for _ in range(3)]
            await writer.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": {"n": i, "pad": "p" * 300}} for i in range(500)]
            await writer.call("event.append_batch", goal_id="g1", events=events)
            sid = (await sub.call("event.subscribe", goal_id="g1", after_event_id=0))[
                "subscription"
            ]  # read later
            await trio.testing.wait_all_tasks_blocked()
            await holder.call("tx.begin")  # holds the write gate
            error = await writer.error("event.delete_by_goal", goal_id="g1")
            assert error["code"] == ErrorCode.BUSY
            await holder.call("tx.rollback")
            notes = await _appended_then(sub, sid, 99)  # (its feeder may still be behind)
            assert {n["method"] for n in notes} == {"event.appended"}
            assert [n["params"]["event"]["payload"]["n"] for n in notes] == list(range(len(notes)))
            (session,) = [s for s in daemon.sessions if s.subscribing]
            assert list(session._subscriptions) == [sid]  # not closed
            await close_clients()


async def test_a_commit_whose_pass_before_it_fails_still_commits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pass before the COMMIT of a transaction that deleted events raised: the
    # transaction was neither committed nor rolled back, and the write gate was held for
    # good (every other write answered Busy).
    with short_tempdir() as directory:
        async with running_daemon(directory, lock_timeout=0.2) as daemon:
            writer, late, other = [await connect(daemon) for _ in range(3)]
            await writer.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": i} for i in range(50)]
            await writer.call("event.append_batch", goal_id="g1", events=events)
            await writer.call("tx.begin")
            assert await writer.call("event.delete_by_goal", goal_id="g1") == {"deleted": 50}
            await late.call("event.subscribe", goal_id="g1", after_event_id=0)
            await trio.testing.wait_all_tasks_blocked()
            (session,) = [s for s in daemon.sessions if s.subscribing]
            (fed,) = session._subscriptions.values()
            fed.cursor = 0  # behind, as one made a moment later would be

            def failing_tail(*args: Any, **kwargs: Any) -> Any:
                raise db.StorageFailure("disk I/O error (injected)")

            monkeypatch.setattr(daemon.db.events, "tail", failing_tail)
            assert await writer.call("tx.commit") == {"committed": True}
            monkeypatch.undo()
            await other.call("goal.create", **goal("g2"))  # the gate is free
            assert await other.call("event.get_by_goal", goal_id="g1") == []
            await close_clients()


async def test_commits_wake_subscriptions_only_while_there_are_some(daemon: Daemon) -> None:
    writer = await connect(daemon)
    await writer.call("goal.create", **goal("g1"))
    idle_signal = daemon.new_events
    await writer.call("event.append", goal_id="g1", kind="nobody listens", payload=0)
    assert daemon.new_events is idle_signal and not idle_signal.is_set()
    for end in ("unsubscribe", "close"):
        sub = await connect(daemon)
        sid = (await sub.call("event.subscribe", goal_id="g1"))["subscription"]
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.subscriptions == 1
        appended = await writer.call("event.append", goal_id="g1", kind=end, payload=1)
        with trio.fail_after(2):
            assert (await sub.notification())["params"]["event"] == appended
        if end == "unsubscribe":
            await sub.call("event.unsubscribe", subscription=sid)
        else:
            await sub.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.subscriptions == 0
        if end == "unsubscribe":
            await sub.aclose()


async def test_sixteen_sessions_mixing_transactions_and_single_writes(daemon: Daemon) -> None:
    setup = await connect(daemon)
    await setup.call("goal.create", **goal("g1"))
    expected: list[str] = []
    rng = random.Random(7)

    async def session(n: int) -> None:
        c = await connect(daemon)
        for round_ in range(6):
            tag = f"s{n}-r{round_}"
            if rng.random() < 0.5:
                await retrying(c, "tx.begin")
                await c.call("event.append", goal_id="g1", kind=tag, payload=1)
                await c.call("event.append", goal_id="g1", kind=tag, payload=2)
                if rng.random() < 0.3:
                    await c.call("tx.rollback")
                    continue
                await c.call("tx.commit")
                expected.extend([tag, tag])
            else:
                await retrying(c, "event.append", goal_id="g1", kind=tag, payload=0)
                expected.append(tag)
        await c.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(16):
            nursery.start_soon(session, n)
    events = await setup.call("event.get_by_goal", goal_id="g1")
    assert sorted(e["kind"] for e in events) == sorted(expected)
    ids = [e["event_id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def retrying(client: RawClient, method: str, **params: object) -> None:
    while True:
        try:
            await client.call(method, **params)
            return
        except RpcError as exc:
            if exc.code != ErrorCode.BUSY:
                raise


@pytest.mark.parametrize(
    ("reply_stall_timeout", "tx_idle_timeout"),
    [(0.3, 60), (60, 0.3)],  # whichever is shorter applies to a transaction holder
)
async def test_client_that_stops_reading_is_disconnected_and_frees_the_lock(
    reply_stall_timeout: float, tx_idle_timeout: float
) -> None:
    with short_tempdir() as directory:
        async with running_daemon(
            directory,
            outbox_bytes=64 * 1024,
            reply_stall_timeout=reply_stall_timeout,
            tx_idle_timeout=tx_idle_timeout,
            lock_timeout=20,
        ) as daemon:
            hog = await connect(daemon)
            await hog.call("goal.create", **goal("g1", goal_text="x" * 60_000))
            await hog.call("tx.begin")
            await hog.call("goal.create", **goal("uncommitted"))
            request = b'{"jsonrpc":"2.0","method":"goal.get","params":{"goal_id":"g1"},"id":1}'
            for _ in range(200):  # ~12 MB of replies, never read
                await hog.send(request)
            other = await connect(daemon)
            with trio.fail_after(10):  # under the lock timeout: the hog was cut off
                await other.call("tx.begin")
            assert await other.call("goal.get", goal_id="uncommitted") is None
            await other.call("tx.rollback")
            await close_clients()


async def test_pipelined_calls_in_a_transaction_answer_in_order(daemon: Daemon) -> None:
    c = await connect(daemon)
    await c.call("goal.create", **goal("g1"))
    await c.call("tx.begin")
    requests = [
        {"jsonrpc": "2.0", "method": "event.append", "id": i,
         "params": {"goal_id": "g1", "kind": "k", "payload": i}}
        for i in range(100)
    ]  # fmt: skip
    requests.insert(50, {"jsonrpc": "2.0", "method": "daemon.ping"})  # a notification
    requests.append({"jsonrpc": "2.0", "method": "tx.commit", "id": "commit"})
    await c.send_bytes(b"".join(encode_frame(Framing.LENGTH, json.dumps(r).encode())
                                for r in requests))  # fmt: skip
    replies = [await c.recv() for _ in range(101)]
    assert [r["id"] for r in replies] == [*range(100), "commit"]
    assert [r["result"]["payload"] for r in replies[:100]] == list(range(100))
    assert len(await c.call("event.get_by_goal", goal_id="g1")) == 100


async def test_line_mode_pipelined_with_blank_lines_is_answered(daemon: Daemon) -> None:
    c = await RawClient.connect(daemon.config.socket_path, Framing.LINE)
    _open.append(c)
    await c.send_bytes(b'{"jsonrpc":"2.0","method":"tx.begin","id":1}\n')
    assert (await c.recv())["result"] == {"active": True}
    # A blank line after the last request must not hold its reply back.
    await c.send_bytes(b'{"jsonrpc":"2.0","method":"daemon.ping","id":2}\n\n')
    with trio.fail_after(2):
        assert (await c.recv())["result"] == "pong"
    await c.send_bytes(b'{"jsonrpc":"2.0","method":"tx.rollback","id":3}\n')
    assert (await c.recv())["result"] == {"rolled_back": True}
