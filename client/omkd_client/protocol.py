"""The client's sans-IO protocol core, shared by the sync and the trio client.

Theory of operation. ``ClientProtocol`` is one connection's protocol state with no socket:
``send_request(method, params)`` gives a request id and the framed bytes to write;
``receive_data(bytes)`` takes what was read; ``next_event()`` hands out what those bytes
completed, a ``Reply`` (matched to the request it answers, with its error already decoded
into an exception) or an ``Notification``, or ``NEED_DATA``. Notifications have already been
routed to their subscription's buffer (``subscriptions``) when they are handed out: the shell
only needs to wake whoever waits for them.

Replies may arrive in any order relative to other connections, and several requests may be in
flight (pipelining): each reply is matched by id. A request the caller gave up on
(``abandon``: a timeout, a cancellation) is still answered by the daemon; its reply is dropped.

The core also follows the session's transaction from the replies it sees (``tx.begin``
succeeded: in a transaction; any reply to ``tx.commit`` or ``tx.rollback``: not any more), so
the shells know whether a broken connection took a transaction with it.

Framing is the contract's length mode: a 4-byte unsigned big-endian length, then that many
bytes of UTF-8 JSON. The client never sends line mode.
"""

from __future__ import annotations

import collections
import enum
import itertools
import math
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from omkd_client.errors import (
    CallTimeout,
    CommitOutcomeUnknown,
    ConnectionLost,
    DaemonError,
    OmkdError,
    ProtocolError,
    error_from_wire,
)
from omkd_client.records import EventRecord

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "NEED_DATA",
    "SAFE_TO_RETRY",
    "ClientProtocol",
    "FrameDecoder",
    "Lost",
    "NeedData",
    "Notification",
    "Reply",
    "SubscriptionBuffers",
    "SubscriptionEnded",
    "SubscriptionItem",
    "checked_timeouts",
    "encode_frame",
    "error_after_abandoning",
    "error_after_break",
]

# Seconds to wait for the daemon to accept a connection, and for the reply to one call. A call
# waits behind other sessions' transactions for up to the daemon's lock timeout (5 s by
# default) before it answers Busy, so the call timeout is well above that.
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_CALL_TIMEOUT: Final = 30.0


def checked_timeouts(connect_timeout: float, call_timeout: float | None) -> None:
    """Raise ValueError unless both are positive seconds (call_timeout None: no limit)."""
    for name, value in (("connect_timeout", connect_timeout), ("call_timeout", call_timeout)):
        if not (isinstance(value, int | float) and 0 < value < math.inf):
            if name == "call_timeout" and value is None:
                continue
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


# Replies can be large (a page of events); this only guards against a corrupt length prefix.
DEFAULT_MAX_REPLY_BYTES: Final = 256 * 1024 * 1024
_PREFIX: Final = struct.Struct(">I")

# Methods that change nothing: after a broken connection they may be sent again even when the
# first request may have reached the daemon.
SAFE_TO_RETRY: Final = frozenset(
    {
        "goal.get",
        "goal.list",
        "task.get",
        "task.get_by_goal",
        "event.get_by_goal",
        "proof.get",
        "budget.get_by_goal",
        "artifact.get_by_goal",
        "daemon.ping",
        "daemon.status",
        "rpc.discover",
    }
)
_TX_BEGIN: Final = "tx.begin"
_SUBSCRIBE: Final = "event.subscribe"
_TX_END: Final = frozenset({"tx.commit", "tx.rollback"})
_TX_CONTROL: Final = frozenset({"tx.begin", "tx.commit", "tx.rollback"})


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


def encode_frame(message: bytes) -> bytes:
    """Return ``message`` with its 4-byte big-endian length prefix."""
    return _PREFIX.pack(len(message)) + message


