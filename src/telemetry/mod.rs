//! Telemetry: structured logs, metric names, and the Prometheus recorder.
//!
//! Every metric name lives in [`metric`] so dashboards and code agree. Interception log records
//! follow the contract (`message = "interception log"`, one `record_type` per event). No user or
//! session ids go into metric labels, and no secret goes into any log line.
//!
//! Not here: deciding what to record (the gateway does that) or storing it (the store does).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::RwLock;

use crate::store::InterceptionRecord;

mod interception_log;
pub use interception_log::log_interception;

pub mod metric;

/// Installs the process-wide Prometheus recorder once and returns its handle (tests may start
/// several servers in one process; they share it).
/// Folds histogram samples into their buckets every few seconds. The Prometheus recorder keeps
/// each observation until it is folded, which otherwise happens only when `/metrics` is
/// scraped: with no scraper, memory grew by every request's samples (found by the soak
/// benchmark: +0.6 MB a minute at 90 requests/s).
pub async fn metrics_upkeep() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        prometheus().run_upkeep();
    }
}

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
        register_known_series();
        handle
    })
}

/// Creates, at zero, the series whose label values are known before any traffic. An absent
/// series makes `rate()` and alert rules return nothing rather than 0, so a dashboard panel for
/// something that has not happened yet (no drop, no proxy CONNECT) would read "No data".
/// Series labelled by provider or model appear with their first event.
fn register_known_series() {
    for name in [
        metric::RECORDER_DROPPED_TOTAL,
        metric::RECORDER_WRITTEN_TOTAL,
        metric::RECORDER_WRITE_ERRORS_TOTAL,
        metric::RECORDER_SPILLED_TOTAL,
        metric::LEAF_CERTS_MINTED_TOTAL,
        metric::CLIENT_HEADER_TIMEOUTS_TOTAL,
        metric::REQUEST_HEADS_TOO_LARGE_TOTAL,
        metric::AUTH_FAILURES_THROTTLED_TOTAL,
        metric::JOURNAL_ERRORS_TOTAL,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for source in crate::providers::UsageSource::ALL {
        metrics::counter!(metric::USAGE_SOURCE_TOTAL, "source" => source.as_str()).absolute(0);
    }
    for mode in ["mitm", "tunnel", "denied"] {
        metrics::counter!(metric::PROXY_CONNECTS_TOTAL, "mode" => mode).absolute(0);
    }
    for result in ["applied", "refused"] {
        metrics::counter!(metric::CONFIG_RELOADS_TOTAL, "result" => result).absolute(0);
    }
    for name in [metric::RECORDER_QUEUE_DEPTH, metric::RECORDER_SPILL_PENDING] {
        metrics::gauge!(name).increment(0.0);
    }
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
        metric::USAGE_SOURCE_TOTAL,
        "Interceptions by where their usage came from: reported by the provider, estimated by Tollgate (the response ended without a usage report), none (nothing reached a model)."
    );
    describe_counter!(
        metric::JOURNAL_ERRORS_TOTAL,
        "Failed writes or syncs of the spend journal."
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
    describe_counter!(
        metric::RECORDER_SPILLED_TOTAL,
        "Interception records written to the spill directory while the database was down."
    );
    describe_gauge!(
        metric::RECORDER_SPILL_PENDING,
        "Interception records on disk waiting for the database."
    );
    describe_counter!(
        metric::BUDGET_STORE_ERRORS_TOTAL,
        "Capped admissions that could not reach the shared budget store."
    );
    describe_gauge!(metric::SEATS_USED, "AI seats in use.");
    describe_gauge!(metric::SEATS_LIMIT, "Licensed AI seats (0 = unlimited).");
    describe_counter!(
        metric::KEY_CACHE_LOOKUPS_TOTAL,
        "Tollgate key lookups by result (hit, stale, miss, malformed, throttled)."
    );
    describe_counter!(
        metric::PROVIDER_KEY_STATE_CHANGES_TOTAL,
        "Central pool key state changes by provider, key index and new state (cooling, disabled, usable)."
    );
    describe_gauge!(
        metric::PROVIDER_KEYS_USABLE,
        "Central pool keys neither cooling down nor disabled, per provider."
    );
    describe_counter!(
        metric::PROVIDER_KEY_FAILOVERS_TOTAL,
        "Requests retried on the next central key after an upstream 429/401/403."
    );
    describe_gauge!(
        metric::BREAKER_STATE,
        "Circuit breaker state per provider and model: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        metric::BREAKER_TRIPS_TOTAL,
        "Circuit breaker openings per provider and model."
    );
    describe_counter!(
        metric::BREAKER_REJECTS_TOTAL,
        "Requests answered 503 by an open circuit breaker, per provider and model."
    );
    describe_counter!(
        metric::UPSTREAM_TIMEOUTS_TOTAL,
        "Upstream timeouts per provider and phase (connect, first_byte, idle)."
    );
    describe_counter!(
        metric::CONFIG_RELOADS_TOTAL,
        "Configuration reloads on SIGHUP by result (applied, refused)."
    );
    describe_counter!(
        metric::CLIENT_HEADER_TIMEOUTS_TOTAL,
        "Connections closed because a request head was begun but not finished within server.client_header_timeout_ms (gateway listener, proxy port and tunnels; the admin listener closes them without counting)."
    );
    describe_counter!(
        metric::REQUEST_HEADS_TOO_LARGE_TOTAL,
        "Request heads refused with 431 for exceeding server.max_request_head_bytes."
    );
    describe_gauge!(
        metric::CONNECTIONS_OPEN,
        "Client connections held, per listener (gateway, proxy, admin)."
    );
    describe_counter!(
        metric::CONNECTIONS_REFUSED_TOTAL,
        "Connections closed at once because their listener (listener_full) or their client address (client_full) held its limit."
    );
    describe_gauge!(
        metric::FD_LIMIT,
        "The process's open-file limit (soft RLIMIT_NOFILE) after start-up raised it."
    );
    describe_gauge!(metric::FDS_OPEN, "File descriptors the process holds.");
    describe_gauge!(
        metric::FD_HEADROOM,
        "File descriptors left before the open-file limit (fd_limit - fds_open)."
    );
    describe_counter!(
        metric::AUTH_FAILURES_THROTTLED_TOTAL,
        "Key checks answered 429 without a lookup because their client address failed authentication too often."
    );
}

/// Sets up `tracing` once: JSON lines on stdout when `structured`, human lines otherwise.
/// pingora's `log` output is bridged through the same subscriber.
pub fn init_logging(structured: bool, level: &str) {
    use tracing_subscriber::EnvFilter;
    // pingora's connection pool logs a benign race ("failed to acquire reusable stream": the
    // idle watcher still held the connection, so a new one is opened) at error level, hundreds
    // of times a minute under load. Connect and TLS failures reach Tollgate as errors and are
    // logged and recorded there, so pingora's connector log adds nothing but noise.
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| {
            EnvFilter::try_new(format!(
                "{level},pingora=warn,pingora_core=warn,pingora_core::connectors=off,pingora_proxy=warn,sqlx=warn"
            ))
        })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter);
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
    match result {
        // The interception records are written by hand only beside the JSON subscriber.
        Ok(()) if structured => STRUCTURED.store(true, std::sync::atomic::Ordering::Relaxed),
        Ok(()) => {}
        // Already initialised (tests); keep the existing subscriber.
        Err(_) => {}
    }
}

