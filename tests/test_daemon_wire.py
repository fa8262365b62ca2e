"""The wire over a real socket: framings, JSON-RPC 2.0 corners, limits and hostile input."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omkd.rpc import session as session_module
from omkd.rpc.dispatch import Dispatcher
from omkd.rpc.framing import Framing
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, goal, running_daemon, short_tempdir

PING = {"jsonrpc": "2.0", "method": "daemon.ping", "id": 1}
LIMIT = 64 * 1024


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory, max_message_bytes=LIMIT) as d:
            yield d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[RawClient]:
    c = await RawClient.connect(daemon.config.socket_path)
    yield c
    await c.aclose()


async def test_socket_and_directory_modes(daemon: Daemon) -> None:
    path = daemon.config.socket_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(path).st_mode)


async def test_created_directories_are_private() -> None:
    with short_tempdir() as directory:
        nested = directory / "a" / "b"
        async with running_daemon(directory, socket_path=str(nested / "omkd.sock")):
            for d in (directory / "a", nested):
                assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700  # mkdtemp's, untouched


async def test_line_mode(daemon: Daemon) -> None:
    c = await RawClient.connect(daemon.config.socket_path, Framing.LINE)
    try:
        await c.send_bytes(
            b'{"jsonrpc":"2.0","method":"daemon.ping","id":"a"}\n'
            b'[{"jsonrpc":"2.0","method":"daemon.ping","id":1},'
            b'{"jsonrpc":"2.0","method":"daemon.ping"}]\n'
        )
        raw = await c.recv_raw()
        assert raw == b'{"jsonrpc":"2.0","result":"pong","id":"a"}'
        assert json.loads(await c.recv_raw() or b"") == [
            {"jsonrpc": "2.0", "result": "pong", "id": 1}
        ]
        await c.send_bytes(b"this is not json\n")
        assert (await c.recv())["error"]["code"] == ErrorCode.PARSE_ERROR
        await c.send(PING)
        assert (await c.recv())["result"] == "pong"
    finally:
        await c.aclose()


@pytest.mark.parametrize("request_id", ["s", 0, -5, 2**62, 1.5, None])
async def test_any_id_type_echoed(client: RawClient, request_id: object) -> None:
    await client.send({**PING, "id": request_id})
    assert (await client.recv()) == {"jsonrpc": "2.0", "result": "pong", "id": request_id}


async def test_invalid_id_type(client: RawClient) -> None:
    await client.send({**PING, "id": {"no": 1}})
    reply = await client.recv()
    assert reply["error"]["code"] == ErrorCode.INVALID_REQUEST and reply["id"] is None


async def test_notifications_get_no_reply(client: RawClient) -> None:
    await client.send({"jsonrpc": "2.0", "method": "goal.create", "params": goal("g1")})
    await client.send({"jsonrpc": "2.0", "method": "no.such.method"})
    await client.send([{"jsonrpc": "2.0", "method": "daemon.ping"}])  # a batch of notifications
    await client.send(PING)
    assert (await client.recv()) == {"jsonrpc": "2.0", "result": "pong", "id": 1}
    assert (await client.call("goal.get", goal_id="g1"))["goal_id"] == "g1"


async def test_batch_with_bad_elements(client: RawClient) -> None:
    await client.send(
        [
            {"jsonrpc": "2.0", "method": "daemon.ping", "id": 1},
            5,
            {"jsonrpc": "2.0", "method": "nope", "id": 2},
            {"jsonrpc": "2.0", "method": "daemon.ping"},
            {"jsonrpc": "1.0", "method": "daemon.ping", "id": 3},
            {"jsonrpc": "2.0", "method": "goal.get", "params": {"goal_id": 1}, "id": 4},
        ]
    )
    replies = await client.recv()
    assert [r.get("id") for r in replies] == [1, None, 2, 3, 4]  # any id that could be read
    codes = [r["error"]["code"] if "error" in r else None for r in replies]
    assert codes == [
        None,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.METHOD_NOT_FOUND,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_PARAMS,
    ]


async def test_empty_batch(client: RawClient) -> None:
    await client.send(b"[]")
    assert (await client.recv())["error"]["code"] == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ErrorCode.PARSE_ERROR),
        (b"{", ErrorCode.PARSE_ERROR),
        (b"\xff\xfe{}", ErrorCode.PARSE_ERROR),
        (
            b'{"jsonrpc":"2.0","method":"goal.get","id":null,"params":{"goal_id":"\xff"}}',
            ErrorCode.PARSE_ERROR,
        ),
        # An id is echoed as it came, so it is checked like the rest (a write not run).
        (
            b'{"jsonrpc":"2.0","method":"goal.delete","id":"\xff","params":{"goal_id":"g"}}',
            ErrorCode.PARSE_ERROR,
        ),
        (b"1e999", ErrorCode.INVALID_REQUEST),  # valid JSON, too big for a float, no request
        (b'"just a string"', ErrorCode.INVALID_REQUEST),
        (b'{"method":"daemon.ping","id":1}', ErrorCode.INVALID_REQUEST),
        (
            b'{"jsonrpc":"2.0","method":"daemon.ping","id":1,"extra":true}',
            ErrorCode.INVALID_REQUEST,
        ),
    ],
)
async def test_malformed_messages_keep_the_connection(
    client: RawClient, payload: bytes, code: int
) -> None:
    await client.send(payload)
    reply = await client.recv()
    assert reply["error"]["code"] == code and reply["id"] is None
    await client.send(PING)
    assert (await client.recv())["result"] == "pong"


async def test_oversize_frame_answers_then_closes(client: RawClient) -> None:
    await client.send(PING)
    await client.send_bytes(struct.pack(">I", LIMIT + 1))
    assert (await client.recv())["result"] == "pong"  # earlier requests are answered first
    reply = await client.recv()
    assert reply["error"]["code"] == ErrorCode.INVALID_REQUEST and reply["id"] is None
    assert reply["error"]["data"] == {
        "field": None,
        "detail": "the message is longer than the limit",
        "size": LIMIT + 1,
        "limit": LIMIT,
    }
    assert await client.recv_raw() is None  # closed


async def test_oversize_line_closes(daemon: Daemon) -> None:
    c = await RawClient.connect(daemon.config.socket_path, Framing.LINE)
    try:
        await c.send_bytes(b"{" + b" " * (LIMIT + 10))
        assert (await c.recv())["error"]["code"] == ErrorCode.INVALID_REQUEST
        assert await c.recv_raw() is None
    finally:
        await c.aclose()


async def test_deep_nesting_and_huge_values(client: RawClient) -> None:
    await client.call("goal.create", **goal("g1"))
    for depth in (100, 20_000):  # 20,000 levels fit in the 64 KiB limit
        deep = b"[" * depth + b"1" + b"]" * depth
        await client.send(
            b'{"jsonrpc":"2.0","method":"event.append","id":7,"params":'
            b'{"goal_id":"g1","kind":"deep","payload":' + deep + b"}}"
        )
        reply = await client.recv()
        if depth == 100:
            assert reply["result"]["kind"] == "deep"
        else:
            assert reply["error"]["code"] in (ErrorCode.PARSE_ERROR, ErrorCode.INVALID_PARAMS)
    huge = {"n": 10**300, "s": "x" * 40_000, "f": 1e308}
    stored = await client.call("event.append", goal_id="g1", kind="k", payload=huge)
    assert stored["payload"] == huge
    await client.send(
        b'{"jsonrpc":"2.0","method":"goal.get","params":{"goal_id":"g1"},"id":' + b"9" * 400 + b"}"
    )
    reply = await client.recv()
    assert "error" in reply or reply["result"]["goal_id"] == "g1"
    assert await client.call("daemon.ping") == "pong"


async def test_half_sent_message_does_not_delay_others(daemon: Daemon) -> None:
    slow = await RawClient.connect(daemon.config.socket_path)
    fast = await RawClient.connect(daemon.config.socket_path)
    try:
        await slow.send_bytes(struct.pack(">I", 100) + b'{"jsonrpc"')
        with trio.fail_after(1):
            assert await fast.call("daemon.ping") == "pong"
            await fast.call("goal.create", **goal("g1"))
    finally:
        await slow.aclose()
        await fast.aclose()


async def test_a_message_left_unfinished_ends_its_connection_after_the_message_timeout() -> None:
    with short_tempdir() as directory:
        async with running_daemon(directory, message_timeout=0.2) as daemon:
            slow = await RawClient.connect(daemon.config.socket_path)
            other = await RawClient.connect(daemon.config.socket_path)
            await slow.send(PING)  # a whole message first: answered as ever
            assert (await slow.recv())["result"] == "pong"
            started = trio.current_time()
            await slow.send_bytes(struct.pack(">I", 100) + b'{"jsonrpc"')
            for _ in range(3):  # others go on meanwhile
                assert await other.call("daemon.ping") == "pong"
            with trio.fail_after(10):
                refused = await slow.recv()
                assert await slow.recv_raw() is None  # then the connection is closed
            assert trio.current_time() - started >= 0.2
            assert refused["error"]["code"] == ErrorCode.INVALID_REQUEST
            assert refused["error"]["data"]["received"] == 14
            assert await other.call("daemon.ping") == "pong"
            await slow.aclose()
            await other.aclose()


async def test_random_bytes_never_kill_the_daemon(daemon: Daemon) -> None:
    rng = __import__("random").Random(1)
    for _ in range(30):
        c = await RawClient.connect(daemon.config.socket_path)
        await c.send_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        await c.aclose()
    c = await RawClient.connect(daemon.config.socket_path)
    assert await c.call("daemon.ping") == "pong"
    await c.aclose()


class _NullSession:
    """A session for the bare dispatcher: reads and writes answer from nothing."""

    aborted = False
    long_read_next = False

    def peer_gone(self) -> bool:
        return False

    def run_read(self, method: object, params: object, time_limit: object = None) -> None:
        return None

    async def run_write(self, method: object, params: object) -> None:
        return None

    def pending_commit(self) -> None:
        return None

    async def settle(self) -> None:
        return None

    def __getattr__(self, name: str) -> object:  # tx_begin, subscribe, status, ...
        async def session_method(*args: object) -> None:
            return None

        return session_method


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda m, p, i: json.dumps(
                {"jsonrpc": "2.0", "method": m, "params": p, "id": i}
            ).encode(),
            st.sampled_from(sorted(Dispatcher().methods)),
            json_values,
            st.integers() | st.text() | st.none(),
        ),
    )
)
def test_dispatcher_answers_anything_well_formed(message: bytes) -> None:
    reply = trio.run(Dispatcher().handle, message, _NullSession())
    if reply is None:
        return
    decoded = json.loads(reply)
    for item in decoded if isinstance(decoded, list) else [decoded]:
        assert item["jsonrpc"] == "2.0" and "id" in item
        assert ("result" in item) != ("error" in item)
        if "error" in item:
            assert item["error"]["code"] in {int(c) for c in ErrorCode}
            assert item["error"]["code"] != ErrorCode.INTERNAL_ERROR, item
            assert isinstance(item["error"].get("data"), dict), item


class _AbortedSession(_NullSession):
    aborted = True


def request(method: str, params: object = None) -> bytes:
    message: dict[str, object] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


async def test_a_client_gone_before_its_reply_is_not_logged_as_stalled(
    daemon: Daemon, client: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends and closes at once (socat -u, a killed omk) has its reply fail
    with a broken pipe: the daemon drops the connection quietly, instead of warning that the
    client left its replies unread for the stall timeout (which never passed)."""
    caplog.set_level(logging.DEBUG, logger="omkd.connection")
    for message in (b"{not json", json.dumps([PING]).encode()):  # answered off the poller
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gone.connect(str(daemon.config.socket_path))
        gone.sendall(struct.pack(">I", len(message)) + message)
        gone.close()  # no checkpoint since the send: the daemon reads after this
        await trio.testing.wait_all_tasks_blocked()
    assert await client.call("daemon.ping") == "pong"
    assert caplog.text.count("client gone before its replies were sent") == 2
    assert "unread" not in caplog.text
    assert len(daemon.sessions) == 1


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("goal.get", {"goal_id": "g1"}),
        ("goal.get", {"goal_id": 1}),  # wrong type
        ("goal.get", {}),  # missing field
        ("goal.get", None),  # no params at all
        ("goal.list", {"nope": 1}),  # unknown field
        ("goal.create", [1, 2]),  # positional
        ("event.append", {"goal_id": "g1", "kind": "k", "payload": 1}),
        ("tx.begin", {"extra": True}),
    ],
)
async def test_aborted_session_answers_aborted_whatever_the_params(
    method: str, params: object
) -> None:
    reply = json.loads(await Dispatcher().handle(request(method, params), _AbortedSession()) or b"")
    assert reply["error"]["code"] == ErrorCode.TRANSACTION_ABORTED
    assert reply["error"]["data"] == {"method": method}