class FrameDecoder:
    """Length-prefixed frames out of a byte stream; the size is checked before buffering."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data`` (copied: the caller may reuse its buffer)."""
        self._buffer += data

    def next_message(self) -> bytes | NeedData:
        """Return the next whole message or ``NEED_DATA``; raise ProtocolError if oversize."""
        if len(self._buffer) < _PREFIX.size:
            return NEED_DATA
        (size,) = _PREFIX.unpack_from(self._buffer)
        if size > self.max_message_bytes:
            raise ProtocolError(
                f"the daemon announced a message of {size} bytes, over the client's "
                f"limit of {self.max_message_bytes}"
            )
        end = _PREFIX.size + size
        if len(self._buffer) < end:
            return NEED_DATA
        message = bytes(self._buffer[_PREFIX.size : end])
        del self._buffer[:end]
        return message


class Reply(msgspec.Struct, frozen=True):
    """The answer to request ``id``: ``result`` (raw JSON) or ``error``. (A Struct, not a
    frozen dataclass: one is made per call, and a frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__``.)"""

    id: int
    method: str
    result: msgspec.Raw | None
    error: DaemonError | None


@dataclass(frozen=True, slots=True)
class SubscriptionEnded:
    """The daemon closed a subscription (``event.subscription_closed``)."""

    subscription: int
    reason: str


@dataclass(frozen=True, slots=True)
class Lost:
    """Put in every open subscription's buffer when the connection breaks."""

    reason: str


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification was routed to ``subscription``'s buffer."""

    subscription: int


SubscriptionItem = EventRecord | SubscriptionEnded | Lost


class SubscriptionBuffers:
    """Per-subscription queues of what the daemon sent, until the iterator takes it.

    ``open`` creates a subscription's queue (the protocol does so on the subscribe reply,
    which always comes before its first notification) and returns it: the iterator keeps the
    queue itself, since ids are only unique within one daemon run. Notifications for a
    subscription that is not open are dropped.
    """

    def __init__(self) -> None:
        self._queues: dict[int, deque[SubscriptionItem]] = {}
        self._unclaimed: dict[int, deque[SubscriptionItem]] = {}

    def open(self, subscription: int) -> deque[SubscriptionItem]:
        queue = self._queues.setdefault(subscription, deque())
        self._unclaimed[subscription] = queue
        return queue

    def claim(self, subscription: int) -> deque[SubscriptionItem]:
        """Return the queue opened for ``subscription``'s subscribe reply, for its iterator.

        It may already hold events, or the subscription's end.
        """
        queue = self._unclaimed.pop(subscription, None)
        if queue is None:
            raise ProtocolError(f"no subscribe reply was seen for subscription {subscription}")
        return queue

    def close(self, subscription: int) -> None:
        self._queues.pop(subscription, None)

    def is_open(self, subscription: int) -> bool:
        return subscription in self._queues

    def deliver(self, subscription: int, item: SubscriptionItem) -> bool:
        queue = self._queues.get(subscription)
        if queue is None:
            return False
        queue.append(item)
        if isinstance(item, SubscriptionEnded):
            del self._queues[subscription]
        return True

    def lose_all(self, reason: str) -> None:
        """End every open subscription with ``Lost``; none stays open."""
        for queue in self._queues.values():
            queue.append(Lost(reason))
        self._queues.clear()


class _Request(msgspec.Struct, omit_defaults=True):
    jsonrpc: str
    method: str
    id: int
    params: Any = None


class _Incoming(msgspec.Struct):
    jsonrpc: str = "2.0"
    id: int | str | msgspec.UnsetType | None = msgspec.UNSET
    result: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    error: dict[str, Any] | None = None
    method: str | None = None
    params: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _Appended(msgspec.Struct):
    subscription: int
    event: EventRecord


class _Subscribed(msgspec.Struct):
    subscription: int


def _decode_subscription(result: msgspec.Raw) -> int:
    try:
        return _SUBSCRIBED.decode(result).subscription
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"the reply to event.subscribe does not decode: {exc}") from exc


class _Closed(msgspec.Struct):
    subscription: int
    reason: str


