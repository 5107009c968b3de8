//! The spend journal: every settled interception, written to disk before the client has the
//! end of its answer, so a hard kill cannot lose spend that was served.
//!
//! The recorder queues records in memory and writes them in batches; a `SIGKILL` loses what is
//! queued, and with it the spend that caps are counted from. So when the gateway settles an
//! interception (prices and charges it, before it writes the response's final bytes), it also
//! appends the record, without prompt, tool calls or thoughts, as one JSON line to the current
//! segment of `recorder.journal_dir` ([`SpendJournal::append`]).
//!
//! A segment is a file of [`SEGMENT_BYTES`], written full of zeros when it is made (by the
//! background thread, ahead of need) and mapped shared into memory. Appending reserves a range
//! with one atomic add and copies the line into the mapping: no system call per record, and the
//! page cache holds the bytes the moment they are copied, so they outlive the process. A
//! background thread `msync`s the mapping every `recorder.journal_sync_ms` (10 ms), so a power
//! loss or kernel crash loses at most that much. Because the file's blocks and size never
//! change after it was made, a sync writes data pages only. (Measured alternatives, each
//! dearer per request: a `write(2)` per record to an `O_APPEND` file, whose syncs also commit
//! its growing size, and a `pwrite(2)` per record into a preallocated file.) The directory
//! belongs on a file system that overwrites in place (ext4, XFS): on a copy-on-write one a full
//! disk could fail a write to the mapping.
//!
//! At start ([`SpendJournal::open`]) the segments an earlier run left are read and their
//! records inserted (the batch insert skips interceptions already recorded), which restores
//! their spend before budgets are loaded; then the segments are deleted. While running,
//! segments rotate every minute and are deleted once the recorder has written (or spilled)
//! every record submitted before then, after a slack that covers the time between settling
//! and submitting (a slow client's last writes).
//!
//! Bounds: a `SIGKILL` loses no settled spend; a crash of the machine loses at most the last
//! `journal_sync_ms` of settlements. A record the recorder dropped (full queue) is restored
//! only if the process stops before its segment is deleted.
//!
//! Not here: the recorder (`recorder`), spilled records (`spill`), or deciding what a request
//! cost (`governance`).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapRaw;
use parking_lot::{Mutex, RwLock};

use super::recorder::RecorderProgress;
use super::{InterceptionRecord, Store, StoreError};

/// A segment is closed and a new one started after this long, or when it is full.
const ROTATE_AFTER: Duration = Duration::from_secs(60);
/// A segment's size: ~20,000 records; at 10,000 requests a second one lasts two seconds.
pub const SEGMENT_BYTES: usize = 16 << 20;
/// What a recovered record says of itself.
pub const RECOVERED: &str =
    "recovered from the spend journal after an unclean stop: prompt, tool calls and thoughts were not kept";
/// Records inserted per statement batch during recovery.
const RECOVERY_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("journal directory {0} is in use by another Tollgate process")]
    Locked(String),
    #[error("writing recovered spend to the database: {0}")]
    Store(#[from] StoreError),
}

fn io(path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What recovery found and restored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Records read from earlier segments (one per settled interception).
    pub records: u64,
    /// Lines that could not be read (a line cut by the crash).
    pub unreadable: u64,
}

/// See the module docs.
pub struct SpendJournal {
    dir: PathBuf,
    current: RwLock<Arc<Segment>>,
    /// The next segment, made ahead by the background thread so a full segment is swapped out
    /// without waiting for a file to be written.
    standby: Mutex<Option<Segment>>,
    /// Serialises swapping a full segment out.
    rotating: Mutex<()>,
    /// Written since the last sync.
    dirty: AtomicBool,
    next_seq: AtomicU64,
    retiring: Mutex<Vec<Retiring>>,
    /// Held for the process's life: one journal directory per process.
    _lock: File,
}

struct Segment {
    map: MmapRaw,
    path: PathBuf,
    opened: Instant,
    /// The next free byte; may run past the end (the appends that did then rotate).
    cursor: AtomicU64,
}

/// A closed segment waiting until its records are all in the database.
struct Retiring {
    path: PathBuf,
    closed: Instant,
    /// Records submitted to the recorder once the slack had passed: when that many have been
    /// written, every record of the segment has.
    submitted_mark: Option<u64>,
}

