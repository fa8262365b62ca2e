-- Schema v1 of omkd: goals and the five kinds of rows that belong to a goal.
-- Times are integer unix seconds, money integer cents, JSON fields compact JSON text.
-- Every child row references its goal and goes with it (ON DELETE CASCADE).

CREATE TABLE goals (
    goal_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    phase TEXT NOT NULL,
    kind TEXT,
    original_goal TEXT NOT NULL DEFAULT '',
    normalized_goal TEXT NOT NULL DEFAULT '',
    goal_text TEXT NOT NULL,
    project_dir TEXT NOT NULL,
    state_dir TEXT NOT NULL DEFAULT '',
    policy TEXT NOT NULL DEFAULT 'local',
    delivery_policy TEXT NOT NULL DEFAULT 'local',
    merge_policy TEXT NOT NULL DEFAULT 'disabled',
    until_ready INTEGER NOT NULL DEFAULT 0 CHECK (until_ready IN (0, 1)),
    slice_execution INTEGER NOT NULL DEFAULT 0 CHECK (slice_execution IN (0, 1)),
    max_agents INTEGER,
    budget_time TEXT,
    budget_tokens INTEGER,
    budget_usd INTEGER,
    cost_tracker_path TEXT,
    terminal_criteria TEXT,
    failure TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    completed_at INTEGER,
    controller_pid INTEGER,
    version INTEGER NOT NULL DEFAULT 1
) STRICT;

CREATE INDEX goals_updated_at ON goals (updated_at);
CREATE INDEX goals_status ON goals (status, updated_at);

-- seq keeps the creation order of tasks; task_id is the public key.
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id) ON DELETE CASCADE,
    title TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    owner TEXT,
    read_set TEXT,
    write_set TEXT,
    depends_on TEXT,
    risk TEXT NOT NULL DEFAULT '',
    acceptance TEXT,
    evidence TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 3,
    lease_expires_at INTEGER,
    completed_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE INDEX tasks_goal ON tasks (goal_id, seq);

-- AUTOINCREMENT: event ids are never reused, even after the newest events are deleted,
-- so a subscriber's cursor stays valid.
CREATE TABLE events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_uuid TEXT,
    run_id TEXT,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id) ON DELETE CASCADE,
    schema_version INTEGER NOT NULL DEFAULT 1,
    kind TEXT NOT NULL,
    actor TEXT,
    payload TEXT,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX events_goal ON events (goal_id, event_id);

CREATE TABLE proofs (
    goal_id TEXT PRIMARY KEY REFERENCES goals (goal_id) ON DELETE CASCADE,
    version INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL,
    readiness TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '',
    task_graph_summary TEXT,
    changed_files TEXT,
    commits TEXT,
    git TEXT,
    gates TEXT,
    gates_passed INTEGER NOT NULL DEFAULT 0,
    gates_total INTEGER NOT NULL DEFAULT 0,
    post_mutation_gates_ran INTEGER NOT NULL DEFAULT 0
        CHECK (post_mutation_gates_ran IN (0, 1)),
    known_gaps TEXT,
    human_decisions_required TEXT,
    recovery_status TEXT,
    delivery_metadata TEXT,
    review_artifacts TEXT,
    integration_evidence TEXT,
    oracle_evidence TEXT,
    generated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE budget_checkpoints (
    checkpoint_id INTEGER PRIMARY KEY AUTOINCREMENT,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id) ON DELETE CASCADE,
    version INTEGER NOT NULL DEFAULT 1,
    label TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    phase TEXT NOT NULL DEFAULT '',
    recorded_at INTEGER NOT NULL,
    budget_time TEXT,
    total_budget_secs INTEGER,
    elapsed_since_created_secs INTEGER NOT NULL DEFAULT 0,
    remaining_budget_secs INTEGER,
    budget_tokens INTEGER,
    used_tokens INTEGER NOT NULL DEFAULT 0,
    remaining_budget_tokens INTEGER,
    budget_usd INTEGER,
    estimated_cost_usd INTEGER NOT NULL DEFAULT 0,
    remaining_budget_usd INTEGER,
    limit_value INTEGER,
    used_value INTEGER,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX budget_checkpoints_goal ON budget_checkpoints (goal_id, checkpoint_id);

CREATE TABLE artifacts (
    artifact_id INTEGER PRIMARY KEY AUTOINCREMENT,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    mime_type TEXT,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX artifacts_goal_kind ON artifacts (goal_id, kind, artifact_id);
