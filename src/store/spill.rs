//! The recorder's overflow on disk: interceptions that could not be written because the
//! database was down, kept as JSON lines in `recorder.spill_dir` until it is back.
//!
//! Files are appended to and fsynced batch by batch, rotated at [`FILE_LIMIT`], and replayed
//! oldest first; a file is deleted only after all its records are committed. Replaying is safe
//! to repeat (the batch insert skips interceptions already present), so a crash between commit
//! and delete duplicates nothing. Files left by an earlier run are replayed after a restart.
//!
//! The files hold whole interceptions (prompts, tool calls, thoughts), so the directory is made
//! `0700` and every file `0600` ([`crate::private_files`]); files an older version left with
//! looser modes are tightened when found.
//!
//! Not here: deciding when to spill (the recorder) or writing to the database (record).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::InterceptionRecord;

/// A spill file is closed and a new one started past this size.
const FILE_LIMIT: u64 = 64 * 1024 * 1024;

/// The spill directory and what is in it.
#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first; the last one is appended to.
    files: VecDeque<(PathBuf, u64)>,
    records: u64,
    seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill directory full ({0} bytes, recorder.spill_max_bytes)")]
    Full(u64),
    #[error("spill file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> SpillError {
    SpillError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Spill {
    /// Opens `dir` (created if missing) and finds the files an earlier run left. `max_bytes` 0
    /// turns spilling off.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spill, SpillError> {
        let mut spill = Spill {
            dir: dir.to_path_buf(),
            max_bytes,
            files: VecDeque::new(),
            records: 0,
            seq: 0,
        };
        if max_bytes == 0 || !dir.exists() {
            return Ok(spill);
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let entry = entry.map_err(|e| io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("spill-") && name.ends_with(".jsonl") {
                crate::private_files::restrict(&entry.path()).map_err(|e| io(&entry.path(), e))?;
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                found.push((entry.path(), len));
            }
        }
        // Names carry a zero-padded timestamp and sequence, so name order is write order.
        found.sort();
        for (path, len) in found {
            spill.records += count_lines(&path);
            spill.files.push_back((path, len));
        }
        Ok(spill)
    }

    /// A spill that never takes anything (the directory could not be opened).
    pub fn disabled() -> Spill {
        Spill {
            dir: PathBuf::new(),
            max_bytes: 0,
            files: VecDeque::new(),
            records: 0,
            seq: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// Records waiting on disk.
    pub fn pending(&self) -> u64 {
        self.records
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }

    /// Appends `batch` and fsyncs it: once this returns Ok the records survive a crash.
    pub fn append(&mut self, batch: &[InterceptionRecord]) -> Result<(), SpillError> {
        let mut buf = Vec::with_capacity(batch.len() * 1024);
        for r in batch {
            serde_json::to_writer(&mut buf, r).expect("records serialise");
            buf.push(b'\n');
        }
        let total = self.bytes();
        if total + buf.len() as u64 > self.max_bytes {
            return Err(SpillError::Full(total));
        }
        let rotate = self
            .files
            .back()
            .is_none_or(|(_, len)| *len + buf.len() as u64 > FILE_LIMIT);
        if rotate {
            crate::private_files::create_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
            self.seq += 1;
            let name = format!(
                "spill-{:016}-{:06}.jsonl",
                chrono::Utc::now().timestamp_millis(),
                self.seq
            );
            self.files.push_back((self.dir.join(name), 0));
        }
        let (path, len) = self.files.back_mut().expect("a current file");
        let mut file = crate::private_files::append(path).map_err(|e| io(path, e))?;
        file.write_all(&buf).map_err(|e| io(path, e))?;
        file.sync_data().map_err(|e| io(path, e))?;
        *len += buf.len() as u64;
        self.records += batch.len() as u64;
        Ok(())
    }

    /// The oldest file's records, to be written before [`Spill::pop`] deletes it. Lines that do
    /// not parse (a write cut by a crash) are skipped and counted in the second value.
    pub fn oldest(&self) -> Option<Result<(Vec<InterceptionRecord>, u64), SpillError>> {
        let (path, _) = self.files.front()?;
        Some(read_records(path))
    }

    /// Deletes the oldest file after its records were committed.
    pub fn pop(&mut self, records: u64) -> Result<(), SpillError> {
        if let Some((path, _)) = self.files.pop_front() {
            self.records = self.records.saturating_sub(records);
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
        Ok(())
    }
}

fn read_records(path: &Path) -> Result<(Vec<InterceptionRecord>, u64), SpillError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut records = Vec::new();
    let mut bad = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| io(path, e))?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<InterceptionRecord>(&line) {
            Ok(r) => records.push(r),
            Err(_) => bad += 1,
        }
    }
    Ok((records, bad))
}

fn count_lines(path: &Path) -> u64 {
    match File::open(path) {
        Ok(f) => BufReader::new(f)
            .split(b'\n')
            .map_while(Result::ok)
            .filter(|l| !l.is_empty())
            .count() as u64,
        Err(_) => 0,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::private_files::mode;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn spill_files_are_the_owners_alone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spill");
        let mut spill = Spill::open(&dir, 1 << 20).unwrap();
        spill.append(&[]).unwrap();
        assert_eq!(mode(&dir).unwrap(), 0o700);
        let (file, _) = spill.files.back().unwrap().clone();
        assert_eq!(mode(&file).unwrap(), 0o600);

        // A file an older version left readable is tightened when the spill is opened again.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        Spill::open(&dir, 1 << 20).unwrap();
        assert_eq!(mode(&file).unwrap(), 0o600);
    }
}
