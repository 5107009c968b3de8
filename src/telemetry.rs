//! Telemetry: structured logs, metric names, and the Prometheus recorder.
//!
//! Every metric name lives in [`metric`] so dashboards and code agree. Interception log records
//! follow the contract (`message = "interception log"`, one `record_type` per event). No user or
//! session ids go into metric labels, and no secret goes into any log line.
//!
//! Not here: deciding what to record (the gateway does that) or storing it (the store does).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::store::InterceptionRecord;

/// Metric names (Prometheus, prefix `tollgate_`).
pub mod metric {
    pub const INTERCEPTIONS_TOTAL: &str = "tollgate_interceptions_total";
    pub const INTERCEPTIONS_INFLIGHT: &str = "tollgate_interceptions_inflight";
    pub const INTERCEPTION_DURATION_SECONDS: &str = "tollgate_interception_duration_seconds";
    pub const UPSTREAM_TTFB_SECONDS: &str = "tollgate_upstream_ttfb_seconds";
    pub const OVERHEAD_SECONDS: &str = "tollgate_overhead_seconds";
    pub const TOKENS_TOTAL: &str = "tollgate_tokens_total";
    pub const COST_NANO_USD_TOTAL: &str = "tollgate_cost_nano_usd_total";
    pub const UNPRICED_TOTAL: &str = "tollgate_unpriced_interceptions_total";
    pub const REFUSALS_TOTAL: &str = "tollgate_refusals_total";
    pub const PASSTHROUGH_TOTAL: &str = "tollgate_passthrough_total";
    pub const PROXY_CONNECTS_TOTAL: &str = "tollgate_proxy_connects_total";
    pub const LEAF_CERTS_MINTED_TOTAL: &str = "tollgate_leaf_certs_minted_total";
    pub const MITM_REQUESTS_TOTAL: &str = "tollgate_mitm_requests_total";
    pub const RECORDER_QUEUE_DEPTH: &str = "tollgate_recorder_queue_depth";
    pub const RECORDER_DROPPED_TOTAL: &str = "tollgate_recorder_dropped_total";
    pub const RECORDER_WRITTEN_TOTAL: &str = "tollgate_recorder_written_total";
    pub const RECORDER_WRITE_ERRORS_TOTAL: &str = "tollgate_recorder_write_errors_total";
    pub const SEATS_USED: &str = "tollgate_seats_used";
    pub const SEATS_LIMIT: &str = "tollgate_seats_limit";
    pub const KEY_CACHE_LOOKUPS_TOTAL: &str = "tollgate_key_cache_lookups_total";
}

/// Installs the process-wide Prometheus recorder once and returns its handle (tests may start
/// several servers in one process; they share it).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ])
            .expect("static bucket list is not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests embedding the library); keep going
        // with our handle, which then renders only what it saw.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        metric::INTERCEPTIONS_TOTAL,
        "Finished interceptions by provider, model and status."
    );
    describe_gauge!(metric::INTERCEPTIONS_INFLIGHT, "Interceptions in progress.");
    describe_histogram!(
        metric::INTERCEPTION_DURATION_SECONDS,
        Unit::Seconds,
        "Interception wall time."
    );
    describe_histogram!(
        metric::UPSTREAM_TTFB_SECONDS,
        Unit::Seconds,
        "Time to the upstream's response head."
    );
    describe_histogram!(
        metric::OVERHEAD_SECONDS,
        Unit::Seconds,
        "Interception time not spent waiting on the upstream."
    );
    describe_counter!(metric::TOKENS_TOTAL, "Tokens by provider, model and type.");
    describe_counter!(
        metric::COST_NANO_USD_TOTAL,
        "Cost in nano-USD by provider and model."
    );
    describe_counter!(
        metric::UNPRICED_TOTAL,
        "Interceptions of models without a price."
    );
    describe_counter!(
        metric::REFUSALS_TOTAL,
        "Requests refused by Tollgate, by reason."
    );
    describe_counter!(
        metric::PASSTHROUGH_TOTAL,
        "Passthrough requests by provider."
    );
    describe_counter!(
        metric::PROXY_CONNECTS_TOTAL,
        "CONNECT requests by outcome (mitm, tunnel, denied)."
    );
    describe_counter!(
        metric::LEAF_CERTS_MINTED_TOTAL,
        "Leaf certificates minted for MITM."
    );
    describe_gauge!(
        metric::RECORDER_QUEUE_DEPTH,
        "Interception records waiting to be written."
    );
    describe_counter!(
        metric::RECORDER_DROPPED_TOTAL,
        "Interception records dropped (queue full or database failing at shutdown)."
    );
    describe_counter!(
        metric::RECORDER_WRITTEN_TOTAL,
        "Interception records written."
    );
    describe_counter!(
        metric::RECORDER_WRITE_ERRORS_TOTAL,
        "Failed batch writes (retried)."
    );
    describe_gauge!(metric::SEATS_USED, "AI seats in use.");
    describe_gauge!(metric::SEATS_LIMIT, "Licensed AI seats (0 = unlimited).");
    describe_counter!(
        metric::KEY_CACHE_LOOKUPS_TOTAL,
        "Tollgate key lookups by result (hit, miss)."
    );
}

