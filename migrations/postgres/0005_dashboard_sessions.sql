-- Dashboard sessions (issue 15), PostgreSQL flavour of migrations/sqlite/0006: the browser's
-- cookie holds a random session id, never a key; only the id's SHA-256 is stored.
CREATE TABLE dashboard_sessions (
    id_hash      text PRIMARY KEY,                                             -- SHA-256, hex
    user_id      uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    api_key_id   uuid NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,    -- signed in with
    created_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_user ON dashboard_sessions(user_id);
CREATE INDEX dashboard_sessions_key ON dashboard_sessions(api_key_id);
CREATE INDEX dashboard_sessions_expires ON dashboard_sessions(expires_at);
