//! Files that hold records or secrets (the SQLite database, the recorder's spill files): created
//! readable by their owner only (files `0600`, directories `0700`) from their first byte, and
//! refused when an existing one is open to group or others.
//!
//! Creating with the mode (rather than `chmod` after) leaves no moment in which another user
//! could open the file. Nothing here depends on the process umask, which a service manager may
//! set to anything.
//!
//! Not here: the secrets' own files (`tls::ca` writes the CA key, `governance::keyvault` the
//! vault secret; both follow the same rule), or what goes into any file.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Permission bits that let anyone but the owner in.
const OTHERS: u32 = 0o077;

/// An existing file group or others can open.
#[derive(Debug, thiserror::Error)]
#[error("{} has mode {mode:o}: group or others can open it; chmod 600 it (and chmod 700 its directory)", path.display())]
pub struct TooOpen {
    pub path: PathBuf,
    pub mode: u32,
}

/// Creates `dir` and any missing parents, each new one with mode `0700`.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Creates `path` empty with mode `0600` unless it exists (then it is left as it is).
pub fn create_empty(path: &Path) -> io::Result<()> {
    match owner_only().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` for appending, creating it with mode `0600` when missing.
pub fn append(path: &Path) -> io::Result<File> {
    owner_only().create(true).append(true).open(path)
}

/// The permission bits (`0o777`) of `path`.
pub fn mode(path: &Path) -> io::Result<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).map(|_| 0o600)
    }
}

/// Refuses `path` when group or others have any permission on it. A missing file passes.
pub fn check(path: &Path) -> Result<(), TooOpen> {
    match mode(path) {
        Ok(mode) if mode & OTHERS != 0 => Err(TooOpen {
            path: path.to_path_buf(),
            mode,
        }),
        _ => Ok(()),
    }
}

/// Takes group and others' permissions off a file Tollgate itself made (an older version made
/// them with the process umask).
pub fn restrict(path: &Path) -> io::Result<()> {
    let mode = mode(path)?;
    #[cfg(unix)]
    if mode & OTHERS != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !OTHERS))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(())
}

fn owner_only() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        super::mode(path).unwrap()
    }

    #[test]
    fn new_files_and_directories_are_owner_only_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        let db = nested.join("t.db");
        create_empty(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        let log = nested.join("spill.jsonl");
        drop(append(&log).unwrap());
        assert_eq!(mode(&log), 0o600);
        check(&db).unwrap();
    }

    #[test]
    fn files_others_can_open_are_refused_and_can_be_restricted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        std::fs::write(&path, b"").unwrap();
        for m in [0o644, 0o640, 0o604, 0o660, 0o602, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
            let err = check(&path).unwrap_err();
            assert_eq!(err.mode, m);
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        restrict(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        check(&path).unwrap();
        check(&dir.path().join("missing")).unwrap();
    }
}