_ENCODER: Final = msgspec.json.Encoder()
_INCOMING: Final = msgspec.json.Decoder(_Incoming)
_APPENDED: Final = msgspec.json.Decoder(_Appended)
_CLOSED: Final = msgspec.json.Decoder(_Closed)
_SUBSCRIBED: Final = msgspec.json.Decoder(_Subscribed)


class ClientProtocol:
    """One connection's requests in flight, transaction state and subscriptions; no I/O."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self._max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        self._decoder = FrameDecoder(max_message_bytes)
        self._pending: dict[int, str] = {}
        self._abandoned: set[int] = set()
        self.in_transaction = False
        self.subscriptions = SubscriptionBuffers()
        # The daemon answered an error it could not give an id (a request over its size
        # limit) and closes the connection: nothing more may be sent on it.
        self.closing = False

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (abandoned ones included)."""
        return len(self._pending)

    def send_request(self, method: str, params: Any = None) -> tuple[int, bytes]:
        """Return the new request's id and its frame. ``params``: a mapping, a Struct, None."""
        request_id = next(self._ids)
        frame = encode_frame(_ENCODER.encode(_Request("2.0", method, request_id, params)))
        self._pending[request_id] = method
        return request_id, frame

    def abandon(self, request_id: int) -> None:
        """The caller stopped waiting for ``request_id``; its reply will be dropped."""
        if request_id in self._pending:
            self._abandoned.add(request_id)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes read from the connection (copied: the caller may reuse its buffer)."""
        self._decoder.receive_data(data)

    def next_event(self) -> Reply | Notification | NeedData:
        """Return the next reply or routed notification, or ``NEED_DATA``.

        Raises ProtocolError when the daemon sent something unusable: the shell should treat
        the connection as broken.
        """
        while True:
            frame = self._decoder.next_message()
            if frame is NEED_DATA:
                return NEED_DATA
            assert isinstance(frame, bytes)
            event = self._handle(frame)
            if event is not None:
                return event

    def connection_lost(self, reason: str) -> list[int]:
        """Forget the connection: return the ids still awaited; subscriptions get ``Lost``.

        The protocol is ready for a new connection afterwards (ids keep counting).
        """
        waiting = [i for i in self._pending if i not in self._abandoned]
        self._pending.clear()
        self._abandoned.clear()
        self._decoder = FrameDecoder(self._max_message_bytes)
        self.in_transaction = False
        self.closing = False
        self.subscriptions.lose_all(reason)
        return waiting

    def _handle(self, frame: bytes) -> Reply | Notification | None:
        try:
            message = _INCOMING.decode(frame)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"the daemon sent a message the client cannot read: {exc}") from exc
        if message.method is not None:
            return self._notification(message.method, message.params)
        request_id = message.id
        if request_id is None and message.error is not None and self._pending:
            # An error the daemon could not give an id: a request over its size limit (it
            # answers, then closes the connection). Replies come in the order of the
            # requests, so it answers the oldest one still awaited.
            request_id = next(iter(self._pending))
            self.closing = True
        if not isinstance(request_id, int):
            detail = message.error or {}
            raise ProtocolError(
                f"the daemon answered with an unattributed error: {detail.get('message')}",
                detail.get("data"),
            )
        method = self._pending.pop(request_id, None)
        if method is None:
            raise ProtocolError(f"the daemon answered request {request_id}, never sent")
        self._track_transaction(method, message.error is None)
        if request_id in self._abandoned:
            self._abandoned.discard(request_id)
            return None
        if message.error is not None:
            return Reply(request_id, method, None, error_from_wire(message.error))
        if isinstance(message.result, msgspec.UnsetType):
            raise ProtocolError(f"the reply to request {request_id} has neither result nor error")
        if method == _SUBSCRIBE:
            # Opened here, not by the caller: its first notifications may be read (by a
            # reader task) before the caller gets to run again.
            self.subscriptions.open(_decode_subscription(message.result))
        return Reply(request_id, method, message.result, None)

    def _track_transaction(self, method: str, succeeded: bool) -> None:
        if method == _TX_BEGIN and succeeded:
            self.in_transaction = True
        elif method in _TX_END:
            self.in_transaction = False  # any answer to these ends the session's transaction

    def _notification(
        self, method: str, params: msgspec.Raw | msgspec.UnsetType
    ) -> Notification | None:
        raw = bytes(params) if not isinstance(params, msgspec.UnsetType) else b"{}"
        item: SubscriptionItem
        try:
            if method == "event.appended":
                appended = _APPENDED.decode(raw)
                subscription, item = appended.subscription, appended.event
            elif method == "event.subscription_closed":
                closed = _CLOSED.decode(raw)
                subscription, item = (
                    closed.subscription,
                    SubscriptionEnded(closed.subscription, closed.reason),
                )
            else:
                return None  # a notification this client does not know: ignored
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"the daemon sent an unreadable {method}: {exc}") from exc
        if not self.subscriptions.deliver(subscription, item):
            return None
        return Notification(subscription)


def error_after_abandoning(
    methods: list[str], *, in_transaction: bool, timeout: float | None
) -> tuple[bool, OmkdError]:
    """What giving up on the replies to ``methods`` (a timeout; for the trio client a
    cancellation too) means: whether the connection must be closed, and the error to raise.

    Inside a transaction, or for a call that opens or ends one, the session's state would
    no longer be known: the connection is closed, so the daemon rolls back whatever
    transaction the session has (a tx.commit's outcome stays unknown). Otherwise it stays
    usable; the late reply is dropped.
    """
    named = _named(methods)
    after = "" if timeout is None else f" within {timeout:g} s"
    data = {"methods": methods, "timeout_s": timeout}
    if "tx.commit" in methods:
        return True, CommitOutcomeUnknown(
            f"no reply to {named}{after}: the transaction may or may not have been "
            "committed; the connection was closed, so if it was not, the daemon rolls it "
            "back (read the state back to know)",
            data,
        )
    if in_transaction or not _TX_CONTROL.isdisjoint(methods):
        return True, CallTimeout(
            f"no reply to {named}{after}; the connection was closed, so the daemon rolls "
            "back the session's transaction, if it has one (nothing of it is committed)",
            data,
        )
    return False, CallTimeout(f"no reply to {named}{after}", data)


def _named(methods: list[str]) -> str:
    """``methods`` for a message: all of a few, or how many of which."""
    if len(methods) <= 4:
        return ", ".join(methods)
    counts = collections.Counter(methods).most_common(3)
    which = ", ".join(f"{m} x{n}" for m, n in counts)
    return f"{len(methods)} calls ({which}{', ...' if len(counts) < len(set(methods)) else ''})"


def error_after_break(
    methods: list[str], *, in_transaction: bool, delivered: bool, retried: bool
) -> ConnectionLost | None:
    """Decide what a broken connection means for the calls that were on it.

    Return None when they may be sent again on a new connection: outside a transaction, on
    the first attempt, and either not delivered (the connection was found broken before they
    left) or all read-only. Otherwise return the exception to raise: a transaction is never
    retried, and a write that may have been applied is not sent twice.
    """
    if in_transaction and delivered and "tx.commit" in methods:
        return CommitOutcomeUnknown(
            "the connection was lost during tx.commit: the transaction may or may not have "
            "been committed; read the state back to know",
            {"methods": methods},
        )
    if in_transaction:
        return ConnectionLost(
            "the connection was lost inside a transaction; the daemon rolls back the "
            "transaction of a broken connection, so nothing of it was committed",
            {"methods": methods},
        )
    if retried:
        return ConnectionLost(
            "the connection was lost again after reconnecting", {"methods": methods}
        )
    if delivered and not all(m in SAFE_TO_RETRY for m in methods):
        return ConnectionLost(
            f"the connection was lost after {', '.join(methods)} was sent: it may or may not "
            f"have been applied",
            {"methods": methods},
        )
    return None
