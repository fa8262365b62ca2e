"""The client's exceptions: what the daemon refused, and what went wrong on the way.

Named by whose fault they are. ``DaemonError`` and its subclasses are answers: the daemon
received the call and refused it with a contract code (section 6), carrying the server's
``message`` and ``data``. ``TransportError`` and its subclasses are about the way there: no
daemon on the socket, a connection that broke, a reply that never came.

``ERRORS`` is the one table from wire code to class; ``error_from_wire`` decodes a JSON-RPC
error object with it. A code the table does not know still decodes, as a plain
``DaemonError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from omkd_client.codes import ErrorCode

__all__ = [
    "ERRORS",
    "Busy",
    "CallTimeout",
    "CommitOutcomeUnknown",
    "Conflict",
    "ConnectionLost",
    "DaemonError",
    "DaemonNotRunning",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "NoTransaction",
    "NotFound",
    "OmkdError",
    "ParseError",
    "ProtocolError",
    "StorageFailure",
    "SubscriptionClosed",
    "TransactionAborted",
    "TransactionActive",
    "TransportError",
    "VersionConflict",
    "error_from_wire",
]


class OmkdError(Exception):
    """Base of every client error. ``code`` is the wire code, or None for a client-side one."""

    code: int | None = None

    def __init__(self, message: str, data: Any = None, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


# -- answers from the daemon


class DaemonError(OmkdError):
    """The daemon answered the call with an error; nothing of the call was applied."""

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"


class ParseError(DaemonError):
    code = ErrorCode.PARSE_ERROR


class InvalidRequest(DaemonError):
    code = ErrorCode.INVALID_REQUEST


class MethodNotFound(DaemonError):
    code = ErrorCode.METHOD_NOT_FOUND


class InvalidParams(DaemonError):
    code = ErrorCode.INVALID_PARAMS


class InternalError(DaemonError):
    code = ErrorCode.INTERNAL_ERROR


class NotFound(DaemonError):
    code = ErrorCode.NOT_FOUND


class Conflict(DaemonError):
    code = ErrorCode.CONFLICT


class VersionConflict(DaemonError):
    code = ErrorCode.VERSION_CONFLICT


class TransactionActive(DaemonError):
    code = ErrorCode.TRANSACTION_ACTIVE


class NoTransaction(DaemonError):
    code = ErrorCode.NO_TRANSACTION


class TransactionAborted(DaemonError):
    code = ErrorCode.TRANSACTION_ABORTED


class Busy(DaemonError):
    code = ErrorCode.BUSY


class StorageFailure(DaemonError):
    code = ErrorCode.STORAGE_FAILURE


ERRORS: Final[Mapping[int, type[DaemonError]]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        NotFound,
        Conflict,
        VersionConflict,
        TransactionActive,
        NoTransaction,
        TransactionAborted,
        Busy,
        StorageFailure,
    )
}


def error_from_wire(error: Mapping[str, Any]) -> DaemonError:
    """Return the exception for a JSON-RPC error object ``{code, message, data?}``."""
    code = error.get("code")
    message = str(error.get("message", "error without a message"))
    data = error.get("data")
    if not isinstance(code, int):
        return DaemonError(message, data, code=ErrorCode.INTERNAL_ERROR)
    cls = ERRORS.get(code, DaemonError)
    return cls(message, data, code=code)


# -- trouble on the way


class TransportError(OmkdError):
    """The call could not be made or its answer not received."""


class DaemonNotRunning(TransportError):
    """Nothing answers on the socket path; the message says which path and how to start it."""

    def __init__(self, socket_path: str | Path, reason: str) -> None:
        super().__init__(
            f"omkd is not running on {socket_path} ({reason}); start it with "
            f"`omkd serve` or `systemctl --user start omkd.socket`, or point to it with "
            f"--socket or $OMKD_SOCKET",
            {"socket_path": str(socket_path), "reason": reason},
        )
        self.socket_path = Path(socket_path)


class ConnectionLost(TransportError):
    """The connection broke and the call could not be retried (inside a transaction, or a
    write whose request had already been sent: it may or may not have been applied)."""


class CommitOutcomeUnknown(ConnectionLost):
    """The connection broke during ``tx.commit``: the transaction may or may not be committed.

    Distinct from a failed commit (a ``DaemonError``, after which nothing was committed):
    read the state back to learn which it was.
    """


class CallTimeout(TransportError):
    """No reply came within the call timeout. Outside a transaction the connection stays
    usable (a late reply is dropped); the call may still have been applied."""


class ProtocolError(TransportError):
    """The daemon sent something that is not a JSON-RPC message the client can use."""


class SubscriptionClosed(OmkdError):
    """The daemon ended a subscription (``event.subscription_closed``), e.g. because the
    client did not read; resubscribe with ``after_event_id=last_event_id`` to resume."""

    def __init__(self, subscription: int, reason: str, last_event_id: int | None) -> None:
        super().__init__(
            f"subscription {subscription} closed by the daemon: {reason}",
            {"subscription": subscription, "reason": reason, "last_event_id": last_event_id},
        )
        self.subscription = subscription
        self.reason = reason
        self.last_event_id = last_event_id
