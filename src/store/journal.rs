//! The spend journal: every settled interception, written to disk before the client has the
//! end of its answer, so a hard kill cannot lose spend that was served.
//!
//! The recorder queues records in memory and writes them in batches; a `SIGKILL` loses what is
//! queued, and with it the spend that caps are counted from. So when the gateway settles an
//! interception (prices and charges it, before it writes the response's final bytes), it also
//! appends the record, without prompt, tool calls or thoughts, as one JSON line to the current
//! segment of `recorder.journal_dir` ([`SpendJournal::append`]: one `write(2)` to a file opened
//! with `O_APPEND`, so lines from concurrent requests never interleave). The page cache keeps
//! what was written when the process dies; a background thread `fdatasync`s the segment every
//! `recorder.journal_sync_ms` (10 ms) so a power loss or kernel crash loses at most that much.
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

use parking_lot::{Mutex, RwLock};

use super::recorder::RecorderProgress;
use super::{InterceptionRecord, Store, StoreError};

/// A segment is closed and a new one started after this long.
const ROTATE_AFTER: Duration = Duration::from_secs(60);
/// … or past this size.
const ROTATE_BYTES: u64 = 64 << 20;
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
    /// Written since the last `fdatasync`.
    dirty: AtomicBool,
    next_seq: AtomicU64,
    retiring: Mutex<Vec<Retiring>>,
    /// Held for the process's life: one journal directory per process.
    _lock: File,
}

struct Segment {
    file: File,
    path: PathBuf,
    opened: Instant,
    bytes: AtomicU64,
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
                dirty: AtomicBool::new(false),
                next_seq: AtomicU64::new(next_seq + 1),
                retiring: Mutex::new(Vec::new()),
                _lock: lock,
            },
            recovery,
        ))
    }

    /// Appends one settled interception (see the module docs), given without its prompt, tool
    /// calls and thoughts. Never fails the request: an error is logged and counted, and the
    /// interception is still recorded the normal way.
    pub fn append(&self, record: &InterceptionRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a journal line");
                return;
            }
        };
        line.push(b'\n');
        let segment = self.current.read().clone();
        // One write of the whole line: with O_APPEND the kernel places it atomically.
        match (&segment.file).write(&line) {
            Ok(n) if n == line.len() => {
                segment.bytes.fetch_add(n as u64, Ordering::Relaxed);
                self.dirty.store(true, Ordering::Release);
            }
            Ok(n) => {
                tracing::error!(written = n, len = line.len(), path = %segment.path.display(), "short write to the spend journal")
            }
            Err(e) => {
                metrics::counter!(crate::telemetry::metric::JOURNAL_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %e, path = %segment.path.display(), "cannot write the spend journal");
            }
        }
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

    /// `fdatasync`s the current segment if anything was written since the last one.
    pub fn sync(&self) {
        if self.dirty.swap(false, Ordering::AcqRel) {
            let segment = self.current.read().clone();
            if let Err(e) = segment.file.sync_data() {
                metrics::counter!(crate::telemetry::metric::JOURNAL_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %e, "cannot sync the spend journal");
            }
        }
    }

    fn upkeep(&self, slack: Duration, progress: &RecorderProgress) {
        let rotate = {
            let segment = self.current.read();
            segment.opened.elapsed() >= ROTATE_AFTER
                || segment.bytes.load(Ordering::Relaxed) >= ROTATE_BYTES
        };
        if rotate {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            match Segment::create(&self.dir, seq) {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut *self.current.write(), Arc::new(fresh));
                    // Lines written to the old segment after the last sync are synced now.
                    let _ = old.file.sync_data();
                    self.retiring.lock().push(Retiring {
                        path: old.path.clone(),
                        closed: Instant::now(),
                        submitted_mark: None,
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot start a new spend journal segment"),
            }
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
    fn create(dir: &Path, seq: u64) -> Result<Segment, JournalError> {
        let path = dir.join(format!("journal-{seq:016}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        Ok(Segment {
            file,
            path,
            opened: Instant::now(),
            bytes: AtomicU64::new(0),
        })
    }
}

/// Reads one segment: its records (marked as recovered), and how many lines were unreadable.
fn read_segment(path: &Path) -> Result<(Vec<InterceptionRecord>, u64), JournalError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut records = Vec::new();
    let mut unreadable = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| io(path, e))?;
        if line.is_empty() {
            continue;
        }
        let mut value: serde_json::Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(_) => {
                unreadable += 1;
                continue;
            }
        };
        if let Some(fields) = value.as_object_mut() {
            let error = fields.entry("error").or_insert(serde_json::Value::Null);
            if error.is_null() {
                *error = serde_json::Value::String(RECOVERED.into());
            }
        }
        match serde_json::from_value::<InterceptionRecord>(value) {
            Ok(record) => records.push(record),
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
    fn segment_names_sort_in_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Segment::create(dir.path(), 9).unwrap();
        let b = Segment::create(dir.path(), 10).unwrap();
        assert!(a.path < b.path);
        assert_eq!(segment_seq(&b.path), Some(10));
        assert_eq!(segment_seq(Path::new("LOCK")), None);
        let mode = std::fs::metadata(&a.path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
