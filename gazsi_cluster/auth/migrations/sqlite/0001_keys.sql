-- Keys and daily usage; the same schema as migrations/postgres (days as ISO text).
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    owner         TEXT NOT NULL DEFAULT '',
    prefix        TEXT NOT NULL UNIQUE,
    key_hash      TEXT NOT NULL UNIQUE,
    scopes        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL,
    revoked_at    REAL,
    rpm           INTEGER,
    tpm           INTEGER,
    monthly_quota INTEGER
);

CREATE TABLE IF NOT EXISTS key_usage (
    key_id   TEXT NOT NULL,
    model    TEXT NOT NULL,
    day      TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, model, day)
);

CREATE INDEX IF NOT EXISTS key_usage_day ON key_usage (day);
