"""The sync client against a real daemon in a subprocess, and against fake servers."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import omkd_client
from omkd_client import (
    BudgetCheckpoint,
    Busy,
    CallTimeout,
    Client,
    CommitOutcomeUnknown,
    Conflict,
    ConnectionLost,
    DaemonNotRunning,
    ErrorCode,
    EventInput,
    InvalidParams,
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
from omkd_client.cli import main as omkctl_main
from omkd_client.errors import ERRORS, DaemonError, error_from_wire
from omkd_client.protocol import (
    NEED_DATA,
    ClientProtocol,
    FrameDecoder,
    encode_frame,
    error_after_break,
)

from client_helpers import (
    CLOSE,
    SILENT,
    Daemon,
    daemon_process,
    fake_server,
    frame,
    make_goal,
    result,
    short_dir,
    unique,
)

TIGHT_LOCK_TIMEOUT = 0.2
TIGHT_IDLE_TIMEOUT = 0.3


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with daemon_process() as d:
        yield d


@pytest.fixture(scope="module")
def tight_daemon() -> Iterator[Daemon]:
    """A daemon with tiny lock and idle timeouts, to reach Busy and TransactionAborted."""
    with daemon_process(
        "--lock-timeout", str(TIGHT_LOCK_TIMEOUT), "--tx-idle-timeout", str(TIGHT_IDLE_TIMEOUT)
    ) as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client.connect(daemon.socket_path) as c:
        yield c


# -- the protocol core and the error table, without sockets


def test_error_table_matches_the_contract_codes() -> None:
    assert set(ERRORS) == set(ErrorCode)
    for code, cls in ERRORS.items():
        error = error_from_wire({"code": int(code), "message": "m", "data": {"id": 1}})
        assert type(error) is cls and error.code == code and error.data == {"id": 1}
    unknown = error_from_wire({"code": -32099, "message": "new"})
    assert type(unknown) is DaemonError and unknown.code == -32099


def test_frame_decoder_at_every_split() -> None:
    stream = b"".join(encode_frame(m) for m in (b'{"a":1}', b"[]", b'"x"'))
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.receive_data(stream[:cut])
        decoder.receive_data(stream[cut:])
        messages = []
        while (m := decoder.next_message()) is not NEED_DATA:
            messages.append(m)
        assert messages == [b'{"a":1}', b"[]", b'"x"']


def test_protocol_matches_replies_out_of_order_and_routes_notifications() -> None:
    protocol = ClientProtocol()
    first, _ = protocol.send_request("goal.get", {"goal_id": "a"})
    second, _ = protocol.send_request("event.subscribe", {})
    protocol.receive_data(
        encode_frame(b'{"jsonrpc":"2.0","id":%d,"result":{"subscription":7}}' % second)
    )
    protocol.receive_data(encode_frame(b'{"jsonrpc":"2.0","id":%d,"result":null}' % first))
    replies = [protocol.next_event(), protocol.next_event()]
    assert [r.id for r in replies] == [second, first]  # type: ignore[union-attr]
    queue = protocol.subscriptions.claim(7)  # opened when the subscribe reply was read
    event = b'{"event_id":1,"goal_id":"g","kind":"k","payload":null,"created_at":1}'
    protocol.receive_data(encode_frame(
        b'{"jsonrpc":"2.0","method":"event.appended","params":{"subscription":7,"event":%s}}'
        % event
    ))  # fmt: skip
    protocol.next_event()
    assert queue[0].event_id == 1  # type: ignore[union-attr]


def test_client_imports_neither_trio_nor_the_daemon() -> None:
    code = (
        "import sys, omkd_client, omkd_client.cli, omkd_client.protocol;"
        "bad = [m for m in sys.modules if m == 'trio' or m.split('.')[0] in "
        "('omkd', 'jsonrpcserver')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- repositories


def test_goals(client: Client) -> None:
    goal = make_goal(kind="feature")
    stored = client.goals.create(goal)
    assert stored.goal_id == goal.goal_id and stored.version == 1
    assert client.goals.get(goal.goal_id) == stored
    assert client.goals.get(unique()) is None
    moved = client.goals.update_status(goal.goal_id, "review", "verify")
    assert (moved.status, moved.phase, moved.version) == ("review", "verify", 2)
    changed = client.goals.update(goal.goal_id, 2, {"goal_text": "new text", "max_agents": 3})
    assert changed.goal_text == "new text" and changed.max_agents == 3 and changed.version == 3
    assert client.goals.heartbeat(goal.goal_id).version == 3
    upserted = client.goals.upsert(make_goal(goal.goal_id, status="done", kind="feature"))
    assert upserted.status == "done" and upserted.version == 4
    summaries = client.goals.list(status="done", kind="feature")
    assert goal.goal_id in [s.goal_id for s in summaries]
    filtered = client.goals.list(omkd_client.GoalFilter(status="done"), limit=1)
    assert len(filtered) == 1
    assert client.goals.delete(goal.goal_id) is True
    with pytest.raises(NotFound) as caught:
        client.goals.delete(goal.goal_id)
    assert caught.value.code == ErrorCode.NOT_FOUND and caught.value.data


def test_tasks(client: Client) -> None:
    goal = client.goals.create(make_goal())
    gid = goal.goal_id
    tasks = [TaskRecord(task_id=unique("t"), goal_id=gid, kind="code", title=f"t{i}")
             for i in range(3)]  # fmt: skip
    assert client.tasks.create_batch(gid, tasks) == 3
    assert client.tasks.get(tasks[0].task_id).title == "t0"  # type: ignore[union-attr]
    assert client.tasks.get(unique("t")) is None
    assert [t.task_id for t in client.tasks.get_by_goal(gid)] == [t.task_id for t in tasks]
    assert client.tasks.update_status(tasks[1].task_id, "done").status == "done"
    with pytest.raises(Conflict):
        client.tasks.create_batch(gid, tasks[:1])
    with pytest.raises(NotFound):
        client.tasks.update_status(unique("t"), "done")
    graph = [TaskRecord(task_id=unique("t"), goal_id=gid, kind="review")]
    assert client.tasks.update_task_graph(gid, graph) == 1
    assert [t.task_id for t in client.tasks.get_by_goal(gid)] == [graph[0].task_id]
    assert client.tasks.delete_by_goal(gid) == 1


def test_events(client: Client) -> None:
    gid = client.goals.create(make_goal()).goal_id
    first = client.events.append(gid, "started", {"n": 1}, actor="me", run_id="r1")
    assert first.actor == "me" and first.payload == {"n": 1}
    ids = client.events.append_batch(gid, [EventInput(kind="step", payload=i) for i in range(3)])
    assert len(ids) == 3 and ids[0] > first.event_id
    events = client.events.get_by_goal(gid)
    assert [e.event_id for e in events] == [first.event_id, *ids]
    page = client.events.get_by_goal(gid, after_event_id=ids[0], limit=1)
    assert [e.event_id for e in page] == [ids[1]]
    assert client.events.get_by_goal(unique()) == []
    with pytest.raises(NotFound):
        client.events.append(unique(), "k", None)
    assert client.events.delete_by_goal(gid) == 4


def test_proofs_budgets_artifacts(client: Client) -> None:
    gid = client.goals.create(make_goal()).goal_id
    proof = client.proofs.upsert(ProofRecord(goal_id=gid, status="ready", gates_passed=2))
    assert proof.gates_passed == 2
    assert client.proofs.get(gid) == proof
    assert client.proofs.delete(gid) == 1
    assert client.proofs.get(gid) is None

    checkpoint = client.budgets.append_checkpoint(
        BudgetCheckpoint(goal_id=gid, label="half", used_tokens=50, estimated_cost_usd=125)
    )
    assert checkpoint.checkpoint_id is not None and checkpoint.estimated_cost_usd == 125
    assert client.budgets.get_by_goal(gid) == [checkpoint]
    assert client.budgets.delete_by_goal(gid) == 1

    artifact = client.artifacts.register(gid, "log", "/tmp/a.log", mime_type="text/plain")
    other = client.artifacts.register(gid, "diff", "/tmp/a.diff")
    assert client.artifacts.get_by_goal(gid, kind="log") == [artifact]
    assert client.artifacts.delete(artifact.artifact_id or 0) is True
    assert client.artifacts.delete(artifact.artifact_id or 0) is False
    assert client.artifacts.get_by_goal(gid) == [other]
    assert client.artifacts.delete_by_goal(gid) == 1


def test_daemon_backup_discover_and_generic_call(client: Client, daemon: Daemon) -> None:
    assert client.daemon.ping() == "pong"
    status = client.daemon.status()
    assert status.socket_path == str(daemon.socket_path) and status.sessions >= 1
    dest = daemon.directory / "copy.db"
    backup = client.backup(dest)
    assert backup.path == str(dest) and backup.bytes == dest.stat().st_size
    names = {m["name"] for m in client.discover()["methods"]}
    assert {"goal.create", "event.subscribe", "tx.commit"} <= names
    assert client.call("daemon.ping") == "pong"
    assert client.call("goal.get", goal_id=unique()) is None


# -- errors


def test_daemon_errors_decode_to_their_classes(client: Client) -> None:
    goal = client.goals.create(make_goal())
    with pytest.raises(Conflict):
        client.goals.create(goal)
    with pytest.raises(VersionConflict) as version:
        client.goals.update(goal.goal_id, 99, {"status": "x"})
    assert version.value.data
    with pytest.raises(InvalidParams) as invalid:
        client.call("goal.get", goal_idx="x")
    assert invalid.value.data["field"] == "goal_idx"
    with pytest.raises(MethodNotFound):
        client.call("goal.frobnicate")
    with pytest.raises(NoTransaction):
        client.call("tx.commit")
    with client.transaction(), pytest.raises(TransactionActive):
        client.call("tx.begin")
    assert client.daemon.ping() == "pong"  # the connection survives every error


def test_daemon_not_running_names_the_path_and_how_to_start() -> None:
    with short_dir() as directory:
        path = directory / "none.sock"
        with pytest.raises(DaemonNotRunning) as caught:
            Client.connect(path)
    message = str(caught.value)
    assert str(path) in message and "omkd serve" in message and "systemctl" in message


def test_busy_after_the_lock_timeout(tight_daemon: Daemon) -> None:
    with (
        Client.connect(tight_daemon.socket_path) as a,
        Client.connect(tight_daemon.socket_path) as b,
    ):
        gid = a.goals.create(make_goal()).goal_id
        with a.transaction() as tx:
            tx.goals.heartbeat(gid)
            started = time.monotonic()
            with pytest.raises(Busy):
                b.goals.heartbeat(gid)
            assert time.monotonic() - started >= TIGHT_LOCK_TIMEOUT * 0.9
            assert b.goals.get(gid) is not None  # reads do not wait


def test_transaction_aborted_after_the_idle_timeout(tight_daemon: Daemon) -> None:
    with Client.connect(tight_daemon.socket_path) as c:
        gid = c.goals.create(make_goal()).goal_id
        with pytest.raises(TransactionAborted), c.transaction() as tx:
            tx.goals.update_status(gid, "lost", "lost")
            time.sleep(TIGHT_IDLE_TIMEOUT * 2)
            tx.goals.get(gid)
        assert not c.in_transaction
        assert c.goals.get(gid).status == "running"  # type: ignore[union-attr]
        with c.transaction() as tx:  # the session is usable again
            tx.goals.update_status(gid, "kept", "kept")
        assert c.goals.get(gid).status == "kept"  # type: ignore[union-attr]


# -- transactions


def test_transaction_commits_on_success(client: Client, daemon: Daemon) -> None:
    gid = client.goals.create(make_goal()).goal_id
    with Client.connect(daemon.socket_path) as other, client.transaction() as tx:
        tx.goals.update_status(gid, "inside", "tx")
        tx.events.append(gid, "k", 1)
        assert client.in_transaction
        assert other.goals.get(gid).status == "running"  # type: ignore[union-attr]
    assert not client.in_transaction
    assert client.goals.get(gid).status == "inside"  # type: ignore[union-attr]
    assert len(client.events.get_by_goal(gid)) == 1


def test_transaction_rolls_back_on_exception(client: Client) -> None:
    gid = client.goals.create(make_goal()).goal_id
    with pytest.raises(RuntimeError), client.transaction() as tx:
        tx.goals.update_status(gid, "inside", "tx")
        raise RuntimeError("boom")
    assert client.goals.get(gid).status == "running"  # type: ignore[union-attr]
    with client.transaction() as tx:
        tx.goals.update_status(gid, "inside", "tx")
        tx.rollback()
    assert client.goals.get(gid).status == "running"  # type: ignore[union-attr]


def test_a_failed_call_leaves_the_transaction_open(client: Client) -> None:
    gid = client.goals.create(make_goal()).goal_id
    with client.transaction() as tx:
        tx.goals.update_status(gid, "a", "b")
        with pytest.raises(NotFound):
            tx.goals.heartbeat(unique())
    assert client.goals.get(gid).status == "a"  # type: ignore[union-attr]


# -- subscriptions


def test_subscription_iterates_committed_events(client: Client, daemon: Daemon) -> None:
    gid = client.goals.create(make_goal()).goal_id
    backlog = client.events.append(gid, "before", 0)
    with Client.connect(daemon.socket_path) as writer:
        with client.events.subscribe(gid, after_event_id=backlog.event_id - 1) as sub:
            writer.events.append(gid, "after", 1)
            with writer.transaction() as tx:
                tx.events.append(gid, "in-tx", 2)
                assert sub.get(timeout=0.2) is not None  # the backlog
                assert sub.get(timeout=0.2) is not None  # the event after
                assert sub.get(timeout=0.2) is None  # not committed yet
            kinds = [next(sub).kind]
            assert kinds == ["in-tx"] and sub.last_event_id is not None
            assert client.daemon.ping() == "pong"  # calls while subscribed
        writer.events.append(gid, "unsubscribed", 3)
        assert client.daemon.ping() == "pong"


def test_subscription_closed_by_the_daemon_raises() -> None:
    event = {"event_id": 5, "goal_id": "g", "kind": "k", "payload": None, "created_at": 1}

    def handler(request: dict[str, Any]) -> Any:
        if request["method"] == "event.subscribe":
            return [
                result(request, {"subscription": 9}),
                {"jsonrpc": "2.0", "method": "event.appended",
                 "params": {"subscription": 9, "event": event}},
                {"jsonrpc": "2.0", "method": "event.subscription_closed",
                 "params": {"subscription": 9, "reason": "too slow"}},
            ]  # fmt: skip
        return SILENT

    with fake_server(handler) as server, Client.connect(server.socket_path) as c:
        sub = c.events.subscribe()
        assert next(sub).event_id == 5
        with pytest.raises(SubscriptionClosed) as caught:
            next(sub)
    assert caught.value.reason == "too slow" and caught.value.last_event_id == 5


# -- pipelining


def test_call_many_and_pipeline(client: Client) -> None:
    gid = client.goals.create(make_goal()).goal_id
    results = client.call_many([("event.append", {"goal_id": gid, "kind": "k", "payload": i})
                                for i in range(20)])  # fmt: skip
    assert [r["payload"] for r in results] == list(range(20))
    mixed = client.call_many(
        [("daemon.ping", None), ("goal.heartbeat", {"goal_id": unique()})],
        return_exceptions=True,
    )
    assert mixed[0] == "pong" and isinstance(mixed[1], NotFound)
    with pytest.raises(NotFound):
        client.call_many([("goal.heartbeat", {"goal_id": unique()})])
    with client.pipeline() as p:
        ping = p.call("daemon.ping")
        goal = p.call("goal.get", goal_id=gid)
        missing = p.call("goal.delete", goal_id=unique())
    assert ping.result() == "pong" and goal.result()["goal_id"] == gid
    with pytest.raises(NotFound):
        missing.result()


def test_replies_larger_than_a_read_and_many_in_one_read_arrive_intact(client: Client) -> None:
    # The client reads into one buffer it keeps (256 KiB): a reply spanning several reads,
    # and many small replies in one read, must each come out whole and unmixed.
    gid = client.goals.create(make_goal()).goal_id
    payloads = [{"i": i, "text": f"{i:x}" * (150_000 + 7 * i)} for i in range(4)]
    for payload in payloads:
        assert client.events.append(gid, "big", payload).payload == payload
    assert [e.payload for e in client.events.get_by_goal(gid)] == payloads
    small = client.call_many([("event.get_by_goal", {"goal_id": gid, "after_event_id": 0,
                                                     "limit": 0}),
                              *[("daemon.ping", None)] * 200])  # fmt: skip
    assert small == [[], *["pong"] * 200]


def test_pipelined_requests_are_all_sent_before_any_reply_and_matched_by_id() -> None:
    held: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> Any:
        held.append(request)
        if len(held) < 3:
            return SILENT
        return [result(r, r["params"]["n"]) for r in reversed(held)]  # answers out of order

    with fake_server(handler) as server, Client.connect(server.socket_path, call_timeout=5) as c:
        assert c.call_many([("echo", {"n": n}) for n in range(3)]) == [0, 1, 2]


# -- failures of the connection


def test_a_long_pipeline_does_not_wait_on_itself(client: Client) -> None:
    # The daemon answers in order and reads no further while a reply waits for room: sent
    # whole before reading, 2,500 calls waited on themselves until the call timeout.
    gid = client.goals.create(make_goal()).goal_id
    results = client.call_many([("goal.get", {"goal_id": gid})] * 6000)
    assert len(results) == 6000 and all(r["goal_id"] == gid for r in results)
    with client.pipeline() as p:
        pending = [p.call("daemon.ping") for _ in range(6000)]
    assert {r.result() for r in pending} == {"pong"}


def test_a_pipeline_cut_off_part_way_is_not_sent_again() -> None:
    # The daemon ran the first writes, then closed at one over its size limit: sending the
    # whole pipeline again on a new connection applied them twice.
    with (
        daemon_process("--max-message-bytes", "100000") as daemon,
        Client.connect(daemon.socket_path) as c,
    ):
        gid = c.goals.create(make_goal()).goal_id
        calls: list[tuple[str, dict[str, Any] | None]] = [
            ("event.append", {"goal_id": gid, "kind": "k", "payload": i}) for i in range(50)
        ]
        calls.append(("event.append", {"goal_id": gid, "kind": "k", "payload": "x" * 2_000_000}))
        calls += [("event.append", {"goal_id": gid, "kind": "k", "payload": -1})] * 5
        with pytest.raises(ConnectionLost, match="may or may not have been applied"):
            c.call_many(calls)
        payloads = [e.payload for e in c.events.get_by_goal(gid)]
        assert payloads == list(range(len(payloads))) and len(payloads) <= 50  # once each


def test_a_call_timing_out_on_a_transaction_closes_the_connection(daemon: Daemon) -> None:
    # tx.begin waits for another session's transaction past the client's call timeout: the
    # daemon would grant it later, on a connection the client no longer knows to be in one.
    with (
        Client.connect(daemon.socket_path) as holder,
        Client.connect(daemon.socket_path, call_timeout=0.3) as c,
        Client.connect(daemon.socket_path) as other,
    ):
        gid = holder.goals.create(make_goal()).goal_id
        with holder.transaction():
            with pytest.raises(CallTimeout) as caught:
                c.transaction().begin()
            assert "the connection was closed" in str(caught.value)
            assert not c.in_transaction
        # The next call runs on a new connection, on its own: the others see it.
        c.goals.update_status(gid, "after", "p")
        assert other.goals.get(gid).status == "after"
        deadline = time.monotonic() + 10
        while other.daemon.status().active_transactions and time.monotonic() < deadline:
            time.sleep(0.02)  # the old session ends once its tx.begin is through
        assert other.daemon.status().active_transactions == 0
        with c.transaction() as tx:  # and the client's own transactions work
            tx.goals.heartbeat(gid)


def test_call_timeout_against_a_server_that_never_answers() -> None:
    with (
        fake_server(lambda r: SILENT) as server,
        Client.connect(server.socket_path, call_timeout=0.2) as c,
    ):
        started = time.monotonic()
        with pytest.raises(CallTimeout) as caught:
            c.daemon.ping()
        assert 0.15 < time.monotonic() - started < 2
        assert "daemon.ping" in str(caught.value)


@contextlib.contextmanager
def raw_server(serve: Callable[[socket.socket], None]) -> Iterator[Path]:
    """A Unix socket whose first connection is handed to ``serve`` in a thread."""
    with short_dir() as directory:
        path = directory / "raw.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()

        def accept() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                serve(conn)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield path
        finally:
            listener.close()
            thread.join(10)


def test_call_timeout_holds_while_the_reply_trickles_in() -> None:
    # The kernel's receive timeout restarts with every read: the client must still give up
    # at the call's deadline when each read brings a byte in time.
    def trickle(conn: socket.socket) -> None:
        conn.recv(65536)
        reply = frame({"jsonrpc": "2.0", "id": 1, "result": "x" * 200})
        for byte in reply:
            conn.sendall(bytes([byte]))
            time.sleep(0.05)

    with raw_server(trickle) as path, Client.connect(path, call_timeout=0.3) as c:
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            c.daemon.ping()
        assert 0.25 < time.monotonic() - started < 3  # the whole reply would take ~10 s


def test_call_timeout_when_the_daemon_takes_no_more_bytes() -> None:
    stop = threading.Event()

    def never_read(conn: socket.socket) -> None:
        stop.wait(10)

    with raw_server(never_read) as path, Client.connect(path, call_timeout=0.3) as c:
        started = time.monotonic()
        with pytest.raises(CallTimeout) as caught:
            c.events.append("g", "k", "x" * (16 * 1024 * 1024))  # more than the socket buffers
        assert 0.25 < time.monotonic() - started < 3
        assert "event.append" in str(caught.value)
        stop.set()


def test_a_pipeline_that_got_no_reply_says_why_in_each_result() -> None:
    with (
        fake_server(lambda r: CLOSE) as server,
        Client.connect(server.socket_path) as c,
        pytest.raises(ConnectionLost),
        c.pipeline() as p,
    ):
        put = p.call("goal.heartbeat", goal_id="g")
    with pytest.raises(ConnectionLost):
        put.result()  # not "has not been sent yet"


def test_a_client_used_by_two_threads_at_once_says_so() -> None:
    # Documented as not thread-safe: the second thread's call raises at once rather than
    # mix its bytes into the first one's stream (it hung, past the call timeout).
    release = threading.Event()

    def handler(request: dict[str, Any]) -> Any:
        release.wait(10)
        return result(request, "pong")

    with fake_server(handler) as server, Client.connect(server.socket_path) as c:
        first = threading.Thread(target=c.daemon.ping)
        first.start()
        deadline = time.monotonic() + 10
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="not thread-safe"):
            c.daemon.ping()
        release.set()
        first.join(10)
        assert c.daemon.ping() == "pong"  # one thread at a time is fine


def test_a_closed_client_runs_no_more_calls(daemon: Daemon) -> None:
    c = Client.connect(daemon.socket_path)
    c.close()
    with pytest.raises(ConnectionLost, match="the client was closed"):
        c.daemon.ping()


def test_late_reply_after_a_timeout_is_dropped() -> None:
    release = threading.Event()

    def handler(request: dict[str, Any]) -> Any:
        if request["params"]["n"] == 0:
            release.wait(5)  # answers only once the client has given up
        return result(request, request["params"]["n"])

    with fake_server(handler) as server, Client.connect(server.socket_path, call_timeout=0.2) as c:
        with pytest.raises(CallTimeout):
            c.call("echo", n=0)
        release.set()
        c.call_timeout = 5
        assert c.call("echo", n=1) == 1


def test_commit_outcome_unknown_when_the_connection_drops_during_commit() -> None:
    def handler(request: dict[str, Any]) -> Any:
        if request["method"] == "tx.commit":
            return CLOSE
        return result(request, {"active": True} if request["method"] == "tx.begin" else "ok")

    with fake_server(handler) as server, Client.connect(server.socket_path) as c:
        with pytest.raises(CommitOutcomeUnknown), c.transaction() as tx:
            tx.call("goal.heartbeat", goal_id="g")
        methods = [r["method"] for r in server.requests]
        assert methods.count("tx.commit") == 1  # never retried
        assert c.call("daemon.ping") == "ok"  # reconnected outside the transaction


def test_reconnect_after_a_daemon_restart() -> None:
    with short_dir() as directory:
        daemon = Daemon(directory).start()
        try:
            with Client.connect(daemon.socket_path) as c:
                gid = c.goals.create(make_goal()).goal_id
                daemon.stop()
                daemon.start()
                assert c.goals.heartbeat(gid).goal_id == gid  # a write: never delivered
                assert c.daemon.ping() == "pong"
                with pytest.raises(ConnectionLost), c.transaction() as tx:
                    tx.goals.heartbeat(gid)
                    daemon.stop()
                    daemon.start()
                    tx.goals.heartbeat(gid)
                assert c.goals.get(gid) is not None
        finally:
            daemon.stop()


def test_no_call_of_a_transaction_whose_connection_was_lost_runs_outside_it() -> None:
    with short_dir() as directory:
        daemon = Daemon(directory).start()
        try:
            with Client.connect(daemon.socket_path) as c:
                with pytest.raises(ConnectionLost), c.transaction() as tx:
                    tx.goals.create(make_goal("t1"))
                    daemon.stop()
                    daemon.start()
                    with pytest.raises(ConnectionLost):
                        tx.goals.create(make_goal("t2"))
                    # Caught and carried on: neither through tx nor on c itself (one session).
                    with pytest.raises(ConnectionLost):
                        tx.goals.create(make_goal("t3"))
                    with pytest.raises(ConnectionLost):
                        c.goals.create(make_goal("t4"))
                # The block is over (its commit raised): calls run on their own again.
                assert [c.goals.get(g) for g in ("t1", "t2", "t3", "t4")] == [None] * 4
                tx = c.transaction()
                tx.begin()
                tx.goals.create(make_goal("t5"))
                c.call("tx.commit")  # ended by hand: a later break does not hold c back
                daemon.stop()
                daemon.start()
                assert c.goals.get("t5") is not None
        finally:
            daemon.stop()


def test_a_request_over_the_daemons_limit_raises_its_error_and_is_not_sent_again() -> None:
    with short_dir() as directory:
        daemon = Daemon(directory, "--max-message-bytes", "200").start()
        try:
            with Client.connect(daemon.socket_path) as c:
                for call in (
                    lambda: c.goals.get("x" * 300),  # a read: would have been retried
                    lambda: c.goals.heartbeat("x" * 300),
                ):
                    with pytest.raises(DaemonError) as info:
                        call()
                    assert info.value.code == ErrorCode.INVALID_REQUEST
                    assert "exceeds the limit of 200 bytes" in str(info.value)
                assert c.daemon.ping() == "pong"  # on a new connection
            assert daemon.log_path.read_text().count("exceeds the limit") == 2  # each sent once
        finally:
            daemon.stop()


def test_after_an_error_that_closes_the_connection_the_next_call_opens_a_new_one() -> None:
    # The daemon answers a request over its size limit with an error of id null, then closes
    # the connection: a call sent on it before the close is seen would be lost ("may or may
    # not have been applied"). This server answers so and keeps the connection open.
    def handler(request: dict[str, Any]) -> Any:
        if request["method"] == "goal.get":
            error = {"code": -32600, "message": "too long; the connection is closed"}
            return {"jsonrpc": "2.0", "id": None, "error": error}
        return result(request, "pong")

    with fake_server(handler) as server, Client.connect(server.socket_path) as c:
        with pytest.raises(DaemonError):
            c.goals.get("g")
        assert c.daemon.ping() == "pong"
        assert len(server._connections) == 2


def test_a_request_over_the_daemons_limit_gets_its_error_and_is_not_sent_twice() -> None:
    # The daemon answers -32600 (with what to do) and closes while the client is still
    # sending: the send fails (EPIPE), and the error waits unread in the socket.
    with daemon_process("--max-message-bytes", "100000") as daemon:
        with Client.connect(daemon.socket_path) as c:
            gid = c.goals.create(make_goal()).goal_id
            events = [omkd_client.EventInput(kind="k", payload="x" * 1000) for _ in range(2000)]
            with pytest.raises(omkd_client.InvalidRequest) as refused:
                c.events.append_batch(gid, events)
            assert "max-message-bytes" in str(refused.value)
            assert refused.value.data["limit"] == 100_000
            assert c.events.get_by_goal(gid) == []  # and the next call opens a new connection
        log = daemon.log_path.read_text()
        assert log.count("exceeds the limit") == 1, log  # sent once, not again on a new one


def test_a_commit_never_sent_is_known_not_to_have_committed() -> None:
    sent = error_after_break(["tx.commit"], in_transaction=True, delivered=True, retried=False)
    assert isinstance(sent, CommitOutcomeUnknown)
    unsent = error_after_break(["tx.commit"], in_transaction=True, delivered=False, retried=False)
    assert type(unsent) is ConnectionLost and "nothing of it was committed" in str(unsent)


def test_resuming_a_subscription_that_had_no_event_yet_loses_nothing() -> None:
    with short_dir() as directory:
        daemon = Daemon(directory).start()
        try:
            with Client.connect(daemon.socket_path) as c, Client.connect(daemon.socket_path) as w:
                gid = c.goals.create(make_goal()).goal_id
                w.events.append(gid, "before", {})
                sub = c.events.subscribe(gid)  # only new events: none came yet
                daemon.stop()
                daemon.start()
                appended = w.events.append(gid, "while-away", {})
                with pytest.raises(ConnectionLost):
                    sub.get(timeout=10)
                resumed = c.events.subscribe(gid, after_event_id=sub.last_event_id)
                assert resumed.get(timeout=10) == appended
        finally:
            daemon.stop()


def test_timeouts_that_are_no_durations_are_refused() -> None:
    for bad in ({"call_timeout": -1}, {"call_timeout": 0}, {"connect_timeout": float("nan")}):
        with pytest.raises(ValueError, match="must be a positive number of seconds"):
            Client("/nonexistent.sock", **bad)
    assert Client("/nonexistent.sock", call_timeout=None).call_timeout is None  # no limit


def test_a_transaction_not_begun_or_ended_says_so(client: Client) -> None:
    tx = client.transaction()
    with pytest.raises(NoTransaction, match="has not begun"):
        tx.goals.get("g")
    tx.begin()
    tx.rollback()
    for call in (lambda: tx.goals.get("g"), tx.commit, tx.rollback):
        with pytest.raises(NoTransaction, match="already ended"):
            call()
    assert client.daemon.ping() == "pong"


def test_results_decode_into_the_shared_records(client: Client) -> None:
    goal = client.goals.create(make_goal())
    assert isinstance(goal, omkd_client.GoalRecord)
    assert msgspec.json.decode(msgspec.json.encode(goal), type=omkd_client.GoalRecord) == goal
    assert isinstance(client.goals.list(limit=1)[0], omkd_client.GoalSummary)


def test_socket_path_from_the_environment(daemon: Daemon, monkeypatch: Any) -> None:
    monkeypatch.setenv("OMKD_SOCKET", str(daemon.socket_path))
    with omkd_client.connect() as c:
        assert c.socket_path == Path(daemon.socket_path)
        assert c.daemon.ping() == "pong"


def test_an_abstract_socket_named_as_the_daemon_reports_it_is_reached(capsys: Any) -> None:
    # A systemd socket bound in the abstract namespace is reported as "@name"; clients
    # given that name looked for a file of it ("No such file or directory").
    name = unique("omkd-abstract")

    def handler(request: dict[str, Any]) -> Any:
        return result(request, "pong")

    with fake_server(handler, abstract=name) as server:
        assert str(server.socket_path) == f"@{name}"
        with Client.connect(f"@{name}") as c:
            assert c.daemon.ping() == "pong"
        assert omkctl_main(["--socket", f"@{name}", "call", "daemon.ping"]) == 0
        assert json.loads(capsys.readouterr().out) == "pong"
