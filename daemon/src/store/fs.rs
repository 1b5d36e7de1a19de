//! The one place that writes private files: an atomic, durable write of a
//! whole file with a given mode (0600 for anything secret or stateful), and
//! a private (0700) directory. The presence store, the TLS ticket keys and
//! `dev-init` all go through here.
//!
//! An atomic write goes to `<path>.tmp.<pid>` (created fresh with the final
//! mode), is fsync'd, renamed over `path`, then the directory is fsync'd: a
//! reader sees the old or the new content, never a mix, and the new content
//! survives a crash once the call returns. The pid in the temporary name
//! keeps two processes (the old and the new one of a live upgrade) from
//! writing the same temporary file. A temporary file left by a crash is
//! removed by [`remove_stale_tmp`] (or replaced by the next write of the
//! same process).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Mode of private files.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of private directories.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// A file-system operation that failed, with the path it failed on.
#[derive(Debug, Error)]
pub enum FsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state directory {path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
}

impl FsError {
    /// The operation that failed (`"create"`, `"fsync"`, ...), if it was I/O.
    pub fn op(&self) -> Option<&'static str> {
        match self {
            FsError::Io { op, .. } => Some(op),
            FsError::NotADirectory { .. } => None,
        }
    }
}

/// `map_err` adapter: an I/O error of `op` on `path`.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary file this process writes `path` through.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp.{}", std::process::id()));
    PathBuf::from(s)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Write `bytes` to `path` atomically and durably, the file getting `mode`
/// (see the module docs). On failure the temporary file is removed and
/// `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let tmp = tmp_path(path);
    remove_if_exists(&tmp)?;
    let write = || -> Result<(), FsError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // The umask can only narrow `mode`; make it exact.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent_dir(path))
}

/// [`write_atomic`] with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_atomic(path, bytes, PRIVATE_FILE_MODE)
}

/// Create `dir` (and missing parents) with mode 0700, or tighten an existing
/// directory that is open to group or others to 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<(), FsError> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(FsError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                    .map_err(io_err("chmod 0700", dir))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(PRIVATE_DIR_MODE)
                .create(dir)
                .map_err(io_err("create directory", dir))?;
        }
        Err(e) => return Err(io_err("stat", dir)(e)),
    }
    Ok(())
}

/// fsync a directory (after a rename or removal in it).
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// The whole content of `path`, or `None` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    match File::open(path) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map_err(io_err("read", path))?;
            Ok(Some(b))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("open", path)(e)),
    }
}

/// Remove `path`; a missing file is fine.
pub fn remove_if_exists(path: &Path) -> Result<(), FsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Move an untrusted file aside as `<name>.corrupt` (replacing an older
/// one). Returns where it went, or `None` if there was no file.
pub fn move_aside(path: &Path) -> Result<Option<PathBuf>, FsError> {
    let mut s = path.as_os_str().to_owned();
    s.push(".corrupt");
    let aside = PathBuf::from(s);
    match fs::rename(path, &aside) {
        Ok(()) => Ok(Some(aside)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("move aside", path)(e)),
    }
}

/// Remove temporary files a crash left behind for `path`: `<path>.tmp` and
/// `<path>.tmp.<pid>` of any process. Call it only while no other process
/// writes `path`.
pub fn remove_stale_tmp(path: &Path) -> Result<(), FsError> {
    let dir = parent_dir(path);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let plain = format!("{name}.tmp");
    let numbered = format!("{name}.tmp.");
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list directory", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list directory", dir))?;
        let file_name = entry.file_name();
        let Some(n) = file_name.to_str() else {
            continue;
        };
        let stale = n == plain
            || n.strip_prefix(&numbered)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if stale {
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_is_private_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        write_atomic(&p, b"three", 0o644).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
    }

    #[test]
    fn failed_write_leaves_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_private(&p, b"old").unwrap();
        // Renaming over a directory fails.
        let dir_target = d.path().join("sub");
        fs::create_dir(&dir_target).unwrap();
        fs::write(dir_target.join("x"), b"").unwrap();
        let e = write_private(&dir_target, b"new").unwrap_err();
        assert_eq!(e.op(), Some("rename into place"));
        assert!(!tmp_path(&dir_target).exists());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn private_dir_is_created_or_tightened() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let file = d.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            ensure_private_dir(&file),
            Err(FsError::NotADirectory { .. })
        ));
    }

    #[test]
    fn stale_temporary_files_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("shard-1.snap");
        for n in [
            "shard-1.snap.tmp",
            "shard-1.snap.tmp.42",
            "shard-1.snap.tmp.x",
        ] {
            fs::write(d.path().join(n), b"half").unwrap();
        }
        remove_stale_tmp(&p).unwrap();
        assert!(!d.path().join("shard-1.snap.tmp").exists());
        assert!(!d.path().join("shard-1.snap.tmp.42").exists());
        assert!(d.path().join("shard-1.snap.tmp.x").exists(), "not ours");
        assert_eq!(read_optional(&p).unwrap(), None);
        assert_eq!(move_aside(&p).unwrap(), None);
    }
}
