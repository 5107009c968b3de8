-- Usage per hour, user, provider, model and client: the usage rollups (API, dashboard) read
-- whole hours from here instead of scanning every interception. The recorder adds each batch's
-- interceptions in the transaction that inserts them and retention subtracts what it purges, so
-- a bucket always equals the sum of the interceptions that started in its hour.
CREATE TABLE usage_hourly (
    hour                     INTEGER NOT NULL,  -- start of the UTC hour, epoch ms
    user_id                  TEXT NOT NULL,
    provider                 TEXT NOT NULL,
    model                    TEXT NOT NULL,
    client                   TEXT NOT NULL,
    input_tokens             INTEGER NOT NULL,
    output_tokens            INTEGER NOT NULL,
    cache_read_input_tokens  INTEGER NOT NULL,
    cache_write_input_tokens INTEGER NOT NULL,
    reasoning_tokens         INTEGER NOT NULL,
    cost_nano_usd            INTEGER NOT NULL,
    interception_count       INTEGER NOT NULL,
    PRIMARY KEY (hour, user_id, provider, model, client)
) WITHOUT ROWID;
CREATE INDEX usage_hourly_user ON usage_hourly(user_id, hour);

INSERT INTO usage_hourly
SELECT (started_at / 3600000) * 3600000, user_id, provider, model, client,
       SUM(input_tokens), SUM(output_tokens), SUM(cache_read_input_tokens),
       SUM(cache_write_input_tokens), SUM(reasoning_tokens), SUM(cost_nano_usd), COUNT(*)
FROM interceptions
GROUP BY 1, 2, 3, 4, 5;
