"""The trio adapter: one client connection, its tasks and its session.

Theory of operation. While nothing is in progress (no transaction, no reply held back, no
whole message buffered) the connection is parked in the daemon's ``Poller``, which reads
for it and answers inline what ``Dispatcher.answer_now`` answers (``serve_ready``); it hands
the connection back to its task, with what it read, for anything else. The task reads bytes
into the sans-IO ``FrameDecoder`` itself only inside a transaction (where the idle timeout
runs), answers each whole message in arrival order through the ``Dispatcher`` and
sends the reply itself when nothing is queued before it (written straight into the socket's
buffer, falling back to trio's ``send_all`` for what does not fit); it reads more only when
the buffered messages are answered, so a client that sends faster than it is served waits in
the kernel, and the daemon holds at most one message's worth of its requests. Replies to
calls pipelined inside a transaction (which never wait) are held until the requests already
received are answered, then sent in one write. The reply to a write that joined another
session's group commit is sent by that batch's leader once the COMMIT is done, while this
task already waits for the next request. Notifications, and replies that find the socket
busy, go through the ``Outbox``, which a writer task drains in order.
While the session holds a transaction, the task waits for more bytes only until the idle
timeout, then rolls the transaction back; alone with the daemon, it first spins for them as
the poller does for a lone client (``Poller.spin_for``). (One task on the request path, not
a reader, a worker and a writer handing each message on: every hand-off was a trip through
trio's scheduler, which cost more than the SQL.)

Resource handling: however the connection ends (end of file, a broken socket, an oversize
frame, a client that stops reading, daemon shutdown), ``serve_connection`` rolls back the
session's transaction, cancels its subscriptions and closes the stream. Error handling: a
broken or misbehaving client ends its own connection only; nothing raised here reaches the
daemon's nursery.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import select
import time
from typing import TYPE_CHECKING, Final

import trio

from omkd.rpc.dispatch import NOT_NOW, DeferredReply, ReplyPieces, encode_error
from omkd.rpc.framing import (
    NEED_DATA,
    FrameDecoder,
    FrameTooLarge,
    Framing,
    NeedData,
    encode_frame,
    frame_pieces,
)
from omkd.rpc.outbox import Outbox
from omkd.rpc.poller import WAKEUP_BUDGET_S, SpinOdds
from omkd.rpc.session import Session
from omkd_client.codes import ErrorCode

if TYPE_CHECKING:
    from omkd.server import Daemon

__all__ = ["serve_connection"]

log = logging.getLogger("omkd.connection")

_RECEIVE_BYTES: Final = 64 * 1024
_COALESCE_BYTES: Final = 64 * 1024  # replies held back to go out in one write, at most


class _Idle(enum.Enum):
    IDLE = "idle"  # the transaction's idle timeout passed with nothing received


_IDLE: Final = _Idle.IDLE


class _Connection:
    def __init__(self, daemon: Daemon, stream: trio.SocketStream, session_id: int) -> None:
        config = daemon.config
        self.daemon = daemon
        self.stream = stream
        self.fd = stream.socket.fileno()  # for replies sent without a trip through trio
        self.decoder = FrameDecoder(config.max_message_bytes)
        self.outbox = Outbox(config.outbox_bytes)
        self.session = Session(daemon, session_id, self.outbox, self._frame, self._peer_gone)
        self.sending = trio.Lock()  # one writer on the socket at a time
        # Replies not sent yet, to go out in one write (or, past _COALESCE_BYTES, one after
        # another: a long reply's pieces are never copied into one buffer).
        self._held: list[bytes | memoryview] = []
        self._held_bytes = 0
        # What the poller read and left to this task (see serve_ready).
        self._handed: bytes | None = None  # a message it did not answer
        self._too_large: FrameTooLarge | None = None
        self._ended = False  # it read the end of the stream, or the socket broke
        self._gone = False  # a reply found the socket closed by the client
        # Whether to spin for the next request (see _read), and the poll that does.
        self._odds = SpinOdds()
        self._readable: select.poll | None = None
        self._turn = 0.0  # (perf_counter) when this task last let trio run the others

    def _frame(self, message: bytes) -> bytes:
        return encode_frame(self.decoder.framing or Framing.LENGTH, message)

    def _peer_gone(self) -> bool:
        # POLLHUP once the client has closed its end (or both directions): it reads no
        # more. (A client that only shut down its writing still reads its replies.)
        poll = select.poll()
        poll.register(self.fd, select.POLLOUT)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poll.poll(0))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.session.nursery = nursery
            nursery.start_soon(self._write, nursery.cancel_scope)
            try:
                finished = await self._serve()
            finally:
                self.outbox.close()
            # The writer sends what is queued and ends the connection; a client that will not
            # read it gets the stall timeout, and one that stalled already gets nothing more.
            stall = self.daemon.config.reply_stall_timeout if finished else 0
            nursery.cancel_scope.deadline = trio.current_time() + stall

    async def _serve(self) -> bool:
        """Answer messages until the client is done (True) or stopped reading (False)."""
        session = self.session
        poller = self.daemon.poller
        # When the transaction's idle timeout runs out (outside a transaction: the message
        # timeout of a message begun): counted from the last whole message, so a client
        # trickling the bytes of one it never finishes keeps neither the write lock nor the
        # bytes (None: no wait for bytes since that message).
        idle_deadline: float | None = None
        while True:
            handed = self._handed is not None  # answer_now said no to it already
            try:
                message = self._next_message()
            except FrameTooLarge as exc:
                if not await self._flush():
                    return False
                self._refuse_oversize(exc)
                return True
            if message is NEED_DATA:
                if self._held and not await self._flush():
                    return False
                if not session.in_transaction and not self._ended and not self.decoder.pending:
                    # Nothing in progress: the poller answers what will not wait.
                    await poller.park(self)
                    # Replies it could not send go out before anything answered after them.
                    if self._held and not await self._flush():
                        return False
                    continue
                if idle_deadline is None:
                    config = self.daemon.config
                    timeout = (
                        config.tx_idle_timeout if session.in_transaction else config.message_timeout
                    )
                    idle_deadline = trio.current_time() + timeout
                data = None if self._ended else await self._receive(idle_deadline)
                if data is None:
                    if self.decoder.end_of_stream():  # a last line without its newline
                        continue
                    await session.settle()  # a reply still to send after its COMMIT
                    return True
                if data is _IDLE:
                    if not session.in_transaction:  # then only a message begun waits here
                        await session.settle()  # the reply before it goes out first
                        self._refuse_unfinished()
                        return True
                    session.idle_abort()
                    idle_deadline = None  # a message begun now has the message timeout
                else:
                    self.decoder.receive_data(data)
                continue
            idle_deadline = None
            # A request that will not wait is answered without the async path.
            joined = NOT_NOW if handed else self.daemon.dispatcher.answer_now(message, session)
            if joined is NOT_NOW:
                reply = await self.daemon.dispatcher.handle(message, session)
            else:
                reply = joined
            if isinstance(reply, DeferredReply):
                # Nothing is held (only calls in a transaction are), and the next message
                # waits for the COMMIT: the order of replies holds.
                reply.commit.when_done(functools.partial(self._send_deferred, reply))
                continue
            if isinstance(reply, ReplyPieces):
                framing = self.decoder.framing or Framing.LENGTH
                pieces = frame_pieces(framing, reply.pieces)
                self._held.extend(pieces)
                self._held_bytes += sum(len(piece) for piece in pieces)
            elif reply is not None:
                self._held.append(self._frame(reply))
                self._held_bytes += len(self._held[-1])
            # Pipelined calls inside a transaction never wait (the session holds the write
            # lock), so their replies go out together, in one write, once the requests
            # already received are answered.
            if (
                session.in_transaction
                and self._held_bytes < _COALESCE_BYTES
                and self.decoder.has_message()
            ):
                continue
            if self._held and not await self._flush():
                return False
            session.start_pending()

    def _next_message(self) -> bytes | NeedData:
        """The next message: first what the poller left, then the decoder's."""
        message = self._handed
        if message is not None:
            self._handed = None
            return message
        too_large = self._too_large
        if too_large is not None:
            self._too_large = None
            raise too_large
        return self.decoder.next_message()

    def serve_ready(self) -> bool:
        """Called by the poller while parked: read, and answer what ``answer_now`` answers;
        False to go back to this connection's task, which goes on from what is left here
        (a message, an oversize frame, the end of the stream, replies not sent)."""
        try:
            data = os.read(self.fd, _RECEIVE_BYTES)
        except BlockingIOError:
            return True
        except OSError:  # reset by the peer
            self._ended = True
            return False
        if not data:
            if self.decoder.pending:
                log.debug("session %d: closed mid-message", self.session.id)
            self._ended = True
            return False
        self.decoder.receive_data(data)
        try:
            # A message begun but not finished waits in the connection's task, against the
            # message timeout.
            return self._answer_buffered() and not self.decoder.pending
        except Exception:  # a bug: this connection ends, the poller goes on
            log.exception("session %d: unexpected error; connection closed", self.session.id)
            self._ended = True
            return False

    def _answer_buffered(self) -> bool:
        dispatcher = self.daemon.dispatcher
        while True:
            try:
                message = self.decoder.next_message()
            except FrameTooLarge as exc:
                self._too_large = exc
                return False
            if message is NEED_DATA:
                return True
            reply = dispatcher.answer_now(message, self.session)
            if reply is NOT_NOW:
                self._handed = message
                return False
            if isinstance(reply, DeferredReply):
                reply.commit.when_done(functools.partial(self._send_deferred, reply))
                continue
            frame = self._frame(reply)
            sent = 0
            if not (self.outbox.queued_bytes or self.sending.locked()):
                written = self._write_now(frame)
                if written is None:  # the client is gone
                    self._ended = True
                    return False
                if written == len(frame):
                    continue
                sent = written
            # Behind other frames, or the socket's buffer is full: the task sends the rest.
            self._held.append(frame[sent:])
            self._held_bytes += len(frame) - sent
            return False

    async def _flush(self) -> bool:
        """Send the replies held back; False if the client is gone, or stalled (logged)."""
        if not self._held:
            return True
        held = self._held
        frames = [b"".join(held)] if self._held_bytes <= _COALESCE_BYTES else _coalesced(held)
        held.clear()
        self._held_bytes = 0
        for frame in frames:
            if not await self._reply(frame):
                break
        else:
            return True
        if self._gone:  # it closed its end without waiting for the replies: its own business
            log.debug("session %d: client gone before its replies were sent", self.session.id)
            return False
        log.warning(
            "session %d: client left its replies unread for %g s; disconnected",
            self.session.id,
            self._stall_timeout(),
        )
        return False

    async def _receive(self, idle_deadline: float) -> bytes | _Idle | None:
        """The next bytes for the session's transaction; _IDLE when ``idle_deadline`` (trio's
        clock) passed first; None at the end of the stream. (Outside a transaction the
        poller reads.)"""
        try:
            with trio.move_on_at(idle_deadline):
                data = await self._read()
                if not data and self.decoder.pending:
                    log.debug("session %d: closed mid-message", self.session.id)
                return data or None
            return _IDLE
        except (OSError, trio.ClosedResourceError):  # reset by the peer, or closed under us
            return None

    async def _read(self) -> bytes:
        """Wait until the socket is readable, then read what is there (b"" at end of stream).

        Waiting first, not trying first: when a client waits for each reply, its next
        request is never there yet, and a read that fails costs a syscall and an exception.
        A client whose last pause was short, alone with the daemon, is waited for as the
        poller waits for a lone client (``Poller.spin_for``): its next request is read
        without waking a halted CPU.
        """
        waiting = time.perf_counter()
        if self._odds.pays and waiting - self._turn > WAKEUP_BUDGET_S:
            # A spin that catches each call leaves trio no turn (a call in a transaction
            # never waits): its timers and I/O (a new connection, a worker thread's result,
            # a deadline) get one at least this often, as from the poller. Nothing is read
            # yet: a cancellation here loses nothing.
            await trio.lowlevel.checkpoint()
            waiting = self._turn = time.perf_counter()
        if self._odds.pays and self.daemon.alone(self.session) and self._odds.take():
            if self._readable is None:
                self._readable = select.poll()
                self._readable.register(self.fd, select.POLLIN)
            spun = self.daemon.poller.spin_for(self.fd, self._readable)
            if spun:
                self._odds.caught()
                with contextlib.suppress(BlockingIOError):
                    return os.read(self.fd, _RECEIVE_BYTES)
            elif spun is False:
                self._odds.missed()
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            self._turn = time.perf_counter()
            try:
                data = os.read(self.fd, _RECEIVE_BYTES)
            except BlockingIOError:
                continue
            self._odds.pays = self.daemon.poller.quick(self._turn - waiting)
            return data

    async def _reply(self, frame: bytes | memoryview) -> bool:
        """Send or queue a reply; False if the client did not take it within the stall
        timeout (or is gone)."""
        if self.outbox.queued_bytes or self.sending.locked():
            return await self.outbox.put_before(frame, self._stall_timeout())
        # Nothing queued before it: straight into the socket's buffer, which nearly always
        # has room; trio's send_all (a trip through the scheduler, a cancel scope) only for
        # what does not fit.
        sent = self._write_now(frame)
        if sent is None:
            return False
        if sent == len(frame):
            return True
        self.sending.acquire_nowait()
        try:
            with trio.move_on_after(self._stall_timeout()):
                await self.stream.send_all(memoryview(frame)[sent:])
                return True
            return False  # cut mid-frame: the stream is unusable now
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._gone = True
            return False
        finally:
            self.sending.release()

    def _write_now(self, frame: bytes | memoryview) -> int | None:
        """Write what the socket's buffer takes of ``frame``; None if the client is gone."""
        try:
            return os.write(self.fd, frame)
        except BlockingIOError:
            return 0
        except OSError:
            self._gone = True
            return None

    def _send_deferred(self, reply: DeferredReply) -> None:
        # Called by the batch's leader once the COMMIT is done; must not block or raise.
        if self.outbox.closed:  # the connection is ending: its socket may be closed
            return
        frame = self._frame(reply.resolve())
        if self.outbox.queued_bytes or self.sending.locked():
            self.outbox.force(frame)
            return
        sent = self._write_now(frame)
        if sent is not None and sent < len(frame):
            self.outbox.force(frame[sent:])  # the writer task sends the rest

    def _stall_timeout(self) -> float:
        # A client holding the write lock gets no longer than an idle transaction would.
        config = self.daemon.config
        if self.session.in_transaction:
            return min(config.reply_stall_timeout, config.tx_idle_timeout)
        return config.reply_stall_timeout

    def _refuse_unfinished(self) -> None:
        timeout = self.daemon.config.message_timeout
        log.info(
            "session %d: a message unfinished after %g s (%d bytes); closing",
            self.session.id,
            timeout,
            self.decoder.pending,
        )
        reply = encode_error(
            ErrorCode.INVALID_REQUEST,
            f"a message was left unfinished for {timeout:g} s; the connection is closed",
            {
                "field": None,
                "detail": "the message was not finished within the message timeout",
                "received": self.decoder.pending,
                "message_timeout_s": timeout,
            },
        )
        self.outbox.force(self._frame(reply))  # small, and the last: past the bound is fine

    def _refuse_oversize(self, error: FrameTooLarge) -> None:
        log.warning("session %d: %s; closing", self.session.id, error)
        if error.text is None:
            hint = "raise --max-message-bytes if this is needed"
        else:
            hint = (
                f"its length prefix reads as text, {error.text!r}: a client of line mode"
                " must send { or [ first"
            )
        reply = encode_error(
            ErrorCode.INVALID_REQUEST,
            f"{error}; the connection is closed ({hint})",
            {
                "field": None,
                "detail": "the message is longer than the limit",
                "size": error.size,
                "limit": error.limit,
            },
        )
        self.outbox.force(self._frame(reply))  # small, and the last: past the bound is fine

    async def _write(self, cancel_scope: trio.CancelScope) -> None:
        try:
            while await self.outbox.wait():
                async with self.sending:
                    await self.stream.send_all(self.outbox.take())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("session %d: peer stopped reading", self.session.id)
        cancel_scope.cancel()  # all sent, or the peer is gone: end the connection's tasks


def _coalesced(pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """``pieces`` with each run of short ones joined; a long one (a long reply's result) is
    left as it is, not copied."""
    frames: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) <= _COALESCE_BYTES:
            run.append(piece)
            continue
        if run:
            frames.append(b"".join(run))
            run = []
        frames.append(piece)
    if run:
        frames.append(b"".join(run))
    return frames


async def serve_connection(daemon: Daemon, stream: trio.SocketStream, session_id: int) -> None:
    """Serve one client until it leaves or the daemon stops; never raises."""
    connection = _Connection(daemon, stream, session_id)
    daemon.add_session(connection.session)
    try:
        await connection.run()
    except Exception:
        log.exception("session %d: unexpected error; connection closed", session_id)
    finally:
        daemon.remove_session(connection.session)
        connection.session.close()
        with trio.CancelScope(shield=True):
            await stream.aclose()
