//! The state file: the fencing-token ceiling that keeps tokens increasing
//! across restarts even if the wall clock steps back, and, after a clean
//! stop, the locks that were held then (for their holders to reclaim).
//!
//! Tokens count up from the start value. Without a state file the start is
//! the wall clock in microseconds, so a restart begins above every earlier
//! token as long as the clock did not step back and the server never issued
//! more than one token per microsecond on average. With a state file the
//! start is also above a ceiling reserved on disk (and fsynced) before any
//! token under it is sent, which holds whatever the clock does.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use log::warn;

use crate::durable;
use crate::lock_table::Mode;
use crate::state_location;

/// The largest token: above 2^53, JSON readers that hold numbers as doubles
/// (JavaScript, and PHP on overflow) would round tokens together.
pub const MAX_TOKEN: u64 = 1 << 53;

/// Tokens reserved per write of the state file.
pub const RESERVATION: u64 = 1_000_000;

/// Second line of the state file after a clean stop with no lock held.
const HELD_NOTHING: &str = "stopped-holding-nothing";
/// Second line of the state file after a clean stop with locks held: this,
/// a space and their count; one JSON [`HeldLock`] per line follows.
const HELD_SOME: &str = "stopped-holding";

/// A grant in force when the server stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldLock {
    /// The lock's name.
    pub lock_name: String,
    /// How it was held.
    pub mode: Mode,
    /// The grant's fencing token.
    pub token: u64,
}

/// What the state file says of the run before this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreviousRun {
    /// There was none: no state file yet.
    None,
    /// It ended without saying what it held (killed or crashed), or there is
    /// no state file to say: any lock may still be believed held.
    Unknown,
    /// It stopped cleanly, and these were all the grants in force.
    Stopped(Vec<HeldLock>),
}

/// The token counter's persisted ceiling.
#[derive(Debug)]
pub struct TokenStore {
    path: Option<PathBuf>,
    /// Held open, locked, while this server uses the state file, so that
    /// no second server takes the same file (their ceilings would cross).
    _in_use: Option<File>,
    /// No token at or above this has been reserved on disk.
    ceiling: u64,
    previous: PreviousRun,
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
                _in_use: None,
                ceiling: u64::MAX,
                previous: PreviousRun::Unknown,
            };
            return Ok((store, clock));
        };
        let in_use = claim(path)?;
        let (ceiling, previous) = match read_state(path)? {
            Some(stored) => (stored.ceiling, stored.previous),
            None => match state_beside(path) {
                // Another default state file here: a server ran in this
                // place under another port (or name). Its clients may hold
                // locks they will come here for: not a first start.
                Some((other, ceiling)) => {
                    warn!(
                        "no state file at {} yet, but {} is beside it: a server ran here before, \
                         so this start waits out the restart grace as after a crash",
                        path.display(),
                        other.display()
                    );
                    (ceiling, PreviousRun::Unknown)
                }
                None => (0, PreviousRun::None),
            },
        };
        let first = ceiling.max(clock);
        // The reservation below replaces the file: the list of held locks
        // is not to be trusted again after a crash of this run.
        let mut store = TokenStore {
            path: Some(path.to_path_buf()),
            _in_use: Some(in_use),
            ceiling: first,
            previous,
        };
        store.reserve_from(first)?;
        Ok((store, first))
    }

    /// The state file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What the state file said, at open, of the run before this one.
    pub fn previous_run(&self) -> &PreviousRun {
        &self.previous
    }

    /// Whether every token below `next_token` is covered by the ceiling on disk.
    pub fn covers(&self, next_token: u64) -> bool {
        next_token <= self.ceiling
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
    /// there instead of a reservation further on, and the grants in force
    /// at the end (`None`: not known, so the next start takes this stop
    /// for a crash). For a clean shutdown.
    pub fn save_final(
        &mut self,
        next_token: u64,
        held: Option<&[HeldLock]>,
    ) -> Result<(), TokenStoreError> {
        if let Some(path) = &self.path {
            write_state(path, next_token, held)?;
            self.ceiling = next_token;
        }
        Ok(())
    }

    fn reserve_from(&mut self, next_token: u64) -> Result<(), TokenStoreError> {
        let ceiling = next_token.saturating_add(RESERVATION);
        if let Some(path) = &self.path {
            write_state(path, ceiling, None)?;
        }
        self.ceiling = ceiling;
        Ok(())
    }
}

