"""JSON-RPC 2.0 dispatch: one message in, one reply (or nothing) out.

``Dispatcher.handle(message, session)`` is the whole protocol above framing: it decodes the
envelope with msgspec, looks the method up, has jsonrpcserver run it (its ``call`` turns
anything raised into an error result, and its response types shape the reply), decodes
params into the method's msgspec type, runs the method through the session, and encodes the
reply. The same code serves the socket, the
tests and the benchmarks. It imports nothing of trio: the session decides where work runs.

Batches run their elements in order, one after another; replies come back in request order
and notifications get none. A write that joined another session's group commit answers only
once that COMMIT is done: ``handle`` returns it as a ``DeferredReply`` for the connection to
send when the COMMIT is done, and every message waits for the session's last write to be
committed before it runs (a session sees its own writes; replies keep their order).

A request that will not wait is answered by ``answer_now`` instead: synchronously, without
the chain of coroutines of ``handle`` and jsonrpcserver's ``call`` (~10k instructions of the
~46k a ping costs the daemon). That is a read, a write inside the session's transaction, one
that joins the open group commit (most writes, when several sessions write) or goes alone
(nobody else writing), and a session method that never waits (``Method.now``). It takes only
what it answers exactly as ``handle`` would (a well-formed request with an id, from a
session with no COMMIT still to come); anything else, errors of the envelope or the params
included, it leaves untouched, as NOT_NOW.

A call that may be long (``Method.rows`` past ``long_call_rows``: a page of 100,000 events,
goal.delete; or params past ``long_call_bytes``) is never answered now: ``handle`` has the
session run it in a worker thread (``run_long``), and the other connections are served
meanwhile. So is a read of such a method whose rows are few but long (1,000 events of 15
KB): on the event loop it is stopped once it has run ``long_call_seconds``
(``Database.time_limit``) and run again in the thread.

An exception the error table does not know is logged with its traceback and answered as an
internal error that says nothing of the daemon's insides.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, cast

import msgspec

from omkd import db
from omkd.config import (
    BATCH_REPLY_BYTES,
    BATCH_SLICE_S,
    LONG_CALL_BYTES,
    LONG_CALL_ROWS,
    LONG_CALL_S,
)
from omkd.failures import FailureLog
from omkd.rpc._jsonrpcserver import (
    NODATA,
    NOID,
    Error,
    Left,
    MethodNotFoundResult,
    Request,
    Success,
    call,
)
from omkd.rpc.errors import (
    InvalidParams,
    InvalidRequest,
    ParseError,
    TransactionAborted,
    error_body,
)
from omkd.rpc.methods import METHODS, Access, Method, SessionFn, SessionLike
from omkd_client.codes import ErrorCode

__all__ = [
    "NOT_NOW",
    "DeferredReply",
    "DispatchSession",
    "Dispatcher",
    "PendingCommit",
    "ReplyPieces",
    "encode_error",
]

log = logging.getLogger("omkd.rpc")

_NULL: Final = msgspec.Raw(b"null")
_ID_FIRST_BYTES: Final = frozenset(b'"-0123456789n')
_QUOTE: Final = ord('"')
_FIELD_AT: Final = re.compile(r"at `\$\.([A-Za-z0-9_.\[\]]+)`")
_FIELD_NAMED: Final = re.compile(r"field `([^`]+)`")
_AT_BYTE: Final = re.compile(r"\(byte (\d+)\)")


class ReplyPieces:
    """A long reply as the pieces of its JSON, to be written one after another: its result
    is not copied into one buffer on the event loop (two copies of a 47 MB page held every
    other client ~80 ms)."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: tuple[bytes | memoryview, ...]) -> None:
        self.pieces = pieces

    def join(self) -> bytes:
        return b"".join(self.pieces)


class PendingCommit(Protocol):
    """A COMMIT still to come (the write gate's ``Commit``)."""

    @property
    def error(self) -> Exception | None: ...

    def when_done(self, callback: Callable[[], None]) -> None: ...


