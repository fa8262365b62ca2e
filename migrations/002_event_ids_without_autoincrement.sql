-- Event ids without AUTOINCREMENT. AUTOINCREMENT kept ids from being reused by writing the
-- newest id into sqlite_sequence on every insert: one more page for each transaction to
-- write to the WAL (3 instead of 2 for a lone event.append, ~10 us of its ~80 us round
-- trip). Ids stay strictly increasing and never reused, so cursors stay valid: a new event
-- takes one past the newest event, or past events_high_water.high_water, which the deletes
-- of events raise first to the newest event_id there is (omkd.db.events.RAISE_HIGH_WATER).

CREATE TABLE events_high_water (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 0),
    high_water INTEGER NOT NULL
) STRICT;

INSERT INTO events_high_water (only_row, high_water)
VALUES (0, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0));

CREATE TABLE events_rebuilt (
    event_id INTEGER PRIMARY KEY,
    event_uuid TEXT,
    run_id TEXT,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id) ON DELETE CASCADE,
    schema_version INTEGER NOT NULL DEFAULT 1,
    kind TEXT NOT NULL,
    actor TEXT,
    payload TEXT,
    created_at INTEGER NOT NULL
) STRICT;

INSERT INTO events_rebuilt (
    event_id, event_uuid, run_id, goal_id, schema_version, kind, actor, payload, created_at
)
SELECT event_id, event_uuid, run_id, goal_id, schema_version, kind, actor, payload, created_at
FROM events ORDER BY event_id;

DROP TABLE events;

ALTER TABLE events_rebuilt RENAME TO events;

CREATE INDEX events_goal ON events (goal_id, event_id);
