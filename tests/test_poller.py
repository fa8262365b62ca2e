"""The poller (omkd.rpc.poller): idle connections wait in it, and it answers inline what
will not wait; everything else goes back to the connection's own task, in order."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from omkd.rpc import poller as poller_module
from omkd.rpc.framing import Framing, encode_frame
from omkd.rpc.poller import Poller
from omkd.server import Daemon

from rpc_helpers import RawClient, goal, running_daemon, short_tempdir


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory) as d:
            yield d


@pytest.fixture(autouse=True)
def _cpu_to_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # The poller's spin, here up to 0.5 s, would end for a while if another process took
    # its CPU meanwhile: tests that count spins must not depend on what else the machine
    # runs (the one that tests that makes the kernel's count of switches grow itself).
    monkeypatch.setattr(poller_module, "_involuntary_switches", lambda: 0)


def _frame(message: Any) -> bytes:
    return encode_frame(Framing.LENGTH, json.dumps(message).encode())


def _request(id: Any, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


async def _settle() -> None:
    # The daemon runs in this process: let it read, answer and park.
    await trio.testing.wait_all_tasks_blocked()


async def test_idle_connections_wait_in_the_poller_and_leave_it_when_they_close(
    daemon: Daemon,
) -> None:
    clients = [await RawClient.connect(daemon.config.socket_path) for _ in range(5)]
    for c in clients:
        assert await c.call("daemon.ping") == "pong"
    await _settle()
    assert daemon.poller.parked == 5
    for c in clients[:2]:
        await c.aclose()
    await _settle()
    assert daemon.poller.parked == 3
    assert len(daemon.sessions) == 3
    for c in clients[2:]:  # the others are served as before
        assert await c.call("daemon.ping") == "pong"
        await c.aclose()


async def test_quick_and_slow_requests_pipelined_in_one_write_answer_in_order(
    daemon: Daemon,
) -> None:
    c = await RawClient.connect(daemon.config.socket_path)
    await c.call("goal.create", **goal("g1"))
    # Each kind of request, several times over, in one write: the poller answers some
    # inline and hands the rest to the connection's task, which hands the connection back.
    messages: list[bytes] = []
    expected: list[Any] = []
    for round in range(3):
        base = round * 100
        messages += [
            _frame(_request(base + 1, "daemon.ping")),
            _frame(_request(base + 2, "event.append", goal_id="g1", kind="out", payload=1)),
            _frame(_request(base + 3, "tx.begin")),
            _frame(_request(base + 4, "event.append", goal_id="g1", kind="in", payload=2)),
            _frame(_request(base + 5, "tx.commit")),
            _frame({"jsonrpc": "2.0", "method": "daemon.ping"}),  # a notification: no reply
            encode_frame(Framing.LENGTH, b'{"jsonrpc": "2.0", "id": '),  # not JSON
            _frame(
                [_request(f"b{base}", "daemon.ping"), _request(base + 6, "goal.get", goal_id="g1")]
            ),
            _frame(_request(base + 7, "event.get_by_goal", goal_id="g1", limit=1000)),
        ]
        expected += [base + 1, base + 2, base + 3, base + 4, base + 5, None, ("b", base), base + 7]
    await c.send_bytes(b"".join(messages))
    appended: list[int] = []
    for want in expected:
        reply = await c.recv()
        if isinstance(want, tuple):  # the batch: both replies, in order
            base = want[1]
            assert [r["id"] for r in reply] == [f"b{base}", base + 6]
            assert reply[1]["result"]["goal_id"] == "g1"
            continue
        if want is None:
            assert reply["id"] is None
            assert reply["error"]["code"] == -32700
            continue
        assert reply["id"] == want, reply
        result = reply["result"]
        if want % 100 in (2, 4):
            appended.append(result["event_id"])
        if want % 100 == 7:  # every event appended so far is there, committed
            assert [e["event_id"] for e in result] == appended
    await c.aclose()


async def test_replies_that_fill_the_socket_arrive_whole_and_in_order(daemon: Daemon) -> None:
    c = await RawClient.connect(daemon.config.socket_path)
    await c.call("goal.create", **goal("g1", goal_text="x" * 200_000))
    count = 60  # about 12 MB of replies, far more than a socket buffer holds
    requests = b"".join(_frame(_request(i, "goal.get", goal_id="g1")) for i in range(count))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send_bytes, requests)
        await _settle()
        # The socket's buffer is full: the poller handed the rest to the connection's task.
        assert daemon.poller.parked == 0
        for i in range(count):
            reply = await c.recv()
            assert reply["id"] == i
            assert len(reply["result"]["goal_text"]) == 200_000
    assert await c.call("daemon.ping") == "pong"
    await c.aclose()


async def test_a_client_gone_mid_message_ends_its_session_only(daemon: Daemon) -> None:
    other = await RawClient.connect(daemon.config.socket_path)
    assert await other.call("daemon.ping") == "pong"
    c = await RawClient.connect(daemon.config.socket_path)
    assert await c.call("daemon.ping") == "pong"
    await c.send_bytes(_frame(_request(1, "daemon.ping"))[:10])
    await c.aclose()
    await _settle()
    assert len(daemon.sessions) == 1
    assert await other.call("daemon.ping") == "pong"
    await other.aclose()


async def test_a_reset_connection_ends_its_session_only(daemon: Daemon) -> None:
    other = await RawClient.connect(daemon.config.socket_path)
    c = await RawClient.connect(daemon.config.socket_path)
    assert await c.call("daemon.ping") == "pong"
    # Unread replies at close make the kernel reset the connection (ECONNRESET).
    sock = c.stream.socket
    os.write(sock.fileno(), _frame(_request(1, "daemon.ping")) * 3)
    await _settle()
    sock.close()
    await _settle()
    assert len(daemon.sessions) == 1
    assert await other.call("daemon.ping") == "pong"
    await other.aclose()


async def test_a_client_gone_before_its_reply_ends_its_session_only(daemon: Daemon) -> None:
    other = await RawClient.connect(daemon.config.socket_path)
    c = await RawClient.connect(daemon.config.socket_path)
    assert await c.call("daemon.ping") == "pong"
    await _settle()
    # The request is in the socket and the client gone before the daemon runs again: its
    # reply finds no one to take it.
    sock = c.stream.socket
    os.write(sock.fileno(), _frame(_request(1, "daemon.ping")))
    sock.close()
    await _settle()
    assert len(daemon.sessions) == 1
    assert daemon.poller.parked == 1
    assert await other.call("daemon.ping") == "pong"
    await other.aclose()


async def test_an_unexpected_error_while_answering_inline_ends_that_session_only(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    other = await RawClient.connect(daemon.config.socket_path)
    assert await other.call("daemon.ping") == "pong"
    c = await RawClient.connect(daemon.config.socket_path)

    def broken(message: bytes, session: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(daemon.dispatcher, "answer_now", broken)
    await c.send({"jsonrpc": "2.0", "id": 1, "method": "daemon.ping"})
    assert await c.recv_raw() is None  # the daemon closed this connection
    assert "unexpected error; connection closed" in caplog.text
    monkeypatch.undo()
    assert await other.call("daemon.ping") == "pong"
    await _settle()
    assert len(daemon.sessions) == 1
    await c.aclose()
    await other.aclose()


class _Parked:
    """A parked connection of the poller's own tests: reads what is there, then ``then``."""

    def __init__(self) -> None:
        self.server, self.client = socket.socketpair()
        self.server.setblocking(False)
        self.fd = self.server.fileno()
        self.served = 0
        self.then: Callable[[], object] = lambda: None

    def serve_ready(self) -> bool:
        self.served += len(self.server.recv(4096))  # (a request is a byte)
        self.then()
        return True

    def close(self) -> None:
        self.server.close()
        self.client.close()


