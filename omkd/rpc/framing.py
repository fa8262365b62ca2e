"""Sans-IO framing of omkd's wire: bytes in, whole messages out.

Theory of operation: a connection speaks one of two framings, chosen by the first byte the
client sends. ``{`` or ``[`` selects line mode (one compact JSON message per line, for people
with socat); so does white space (a blank line or a space typed first), as long as the
length it would begin (at least 151 MiB) is over the limit anyway; anything else selects
length mode (a 4-byte unsigned big-endian length, then that many bytes of UTF-8 JSON). The
decoder buffers what it is fed with ``receive_data`` and hands out whole messages from
``next_message``, which answers ``NEED_DATA`` when it has none yet. In line mode, the last
line needs no newline once the client has sent everything (``end_of_stream``).

The size limit is checked before anything is buffered past it: in length mode from the
prefix alone, in line mode as soon as a line grows beyond it. An oversize message is a fatal
``FrameTooLarge``: the stream cannot be resynchronised, so the caller answers and closes.
Nothing here parses JSON; a frame that is not JSON is the dispatcher's business, and the
connection lives on.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

__all__ = [
    "NEED_DATA",
    "FrameDecoder",
    "FrameTooLarge",
    "Framing",
    "NeedData",
    "encode_frame",
    "frame_pieces",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
_PREFIX: Final = struct.Struct(">I")
_LINE_MODE_FIRST_BYTES: Final = frozenset(b"{[")
_WHITE_SPACE: Final = frozenset(b" \t\r\n")
_TEXT_BYTES: Final = frozenset(range(0x20, 0x7F)) | _WHITE_SPACE


class Framing(enum.Enum):
    LENGTH = "length"
    LINE = "line"


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
# On the path of every message: Python 3.11 looks up ``Framing.LINE`` through
# EnumType.__getattr__, several times a plain global's cost.
_LINE: Final = Framing.LINE


class FrameTooLarge(Exception):
    """The peer announced or sent a message over the limit; the connection must close.

    ``text`` is the length prefix when its four bytes are printable text: most likely not a
    length at all, but a line of text sent without line mode's first ``{`` or ``[``."""

    def __init__(self, size: int, limit: int, text: str | None = None) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.text = text


def encode_frame(framing: Framing, message: bytes) -> bytes:
    """Return ``message`` (compact JSON, no newline) framed for the wire."""
    if framing is _LINE:
        return message + b"\n"
    return _PREFIX.pack(len(message)) + message


def frame_pieces(
    framing: Framing, pieces: tuple[bytes | memoryview, ...]
) -> tuple[bytes | memoryview, ...]:
    """``encode_frame`` of the message made of ``pieces``, as pieces: nothing copied."""
    if framing is _LINE:
        return (*pieces, b"\n")
    return (_PREFIX.pack(sum(len(piece) for piece in pieces)), *pieces)


class FrameDecoder:
    """Turns a byte stream into messages; one decoder per connection."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.framing: Framing | None = None
        self._buffer = bytearray()
        self._scanned = 0  # line mode: bytes already searched for a newline

    @property
    def pending(self) -> int:
        """Bytes received but not yet handed out as a message."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the peer."""
        if self.framing is None and data:
            first = data[0]
            line = first in _LINE_MODE_FIRST_BYTES or (
                first in _WHITE_SPACE and first << 24 > self.max_message_bytes
            )
            self.framing = Framing.LINE if line else Framing.LENGTH
        self._buffer += data

    def end_of_stream(self) -> bool:
        """The peer sent its last byte: whether that made a message of what was left (in
        line mode, a last line without its newline)."""
        if self.framing is _LINE and self._buffer.strip():
            self._buffer += b"\n"
            return True
        return False

    def has_message(self) -> bool:
        """Whether a whole message (or an oversize one) is buffered: ``next_message`` will not
        answer ``NEED_DATA``."""
        if self.framing is _LINE:
            return self._buffer.find(b"\n", self._scanned) >= 0 or (
                len(self._buffer) > self.max_message_bytes
            )
        if len(self._buffer) < _PREFIX.size:
            return False
        size: int = _PREFIX.unpack_from(self._buffer)[0]
        return size > self.max_message_bytes or len(self._buffer) >= _PREFIX.size + size

    def next_message(self) -> bytes | NeedData:
        """Return the next whole message, or ``NEED_DATA``.

        Raises ``FrameTooLarge`` when the next message is over the limit.
        """
        if self.framing is _LINE:
            return self._next_line()
        # Length mode inline: this runs twice a request (the message, then NEED_DATA).
        buffer = self._buffer
        if len(buffer) < _PREFIX.size:
            return NEED_DATA
        (size,) = _PREFIX.unpack_from(buffer)
        if size > self.max_message_bytes:
            prefix = bytes(buffer[: _PREFIX.size])
            text = prefix.decode("ascii") if _TEXT_BYTES.issuperset(prefix) else None
            raise FrameTooLarge(size, self.max_message_bytes, text)
        end = _PREFIX.size + size
        if len(buffer) < end:
            return NEED_DATA
        message = bytes(buffer[_PREFIX.size : end])
        del buffer[:end]
        return message

    def _next_line(self) -> bytes | NeedData:
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline < 0:
                self._scanned = len(self._buffer)
                if self._scanned > self.max_message_bytes:
                    raise FrameTooLarge(self._scanned, self.max_message_bytes)
                return NEED_DATA
            line = bytes(self._buffer[:newline]).strip()  # (\r of CRLF, blanks around)
            del self._buffer[: newline + 1]
            self._scanned = 0
            if len(line) > self.max_message_bytes:
                raise FrameTooLarge(len(line), self.max_message_bytes)
            if line:
                return line
