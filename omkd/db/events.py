"""The events repository: an append-only log per goal, with cursors by event_id.

event_id is strictly increasing and never reused, so ``after_event_id`` is a stable cursor for
pages and subscriptions. Not by AUTOINCREMENT, which writes the newest id into
sqlite_sequence on every insert (one more page for each transaction to write; migration
002): a new event takes one past the newest event there is, or past the high-water mark
that the deletes of events raise first (``NEXT_EVENT_ID``, ``RAISE_HIGH_WATER``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omkd.db._codec import RowCodec
from omkd.db._conn import INT64_RANGE, Scope
from omkd.db.errors import DbError, GoalNotFound, InvalidData
from omkd_client.records import EventInput, EventRecord, now

__all__ = ["DEFAULT_TAIL_LIMIT", "EventRepository"]

DEFAULT_TAIL_LIMIT = 1000
NO_CURSOR = 0
"""The cursor of "from the start": event ids begin at 1."""

COLUMNS = "event_id, event_uuid, run_id, goal_id, schema_version, kind, actor, payload, created_at"

GOAL_EXISTS = "SELECT count(*) FROM goals WHERE goal_id = ?"
# The id of a new event: past every event_id ever given, the deleted ones included.
NEXT_EVENT_ID = (
    "max(coalesce((SELECT max(event_id) FROM events), 0), "
    "(SELECT high_water FROM events_high_water)) + 1"
)
# What every delete of events runs first, in its transaction: the newest event_id there is
# becomes the high-water mark, so that no later event takes it again.
RAISE_HIGH_WATER = (
    "UPDATE events_high_water SET high_water = (SELECT max(event_id) FROM events) "
    "WHERE high_water < (SELECT max(event_id) FROM events)"
)


def _inserts(columns: str) -> tuple[str, str]:
    """An INSERT of ``columns`` that gives the event NEXT_EVENT_ID, and one that leaves the id
    to SQLite (one past the newest): the rows of a batch after its first."""
    values = ", ".join("?" * len(columns.split(", ")))
    return (
        f"INSERT INTO events (event_id, {columns}) VALUES ({NEXT_EVENT_ID}, {values})",
        f"INSERT INTO events ({columns}) VALUES ({values})",
    )


INSERT, INSERT_FOLLOWING = _inserts(
    "event_uuid, run_id, goal_id, schema_version, kind, actor, payload, created_at"
)
# An event without event_uuid, run_id and actor (the common case) leaves those columns out
# (NULL by default) instead of binding three Nones: Python's sqlite3 (3.11) asks its adapter
# protocol about every None it binds, and the failed lookup formats an AttributeError that
# it then drops, ~0.35 us a None: more than the INSERT itself costs inside a transaction.
INSERT_BARE, INSERT_BARE_FOLLOWING = _inserts("goal_id, schema_version, kind, payload, created_at")
# The cursor is a plain range (no cursor: 0, below every event_id) so the (goal_id, event_id)
# index serves it; "(? IS NULL OR event_id > ?)" would scan the goal's whole log.
_PAGE = (
    "FROM events WHERE goal_id = ? AND event_id > ? AND (? IS NULL OR created_at >= ?) "
    "ORDER BY event_id LIMIT coalesce(?, -1)"
)
SELECT_PAGE = f"SELECT {COLUMNS} {_PAGE}"
# The newest ``tail`` events of the same range, still returned in ascending order: the index
# is walked backwards, so the cost does not grow with the log.
_TAIL_PAGE = (
    f"SELECT * FROM (SELECT {COLUMNS} FROM events WHERE goal_id = ? AND event_id > ? "
    "AND (? IS NULL OR created_at >= ?) ORDER BY event_id DESC LIMIT ?) ORDER BY event_id"
)
# The page as one JSON array built by SQLite: no Python object per row. json(payload)
# embeds the stored text as JSON (integers beyond 64 bits keep their digits). As a BLOB,
# it comes out as the UTF-8 bytes SQLite built: as TEXT, Python would decode it into a str
# and the caller encode it back, two copies of the whole page with the GIL held.
SELECT_PAGE_JSON = (
    "SELECT CAST(coalesce(json_group_array(json_object('event_id', event_id, "
    "'event_uuid', event_uuid, 'run_id', run_id, 'goal_id', goal_id, "
    "'schema_version', schema_version, 'kind', kind, 'actor', actor, "
    "'payload', json(payload), 'created_at', created_at)), '[]') AS BLOB) "
    f"FROM (SELECT {COLUMNS} {_PAGE})"
)
SELECT_TAIL = _TAIL_PAGE
SELECT_TAIL_JSON = SELECT_PAGE_JSON.replace(f"SELECT {COLUMNS} {_PAGE}", _TAIL_PAGE)
TAIL_ALL = f"SELECT {COLUMNS} FROM events WHERE event_id > ? ORDER BY event_id LIMIT ?"
TAIL_GOAL = (
    f"SELECT {COLUMNS} FROM events WHERE goal_id = ? AND event_id > ? ORDER BY event_id LIMIT ?"
)
LAST_EVENT_ID = "SELECT coalesce(max(event_id), 0) FROM events"
DELETE_BY_GOAL = "DELETE FROM events WHERE goal_id = ?"

_codec = RowCodec(EventRecord, COLUMNS)


class EventRepository:
    """Events, on a Database (each call its own transaction) or inside a Transaction."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def append(
        self,
        goal_id: str,
        kind: str,
        payload: Any,
        *,
        event_uuid: str | None = None,
        run_id: str | None = None,
        actor: str | None = None,
        schema_version: int = 1,
    ) -> EventRecord:
        """Append one event (created_at now); return it with its new event_id.

        Raises GoalNotFound, InvalidData.
        """
        # One expression for the common case, as _check_input for a batch's events.
        if not (
            type(goal_id) is str
            and type(kind) is str
            and type(schema_version) is int
            and schema_version in INT64_RANGE
            and event_uuid is None
            and run_id is None
            and actor is None
        ):
            _check_str(goal_id, "goal_id")
            _check_str(kind, "kind")
            for field, value in (("event_uuid", event_uuid), ("run_id", run_id), ("actor", actor)):
                if value is not None:
                    _check_str(value, field)
            _check_int(schema_version, "schema_version")
        created_at = now()
        text = self._scope.encode_json(payload, "payload")
        row = insert_row(goal_id, kind, text, created_at, event_uuid, run_id, actor, schema_version)
        sql = INSERT_BARE if len(row) == _BARE_LENGTH else INSERT
        with self._scope.statement() as conn:
            event_id = conn.execute(sql, row, goal_id=goal_id).lastrowid
        assert event_id is not None
        return EventRecord(
            event_id=event_id,
            goal_id=goal_id,
            kind=kind,
            payload=payload,
            created_at=created_at,
            event_uuid=event_uuid,
            run_id=run_id,
            actor=actor,
            schema_version=schema_version,
        )

    def append_batch(self, goal_id: str, events: list[EventInput]) -> list[int]:
        """Append ``events`` to the goal, all or nothing; return their event_ids in order.

        Raises GoalNotFound, InvalidData (data names the field and the index).
        """
        _check_str(goal_id, "goal_id")
        created_at = now()
        encode = self._scope.encode_json
        rows = [_batch_row(goal_id, i, event, created_at, encode) for i, event in enumerate(events)]
        with self._scope.write() as conn:
            if not conn.scalar(GOAL_EXISTS, (goal_id,)):
                raise GoalNotFound(goal_id)
            if not rows:
                return []
            if all(len(row) == _BARE_LENGTH for row in rows):
                first_sql, following_sql = INSERT_BARE, INSERT_BARE_FOLLOWING
            else:
                first_sql, following_sql = INSERT, INSERT_FOLLOWING
                rows = [_full(row) for row in rows]
            # The first takes NEXT_EVENT_ID; the others one past it, each the newest then.
            first = conn.execute(first_sql, rows[0], goal_id=goal_id).lastrowid
            assert first is not None
            if len(rows) > 1:
                conn.executemany(following_sql, rows[1:], goal_id=goal_id)
        return list(range(first, first + len(rows)))

    def get_by_goal(
        self,
        goal_id: str,
        *,
        since: int | None = None,
        after_event_id: int | None = None,
        limit: int | None = None,
        tail: int | None = None,
    ) -> list[EventRecord]:
        """Return the goal's events by event_id ascending ([] for an unknown goal).

        ``since`` keeps created_at >= it, ``after_event_id`` event_id > it, ``limit`` caps the
        count from the oldest, ``tail`` keeps the newest ``tail`` instead (not both). Raises
        InvalidData.
        """
        params = _page_params(goal_id, since, after_event_id, limit, tail)
        with self._scope.read() as conn:
            return _codec.records(
                conn.query(SELECT_TAIL if tail is not None else SELECT_PAGE, params)
            )

    def get_by_goal_json(
        self,
        goal_id: str,
        *,
        since: int | None = None,
        after_event_id: int | None = None,
        limit: int | None = None,
        tail: int | None = None,
    ) -> bytes:
        """Return the page ``get_by_goal`` would return, as a UTF-8 JSON array built by SQLite.

        Each element has the Event fields with payload embedded as JSON. Raises InvalidData.
        """
        params = _page_params(goal_id, since, after_event_id, limit, tail)
        statement = SELECT_TAIL_JSON if tail is not None else SELECT_PAGE_JSON
        with self._scope.read() as conn:
            try:
                page = conn.scalar(statement, params)
            except DbError as exc:
                if exc.data.get("sqlite_error") != "SQLITE_TOOBIG":
                    raise
                raise InvalidData(
                    "limit",
                    f"the page is longer than SQLite builds at once ({exc.message}): read the "
                    "log in pages (after_event_id and limit)",
                ) from exc
        assert isinstance(page, bytes)
        return page

    def tail(
        self, after_event_id: int, goal_id: str | None = None, limit: int = DEFAULT_TAIL_LIMIT
    ) -> list[EventRecord]:
        """Return events with event_id > ``after_event_id``, of one goal or (None) all goals.

        By event_id ascending, at most ``limit``. Raises InvalidData.
        """
        _check_int(after_event_id, "after_event_id")
        _check_int(limit, "limit")
        if limit < 0:
            raise InvalidData("limit", "must not be negative")
        with self._scope.read() as conn:
            if goal_id is None:
                rows = conn.query(TAIL_ALL, (after_event_id, limit))
            else:
                _check_str(goal_id, "goal_id")
                rows = conn.query(TAIL_GOAL, (goal_id, after_event_id, limit))
        return _codec.records(rows)

    def last_event_id(self) -> int:
        """Return the newest event_id, or 0 if there is no event."""
        with self._scope.read() as conn:
            return int(conn.scalar(LAST_EVENT_ID))

    def delete_by_goal(self, goal_id: str) -> int:
        """Delete the goal's events; return how many were deleted."""
        with self._scope.write() as conn:
            conn.execute(RAISE_HIGH_WATER)
            return conn.change(DELETE_BY_GOAL, (goal_id,))


