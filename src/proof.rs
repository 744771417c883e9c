//! Grant proofs: a MAC over a grant's (lock name, mode, token) under a key
//! kept beside the state file, so that after a restart a client can show it
//! really was granted what it asks to reclaim. Owns the key file; knows
//! nothing of the lock table or of when a reclaim is honoured.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::durable;
use crate::lock_table::Mode;

/// Bytes of the MAC sent as the proof (hex-encoded, twice as many digits).
const PROOF_BYTES: usize = 16;
/// Bytes of key.
const KEY_BYTES: usize = 32;
/// Keeps these MACs apart from any other use of the same key.
const DOMAIN: &[u8] = b"pklock grant proof v1\0";

/// The key that signs grants, with the MAC state it starts every proof from.
#[derive(Clone)]
pub struct ProofKey {
    keyed: Hmac<Sha256>,
    /// Where it is kept; `None` for a key that dies with the process.
    path: Option<PathBuf>,
}

impl fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.debug_struct("ProofKey")
            .field("path", &self.path)
            .finish()
    }
}

/// A key file that could not be read or made.
#[derive(Debug)]
pub struct ProofKeyError {
    path: PathBuf,
    message: String,
}

impl fmt::Display for ProofKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grant key file {}: {}",
            self.path.display(),
            self.message
        )
    }
}

impl std::error::Error for ProofKeyError {}

impl ProofKey {
    /// Reads the key kept at `path`, or makes one there (mode 0600) if
    /// there is none. A key file others may read is refused: with it anyone
    /// could forge proofs.
    pub fn open(path: &Path) -> Result<ProofKey, ProofKeyError> {
        let fail = |message: String| ProofKeyError {
            path: path.to_path_buf(),
            message,
        };
        let key =
            match fs::read_to_string(path) {
                Ok(text) => {
                    let mode = fs::metadata(path)
                        .map_err(|e| fail(format!("cannot read its permissions: {e}")))?
                        .permissions()
                        .mode();
                    if mode & 0o077 != 0 {
                        return Err(fail(format!(
                            "it is readable by others (mode {:o}); run chmod 600 on it",
                            mode & 0o777
                        )));
                    }
                    decode_hex(text.trim()).filter(|key| key.len() == KEY_BYTES).ok_or_else(|| {
                    fail(format!(
                        "expected {} hex digits; delete it to make a new key (clients of the \
                         previous run then cannot reclaim their locks)",
                        2 * KEY_BYTES
                    ))
                })?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let key = random_key().map_err(|e| fail(format!("no randomness: {e}")))?;
                    // Written whole or not at all: a crash must not leave a
                    // key file that stops every later start.
                    let text = format!("{}\n", encode_hex(&key));
                    durable::replace(path, text.as_bytes())
                        .map_err(|(what, e)| fail(format!("cannot {what}: {e}")))?;
                    key
                }
                Err(e) => return Err(fail(format!("cannot read it: {e}"))),
            };
        let mut proof_key = ProofKey::from_bytes(&key);
        proof_key.path = Some(path.to_path_buf());
        Ok(proof_key)
    }

    /// Where the key of a server with `state_file` is kept: beside it, as
    /// `<state file>.key`.
    pub fn path_beside(state_file: &Path) -> PathBuf {
        let mut name = state_file.as_os_str().to_owned();
        name.push(".key");
        PathBuf::from(name)
    }

