"""omkd's bundled client: records, error codes, and sync and trio clients.

``omkd_client.Client`` (or ``omkd_client.connect``) is the sync client;
``omkd_client.trio_client.TrioClient`` the trio one, with the same surface. Importing this
package does not import trio.
"""

from omkd_client.codes import ErrorCode
from omkd_client.errors import (
    Busy,
    CallTimeout,
    CommitOutcomeUnknown,
    Conflict,
    ConnectionLost,
    DaemonError,
    DaemonNotRunning,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NotFound,
    NoTransaction,
    OmkdError,
    ParseError,
    ProtocolError,
    StorageFailure,
    SubscriptionClosed,
    TransactionAborted,
    TransactionActive,
    TransportError,
    VersionConflict,
)
from omkd_client.ops import BackupResult, DaemonStatus
from omkd_client.protocol import DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT
from omkd_client.records import (
    ArtifactRecord,
    BudgetCheckpoint,
    EventInput,
    EventRecord,
    GoalFilter,
    GoalRecord,
    GoalSummary,
    ProofRecord,
    TaskRecord,
)
from omkd_client.sync_client import (
    Client,
    Pending,
    Pipeline,
    Subscription,
    Transaction,
    connect,
)

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "ArtifactRecord",
    "BackupResult",
    "BudgetCheckpoint",
    "Busy",
    "CallTimeout",
    "Client",
    "CommitOutcomeUnknown",
    "Conflict",
    "ConnectionLost",
    "DaemonError",
    "DaemonNotRunning",
    "DaemonStatus",
    "ErrorCode",
    "EventInput",
    "EventRecord",
    "GoalFilter",
    "GoalRecord",
    "GoalSummary",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "NoTransaction",
    "NotFound",
    "OmkdError",
    "ParseError",
    "Pending",
    "Pipeline",
    "ProofRecord",
    "ProtocolError",
    "StorageFailure",
    "Subscription",
    "SubscriptionClosed",
    "TaskRecord",
    "Transaction",
    "TransactionAborted",
    "TransactionActive",
    "TransportError",
    "VersionConflict",
    "connect",
]
