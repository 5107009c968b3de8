//! The recorder: a bounded queue between the request path and the database.
//!
//! The gateway hands each finished interception to [`Recorder::submit`], which never waits: the
//! record goes into a bounded channel, or, if the channel is full, is counted as dropped and
//! logged. A background writer takes whatever is queued (up to a batch) and writes it in one
//! transaction, so batches grow by themselves under load.
//!
//! When the database fails, the writer holds the batch in memory and retries with backoff for
//! `recorder.spill_after`; if it is still failing, the batch goes to the spill directory on
//! disk (fsynced; see `spill`), and so does every later batch until the database answers
//! again, when the spilled records are written first, oldest first. Records are lost only if
//! the spill directory is full or unwritable and the queue overflows meanwhile (both counted).
//! On shutdown the writer drains the queue completely, to the database or to disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::spill::Spill;
use super::{InterceptionRecord, Store};
use crate::config::RecorderConfig;
use crate::telemetry::metric;

/// The sending side, cloned into every request context that needs it.
#[derive(Clone, Debug)]
pub struct Recorder {
    tx: mpsc::Sender<InterceptionRecord>,
    health: Arc<Health>,
    progress: RecorderProgress,
}

/// How many records were queued and how many the writer has finished with (written,
/// spilled, or given up on at shutdown). The queue is first in, first out: once `processed`
/// reaches a value `submitted` had, every record submitted until then is done with (the spend
/// journal deletes a segment on this).
#[derive(Clone, Debug, Default)]
pub struct RecorderProgress {
    submitted: Arc<AtomicU64>,
    processed: Arc<AtomicU64>,
}

impl RecorderProgress {
    /// `(submitted, processed)`.
    pub fn counts(&self) -> (u64, u64) {
        // Processed first: it never passes submitted, so the pair is never inverted.
        let processed = self.processed.load(Ordering::Acquire);
        (self.submitted.load(Ordering::Acquire), processed)
    }
}

/// What the writer last saw, for `/readyz`.
#[derive(Debug, Default)]
struct Health {
    /// The last write error, while writes are failing or records wait on disk.
    problem: Mutex<Option<String>>,
}

/// Owned by whoever started the writer; `drain` flushes everything and stops it.
pub struct RecorderHandle {
    drain: oneshot::Sender<()>,
    join: JoinHandle<()>,
}

/// How long a drain keeps retrying a database that refuses writes before giving up (when there
/// is no spill directory to write to instead).
const DRAIN_RETRY_LIMIT: Duration = Duration::from_secs(15);

/// While records wait on disk, how often the writer asks the database whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

impl Recorder {
    /// Starts the writer on the current tokio runtime.
    pub fn start(store: Store, config: RecorderConfig) -> (Recorder, RecorderHandle) {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (drain_tx, drain_rx) = oneshot::channel();
        let spill = match Spill::open(&config.spill_dir, config.spill_max_bytes) {
            Ok(spill) => spill,
            Err(e) => {
                tracing::error!(error = %e, "cannot open recorder.spill_dir; records will only be held in memory");
                Spill::disabled()
            }
        };
        if spill.pending() > 0 {
            tracing::info!(records = spill.pending(), dir = %config.spill_dir.display(), "spilled interceptions from an earlier run will be written");
        }
        metrics::gauge!(metric::RECORDER_SPILL_PENDING).set(spill.pending() as f64);
        let health = Arc::new(Health::default());
        let progress = RecorderProgress::default();
        let writer = Writer {
            progress: progress.clone(),
            health: health.clone(),
            store,
            spill,
            batch_size: config.batch_size,
            spill_after: config.spill_after,
            next_probe: tokio::time::Instant::now(),
        };
        let join = tokio::spawn(write_loop(writer, rx, drain_rx));
        (
            Recorder {
                tx,
                health,
                progress,
            },
            RecorderHandle {
                drain: drain_tx,
                join,
            },
        )
    }

    /// Queued and finished record counts, for the spend journal.
    pub fn progress(&self) -> RecorderProgress {
        self.progress.clone()
    }

    /// Why interceptions are not reaching the database right now (`None`: they are).
    pub fn problem(&self) -> Option<String> {
        self.health.problem.lock().clone()
    }