@asynccontextmanager
async def _polling(poller: Poller, *parked: _Parked) -> AsyncIterator[None]:
    """``poller`` running with ``parked`` parked in it until the block ends; then closed."""
    try:
        with contextlib.closing(poller):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run)
                for connection in parked:
                    nursery.start_soon(poller.park, connection)
                await trio.testing.wait_all_tasks_blocked()
                yield
                nursery.cancel_scope.cancel()
    finally:
        for connection in parked:
            connection.close()


@pytest.mark.parametrize(("passes", "b_round"), [(4, 1), (1, 2)])
async def test_what_becomes_ready_while_the_poller_serves_is_served_in_the_same_wakeup(
    passes: int, b_round: int
) -> None:
    # (A budget no slow machine reaches: only the passes bound the wake-up here.)
    poller = Poller(passes_per_wakeup=passes, wakeup_budget=60)
    a, b = _Parked(), _Parked()
    rounds: list[int] = []  # the poller's round in which each was served
    a.then = lambda: (rounds.append(poller.rounds), b.client.send(b"x"))  # as a client
    b.then = lambda: rounds.append(poller.rounds)  # answering while A is served
    async with _polling(poller, a, b):
        a.client.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        # One wake-up; past its passes, the poller lets the other tasks run and goes on.
        assert (a.served, b.served, poller.wakeups, rounds) == (1, 1, 1, [1, b_round])


