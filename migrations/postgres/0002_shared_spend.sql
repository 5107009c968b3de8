-- Spend shared by every replica on this database (issue 6).
--
-- spend_totals is the authoritative spend per user and budget period: the recorder adds each
-- interception's cost in the same transaction that writes the interception, so the two never
-- disagree. spend_reservations holds the estimate of every capped request in flight on any
-- replica; tollgate_reserve admits a request against spend + reservations under a per-user lock,
-- so N replicas cannot each spend the whole remainder. When a request ends its reservation is
-- marked settled with the real cost (before the client has the last byte, so its next request
-- sees the spend); the transaction that records the interception deletes it and adds the cost
-- to spend_totals. A reservation expires if its replica stops renewing it (it died).

CREATE TABLE spend_totals (
    user_id        uuid        NOT NULL,
    period_start   timestamptz NOT NULL,
    spent_nano_usd bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);
CREATE INDEX spend_totals_period ON spend_totals(period_start);

CREATE TABLE spend_reservations (
    id              uuid        PRIMARY KEY,
    user_id         uuid        NOT NULL,
    replica_id      uuid        NOT NULL,
    amount_nano_usd bigint      NOT NULL,
    -- Set when the request ended (amount is then its real cost) but the recorder has not yet
    -- moved it into spend_totals: counted as spend, not as a request in flight.
    settled         boolean     NOT NULL DEFAULT false,
    expires_at      timestamptz NOT NULL
);
CREATE INDEX spend_reservations_user ON spend_reservations(user_id);
CREATE INDEX spend_reservations_replica ON spend_reservations(replica_id);
CREATE INDEX spend_reservations_expires ON spend_reservations(expires_at);

-- The admission rule of the in-memory ledger (governance/ledger.rs), over every replica: admit
-- when spend is under the cap and either nothing else of the user's is in flight or
-- spend + reserved + estimate fits. One round trip; the advisory lock serialises admissions of
-- one user (the recorder needs no lock: it swaps a reservation for its cost in one transaction,
-- and the single SELECT below reads both from one snapshot).
CREATE FUNCTION tollgate_reserve(
    p_id uuid, p_user uuid, p_period timestamptz, p_cap bigint, p_amount bigint,
    p_replica uuid, p_ttl_ms bigint,
    OUT admitted boolean, OUT spent bigint, OUT reserved bigint
) LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
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
    admitted := spent < p_cap AND (n = 0 OR spent + reserved + p_amount <= p_cap);
    IF admitted THEN
        INSERT INTO spend_reservations (id, user_id, replica_id, amount_nano_usd, expires_at)
        VALUES (p_id, p_user, p_replica, p_amount,
                now() + make_interval(secs => p_ttl_ms / 1000.0));
        reserved := reserved + p_amount;
    END IF;
END
$$;