    /// Queues a record without waiting. Returns false if it had to be dropped.
    pub fn submit(&self, record: InterceptionRecord) -> bool {
        match self.tx.try_send(record) {
            Ok(()) => {
                self.progress.submitted.fetch_add(1, Ordering::AcqRel);
                metrics::gauge!(metric::RECORDER_QUEUE_DEPTH).increment(1.0);
                true
            }
            Err(e) => {
                let (why, rec) = match e {
                    mpsc::error::TrySendError::Full(r) => ("queue full", r),
                    mpsc::error::TrySendError::Closed(r) => ("recorder stopped", r),
                };
                metrics::counter!(metric::RECORDER_DROPPED_TOTAL).increment(1);
                tracing::error!(interception_id = %rec.id, reason = why, "interception record dropped");
                false
            }
        }
    }
}

impl RecorderHandle {
    /// Stops accepting records, writes everything queued, and waits for the writer to finish.
    pub async fn drain(self) {
        let _ = self.drain.send(());
        let _ = self.join.await;
    }
}

async fn write_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<InterceptionRecord>,
    mut drain: oneshot::Receiver<()>,
) {
    let batch_size = writer.batch_size;
    let mut batch = Vec::with_capacity(batch_size);
    let mut draining = false;
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut drain, if !draining => {
                draining = true;
                // Closing the receiver refuses new records but keeps the queued ones readable.
                rx.close();
                continue;
            }
            n = rx.recv_many(&mut batch, batch_size) => {
                if n == 0 {
                    break;
                }
                if !draining {
                    linger(&mut rx, &mut batch, batch_size).await;
                }
            }
            // Quiet traffic must not leave records on disk: try them even with nothing new.
            _ = probe.tick(), if writer.spill.pending() > 0 => {
                writer.replay().await;
                continue;
            }
        }
        metrics::gauge!(metric::RECORDER_QUEUE_DEPTH).decrement(batch.len() as f64);
        writer.write(&batch, draining).await;
        writer
            .progress
            .processed
            .fetch_add(batch.len() as u64, Ordering::AcqRel);
        batch.clear();
    }
    // Stopping: one last chance for records on disk; what is left stays for the next start.
    writer.next_probe = tokio::time::Instant::now();
    writer.replay().await;
}

/// The writer task's state.
struct Writer {
    progress: RecorderProgress,
    health: Arc<Health>,
    store: Store,
    spill: Spill,
    batch_size: usize,
    spill_after: Duration,
    /// While records are on disk, the database is not asked again before this.
    next_probe: tokio::time::Instant,
}