class DispatchSession(SessionLike, Protocol):
    """What the dispatcher needs of a session, beyond the session methods."""

    long_read_next: bool

    @property
    def aborted(self) -> bool: ...

    @property
    def in_transaction(self) -> bool: ...

    def run_read(self, method: Method, params: Any, time_limit: float | None = None) -> Any: ...

    async def run_write(self, method: Method, params: Any) -> Any: ...

    async def run_long(
        self, method: Method, params: Any, decode: Callable[[], Any] | None = None
    ) -> Any: ...

    def pending_commit(self) -> PendingCommit | None: ...

    async def settle(self) -> None: ...

    def settled(self) -> bool: ...

    def write_now(self, method: Method, params: Any) -> tuple[Any, PendingCommit | None] | None: ...

    def peer_gone(self) -> bool:
        """Whether the client has closed its end of the connection (it takes no reply)."""
        ...


class DeferredReply:
    """The reply to a write whose COMMIT is still to come: send ``resolve()`` once it is
    done (``commit.when_done``); it answers the batch's error if the COMMIT failed."""

    __slots__ = ("_id", "_reply", "_storage", "commit")

    def __init__(
        self, commit: PendingCommit, reply: bytes, id: msgspec.Raw, storage: FailureLog
    ) -> None:
        self.commit = commit
        self._reply = reply
        self._id = id
        self._storage = storage

    def resolve(self) -> bytes:
        error = self.commit.error
        if error is None:
            self._storage.succeeded()
            return self._reply
        code, text, data = error_body(error)
        if code == ErrorCode.STORAGE_FAILURE:
            self._storage.failed(text)
        return encode_error(code, text, data, self._id)


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    jsonrpc: str
    method: str
    params: msgspec.Raw = msgspec.Raw()
    id: msgspec.Raw = msgspec.Raw()


class _ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _Success(msgspec.Struct):
    jsonrpc: str
    result: msgspec.Raw
    id: msgspec.Raw


class _Failure(msgspec.Struct):
    jsonrpc: str
    error: _ErrorObject
    id: msgspec.Raw


class _Call:
    """jsonrpcserver's context for one call: the session and the undecoded params."""

    __slots__ = ("params", "session")

    def __init__(self, session: DispatchSession, params: msgspec.Raw) -> None:
        self.session = session
        self.params = params


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_BATCH: Final = msgspec.json.Decoder(list[msgspec.Raw])
_ENCODER: Final = msgspec.json.Encoder()
_EMPTY_OBJECT: Final = b"{}"
# answer_now leaves params longer than this of a call that may be long (Method.rows) to the
# async path, which decodes them once and then runs the call there or in a thread: decoding
# a batch of 1,000 events takes ~0.8 ms, and the async path costs a few µs more.
_BULK_PARAMS_BYTES: Final = 16 * 1024
# A result longer than this is answered in pieces (ReplyPieces): copying it costs ~2-3 ms a
# MB of the event loop's time, twice (the envelope, then the frame).
_PIECES_BYTES: Final = 1024 * 1024
# What decoding a message raises when it is not JSON (bad JSON, bad UTF-8, nested too
# deep), or, a ValidationError being a DecodeError too, JSON of the wrong shape; where the
# latter is answered apart, its except clause comes first.
_UNDECODABLE: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
# Session methods that change nothing: skipped in a batch whose client has gone.
_NO_EFFECT: Final = frozenset({"daemon.ping", "daemon.status", "rpc.discover"})
_SUCCESS_HEAD: Final = b'{"jsonrpc":"2.0","result":'


class _NotNow(enum.Enum):
    NOT_NOW = "not now"  # answer_now: take the async path


NOT_NOW: Final = _NotNow.NOT_NOW
# Looked up for every request: as globals, not through Python 3.11's EnumType.__getattr__.
_READ: Final = Access.READ
_WRITE: Final = Access.WRITE
_SESSION: Final = Access.SESSION


def encode_error(code: int, message: str, data: Any = None, id: msgspec.Raw = _NULL) -> bytes:
    """Return an error reply, by default with id null."""
    return _ENCODER.encode(_Failure("2.0", _ErrorObject(code, message, data), id))