/// Whether log lines are JSON (the interception records are then written by hand).
static STRUCTURED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn structured() -> bool {
    STRUCTURED.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// Whether this thread is inside a [`LineBatch`], and the lines it gathered so far.
    static GATHERING: Cell<bool> = const { Cell::new(false) };
    static GATHERED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A gathering buffer grown past this (a huge prompt) is shrunk back after its batch.
const GATHER_KEEP: usize = 64 * 1024;

/// stdout for the log subscriber. Inside a [`LineBatch`] the lines this thread formats are
/// gathered and written with one `write` when the batch ends: an interception's five or more
/// records cost one system call instead of one each.
struct LogWriter;

impl LogWriter {
    /// Appends to this thread's batch if one is open; `false` when there is none.
    fn gather(buf: &[u8]) -> bool {
        if !GATHERING.get() {
            return false;
        }
        GATHERED.with_borrow_mut(|g| g.extend_from_slice(buf));
        true
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if Self::gather(buf) {
            return Ok(());
        }
        // Interception blocks still waiting for the flusher go first: lines stay in order.
        let mut out = std::io::stdout().lock();
        let pending = std::mem::take(&mut *deferred().blocks.lock());
        out.write_all(&pending)?;
        out.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if GATHERING.get() {
            return Ok(());
        }
        std::io::stdout().flush()
    }
}

/// How long finished interceptions' log blocks wait to be written together.
const LOG_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Interception log blocks waiting to be written, and the flusher thread's doorbell.
struct Deferred {
    blocks: parking_lot::Mutex<Vec<u8>>,
    bell: parking_lot::Condvar,
}

/// The deferred blocks; the first call starts the flusher thread.
fn deferred() -> &'static Deferred {
    static DEFERRED: OnceLock<Deferred> = OnceLock::new();
    static FLUSHER: std::sync::Once = std::sync::Once::new();
    let d = DEFERRED.get_or_init(|| Deferred {
        blocks: parking_lot::Mutex::new(Vec::new()),
        bell: parking_lot::Condvar::new(),
    });
    FLUSHER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || flush_deferred(d));
        if spawned.is_err() {
            // No thread: blocks are still written, by the next immediate line or at exit.
        }
    });
    d
}

