"""A connection's outgoing frames, bounded in bytes.

Replies wait for room (a client that stops reading stops being served, and its requests
stay in the kernel's buffers rather than in ours); notifications wait only up to a deadline,
after which the subscriber is cut off. One small final frame may be forced past the bound.
The writer task takes everything queued at once and sends it in one write; a reply finding
the outbox empty and the socket free skips it and is sent at once.
"""

from __future__ import annotations

from collections import deque

import trio

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._frames: deque[bytes | memoryview] = deque()
        self._bytes = 0
        self._closed = False
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def full(self) -> bool:
        """Whether a frame put now would wait (an empty outbox takes any frame, however
        large: a reply is never refused for size)."""
        return self._bytes >= self.limit_bytes and bool(self._frames)

    async def put(self, frame: bytes | memoryview) -> None:
        """Queue ``frame``, waiting while the outbox is full. Raises ClosedResourceError."""
        while self.full() and not self._closed:
            await self._writers.park()
        self.force(frame)

    async def put_before(self, frame: bytes | memoryview, timeout: float) -> bool:
        """Queue ``frame`` if room comes within ``timeout`` seconds; False if it did not."""
        # Room now: no deadline to arm (a cancel scope per reply showed in profiles).
        if self.full() and not await self.room_before(timeout):
            return False
        self.force(frame)
        return True

    async def room_before(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for room; whether it came (or the outbox closed:
        ``force`` then raises)."""
        with trio.move_on_after(timeout):
            while self.full() and not self._closed:
                await self._writers.park()
            return True
        return False

    def force(self, frame: bytes | memoryview) -> None:
        """Queue ``frame`` now, past the bound if need be. Raises ClosedResourceError."""
        if self._closed:
            raise trio.ClosedResourceError("the connection is closing")
        self._frames.append(frame)
        self._bytes += len(frame)
        self._readers.unpark_all()

    def close(self) -> None:
        """No more frames; the writer sends what is queued and stops."""
        self._closed = True
        self._readers.unpark_all()
        self._writers.unpark_all()

    async def wait(self) -> bool:
        """Wait until frames are queued; False once closed and drained."""
        while not self._frames:
            if self._closed:
                return False
            await self._readers.park()
        return True

    def take(self) -> bytes:
        """Everything queued, joined (empty if nothing is)."""
        data = b"".join(self._frames)
        self._frames.clear()
        self._bytes = 0
        self._writers.unpark_all()
        return data