class Dispatcher:
    """Routes messages to the method table; one per daemon, shared by all sessions."""

    def __init__(
        self,
        methods: dict[str, Method] | None = None,
        *,
        batch_slice: float = BATCH_SLICE_S,
        batch_reply_bytes: int = BATCH_REPLY_BYTES,
        turn: Callable[[], Awaitable[None]] | None = None,
        long_call_rows: int = LONG_CALL_ROWS,
        long_call_bytes: int = LONG_CALL_BYTES,
        long_call_seconds: float = LONG_CALL_S,
    ) -> None:
        """``turn`` gives the event loop's other tasks a turn (the daemon's: trio's
        checkpoint): a batch takes one every ``batch_slice`` seconds (None: never), and
        looks there whether its client has gone (then its reads are not run, nor its
        replies kept); once its replies pass ``batch_reply_bytes``, the rest of its calls
        are not run (each answers -32600). A
        repository call that may touch more than ``long_call_rows`` rows (``Method.rows``),
        or whose params are longer than ``long_call_bytes``, goes to the session's
        ``run_long``; so does a read of such a method that runs longer than
        ``long_call_seconds`` here (stopped, then run again there)."""
        self.methods = dict(METHODS if methods is None else methods)
        self.batch_slice = batch_slice
        self.batch_reply_bytes = batch_reply_bytes
        self.long_call_rows = long_call_rows
        self.long_call_bytes = long_call_bytes
        self.long_call_seconds = long_call_seconds
        # Calls that failed for the storage (a full disk, an I/O error): logged once, then
        # now and then; writes (a full disk) apart from reads (a failing disk, a damaged file).
        self.storage = FailureLog(log, "writes to the database")
        self.read_storage = FailureLog(log, "reads from the database")
        self._bulk_params_bytes = min(_BULK_PARAMS_BYTES, long_call_bytes)
        self._turn = turn
        self._decoders = {m.name: msgspec.json.Decoder(m.params) for m in self.methods.values()}
        self._routes = {name: self._route(m) for name, m in self.methods.items()}

    async def handle(
        self, message: bytes, session: DispatchSession
    ) -> bytes | DeferredReply | ReplyPieces | None:
        """Answer one message (a request, a notification or a batch); None: no reply."""
        await session.settle()
        if message.lstrip()[:1] != b"[":
            return await self._one(message, session)
        try:
            items = _BATCH.decode(message)
        except msgspec.ValidationError as exc:
            return encode_error(
                ErrorCode.INVALID_REQUEST, "a batch must be an array", _invalid_details(exc)
            )
        except _UNDECODABLE as exc:
            return _parse_error(exc)
        if not items:
            return encode_error(
                ErrorCode.INVALID_REQUEST,
                "an empty batch is not a request",
                {"field": None, "detail": "the batch is empty"},
            )
        # The replies as pieces: a batch of pages is never copied into one string here.
        pieces: list[bytes | memoryview] = []
        size = 0
        gone = False  # the client has closed its end: nobody takes the replies
        turn = self._turn
        slice_ends = time.perf_counter() + self.batch_slice
        for item in items:
            if gone and self._only_reads(item):
                continue  # (a write or a notification still runs: it was sent to be run)
            if size > self.batch_reply_bytes:
                reply: bytes | DeferredReply | ReplyPieces | None = self._not_run(item)
            else:
                reply = await self._one(item, session)
                await session.settle()  # before the next element, and before answering
            if isinstance(reply, DeferredReply):
                reply = reply.resolve()
            if reply is not None and not gone:
                parts = reply.pieces if isinstance(reply, ReplyPieces) else (reply,)
                pieces.append(b"," if pieces else b"[")
                pieces.extend(parts)
                size += sum(len(part) for part in parts)
            if turn is not None and time.perf_counter() > slice_ends:
                if not gone and session.peer_gone():
                    gone, pieces = True, []
                await turn()  # the other connections get served
                slice_ends = time.perf_counter() + self.batch_slice
        if not pieces:
            return None
        pieces.append(b"]")
        if size > _PIECES_BYTES:
            return ReplyPieces(tuple(pieces))
        return b"".join(pieces)

    def _only_reads(self, item: msgspec.Raw) -> bool:
        """Whether a call of a batch only reads (nothing but its reply would come of it)."""
        try:
            envelope = _ENVELOPE.decode(item)
        except _UNDECODABLE:
            return True  # answered with an error, which nobody would take
        method = self.methods.get(envelope.method)
        return method is None or method.access is _READ or method.name in _NO_EFFECT

    def _not_run(self, item: msgspec.Raw) -> bytes | None:
        """The answer to a call of a batch that was not run, its replies past the bound (a
        notification: none)."""
        try:
            id = _ENVELOPE.decode(item).id
        except _UNDECODABLE:
            id = _NULL
        else:
            if not id:
                return None
        limit = self.batch_reply_bytes
        return encode_error(
            ErrorCode.INVALID_REQUEST,
            f"not run: the replies of this batch passed batch_reply_bytes ({limit} bytes) "
            f"before it; send it again in a batch of its own",
            {"field": None, "detail": "the batch's replies are too long", "limit": limit},
            id,
        )

    def answer_now(
        self, message: bytes, session: DispatchSession
    ) -> bytes | DeferredReply | _NotNow:
        """Answer a request that will not wait without the async path; NOT_NOW (having done
        nothing) for anything else. The answer is the one ``handle`` gives: a reply, a
        DeferredReply (a write that joined another session's batch), or the call's error."""
        if message[:1] != b"{" or not session.settled():
            return NOT_NOW  # a batch, or a COMMIT of this session's still to come
        try:
            envelope = _ENVELOPE.decode(message)
        except _UNDECODABLE:
            return NOT_NOW  # the async path answers the error
        method = self.methods.get(envelope.method)
        if (
            method is None
            or not envelope.id  # a notification
            or _envelope_problem(envelope) is not None
            or (session.aborted and not method.when_aborted)
        ):
            return NOT_NOW
        access = method.access
        if access is _SESSION and method.now is None:
            return NOT_NOW
        size = len(envelope.params)
        if method.rows is None:
            if size > self.long_call_bytes and access is not _SESSION:
                return NOT_NOW
        elif size > self._bulk_params_bytes:
            return NOT_NOW  # decoded once, there, and maybe long
        try:
            params = _decode_params(method.name, self._decoders[method.name], envelope.params)
        except (InvalidParams, ParseError):  # answered by the async path
            return NOT_NOW
        if method.rows is not None and self._long(method, params):
            return NOT_NOW
        pending = None
        try:
            if access is _READ:
                result = session.run_read(method, params, self._time_limit(method))
            elif access is _WRITE:
                done = session.write_now(method, params)
                if done is None:
                    return NOT_NOW  # it would wait: for the write lock, or to lead a batch
                result, pending = done
            else:
                assert method.now is not None
                result = method.now(session, params)
        except db.TimeLimitExceeded:
            session.long_read_next = True  # handle() runs it in a worker thread
            return NOT_NOW
        except Exception as exc:
            return encode_error(*self._failure(method, exc), envelope.id)
        reply = _success(result, envelope.id)
        if pending is not None:
            return DeferredReply(pending, reply, envelope.id, self.storage)
        if self.storage.failing and _committed(method, session):
            self.storage.succeeded()
        return reply

    async def _one(
        self, message: bytes | msgspec.Raw, session: DispatchSession
    ) -> bytes | DeferredReply | ReplyPieces | None:
        try:
            envelope = _ENVELOPE.decode(message)
        except msgspec.ValidationError as exc:
            return encode_error(
                ErrorCode.INVALID_REQUEST, f"invalid request: {exc}", _invalid_details(exc)
            )
        except _UNDECODABLE as exc:
            return _parse_error(exc)
        problem = _envelope_problem(envelope)
        if isinstance(problem, InvalidRequest):
            # An id that could be read goes back with the error: the client can tell which
            # of its calls it answers.
            id = envelope.id if envelope.id and problem.data["field"] != "id" else _NULL
            return encode_error(ErrorCode.INVALID_REQUEST, str(problem), problem.data, id)
        if problem is not None:
            return _parse_error(problem)
        request = Request(envelope.method, [], envelope.id if envelope.id else NOID)
        route = self._routes.get(envelope.method)
        if route is None and session.aborted:  # every call but the few that end it: -32012
            aborted = _aborted(envelope.method)
            result = Error(ErrorCode.TRANSACTION_ABORTED, str(aborted), aborted.data)
        elif route is None:
            result = Left(MethodNotFoundResult(envelope.method))
        else:
            result = await call(request, _Call(session, envelope.params), route)
        if request.id is NOID:
            return None
        # What jsonrpcserver's to_response would make of the result, without its copies.
        if isinstance(result, Left):  # MethodNotFound from jsonrpcserver, or one of ours
            failure = result._error
            data = None if failure.data is NODATA else failure.data
            if failure.code == ErrorCode.METHOD_NOT_FOUND:
                message_text = f"method not found: {envelope.method}"
                data = {"method": envelope.method}
            else:
                message_text = failure.message
            return encode_error(failure.code, message_text, data, envelope.id)
        raw = result._value.result
        pending = session.pending_commit()
        if pending is None and len(raw) > _PIECES_BYTES:
            return ReplyPieces(_success_pieces(raw, envelope.id))
        reply = _success_raw(raw, envelope.id)
        if pending is None:
            return reply
        return DeferredReply(pending, reply, envelope.id, self.storage)

    def _route(self, method: Method) -> Any:
        decoder = self._decoders[method.name]

        async def route(call: _Call) -> Any:
            try:
                result = await self._invoke(method, decoder, call)
            except Exception as exc:
                return Error(*self._failure(method, exc))
            if self.storage.failing and _committed(method, call.session):
                self.storage.succeeded()
            if isinstance(result, msgspec.Raw):  # a page built by SQLite: no copy of it here
                return Success(result)
            return Success(msgspec.Raw(_ENCODER.encode(result)))

        return route

    async def _invoke(self, method: Method, decoder: msgspec.json.Decoder[Any], call: _Call) -> Any:
        session = call.session
        # Before the params: an aborted session answers -32012 whatever they are.
        if session.aborted and not method.when_aborted:
            raise _aborted(method.name)
        size = len(call.params)
        if method.access is not _SESSION and size > self.long_call_bytes:
            # Long params: decoded in the worker thread too, not on the event loop.
            decode = functools.partial(_decode_params, method.name, decoder, call.params)
            return await session.run_long(method, None, decode)
        params = _decode_params(method.name, decoder, call.params)
        if method.rows is not None:
            if session.long_read_next:  # answer_now stopped it past its time limit
                session.long_read_next = False
                return await session.run_long(method, params)
            if self._long(method, params):
                return await session.run_long(method, params)
        if method.access is _READ:
            try:
                return session.run_read(method, params, self._time_limit(method))
            except db.TimeLimitExceeded:
                return await session.run_long(method, params)
        if method.access is _WRITE:
            return await session.run_write(method, params)
        return await cast(SessionFn, method.run)(session, params)

    def _failure(self, method: Method, exc: Exception) -> tuple[int, str, dict[str, Any] | None]:
        """The error to answer for a call that raised ``exc``; an internal one is logged, and
        a storage failure (``self.storage``)."""
        code, text, data = error_body(exc)
        if code == ErrorCode.INTERNAL_ERROR:
            log.exception("internal error in %s", method.name)
        elif code == ErrorCode.STORAGE_FAILURE and _writes(method):
            self.storage.failed(f"{method.name}: {text}")
        elif code == ErrorCode.STORAGE_FAILURE and method.access is _READ:
            self.read_storage.failed(f"{method.name}: {text}")  # (not a backup's destination)
        elif code == ErrorCode.INVALID_PARAMS and data is not None and "method" not in data:
            data = {"method": method.name, **data}  # as the params' own -32602 has it
        return code, text, data

    def _time_limit(self, method: Method) -> float | None:
        """How long a read of ``method`` may run here: a page or a list (its rows vary, so
        do its bytes) ``long_call_seconds``; a row, as long as it takes."""
        return None if method.rows is None else self.long_call_seconds

    def _long(self, method: Method, params: Any) -> bool:
        """Whether a call of a method with ``rows`` may touch more than ``long_call_rows``
        (its params' length the callers check first)."""
        assert method.rows is not None
        rows = method.rows(params)
        return rows is None or rows > self.long_call_rows