/// Queues a finished interception's log block for the flusher thread. A write per
/// interception was 6 % of the gateway threads' time at 10k requests/s (one system call each,
/// and a wake-up of whatever reads stdout); written together every [`LOG_LINGER`], they cost a
/// hundred calls a second however busy the gateway is. Any other log line writes the queued
/// blocks first, so order is kept, and the last line at shutdown ("stopped") flushes them all.
fn defer(block: &[u8]) {
    let d = deferred();
    let mut blocks = d.blocks.lock();
    let was_empty = blocks.is_empty();
    blocks.extend_from_slice(block);
    if was_empty {
        d.bell.notify_one();
    }
}

/// The flusher thread: sleeps until a block is queued, lets more gather, writes them all.
fn flush_deferred(d: &'static Deferred) {
    let mut spare = Vec::new();
    loop {
        {
            let mut blocks = d.blocks.lock();
            while blocks.is_empty() {
                d.bell.wait(&mut blocks);
            }
        }
        std::thread::sleep(LOG_LINGER);
        // stdout before the blocks, as in `LogWriter::write_all`: one order, so no deadlock and
        // no line overtaking a block. The gateway threads only wait for the swap.
        let mut out = std::io::stdout().lock();
        std::mem::swap(&mut *d.blocks.lock(), &mut spare);
        let _ = out.write_all(&spare);
        let _ = out.flush();
        drop(out);
        spare.clear();
        if spare.capacity() > GATHER_KEEP * 16 {
            spare.shrink_to(GATHER_KEEP);
        }
    }
}

/// Gathers this thread's log lines until dropped, then writes them to stdout as one block, in
/// the order they were logged.
struct LineBatch {
    nested: bool,
}

impl LineBatch {
    fn start() -> LineBatch {
        LineBatch {
            nested: GATHERING.replace(true),
        }
    }
}

impl Drop for LineBatch {
    fn drop(&mut self) {
        if self.nested {
            return;
        }
        GATHERING.set(false);
        GATHERED.with_borrow_mut(|g| {
            if !g.is_empty() {
                defer(g);
                g.clear();
            }
            if g.capacity() > GATHER_KEEP {
                g.shrink_to(GATHER_KEEP / 4);
            }
        });
    }
}

/// Metric handles of one provider route, each registered on first use and then reused, so the
/// request path pays a map lookup instead of a registry lookup with freshly allocated label
/// strings per series. A series appears in `/metrics` exactly when it did before: on its first
/// recording. Handles come from the recorder installed when they are first used (the server
/// installs Prometheus before any listener starts).
pub struct ProviderSeries {
    provider: String,
    inflight: OnceLock<Gauge>,
    upstream_ttfb: OnceLock<Histogram>,
    duration: OnceLock<Histogram>,
    overhead: OnceLock<Histogram>,
    models: RwLock<HashMap<String, Arc<ModelSeries>>>,
}