impl Writer {
    /// Writes a batch to the database, or holds it and then spills it (see the module docs).
    async fn write(&mut self, batch: &[InterceptionRecord], draining: bool) {
        if self.spill.pending() > 0 {
            self.replay().await;
            // Still down: later records go behind the earlier ones on disk.
            if self.spill.pending() > 0 && self.spill_batch(batch) {
                return;
            }
        }
        let mut backoff = Duration::from_millis(50);
        let started = tokio::time::Instant::now();
        loop {
            match self.store.insert_interceptions(batch).await {
                Ok(()) => {
                    metrics::counter!(metric::RECORDER_WRITTEN_TOTAL).increment(batch.len() as u64);
                    self.healthy();
                    return;
                }
                Err(e) => {
                    metrics::counter!(metric::RECORDER_WRITE_ERRORS_TOTAL).increment(1);
                    self.failing(&e);
                    let waited = started.elapsed();
                    if (draining || waited >= self.spill_after) && self.spill_batch(batch) {
                        tracing::warn!(error = %e, records = batch.len(), "database unavailable; interceptions spilled to disk until it is back");
                        self.next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
                        return;
                    }
                    if draining && waited > DRAIN_RETRY_LIMIT {
                        metrics::counter!(metric::RECORDER_DROPPED_TOTAL)
                            .increment(batch.len() as u64);
                        tracing::error!(error = %e, records = batch.len(), "database still failing at shutdown; records dropped");
                        return;
                    }
                    tracing::warn!(error = %e, records = batch.len(), retry_in_ms = backoff.as_millis() as u64, "recording failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Appends a batch to disk; false when spilling is off, full or failing (the caller keeps
    /// holding the batch in memory then).
    fn spill_batch(&mut self, batch: &[InterceptionRecord]) -> bool {
        if !self.spill.enabled() {
            return false;
        }
        match self.spill.append(batch) {
            Ok(()) => {
                metrics::counter!(metric::RECORDER_SPILLED_TOTAL).increment(batch.len() as u64);
                metrics::gauge!(metric::RECORDER_SPILL_PENDING).set(self.spill.pending() as f64);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "cannot spill interceptions to disk; holding them in memory");
                false
            }
        }
    }

    /// Writes spilled records back, oldest file first, if the database answers; at most one
    /// attempt per [`PROBE_INTERVAL`] while it does not.
    async fn replay(&mut self) {
        if self.spill.pending() == 0 || tokio::time::Instant::now() < self.next_probe {
            return;
        }
        while let Some(read) = self.spill.oldest() {
            let (records, bad) = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a spill file; retrying later");
                    self.next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
                    return;
                }
            };
            if bad > 0 {
                metrics::counter!(metric::RECORDER_DROPPED_TOTAL).increment(bad);
                tracing::error!(
                    records = bad,
                    "unreadable lines in a spill file (cut by a crash?) skipped"
                );
            }
            for chunk in records.chunks(self.batch_size.max(1)) {
                if let Err(e) = self.store.insert_interceptions(chunk).await {
                    metrics::counter!(metric::RECORDER_WRITE_ERRORS_TOTAL).increment(1);
                    self.failing(&e);
                    tracing::debug!(error = %e, "database still unavailable; spilled records wait");
                    self.next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
                    return;
                }
                metrics::counter!(metric::RECORDER_WRITTEN_TOTAL).increment(chunk.len() as u64);
            }
            if let Err(e) = self.spill.pop(records.len() as u64 + bad) {
                tracing::error!(error = %e, "cannot delete a replayed spill file; it will be replayed again (duplicates are skipped)");
                self.next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
                return;
            }
            metrics::gauge!(metric::RECORDER_SPILL_PENDING).set(self.spill.pending() as f64);
            tracing::info!(
                records = records.len(),
                left = self.spill.pending(),
                "spilled interceptions written"
            );
        }
        self.healthy();
    }

    fn failing(&self, e: &super::StoreError) {
        *self.health.problem.lock() = Some(format!("cannot write interceptions: {e}"));
    }

    /// Clears the problem once writes work and nothing waits on disk.
    fn healthy(&self) {
        if self.spill.pending() == 0 {
            *self.health.problem.lock() = None;
        }
    }
}

/// How long the writer waits for more records after the first one of a batch. One transaction
/// for many records costs far less than one each (the writer was 35-40 % of Tollgate's CPU when
/// it woke per record); 20 ms is invisible to anyone reading the API.
const LINGER: Duration = Duration::from_millis(20);

/// How often a lingering writer looks at the queue.
const LINGER_STEP: Duration = Duration::from_millis(2);

/// Lets a batch fill for up to [`LINGER`] (or until it is full).
///
/// It looks at the queue every [`LINGER_STEP`] instead of waiting on it: a receiver parked on
/// the channel is woken by every send, which at thousands of requests a second meant a futex
/// and usually a thread switch per record; a timer wakes it at most ten times per batch.
async fn linger(
    rx: &mut mpsc::Receiver<InterceptionRecord>,
    batch: &mut Vec<InterceptionRecord>,
    batch_size: usize,
) {
    let deadline = tokio::time::Instant::now() + LINGER;
    loop {
        let now = tokio::time::Instant::now();
        if batch.len() + rx.len() >= batch_size || now >= deadline || rx.is_closed() {
            break;
        }
        tokio::time::sleep(LINGER_STEP.min(deadline - now)).await;
    }
    while batch.len() < batch_size {
        match rx.try_recv() {
            Ok(record) => batch.push(record),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::NanoUsd;
    use crate::providers::{Thought, ThoughtSource, TokenUsage, ToolCall};
    use crate::store::{CredentialKind, InterceptionStatus};
    use chrono::Utc;
    use std::io::Write;
    use uuid::Uuid;

    fn record(user: Uuid) -> InterceptionRecord {
        InterceptionRecord {
            id: Uuid::now_v7(),
            user_id: user,
            api_key_id: None,
            provider: "anthropic".into(),
            provider_kind: "anthropic",
            endpoint: "messages",
            model: "claude-sonnet-4-5".into(),
            response_model: Some("claude-sonnet-4-5-20250929".into()),
            client: "claude-code",
            client_session_id: Some("s-1".into()),
            session_key: "s-1".into(),
            thread_parent_id: None,
            thread_root_id: None,
            credential_kind: CredentialKind::Central,
            credential_hint: Some("sk-…1234".into()),
            status: InterceptionStatus::Completed,
            upstream_status: Some(200),
            error: None,
            streaming: true,
            started_at: Utc::now(),
            ended_at: Utc::now(),
            ttfb_ms: Some(12),
            response_id: Some("msg_1".into()),
            usage: TokenUsage {
                input: 10,
                output: 20,
                ..TokenUsage::default()
            },
            usage_source: Default::default(),
            prompt: Some("hello \u{1F600} \"quoted\"\n".into()),
            tool_calls: vec![ToolCall {
                id: "toolu_1".into(),
                name: "bash".into(),
                input: "{\"cmd\":\"ls\"}".into(),
            }],
            thoughts: vec![Thought {
                content: "thinking".into(),
                source: ThoughtSource::Thinking,
            }],
            cost: NanoUsd(1234),
            price: None,
            spend_period_start: Utc::now(),
            shared_reservation: None,
        }
    }

    async fn sqlite_store(dir: &std::path::Path) -> (Store, Uuid) {
        let url = format!("sqlite://{}/t.db", dir.display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let user = store.create_user("ada", false, &[]).await.unwrap().id;
        (store, user)
    }

    async fn children(store: &Store) -> (i64, i64, i64, i64) {
        let pool = store.sqlite_pool().unwrap();
        let n = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(pool)
                .await
                .unwrap()
        };
        (
            n("SELECT COUNT(*) FROM token_usages").await,
            n("SELECT COUNT(*) FROM user_prompts").await,
            n("SELECT COUNT(*) FROM tool_usages").await,
            n("SELECT COUNT(*) FROM model_thoughts").await,
        )
    }

    #[tokio::test]
    async fn a_batch_written_twice_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, user) = sqlite_store(dir.path()).await;
        let batch = vec![record(user), record(user)];
        store.insert_interceptions(&batch).await.unwrap();
        store.insert_interceptions(&batch).await.unwrap();
        assert_eq!(store.count_interceptions().await.unwrap(), 2);
        assert_eq!(children(&store).await, (2, 2, 2, 2));
    }

    #[test]
    fn spill_files_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let user = Uuid::now_v7();
        let mut spill = Spill::open(dir.path(), 1 << 20).unwrap();
        let first: Vec<_> = (0..3).map(|_| record(user)).collect();
        spill.append(&first).unwrap();
        spill.append(&[record(user)]).unwrap();
        assert_eq!(spill.pending(), 4);
        // A crash mid-append leaves half a line: it is skipped and counted, the rest is read.
        let path = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":\"01")
            .unwrap();

        let mut reopened = Spill::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.pending(), 5);
        let (records, bad) = reopened.oldest().unwrap().unwrap();
        assert_eq!((records.len(), bad), (4, 1));
        assert_eq!(records[0].id, first[0].id);
        assert_eq!(records[0].prompt, first[0].prompt);
        assert_eq!(records[0].tool_calls, first[0].tool_calls);
        assert_eq!(records[0].client, "claude-code");
        assert_eq!(records[0].status, InterceptionStatus::Completed);
        reopened.pop(5).unwrap();
        assert_eq!(reopened.pending(), 0);
        assert!(reopened.oldest().is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_full_spill_directory_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::open(dir.path(), 2_000).unwrap();
        let user = Uuid::now_v7();
        spill.append(&[record(user)]).unwrap();
        assert!(matches!(
            spill.append(&[record(user), record(user), record(user)]),
            Err(super::super::spill::SpillError::Full(_))
        ));
        assert_eq!(spill.pending(), 1);
    }