async def test_a_connection_ready_again_and_again_leaves_other_tasks_their_turn() -> None:
    poller = Poller(passes_per_wakeup=4)
    busy = _Parked()
    turns = 0  # of this test's task, which wants to run meanwhile
    seen: list[int] = []  # its turns, each time the busy connection was served

    def again() -> None:
        seen.append(turns)
        if busy.served < 40:
            busy.client.send(b"x")

    busy.then = again
    async with _polling(poller, busy):
        busy.client.send(b"x")
        with trio.fail_after(5):
            while busy.served < 40:
                turns += 1
                await trio.lowlevel.checkpoint()
    # Served 4 times a wake-up at most, and this task got turns between the wake-ups (trio
    # runs the tasks ready together in either order: two wake-ups may meet between turns).
    assert poller.rounds >= 10
    assert max(seen.count(t) for t in set(seen)) <= 8
    assert len(set(seen)) >= 5


async def test_a_wakeup_that_lasted_its_budget_looks_no_further() -> None:
    # A client pipelining long runs of requests: one pass answers 64 KiB of them; the next
    # waits for the next wake-up, so that other tasks are not kept waiting several times that.
    poller = Poller(passes_per_wakeup=4, wakeup_budget=0.001)
    slow = _Parked()

    rounds: list[int] = []  # the poller's round in which each request was served

    def again() -> None:
        rounds.append(poller.rounds)
        time.sleep(0.002)  # a pass longer than the budget
        if slow.served < 3:
            slow.client.send(b"x")

    slow.then = again
    async with _polling(poller, slow):
        slow.client.send(b"x")
        with trio.fail_after(5):
            while slow.served < 3:
                await trio.sleep(0)
    assert rounds == [1, 2, 3]  # one pass each


@pytest.mark.parametrize(("idle_spin", "wakeups", "served_spinning"), [(0.3, 3, 2), (0.0, 5, 0)])
async def test_a_request_that_comes_while_the_poller_spins_is_served_without_sleeping(
    idle_spin: float, wakeups: int, served_spinning: int
) -> None:
    # A client in another thread (as one on another CPU) pauses long once, then briefly.
    # After the long pause, the poller does not spin (its last pause says a spin would not
    # pay); after a brief one it does, and serves the next requests without sleeping.
    # With no spin, it sleeps and is woken for each.
    poller = Poller(idle_spin=idle_spin)
    a = _Parked()
    replied = threading.Semaphore(0)
    a.then = replied.release

    def client() -> None:
        for pause in (1.0, 0.01, 0.01, 0.01, 0):
            a.client.send(b"x")
            replied.acquire()
            time.sleep(pause)

    async with _polling(poller, a):
        with trio.fail_after(10):  # (no other task wakes meanwhile: the spin would not)
            await trio.to_thread.run_sync(client)
    assert a.served == 5
    assert (poller.wakeups, poller.spins_served) == (wakeups, served_spinning), (
        poller.spins,
        poller.spins_preempted,
    )


async def test_the_poller_does_not_spin_while_another_task_is_ready() -> None:
    # A task the request made ready (a subscription woken by a commit, say) runs first: the
    # spin would keep it waiting.
    poller = Poller(idle_spin=2)
    a = _Parked()
    woken = trio.Event()
    ran = trio.Event()

    async def waiter() -> None:
        await woken.wait()
        ran.set()

    async with _polling(poller, a), trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        a.client.send(b"x")  # (the first: no pause before it, no spin after it)
        await trio.testing.wait_all_tasks_blocked()
        a.then = woken.set
        a.client.send(b"x")  # soon after: the spin would pay, but for the waiter
        with trio.fail_after(5):
            await ran.wait()
    assert poller.spins == 0
    assert a.served == 2


async def test_the_daemon_spins_only_while_every_connection_waits_in_the_poller() -> None:
    # A connection in a transaction is served by its own task, which waits in trio: while
    # one is, the poller does not spin (its requests would wait through each spin).
    with short_tempdir() as directory:
        async with running_daemon(directory, idle_spin=0.01) as daemon:
            in_tx = await RawClient.connect(daemon.config.socket_path)
            other = await RawClient.connect(daemon.config.socket_path)
            await in_tx.call("goal.create", **goal("g1"))  # (may spin: every one parked)
            await in_tx.call("tx.begin")
            spins = daemon.poller.spins
            with trio.fail_after(30):
                for _ in range(3):
                    assert await other.call("daemon.ping") == "pong"
                    await in_tx.call("event.append", goal_id="g1", kind="k", payload=1)
                await in_tx.call("tx.commit")
            assert daemon.poller.spins == spins
            await in_tx.aclose()
            await other.aclose()


