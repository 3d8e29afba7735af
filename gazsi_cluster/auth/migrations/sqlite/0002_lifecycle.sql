-- Issue 18: daily budgets, cached tokens in usage, a change feed every process polls, and the
-- marks that make replaying a usage journal exactly-once. Same schema as migrations/postgres.
ALTER TABLE api_keys ADD COLUMN daily_quota INTEGER;
ALTER TABLE key_usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;

-- One row per revoke / rotate / update; processes ask for seq > the last one they saw.
CREATE TABLE IF NOT EXISTS key_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id   TEXT NOT NULL,
    key_hash TEXT NOT NULL,   -- the hash to evict (for a rotation: the old secret's)
    kind     TEXT NOT NULL,   -- revoke | rotate | update
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS key_events_hash ON key_events (key_hash);

-- A journal writer's segments up to applied_seq are in key_usage.
CREATE TABLE IF NOT EXISTS usage_journal (
    writer      TEXT PRIMARY KEY,
    applied_seq INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
