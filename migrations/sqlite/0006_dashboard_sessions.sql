-- Dashboard sessions (issue 15): the browser's cookie holds a random session id, never a key;
-- only the id's SHA-256 is stored. A session counts while its key is unrevoked, its user
-- exists, it was used within the idle limit and it is younger than its absolute expiry.
-- Deleting the row is signing out.
CREATE TABLE dashboard_sessions (
    id_hash      TEXT PRIMARY KEY,                                             -- SHA-256, hex
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    api_key_id   TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,    -- signed in with
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX dashboard_sessions_user ON dashboard_sessions(user_id);
CREATE INDEX dashboard_sessions_key ON dashboard_sessions(api_key_id);
CREATE INDEX dashboard_sessions_expires ON dashboard_sessions(expires_at);