async def test_the_poller_spins_only_while_it_serves_one_client_alone() -> None:
    # With several clients, the spin would keep a CPU busy that their processes could use
    # (the scheduler moves no task to a CPU that looks busy). Once the poller has slept,
    # a client alone again is waited for.
    poller = Poller(idle_spin=0.2)
    a, b = _Parked(), _Parked()
    async with _polling(poller, a, b):
        a.client.send(b"x")  # (the first: no pause before it, no spin after it)
        await trio.testing.wait_all_tasks_blocked()
        a.client.send(b"x")  # both soon after: the spin would pay, but for two clients
        b.client.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert (a.served, b.served, poller.wakeups, poller.spins) == (2, 1, 2, 0)
        a.client.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert (a.served, poller.wakeups, poller.spins, poller.spins_served) == (3, 3, 1, 0)


async def test_a_spin_that_loses_its_cpu_ends_the_spinning_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A spinning daemon is runnable: with another busy process on its CPU, a request that
    # comes while that process runs waits out its time slice (a sleeping daemon would be
    # woken ahead of it). A look that took long while the kernel switched the poller out
    # shows that; no spin follows for spin_backoff. A long look without such a switch (a
    # wait for the GIL, a hiccup of the host) does not. (Both simulated: a yield that takes
    # 0.3 s, and a count of switches that grows or not.) Its spins catch nothing (the
    # client runs in this trio run): here a miss lets no later chance go by.
    monkeypatch.setattr(poller_module.SpinOdds, "missed", lambda odds: None)
    poller = Poller(idle_spin=0.5, spin_backoff=60)
    a = _Parked()
    switches = itertools.count()

    async def request() -> None:
        a.client.send(b"x")
        await trio.testing.wait_all_tasks_blocked()

    async with _polling(poller, a):
        for _ in range(2):  # a brief pause: the spin pays
            await request()
        assert (poller.spins, poller.spins_preempted) == (1, 0)
        monkeypatch.setattr(os, "sched_yield", lambda: time.sleep(0.3))
        await request()  # a long look, no switch: the spin goes on
        assert (poller.spins, poller.spins_preempted) == (2, 0)
        monkeypatch.setattr(poller_module, "_involuntary_switches", lambda: next(switches))
        await request()  # a long look, switched out: no spin for a while
        assert (poller.spins, poller.spins_preempted) == (3, 1)
        monkeypatch.undo()
        for _ in range(3):
            await request()
        assert (a.served, poller.spins, poller.spins_preempted) == (7, 3, 1)


async def test_a_task_woken_with_the_poller_waits_one_spin_at_most() -> None:
    # trio runs the tasks made ready together in either order, and those of the poller's
    # batch are in no run queue, so the spin's check cannot see them: after serving what a
    # spin caught, the poller lets the other tasks run before it spins again. Ten trials
    # (the order is random): the other task ran once the lone client's primer, its next
    # request and at most one caught by a spin were served.
    served = [await _served_when_a_task_woken_with_the_poller_ran() for _ in range(10)]
    assert max(served) <= 3, served


async def _served_when_a_task_woken_with_the_poller_ran() -> int:
    poller = Poller(idle_spin=0.05, wakeup_budget=60)
    a = _Parked()
    mine, theirs = socket.socketpair()
    served_when_it_ran: list[int] = []
    done = threading.Event()

    async def other() -> None:
        await trio.lowlevel.wait_readable(mine)
        served_when_it_ran.append(a.served)

    def client() -> None:  # sends its next request as soon as one is served
        sent = 2
        while not done.is_set() and sent < 20:
            if a.served >= sent:
                a.client.send(b"x")
                sent += 1

    try:
        async with _polling(poller, a), trio.open_nursery() as nursery:
            a.client.send(b"x")  # the primer: its pause makes the next spin pay
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            thread = threading.Thread(target=client)
            thread.start()
            a.client.send(b"x")
            theirs.send(b"x")  # both ready at once: woken in one batch
            with trio.fail_after(10):
                while not served_when_it_ran:
                    await trio.sleep(0.01)
            done.set()
            thread.join()
    finally:
        mine.close()
        theirs.close()
    return served_when_it_ran[0]


