-- Tollgate schema, SQLite flavour. Times are integer milliseconds since the Unix epoch (UTC);
-- ids are UUID text (interceptions use UUIDv7, so id order is time order); money is integer
-- nano-USD; token prices are nano-USD per million tokens.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    username    TEXT NOT NULL UNIQUE,
    is_admin    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE group_members (
    group_id    TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members(user_id);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        TEXT NOT NULL DEFAULT '',
    secret_hash TEXT NOT NULL UNIQUE,   -- SHA-256 of the whole key, hex
    hint        TEXT NOT NULL,          -- tg_…abcd
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX api_keys_user ON api_keys(user_id);
CREATE INDEX api_keys_updated ON api_keys(updated_at);

CREATE TABLE interceptions (
    id                       TEXT PRIMARY KEY,
    user_id                  TEXT NOT NULL,
    api_key_id               TEXT,
    provider                 TEXT NOT NULL,
    provider_kind            TEXT NOT NULL,
    endpoint                 TEXT NOT NULL,
    model                    TEXT NOT NULL,
    response_model           TEXT,
    client                   TEXT NOT NULL,
    client_session_id        TEXT,
    session_key              TEXT NOT NULL,
    thread_parent_id         TEXT,
    thread_root_id           TEXT,
    credential_kind          TEXT NOT NULL,
    credential_hint          TEXT,
    status                   TEXT NOT NULL,
    upstream_status          INTEGER,
    error                    TEXT,
    streaming                INTEGER NOT NULL,
    started_at               INTEGER NOT NULL,
    ended_at                 INTEGER NOT NULL,
    ttfb_ms                  INTEGER,
    response_id              TEXT,
    input_tokens             INTEGER NOT NULL DEFAULT 0,
    output_tokens            INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens         INTEGER NOT NULL DEFAULT 0,
    cost_nano_usd            INTEGER NOT NULL DEFAULT 0,
    priced                   INTEGER NOT NULL,
    price_input              INTEGER,
    price_output             INTEGER,
    price_cache_read         INTEGER,
    price_cache_write        INTEGER
);
CREATE INDEX interceptions_user_started ON interceptions(user_id, started_at);
CREATE INDEX interceptions_started ON interceptions(started_at);
CREATE INDEX interceptions_session ON interceptions(session_key);
CREATE INDEX interceptions_provider_model ON interceptions(provider, model);

CREATE TABLE token_usages (
    id                       INTEGER PRIMARY KEY AUTOINCREMENT,
    interception_id          TEXT NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    msg_id                   TEXT,
    input_tokens             INTEGER NOT NULL,
    output_tokens            INTEGER NOT NULL,
    cache_read_input_tokens  INTEGER NOT NULL,
    cache_write_input_tokens INTEGER NOT NULL,
    reasoning_tokens         INTEGER NOT NULL,
    created_at               INTEGER NOT NULL
);
CREATE INDEX token_usages_interception ON token_usages(interception_id);

CREATE TABLE user_prompts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    interception_id TEXT NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    msg_id          TEXT,
    prompt          TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX user_prompts_interception ON user_prompts(interception_id);

CREATE TABLE tool_usages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    interception_id TEXT NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    msg_id          TEXT,
    tool_call_id    TEXT NOT NULL,
    tool            TEXT NOT NULL,
    input           TEXT NOT NULL,
    injected        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL
);
CREATE INDEX tool_usages_interception ON tool_usages(interception_id);
CREATE INDEX tool_usages_call ON tool_usages(tool_call_id);

CREATE TABLE model_thoughts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    interception_id TEXT NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    content         TEXT NOT NULL,
    source          TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX model_thoughts_interception ON model_thoughts(interception_id);
