"""The trio adapter: one client connection, its three tasks and its session.

Theory of operation. A reader task feeds bytes to the sans-IO ``FrameDecoder`` and passes
whole messages to the worker through a small channel (when the worker falls behind, the
reader stops reading and the client's writes wait in the kernel). The worker answers each
message in arrival order through the ``Dispatcher`` and queues the reply in the ``Outbox``; a
writer task sends what is queued. While the session holds a transaction, the worker waits
for the next message only until the idle timeout, then rolls the transaction back.

Resource handling: however the connection ends (end of file, a broken socket, an oversize
frame, daemon shutdown), ``serve_connection`` rolls back the session's transaction, cancels
its subscriptions and closes the stream. Error handling: a broken or misbehaving client ends
its own connection only; nothing raised here reaches the daemon's nursery.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

from omkd.rpc.dispatch import encode_error
from omkd.rpc.framing import NEED_DATA, FrameDecoder, FrameTooLarge, Framing, encode_frame
from omkd.rpc.outbox import Outbox
from omkd.rpc.session import Session
from omkd_client.codes import ErrorCode

if TYPE_CHECKING:
    from omkd.server import Daemon

__all__ = ["serve_connection"]

log = logging.getLogger("omkd.connection")

_RECEIVE_BYTES: Final = 64 * 1024


class _Oversize:
    """Placed in the worker's queue where an oversize frame stood: answer, then close."""

    def __init__(self, error: FrameTooLarge) -> None:
        self.error = error


class _Connection:
    def __init__(self, daemon: Daemon, stream: trio.SocketStream, session_id: int) -> None:
        config = daemon.config
        self.daemon = daemon
        self.stream = stream
        self.decoder = FrameDecoder(config.max_message_bytes)
        self.outbox = Outbox(config.outbox_bytes)
        self.session = Session(daemon, session_id, self.outbox, self._frame)
        self.inbox_send, self.inbox = trio.open_memory_channel[bytes | _Oversize](
            config.inbox_messages
        )
        # Bytes of decoded messages waiting for the worker: bounded as well as their count,
        # so a client sending large messages and reading nothing holds little memory.
        self.inbox_bytes = 0
        self._inbox_room = trio.lowlevel.ParkingLot()

    def _frame(self, message: bytes) -> bytes:
        return encode_frame(self.decoder.framing or Framing.LENGTH, message)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.session.nursery = nursery
            nursery.start_soon(self._read)
            nursery.start_soon(self._write, nursery.cancel_scope)
            try:
                finished = await self._work()
            finally:
                self.outbox.close()
            # The writer sends what is queued and ends the connection; a client that will not
            # read it gets the stall timeout, and one that stalled already gets nothing more.
            stall = self.daemon.config.reply_stall_timeout if finished else 0
            nursery.cancel_scope.deadline = trio.current_time() + stall

    async def _read(self) -> None:
        async with self.inbox_send:
            while True:
                try:
                    data = await self.stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    if self.decoder.pending:
                        log.debug("session %d: closed mid-message", self.session.id)
                    return
                self.decoder.receive_data(data)
                while True:
                    try:
                        message = self.decoder.next_message()
                    except FrameTooLarge as exc:
                        await self.inbox_send.send(_Oversize(exc))
                        return
                    if message is NEED_DATA:
                        break
                    await self._reserve_inbox(len(message))
                    await self.inbox_send.send(message)

    async def _reserve_inbox(self, size: int) -> None:
        limit = self.daemon.config.inbox_bytes
        while self.inbox_bytes and self.inbox_bytes + size > limit:  # one always fits
            await self._inbox_room.park()
        self.inbox_bytes += size

    def _release_inbox(self, size: int) -> None:
        self.inbox_bytes -= size
        self._inbox_room.unpark_all()

    async def _work(self) -> bool:
        """Answer messages until the client is done (True) or stopped reading (False)."""
        session = self.session
        idle_timeout = self.daemon.config.tx_idle_timeout
        while True:
            message: bytes | _Oversize | None = None
            try:
                if session.in_transaction:
                    with trio.move_on_after(idle_timeout):
                        message = await self.inbox.receive()
                else:  # no deadline: no cancel scope to arm for every message
                    message = await self.inbox.receive()
            except trio.EndOfChannel:
                return True
            if message is None:
                session.idle_abort()
            elif isinstance(message, _Oversize):
                self._refuse_oversize(message.error)
                return True
            else:
                self._release_inbox(len(message))
                reply = await self.daemon.dispatcher.handle(message, session)
                if reply is not None and not await self.outbox.put_before(
                    self._frame(reply), self._stall_timeout()
                ):
                    log.warning(
                        "session %d: client left its replies unread for %g s; disconnected",
                        session.id,
                        self._stall_timeout(),
                    )
                    return False
                session.start_pending()

    def _stall_timeout(self) -> float:
        # A client holding the write lock gets no longer than an idle transaction would.
        config = self.daemon.config
        if self.session.in_transaction:
            return min(config.reply_stall_timeout, config.tx_idle_timeout)
        return config.reply_stall_timeout

    def _refuse_oversize(self, error: FrameTooLarge) -> None:
        log.warning("session %d: %s; closing", self.session.id, error)
        reply = encode_error(
            ErrorCode.INVALID_REQUEST,
            f"{error}; the connection is closed (raise --max-message-bytes if this is needed)",
            {"size": error.size, "limit": error.limit},
        )
        self.outbox.force(self._frame(reply))  # small, and the last: past the bound is fine

    async def _write(self, cancel_scope: trio.CancelScope) -> None:
        try:
            while (data := await self.outbox.take()) is not None:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("session %d: peer stopped reading", self.session.id)
        cancel_scope.cancel()  # all sent, or the peer is gone: end the connection's tasks


async def serve_connection(daemon: Daemon, stream: trio.SocketStream, session_id: int) -> None:
    """Serve one client until it leaves or the daemon stops; never raises."""
    connection = _Connection(daemon, stream, session_id)
    daemon.sessions.add(connection.session)
    try:
        await connection.run()
    except Exception:
        log.exception("session %d: unexpected error; connection closed", session_id)
    finally:
        daemon.sessions.discard(connection.session)
        connection.session.close()
        with trio.CancelScope(shield=True):
            await stream.aclose()