@asynccontextmanager
async def _daemon_with_goal_g1() -> AsyncIterator[Daemon]:
    """A daemon in this test's trio run (idle_spin at the setting's bound) with goal g1."""
    with short_tempdir() as directory:
        async with running_daemon(directory, idle_spin=0.01) as daemon:
            setup = await RawClient.connect(daemon.config.socket_path)
            await setup.call("goal.create", **goal("g1"))
            await setup.aclose()
            yield daemon


def _transaction_in_a_thread(socket_path: str, appends: int, pause: float) -> None:
    """A client of its own (as one on another CPU): a transaction of ``appends`` appends to
    goal g1, pausing ``pause`` s before each call."""
    from omkd_client import Client

    with Client.connect(socket_path) as client:
        time.sleep(0.5)  # (the poller has served nobody lately)
        _append_in_transaction(client, appends, pause)


def _append_in_transaction(client: Any, appends: int, pause: float) -> None:
    with client.transaction() as tx:
        for _ in range(appends):
            time.sleep(pause)
            tx.events.append("g1", "k", 1)


async def test_a_transaction_alone_is_waited_for_between_its_calls() -> None:
    # Its calls are read by its connection's own task, which spins for the next one as the
    # poller does for a lone client, while every other connection waits in the poller and
    # the poller has served none of them lately.
    with short_tempdir() as directory:
        async with running_daemon(directory, idle_spin=0.01) as daemon:
            idle = await RawClient.connect(daemon.config.socket_path)
            await idle.call("goal.create", **goal("g1"))
            poller = daemon.poller
            poller.idle_spin = 0.2  # (past the setting's bound: room for a slow machine)
            await trio.to_thread.run_sync(
                _transaction_in_a_thread, daemon.config.socket_path, 10, 0.005
            )
            # Each call after the first brief pause (tx.commit's too), give or take one.
            assert poller.task_spins_served >= 9
            assert len(await idle.call("event.get_by_goal", goal_id="g1")) == 10
            await idle.aclose()


async def test_a_transaction_is_not_waited_for_while_another_client_is_busy() -> None:
    # Another client calling again and again, parked in the poller between its calls: the
    # spin would keep a CPU busy that its process could use.
    async with _daemon_with_goal_g1() as daemon:
        daemon.poller.idle_spin = 0.5  # (a client pausing under 1 s counts as busy)
        socket_path = daemon.config.socket_path
        done = threading.Event()

        def pinging() -> None:
            from omkd_client import Client

            with Client.connect(socket_path) as client:
                while not done.is_set():
                    client.daemon.ping()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, pinging)
            await trio.to_thread.run_sync(_transaction_in_a_thread, socket_path, 20, 0)
            done.set()
        assert daemon.poller.task_spins == 0


async def test_a_transaction_waited_for_lets_another_client_in_at_once() -> None:
    # The spin for a transaction's next call ends as soon as a parked connection has a
    # request: the poller serves it. (A spin of 0.6 s: the other call waits for none of it.)
    with short_tempdir() as directory:
        async with running_daemon(directory, idle_spin=0.01) as daemon:
            other = await RawClient.connect(daemon.config.socket_path)
            await other.call("goal.create", **goal("g1"))
            daemon.poller.idle_spin = 0.6
            socket_path = daemon.config.socket_path
            spinning = threading.Event()
            waited: list[float] = []

            def paused_transaction() -> None:
                from omkd_client import Client

                with Client.connect(socket_path) as client, client.transaction() as tx:
                    time.sleep(1.5)  # (the poller has served nobody lately)
                    tx.events.append("g1", "k", 1)
                    tx.events.append("g1", "k", 2)  # a brief pause: the spin pays
                    spinning.set()
                    time.sleep(1.0)
                    tx.events.append("g1", "k", 3)

            def other_calls() -> None:
                from omkd_client import Client

                with Client.connect(socket_path) as client:
                    spinning.wait()
                    time.sleep(0.2)
                    started = time.perf_counter()
                    client.daemon.ping()
                    waited.append(time.perf_counter() - started)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, other_calls)
                await trio.to_thread.run_sync(paused_transaction)
            assert daemon.poller.task_spins >= 1
            assert waited[0] < 0.2
            await other.aclose()


