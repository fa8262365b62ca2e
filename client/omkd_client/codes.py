"""JSON-RPC error codes of the omkd contract (section 6), shared by the daemon and clients."""

from __future__ import annotations

import enum

__all__ = ["ErrorCode"]


class ErrorCode(enum.IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    NOT_FOUND = -32001
    CONFLICT = -32002
    VERSION_CONFLICT = -32003
    TRANSACTION_ACTIVE = -32010
    NO_TRANSACTION = -32011
    TRANSACTION_ABORTED = -32012
    BUSY = -32020
    STORAGE_FAILURE = -32030
