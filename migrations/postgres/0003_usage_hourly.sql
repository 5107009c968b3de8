-- Usage per hour, user, provider, model and client: the usage rollups (API, dashboard) read
-- whole hours from here instead of scanning every interception. The recorder adds each batch's
-- interceptions in the transaction that inserts them and retention subtracts what it purges, so
-- a bucket always equals the sum of the interceptions that started in its hour.
CREATE TABLE usage_hourly (
    hour                     timestamptz NOT NULL,  -- start of the UTC hour
    user_id                  uuid NOT NULL,
    provider                 text NOT NULL,
    model                    text NOT NULL,
    client                   text NOT NULL,
    input_tokens             bigint NOT NULL,
    output_tokens            bigint NOT NULL,
    cache_read_input_tokens  bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_tokens         bigint NOT NULL,
    cost_nano_usd            bigint NOT NULL,
    interception_count       bigint NOT NULL,
    PRIMARY KEY (hour, user_id, provider, model, client)
);
CREATE INDEX usage_hourly_user ON usage_hourly(user_id, hour);

INSERT INTO usage_hourly
SELECT date_trunc('hour', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', user_id, provider, model, client,
       SUM(input_tokens), SUM(output_tokens), SUM(cache_read_input_tokens),
       SUM(cache_write_input_tokens), SUM(reasoning_tokens), SUM(cost_nano_usd), COUNT(*)
FROM interceptions
GROUP BY 1, 2, 3, 4, 5;
