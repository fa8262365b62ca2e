"""A session: one client connection's transaction, subscriptions and place in the write queue.

Theory of operation. SQLite calls run inline on the trio thread (a thread hop costs several
times what a statement does), but for long ones (``run_long``: more rows than
``long_call_rows``, or all of a goal's), which run in a worker thread while the event loop
serves the other connections. Reads outside a transaction go to the database's read
connection and see the latest committed state without waiting for anyone (a long one runs
on a read connection of its own). Writes go through
the daemon's write gate (``omkd.rpc.writegate``): a single write for one SQLite transaction,
committed together with the single writes of other sessions that arrive meanwhile;
``tx.begin`` takes the gate until ``tx.commit`` or ``tx.rollback``, and meanwhile every call
of the session runs inside its transaction. A writer that waits longer than the lock timeout
answers Busy.

The session's transaction is rolled back when the connection ends (``close``), when the
daemon stops (cancellation reaches ``close`` too), and after the idle timeout
(``idle_abort``, called by the connection). After an idle rollback, or after SQLite rolled
the transaction back itself on a storage failure, the session is *aborted*: the dispatcher
refuses all but tx.*, daemon.* and rpc.discover until tx.rollback (or tx.commit) ends it.

Subscriptions are tasks in the connection's nursery that page committed events from the
read connection into the outbox. The database is the buffer, so a slow subscriber costs no
memory; one that has not made room within the stall timeout is cut off with a final
``event.subscription_closed`` notification.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import msgspec
import trio

from omkd import db
from omkd.rpc import params as P
from omkd.rpc.errors import NoTransaction, TransactionAborted, TransactionActive
from omkd.rpc.methods import Access, Method, RepoFn
from omkd.rpc.outbox import Outbox
from omkd.rpc.writegate import Commit
from omkd_client.records import EventRecord

if TYPE_CHECKING:
    from omkd.server import Daemon

__all__ = ["Session"]

log = logging.getLogger("omkd.session")

_subscription_ids: Final = itertools.count(1)


class _Appended(msgspec.Struct):
    subscription: int
    event: EventRecord


class _Closed(msgspec.Struct):
    subscription: int
    reason: str


class _Notification(msgspec.Struct):
    jsonrpc: str
    method: str
    params: _Appended | _Closed


_ENCODER: Final = msgspec.json.Encoder()


@dataclass(eq=False)
class _Subscription:
    id: int
    goal_id: str | None
    cursor: int  # the newest event_id queued for the client (or, before that, the start)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Kept until the subscribe reply is out (``start_pending``): the events of a deletion
    # that came first (``send_before_deletion``), then why it ends, if it must.
    held: list[bytes] = field(default_factory=list)
    held_bytes: int = 0
    closing: str | None = None


def _encoded(run: RepoFn, decode: Callable[[], Any] | None, repos: Any, params: Any) -> msgspec.Raw:
    """``run``'s result, encoded as JSON (in the worker thread that runs it); the params
    from ``decode()`` when given."""
    if decode is not None:
        params = decode()
    result = run(repos, params)
    return result if isinstance(result, msgspec.Raw) else msgspec.Raw(msgspec.json.encode(result))


class Session:
    """One connection's state. Not shared between tasks of other connections."""

    def __init__(
        self,
        daemon: Daemon,
        session_id: int,
        outbox: Outbox,
        framing: Any,
        peer_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.daemon = daemon
        self.id = session_id
        self.outbox = outbox
        self.encode_frame = framing
        self._peer_gone = peer_gone
        self.tx: db.Transaction | None = None
        self._pending: Commit | None = None  # a write's batch whose COMMIT is to come
        self._aborted = False
        # A read of this session's next call ran past its time limit on the event loop:
        # the dispatcher runs that call in a worker thread.
        self.long_read_next = False
        self._subscriptions: dict[int, _Subscription] = {}
        self._to_start: list[_Subscription] = []
        # (goal_id, its newest event_id) of each deletion of events in the transaction
        self._deletions: list[tuple[str, int]] = []
        self.nursery: trio.Nursery | None = None

    # -- state the dispatcher and the connection read

    @property
    def aborted(self) -> bool:
        return self._aborted

    @property
    def in_transaction(self) -> bool:
        return self.tx is not None

    @property
    def subscribing(self) -> bool:
        return bool(self._subscriptions)

    def peer_gone(self) -> bool:
        """Whether the client has closed its end of the connection (it takes no reply)."""
        return self._peer_gone()

    # -- repository calls

    def run_read(self, method: Method, params: Any, time_limit: float | None = None) -> Any:
        """Run a read here; outside a transaction, one that runs past ``time_limit`` seconds
        (None: no limit) is stopped and raises db.TimeLimitExceeded (``run_long`` it
        instead)."""
        tx = self.tx
        if tx is not None:
            return self._run_in_transaction(tx, method, params)
        database = self.daemon.db
        if time_limit is None:
            return method.run(database, params)  # type: ignore[arg-type]
        with database.time_limit(time_limit):
            return method.run(database, params)  # type: ignore[arg-type]

    async def run_write(self, method: Method, params: Any) -> Any:
        """Run a write; its result stands once ``pending_commit()`` is None or done."""
        tx = self.tx
        if tx is not None:
            return self._run_in_transaction(tx, method, params)
        result, committed_events, pending = await self.daemon.gate.write(method, params, self)
        if committed_events:
            self.daemon.events_committed()
        self._pending = pending
        return result

    async def run_long(
        self, method: Method, params: Any, decode: Callable[[], Any] | None = None
    ) -> Any:
        """Run a read or a write that may take long in a worker thread; the event loop
        serves the other connections meanwhile. Inside the session's transaction it runs
        there; outside, a write is its own SQLite transaction, in line for the write gate
        like a transaction, and a read runs on a read connection of its own (at most
        ``long_reads`` at once). The call runs to its end once started, even if the
        connection ends meanwhile. Its result comes back encoded (a ``msgspec.Raw``): the
        thread encodes it, not the event loop (100,000 tasks take ~100 ms). With ``decode``,
        the thread decodes the params too (``params`` is then unused): long params (15 MB
        of events) are decoded there, not on the event loop."""
        daemon = self.daemon
        goal_id = None
        if method.deletes_events:
            if decode is not None:  # (a goal_id longer than long_call_bytes)
                params, decode = decode(), None
            goal_id = params.goal_id
        run = functools.partial(_encoded, cast(RepoFn, method.run), decode)
        tx = self.tx
        if tx is not None:
            last = None
            if goal_id is not None:  # (the transaction may yet roll back: nobody closed)
                last = await daemon.send_before_deletion(goal_id, close=False)
            try:
                result = await trio.to_thread.run_sync(run, tx, params)
            except db.StorageFailure as exc:
                self._check_lost(method, exc)
                raise
            if goal_id is not None and last is not None:  # done again before the COMMIT
                self._deletions.append((goal_id, last))
            return result
        if method.access is Access.READ:
            try:
                return await trio.to_thread.run_sync(
                    run, daemon.db, params, limiter=daemon.long_reads
                )
            except db.Interrupted:
                # The daemon is stopping (Database.interrupt_reads, after cancelling every
                # connection): no reply, no error; the cancellation goes on from here.
                await trio.lowlevel.checkpoint()
                raise
        before = None
        deleting: list[trio.Event] = []  # what this call's begin_deletion began

        async def begin_deletion() -> None:
            assert goal_id is not None
            deleting.append(await daemon.begin_deletion(goal_id))

        if goal_id is not None:
            # Most of it before the write gate is taken (writes go on meanwhile; it may
            # yet answer Busy: nobody closed), what was committed since once it is.
            await daemon.send_before_deletion(goal_id, close=False)
            before = begin_deletion
        try:
            result, committed_events = await daemon.gate.write_long(method, run, params, before)
        finally:
            for began in deleting:
                daemon.end_deletion(began)
        if committed_events:
            daemon.events_committed()
        return result

    def settled(self) -> bool:
        """Whether the COMMIT of this session's last write is done (``settle`` would not
        wait); forgets it if so."""
        pending = self._pending
        if pending is None:
            return True
        if not pending.done.is_set():
            return False
        self._pending = None
        return True

    def write_now(self, method: Method, params: Any) -> tuple[Any, Commit | None] | None:
        """``run_write`` when it would not wait: inside the session's transaction, joining
        the open group commit, or alone when nobody else writes; None, having run nothing,
        if it would wait. Returns (result, the Commit it stands on when it joined another
        session's batch)."""
        tx = self.tx
        if tx is not None:
            return self._run_in_transaction(tx, method, params), None
        done = self.daemon.gate.write_now(method, params, self)
        if done is None:
            return None
        result, committed_events, pending = done
        if committed_events:
            self.daemon.events_committed()
        self._pending = pending
        return result, pending

    def pending_commit(self) -> Commit | None:
        """The COMMIT the last write waits for (it joined another session's batch), if
        that is not done yet: its reply may go out only after it."""
        pending = self._pending
        if pending is None or pending.done.is_set():
            return None
        return pending

    async def settle(self) -> None:
        """Wait for the COMMIT of this session's last write, if it is still to come: the
        dispatcher calls this before each call, so a session sees its own writes."""
        pending = self._pending
        if pending is not None:
            if not pending.done.is_set():
                await pending.done.wait()
            self._pending = None

    def _run_in_transaction(self, tx: db.Transaction, method: Method, params: Any) -> Any:
        """Run a read or a write inside the session's transaction.

        If SQLite rolled the transaction back (StorageFailure with transaction_lost), the
        session lets go of it and of the write gate and becomes aborted; the error goes on to
        answer this call.
        """
        try:
            return method.run(tx, params)  # type: ignore[arg-type]
        except db.StorageFailure as exc:
            self._check_lost(method, exc)
            raise

    def _check_lost(self, method: Method, exc: db.StorageFailure) -> None:
        if exc.transaction_lost:
            self._lose_transaction(f"storage failure in {method.name}: {exc}")

    # -- transactions

    async def tx_begin(self) -> P.TxActive:
        if self.tx is not None:
            raise TransactionActive(
                "this session already has a transaction; commit or roll it back first",
                {"session": self.id},
            )
        await self.daemon.gate.acquire()
        try:
            self.tx = self.daemon.db.transaction()
        except BaseException:
            self.daemon.gate.release()
            raise
        return P.TxActive()

    async def tx_commit(self) -> P.TxCommitted:
        if self._aborted:
            self._aborted = False
            raise TransactionAborted(
                "the transaction had already been rolled back (idle timeout or storage "
                "failure); nothing was committed, and the session is usable again",
                {"session": self.id},
            )
        tx = self._take_transaction("tx.commit")
        deletions, self._deletions = self._deletions, []
        try:
            try:  # what each deletion left (or what was made since), now that it is sure
                for goal_id, last in deletions:
                    self.daemon.send_before_deletion_now(goal_id, last, close=True)
            except Exception:  # it only sends committed events early: commit all the same
                log.exception("session %d: sending events before a deletion failed", self.id)
            tx.commit()
        finally:
            self.daemon.gate.release()
        self.daemon.events_committed()
        return P.TxCommitted()

    async def tx_rollback(self) -> P.TxRolledBack:
        if self._aborted:
            self._aborted = False
            return P.TxRolledBack()
        tx = self._take_transaction("tx.rollback")
        try:
            tx.rollback()
        finally:
            self.daemon.gate.release()
        return P.TxRolledBack()

    def _take_transaction(self, method: str) -> db.Transaction:
        tx, self.tx = self.tx, None
        if method != "tx.commit":
            self._deletions = []
        if tx is None:
            raise NoTransaction(
                f"{method}: this session has no transaction; send tx.begin first",
                {"method": method},
            )
        return tx

    def idle_abort(self) -> None:
        """Roll back a transaction left idle past the timeout; the session becomes aborted."""
        timeout = self.daemon.config.tx_idle_timeout
        self._rollback_quietly()
        self._aborted = True
        log.warning(
            "session %d: transaction idle for more than %g s, rolled back", self.id, timeout
        )

    def _lose_transaction(self, why: str) -> None:
        self.tx = None  # the Transaction closed itself and released the database
        self._deletions = []
        self.daemon.gate.release()
        self._aborted = True
        log.error("session %d: transaction lost: %s", self.id, why)

    def _rollback_quietly(self) -> None:
        tx, self.tx = self.tx, None
        self._deletions = []
        if tx is None:
            return
        try:
            tx.rollback()
        except db.DbError:
            log.exception("session %d: rollback failed", self.id)
        finally:
            self.daemon.gate.release()

    def close(self) -> None:
        """End the session: roll back its transaction, cancel its subscriptions."""
        if self.tx is not None:
            log.info("session %d: closed with an open transaction, rolled back", self.id)
        self._rollback_quietly()
        for sub in self._subscriptions.values():
            sub.scope.cancel()
        self._subscriptions.clear()

    # -- subscriptions

    async def subscribe(self, p: P.EventSubscribe) -> P.Subscribed:
        while (deleting := self.daemon.deleting) is not None:
            await deleting.wait()  # its events were sent or gone before this subscription
        cursor = p.after_event_id
        if cursor is None:
            cursor = self.daemon.db.events.last_event_id()
        sub = _Subscription(next(_subscription_ids), p.goal_id, cursor)
        self._subscriptions[sub.id] = sub
        self._to_start.append(sub)  # started once the reply is queued: it must come first
        return P.Subscribed(sub.id, cursor)

    async def unsubscribe(self, p: P.Unsubscribe) -> P.Unsubscribed:
        sub = self._subscriptions.pop(p.subscription, None)
        if sub is None:
            raise db.NotFound("subscription", p.subscription)
        sub.scope.cancel()
        if sub in self._to_start:  # (subscribe and unsubscribe came in one read)
            self._to_start.remove(sub)
        return P.Unsubscribed()

    def start_pending(self) -> None:
        """Start the subscriptions whose subscribe reply has just been queued: first what a
        deletion held for one before that (``send_before_deletion``), then its feeder."""
        if not self._to_start:
            return
        assert self.nursery is not None
        for sub in self._to_start:
            held, sub.held, sub.held_bytes = sub.held, [], 0
            if self.outbox.closed:
                return  # the connection is ending
            for frame in held:
                self.outbox.force(frame)
            if sub.closing is not None:
                self._cut_off(sub, sub.closing)
                continue
            self.nursery.start_soon(self._feed, sub)
        self._to_start.clear()

    async def _feed(self, sub: _Subscription) -> None:
        config = self.daemon.config
        self.daemon.subscriptions += 1  # commits wake new_events while any is counted
        try:
            with sub.scope:
                while True:
                    signal = self.daemon.new_events  # before the query: no lost wake-up
                    events = self.daemon.db.events.tail(sub.cursor, sub.goal_id, config.page_size)
                    if not events:
                        await signal.wait()
                        continue
                    for event in events:
                        if event.event_id <= sub.cursor:
                            continue  # queued already, before a deletion
                        if self.outbox.full():
                            if not await self.outbox.room_before(config.subscriber_stall_timeout):
                                self._cut_off(sub, self._stalled(sub))
                                return
                            if event.event_id <= sub.cursor:
                                continue  # queued meanwhile, before a deletion
                        if sub.scope.cancel_called or self.outbox.closed:
                            return  # unsubscribed (nothing after its reply), or ending
                        self.outbox.force(self._notification(_Appended(sub.id, event)))
                        sub.cursor = event.event_id
                    # A backlog goes out a page at a time, the other connections served in
                    # between: the feeder waits only once the outbox is full (4 MiB of
                    # notifications, 300 ms of the event loop for a backlog of 200,000).
                    await trio.lowlevel.checkpoint()
        finally:
            self.daemon.subscriptions -= 1

    async def send_before_deletion(self, goal_id: str, last: int, *, close: bool) -> None:
        """A write holding the write gate is about to delete the goal's events, up to
        event_id ``last``: queue, to each subscription that is to send some of them, the
        committed events it has still to send up to there (all goals' for a subscription
        to all goals: they go in order), a page at a time, the other connections served in
        between. A subscription whose session would then queue more than twice the
        outbox's bound is closed instead, saying so. (A subscription whose subscribe reply
        is not out yet holds them until it is: ``start_pending``.)"""
        for _ in self._pages_before_deletion(goal_id, last, close):
            await trio.lowlevel.checkpoint()  # the other connections are served meanwhile

    def send_before_deletion_now(self, goal_id: str, last: int, *, close: bool) -> None:
        """``send_before_deletion`` in one step of the event loop, for what is left: the
        subscriptions made while it went a page at a time (or, in a transaction, until its
        COMMIT, which follows this step)."""
        for _ in self._pages_before_deletion(goal_id, last, close):
            pass

    def _pages_before_deletion(self, goal_id: str, last: int, close: bool) -> Iterator[None]:
        """Queue them a page at a time, yielding between pages."""
        for sub in list(self._subscriptions.values()):
            while self._behind(sub, goal_id, last) and self._send_page(sub, goal_id, last, close):
                yield

    def _behind(self, sub: _Subscription, goal_id: str, last: int) -> bool:
        return (
            sub.closing is None
            and sub.cursor < last
            and sub.goal_id in (None, goal_id)
            and not self.outbox.closed
            and self._subscriptions.get(sub.id) is sub
        )

    def _send_page(self, sub: _Subscription, goal_id: str, last: int, close: bool) -> bool:
        """Queue a page of what ``sub`` has to send up to ``last``; whether more may follow.
        Past the bound, ``close`` closes the subscription; else it stops there."""
        page_size = self.daemon.config.page_size
        started = sub not in self._to_start  # its frames may go to the outbox
        # This connection's queue, whatever subscription it is for.
        queued = self.outbox.queued_bytes + sum(s.held_bytes for s in self._to_start)
        events = self.daemon.db.events.tail(sub.cursor, sub.goal_id, page_size)
        for event in events:
            if event.event_id > last:
                return False
            frame = self._notification(_Appended(sub.id, event))
            queued += len(frame)
            if queued > 2 * self.outbox.limit_bytes:
                if close:
                    self._close_early(sub, started, self._deleted_unsent(sub, goal_id, last))
                return False
            if started:
                self.outbox.force(frame)
            else:
                sub.held.append(frame)
                sub.held_bytes += len(frame)
            sub.cursor = event.event_id
        return len(events) == page_size

    def _close_early(self, sub: _Subscription, started: bool, reason: str) -> None:
        if not started:  # start_pending says so once the subscribe reply is out
            sub.closing = reason
            return
        sub.scope.cancel()
        self._cut_off(sub, reason)

    def _stalled(self, sub: _Subscription) -> str:
        return (
            f"the client did not read for {self.daemon.config.subscriber_stall_timeout:g} s; "
            f"resubscribe with after_event_id={sub.cursor} to resume"
        )

    @staticmethod
    def _deleted_unsent(sub: _Subscription, goal_id: str, last: int) -> str:
        return (
            f"events of goal {goal_id!r} up to event_id {last} were deleted before this "
            f"subscription could send them, and more was to be sent before them than a "
            f"connection may queue (twice outbox_bytes); those deleted are gone: resubscribe "
            f"with after_event_id={sub.cursor} to resume"
        )

    def _cut_off(self, sub: _Subscription, reason: str) -> None:
        self._subscriptions.pop(sub.id, None)
        log.warning("session %d: subscription %d cut off: %s", self.id, sub.id, reason)
        self.outbox.force(self._notification(_Closed(sub.id, reason)))

    def _notification(self, params: _Appended | _Closed) -> bytes:
        method = "event.appended" if isinstance(params, _Appended) else "event.subscription_closed"
        return bytes(self.encode_frame(_ENCODER.encode(_Notification("2.0", method, params))))

    # -- operations

    async def backup(self, p: P.BackupParams) -> P.BackupResult:
        size = await trio.to_thread.run_sync(self.daemon.db.backup_to, p.dest)
        return P.BackupResult(path=p.dest, bytes=size)

    async def status(self) -> P.DaemonStatus:
        d = self.daemon
        return P.DaemonStatus(
            version=d.version,
            schema_version=d.db.schema_version,
            db_path=str(d.db.path),
            socket_path=str(d.config.socket_path),
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - d.started, 3),
            sessions=len(d.sessions),
            active_transactions=sum(1 for s in d.sessions if s.in_transaction),
            single_writes=d.gate.single_writes,
            single_write_commits=d.gate.commits,
        )

    async def discover(self) -> msgspec.Raw:
        return self.daemon.openrpc
