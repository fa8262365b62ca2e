"""The trio client against a real daemon (in-process, or a subprocess to restart) and fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from omkd_client import (
    BudgetCheckpoint,
    Busy,
    CallTimeout,
    CommitOutcomeUnknown,
    Conflict,
    ConnectionLost,
    DaemonNotRunning,
    EventInput,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NotFound,
    NoTransaction,
    ProofRecord,
    SubscriptionClosed,
    TaskRecord,
    TransactionAborted,
    TransactionActive,
    VersionConflict,
)
from omkd_client.errors import DaemonError
from omkd_client.trio_client import TrioClient

from client_helpers import CLOSE, SILENT, Daemon, fake_server, make_goal, result, unique
from rpc_helpers import running_daemon, short_tempdir

TIGHT_LOCK_TIMEOUT = 0.2
TIGHT_IDLE_TIMEOUT = 0.3


@pytest.fixture
async def socket_path() -> AsyncIterator[Path]:
    with short_tempdir() as directory:
        async with running_daemon(directory) as daemon:
            yield Path(daemon.config.socket_path)


@pytest.fixture
async def client(socket_path: Path) -> AsyncIterator[TrioClient]:
    async with TrioClient.connect(socket_path) as c:
        yield c


async def test_goals_tasks_and_events(client: TrioClient) -> None:
    goal = await client.goals.create(make_goal(kind="k"))
    gid = goal.goal_id
    assert await client.goals.get(gid) == goal
    assert (await client.goals.update_status(gid, "review", "verify")).version == 2
    assert (await client.goals.update(gid, 2, {"goal_text": "t"})).version == 3
    assert (await client.goals.heartbeat(gid)).version == 3
    assert (await client.goals.upsert(make_goal(gid, kind="k"))).version == 4
    assert [s.goal_id for s in await client.goals.list(kind="k")] == [gid]

    tasks = [TaskRecord(task_id=unique("t"), goal_id=gid, kind="code") for _ in range(2)]
    assert await client.tasks.create_batch(gid, tasks) == 2
    assert (await client.tasks.get(tasks[0].task_id)) is not None
    assert (await client.tasks.update_status(tasks[0].task_id, "done")).status == "done"
    assert len(await client.tasks.get_by_goal(gid)) == 2
    assert await client.tasks.update_task_graph(gid, tasks[:1]) == 1
    assert await client.tasks.delete_by_goal(gid) == 1

    event = await client.events.append(gid, "k", {"x": 1}, event_uuid=unique("e"))
    ids = await client.events.append_batch(gid, [EventInput(kind="b", payload=None)])
    assert [e.event_id for e in await client.events.get_by_goal(gid)] == [event.event_id, *ids]
    assert await client.events.get_by_goal(gid, after_event_id=event.event_id, limit=5) != []
    assert await client.events.delete_by_goal(gid) == 2
    assert await client.goals.delete(gid) is True
    assert await client.goals.get(gid) is None


async def test_proofs_budgets_artifacts_daemon(client: TrioClient, socket_path: Path) -> None:
    gid = (await client.goals.create(make_goal())).goal_id
    proof = await client.proofs.upsert(ProofRecord(goal_id=gid, status="ready"))
    assert await client.proofs.get(gid) == proof
    assert await client.proofs.delete(gid) == 1
    checkpoint = await client.budgets.append_checkpoint(BudgetCheckpoint(goal_id=gid))
    assert await client.budgets.get_by_goal(gid) == [checkpoint]
    assert await client.budgets.delete_by_goal(gid) == 1
    artifact = await client.artifacts.register(gid, "log", "/tmp/x.log")
    assert await client.artifacts.get_by_goal(gid, kind="log") == [artifact]
    assert await client.artifacts.delete(artifact.artifact_id or 0) is True
    assert await client.artifacts.delete_by_goal(gid) == 0
    assert await client.daemon.ping() == "pong"
    assert (await client.daemon.status()).socket_path == str(socket_path)
    dest = socket_path.parent / "copy.db"
    assert (await client.backup(dest)).bytes == dest.stat().st_size
    assert "goal.list" in {m["name"] for m in (await client.discover())["methods"]}
    assert await client.call("goal.get", goal_id=gid) is not None


async def test_errors(client: TrioClient) -> None:
    goal = await client.goals.create(make_goal())
    with pytest.raises(Conflict):
        await client.goals.create(goal)
    with pytest.raises(VersionConflict):
        await client.goals.update(goal.goal_id, 7, {})
    with pytest.raises(NotFound):
        await client.goals.heartbeat(unique())
    with pytest.raises(InvalidParams):
        await client.call("goal.get")
    with pytest.raises(MethodNotFound):
        await client.call("nope.nope")
    with pytest.raises(NoTransaction):
        await client.call("tx.rollback")
    async with client.transaction() as tx:
        with pytest.raises(TransactionActive):
            await tx.call("tx.begin")
        with pytest.raises(TransactionActive):  # nested begin from the owning task
            await client.transaction().begin()
    assert not client.in_transaction


async def test_busy_and_transaction_aborted() -> None:
    with short_tempdir() as directory:
        config = {"lock_timeout": TIGHT_LOCK_TIMEOUT, "tx_idle_timeout": TIGHT_IDLE_TIMEOUT}
        async with running_daemon(directory, **config) as daemon:
            path = daemon.config.socket_path
            async with TrioClient.connect(path) as a, TrioClient.connect(path) as b:
                gid = (await a.goals.create(make_goal())).goal_id
                async with a.transaction() as tx:
                    await tx.goals.heartbeat(gid)
                    with pytest.raises(Busy):
                        await b.goals.heartbeat(gid)
                with pytest.raises(TransactionAborted):
                    async with a.transaction() as tx:
                        await tx.goals.update_status(gid, "lost", "lost")
                        await trio.sleep(TIGHT_IDLE_TIMEOUT * 2)
                        await tx.goals.get(gid)
                assert (await a.goals.get(gid)).status == "running"  # type: ignore[union-attr]


async def test_transactions_commit_roll_back_and_keep_other_tasks_out(
    client: TrioClient, socket_path: Path
) -> None:
    gid = (await client.goals.create(make_goal())).goal_id
    seen: list[str] = []

    async def other_task() -> None:
        # Waits for the transaction to end instead of landing inside it.
        goal = await client.goals.get(gid)
        assert goal is not None
        seen.append(goal.status)

    async with trio.open_nursery() as nursery, client.transaction() as tx:
        await tx.goals.update_status(gid, "committed", "x")
        nursery.start_soon(other_task)
        await trio.sleep(0.05)
        assert seen == []
        assert (await client.goals.get(gid)).status == "committed"  # type: ignore[union-attr]
    assert seen == ["committed"]

    with pytest.raises(RuntimeError):
        async with client.transaction() as tx:
            await tx.goals.update_status(gid, "rolled back", "x")
            raise RuntimeError("boom")
    assert (await client.goals.get(gid)).status == "committed"  # type: ignore[union-attr]
    async with client.transaction() as tx:
        await tx.goals.update_status(gid, "rolled back", "x")
        await tx.rollback()
    assert (await client.goals.get(gid)).status == "committed"  # type: ignore[union-attr]


async def test_subscription_async_iteration(client: TrioClient, socket_path: Path) -> None:
    gid = (await client.goals.create(make_goal())).goal_id
    first = await client.events.append(gid, "backlog", 0)
    received: list[str] = []
    sub = await client.events.subscribe(gid, after_event_id=first.event_id - 1)
    async with TrioClient.connect(socket_path) as writer, sub:
        await writer.events.append(gid, "new", 1)
        async for event in sub:
            received.append(event.kind)
            if len(received) == 2:
                break
        assert sub.last_event_id is not None
    assert received == ["backlog", "new"]


async def test_concurrent_calls_share_one_connection(client: TrioClient) -> None:
    gid = (await client.goals.create(make_goal())).goal_id
    results: dict[int, int] = {}

    async def append(n: int) -> None:
        results[n] = (await client.events.append(gid, "k", n)).payload

    async with trio.open_nursery() as nursery:
        for n in range(30):
            nursery.start_soon(append, n)
    assert results == {n: n for n in range(30)}
    assert (await client.daemon.status()).sessions == 1
    many = await client.call_many([("daemon.ping", None)] * 3)
    assert many == ["pong"] * 3


async def test_replies_larger_than_a_read_arrive_intact_to_concurrent_callers(
    client: TrioClient,
) -> None:
    # The reader reads into one buffer it keeps (256 KiB): replies spanning several reads,
    # to calls made at once, must each reach its own caller whole.
    gid = (await client.goals.create(make_goal())).goal_id
    payloads = [{"i": i, "text": f"{i:x}" * (150_000 + 7 * i)} for i in range(4)]
    stored: dict[int, Any] = {}

    async def append(i: int) -> None:
        stored[i] = (await client.events.append(gid, "big", payloads[i])).payload

    async with trio.open_nursery() as nursery:
        for i in range(len(payloads)):
            nursery.start_soon(append, i)
    assert [stored[i] for i in range(len(payloads))] == payloads
    events = await client.events.get_by_goal(gid)
    assert sorted((e.payload for e in events), key=lambda p: p["i"]) == payloads


async def test_daemon_not_running() -> None:
    with short_tempdir() as directory, pytest.raises(DaemonNotRunning) as caught:
        async with TrioClient.connect(directory / "no.sock"):
            pass
    assert "omkd serve" in str(caught.value)


async def test_call_timeout_and_commit_outcome_unknown() -> None:
    def handler(request: dict[str, Any]) -> Any:
        method = request["method"]
        if method == "tx.commit":
            return CLOSE
        if method == "slow":
            return SILENT
        return result(request, "ok")

    with fake_server(handler) as server:
        async with TrioClient.connect(server.socket_path, call_timeout=0.2) as c:
            with pytest.raises(CallTimeout):
                await c.call("slow")
            assert await c.call("fast") == "ok"
            with pytest.raises(CommitOutcomeUnknown):
                async with c.transaction() as tx:
                    await tx.call("goal.heartbeat", goal_id="g")
            assert [r["method"] for r in server.requests].count("tx.commit") == 1
            assert await c.call("fast") == "ok"  # reconnected


async def test_a_pipeline_cut_off_part_way_is_not_sent_again() -> None:
    with short_tempdir() as directory:
        async with (
            running_daemon(directory, max_message_bytes=100_000) as daemon,
            TrioClient.connect(daemon.config.socket_path) as c,
        ):
            gid = (await c.goals.create(make_goal())).goal_id
            calls: list[tuple[str, dict[str, Any] | None]] = [
                ("event.append", {"goal_id": gid, "kind": "k", "payload": i}) for i in range(50)
            ]
            big = {"goal_id": gid, "kind": "k", "payload": "x" * 2_000_000}
            calls += [("event.append", big)] + [("event.append", {"goal_id": gid, "kind": "k",
                                                                  "payload": -1})] * 5  # fmt: skip
            with pytest.raises((ConnectionLost, InvalidRequest)):
                await c.call_many(calls)
            payloads = [e.payload for e in await c.events.get_by_goal(gid)]
            assert payloads == list(range(len(payloads))) and len(payloads) <= 50


async def test_giving_up_on_a_transactions_call_closes_the_connection(
    client: TrioClient, socket_path: Path
) -> None:
    # A tx.begin cancelled while it waits for another session's transaction, or a call
    # inside a transaction cancelled: the session's state is not known any more; the client
    # closes the connection, and the daemon rolls back whatever it holds.
    async with (
        TrioClient.connect(socket_path) as holder,
        TrioClient.connect(socket_path) as other,
    ):
        gid = (await holder.goals.create(make_goal())).goal_id
        async with holder.transaction():
            with trio.move_on_after(0.2):
                async with client.transaction():
                    raise AssertionError("tx.begin must wait for the holder's transaction")
            assert not client.in_transaction
        await client.goals.update_status(gid, "after", "p")  # on its own, committed
        assert (await other.goals.get(gid)).status == "after"
        with pytest.raises(ConnectionLost):
            async with client.transaction() as tx:
                await tx.goals.update_status(gid, "inside", "p")
                with trio.move_on_after(0):
                    await tx.goals.heartbeat(gid)  # given up on
        assert (await other.goals.get(gid)).status == "after"  # nothing of it committed
        assert (await client.goals.get(gid)).status == "after"  # a new connection


async def test_after_an_error_that_closes_the_connection_the_next_call_opens_a_new_one() -> None:
    # As the sync client's test: an error of id null means the daemon closes the connection.
    def handler(request: dict[str, Any]) -> Any:
        if request["method"] == "goal.get":
            error = {"code": -32600, "message": "too long; the connection is closed"}
            return {"jsonrpc": "2.0", "id": None, "error": error}
        return result(request, "pong")

    with fake_server(handler) as server:
        async with TrioClient.connect(server.socket_path) as c:
            with pytest.raises(DaemonError):
                await c.call("goal.get", goal_id="g")
            assert await c.call("daemon.ping") == "pong"
            assert len(server._connections) == 2


async def test_a_request_over_the_daemons_limit_gets_its_error_and_is_not_sent_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with short_tempdir() as directory:
        async with (
            running_daemon(directory, max_message_bytes=100_000) as daemon,
            TrioClient.connect(daemon.config.socket_path) as c,
        ):
            gid = (await c.goals.create(make_goal())).goal_id
            events = [EventInput(kind="k", payload="x" * 1000) for _ in range(2000)]
            with pytest.raises(InvalidRequest) as refused:
                await c.events.append_batch(gid, events)
            assert "max-message-bytes" in str(refused.value)
            assert await c.events.get_by_goal(gid) == []
    assert caplog.text.count("exceeds the limit") == 1, caplog.text


async def test_subscription_closed_by_the_daemon() -> None:
    def handler(request: dict[str, Any]) -> Any:
        return [
            result(request, {"subscription": 3}),
            {"jsonrpc": "2.0", "method": "event.subscription_closed",
             "params": {"subscription": 3, "reason": "stalled"}},
        ]  # fmt: skip

    with fake_server(handler) as server:
        async with TrioClient.connect(server.socket_path) as c:
            sub = await c.events.subscribe()
            with pytest.raises(SubscriptionClosed):
                await sub.__anext__()


async def test_no_call_of_a_transaction_whose_connection_was_lost_runs_outside_it() -> None:
    with short_tempdir() as directory:
        daemon = Daemon(directory).start()
        try:
            async with TrioClient.connect(daemon.socket_path) as c:
                with pytest.raises(ConnectionLost):
                    async with c.transaction() as tx:
                        await tx.goals.create(make_goal("t1"))
                        daemon.stop()
                        daemon.start()
                        await trio.sleep(0.2)  # the reader sees the connection end
                        with pytest.raises(ConnectionLost):
                            await tx.goals.create(make_goal("t2"))
                        with pytest.raises(ConnectionLost):  # this task's calls on c too
                            await c.goals.create(make_goal("t3"))
                # The block is over (its commit raised): calls run on their own again.
                assert [await c.goals.get(g) for g in ("t1", "t2", "t3")] == [None] * 3
        finally:
            daemon.stop()


async def test_a_pipeline_on_a_connection_the_daemon_closed_goes_on_a_new_one() -> None:
    # Several requests whose send fails are not sent again: a connection closed already
    # (the daemon restarted while this task never yielded) is replaced before they go.
    with short_tempdir() as directory:
        daemon = Daemon(directory).start()
        try:
            async with TrioClient.connect(daemon.socket_path) as c:
                await c.daemon.ping()
                daemon.stop()
                daemon.start()
                goals = [make_goal(), make_goal()]
                created = await c.call_many(
                    [("goal.create", msgspec.to_builtins(g)) for g in goals]
                )
                assert [g["goal_id"] for g in created] == [g.goal_id for g in goals]
        finally:
            daemon.stop()


async def test_reconnect_after_a_daemon_restart() -> None:
    with short_tempdir() as directory:
        daemon = Daemon(directory).start()
        try:
            async with TrioClient.connect(daemon.socket_path) as c:
                gid = (await c.goals.create(make_goal())).goal_id
                sub = await c.events.subscribe(gid)
                daemon.stop()
                daemon.start()
                with pytest.raises(ConnectionLost):
                    await sub.__anext__()
                assert (await c.goals.heartbeat(gid)).goal_id == gid
                with pytest.raises(ConnectionLost):
                    async with c.transaction() as tx:
                        await tx.goals.heartbeat(gid)
                        daemon.stop()
                        daemon.start()
                        await tx.goals.heartbeat(gid)
                assert await c.daemon.ping() == "pong"
        finally:
            daemon.stop()


async def test_an_abstract_socket_named_as_the_daemon_reports_it_is_reached() -> None:
    name = unique("omkd-abstract")

    def handler(request: dict[str, Any]) -> Any:
        return result(request, "pong")

    with fake_server(handler, abstract=name):
        async with TrioClient.connect(f"@{name}") as c:
            assert await c.daemon.ping() == "pong"