def _aborted(method: str) -> TransactionAborted:
    return TransactionAborted(
        "this session's transaction was rolled back (idle timeout or storage failure); send "
        "tx.rollback to end it",
        {"method": method},
    )


def _envelope_problem(envelope: _Envelope) -> InvalidRequest | UnicodeDecodeError | None:
    """What makes a decoded envelope not a request (the -32600 to answer, or the -32700 of
    an id that is not UTF-8), if anything."""
    if envelope.jsonrpc != "2.0":
        return InvalidRequest(
            '"jsonrpc" must be "2.0"', {"field": "jsonrpc", "detail": 'must be "2.0"'}
        )
    if envelope.id:
        first = memoryview(envelope.id)[0]
        if first not in _ID_FIRST_BYTES:
            return InvalidRequest(
                "id must be a string, a number or null",
                {"field": "id", "detail": "must be a string, a number or null"},
            )
        if first == _QUOTE:  # msgspec leaves a Raw's bytes unchecked; the id is echoed
            try:
                str(envelope.id, "utf-8")
            except UnicodeDecodeError as exc:
                return exc
    return None


def _writes(method: Method) -> bool:
    """Whether a call of ``method`` writes to the database: a write, or tx.commit."""
    return method.access is _WRITE or method.name == "tx.commit"


