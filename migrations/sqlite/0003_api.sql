-- Indexes for the management API's lists (interceptions, sessions) and the retention purge.

-- Session detail, per-session aggregates and "latest interception of a session" probes walk
-- (session_key, id); it also serves every lookup the plain session_key index served.
CREATE INDEX interceptions_session_id ON interceptions(session_key, id);
DROP INDEX IF EXISTS interceptions_session;

-- The session list walks (ended_at, session_key) backwards to find sessions by last activity
-- without aggregating all of them; retention's ended_at range uses it as well.
CREATE INDEX interceptions_ended_session ON interceptions(ended_at, session_key);
DROP INDEX IF EXISTS interceptions_ended;

-- The same two walks restricted to one initiator (members, `initiator:` filters).
CREATE INDEX interceptions_user_id ON interceptions(user_id, id);
CREATE INDEX interceptions_user_ended_session ON interceptions(user_id, ended_at, session_key);

-- Counting the sessions of a filtered list (COUNT of distinct session keys) reads only index
-- entries when the filter's column leads an index that ends in session_key. These replace the
-- plain (client) and (provider, model) indexes, whose lookups they also serve.
CREATE INDEX interceptions_model_session ON interceptions(model, session_key);
CREATE INDEX interceptions_client_session ON interceptions(client, session_key);
DROP INDEX IF EXISTS interceptions_client;
CREATE INDEX interceptions_provider_model_session ON interceptions(provider, model, session_key);
DROP INDEX IF EXISTS interceptions_provider_model;
