"""The write gate: one writer at a time, in arrival order, with group commit of single writes.

Theory of operation. SQLite has one writer; so does the daemon. The gate is a lock with a
line in arrival order: a session's transaction holds it from ``tx.begin`` to its end, and a
single write (a write call outside a transaction) holds it for one SQLite transaction. A
writer that has not had it within the lock timeout answers Busy.

Single writes commit in groups. The first one to take the gate opens a *batch*: a SQLite
transaction in which it runs its call (in a savepoint, as every call in a transaction does,
unless it is one statement).
When other sessions are writing too (two sessions wrote within ``group_commit_window`` of
each other lately, or the last batch had joiners), it then lets the request path take one
turn (``turn``: the poller serves every connection that is ready);
single writes of other sessions that arrive meanwhile run inside the open batch, each in its
own savepoint, instead of queueing for the gate. If one did, the batch waits on until every
task that can run has run (trio's idle point: nothing runnable, no socket ready), at most
``group_commit_window`` seconds; if none did, it commits at once. While batches keep getting
joiners, the next one waits for the idle point straight away. A write joins at once only
while nobody is in line for the gate; otherwise it gets in line, so nothing overtakes a
``tx.begin`` or a write that came first. Single writes in line get their turn together:
the first of them opens a batch, and each that runs in it lets in the next, up to the next
``tx.begin`` in line, so group commit resumes as soon as a transaction ends, in arrival
order.

A batch's first write that comes through ``write_now`` (a request answered at once, as
most are) opens the batch there and returns like a joiner; the committer task
(``run_committer``) then does the gathering and the COMMIT, so the write's connection never
waits for it. A write on the async path (``write``) leads its batch itself. The daemon may
end the gathering sooner with ``commit_opened``: once its poller has served every
connection that was ready and every connection waits in the poller (none is busy in a task
of its own), no write can join before a client sends again, and trio's idle point would
only cost a trip through the scheduler.

One COMMIT then serves them all, and each call answers only once that COMMIT is done, so an
answered write is as durable as ever: a joiner's call returns at once with the batch as its
``Commit``, and its session holds the reply until the commit, sent by the leader's task
through ``Commit.when_done`` (no wake-up of the joiner's task just to send it). A call that
fails rolls back its own savepoint and leaves the others alone. If the COMMIT fails (or
SQLite loses the transaction), every call of the batch answers the storage failure. A write
when nobody else is writing waits for nothing: it is its own SQLite transaction.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from trio.testing import wait_all_tasks_blocked

from omkd import db
from omkd.rpc.errors import Busy

if TYPE_CHECKING:
    from omkd.config import Config
    from omkd.rpc.methods import Method

__all__ = ["Commit", "WriteGate"]

log = logging.getLogger("omkd.writegate")


@dataclass(eq=False)
class Commit:
    """A batch: one SQLite transaction shared by single writes, and its COMMIT to come."""

    tx: db.Transaction
    done: trio.Event = field(default_factory=trio.Event)
    error: db.DbError | None = None  # set when the batch failed: every call answers it
    appends_events: bool = False
    calls: int = 0
    admitted: int = 0  # single writes let in from the line
    _when_done: list[Callable[[], None]] = field(default_factory=list)

    def when_done(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called once the COMMIT is done or failed (``error`` tells),
        from the leader's task, before ``done`` is set. It must not block or raise."""
        self._when_done.append(callback)

    def _finish(self) -> None:
        # Let go of the callbacks: they hold the replies, which hold this Commit, and the
        # cycle would leave them all to the garbage collector (a collection every ~130
        # writes under 8 writers).
        callbacks, self._when_done = self._when_done, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one joiner's bug must not leave the others unanswered
                log.exception("callback after a group commit failed")
        self.done.set()


@dataclass(eq=False)
class _Waiter:
    """One writer in line for the gate."""

    transaction: bool  # a tx.begin: the batch before it takes nobody from behind it
    turn: trio.Event = field(default_factory=trio.Event)
    served: bool = False  # out of the line: holds the gate, or has ``batch`` to join
    batch: Commit | None = None