    /// Checks, without reading or making it, that the key at `path` could
    /// be used: absent (it would be made), or readable by its owner alone.
    pub fn check(path: &Path) -> Result<(), ProofKeyError> {
        match fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProofKeyError {
                path: path.to_path_buf(),
                message: format!("cannot read its permissions: {e}"),
            }),
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Err(ProofKeyError {
                path: path.to_path_buf(),
                message: format!(
                    "it is readable by others (mode {:o}); run chmod 600 on it",
                    meta.permissions().mode() & 0o777
                ),
            }),
            Ok(_) => Ok(()),
        }
    }

    /// A key of this process only: proofs it signs do not survive a restart.
    pub fn ephemeral() -> ProofKey {
        // Without randomness, a key from the clock and pid still differs from
        // run to run; proofs from it only ever serve this run anyway.
        let key = random_key().unwrap_or_else(|_| {
            let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
            seed.into_bytes()
        });
        ProofKey::from_bytes(&key)
    }

    /// A key shared by several servers (cluster mode keeps it in etcd).
    pub fn from_secret(secret: &[u8]) -> ProofKey {
        ProofKey::from_bytes(secret)
    }

    /// A new random secret for [`ProofKey::from_secret`].
    pub fn new_secret() -> io::Result<Vec<u8>> {
        random_key()
    }

    fn from_bytes(key: &[u8]) -> ProofKey {
        // HMAC takes a key of any length.
        let keyed = match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
        ProofKey { keyed, path: None }
    }

    /// Where the key is kept, if anywhere.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The proof of a grant of `lock` in `mode` with `token`.
    pub fn sign(&self, lock: &str, mode: Mode, token: u64) -> String {
        let tag = self.mac(lock, mode, token).finalize().into_bytes();
        encode_hex(&tag[..PROOF_BYTES])
    }

    /// Whether `proof` is the proof of that grant (compared in constant time).
    pub fn verify(&self, lock: &str, mode: Mode, token: u64, proof: &str) -> bool {
        match decode_hex(proof) {
            Some(tag) if tag.len() == PROOF_BYTES => self
                .mac(lock, mode, token)
                .verify_truncated_left(&tag)
                .is_ok(),
            _ => false,
        }
    }

    fn mac(&self, lock: &str, mode: Mode, token: u64) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(&token.to_be_bytes());
        mac.update(match mode {
            Mode::Exclusive => b"x",
            Mode::Shared => b"s",
        });
        mac.update(lock.as_bytes());
        mac
    }
}

fn random_key() -> io::Result<Vec<u8>> {
    let mut key = vec![0u8; KEY_BYTES];
    let mut filled = 0;
    while filled < key.len() {
        let rest = key.get_mut(filled..).unwrap_or_default();
        filled += rustix::rand::getrandom(rest, rustix::rand::GetRandomFlags::empty())
            .map_err(io::Error::from)?;
    }
    Ok(key)
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for &byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_own_grant_and_key() {
        let key = ProofKey::ephemeral();
        let proof = key.sign("backup", Mode::Exclusive, 42);
        assert_eq!(proof.len(), 2 * PROOF_BYTES);
        assert!(key.verify("backup", Mode::Exclusive, 42, &proof));
        assert!(!key.verify("backup", Mode::Exclusive, 43, &proof));
        assert!(!key.verify("backup", Mode::Shared, 42, &proof));
        assert!(!key.verify("backupx", Mode::Exclusive, 42, &proof));
        assert!(!key.verify("backup", Mode::Exclusive, 42, &proof[..30]));
        assert!(!key.verify("backup", Mode::Exclusive, 42, "zz"));
        assert!(!ProofKey::ephemeral().verify("backup", Mode::Exclusive, 42, &proof));
    }

    #[test]
    fn the_key_file_is_made_private_and_read_back_by_the_next_run() {
        let dir = std::env::temp_dir().join(format!("pklock-proof-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.key");
        let first = ProofKey::open(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let proof = first.sign("a", Mode::Shared, 7);
        let second = ProofKey::open(&path).unwrap();
        assert!(
            second.verify("a", Mode::Shared, 7, &proof),
            "same key next run"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = ProofKey::open(&path).unwrap_err().to_string();
        assert!(error.contains("readable by others"), "{error}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not hex\n").unwrap();
        let error = ProofKey::open(&path).unwrap_err().to_string();
        assert!(error.contains("hex digits"), "{error}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