impl SpendJournal {
    /// Opens `dir` (created 0700), takes its lock, restores the spend of segments an earlier run
    /// left (inserting their records into `store`) and deletes them, then starts a new segment.
    pub async fn open(dir: &Path, store: &Store) -> Result<(SpendJournal, Recovery), JournalError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io(dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        if !try_lock_exclusive(&lock) {
            return Err(JournalError::Locked(dir.display().to_string()));
        }
        let mut earlier = segments(dir)?;
        earlier.sort();
        let mut recovery = Recovery::default();
        for path in &earlier {
            let (records, unreadable) = read_segment(path)?;
            recovery.records += records.len() as u64;
            recovery.unreadable += unreadable;
            for chunk in records.chunks(RECOVERY_BATCH) {
                store.insert_interceptions(chunk).await?;
            }
        }
        for path in &earlier {
            std::fs::remove_file(path).map_err(|e| io(path, e))?;
        }
        let next_seq = earlier
            .last()
            .and_then(|p| segment_seq(p))
            .map_or(0, |s| s + 1);
        let first = Segment::create(dir, next_seq)?;
        Ok((
            SpendJournal {
                dir: dir.to_path_buf(),
                current: RwLock::new(Arc::new(first)),
                standby: Mutex::new(None),
                rotating: Mutex::new(()),
                dirty: AtomicBool::new(false),
                next_seq: AtomicU64::new(next_seq + 1),
                retiring: Mutex::new(Vec::new()),
                _lock: lock,
            },
            recovery,
        ))
    }

    /// Appends one settled interception (see the module docs). Never fails the request: an
    /// error is logged and counted, and the interception is still recorded the normal way.
    pub fn append(&self, entry: &JournalEntry<&str>) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a journal line");
                return;
            }
        };
        line.push(b'\n');
        if line.len() > SEGMENT_BYTES / 64 {
            tracing::error!(
                len = line.len(),
                "a journal line is too long; not journaled"
            );
            return;
        }
        // A full segment is swapped out once; a second failure is a disk that refuses writes.
        for _ in 0..2 {
            let segment = self.current.read().clone();
            if segment.write(&line) {
                self.dirty.store(true, Ordering::Release);
                return;
            }
            if !self.rotate_full(&segment) {
                break;
            }
        }
        metrics::counter!(crate::telemetry::metric::JOURNAL_ERRORS_TOTAL).increment(1);
    }

    /// Swaps `full` out for the standby segment (made now if there is none); false when no
    /// new segment could be made.
    fn rotate_full(&self, full: &Arc<Segment>) -> bool {
        let _one_at_a_time = self.rotating.lock();
        if !Arc::ptr_eq(&self.current.read(), full) {
            return true; // another append rotated it meanwhile
        }
        let fresh = match self.standby.lock().take() {
            Some(ready) => ready,
            None => match Segment::create(&self.dir, self.next_seq.fetch_add(1, Ordering::Relaxed))
            {
                Ok(made) => made,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a new spend journal segment");
                    return false;
                }
            },
        };
        self.retire(std::mem::replace(
            &mut *self.current.write(),
            Arc::new(fresh),
        ));
        true
    }

    fn retire(&self, old: Arc<Segment>) {
        // Lines written to the old segment since the last sync are synced now.
        if let Err(e) = old.map.flush() {
            tracing::error!(error = %e, "cannot sync a spend journal segment");
        }
        self.retiring.lock().push(Retiring {
            path: old.path.clone(),
            closed: Instant::now(),
            submitted_mark: None,
        });
    }

    /// Starts the thread that syncs every `sync_every`, rotates segments and deletes the ones
    /// whose records the recorder has written. `slack` covers settle-to-submit delays.
    pub fn start_upkeep(
        self: &Arc<Self>,
        sync_every: Duration,
        slack: Duration,
        progress: RecorderProgress,
    ) -> std::io::Result<()> {
        let journal = Arc::clone(self);
        std::thread::Builder::new()
            .name("tollgate-journal".into())
            .spawn(move || loop {
                std::thread::sleep(sync_every);
                journal.sync();
                journal.upkeep(slack, &progress);
            })
            .map(|_| ())
    }

    /// Syncs the current segment to disk if anything was written since the last sync.
    pub fn sync(&self) {
        if self.dirty.swap(false, Ordering::AcqRel) {
            let segment = self.current.read().clone();
            if let Err(e) = segment.map.flush() {
                metrics::counter!(crate::telemetry::metric::JOURNAL_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %e, "cannot sync the spend journal");
            }
        }
    }

    fn upkeep(&self, slack: Duration, progress: &RecorderProgress) {
        if self.standby.lock().is_none() {
            match Segment::create(&self.dir, self.next_seq.fetch_add(1, Ordering::Relaxed)) {
                Ok(made) => *self.standby.lock() = Some(made),
                Err(e) => tracing::error!(error = %e, "cannot prepare a spend journal segment"),
            }
        }
        let stale = {
            let segment = self.current.read();
            segment.opened.elapsed() >= ROTATE_AFTER
        };
        if stale {
            let current = self.current.read().clone();
            self.rotate_full(&current);
        }
        let (submitted, processed) = progress.counts();
        self.retiring.lock().retain_mut(|r| {
            if r.submitted_mark.is_none() && r.closed.elapsed() >= slack {
                r.submitted_mark = Some(submitted);
            }
            match r.submitted_mark {
                Some(mark) if processed >= mark => match std::fs::remove_file(&r.path) {
                    Ok(()) => false,
                    Err(e) => {
                        tracing::warn!(error = %e, path = %r.path.display(), "cannot delete a spend journal segment");
                        true
                    }
                },
                _ => true,
            }
        });
    }
}

