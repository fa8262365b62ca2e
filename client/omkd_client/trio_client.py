"""The trio client: a trio stream around the sans-IO ``ClientProtocol``.

Theory of operation. One connection, shared by every task that uses the client: a reader
task (in the nursery ``TrioClient.connect`` opens) feeds what it reads to the protocol, hands
each reply to the task waiting for it (matched by id, so many calls can be in flight at once)
and wakes subscription iterators when a notification has been buffered. Callers encode and
send under a lock, then wait for their reply up to the call timeout.

Transactions belong to a session, which is the connection: while one is open, calls made
through the transaction object or by the task that opened it run inside it, and other tasks'
calls on the client wait until it ends (so they never land in someone else's transaction).

Resource handling: leaving ``connect``'s block closes the socket (the daemon rolls back an
open transaction) and cancels the reader. Error handling: a broken connection fails the calls
waiting on it; a call that finds the connection broken reconnects, and is retried once when
it is safe (outside a transaction; not delivered, or read-only), else raises ConnectionLost or,
during ``tx.commit``, CommitOutcomeUnknown. A cancelled call abandons its request: the reply
is dropped when it comes.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec
import trio

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
    Reply,
    SubscriptionEnded,
    SubscriptionItem,
    checked_timeouts,
    error_after_abandoning,
    error_after_break,
)
from omkd_client.records import EventRecord
from omkd_client.repos import (
    AsyncArtifacts,
    AsyncBudgets,
    AsyncDaemon,
    AsyncEvents,
    AsyncGoals,
    AsyncProofs,
    AsyncTasks,
)

__all__ = ["AsyncSubscription", "AsyncTransaction", "TrioClient", "connect"]

T = TypeVar("T")

# One read takes at most this much, into a buffer the reader keeps (see sync_client).
_RECEIVE_BYTES: Final = 256 * 1024


class _Slot:
    """Where the reader puts one request's reply (or the news that the connection broke)."""

    __slots__ = ("broken", "done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None
        self.broken: str | None = None


class _AsyncCalls:
    """What a client and a transaction share: the repositories over a runner."""

    def _bind(self, client: TrioClient) -> None:
        self.goals = AsyncGoals(self._run)
        self.tasks = AsyncTasks(self._run)
        self.events = AsyncEvents(self._run, client._subscribe)
        self.proofs = AsyncProofs(self._run)
        self.budgets = AsyncBudgets(self._run)
        self.artifacts = AsyncArtifacts(self._run)
        self.daemon = AsyncDaemon(self._run)

    async def _run(self, op: Op[T]) -> T:
        raise NotImplementedError

    async def call(self, method: str, /, **params: Any) -> Any:
        """Call any method with named params; return its result as plain JSON."""
        return await self._run(ops.generic(method, params))

    async def backup(self, dest: str | Path) -> BackupResult:
        """Write a consistent copy of the database to ``dest`` (an absolute path)."""
        return await self._run(ops.db_backup(str(dest)))

    async def discover(self) -> dict[str, Any]:
        """Return the daemon's OpenRPC document."""
        return await self._run(ops.rpc_discover())


class TrioClient(_AsyncCalls):
    """A connection to omkd for trio programs: ``async with TrioClient.connect() as c:``."""

    def __init__(
        self,
        socket_path: str | Path | None,
        nursery: trio.Nursery,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        checked_timeouts(connect_timeout, call_timeout)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._nursery = nursery
        self._protocol = ClientProtocol()
        self._stream: trio.SocketStream | None = None
        self._generation = 0
        self._slots: dict[int, _Slot] = {}
        self._send_lock = trio.Lock()
        self._connect_lock = trio.Lock()
        self._notified = trio.lowlevel.ParkingLot()
        self._tx_task: trio.lowlevel.Task | None = None
        self._tx_ended = trio.Event()
        # The task whose transaction lost its connection: its calls raise until it ends that
        # transaction, instead of running outside it.
        self._lost_tx_task: trio.lowlevel.Task | None = None
        self._closed = False
        self._bind(self)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        socket_path: str | Path | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> AsyncIterator[TrioClient]:
        """Connect, and close on leaving the block.

        Raises DaemonNotRunning when nothing accepts on the socket in ``connect_timeout``.
        """
        try:
            async with trio.open_nursery() as nursery:
                client = cls(
                    socket_path,
                    nursery,
                    connect_timeout=connect_timeout,
                    call_timeout=call_timeout,
                )
                await client._open()
                try:
                    yield client
                finally:
                    client.close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task never raises, so the group holds the one exception of the
            # caller's block (or of connecting): raise it as itself, so that `except
            # NotFound` around the block works as it would with the sync client.
            raise _single(group) from None

    def close(self) -> None:
        """Close the connection; the daemon rolls back an open transaction."""
        self._closed = True
        self._lose(self._generation, "the client was closed")

    @property
    def in_transaction(self) -> bool:
        return self._protocol.in_transaction

    # -- calls

    async def _run(self, op: Op[T]) -> T:
        return await self._run_op(op, in_tx=False)

    async def _run_op(self, op: Op[T], *, in_tx: bool) -> T:
        reply = (await self._exchange([(op.method, op.params)], in_tx=in_tx))[0]
        if reply.error is not None:
            raise reply.error
        assert reply.result is not None
        try:
            return op.decode(bytes(reply.result))
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"the result of {op.method} does not decode: {exc}") from exc

    async def call_many(
        self,
        calls: Sequence[tuple[str, Mapping[str, Any] | None]],
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send every call before awaiting any reply; return results in order (as the sync
        ``Client.call_many``). Concurrent calls from several tasks pipeline too."""
        requests = [(m, dict(p) if p else None) for m, p in calls]
        results: list[Any] = []
        for reply in await self._exchange(requests, in_tx=False):
            if reply.error is not None:
                if not return_exceptions:
                    raise reply.error
                results.append(reply.error)
            else:
                assert reply.result is not None
                results.append(msgspec.json.decode(reply.result))
        return results

    def transaction(self) -> AsyncTransaction:
        """``async with c.transaction() as tx:`` commits on success, rolls back on exception."""
        return AsyncTransaction(self)

    async def _wait_for_turn(self, in_tx: bool) -> None:
        """Hold a call back while another task's transaction is open on this connection."""
        while (
            not in_tx
            and self._tx_task is not None
            and self._tx_task is not trio.lowlevel.current_task()
        ):
            await self._tx_ended.wait()

    async def _exchange(self, requests: list[tuple[str, Any]], *, in_tx: bool) -> list[Reply]:
        if self._lost_tx_task is not None and self._lost_tx_task is trio.lowlevel.current_task():
            raise ConnectionLost(
                "the connection of this task's open transaction was lost, and the daemon "
                "rolled it back: end the transaction (leave its block, or roll it back) "
                "before calling again"
            )
        await self._wait_for_turn(in_tx)
        methods = [m for m, _ in requests]
        retried = False
        while True:
            in_transaction = self._protocol.in_transaction
            if self._stream is None:
                await self._reconnect()
            stream, generation = self._stream, self._generation
            assert stream is not None
            if len(requests) > 1 and not retried and _closed_by_peer(stream):
                # Several requests whose send fails are not sent again (the first ones may
                # have run): a connection the daemon closed already is replaced first.
                self._lose(generation, "the daemon closed the connection")
                retried = True
                continue
            slots: dict[int, _Slot] = {}
            frames = []
            for method, params in requests:
                request_id, frame = self._protocol.send_request(method, params)
                slots[request_id] = self._slots[request_id] = _Slot()
                frames.append(frame)
            delivered = await self._send_and_wait(
                stream, generation, b"".join(frames), slots, methods, in_transaction
            )
            broken = next((s.broken for s in slots.values() if s.broken is not None), None)
            if broken is None:
                return [slot.reply for slot in slots.values() if slot.reply is not None]
            # Of several requests whose send was cut short the first ones may have run:
            # they count as delivered, never sent twice.
            error = error_after_break(
                methods,
                in_transaction=in_transaction,
                delivered=delivered or len(methods) > 1,
                retried=retried,
            )
            if error is not None:
                raise error
            retried = True

    async def _send_and_wait(
        self,
        stream: trio.SocketStream,
        generation: int,
        data: bytes,
        slots: dict[int, _Slot],
        methods: list[str],
        in_transaction: bool,
    ) -> bool:
        """Send ``data`` and wait for every slot; return whether the data left whole.

        Raises CallTimeout after the call timeout (CommitOutcomeUnknown for tx.commit). On a
        timeout or cancellation the unanswered requests are abandoned; one that interrupts a
        send closes the connection, whose stream is then unusable, and so does one that
        leaves the session's transaction unknown (inside one, or tx.*): the daemon then
        rolls it back.
        """
        sending = False
        delivered = False
        timeout = self.call_timeout if self.call_timeout is not None else float("inf")
        try:
            with trio.move_on_after(timeout) as scope:
                try:
                    async with self._send_lock:
                        sending = True
                        await stream.send_all(data)
                        sending = False
                    delivered = True
                except trio.BrokenResourceError:
                    # The daemon closed the connection (EPIPE): its reader reads what it
                    # sent first (-32600 for a request over its size limit, answered before
                    # the close), then ends the connection and every call still waiting.
                    sending = False
                except trio.ClosedResourceError as exc:
                    sending = False
                    self._lose(generation, f"sending failed: {exc}")
                for slot in slots.values():
                    await slot.done.wait()
        finally:
            if sending:
                self._lose(generation, "a send was interrupted")
            abandoned = False
            for request_id, slot in slots.items():
                if not slot.done.is_set():
                    self._slots.pop(request_id, None)
                    self._protocol.abandon(request_id)
                    abandoned = True
            if abandoned:
                close, timed_out = error_after_abandoning(
                    methods, in_transaction=in_transaction, timeout=self.call_timeout
                )
                if close:
                    self._lose(generation, f"a call was given up: {timed_out}")
        if scope.cancelled_caught:  # (so some reply was given up on)
            raise timed_out
        return delivered

    # -- the connection

    async def _open(self) -> None:
        path = str(self.socket_path)
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_unix_socket(socket_address(path))
        except trio.TooSlowError as exc:
            raise DaemonNotRunning(path, f"no answer in {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise DaemonNotRunning(path, exc.strerror or str(exc)) from exc
        self._stream = stream
        self._generation += 1
        self._nursery.start_soon(self._read, stream, self._generation)

    async def _reconnect(self) -> None:
        if self._closed:
            raise ConnectionLost("the client was closed")
        async with self._connect_lock:
            if self._stream is None:
                await self._open()

    def _lose(self, generation: int, reason: str) -> None:
        """Forget connection ``generation`` (if still current): fail its waiting calls."""
        if generation != self._generation or self._stream is None:
            return
        self._stream.socket.close()  # wakes the reader with ClosedResourceError
        self._stream = None
        self._generation += 1  # what belonged to that connection is gone with it
        if self._tx_task is not None and self._protocol.in_transaction:
            self._lost_tx_task = self._tx_task
        self._protocol.connection_lost(reason)
        for slot in self._slots.values():
            slot.broken = reason
            slot.done.set()
        self._slots.clear()
        self._end_transaction()
        self._notified.unpark_all()

    async def _read(self, stream: trio.SocketStream, generation: int) -> None:
        reason = "the daemon closed the connection"
        chunk = bytearray(_RECEIVE_BYTES)
        try:
            while size := await stream.socket.recv_into(chunk):
                self._protocol.receive_data(memoryview(chunk)[:size])
                self._deliver()
                if self._protocol.closing:  # the daemon closes it: send nothing more on it
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except ProtocolError as exc:
            reason = str(exc)
        self._lose(generation, reason)

    def _deliver(self) -> None:
        while (event := self._protocol.next_event()) is not NEED_DATA:
            if isinstance(event, Reply):
                slot = self._slots.pop(event.id, None)
                if slot is not None:
                    slot.reply = event
                    slot.done.set()
            else:
                self._notified.unpark_all()

    def _end_transaction(self) -> None:
        if self._tx_task is not None:
            self._tx_task = None
            self._tx_ended.set()

    # -- subscriptions

    async def _subscribe(
        self, goal_id: str | None, after_event_id: int | None
    ) -> AsyncSubscription:
        subscribed = await self._run(ops.event_subscribe(goal_id, after_event_id))
        subscription = subscribed.subscription
        queue = self._protocol.subscriptions.claim(subscription)
        return AsyncSubscription(
            self, subscription, queue, self._generation, subscribed.after_event_id
        )


def _closed_by_peer(stream: trio.SocketStream) -> bool:
    """Whether the daemon has closed ``stream`` (its end of file is waiting to be read)."""
    try:
        with socket.socket(fileno=os.dup(stream.socket.fileno())) as peek:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read
    except OSError:
        return True


class AsyncTransaction(_AsyncCalls):
    """The session's transaction (see ``Transaction`` of the sync client): never retried."""

    def __init__(self, client: TrioClient) -> None:
        self._client = client
        self._generation: int | None = None
        self._done = False
        self._bind(client)

    async def __aenter__(self) -> AsyncTransaction:
        await self.begin()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done:
            return
        if exc_type is None:
            await self.commit()
        else:
            await self._rollback_quietly()

    async def begin(self) -> None:
        """Send ``tx.begin`` (waiting for another task's transaction on this client first)."""
        client = self._client
        # A second begin in the owning task is the daemon's to refuse (TransactionActive); it
        # must not disturb the open transaction's bookkeeping.
        nested = client._tx_task is trio.lowlevel.current_task()
        if not nested:
            await client._wait_for_turn(False)
            client._tx_task = trio.lowlevel.current_task()
            client._tx_ended = trio.Event()
        try:
            await client._run_op(ops.tx("tx.begin"), in_tx=True)
        except BaseException:
            if not nested:
                client._end_transaction()
            raise
        self._generation = client._generation

    async def commit(self) -> None:
        """Commit. A DaemonError means nothing was committed; CommitOutcomeUnknown means the
        connection broke first and the outcome is not known."""
        self._check(ending=True)
        try:
            await self._client._run_op(ops.tx("tx.commit"), in_tx=True)
        finally:
            self._end()

    async def rollback(self) -> None:
        self._check(ending=True)
        try:
            await self._client._run_op(ops.tx("tx.rollback"), in_tx=True)
        finally:
            self._end()

    async def _rollback_quietly(self) -> None:
        self._done = True
        client = self._client
        try:
            if client._generation == self._generation and client.in_transaction:
                with trio.CancelScope(shield=True):
                    await client._run_op(ops.tx("tx.rollback"), in_tx=True)
        except OmkdError:
            pass  # the exception that ended the block is what the caller needs to see
        finally:
            self._end()

    def _end(self) -> None:
        # Other tasks' calls go on; this task's run on their own again.
        self._done = True
        client = self._client
        client._end_transaction()
        if client._lost_tx_task is trio.lowlevel.current_task():
            client._lost_tx_task = None

    def _check(self, *, ending: bool = False) -> None:
        """Raise NoTransaction if it has not begun or has ended, ConnectionLost if it lost
        its connection; when ``ending`` it, it is over either way."""
        if self._done or self._generation is None:  # a mistake of the caller's
            raise NoTransaction(
                "this transaction has already ended"
                if self._done
                else "this transaction has not begun: use it in a with block, or call begin()"
            )
        if self._client._generation != self._generation:
            if ending:
                self._end()
            raise ConnectionLost(
                "the connection this transaction belonged to was lost; the daemon rolled it back"
            )
        if ending:
            self._done = True

    async def _run(self, op: Op[T]) -> T:
        self._check()
        return await self._client._run_op(op, in_tx=True)


class AsyncSubscription:
    """An async iterator of one subscription's EventRecords (see ``Subscription``)."""

    def __init__(
        self,
        client: TrioClient,
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

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> EventRecord:
        if self._closed:
            raise StopAsyncIteration
        while not self._queue:
            if self._client._generation != self._generation or self._client._stream is None:
                self._closed = True
                raise self._lost("the connection was closed")
            await self._client._notified.park()
        item = self._queue.popleft()
        if isinstance(item, EventRecord):
            self.last_event_id = item.event_id
            return item
        self._closed = True
        if isinstance(item, SubscriptionEnded):
            raise SubscriptionClosed(self.id, item.reason, self.last_event_id)
        raise self._lost(item.reason)

    def _lost(self, reason: str) -> ConnectionLost:
        return ConnectionLost(
            f"subscription {self.id} ended with its connection ({reason}); resubscribe with "
            f"after_event_id={self.last_event_id} to resume",
            {"subscription": self.id, "last_event_id": self.last_event_id},
        )

    async def aclose(self) -> None:
        """Unsubscribe (if the connection still stands) and drop buffered events."""
        if self._closed:
            return
        self._closed = True
        client = self._client
        subscriptions = client._protocol.subscriptions
        if client._generation == self._generation and subscriptions.is_open(self.id):
            subscriptions.close(self.id)
            await client._run(ops.event_unsubscribe(self.id))

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the group's only exception (unwrapping nested groups), else the group."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group


def connect(
    socket_path: str | Path | None = None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
) -> AbstractAsyncContextManager[TrioClient]:
    """``TrioClient.connect``: ``async with omkd_client.trio_client.connect() as c:``."""
    return TrioClient.connect(
        socket_path, connect_timeout=connect_timeout, call_timeout=call_timeout
    )
