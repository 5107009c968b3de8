-- Governance: spend caps, operator price overrides, personal provider keys (encrypted), seats.

-- One cap per scope: ('default', ''), ('group', <group id>), ('user', <user id>).
CREATE TABLE spend_limits (
    scope          TEXT NOT NULL CHECK (scope IN ('default', 'group', 'user')),
    scope_id       TEXT NOT NULL DEFAULT '',
    limit_nano_usd INTEGER NOT NULL CHECK (limit_nano_usd >= 0),
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (scope, scope_id)
);

-- Operator price overrides (nano-USD per million tokens); they win over the shipped price book.
CREATE TABLE pricing (
    model             TEXT PRIMARY KEY,
    provider          TEXT NOT NULL DEFAULT '',
    input_nano        INTEGER NOT NULL CHECK (input_nano >= 0),
    output_nano       INTEGER NOT NULL CHECK (output_nano >= 0),
    cache_read_nano   INTEGER NOT NULL CHECK (cache_read_nano >= 0),
    cache_write_nano  INTEGER NOT NULL CHECK (cache_write_nano >= 0),
    output_limit      INTEGER,
    updated_at        INTEGER NOT NULL
);

-- A user's own provider key, AES-256-GCM encrypted; only a masked hint is ever shown.
CREATE TABLE provider_keys (
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    provider    TEXT NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    hint        TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (user_id, provider)
);

-- AI seat holders: first and last interception per user (no foreign key: the recorder must
-- never fail a batch because a user was deleted meanwhile).
CREATE TABLE seat_holders (
    user_id        TEXT PRIMARY KEY,
    first_used_at  INTEGER NOT NULL,
    last_used_at   INTEGER NOT NULL
);
CREATE INDEX seat_holders_last_used ON seat_holders(last_used_at);

CREATE INDEX interceptions_client ON interceptions(client);
CREATE INDEX interceptions_ended ON interceptions(ended_at);
