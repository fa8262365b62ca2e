"""The sync client: a blocking stdlib socket around the sans-IO ``ClientProtocol``.

Theory of operation. The client owns at most one connection (one daemon session). A call
sends its request and reads frames until its reply comes; notifications read meanwhile are
buffered for their subscription, and replies to abandoned (timed-out) requests are dropped.
Nothing reads in the background: a subscription's events are read when it is iterated.

Resource handling: ``close`` (or leaving the ``with`` block) closes the socket; the daemon
then rolls back a transaction left open. Error handling: ``OSError`` from the socket is
translated in ``_exchange`` alone, into a reconnect (outside a transaction, when the calls
are safe to send again) or into ``ConnectionLost``/``CommitOutcomeUnknown``.

Not thread-safe: give each thread its own client.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec

from omkd_client import ops
from omkd_client.errors import (
    ConnectionLost,
    DaemonNotRunning,
    NoTransaction,
    OmkdError,
    ProtocolError,
    SubscriptionClosed,
)
from omkd_client.ops import BackupResult, Op
from omkd_client.paths import resolve_socket_path, socket_address
from omkd_client.protocol import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    NEED_DATA,
    ClientProtocol,
    Lost,
    Reply,
    SubscriptionEnded,
    SubscriptionItem,
    checked_timeouts,
    error_after_abandoning,
    error_after_break,
)
from omkd_client.records import EventRecord
from omkd_client.repos import Artifacts, Budgets, Daemon, Events, Goals, Proofs, Tasks

__all__ = ["Client", "Pending", "Pipeline", "Subscription", "Transaction", "connect"]

T = TypeVar("T")

# One read takes at most this much. It goes into a buffer the client keeps: ``recv`` of this
# size would allocate it anew every call, and glibc serves an allocation over 128 KiB with
# mmap (then mremap, munmap and a page fault), which doubled a call's client CPU time.
_RECEIVE_BYTES: Final = 256 * 1024
# The socket's timeout is set again only when the time a wait may take moves further than
# this from it: each setting is an ioctl, and a call would otherwise make two. A wait may
# then last this much past its call's deadline.
_TIMEOUT_SLACK_S: Final = 0.01
# Requests up to this size go out in one sendall: the socket's buffer takes them whole. A
# longer run is sent while the replies that come meanwhile are read: the daemon answers
# in order and reads no further while a reply waits for room, so 2,500 pipelined calls
# sent whole waited on themselves.
_SEND_WHOLE_BYTES: Final = 64 * 1024


class _Broken(Exception):
    """The connection broke while reading replies (internal)."""


class _Calls:
    """What a client and a transaction share: the repositories over a runner."""

    def _bind(self, client: Client) -> None:
        self.goals = Goals(self._run)
        self.tasks = Tasks(self._run)
        self.events = Events(self._run, client._subscribe)
        self.proofs = Proofs(self._run)
        self.budgets = Budgets(self._run)
        self.artifacts = Artifacts(self._run)
        self.daemon = Daemon(self._run)

    def _run(self, op: Op[T]) -> T:
        raise NotImplementedError

    def call(self, method: str, /, **params: Any) -> Any:
        """Call any method with named params; return its result as plain JSON.

        Raises a DaemonError subclass for the daemon's error, a TransportError otherwise.
        """
        return self._run(ops.generic(method, params))

    def backup(self, dest: str | Path) -> BackupResult:
        """Write a consistent copy of the database to ``dest`` (an absolute path)."""
        return self._run(ops.db_backup(str(dest)))

    def discover(self) -> dict[str, Any]:
        """Return the daemon's OpenRPC document."""
        return self._run(ops.rpc_discover())