impl Segment {
    /// A new segment file of [`SEGMENT_BYTES`] zeros (written, so its blocks exist and later
    /// syncs change no metadata).
    fn create(dir: &Path, seq: u64) -> Result<Segment, JournalError> {
        let path = dir.join(format!("journal-{seq:016}.jsonl"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..SEGMENT_BYTES / zeros.len() {
            file.write_all(&zeros).map_err(|e| io(&path, e))?;
        }
        file.sync_all().map_err(|e| io(&path, e))?;
        let map = MmapRaw::map_raw(&file).map_err(|e| io(&path, e))?;
        Ok(Segment {
            map,
            path,
            opened: Instant::now(),
            cursor: AtomicU64::new(0),
        })
    }

    /// Copies `line` into a range of its own; false when the segment is full.
    fn write(&self, line: &[u8]) -> bool {
        let at = self.cursor.fetch_add(line.len() as u64, Ordering::Relaxed);
        if at.saturating_add(line.len() as u64) > self.map.len() as u64 {
            return false;
        }
        // SAFETY: [at, at + len) lies inside the mapping (checked above) and belongs to this
        // call alone: the atomic add hands out disjoint ranges, and nothing else writes the map.
        unsafe {
            std::ptr::copy_nonoverlapping(
                line.as_ptr(),
                self.map.as_mut_ptr().add(at as usize),
                line.len(),
            );
        }
        true
    }
}

/// One settled interception as the journal keeps it: the record without its text (prompt, tool
/// calls, thoughts), ids as pairs of integers and times as milliseconds, so that writing one costs a few
/// thousand instructions rather than the record's own (string-formatted) serialization. `S` is
/// `&str` when the gateway writes it (borrowing what it holds) and `String` when it is read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JournalEntry<S> {
    pub id: Id,
    pub user_id: Id,
    pub api_key_id: Option<Id>,
    pub provider: S,
    pub provider_kind: S,
    pub endpoint: S,
    pub model: S,
    pub response_model: Option<S>,
    pub client: S,
    pub client_session_id: Option<S>,
    pub session_key: S,
    pub thread_parent_id: Option<Id>,
    pub thread_root_id: Option<Id>,
    pub credential_kind: crate::store::CredentialKind,
    pub credential_hint: Option<S>,
    pub status: crate::store::InterceptionStatus,
    pub upstream_status: Option<u16>,
    pub error: Option<S>,
    pub streaming: bool,
    pub started_ms: i64,
    pub ended_ms: i64,
    pub ttfb_ms: Option<u64>,
    pub response_id: Option<S>,
    pub usage: crate::providers::TokenUsage,
    pub usage_source: crate::providers::UsageSource,
    pub cost: i64,
    pub price: Option<crate::money::ModelPrice>,
    pub spend_period_ms: i64,
    pub shared_reservation: Option<Id>,
}

/// A uuid as two integers: formatted with 64-bit arithmetic, where one 128-bit integer costs a
/// division per digit.
pub type Id = (u64, u64);

fn uuid_of((high, low): Id) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(high, low)
}

impl JournalEntry<String> {
    /// The record this entry restores, marked as recovered (its text was never journaled).
    fn into_record(self) -> InterceptionRecord {
        let time = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms).unwrap_or(chrono::DateTime::UNIX_EPOCH)
        };
        InterceptionRecord {
            id: uuid_of(self.id),
            user_id: uuid_of(self.user_id),
            api_key_id: self.api_key_id.map(uuid_of),
            provider: self.provider,
            provider_kind: super::record::intern(self.provider_kind),
            endpoint: super::record::intern(self.endpoint),
            model: self.model,
            response_model: self.response_model,
            client: super::record::intern(self.client),
            client_session_id: self.client_session_id,
            session_key: self.session_key,
            thread_parent_id: self.thread_parent_id.map(uuid_of),
            thread_root_id: self.thread_root_id.map(uuid_of),
            credential_kind: self.credential_kind,
            credential_hint: self.credential_hint,
            status: self.status,
            upstream_status: self.upstream_status,
            error: Some(self.error.unwrap_or_else(|| RECOVERED.to_string())),
            streaming: self.streaming,
            started_at: time(self.started_ms),
            ended_at: time(self.ended_ms),
            ttfb_ms: self.ttfb_ms,
            response_id: self.response_id,
            usage: self.usage,
            usage_source: self.usage_source,
            prompt: None,
            tool_calls: Vec::new(),
            thoughts: Vec::new(),
            cost: crate::money::NanoUsd(self.cost),
            price: self.price,
            spend_period_start: time(self.spend_period_ms),
            shared_reservation: self.shared_reservation.map(uuid_of),
        }
    }
}