/// Locks `<path>.lock` for this process, or fails if another holds it.
fn claim(path: &Path) -> Result<File, TokenStoreError> {
    let fail = |message: String| TokenStoreError {
        path: path.to_path_buf(),
        message,
    };
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", lock_path.display())))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(fail(
            "another server is using it (it holds the lock on its .lock file); give each \
             server a state file of its own (state_file), or listen on another port"
                .to_string(),
        )),
        Err(e) => Err(fail(format!("cannot lock {}: {e}", lock_path.display()))),
    }
}

/// Another default state file in `path`'s directory, with its ceiling (0
/// if unreadable), if there is one.
fn state_beside(path: &Path) -> Option<(PathBuf, u64)> {
    let own = path.file_name()?;
    fs::read_dir(durable::directory_of(path))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|other| {
            other.file_name().is_some_and(|name| {
                let name = name.to_string_lossy();
                name != own.to_string_lossy()
                    && name.starts_with(state_location::PREFIX)
                    && !name.ends_with(".key")
                    && !name.ends_with(".tmp")
                    && !name.ends_with(".lock")
            })
        })
        .map(|other| {
            let ceiling = fs::read_to_string(&other)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<u64>().ok())
                .filter(|&ceiling| ceiling <= MAX_TOKEN)
                .unwrap_or(0);
            (other, ceiling)
        })
        .max_by_key(|(_, ceiling)| *ceiling)
}

/// The wall clock in microseconds since 1970: where tokens start when no
/// ceiling says higher.
pub fn clock_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What the state file says.
struct Stored {
    ceiling: u64,
    previous: PreviousRun,
}

fn read_state(path: &Path) -> Result<Option<Stored>, TokenStoreError> {
    let fail = |message: String| TokenStoreError {
        path: path.to_path_buf(),
        message,
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(format!("cannot read it: {e}"))),
    };
    let mut lines = text.lines().map(str::trim);
    let first = lines.next().unwrap_or("");
    let ceiling = first.parse::<u64>().map_err(|_| {
        let shown: String = first.chars().take(64).collect();
        fail(format!(
            "expected a decimal number (the token ceiling) on the first line, found {shown:?}; \
             refusing to start rather than risk repeating a token"
        ))
    })?;
    if ceiling > MAX_TOKEN {
        return Err(fail(format!(
            "the token ceiling {ceiling} is beyond 2^53, where JSON clients would \
             read tokens rounded; refusing to start"
        )));
    }
    let previous = match lines.next() {
        Some(HELD_NOTHING) => PreviousRun::Stopped(Vec::new()),
        Some(line) if line.starts_with(HELD_SOME) => match read_held(line, lines) {
            Ok(held) => PreviousRun::Stopped(held),
            Err(problem) => {
                // Safe to go on: without the list, every lock of the
                // previous run waits out the full restart grace.
                warn!(
                    "state file {}: the list of locks held at the last stop is unreadable \
                     ({problem}); treating that stop as a crash",
                    path.display()
                );
                PreviousRun::Unknown
            }
        },
        _ => PreviousRun::Unknown,
    };
    Ok(Some(Stored { ceiling, previous }))
}

/// Reads the count line (`stopped-holding N`) and the N locks after it.
fn read_held<'a>(
    count_line: &str,
    mut lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<HeldLock>, String> {
    let count = count_line
        .strip_prefix(HELD_SOME)
        .map(str::trim)
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| "no count of held locks".to_string())?;
    let mut held = Vec::new();
    for n in 0..count {
        let line = lines
            .next()
            .ok_or_else(|| format!("{count} held locks announced, {n} listed"))?;
        let lock = serde_json::from_str::<HeldLock>(line)
            .map_err(|e| format!("held lock {}: {e}", n + 1))?;
        held.push(lock);
    }
    Ok(held)
}