async def test_aborted_session_still_decodes_the_params_of_what_it_answers() -> None:
    session, dispatcher = _AbortedSession(), Dispatcher()
    for method in ("tx.rollback", "tx.commit", "daemon.ping", "rpc.discover"):
        reply = json.loads(await dispatcher.handle(request(method), session) or b"")
        assert "result" in reply, reply
        reply = json.loads(await dispatcher.handle(request(method, {"x": 1}), session) or b"")
        assert reply["error"]["code"] == ErrorCode.INVALID_PARAMS


@pytest.mark.parametrize(
    ("payload", "data"),
    [
        (b"this is not json",  # "t" might begin true: the error is at "i"
         {"detail": "JSON is malformed: invalid character (byte 4)", "byte": 4}),
        (b'{"jsonrpc":"2.0","method":"daemon.ping","id":1} x',
         {"detail": "JSON is malformed: trailing characters (byte 49)", "byte": 49}),
        (b"{", {"detail": "Input data was truncated"}),
        (b'{"jsonrpc":"\xff"}', {"detail": "not valid UTF-8: invalid start byte"}),
        (b'{"jsonrpc":"2.0","method":"m","params":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
         {"detail": "nested too deeply"}),
        (b"[{", {"detail": "Input data was truncated"}),
    ],
    ids=["not-json", "trailing", "truncated", "not-utf8", "too-deep", "truncated-batch"],
)  # fmt: skip
async def test_parse_error_data(payload: bytes, data: dict[str, object]) -> None:
    reply = json.loads(await Dispatcher().handle(payload, _NullSession()) or b"")
    assert reply["error"]["code"] == ErrorCode.PARSE_ERROR and reply["id"] is None
    assert reply["error"]["data"] == data


