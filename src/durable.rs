//! Small private files replaced whole and durably: a crash leaves the old
//! one or the new one, never a half. Shared by the state file and the grant
//! key; knows nothing of what they hold.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The directory `path` is in (`.` for a bare file name).
pub fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` (mode 0600): to a temporary file beside it,
/// fsynced, renamed over `path`, then the directory fsynced. A failure says
/// which step failed. A link planted at the temporary path is removed, never
/// followed.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), (&'static str, io::Error)> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A file left by a crash, or planted: removing it removes a symlink
    // itself, never its target, and create_new refuses to follow one.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(("remove an old temporary file", e));
        }
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| ("create the temporary file", e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| ("write the temporary file", e))?;
    fs::rename(&tmp, path).map_err(|e| ("rename the temporary file into place", e))?;
    File::open(directory_of(path))
        .and_then(|d| d.sync_all())
        .map_err(|e| ("fsync its directory", e))
}
