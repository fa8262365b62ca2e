"""Errors of the wire, and the one table that maps every error class to its contract code.

Storage errors come from ``omkd.db``; the session's own (transaction state, lock timeout) and
the protocol's (invalid params) are defined here. Anything not in the table is an internal
error, answered without its text so that nothing of the daemon's internals leaks.
"""

from __future__ import annotations

from typing import Any, Final

from omkd import db
from omkd_client.codes import ErrorCode

__all__ = [
    "ERROR_CODES",
    "Busy",
    "InvalidParams",
    "InvalidRequest",
    "NoTransaction",
    "ParseError",
    "RpcError",
    "TransactionAborted",
    "TransactionActive",
    "code_for",
    "error_body",
]


class RpcError(Exception):
    """An error raised by the daemon's own rules, with structured ``data``."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data: dict[str, Any] = data or {}


class ParseError(RpcError):
    """The message is not valid JSON (or not valid UTF-8)."""


class InvalidRequest(RpcError):
    """The message is JSON but not a JSON-RPC 2.0 request."""


class InvalidParams(RpcError):
    """The params do not fit the method: a missing, unknown or mistyped field."""


class TransactionActive(RpcError):
    """tx.begin on a session that already has a transaction."""


class NoTransaction(RpcError):
    """tx.commit or tx.rollback with no transaction open."""


class TransactionAborted(RpcError):
    """The session's transaction was rolled back behind its back; tx.rollback ends it."""


class Busy(RpcError):
    """The write lock was not had within the lock timeout."""


ERROR_CODES: Final[dict[type[Exception], ErrorCode]] = {
    ParseError: ErrorCode.PARSE_ERROR,
    InvalidRequest: ErrorCode.INVALID_REQUEST,
    InvalidParams: ErrorCode.INVALID_PARAMS,
    TransactionActive: ErrorCode.TRANSACTION_ACTIVE,
    NoTransaction: ErrorCode.NO_TRANSACTION,
    TransactionAborted: ErrorCode.TRANSACTION_ABORTED,
    Busy: ErrorCode.BUSY,
    db.NotFound: ErrorCode.NOT_FOUND,
    db.Conflict: ErrorCode.CONFLICT,
    db.VersionConflict: ErrorCode.VERSION_CONFLICT,
    db.InvalidData: ErrorCode.INVALID_PARAMS,
    db.Busy: ErrorCode.BUSY,
    db.StorageFailure: ErrorCode.STORAGE_FAILURE,
}

_INTERNAL_MESSAGE: Final = "internal error in omkd; the daemon's log has the details"


def code_for(exc: BaseException) -> ErrorCode | None:
    """Return the contract code of ``exc``'s class (or nearest base), None if unknown."""
    for cls in type(exc).__mro__:
        code = ERROR_CODES.get(cls)
        if code is not None:
            return code
    return None


def error_body(exc: BaseException) -> tuple[int, str, dict[str, Any] | None]:
    """Return (code, message, data) to answer for ``exc``; unknown errors say nothing inside."""
    code = code_for(exc)
    if code is None:
        return ErrorCode.INTERNAL_ERROR, _INTERNAL_MESSAGE, None
    data = getattr(exc, "data", None)
    return code, str(exc), data if isinstance(data, dict) else None
