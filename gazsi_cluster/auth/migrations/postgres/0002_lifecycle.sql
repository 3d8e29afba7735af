-- Issue 18: daily budgets, cached tokens in usage, a change feed every process polls, and the
-- marks that make replaying a usage journal exactly-once.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS daily_quota BIGINT;
ALTER TABLE key_usage ADD COLUMN IF NOT EXISTS cached_tokens BIGINT NOT NULL DEFAULT 0;

-- One row per revoke / rotate / update; processes ask for seq > the last one they saw. Writers
-- hold an advisory lock while inserting, so seq order is commit order and no poller skips a row.
CREATE TABLE IF NOT EXISTS key_events (
    seq      BIGSERIAL PRIMARY KEY,
    key_id   TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    kind     TEXT NOT NULL,
    at       DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS key_events_hash ON key_events (key_hash);

CREATE TABLE IF NOT EXISTS usage_journal (
    writer      TEXT PRIMARY KEY,
    applied_seq BIGINT NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL
);
