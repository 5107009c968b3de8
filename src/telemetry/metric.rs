//! Metric names (Prometheus, prefix `tollgate_`): the one list that code and dashboards agree on.
//!
//! A leaf: it uses nothing else in the crate, so any module (the store's recorder, the front
//! door) may name a metric without depending on the telemetry machinery.
//!
//! Not here: registering, describing or rendering metrics (`telemetry`).

pub const INTERCEPTIONS_TOTAL: &str = "tollgate_interceptions_total";
pub const INTERCEPTIONS_INFLIGHT: &str = "tollgate_interceptions_inflight";
pub const INTERCEPTION_DURATION_SECONDS: &str = "tollgate_interception_duration_seconds";
pub const UPSTREAM_TTFB_SECONDS: &str = "tollgate_upstream_ttfb_seconds";
pub const OVERHEAD_SECONDS: &str = "tollgate_overhead_seconds";
pub const TOKENS_TOTAL: &str = "tollgate_tokens_total";
pub const COST_NANO_USD_TOTAL: &str = "tollgate_cost_nano_usd_total";
pub const UNPRICED_TOTAL: &str = "tollgate_unpriced_interceptions_total";
pub const USAGE_SOURCE_TOTAL: &str = "tollgate_usage_source_total";
pub const JOURNAL_ERRORS_TOTAL: &str = "tollgate_journal_errors_total";
pub const REFUSALS_TOTAL: &str = "tollgate_refusals_total";
/// Admissions that could not reach the shared budget store (PostgreSQL).
pub const BUDGET_STORE_ERRORS_TOTAL: &str = "tollgate_budget_store_errors_total";
pub const PASSTHROUGH_TOTAL: &str = "tollgate_passthrough_total";
pub const PROXY_CONNECTS_TOTAL: &str = "tollgate_proxy_connects_total";
pub const LEAF_CERTS_MINTED_TOTAL: &str = "tollgate_leaf_certs_minted_total";
pub const MITM_REQUESTS_TOTAL: &str = "tollgate_mitm_requests_total";
pub const RECORDER_QUEUE_DEPTH: &str = "tollgate_recorder_queue_depth";
pub const RECORDER_DROPPED_TOTAL: &str = "tollgate_recorder_dropped_total";
pub const RECORDER_WRITTEN_TOTAL: &str = "tollgate_recorder_written_total";
pub const RECORDER_WRITE_ERRORS_TOTAL: &str = "tollgate_recorder_write_errors_total";
pub const RECORDER_SPILLED_TOTAL: &str = "tollgate_recorder_spilled_total";
pub const RECORDER_SPILL_PENDING: &str = "tollgate_recorder_spill_pending";
pub const SEATS_USED: &str = "tollgate_seats_used";
pub const SEATS_LIMIT: &str = "tollgate_seats_limit";
pub const KEY_CACHE_LOOKUPS_TOTAL: &str = "tollgate_key_cache_lookups_total";
pub const PROVIDER_KEY_STATE_CHANGES_TOTAL: &str = "tollgate_provider_key_state_changes_total";
pub const PROVIDER_KEYS_USABLE: &str = "tollgate_provider_keys_usable";
pub const PROVIDER_KEY_FAILOVERS_TOTAL: &str = "tollgate_provider_key_failovers_total";
pub const BREAKER_STATE: &str = "tollgate_breaker_state";
pub const BREAKER_TRIPS_TOTAL: &str = "tollgate_breaker_trips_total";
pub const BREAKER_REJECTS_TOTAL: &str = "tollgate_breaker_rejects_total";
pub const UPSTREAM_TIMEOUTS_TOTAL: &str = "tollgate_upstream_timeouts_total";
pub const CONFIG_RELOADS_TOTAL: &str = "tollgate_config_reloads_total";
pub const CLIENT_HEADER_TIMEOUTS_TOTAL: &str = "tollgate_client_header_timeouts_total";
pub const REQUEST_HEADS_TOO_LARGE_TOTAL: &str = "tollgate_request_heads_too_large_total";
pub const CONNECTIONS_OPEN: &str = "tollgate_connections_open";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "tollgate_connections_refused_total";
pub const FD_LIMIT: &str = "tollgate_fd_limit";
pub const FDS_OPEN: &str = "tollgate_fds_open";
pub const FD_HEADROOM: &str = "tollgate_fd_headroom";
pub const AUTH_FAILURES_THROTTLED_TOTAL: &str = "tollgate_auth_failures_throttled_total";