def _committed(method: Method, session: DispatchSession) -> bool:
    """Whether a call of ``method`` that succeeded wrote to the database for good: a write
    outside a transaction (committed unless it joined a batch still to commit), tx.commit."""
    if method.access is _WRITE:
        return not session.in_transaction and session.pending_commit() is None
    return _writes(method)


def _success(result: Any, id: msgspec.Raw) -> bytes:
    return _ENCODER.encode(_Success("2.0", msgspec.Raw(_ENCODER.encode(result)), id))


def _success_raw(result: msgspec.Raw, id: msgspec.Raw) -> bytes:
    return _ENCODER.encode(_Success("2.0", result, id))


def _success_pieces(result: msgspec.Raw, id: msgspec.Raw) -> tuple[bytes | memoryview, ...]:
    """``_success_raw``'s bytes in three pieces, the result's not copied."""
    return (_SUCCESS_HEAD, memoryview(result), b',"id":' + bytes(id) + b"}")


def _decode_params(name: str, decoder: msgspec.json.Decoder[Any], raw: msgspec.Raw) -> Any:
    text = bytes(raw) if raw else _EMPTY_OBJECT
    if text[:1] != b"{":
        raise InvalidParams(
            f"params of {name} must be an object of named arguments",
            {"method": name, "field": None, "detail": "must be an object of named arguments"},
        )
    try:
        return decoder.decode(text)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        raise InvalidParams(
            f"invalid params for {name}: {detail}",
            {"method": name, "field": _field_named(detail), "detail": detail},
        ) from exc
    except _UNDECODABLE as exc:
        details = _parse_details(exc)
        raise ParseError(
            f"params of {name} are not valid JSON: {details['detail']}",
            {"method": name, **details},
        ) from exc


