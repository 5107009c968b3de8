//! The recorder: a bounded queue between the request path and the database.
//!
//! The gateway hands each finished interception to [`Recorder::submit`], which never waits: the
//! record goes into a bounded channel, or, if the channel is full, is counted as dropped and
//! logged. A background writer takes whatever is queued (up to a batch) and writes it in one
//! transaction, so batches grow by themselves under load. A failed write is retried with backoff
//! while the batch is held; on shutdown the writer drains the queue completely before it stops.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{InterceptionRecord, Store};
use crate::config::RecorderConfig;
use crate::telemetry::metric;

/// The sending side, cloned into every request context that needs it.
#[derive(Clone, Debug)]
pub struct Recorder {
    tx: mpsc::Sender<InterceptionRecord>,
}

/// Owned by whoever started the writer; `drain` flushes everything and stops it.
pub struct RecorderHandle {
    drain: oneshot::Sender<()>,
    join: JoinHandle<()>,
}

/// How long a drain keeps retrying a database that refuses writes before giving up.
const DRAIN_RETRY_LIMIT: Duration = Duration::from_secs(15);

impl Recorder {
    /// Starts the writer on the current tokio runtime.
    pub fn start(store: Store, config: RecorderConfig) -> (Recorder, RecorderHandle) {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (drain_tx, drain_rx) = oneshot::channel();
        let join = tokio::spawn(write_loop(store, rx, drain_rx, config.batch_size));
        (
            Recorder { tx },
            RecorderHandle {
                drain: drain_tx,
                join,
            },
        )
    }

    /// Queues a record without waiting. Returns false if it had to be dropped.
    pub fn submit(&self, record: InterceptionRecord) -> bool {
        match self.tx.try_send(record) {
            Ok(()) => {
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
    store: Store,
    mut rx: mpsc::Receiver<InterceptionRecord>,
    mut drain: oneshot::Receiver<()>,
    batch_size: usize,
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut draining = false;
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
        }
        metrics::gauge!(metric::RECORDER_QUEUE_DEPTH).decrement(batch.len() as f64);
        write_with_retry(&store, &batch, draining).await;
        batch.clear();
    }
}

/// How long the writer waits for more records after the first one of a batch. One transaction
/// for many records costs far less than one each (the writer was 35-40 % of Tollgate's CPU when
/// it woke per record); 20 ms is invisible to anyone reading the API.
const LINGER: Duration = Duration::from_millis(20);

/// Lets a batch fill for up to [`LINGER`] (or until it is full).
async fn linger(
    rx: &mut mpsc::Receiver<InterceptionRecord>,
    batch: &mut Vec<InterceptionRecord>,
    batch_size: usize,
) {
    let deadline = tokio::time::Instant::now() + LINGER;
    while batch.len() < batch_size {
        match tokio::time::timeout_at(deadline, rx.recv_many(batch, batch_size - batch.len())).await
        {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

async fn write_with_retry(store: &Store, batch: &[InterceptionRecord], draining: bool) {
    let mut backoff = Duration::from_millis(50);
    let started = tokio::time::Instant::now();
    loop {
        match store.insert_interceptions(batch).await {
            Ok(()) => {
                metrics::counter!(metric::RECORDER_WRITTEN_TOTAL).increment(batch.len() as u64);
                return;
            }
            Err(e) => {
                metrics::counter!(metric::RECORDER_WRITE_ERRORS_TOTAL).increment(1);
                if draining && started.elapsed() > DRAIN_RETRY_LIMIT {
                    metrics::counter!(metric::RECORDER_DROPPED_TOTAL).increment(batch.len() as u64);
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