async def test_parse_error_in_params_data() -> None:
    payload = b'{"jsonrpc":"2.0","method":"goal.get","id":1,"params":{"goal_id":"\xff"}}'
    reply = json.loads(await Dispatcher().handle(payload, _NullSession()) or b"")
    assert reply["error"]["code"] == ErrorCode.PARSE_ERROR
    assert reply["error"]["data"] == {
        "method": "goal.get",
        "detail": "not valid UTF-8: invalid start byte",
    }


@pytest.mark.parametrize(
    ("payload", "data", "id"),
    [
        (b'"just a string"', {"field": None, "detail": "Expected `object`, got `str`"}, None),
        (b"1e999", {"field": None, "detail": "Number out of range"}, None),
        (b'{"method":"daemon.ping","id":1}',
         {"field": "jsonrpc", "detail": "Object missing required field `jsonrpc`"}, None),
        (b'{"jsonrpc":"2.0","method":"daemon.ping","id":1,"extra":true}',
         {"field": "extra", "detail": "Object contains unknown field `extra`"}, None),
        (b'{"jsonrpc":2,"method":"daemon.ping","id":1}',
         {"field": "jsonrpc", "detail": "Expected `str`, got `int` - at `$.jsonrpc`"}, None),
        # The envelope was read: its id goes back with the error.
        (b'{"jsonrpc":"1.0","method":"daemon.ping","id":"a"}',
         {"field": "jsonrpc", "detail": 'must be "2.0"'}, "a"),
        (b'{"jsonrpc":"2.0","method":"daemon.ping","id":{"no":1}}',
         {"field": "id", "detail": "must be a string, a number or null"}, None),
        (b"[]", {"field": None, "detail": "the batch is empty"}, None),
    ],
    ids=["string", "number", "no-jsonrpc", "extra", "jsonrpc-type", "jsonrpc-1.0", "id-object",
         "empty-batch"],
)  # fmt: skip
async def test_invalid_request_data(payload: bytes, data: dict[str, object], id: object) -> None:
    reply = json.loads(await Dispatcher().handle(payload, _NullSession()) or b"")
    assert reply["error"]["code"] == ErrorCode.INVALID_REQUEST and reply["id"] == id
    assert reply["error"]["data"] == data