class Client(_Calls):
    """A connection to omkd. Use ``Client.connect(...)`` (or ``omkd_client.connect``).

    Repositories: ``goals``, ``tasks``, ``events``, ``proofs``, ``budgets``, ``artifacts``,
    ``daemon``; ``call`` for any method; ``transaction()``, ``call_many``, ``pipeline()``.
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        checked_timeouts(connect_timeout, call_timeout)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._protocol = ClientProtocol()
        self._sock: socket.socket | None = None
        self._readable = select.poll()  # POLLIN of _sock, once connected
        self._chunk = bytearray(_RECEIVE_BYTES)  # see _RECEIVE_BYTES
        # Counts connections opened and lost: a transaction belongs to one.
        self._generation = 0
        self._closed = False
        # Held during a call: a second thread's call raises instead of mixing up the stream.
        self._in_use = threading.Lock()
        # The Transaction open on this client, until it ends: once its connection is lost,
        # calls on the client raise instead of running outside it.
        self._transaction: Transaction | None = None
        self._bind(self)

    @classmethod
    def connect(
        cls,
        socket_path: str | Path | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> Client:
        """Return a connected client (a context manager that closes it).

        ``socket_path`` defaults as the daemon's does (``$OMKD_SOCKET``, the XDG path).
        Raises DaemonNotRunning when nothing accepts on the socket in ``connect_timeout``.
        """
        client = cls(socket_path, connect_timeout=connect_timeout, call_timeout=call_timeout)
        client._open()
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; an open transaction is rolled back by the daemon. Calls
        made afterwards raise ConnectionLost."""
        self._closed = True
        if self._sock is not None:
            self._drop("the client was closed")

    @property
    def in_transaction(self) -> bool:
        return self._protocol.in_transaction

    # -- calls

    def _run(self, op: Op[T]) -> T:
        reply = self._exchange([(op.method, op.params)])[0]
        if reply.error is not None:
            raise reply.error
        assert reply.result is not None
        return _decode(op, reply.result)

    def call_many(
        self,
        calls: Sequence[tuple[str, Mapping[str, Any] | None]],
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send every call before reading any reply (pipelining); return results in order.

        With ``return_exceptions`` a failed call's DaemonError takes its place in the list;
        otherwise the first one is raised once all replies are in.
        """
        requests = [(m, dict(p) if p else None) for m, p in calls]
        results: list[Any] = []
        for reply in self._exchange(requests):
            if reply.error is not None:
                if not return_exceptions:
                    raise reply.error
                results.append(reply.error)
            else:
                assert reply.result is not None
                results.append(msgspec.json.decode(reply.result))
        return results

    def pipeline(self) -> Pipeline:
        """Collect calls and send them together when the ``with`` block ends."""
        return Pipeline(self)

    def transaction(self) -> Transaction:
        """A transaction as a context manager: commit on success, roll back on exception."""
        return Transaction(self)

    # -- the connection

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(socket_address(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonNotRunning(self.socket_path, exc.strerror or str(exc)) from exc
        except TimeoutError as exc:
            sock.close()
            raise DaemonNotRunning(
                self.socket_path, f"no answer in {self.connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            sock.close()
            raise DaemonNotRunning(self.socket_path, exc.strerror or str(exc)) from exc
        self._sock = sock
        self._readable = select.poll()  # kept with the socket: one poll(2) a call, no setup
        self._readable.register(sock, select.POLLIN)
        self._generation += 1

    def _set_timeout(self, seconds: float | None) -> None:
        assert self._sock is not None
        current = self._sock.gettimeout()
        if current is None or seconds is None:
            if current is seconds:
                return
        elif abs(current - seconds) <= _TIMEOUT_SLACK_S:
            return
        self._sock.settimeout(seconds)

    def _alive(self) -> bool:
        """True if the socket is open and the daemon has not closed its end."""
        if self._sock is None:
            return False
        # poll, not a non-blocking recv: a socket with a timeout waits before any recv.
        if not self._readable.poll(0):
            return True
        try:
            data = self._sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return False
        return bool(data)

    def _drop(self, reason: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._generation += 1  # what belonged to that connection is gone with it
        if not self._protocol.in_transaction:
            self._transaction = None  # it had ended on the wire (a tx.commit sent by call)
        self._protocol.connection_lost(reason)

    def _exchange(self, requests: list[tuple[str, Any]]) -> list[Reply]:
        """Send ``requests`` together, then return their replies in the same order."""
        if not self._in_use.acquire(blocking=False):
            raise _shared_between_threads()
        try:
            return self._exchange_alone(requests)
        finally:
            self._in_use.release()

    def _exchange_alone(self, requests: list[tuple[str, Any]]) -> list[Reply]:
        # Loops, not comprehensions: on Python 3.11 each comprehension makes a function
        # object, and most calls are one request.
        if self._closed:
            raise ConnectionLost("the client was closed")
        transaction = self._transaction
        if transaction is not None and transaction._generation != self._generation:
            raise ConnectionLost(
                "the connection of the open transaction was lost, and the daemon rolled it "
                "back: end the transaction (leave its block, or roll it back) before calling "
                "again"
            )
        retried = False
        while True:
            in_transaction = self._protocol.in_transaction
            if self._protocol.closing or not self._alive():  # (closing: it is about to)
                self._drop("the daemon closed the connection")
                if in_transaction:
                    raise error_after_break(
                        _methods(requests), in_transaction=True, delivered=False, retried=False
                    ) or ConnectionLost("the connection was lost")
                self._open()
            ids: list[int] = []
            frames: list[bytes] = []
            for method, params in requests:
                request_id, frame = self._protocol.send_request(method, params)
                ids.append(request_id)
                frames.append(frame)
            delivered = False
            try:
                assert self._sock is not None
                self._set_timeout(self.call_timeout)
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                if len(data) <= _SEND_WHOLE_BYTES:
                    self._sock.sendall(data)
                else:
                    self._send_reading(data)
                delivered = True
                return self._read_replies(ids)
            except (_Broken, ProtocolError, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    for request_id in ids:
                        self._protocol.abandon(request_id)
                    close, timed_out = error_after_abandoning(
                        _methods(requests),
                        in_transaction=in_transaction,
                        timeout=self.call_timeout,
                    )
                    if close or not delivered:  # (a frame may be half sent)
                        self._drop("a call timed out" if delivered else "timed out while sending")
                    raise timed_out from exc
                # A send cut short: what the daemon answered first is here (-32600 for a
                # request over its size limit). Of several requests the first ones may have
                # run: they count as delivered, never sent twice.
                answered = None if delivered else self._salvage(ids)
                self._drop(f"connection lost: {exc}")
                if answered is not None:
                    return answered
                error = error_after_break(
                    _methods(requests),
                    in_transaction=in_transaction,
                    delivered=delivered or len(ids) > 1,
                    retried=retried,
                )
                if error is not None:
                    raise error from exc
                retried = True
                self._open()

    def _salvage(self, ids: list[int]) -> list[Reply] | None:
        """After a send the daemon cut short by closing: the replies it sent first, if every
        request got one. (A request over its size limit: it answers -32600, saying what to
        do, then closes while the rest of the request is still being sent.)"""
        assert self._sock is not None
        try:
            self._sock.setblocking(False)  # the daemon has closed: what it sent is here
            while size := self._sock.recv_into(self._chunk):
                self._protocol.receive_data(memoryview(self._chunk)[:size])
        except OSError:  # nothing more (BlockingIOError), or reset
            pass
        replies: dict[int, Reply] = {}
        try:
            while (event := self._protocol.next_event()) is not NEED_DATA:
                if isinstance(event, Reply):
                    replies[event.id] = event
        except ProtocolError:
            return None
        if not all(request_id in replies for request_id in ids):
            return None
        return [replies[request_id] for request_id in ids]

    def _send_reading(self, data: bytes) -> None:
        """Send ``data`` (a long run of requests) while reading the replies that come
        meanwhile into the protocol; TimeoutError past the call timeout."""
        sock = self._sock
        assert sock is not None
        deadline = None if self.call_timeout is None else time.monotonic() + self.call_timeout
        both = select.poll()
        both.register(sock, select.POLLIN | select.POLLOUT)
        view = memoryview(data)
        sent = 0
        sock.setblocking(False)
        try:
            while sent < len(view):
                wait_ms = None if deadline is None else (deadline - time.monotonic()) * 1000
                if (wait_ms is not None and wait_ms <= 0) or not both.poll(wait_ms):
                    raise TimeoutError
                try:
                    size = sock.recv_into(self._chunk)
                except BlockingIOError:
                    pass
                else:
                    if not size:
                        raise _Broken("the daemon closed the connection")
                    self._protocol.receive_data(memoryview(self._chunk)[:size])
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(view[sent:])
        finally:
            sock.settimeout(self.call_timeout)

    def _read_replies(self, ids: list[int]) -> list[Reply]:
        wanted = set(ids)
        replies: dict[int, Reply] = {}
        deadline = None if self.call_timeout is None else time.monotonic() + self.call_timeout
        while wanted:
            event = self._protocol.next_event()
            if isinstance(event, Reply):
                if event.id in wanted:
                    wanted.discard(event.id)
                    replies[event.id] = event
                continue
            if event is NEED_DATA:
                self._receive(deadline)
        return list(map(replies.__getitem__, ids))

    def _receive(self, deadline: float | None) -> None:
        """Read once into the protocol; raise TimeoutError past ``deadline``, _Broken at EOF."""
        assert self._sock is not None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._set_timeout(remaining)
        else:
            self._set_timeout(None)
        size = self._sock.recv_into(self._chunk)
        if not size:
            raise _Broken("the daemon closed the connection")
        self._protocol.receive_data(memoryview(self._chunk)[:size])

    # -- subscriptions

    def _subscribe(self, goal_id: str | None, after_event_id: int | None) -> Subscription:
        subscribed = self._run(ops.event_subscribe(goal_id, after_event_id))
        subscription = subscribed.subscription
        queue = self._protocol.subscriptions.claim(subscription)
        return Subscription(self, subscription, queue, self._generation, subscribed.after_event_id)

    def _next_item(
        self, queue: deque[SubscriptionItem], timeout: float | None
    ) -> SubscriptionItem | None:
        """The subscription's next buffered item, reading as needed; None on timeout."""
        if not self._in_use.acquire(blocking=False):
            raise _shared_between_threads()
        try:
            return self._next_item_alone(queue, timeout)
        finally:
            self._in_use.release()

    def _next_item_alone(
        self, queue: deque[SubscriptionItem], timeout: float | None
    ) -> SubscriptionItem | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if queue:
                return queue.popleft()
            if self._sock is None:
                return Lost("the connection was closed")
            try:
                event = self._protocol.next_event()
                if event is NEED_DATA:
                    self._receive(deadline)
            except TimeoutError:
                return None
            except (_Broken, ProtocolError, OSError) as exc:
                self._drop(f"connection lost: {exc}")
                return Lost(str(exc))


class Transaction(_Calls):
    """The session's transaction. Its repositories and ``call`` run inside it; so do calls
    made on the client meanwhile (one connection is one session). Never retried: a broken
    connection raises ConnectionLost, or CommitOutcomeUnknown during ``commit``."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._generation: int | None = None
        self._done = False
        self._bind(client)

    def __enter__(self) -> Transaction:
        self.begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self._rollback_quietly()

    def begin(self) -> None:
        """Send ``tx.begin``: TransactionActive if the session has one, Busy after the
        daemon's lock timeout."""
        client = self._client
        client._run(ops.tx("tx.begin"))
        self._generation = client._generation
        client._transaction = self

    def commit(self) -> None:
        """Commit. A DaemonError means nothing was committed; CommitOutcomeUnknown means the
        connection broke first and the outcome is not known."""
        self._check(ending=True)
        self._client._run(ops.tx("tx.commit"))

    def rollback(self) -> None:
        self._check(ending=True)
        self._client._run(ops.tx("tx.rollback"))

    def _rollback_quietly(self) -> None:
        # Leaving on an exception: that exception is what the caller needs to see. A broken
        # connection has rolled back already.
        alive = self._client._generation == self._generation and self._client.in_transaction
        self._end()
        if alive:
            with contextlib.suppress(OmkdError):
                self._client._run(ops.tx("tx.rollback"))

    def _end(self) -> None:
        self._done = True
        if self._client._transaction is self:
            self._client._transaction = None

    def _check(self, *, ending: bool = False) -> None:
        """Raise NoTransaction if it has not begun or has ended, ConnectionLost if it lost
        its connection; when ``ending`` it, it is over either way (and the client's calls
        run on their own)."""
        if self._done or self._generation is None:  # a mistake of the caller's
            raise NoTransaction(
                "this transaction has already ended"
                if self._done
                else "this transaction has not begun: use it in a with block, or call begin()"
            )
        lost = self._client._generation != self._generation
        if ending:
            self._end()
        if lost:
            raise ConnectionLost(
                "the connection this transaction belonged to was lost; the daemon rolled it back"
            )

    def _run(self, op: Op[T]) -> T:
        self._check()
        return self._client._run(op)


class Subscription:
    """An iterator of the EventRecords of one subscription, in event_id order.

    Iteration blocks until the next event; it raises SubscriptionClosed when the daemon ends
    the subscription and ConnectionLost when the connection breaks (resubscribe with
    ``after_event_id=sub.last_event_id`` to resume). ``close`` (or the ``with`` block's end)
    unsubscribes.
    """

    def __init__(
        self,
        client: Client,
        subscription: int,
        queue: deque[SubscriptionItem],
        generation: int,
        after_event_id: int | None = None,
    ) -> None:
        self._client = client
        self.id = subscription
        self._queue = queue
        self._generation = generation
        # The last event delivered; before the first, where the subscription starts:
        # resubscribing after it loses nothing.
        self.last_event_id = after_event_id
        self._closed = False

    def __iter__(self) -> Iterator[EventRecord]:
        return self

    def __next__(self) -> EventRecord:
        if self._closed:
            raise StopIteration
        event = self.get(timeout=None)
        assert event is not None
        return event

    def get(self, timeout: float | None = None) -> EventRecord | None:
        """Return the next event, or None if none came within ``timeout`` seconds."""
        if self._closed:
            raise RuntimeError(f"subscription {self.id} is closed")
        item = self._client._next_item(self._queue, timeout)
        if item is None:
            return None
        if isinstance(item, EventRecord):
            self.last_event_id = item.event_id
            return item
        self._closed = True
        if isinstance(item, SubscriptionEnded):
            raise SubscriptionClosed(self.id, item.reason, self.last_event_id)
        raise ConnectionLost(
            f"subscription {self.id} ended with its connection ({item.reason}); resubscribe "
            f"with after_event_id={self.last_event_id} to resume",
            {"subscription": self.id, "last_event_id": self.last_event_id},
        )

    def close(self) -> None:
        """Unsubscribe (if the connection still stands) and drop buffered events."""
        if self._closed:
            return
        self._closed = True
        client = self._client
        if client._generation == self._generation and client._protocol.subscriptions.is_open(
            self.id
        ):
            client._protocol.subscriptions.close(self.id)
            client._run(ops.event_unsubscribe(self.id))

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Pending:
    """The future result of a call in a ``Pipeline``, known when the block ends."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = False

    def result(self) -> Any:
        """The call's result as plain JSON; raises its DaemonError."""
        if not self._done:
            raise RuntimeError(f"{self.method} has not been sent yet: leave the pipeline first")
        if self._error is not None:
            raise self._error
        return self._result


class Pipeline:
    """``with client.pipeline() as p: a = p.call(...)``: all calls are sent at once when the
    block ends, then every reply is read; ``a.result()`` afterwards."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._calls: list[tuple[str, dict[str, Any] | None]] = []
        self._pending: list[Pending] = []

    def call(self, method: str, /, **params: Any) -> Pending:
        self._calls.append((method, params or None))
        self._pending.append(Pending(method))
        return self._pending[-1]

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None or not self._calls:
            return
        try:
            results = self._client.call_many(self._calls, return_exceptions=True)
        except OmkdError as exc:  # no reply for any (the connection broke, a timeout)
            self._settle([exc] * len(self._calls))
            raise
        self._settle(results)

    def _settle(self, results: list[Any]) -> None:
        for pending, result in zip(self._pending, results, strict=True):
            pending._done = True
            if isinstance(result, OmkdError):
                pending._error = result
            else:
                pending._result = result


def connect(
    socket_path: str | Path | None = None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
) -> Client:
    """``Client.connect``: a connected sync client, to use in a ``with`` block."""
    return Client.connect(socket_path, connect_timeout=connect_timeout, call_timeout=call_timeout)


def _shared_between_threads() -> RuntimeError:
    return RuntimeError(
        "this Client is in a call in another thread: a Client is not thread-safe; give each "
        "thread its own"
    )


def _decode(op: Op[T], raw: msgspec.Raw) -> T:
    try:
        return op.decode(bytes(raw))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"the result of {op.method} does not decode: {exc}") from exc


def _methods(requests: list[tuple[str, Any]]) -> list[str]:
    """The methods of ``requests``, for an error that names them."""
    return [method for method, _ in requests]