    /// The database "goes away" (its table is renamed), records spill to disk, and all of them
    /// are written once it is back, without a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_made_while_the_database_is_down_are_spilled_and_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let (store, user) = sqlite_store(dir.path()).await;
        let pool = store.sqlite_pool().unwrap().clone();
        let spill_dir = dir.path().join("spill");
        let (recorder, handle) = Recorder::start(
            store.clone(),
            RecorderConfig {
                queue_capacity: 64,
                batch_size: 16,
                spill_dir: spill_dir.clone(),
                spill_max_bytes: 1 << 30,
                spill_after: Duration::from_millis(100),
                journal_dir: None,
                journal_sync: Duration::from_millis(10),
            },
        );
        sqlx::query("ALTER TABLE interceptions RENAME TO interceptions_away")
            .execute(&pool)
            .await
            .unwrap();
        // More than the queue holds: without the spill, most would be dropped.
        for _ in 0..300 {
            while !recorder.submit(record(user)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let on_disk: usize = std::fs::read_dir(&spill_dir)
            .unwrap()
            .map(|e| {
                std::fs::read_to_string(e.unwrap().path())
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum();
        assert!(on_disk > 200, "records went to disk: {on_disk}");
        sqlx::query("ALTER TABLE interceptions_away RENAME TO interceptions")
            .execute(&pool)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.count_interceptions().await.unwrap() < 300 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "spilled records written"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(recorder);
        handle.drain().await;
        assert_eq!(store.count_interceptions().await.unwrap(), 300);
        assert_eq!(children(&store).await, (300, 300, 300, 300));
        assert_eq!(std::fs::read_dir(&spill_dir).unwrap().count(), 0);
    }
}
