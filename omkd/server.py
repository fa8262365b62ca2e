"""``omkd serve``: the daemon's lifecycle around the connections.

Resource handling: ``serve`` takes the socket from systemd, or takes the socket's lock after
checking that no other daemon holds the database's; then takes the database's lock, opens
(and migrates) the database, binds the socket, and serves until SIGTERM or SIGINT. Every
refusal that names another daemon comes before the database file is created or migrated, so
a refused start leaves nothing behind. Then it stops accepting, cancels every connection
(each rolls back its own transaction on the way out), checkpoints the WAL with TRUNCATE,
closes the database, removes its socket file and releases its locks, and returns 0.

Error handling: a failure to start (a live daemon on the socket, the database held by
another daemon, a damaged file) raises ``StartupError`` with a message for a person; the CLI
prints it and exits non-zero. Nothing a client does reaches this level.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec
import trio

import omkd
from omkd import db, systemd
from omkd.config import Config, MiB
from omkd.failures import FailureLog
from omkd.listen import (
    PASSING_ERRNOS,
    FileLock,
    StartupError,
    check_lock,
    hold_lock,
    hold_socket_path,
    open_unix_listener,
    peer_uid,
    remove_socket,
)
from omkd.rpc.connection import serve_connection
from omkd.rpc.dispatch import Dispatcher
from omkd.rpc.errors import Busy
from omkd.rpc.openrpc import openrpc_document
from omkd.rpc.poller import Poller
from omkd.rpc.session import Session
from omkd.rpc.writegate import WriteGate

__all__ = ["Daemon", "StartupError", "serve"]

log = logging.getLogger("omkd")

_SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# Descriptors a start needs beyond those it has opened: the database, its WAL and -shm on
# two connections, the socket, trio's own, the first clients'.
START_DESCRIPTORS: Final = 16
# How often a stopped start interrupts its check of the database until it has ended.
START_CHECK_INTERRUPT_S: Final = 0.01
# The start's time for its check of the database, told to systemd (EXTEND_TIMEOUT_USEC).
START_CHECK_BASE_S: Final = 30.0
START_CHECK_BYTES_PER_S: Final = 40 * MiB


class Daemon:
    """What every session shares: the database, the write gate, the live sessions."""

    def __init__(self, config: Config, database: db.Database) -> None:
        self.config = config
        self.db = database
        self.version = omkd.__version__
        self.dispatcher = Dispatcher(
            batch_slice=config.batch_slice,
            batch_reply_bytes=config.batch_reply_bytes,
            turn=trio.lowlevel.checkpoint,
            long_call_rows=config.long_call_rows,
            long_call_bytes=config.long_call_bytes,
            long_call_seconds=config.long_call_seconds,
        )
        self.gate = WriteGate(database, config)
        self.long_reads = trio.CapacityLimiter(config.long_reads)
        self.poller = Poller(idle_spin=config.idle_spin)
        self.gate.turn = self.poller.turn
        self.poller.on_drained = self._drained
        self.gate.on_events_committed = self.events_committed
        self.sessions: set[Session] = set()
        self.new_events = trio.Event()
        self.subscriptions = 0  # live subscription feeders, which wait on new_events
        self.deleting: trio.Event | None = None  # set while a single write deletes events
        self.started = time.monotonic()
        self.openrpc = msgspec.Raw(
            msgspec.json.encode(openrpc_document(self.dispatcher.methods.values(), self.version))
        )

    def add_session(self, session: Session) -> None:
        self.sessions.add(session)

    def remove_session(self, session: Session) -> None:
        self.sessions.discard(session)

    def alone(self, session: Session) -> bool:
        """Whether every connection but ``session``'s waits in the poller."""
        return self.poller.parked == len(self.sessions) - 1 and session in self.sessions

    def _drained(self) -> bool:
        # The poller has served every connection that was ready. If every connection waits
        # in it (none is busy in a task of its own), no write can join the open batch
        # before a client sends again: commit it now rather than at trio's idle point.
        # Returns whether it did look (the poller may then spin: no connection's own task
        # waits in trio for its requests).
        if self.poller.parked != len(self.sessions):
            return False
        self.gate.commit_opened()
        return True

    async def send_before_deletion(self, goal_id: str, *, close: bool) -> int | None:
        """Before a write deletes the goal's events: each subscription queues those it has
        still to send, which would be lost otherwise; the subscriptions made meanwhile last,
        in one step. ``close``: the deletion is sure to happen (the write holds the write
        gate, every other write committed, and runs next), so a subscription too far behind
        is closed; else one is only queued as far as the bound lets it. Returns the goal's
        newest event_id (None: no events). (Events its own transaction appended are not
        committed: deleted with them, they are never sent.)"""
        newest = self.db.events.get_by_goal(goal_id, tail=1)
        if not newest:
            return None
        last = newest[0].event_id
        for session in [s for s in self.sessions if s.subscribing]:
            await session.send_before_deletion(goal_id, last, close=close)
        self.send_before_deletion_now(goal_id, last, close=close)
        return last

    def send_before_deletion_now(self, goal_id: str, last: int, *, close: bool) -> None:
        """``send_before_deletion`` in one step of the event loop (see the session's)."""
        for session in [s for s in self.sessions if s.subscribing]:
            session.send_before_deletion_now(goal_id, last, close=close)

    async def begin_deletion(self, goal_id: str) -> trio.Event:
        """A single write holding the write gate is about to delete the goal's events in a
        worker thread: send them first, then hold new subscriptions back until
        ``end_deletion`` (they would read the events the thread is deleting, and lose what
        it deleted first). Returns what to end."""
        await self.send_before_deletion(goal_id, close=True)
        deleting = self.deleting = trio.Event()  # (one at a time: the write gate)
        return deleting

    def end_deletion(self, deleting: trio.Event) -> None:
        """End the deletion ``begin_deletion`` began: the subscriptions held back go on."""
        if self.deleting is deleting:
            self.deleting = None
        deleting.set()

    def events_committed(self) -> None:
        """Wake the subscriptions: new events may be committed."""
        if not self.subscriptions:  # nobody to wake: no Event made and set per write
            return
        signal_, self.new_events = self.new_events, trio.Event()
        signal_.set()