/// Sets up `tracing` once: JSON lines on stdout when `structured`, human lines otherwise.
/// pingora's `log` output is bridged through the same subscriber.
pub fn init_logging(structured: bool, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| {
            EnvFilter::try_new(format!(
                "{level},pingora=warn,pingora_core=warn,pingora_proxy=warn,sqlx=warn"
            ))
        })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = if structured {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
    if result.is_err() {
        // Already initialised (tests); keep the existing subscriber.
    }
}

/// Emits the contract's interception log records for one finished interception.
pub fn log_interception(r: &InterceptionRecord) {
    const MSG: &str = "interception log";
    let id = r.id.to_string();
    tracing::info!(
        target: "tollgate::interception",
        record_type = "interception_start",
        interception_id = %id,
        initiator_id = %r.user_id,
        api_key_id = %optional(r.api_key_id),
        provider = %r.provider,
        model = %r.model,
        client = r.client,
        client_session_id = r.client_session_id.as_deref().unwrap_or(""),
        started_at = %r.started_at.to_rfc3339(),
        thread_parent_id = %optional(r.thread_parent_id),
        thread_root_id = %optional(r.thread_root_id),
        "{MSG}"
    );
    let msg_id = r.response_id.as_deref().unwrap_or("");
    if let Some(prompt) = &r.prompt {
        tracing::info!(
            target: "tollgate::interception",
            record_type = "prompt_usage",
            interception_id = %id,
            msg_id,
            prompt = %prompt,
            created_at = %r.started_at.to_rfc3339(),
            "{MSG}"
        );
    }
    for t in &r.thoughts {
        tracing::info!(
            target: "tollgate::interception",
            record_type = "model_thought",
            interception_id = %id,
            content = %t.content,
            created_at = %r.ended_at.to_rfc3339(),
            "{MSG}"
        );
    }
    for t in &r.tool_calls {
        tracing::info!(
            target: "tollgate::interception",
            record_type = "tool_usage",
            interception_id = %id,
            msg_id,
            tool_call_id = %t.id,
            tool = %t.name,
            input = %t.input,
            injected = false,
            created_at = %r.ended_at.to_rfc3339(),
            "{MSG}"
        );
    }
    tracing::info!(
        target: "tollgate::interception",
        record_type = "token_usage",
        interception_id = %id,
        msg_id,
        input_tokens = r.usage.input,
        output_tokens = r.usage.output,
        cache_read_input_tokens = r.usage.cache_read,
        cache_write_input_tokens = r.usage.cache_write,
        reasoning_tokens = r.usage.reasoning,
        created_at = %r.ended_at.to_rfc3339(),
        "{MSG}"
    );
    tracing::info!(
        target: "tollgate::interception",
        record_type = "interception_end",
        interception_id = %id,
        ended_at = %r.ended_at.to_rfc3339(),
        status = r.status.as_str(),
        upstream_status = r.upstream_status,
        cost_nano_usd = r.cost.0,
        "{MSG}"
    );
}

/// Absent ids are logged as empty strings so every record of a type has the same fields.
fn optional(id: Option<uuid::Uuid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_default()
}

/// Metrics for one finished interception.
pub fn count_interception(r: &InterceptionRecord, duration_s: f64, upstream_s: f64) {
    let provider = r.provider.clone();
    // Model names come from clients; only priced (known) models become label values, so a
    // client cannot blow up the series count with made-up names.
    let model = if r.price.is_some() {
        r.model.clone()
    } else {
        "unpriced".to_string()
    };
    metrics::counter!(metric::INTERCEPTIONS_TOTAL, "provider" => provider.clone(), "model" => model.clone(), "status" => r.status.as_str()).increment(1);
    metrics::histogram!(metric::INTERCEPTION_DURATION_SECONDS, "provider" => provider.clone())
        .record(duration_s);
    metrics::histogram!(metric::OVERHEAD_SECONDS, "provider" => provider.clone())
        .record((duration_s - upstream_s).max(0.0));
    for (kind, n) in [
        ("input", r.usage.input),
        ("output", r.usage.output),
        ("cache_read", r.usage.cache_read),
        ("cache_write", r.usage.cache_write),
        ("reasoning", r.usage.reasoning),
    ] {
        if n > 0 {
            metrics::counter!(metric::TOKENS_TOTAL, "provider" => provider.clone(), "model" => model.clone(), "type" => kind).increment(n);
        }
    }
    if r.cost.0 > 0 {
        metrics::counter!(metric::COST_NANO_USD_TOTAL, "provider" => provider.clone(), "model" => model.clone())
            .increment(r.cost.0 as u64);
    }
    if r.price.is_none() {
        metrics::counter!(metric::UNPRICED_TOTAL, "provider" => provider, "model" => model)
            .increment(1);
    }
}
