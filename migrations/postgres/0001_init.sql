-- Tollgate schema, PostgreSQL flavour: the same tables, columns and indexes as
-- migrations/sqlite/0001..0003 combined, with native types. Times are timestamptz (UTC; the
-- gateway works in milliseconds, which timestamptz's microseconds hold exactly); ids are uuid
-- (interceptions use UUIDv7, so id order is time order); money is bigint nano-USD; token
-- prices are bigint nano-USD per million tokens. Tool inputs stay text, not jsonb: a streamed
-- tool call can end mid-argument, and the record must keep exactly what the model sent.

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    username    text NOT NULL UNIQUE,
    is_admin    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE groups (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL
);

CREATE TABLE group_members (
    group_id    uuid NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members(user_id);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        text NOT NULL DEFAULT '',
    secret_hash text NOT NULL UNIQUE,   -- SHA-256 of the whole key, hex
    hint        text NOT NULL,          -- tg_…abcd
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX api_keys_user ON api_keys(user_id);
CREATE INDEX api_keys_updated ON api_keys(updated_at);

-- No foreign key to users: the recorder must never fail a batch because a user was deleted
-- meanwhile (same as SQLite).
CREATE TABLE interceptions (
    id                       uuid PRIMARY KEY,
    user_id                  uuid NOT NULL,
    api_key_id               uuid,
    provider                 text NOT NULL,
    provider_kind            text NOT NULL,
    endpoint                 text NOT NULL,
    model                    text NOT NULL,
    response_model           text,
    client                   text NOT NULL,
    client_session_id        text,
    session_key              text NOT NULL,   -- a client's session id is free text, not a uuid
    thread_parent_id         uuid,
    thread_root_id           uuid,
    credential_kind          text NOT NULL,
    credential_hint          text,
    status                   text NOT NULL,
    upstream_status          integer,
    error                    text,
    streaming                boolean NOT NULL,
    started_at               timestamptz NOT NULL,
    ended_at                 timestamptz NOT NULL,
    ttfb_ms                  bigint,
    response_id              text,
    input_tokens             bigint NOT NULL DEFAULT 0,
    output_tokens            bigint NOT NULL DEFAULT 0,
    cache_read_input_tokens  bigint NOT NULL DEFAULT 0,
    cache_write_input_tokens bigint NOT NULL DEFAULT 0,
    reasoning_tokens         bigint NOT NULL DEFAULT 0,
    cost_nano_usd            bigint NOT NULL DEFAULT 0,
    priced                   boolean NOT NULL,
    price_input              bigint,
    price_output             bigint,
    price_cache_read         bigint,
    price_cache_write        bigint
);
-- Every API filter and the sessions grouping (see migrations/sqlite/0003_api.sql for why each
-- one exists; the set here is that file's end state).
CREATE INDEX interceptions_user_started ON interceptions(user_id, started_at);
CREATE INDEX interceptions_started ON interceptions(started_at);
CREATE INDEX interceptions_session_id ON interceptions(session_key, id);
CREATE INDEX interceptions_ended_session ON interceptions(ended_at, session_key);
CREATE INDEX interceptions_user_id ON interceptions(user_id, id);
CREATE INDEX interceptions_user_ended_session ON interceptions(user_id, ended_at, session_key);
CREATE INDEX interceptions_model_session ON interceptions(model, session_key);
CREATE INDEX interceptions_client_session ON interceptions(client, session_key);
CREATE INDEX interceptions_provider_model_session ON interceptions(provider, model, session_key);

CREATE TABLE token_usages (
    id                       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    interception_id          uuid NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    msg_id                   text,
    input_tokens             bigint NOT NULL,
    output_tokens            bigint NOT NULL,
    cache_read_input_tokens  bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_tokens         bigint NOT NULL,
    created_at               timestamptz NOT NULL
);
CREATE INDEX token_usages_interception ON token_usages(interception_id);

CREATE TABLE user_prompts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    interception_id uuid NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    msg_id          text,
    prompt          text NOT NULL,
    created_at      timestamptz NOT NULL
);
CREATE INDEX user_prompts_interception ON user_prompts(interception_id);

CREATE TABLE tool_usages (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    interception_id uuid NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    msg_id          text,
    tool_call_id    text NOT NULL,
    tool            text NOT NULL,
    input           text NOT NULL,
    injected        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL
);
CREATE INDEX tool_usages_interception ON tool_usages(interception_id);
CREATE INDEX tool_usages_call ON tool_usages(tool_call_id);

CREATE TABLE model_thoughts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    interception_id uuid NOT NULL REFERENCES interceptions(id) ON DELETE CASCADE,
    content         text NOT NULL,
    source          text NOT NULL,
    created_at      timestamptz NOT NULL
);
CREATE INDEX model_thoughts_interception ON model_thoughts(interception_id);

-- Governance. One cap per scope: ('default', ''), ('group', <group id>), ('user', <user id>).
-- scope_id stays text because the default scope has no id ('' rather than NULL keeps it in
-- the primary key).
CREATE TABLE spend_limits (
    scope          text NOT NULL CHECK (scope IN ('default', 'group', 'user')),
    scope_id       text NOT NULL DEFAULT '',
    limit_nano_usd bigint NOT NULL CHECK (limit_nano_usd >= 0),
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (scope, scope_id)
);

-- Operator price overrides (nano-USD per million tokens); they win over the shipped price book.
CREATE TABLE pricing (
    model             text PRIMARY KEY,
    provider          text NOT NULL DEFAULT '',
    input_nano        bigint NOT NULL CHECK (input_nano >= 0),
    output_nano       bigint NOT NULL CHECK (output_nano >= 0),
    cache_read_nano   bigint NOT NULL CHECK (cache_read_nano >= 0),
    cache_write_nano  bigint NOT NULL CHECK (cache_write_nano >= 0),
    output_limit      bigint,
    updated_at        timestamptz NOT NULL
);

-- A user's own provider key, AES-256-GCM encrypted; only a masked hint is ever shown.
CREATE TABLE provider_keys (
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    provider    text NOT NULL,
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL,
    hint        text NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, provider)
);

-- AI seat holders: first and last interception per user (no foreign key, as interceptions).
CREATE TABLE seat_holders (
    user_id        uuid PRIMARY KEY,
    first_used_at  timestamptz NOT NULL,
    last_used_at   timestamptz NOT NULL
);
CREATE INDEX seat_holders_last_used ON seat_holders(last_used_at);