/// Reads one segment: its records (marked as recovered), and how many lines were unreadable.
fn read_segment(path: &Path) -> Result<(Vec<InterceptionRecord>, u64), JournalError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut records = Vec::new();
    let mut unreadable = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| io(path, e))?;
        // The unwritten rest of a segment is zeros; so is a range whose copy a kill cut short.
        let line: Vec<u8> = line.into_iter().filter(|b| *b != 0).collect();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<JournalEntry<String>>(&line) {
            Ok(entry) => records.push(entry.into_record()),
            Err(_) => unreadable += 1,
        }
    }
    Ok((records, unreadable))
}

fn segments(dir: &Path) -> Result<Vec<PathBuf>, JournalError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        if segment_seq(&entry.path()).is_some() {
            found.push(entry.path());
        }
    }
    Ok(found)
}

fn segment_seq(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("journal-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// `flock(LOCK_EX | LOCK_NB)`: a second process on the same directory would delete segments
/// the first still needs.
fn try_lock_exclusive(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn flock(fd: i32, operation: i32) -> i32;
    }
    const LOCK_EX: i32 = 2;
    const LOCK_NB: i32 = 4;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for this call.
    unsafe { flock(file.as_raw_fd(), LOCK_EX | LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_the_record_it_was_written_from_without_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let segment = Segment::create(dir.path(), 0).unwrap();
        let id = uuid::Uuid::now_v7();
        let entry = JournalEntry {
            id: id.as_u64_pair(),
            user_id: (0, 7),
            api_key_id: Some((0, 8)),
            provider: "open\"ai",
            provider_kind: "openai",
            endpoint: "chat_completions",
            model: "gpt-4o",
            response_model: Some("gpt-4o-2024-08-06"),
            client: "Claude Code",
            client_session_id: Some("s-1"),
            session_key: "u:s-1",
            thread_parent_id: None,
            thread_root_id: Some((1, 9)),
            credential_kind: crate::store::CredentialKind::Central,
            credential_hint: Some("sk-…abcd"),
            status: crate::store::InterceptionStatus::Completed,
            upstream_status: Some(200),
            error: None,
            streaming: true,
            started_ms: 1_765_000_000_000,
            ended_ms: 1_765_000_000_123,
            ttfb_ms: Some(5),
            response_id: Some("chatcmpl-1"),
            usage: crate::providers::TokenUsage {
                input: 1,
                output: 2,
                cache_read: 3,
                cache_write: 4,
                reasoning: 1,
            },
            usage_source: crate::providers::UsageSource::Estimated,
            cost: 14_205_000,
            price: None,
            spend_period_ms: 1_764_547_200_000,
            shared_reservation: None,
        };
        let mut line = serde_json::to_vec(&entry).unwrap();
        line.push(b'\n');
        assert!(segment.write(&line));
        assert!(segment.write(b"{\"cut\": \n"), "a line a kill cut short");
        assert!(segment.write(&line));
        let (records, unreadable) = read_segment(&segment.path).unwrap();
        assert_eq!((records.len(), unreadable), (2, 1));
        let r = &records[0];
        assert_eq!(r.id, id);
        assert_eq!(
            (r.provider.as_str(), r.client, r.model.as_str()),
            ("open\"ai", "Claude Code", "gpt-4o")
        );
        assert_eq!(r.session_key, "u:s-1");
        assert_eq!(r.usage, entry.usage);
        assert_eq!(r.usage_source, crate::providers::UsageSource::Estimated);
        assert_eq!(r.cost, crate::money::NanoUsd(14_205_000));
        assert_eq!(r.ended_at.timestamp_millis(), 1_765_000_000_123);
        assert_eq!(r.error.as_deref(), Some(RECOVERED));
        assert!(r.prompt.is_none() && r.tool_calls.is_empty());
    }

    #[test]
    fn segment_names_sort_in_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Segment::create(dir.path(), 9).unwrap();
        let b = Segment::create(dir.path(), 10).unwrap();
        assert!(a.write(b"{}\n"));
        assert!(
            !a.write(&vec![b'x'; SEGMENT_BYTES]),
            "no room: the caller rotates"
        );
        assert!(a.path < b.path);
        assert_eq!(segment_seq(&b.path), Some(10));
        assert_eq!(segment_seq(Path::new("LOCK")), None);
        let mode = std::fs::metadata(&a.path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