def _field_named(detail: str) -> str | None:
    """The field a msgspec ValidationError's text names, if any: ``$.a.b``, ``field `a```,
    or both (``field `foo` - at `$.tasks[1]```: ``tasks[1].foo``)."""
    at = _FIELD_AT.search(detail)
    named = _FIELD_NAMED.search(detail)
    if at and named:
        return f"{at.group(1)}.{named.group(1)}"
    match = at or named
    return match.group(1) if match else None


def _invalid_details(exc: msgspec.ValidationError) -> dict[str, Any]:
    """The data of a -32600 for a message that is JSON but not a request."""
    detail = str(exc)
    return {"field": _field_named(detail), "detail": detail}


def _parse_details(exc: Exception) -> dict[str, Any]:
    """The data of a -32700: what is wrong, and the byte offset when the decoder gives it."""
    if isinstance(exc, UnicodeDecodeError):
        # Its position counts from the start of the string it was in, not of the message.
        return {"detail": f"not valid UTF-8: {exc.reason}"}
    if isinstance(exc, RecursionError):
        return {"detail": "nested too deeply"}
    detail = str(exc)
    match = _AT_BYTE.search(detail)
    return {"detail": detail, "byte": int(match.group(1))} if match else {"detail": detail}


def _parse_error(exc: Exception) -> bytes:
    details = _parse_details(exc)
    return encode_error(ErrorCode.PARSE_ERROR, f"parse error: {details['detail']}", details)