/// The (provider, model) series.
struct ModelSeries {
    provider: String,
    model: String,
    by_status: RwLock<Vec<(&'static str, Counter)>>,
    tokens: [OnceLock<Counter>; TOKEN_KINDS.len()],
    cost: OnceLock<Counter>,
    unpriced: OnceLock<Counter>,
}

const TOKEN_KINDS: [&str; 5] = ["input", "output", "cache_read", "cache_write", "reasoning"];

/// Past this many cached series sets the cache starts over (the registry keeps the series).
const SERIES_CACHE_MAX: usize = 10_000;

/// The cached series of provider route `provider`.
pub fn provider_series(provider: &str) -> Arc<ProviderSeries> {
    static CACHE: OnceLock<RwLock<HashMap<String, Arc<ProviderSeries>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(s) = cache.read().get(provider) {
        return s.clone();
    }
    let mut cache = cache.write();
    if cache.len() >= SERIES_CACHE_MAX {
        cache.clear();
    }
    cache
        .entry(provider.to_string())
        .or_insert_with(|| {
            Arc::new(ProviderSeries {
                provider: provider.to_string(),
                inflight: OnceLock::new(),
                upstream_ttfb: OnceLock::new(),
                duration: OnceLock::new(),
                overhead: OnceLock::new(),
                models: RwLock::new(HashMap::new()),
            })
        })
        .clone()
}

impl ProviderSeries {
    /// `tollgate_interceptions_inflight{provider}`.
    pub fn inflight(&self) -> &Gauge {
        self.inflight.get_or_init(
            || metrics::gauge!(metric::INTERCEPTIONS_INFLIGHT, "provider" => self.provider.clone()),
        )
    }

    /// `tollgate_upstream_ttfb_seconds{provider}`.
    pub fn upstream_ttfb(&self) -> &Histogram {
        self.upstream_ttfb.get_or_init(
            || metrics::histogram!(metric::UPSTREAM_TTFB_SECONDS, "provider" => self.provider.clone()),
        )
    }

    fn model(&self, model: &str) -> Arc<ModelSeries> {
        if let Some(m) = self.models.read().get(model) {
            return m.clone();
        }
        let mut models = self.models.write();
        if models.len() >= SERIES_CACHE_MAX {
            models.clear();
        }
        models
            .entry(model.to_string())
            .or_insert_with(|| {
                Arc::new(ModelSeries {
                    provider: self.provider.clone(),
                    model: model.to_string(),
                    by_status: RwLock::new(Vec::new()),
                    tokens: Default::default(),
                    cost: OnceLock::new(),
                    unpriced: OnceLock::new(),
                })
            })
            .clone()
    }
}

impl ModelSeries {
    fn total(&self, status: &'static str) -> Counter {
        if let Some((_, c)) = self.by_status.read().iter().find(|(s, _)| *s == status) {
            return c.clone();
        }
        let mut by_status = self.by_status.write();
        if let Some((_, c)) = by_status.iter().find(|(s, _)| *s == status) {
            return c.clone();
        }
        let c = metrics::counter!(metric::INTERCEPTIONS_TOTAL, "provider" => self.provider.clone(), "model" => self.model.clone(), "status" => status);
        by_status.push((status, c.clone()));
        c
    }
}

/// Metrics for one finished interception.
pub fn count_interception(r: &InterceptionRecord, duration_s: f64, upstream_s: f64) {
    let p = provider_series(&r.provider);
    // Model names come from clients; only priced (known) models become label values, so a
    // client cannot blow up the series count with made-up names.
    metrics::counter!(metric::USAGE_SOURCE_TOTAL, "source" => r.usage_source.as_str()).increment(1);
    let m = p.model(if r.price.is_some() {
        &r.model
    } else {
        "unpriced"
    });
    m.total(r.status.as_str()).increment(1);
    p.duration
        .get_or_init(|| metrics::histogram!(metric::INTERCEPTION_DURATION_SECONDS, "provider" => p.provider.clone()))
        .record(duration_s);
    p.overhead
        .get_or_init(
            || metrics::histogram!(metric::OVERHEAD_SECONDS, "provider" => p.provider.clone()),
        )
        .record((duration_s - upstream_s).max(0.0));
    let usage = [
        r.usage.input,
        r.usage.output,
        r.usage.cache_read,
        r.usage.cache_write,
        r.usage.reasoning,
    ];
    for ((kind, n), handle) in TOKEN_KINDS.iter().zip(usage).zip(&m.tokens) {
        if n > 0 {
            handle
                .get_or_init(|| metrics::counter!(metric::TOKENS_TOTAL, "provider" => m.provider.clone(), "model" => m.model.clone(), "type" => *kind))
                .increment(n);
        }
    }
    if r.cost.0 > 0 {
        m.cost
            .get_or_init(|| metrics::counter!(metric::COST_NANO_USD_TOTAL, "provider" => m.provider.clone(), "model" => m.model.clone()))
            .increment(r.cost.0 as u64);
    }
    if r.price.is_none() {
        m.unpriced
            .get_or_init(|| metrics::counter!(metric::UNPRICED_TOTAL, "provider" => m.provider.clone(), "model" => m.model.clone()))
            .increment(1);
    }
}
