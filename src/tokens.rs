//! Where fencing tokens start, and the persisted ceiling that keeps them
//! increasing across restarts even if the wall clock steps back.
//!
//! Tokens count up from the start value. Without a state file the start is
//! the wall clock in microseconds, so a restart begins above every earlier
//! token as long as the clock did not step back and the server never issued
//! more than one token per microsecond on average. With a state file the
//! start is also above a ceiling reserved on disk (and fsynced) before any
//! token under it is sent, which holds whatever the clock does.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Tokens reserved per write of the state file.
pub const RESERVATION: u64 = 1_000_000;

/// The token counter's persisted ceiling.
#[derive(Debug)]
pub struct TokenStore {
    path: Option<PathBuf>,
    /// No token at or above this has been reserved on disk.
    ceiling: u64,
}

/// A state file that could not be read or written.
#[derive(Debug)]
pub struct TokenStoreError {
    path: PathBuf,
    message: String,
}

impl fmt::Display for TokenStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state file {}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for TokenStoreError {}

impl TokenStore {
    /// Opens the store and returns it with the first token to issue: above
    /// the stored ceiling (if any) and no lower than the wall clock in
    /// microseconds. With a state file a first reservation is written before
    /// this returns.
    pub fn open(path: Option<&Path>) -> Result<(TokenStore, u64), TokenStoreError> {
        let clock = clock_micros();
        let Some(path) = path else {
            let store = TokenStore {
                path: None,
                ceiling: u64::MAX,
            };
            return Ok((store, clock));
        };
        let stored = read_ceiling(path)?;
        let first = stored.unwrap_or(0).max(clock);
        let mut store = TokenStore {
            path: Some(path.to_path_buf()),
            ceiling: first,
        };
        store.reserve_from(first)?;
        Ok((store, first))
    }

    /// The state file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Makes sure every token below `next_token` is covered by the ceiling on
    /// disk. Call before sending any reply that carries such a token.
    pub fn cover(&mut self, next_token: u64) -> Result<(), TokenStoreError> {
        if next_token <= self.ceiling {
            return Ok(());
        }
        self.reserve_from(next_token)
    }

    /// Records `next_token` as the ceiling, so the next start begins right
    /// there instead of a reservation further on. For a clean shutdown.
    pub fn save_final(&mut self, next_token: u64) -> Result<(), TokenStoreError> {
        if let Some(path) = &self.path {
            write_ceiling(path, next_token)?;
            self.ceiling = next_token;
        }
        Ok(())
    }

    fn reserve_from(&mut self, next_token: u64) -> Result<(), TokenStoreError> {
        let ceiling = next_token.saturating_add(RESERVATION);
        if let Some(path) = &self.path {
            write_ceiling(path, ceiling)?;
        }
        self.ceiling = ceiling;
        Ok(())
    }
}

fn clock_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn read_ceiling(path: &Path) -> Result<Option<u64>, TokenStoreError> {
    let fail = |message: String| TokenStoreError {
        path: path.to_path_buf(),
        message,
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(format!("cannot read it: {e}"))),
    };
    let trimmed = text.trim();
    trimmed.parse::<u64>().map(Some).map_err(|_| {
        let shown: String = trimmed.chars().take(64).collect();
        fail(format!(
            "expected one decimal number (the token ceiling), found {shown:?}; \
             refusing to start rather than risk repeating a token"
        ))
    })
}

/// Replaces the file atomically and durably: write a temporary file, fsync
/// it, rename it over the old one, fsync the directory.
fn write_ceiling(path: &Path, ceiling: u64) -> Result<(), TokenStoreError> {
    let fail = |what: &str, e: io::Error| TokenStoreError {
        path: path.to_path_buf(),
        message: format!("cannot {what}: {e}"),
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = File::create(&tmp).map_err(|e| fail("create the temporary file", e))?;
    file.write_all(format!("{ceiling}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| fail("write the temporary file", e))?;
    fs::rename(&tmp, path).map_err(|e| fail("rename the temporary file into place", e))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("fsync its directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pklock-tokens-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let _ = fs::remove_file(&path);
        path
    }

    fn stored(path: &Path) -> u64 {
        fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn without_a_file_tokens_start_at_the_clock() {
        let before = clock_micros();
        let (_, first) = TokenStore::open(None).unwrap();
        assert!(first >= before && first <= clock_micros());
    }

    #[test]
    fn first_open_reserves_a_block_on_disk() {
        let path = temp_path("first");
        let (_, first) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(stored(&path), first + RESERVATION);
    }

    #[test]
    fn a_ceiling_ahead_of_the_clock_wins() {
        let path = temp_path("ahead");
        let far = clock_micros() + 10_000_000_000;
        fs::write(&path, format!("{far}\n")).unwrap();
        let (_, first) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(first, far);
    }

    #[test]
    fn cover_writes_only_when_the_ceiling_is_passed() {
        let path = temp_path("cover");
        let (mut store, first) = TokenStore::open(Some(&path)).unwrap();
        let ceiling = first + RESERVATION;
        store.cover(ceiling).unwrap();
        assert_eq!(stored(&path), ceiling);
        store.cover(ceiling + 1).unwrap();
        assert_eq!(stored(&path), ceiling + 1 + RESERVATION);
    }

    #[test]
    fn save_final_lets_the_next_start_continue_right_after() {
        let path = temp_path("final");
        let far = clock_micros() + 10_000_000_000;
        fs::write(&path, format!("{far}")).unwrap();
        let (mut store, first) = TokenStore::open(Some(&path)).unwrap();
        store.save_final(first + 42).unwrap();
        let (_, again) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(again, first + 42);
    }

    #[test]
    fn corrupt_file_is_refused() {
        let path = temp_path("corrupt");
        fs::write(&path, "not a number").unwrap();
        let e = TokenStore::open(Some(&path)).unwrap_err().to_string();
        assert!(
            e.contains("not a number") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn unwritable_location_is_reported() {
        let e = TokenStore::open(Some(Path::new("/nonexistent-dir/tokens"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/tokens"));
    }
}