async def test_a_long_batch_lets_the_other_connections_be_served_meanwhile() -> None:
    count = 5_000
    with short_tempdir() as directory:
        async with running_daemon(directory) as daemon:
            batcher = await RawClient.connect(daemon.config.socket_path)
            other = await RawClient.connect(daemon.config.socket_path)
            await other.call("goal.create", **goal("g1"))
            await batcher.send(
                [
                    {
                        "jsonrpc": "2.0",
                        "method": "event.append",
                        "params": {"goal_id": "g1", "kind": "k", "payload": i},
                        "id": i,
                    }
                    for i in range(count)
                ]
            )
            with trio.fail_after(60):
                while not (newest := await other.call("event.get_by_goal", goal_id="g1", tail=1)):
                    pass
                # Answered while the batch went on: before its last append.
                assert newest[0]["payload"] < count - 1
                replies = await batcher.recv()
            assert [r["id"] for r in replies] == list(range(count))
            assert all("result" in r for r in replies)
            await batcher.aclose()
            await other.aclose()


def _batch(
    calls: list[tuple[str, dict[str, object]]], notify: set[int] = frozenset()
) -> list[object]:
    return [
        {"jsonrpc": "2.0", "method": m, "params": p, **({} if i in notify else {"id": i})}
        for i, (m, p) in enumerate(calls)
    ]