class WriteGate:
    def __init__(self, database: db.Database, config: Config) -> None:
        self.db = database
        self.config = config
        self._held = False
        self._line: deque[_Waiter] = deque()  # arrival order
        self._batch: Commit | None = None
        # Are other sessions writing now? The last single write's session and time, when two
        # sessions last wrote close together, whether the last batch had joiners.
        self._last_writer: object = None
        self._last_write_at = -math.inf
        self._several_at = -math.inf
        self._grouping = False
        # A turn of the request path: the writes that arrived with a batch's first one
        # have run once it is over (the daemon's poller sets its own).
        self.turn: Callable[[], Awaitable[None]] = trio.lowlevel.cancel_shielded_checkpoint
        self._committer: trio.lowlevel.Task | None = None  # run_committer, while it runs
        self._committer_lot = trio.lowlevel.ParkingLot()
        self._opened: Commit | None = None  # opened by write_now, for the committer
        self.on_events_committed: Callable[[], None] = lambda: None
        self.single_writes = 0  # counters for tests and benchmarks
        self.commits = 0
        self.prompt_commits = 0  # batches commit_opened committed
        # Times the gate was let go: every write, batch and transaction has ended by one
        # (the checkpointer's "anything new?", without asking SQLite on the writer, whose
        # mutex a long write in a worker thread holds).
        self.releases = 0

    async def acquire(self) -> None:
        """Take the gate for a transaction, waiting in line up to the lock timeout; raises
        Busy."""
        await self._take(transaction=True)

    def release(self) -> None:
        """Hand the gate to the first in line, or leave it free."""
        self.releases += 1
        if not self._line:
            self._held = False
            return
        first = self._line.popleft()
        first.served = True
        first.turn.set()  # it holds the gate now

    async def _take(self, *, transaction: bool) -> Commit | None:
        """Take the gate (None), or for a single write in line, a batch to join that the
        single write ahead of it opened. Raises Busy after the lock timeout."""
        if not self._held and not self._line:
            self._held = True
            return None
        waiter = _Waiter(transaction)
        self._line.append(waiter)
        timeout = self.config.lock_timeout
        try:
            with trio.move_on_after(timeout):
                await waiter.turn.wait()
        except BaseException:  # cancelled from outside (the connection or the daemon ends)
            if not waiter.served:
                self._line.remove(waiter)
            elif waiter.batch is None:  # handed the gate as the cancellation came: pass it on
                self.release()
            else:
                self._admit_next(waiter.batch)
            raise
        if waiter.served:  # (possibly just as the lock timeout came)
            return waiter.batch
        self._line.remove(waiter)
        raise Busy(
            f"another session held the write lock for longer than the lock timeout "
            f"({timeout:g} s); retry, or raise --lock-timeout",
            {"lock_timeout_s": timeout},
        )

    def _admit_next(self, batch: Commit) -> None:
        # The single write first in line joins the batch, and lets in the next once its call
        # ran: one after another, in arrival order.
        line = self._line
        if line and not line[0].transaction and batch is self._batch and batch.error is None:
            waiter = line.popleft()
            waiter.served = True
            waiter.batch = batch
            batch.admitted += 1
            waiter.turn.set()

    async def write(
        self, method: Method, params: Any, writer: object
    ) -> tuple[Any, bool, Commit | None]:
        """Run a single write of ``writer`` (its session) and commit it, with others when
        they come together.

        Returns (result, whether committed events may wait for subscribers, the Commit still
        to come when the call joined another session's batch: its result stands only once
        that is done without error, and must not be answered before). Raises the call's own
        error, Busy, or the batch's StorageFailure.
        """
        joined = self.join_now(method, params)
        if joined is not None:
            # The leader commits; the caller waits for it (or has it send the reply).
            return joined[0], False, joined[1]
        group = self._note_writer(writer)
        batch = await self._take(transaction=False)
        if batch is not None:  # let in from the line, into the batch of the writes ahead
            if batch is not self._batch or batch.error is not None:
                return await self.write(method, params, writer)  # it committed without us
            try:
                return self._run(batch, method, params), False, batch
            finally:
                self._admit_next(batch)
        if group:
            return await self._lead(method, params)
        return self._alone(method, params)

    async def write_long(
        self,
        method: Method,
        run: Callable[[db.Database, Any], Any],
        params: Any,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[Any, bool]:
        """Run a single write of ``method`` that may take long, ``run(database, params)``,
        in a worker thread: in line for the gate like a transaction (it joins no batch, and
        no batch takes the writes in line behind it), then its own SQLite transaction, while
        the event loop serves the other connections. ``await before()`` runs first, holding
        the gate, on the event loop: every other write is committed. Returns (result, whether
        it committed events). Raises the call's own error, Busy. Once started it runs to its
        end, even when cancelled."""
        await self._take(transaction=True)
        try:
            if before is not None:
                await before()
            result = await trio.to_thread.run_sync(run, self.db, params)
        finally:
            self.release()
        self.single_writes += 1
        self.commits += 1
        return result, method.appends_events

    def write_now(
        self, method: Method, params: Any, writer: object
    ) -> tuple[Any, bool, Commit | None] | None:
        """``write`` when it would not wait: the write joins the open batch, or goes alone
        (the gate is free, nobody else is writing). None, having run nothing, if it would
        wait (for the gate, or to lead a batch). Raises as ``write``."""
        joined = self.join_now(method, params)
        if joined is not None:
            return joined[0], False, joined[1]
        group = self._note_writer(writer)
        if self._held or self._line or (group and self._committer is None):
            return None
        self._held = True
        if not group:
            return self._alone(method, params)
        batch = self._open()
        try:
            result = self._run(batch, method, params)
        finally:
            self._opened = batch
            self._committer_lot.unpark()
        return result, False, batch

    def _open(self) -> Commit:
        # Holds the gate.
        try:
            batch = Commit(self.db.transaction())
        except BaseException:
            self.release()
            raise
        self._batch = batch
        return batch

    async def run_committer(self) -> None:
        """Gather joiners for and commit the batches ``write_now`` opens; until cancelled."""
        self._committer = trio.lowlevel.current_task()
        try:
            while True:
                while self._opened is None:
                    await self._committer_lot.park()
                await self._close_opened()  # (keeps no batch alive here while parked)
        finally:
            self._committer = None
            if self._opened is not None:  # cancelled before it got its turn
                batch, self._opened = self._opened, None
                self._batch = None
                self._commit(batch)

    async def _close_opened(self) -> None:
        batch, self._opened = self._opened, None
        assert batch is not None
        await self._close(batch, calls_before=1)

    def commit_opened(self) -> None:
        """Commit the batch ``write_now`` opened, now, instead of letting the committer
        gather more writes for it; the caller knows none can come (see the module's
        docstring). Nothing to do when there is none, or the committer has it already."""
        batch, self._opened = self._opened, None
        if batch is None:
            return
        self.prompt_commits += 1
        self._grouping = batch.calls > 1  # as after the committer's first turn
        self._end(batch)

    async def _close(self, batch: Commit, calls_before: int) -> None:
        """Gather the batch's joiners, commit it, and wake the subscribers once for it."""
        try:
            if batch.error is None:
                await self._gather_joiners(batch, calls_before)
        finally:
            self._end(batch)

    def _end(self, batch: Commit) -> None:
        self._batch = None
        self._commit(batch)
        if batch.error is None and batch.appends_events:
            self.on_events_committed()

    def _note_writer(self, writer: object) -> bool:
        """Count a single write of ``writer``; return whether it should lead a batch.

        Several sessions are writing when two different ones wrote within the window of
        each other lately; then a write leads a batch, else it goes alone (no wait). Noting
        the same write twice (``write_now``, then ``write``) changes nothing more.
        """
        now = trio.current_time()
        window = self.config.group_commit_window
        if writer is not self._last_writer:
            if now - self._last_write_at < window:
                self._several_at = now
            self._last_writer = writer
        self._last_write_at = now
        return self._grouping or now - self._several_at < window

    def join_now(self, method: Method, params: Any) -> tuple[Any, Commit] | None:
        """Run a single write in the open batch if it may join it now (there is one, and
        nobody is in line); return (result, the batch), None if not. Raises as ``write``."""
        batch = self._batch
        if batch is None or batch.error is not None or self._line:
            return None
        return self._run(batch, method, params), batch

    def _alone(self, method: Method, params: Any) -> tuple[Any, bool, None]:
        # Nobody to group with: the call is its own transaction, without a savepoint.
        try:
            result = method.run(self.db, params)  # type: ignore[arg-type]
        finally:
            self.release()
        self.single_writes += 1
        self.commits += 1
        return result, method.appends_events, None

    async def _lead(self, method: Method, params: Any) -> tuple[Any, bool, None]:
        batch = self._open()
        self._admit_next(batch)
        own_error: Exception | None = None
        try:
            try:
                result = self._run(batch, method, params)
            except Exception as exc:  # the others of the batch still commit
                own_error = exc
        finally:
            await self._close(batch, batch.calls)  # (it wakes the subscribers)
        if own_error is not None:
            raise own_error
        if batch.error is not None:
            raise batch.error
        return result, False, None

    async def _gather_joiners(self, batch: Commit, calls_before: int) -> None:
        # One turn of the scheduler first: if no other write came meanwhile, nobody else is
        # writing now, and the commit should not wait. Otherwise (or at once while the
        # batches before this one had joiners) commit once every task that can run has run:
        # the writes that arrived meanwhile have joined. Bounded, and shielded: a batch is
        # never left half done.
        if not self._grouping and not batch.admitted:
            await self.turn()
            self._grouping = batch.calls > calls_before
            if not self._grouping:
                return
        window = self.config.group_commit_window
        with trio.CancelScope(shield=True, deadline=trio.current_time() + window):
            await wait_all_tasks_blocked()  # trio's idle point (public, in trio.testing)
        self._grouping = batch.calls > 1

    def _run(self, batch: Commit, method: Method, params: Any) -> Any:
        try:
            result = method.run(batch.tx, params)  # type: ignore[arg-type]
        except db.StorageFailure as exc:
            if exc.transaction_lost:
                batch.error = exc  # SQLite rolled the whole batch back
            raise
        batch.appends_events |= method.appends_events
        batch.calls += 1
        self.single_writes += 1
        return result

    def _commit(self, batch: Commit) -> None:
        try:
            if batch.error is None:
                batch.tx.commit()
                self.commits += 1
        except db.DbError as exc:
            batch.error = exc
        finally:
            self.release()
            batch._finish()