def check_database_path(path: str) -> None:
    """Refuse, before anything is created, a database path the daemon could not write: a
    directory, or a file (or its WAL) it may not open for writing. (SQLite would open such a
    file read-only and fail every write.)"""
    where = Path(path)
    if where.is_dir():
        raise StartupError(
            f"database {where} is a directory: --db names the database file "
            f"(e.g. {where / 'omk.db'})"
        )
    for name in (where, where.with_name(where.name + "-wal")):
        try:
            fd = os.open(name, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                continue  # not there (yet): the start says what is wrong with the path
            raise StartupError(
                f"cannot open database {name} for writing: {exc.strerror}; the daemon "
                f"writes to it (see its owner and mode)"
            ) from exc
        os.close(fd)


def open_database(config: Config) -> db.Database:
    """Open and migrate the database; refuse a file SQLite cannot use, with what to do."""
    try:
        return db.Database.open(
            config.db_path,
            synchronous=config.synchronous,
            wal_autocheckpoint=config.wal_autocheckpoint,
            wal_size_limit=config.wal_restart_pages or None,
            check_json=False,  # every value comes from msgspec's JSON decoder
        )
    except db.StorageFailure as exc:
        _refuse_if_out_of_descriptors(exc)
        raise StartupError(
            f"database {config.db_path} is unusable ({exc}); {_restore_advice(config)}"
        ) from exc
    except db.Busy as exc:  # another process holds it for a moment (a migration, a backup)
        raise StartupError(f"cannot open database {config.db_path}: {exc}", lasting=False) from exc
    except db.DbError as exc:
        raise StartupError(f"cannot open database {config.db_path}: {exc}") from exc


async def check_database(database: db.Database, config: Config) -> None:
    """Refuse a damaged file (``PRAGMA quick_check``), with what to do about it.

    The check reads the whole file (~20 s for 1.5 GB with a cold cache): it runs in a
    worker thread, systemd is told (a status line, a longer start timeout), and a stop
    requested meanwhile (the start cancelled) interrupts it.
    """
    size = os.stat(config.db_path).st_size
    _notify(
        lambda: systemd.notify_starting(
            f"checking {config.db_path} ({size // MiB:,} MiB)",
            extend=START_CHECK_BASE_S + size / START_CHECK_BYTES_PER_S,
        )
    )
    async with trio.open_nursery() as nursery:
        finished = False

        async def interrupt_if_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                # The start was cancelled: the check ends now. Again until it has: an
                # interrupt that comes before its statement begins is lost.
                with trio.CancelScope(shield=True):
                    while not finished:
                        database.interrupt_reads()
                        await trio.sleep(START_CHECK_INTERRUPT_S)

        nursery.start_soon(interrupt_if_cancelled)
        try:
            problems = await trio.to_thread.run_sync(database.quick_check)
        except db.Interrupted:
            await trio.lowlevel.checkpoint()  # the cancellation goes on from here
            raise
        except db.DbError as exc:  # damage SQLite stops at ("database disk image is malformed")
            _refuse_if_out_of_descriptors(exc)
            problems = [str(exc)]
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if problems:
        raise StartupError(
            f"database {config.db_path} is damaged ({'; '.join(problems[:3])}); "
            f"{_restore_advice(config)}"
        )


def _refuse_if_out_of_descriptors(exc: Exception) -> None:
    """SQLite says only "unable to open database file" when the process has too few
    descriptors left for a database's files: that may pass, and is no damage (StartupError,
    not lasting). (The ones SQLite had opened are closed again by now: a few are asked.)"""
    opened: list[int] = []
    try:
        for _ in range(START_DESCRIPTORS):
            opened.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as probe:
        if probe.errno in (errno.EMFILE, errno.ENFILE):
            raise StartupError(f"cannot start: {probe.strerror} ({exc})", lasting=False) from exc
    finally:
        for fd in opened:
            os.close(fd)


def _restore_advice(config: Config) -> str:
    return (
        f"run `omkd check --db {config.db_path}` for a report, and restore the file from a "
        f"backup (`omkd backup` writes one)"
    )


async def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit status (0).

    Raises StartupError (bare, not in a group) when the daemon cannot start.
    """
    try:
        return await _serve_until_signalled(config)
    except BaseExceptionGroup as group:
        startup, _rest = group.split(StartupError)
        if startup is None:
            raise
        raise _first_leaf(startup) from None


async def _start(
    nursery: trio.Nursery, config: Config, signals: AsyncIterator[int]
) -> tuple[Daemon | None, bool]:
    """Start the daemon in ``nursery`` (the check of a large database takes seconds, and a
    stop must not wait for it); return it, None if a signal stopped the start first, and
    whether a signal came as the start ended (it is to stop at once)."""
    with trio.CancelScope() as starting:
        async with trio.open_nursery() as watching:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s while starting: stopping", signal.Signals(signum).name)
                    _notify(systemd.notify_stopping)
                    starting.cancel()
                    return

            watching.start_soon(stop_on_signal)
            try:
                daemon: Daemon = await nursery.start(run_daemon, config)
            except OSError as exc:  # a path it cannot use: the socket's, the database's
                where = f": {exc.filename}" if exc.filename else ""
                raise StartupError(
                    f"cannot start: {exc.strerror or exc}{where}",
                    lasting=exc.errno not in PASSING_ERRNOS,
                ) from exc
            watching.cancel_scope.cancel()
        return daemon, starting.cancel_called
    return None, True


def _first_leaf(group: BaseExceptionGroup[StartupError]) -> StartupError:
    first = group.exceptions[0]
    return first if isinstance(first, StartupError) else _first_leaf(first)


async def _serve_until_signalled(config: Config) -> int:
    with trio.open_signal_receiver(*_SHUTDOWN_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            daemon, stopping = await _start(nursery, config, signals)
            if daemon is None:  # stopped before it could serve
                log.info("stopped before serving")
                return 0
            if not stopping:  # (a signal as the start ended: stop now)
                async for signum in signals:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    break
                _notify(systemd.notify_stopping)
            open_transactions = sum(1 for s in daemon.sessions if s.in_transaction)
            if open_transactions:
                log.info("rolling back %d open transactions", open_transactions)
            nursery.cancel_scope.cancel()
            # A long read in a worker thread would hold the stop up until it ends (a page of
            # a goal's whole log: seconds); a write, outside a transaction, is let finish.
            daemon.db.interrupt_reads()
    log.info("stopped")
    return 0


def _notify(send: Callable[[], bool]) -> None:
    # A notification systemd cannot take is worth a log line, never the daemon.
    try:
        send()
    except (OSError, ValueError) as exc:
        log.error("systemd notification failed: %s", exc)


async def run_daemon(
    config: Config, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the Daemon once it can serve.

    On the way out, whatever the reason, the sessions roll back, the WAL is checkpointed,
    the database closed, and the socket file and the locks released.
    """
    check_database_path(config.db_path)
    inherited = _inherited_socket()
    with (
        _claim_socket(config, inherited) as config,
        hold_lock(config.db_path, "database"),
        contextlib.closing(FileLock(config.db_path)) as file_lock,
    ):
        file_lock.take()  # before anything is read or migrated, when the file exists
        database = open_database(config)
        try:
            await check_database(database, config)  # (a damaged file is left as it is)
        except BaseException:
            database.close()
            raise
        try:
            file_lock.take()  # a new file: now it does
            if inherited is not None:
                await _serve_socket(Daemon(config, database), inherited, task_status)
                return
            sock = open_unix_listener(config.socket_path, config.listen_backlog)
            try:
                await _serve_socket(Daemon(config, database), sock, task_status)
            finally:
                remove_socket(config.socket_path)
        finally:
            _checkpoint(database)
            database.close()


def _inherited_socket() -> socket.socket | None:
    try:
        return systemd.listen_socket()
    except ValueError as exc:  # fd 3 is not the listening socket systemd promised
        raise StartupError(f"socket activation: {exc}") from exc


@contextlib.contextmanager
def _claim_socket(config: Config, inherited: socket.socket | None) -> Iterator[Config]:
    """Hold the socket the daemon will serve; yield the config that names it.

    The database's lock is only checked here, not created, so that a daemon refused for
    either resource creates nothing; ``run_daemon`` takes it next.
    """
    if inherited is not None:
        with inherited:  # closed if the start fails (serving closes it too)
            yield _activated_config(config, inherited)
        return
    check_lock(config.db_path, "database")
    with hold_socket_path(config.socket_path):
        yield config


def _activated_config(config: Config, sock: socket.socket) -> Config:
    # systemd chose the socket: report and log its path, not the one --socket would bind.
    name = sock.getsockname()
    if isinstance(name, bytes) and name[:1] == b"\0":  # an abstract name: @name, as systemd
        name = "@" + name[1:].decode(errors="backslashreplace")
    if isinstance(name, str) and name:
        return msgspec.structs.replace(config, socket_path=name)
    return config


async def _serve_socket(
    daemon: Daemon, sock: socket.socket, task_status: trio.TaskStatus[Daemon]
) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    with contextlib.closing(daemon.poller), _collector_threshold(daemon.config.gc_threshold):
        async with listener, trio.open_nursery() as nursery:
            _start_serving(daemon, listener, nursery, task_status)


@contextlib.contextmanager
def _collector_threshold(young: int) -> Iterator[None]:
    """Python's garbage collector starts a young collection at ``young`` new objects while
    the daemon serves (Config.gc_threshold says why), and as before afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _start_serving(
    daemon: Daemon,
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    nursery.start_soon(_accept, daemon, listener, nursery)
    nursery.start_soon(daemon.poller.run)
    nursery.start_soon(daemon.gate.run_committer)
    nursery.start_soon(_checkpoint_wal, daemon)
    try:
        interval = systemd.watchdog_interval()
    except ValueError as exc:  # WATCHDOG_USEC that is no number
        raise StartupError(f"systemd watchdog: {exc}") from exc
    if interval is not None:
        nursery.start_soon(_watchdog, interval)
    config = daemon.config
    log.info(
        "serving %s on %s (omkd %s, schema %d, pid %d)",
        config.db_path,
        config.socket_path,
        daemon.version,
        daemon.db.schema_version,
        os.getpid(),
    )
    _notify(lambda: systemd.notify_ready(f"serving {config.db_path}"))
    task_status.started(daemon)


async def _accept(daemon: Daemon, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
    ids = itertools.count(1)
    uid = os.getuid()
    failures = 0  # accepts failed in a row: logged once, and once more when over
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:  # out of file descriptors, mostly: wait, keep serving
            delay = daemon.config.accept_retry_delay
            if not failures:
                log.error("accept failed: %s; retrying every %g s meanwhile", exc, delay)
            failures += 1
            await trio.sleep(delay)
            continue
        if failures:
            log.warning("accepting connections again, after %d failed attempts", failures)
            failures = 0
        peer = peer_uid(stream.socket)
        if peer != uid:
            log.warning("refused a connection from uid %s (only uid %d may connect)", peer, uid)
            await stream.aclose()
            continue
        nursery.start_soon(serve_connection, daemon, stream, next(ids))
        # The connections already served come first: each accept waits for a turn of the
        # scheduler, and until the poller has answered every parked connection that is
        # ready. (A client connecting and closing in a loop, 3,000 times a second, left the
        # others a reply or two a second.)
        await daemon.poller.turn()


async def _watchdog(interval: float) -> None:
    # From the event loop itself, so that a stuck loop stops the pings and systemd notices.
    while True:
        _notify(systemd.notify_watchdog)
        await trio.sleep(interval)


async def _checkpoint_wal(daemon: Daemon) -> None:
    # Checkpoints in a worker thread, concurrently with the writes: no commit on the event
    # loop pays for one, nor for its fsyncs. (SQLite's own, at wal_autocheckpoint pages, is
    # the backstop.)
    database, gate = daemon.db, daemon.gate
    restart_pages = daemon.config.wal_restart_pages
    failures = FailureLog(log, "WAL checkpoints (retried after the next writes)")
    seen = gate.releases
    while True:
        await trio.sleep(daemon.config.checkpoint_interval)
        ended = gate.releases  # writes, batches and transactions ended
        if ended == seen:
            continue
        seen = ended
        try:
            _, frames, _ = await trio.to_thread.run_sync(database.checkpoint_concurrently)
            if restart_pages and frames >= restart_pages and gate.releases != ended:
                await _restart_wal(daemon)
                seen = gate.releases  # (that wrote nothing)
        except db.DbError as exc:
            failures.failed(str(exc))
        else:
            failures.succeeded()


async def _restart_wal(daemon: Daemon) -> None:
    """Checkpoint what the writes during the last checkpoint added, with writes held back.

    SQLite starts the WAL over (writes from its beginning again) only when a write finds
    every frame checkpointed; while writes never pause, each checkpoint ends with new frames
    in the WAL, and the file grows by everything written (400 MB in seconds under 8
    writers). Holding the write gate, in line like a transaction, for the few frames left
    makes the next write start it over; reads go on meanwhile.
    """
    gate = daemon.gate
    try:
        await gate.acquire()
    except Busy:  # a long transaction holds the gate: next time
        return
    try:
        await trio.to_thread.run_sync(daemon.db.checkpoint_concurrently)
    finally:
        gate.release()


def _checkpoint(database: db.Database) -> None:
    try:
        busy, frames, done = database.checkpoint("TRUNCATE")
    except db.DbError as exc:
        log.error("WAL checkpoint at shutdown failed: %s", exc)
        return
    if busy:
        log.warning(
            "WAL checkpoint at shutdown incomplete (%d of %d pages): another process holds "
            "the database open; nothing is lost, the next start or checkpoint finishes it",
            max(done, 0),
            max(frames, 0),
        )
