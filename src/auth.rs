//! Secret tokens that name principals: the `[auth] tokens_file` of
//! `principal = "sha256:<SHA-256 of the token, hex>"` lines, and the lookup of a
//! token's principal in constant time. Stores hashes only, never tokens.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::protocol::ANONYMOUS;

/// The principals and the hashes of their tokens.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<(String, [u8; 32])>,
}

impl Tokens {
    /// Reads a tokens file; the error names the file and the line at fault.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = fs::read_to_string(path)
            .map_err(|e| format!("cannot read the tokens file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))
    }

    /// Parses `principal = "hex"` lines (TOML), one per principal.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut entries = Vec::with_capacity(table.len());
        for (principal, value) in table {
            if principal == ANONYMOUS || principal.is_empty() {
                return Err(format!(
                    "`{principal}` cannot be given a token: it is the name of connections without one"
                ));
            }
            let Some(hex) = value.as_str() else {
                return Err(format!(
                    "`{principal}` must be a string: the SHA-256 of its token, in hex"
                ));
            };
            // The prefix tells a hash from a token pasted by mistake (a
            // token made with `openssl rand -hex 32` looks like a hash).
            let Some(hash) = hex.trim().strip_prefix(HASH_PREFIX).and_then(decode_hash) else {
                return Err(format!(
                    "`{principal}` is not \"sha256:\" and the SHA-256 of its token in hex (64 \
                     hex digits; the file holds hashes, never tokens); make it with \
                     `printf 'sha256:%s' \"$(printf %s \"$TOKEN\" | sha256sum | cut -d' ' -f1)\"`"
                ));
            };
            entries.push((principal, hash));
        }
        Ok(Tokens { entries })
    }

    /// The principal whose token this is. Every entry is compared, in
    /// constant time, so the time taken says nothing about which matched.
    pub fn principal_of(&self, token: &str) -> Option<&str> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (principal, hash) in &self.entries {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(principal.as_str());
            }
        }
        found
    }

    /// How many principals have a token.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no principal has a token.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How a tokens file's values begin.
const HASH_PREFIX: &str = "sha256:";

/// What a tokens file lists for `token`: `sha256:` and its SHA-256, in hex.
pub fn token_hash(token: &str) -> String {
    let hex: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{HASH_PREFIX}{hex}")
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_principal_and_nothing_else_does() {
        let text = format!(
            "deploy = \"{}\"\nops = \"sha256:{}\"\n",
            token_hash("s3cret-deploy"),
            token_hash("s3cret-ops")
                .replace("sha256:", "")
                .to_uppercase()
        );
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(tokens.principal_of("s3cret-deploy"), Some("deploy"));
        assert_eq!(tokens.principal_of("s3cret-ops"), Some("ops"));
        assert_eq!(tokens.principal_of("s3cret-deplo"), None);
        assert_eq!(tokens.principal_of(""), None);
        assert_eq!(
            tokens.principal_of(&token_hash("s3cret-ops")),
            None,
            "the hash is not the token"
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_principal_named() {
        for (text, says) in [
            ("deploy = \"sha256:abc\"", "`deploy` is not \"sha256:\""),
            (
                // A token pasted where its hash belongs.
                &format!("deploy = \"{}\"", "ab".repeat(32)),
                "never tokens",
            ),
            ("deploy = 5", "`deploy` must be a string"),
            (
                &format!("anonymous = \"{}\"", token_hash("x")),
                "`anonymous` cannot",
            ),
            ("deploy = ", "expected"),
            (
                &format!("d = \"sha256:{}\"", "g".repeat(64)),
                "`d` is not \"sha256:\"",
            ),
        ] {
            let error = Tokens::parse(text).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
