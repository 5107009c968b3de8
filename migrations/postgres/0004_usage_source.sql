-- Issue 14: where an interception's token counts come from ('reported' by the provider,
-- 'estimated' by Tollgate when the response ended without a usage report, 'none' when nothing
-- reached a model), and unbounded requests in the shared admission rule.

ALTER TABLE interceptions ADD COLUMN usage_source text NOT NULL DEFAULT 'reported';

-- tollgate_reserve gains p_alone: an unbounded request (input the gateway cannot see) is
-- admitted only when nothing else of the user's is in flight on any replica, and reserves at
-- least the rest of the cap, so nothing else is admitted while it runs.
DROP FUNCTION tollgate_reserve(uuid, uuid, timestamptz, bigint, bigint, uuid, bigint);

CREATE FUNCTION tollgate_reserve(
    p_id uuid, p_user uuid, p_period timestamptz, p_cap bigint, p_amount bigint,
    p_alone boolean, p_replica uuid, p_ttl_ms bigint,
    OUT admitted boolean, OUT spent bigint, OUT reserved bigint
) LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    amount bigint := p_amount;
BEGIN
    PERFORM pg_advisory_xact_lock(7305, hashtext(p_user::text));
    SELECT
        COALESCE((SELECT t.spent_nano_usd FROM spend_totals t
                  WHERE t.user_id = p_user AND t.period_start = p_period), 0)
            + COALESCE(SUM(r.amount_nano_usd) FILTER (WHERE r.settled), 0)::bigint,
        COALESCE(SUM(r.amount_nano_usd) FILTER (WHERE NOT r.settled), 0)::bigint,
        COUNT(r.id) FILTER (WHERE NOT r.settled)
    INTO spent, reserved, n
    FROM spend_reservations r
    WHERE r.user_id = p_user AND r.expires_at > now();
    IF p_alone THEN
        admitted := spent < p_cap AND n = 0;
        amount := GREATEST(p_amount, p_cap - spent);
    ELSE
        admitted := spent < p_cap AND (n = 0 OR spent + reserved + p_amount <= p_cap);
    END IF;
    IF admitted THEN
        INSERT INTO spend_reservations (id, user_id, replica_id, amount_nano_usd, expires_at)
        VALUES (p_id, p_user, p_replica, amount,
                now() + make_interval(secs => p_ttl_ms / 1000.0));
        reserved := reserved + amount;
    END IF;
END
$$;