/// Replaces the file atomically and durably (see [`durable::replace`]).
/// `held` is the list of grants in force at a clean stop; `None` while the
/// server runs (a crash then leaves no list).
fn write_state(
    path: &Path,
    ceiling: u64,
    held: Option<&[HeldLock]>,
) -> Result<(), TokenStoreError> {
    let fail = |what: &str, e: io::Error| TokenStoreError {
        path: path.to_path_buf(),
        message: format!("cannot {what}: {e}"),
    };
    let mut text = format!("{ceiling}\n");
    match held {
        None => {}
        Some([]) => text.push_str(&format!("{HELD_NOTHING}\n")),
        Some(held) => {
            text.push_str(&format!("{HELD_SOME} {}\n", held.len()));
            for lock in held {
                // JSON escapes every control character: one line per lock.
                let line = serde_json::to_string(lock)
                    .map_err(|e| fail("encode the held locks", io::Error::other(e)))?;
                text.push_str(&line);
                text.push('\n');
            }
        }
    }
    durable::replace(path, text.as_bytes()).map_err(|(what, e)| fail(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A state file path in a fresh directory, removed when dropped.
    struct TempState(PathBuf);

    impl std::ops::Deref for TempState {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TempState {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempState {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }

    fn temp_path(name: &str) -> TempState {
        let dir = std::env::temp_dir().join(format!("pklock-tokens-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempState(dir.join("tokens"))
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
        assert_eq!(store.previous_run(), &PreviousRun::Unknown, "a crash");
        store.save_final(first + 42, Some(&[])).unwrap();
        drop(store);
        let (_, next) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(next, first + 42);
    }

    #[test]
    fn a_clean_stop_is_remembered_once_with_what_it_held() {
        let path = temp_path("held");
        let (mut store, first) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(
            store.previous_run(),
            &PreviousRun::None,
            "no file: no earlier run"
        );
        let held = vec![
            HeldLock {
                lock_name: "line\nbreak \"quoted\"".to_string(),
                mode: Mode::Exclusive,
                token: first,
            },
            HeldLock {
                lock_name: "shared".to_string(),
                mode: Mode::Shared,
                token: first + 1,
            },
        ];
        store.save_final(first + 2, Some(&held)).unwrap();
        drop(store);
        let (store, _) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(store.previous_run(), &PreviousRun::Stopped(held));
        drop(store);
        // Opening rewrote the file: a crash now must not look clean.
        let (mut again, next) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(again.previous_run(), &PreviousRun::Unknown);
        again.save_final(next, Some(&[])).unwrap();
        drop(again);
        let (store, _) = TokenStore::open(Some(&path)).unwrap();
        assert_eq!(store.previous_run(), &PreviousRun::Stopped(Vec::new()));
    }

    #[test]
    fn a_missing_file_beside_another_server_s_is_no_first_start() {
        let path = temp_path("beside");
        let dir = path.parent().unwrap().to_path_buf();
        let own = dir.join("state-20935");
        let far = clock_micros() + 10_000_000_000;
        fs::write(dir.join("state-20934.key"), "not a state file\n").unwrap();
        let (store, _) = TokenStore::open(Some(&own)).unwrap();
        assert_eq!(
            store.previous_run(),
            &PreviousRun::None,
            "a key is no state"
        );
        drop(store);
        fs::remove_file(&own).unwrap();
        fs::write(dir.join("state-20934"), format!("{far}\n")).unwrap();
        let (store, first) = TokenStore::open(Some(&own)).unwrap();
        assert_eq!(store.previous_run(), &PreviousRun::Unknown);
        assert!(first >= far, "tokens continue above the other's ceiling");
    }

    #[test]
    fn two_stores_cannot_share_one_file() {
        let path = temp_path("shared");
        let (first, _) = TokenStore::open(Some(&path)).unwrap();
        let e = TokenStore::open(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("another server is using it"), "{e}");
        drop(first);
        assert!(
            TokenStore::open(Some(&path)).is_ok(),
            "free once the first is gone"
        );
    }

    #[test]
    fn a_damaged_list_of_held_locks_counts_as_a_crash() {
        let path = temp_path("damaged");
        let far = clock_micros() + 10_000_000_000;
        for damage in [
            "stopped-holding 2\n{\"lockName\":\"a\",\"mode\":\"shared\",\"token\":5}\n",
            "stopped-holding x\n",
            "stopped-holding 1\nnot json\n",
        ] {
            fs::write(&path, format!("{far}\n{damage}")).unwrap();
            let (store, first) = TokenStore::open(Some(&path)).unwrap();
            assert_eq!(store.previous_run(), &PreviousRun::Unknown, "{damage:?}");
            assert_eq!(first, far, "the ceiling still counts");
        }
    }

    #[test]
    fn a_ceiling_beyond_2_pow_53_is_refused() {
        let path = temp_path("huge");
        fs::write(&path, format!("{}\n", MAX_TOKEN + 1)).unwrap();
        let e = TokenStore::open(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("2^53"), "{e}");
        fs::write(&path, format!("{MAX_TOKEN}\n")).unwrap();
        assert!(TokenStore::open(Some(&path)).is_ok());
    }

    #[test]
    fn a_planted_symlink_at_the_temporary_path_is_not_followed() {
        let path = temp_path("symlink");
        let victim = temp_path("victim");
        fs::write(&*victim, "precious\n").unwrap();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::os::unix::fs::symlink(&*victim, &tmp).unwrap();
        let (mut store, first) = TokenStore::open(Some(&path)).unwrap();
        store.cover(first + 1).unwrap();
        assert_eq!(fs::read_to_string(&*victim).unwrap(), "precious\n");
        assert!(stored(&path) > first);
        let mode = fs::metadata(&*path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
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