async def test_a_batch_whose_replies_pass_the_bound_runs_no_more_of_its_calls() -> None:
    # 100 pages of a whole log in a 9 KB batch: its one reply was held whole, copied, and
    # took 7 GB. Past batch_reply_bytes the rest is not run, each call told so.
    with short_tempdir() as directory:
        async with running_daemon(directory, batch_reply_bytes=100_000) as daemon:
            client = await RawClient.connect(daemon.config.socket_path)
            await client.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": "p" * 300} for _ in range(100)]
            await client.call("event.append_batch", goal_id="g1", events=events)  # ~40 KB a page
            page = ("event.get_by_goal", {"goal_id": "g1"})
            append = ("event.append", {"goal_id": "g1", "kind": "late", "payload": 0})
            await client.send(_batch([page] * 4 + [append, page, append], notify=frozenset({6})))
            with trio.fail_after(10):
                replies = await client.recv()
            assert [r["id"] for r in replies] == [0, 1, 2, 3, 4, 5]  # (6: a notification)
            assert all(len(r["result"]) == 100 for r in replies[:3])
            for refused in replies[3:]:
                assert refused["error"]["code"] == ErrorCode.INVALID_REQUEST
                assert "batch_reply_bytes" in refused["error"]["message"]
                assert refused["error"]["data"]["limit"] == 100_000
            stored = await client.call("event.get_by_goal", goal_id="g1")
            assert len(stored) == 100 and {e["kind"] for e in stored} == {"k"}  # none "late"
            await client.aclose()


async def test_a_batch_whose_client_has_gone_runs_its_writes_not_its_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its client closed at once: the daemon ran the whole batch for nobody (42 s of reads).
    # Its writes and notifications were sent to be run, and still are; its reads are not.
    reads = 0
    run_read = session_module.Session.run_read

    def counted(self: session_module.Session, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return run_read(self, *args, **kwargs)

    monkeypatch.setattr(session_module.Session, "run_read", counted)
    with short_tempdir() as directory:
        async with running_daemon(directory, batch_slice=0.0005) as daemon:
            other = await RawClient.connect(daemon.config.socket_path)
            await other.call("goal.create", **goal("g1"))
            gone = await RawClient.connect(daemon.config.socket_path)
            calls: list[tuple[str, dict[str, object]]] = []
            for i in range(4000):
                append = {"goal_id": "g1", "kind": "k", "payload": i}
                calls += [("goal.get", {"goal_id": "g1"}), ("event.append", append)]
            # The appends are notifications (no id), all but the last, which has one.
            notify = frozenset(range(1, len(calls) - 1, 2))
            await gone.send(_batch(calls, notify=notify))
            await gone.aclose()
            with trio.fail_after(60):  # until its session has ended
                while (await other.call("daemon.status"))["sessions"] > 1:
                    await trio.sleep(0.01)
            appended = await other.call("event.get_by_goal", goal_id="g1", limit=5000)
            assert [e["payload"] for e in appended] == list(range(4000))
            assert reads < 4000  # (a few before it looked, and the status calls)
            await other.aclose()