async def test_a_transaction_is_not_waited_for_while_another_connection_is_busy() -> None:
    # Another connection in a task of its own (here: half a message sent, its task waiting
    # for the rest, in trio): the spin would keep it from being read.
    async with _daemon_with_goal_g1() as daemon:
        half = socket.socket(socket.AF_UNIX)
        half.connect(daemon.config.socket_path)
        try:
            half.send(_frame(_request(1, "daemon.ping"))[:10])
            await _settle()
            assert daemon.poller.parked < len(daemon.sessions)
            await trio.to_thread.run_sync(
                _transaction_in_a_thread, daemon.config.socket_path, 10, 0.005
            )
            assert daemon.poller.task_spins == 0
        finally:
            half.close()


async def test_a_transaction_waited_for_call_after_call_leaves_trio_its_turns() -> None:
    # A call in a transaction never waits: were each next call caught by the spin, the
    # connection's task would never let trio run its timers and I/O (a new connection, a
    # worker thread's result, a deadline); a timer of 1 ms came 0.5-1.3 s late.
    async with _daemon_with_goal_g1() as daemon:
        done = threading.Event()

        def back_to_back() -> None:
            from omkd_client import Client

            with Client.connect(daemon.config.socket_path) as client:
                time.sleep(0.5)  # (the poller has served nobody lately)
                with client.transaction() as tx:
                    started = time.perf_counter()
                    while time.perf_counter() - started < 1.0:
                        tx.events.append("g1", "k", 1)
            done.set()

        late = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, back_to_back)
            while not done.is_set():
                started = time.perf_counter()
                await trio.sleep(0.001)
                late = max(late, time.perf_counter() - started - 0.001)
        assert daemon.poller.task_spins_served > 100
        assert late < 0.1


async def test_a_spin_for_a_connection_ends_first_for_a_parked_one() -> None:
    # Both have a request: the parked connection's is served first (the poller serves it),
    # or a client that calls again and again would keep it waiting.
    poller = Poller(idle_spin=0.5)
    parked = _Parked()
    mine, theirs = socket.socketpair()
    readable = select.poll()
    readable.register(mine, select.POLLIN)
    try:
        async with _polling(poller, parked):
            theirs.send(b"x")
            assert poller.spin_for(mine.fileno(), readable) is True  # alone: it is read
            parked.client.send(b"x")
            assert poller.spin_for(mine.fileno(), readable) is None
            await trio.testing.wait_all_tasks_blocked()
            assert parked.served == 1
    finally:
        mine.close()
        theirs.close()


async def test_a_spin_for_a_connection_that_did_not_run_says_so() -> None:
    # None, not False ("ran out"): the connection would take it as a long pause of its
    # client and not spin next time.
    poller = Poller(idle_spin=0.5, spin_backoff=60)
    mine, theirs = socket.socketpair()
    readable = select.poll()
    readable.register(mine, select.POLLIN)
    try:
        with contextlib.closing(poller):
            poller._no_spin_until = time.perf_counter() + 60  # as after a spin lost its CPU
            assert poller.spin_for(mine.fileno(), readable) is None
            assert poller.spins == 0
    finally:
        mine.close()
        theirs.close()


async def test_spins_that_catch_nothing_are_let_go_more_and_more() -> None:
    # A client pausing just longer than the spin looks quick from asleep (its pause seen
    # from there includes the spin): each call would cost a spin in vain. After a miss the
    # next 2, then 4, 8, ... chances go by. (Pauses of 0.15 s against a spin of 0.1 s.)
    poller = Poller(idle_spin=0.1)
    a = _Parked()
    replied = threading.Semaphore(0)
    a.then = replied.release

    def client() -> None:
        for _ in range(12):
            a.client.send(b"x")
            replied.acquire()
            time.sleep(0.15)

    async with _polling(poller, a):
        with trio.fail_after(30):
            await trio.to_thread.run_sync(client)
    # Calls 2, 5 and 10 spin (the first has no pause before it), and catch nothing.
    assert (a.served, poller.spins, poller.spins_served) == (12, 3, 0)


async def test_a_transactions_spins_that_catch_nothing_are_let_go_more_and_more() -> None:
    # As the poller's: a client pausing just longer than the spin (0.15 s against 0.1 s)
    # gets a spin in vain at its 2nd, 5th and 10th call only, not at each.
    async with _daemon_with_goal_g1() as daemon:
        daemon.poller.idle_spin = 0.1
        await trio.to_thread.run_sync(_transaction_in_a_thread, daemon.config.socket_path, 12, 0.15)
        assert (daemon.poller.task_spins, daemon.poller.task_spins_served) == (3, 0)
