-- Keys and daily usage. Only hashes of keys are stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    owner         TEXT NOT NULL DEFAULT '',
    prefix        TEXT NOT NULL UNIQUE,
    key_hash      TEXT NOT NULL UNIQUE,
    scopes        TEXT NOT NULL,          -- JSON list of model names, "*" or "admin"
    created_at    DOUBLE PRECISION NOT NULL,  -- epoch seconds, UTC
    expires_at    DOUBLE PRECISION,
    revoked_at    DOUBLE PRECISION,
    rpm           INTEGER,
    tpm           INTEGER,
    monthly_quota BIGINT
);

CREATE TABLE IF NOT EXISTS key_usage (
    key_id   TEXT NOT NULL,
    model    TEXT NOT NULL,
    day      DATE NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    tokens   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, model, day)
);

CREATE INDEX IF NOT EXISTS key_usage_day ON key_usage (day);