def _check_str(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise InvalidData(field, f"expected a string, got {type(value).__name__}")


def _check_int(value: object, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidData(field, f"expected an integer, got {type(value).__name__}")
    if value not in INT64_RANGE:
        raise InvalidData(field, f"{value} is out of the 64-bit integer range")


def _page_params(
    goal_id: str,
    since: int | None,
    after_event_id: int | None,
    limit: int | None,
    tail: int | None = None,
) -> tuple[Any, ...]:
    _check_str(goal_id, "goal_id")
    checked = (("since", since), ("after_event_id", after_event_id), ("limit", limit),
               ("tail", tail))  # fmt: skip
    for field, value in checked:
        if value is not None:
            _check_int(value, field)
    for field, value in (("limit", limit), ("tail", tail)):
        if value is not None and value < 0:
            raise InvalidData(field, "must not be negative")
    if limit is not None and tail is not None:
        raise InvalidData("tail", "give limit (the oldest first) or tail (the newest), not both")
    cursor = NO_CURSOR if after_event_id is None else after_event_id
    return (goal_id, cursor, since, since, tail if tail is not None else limit)


def _check_input(event: EventInput) -> None:
    # One expression for the common case, as append checks its arguments: a strict
    # msgspec.convert of each event cost about a third of its INSERT (bench/profile.py).
    if (
        type(event.kind) is str
        and (event.event_uuid is None or type(event.event_uuid) is str)
        and (event.run_id is None or type(event.run_id) is str)
        and (event.actor is None or type(event.actor) is str)
        and type(event.schema_version) is int
    ):
        return
    _check_str(event.kind, "kind")
    for field in ("event_uuid", "run_id", "actor"):
        value = getattr(event, field)
        if value is not None:
            _check_str(value, field)
    _check_int(event.schema_version, "schema_version")


def _batch_row(
    goal_id: str,
    index: int,
    event: EventInput,
    created_at: int,
    encode_json: Callable[[Any, str], str | None],
) -> tuple[Any, ...]:
    if not isinstance(event, EventInput):
        raise InvalidData("events", f"item {index} is not an EventInput", index=index)
    try:
        _check_input(event)
        payload = encode_json(event.payload, "payload")
    except InvalidData as exc:
        raise InvalidData(exc.field, f"event {index}: {exc.message}", index=index) from exc
    return insert_row(
        goal_id,
        event.kind,
        payload,
        created_at,
        event.event_uuid,
        event.run_id,
        event.actor,
        event.schema_version,
    )


_BARE_LENGTH = 5


def insert_row(
    goal_id: str,
    kind: str,
    payload: str | None,
    created_at: int,
    event_uuid: str | None = None,
    run_id: str | None = None,
    actor: str | None = None,
    schema_version: int = 1,
) -> tuple[Any, ...]:
    """The INSERT parameters of one event (``payload`` as stored JSON text): for INSERT_BARE
    when it has no event_uuid, run_id and actor, else for INSERT."""
    if event_uuid is None and run_id is None and actor is None:
        return (goal_id, schema_version, kind, payload, created_at)
    return (event_uuid, run_id, goal_id, schema_version, kind, actor, payload, created_at)


def _full(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` for INSERT, in a batch that mixes both kinds."""
    if len(row) != _BARE_LENGTH:
        return row
    goal_id, schema_version, kind, payload, created_at = row
    return (None, None, goal_id, schema_version, kind, None, payload, created_at)
