//! The few etcd v3 calls the cluster needs (leases, ranges, transactions),
//! over etcd's HTTP/JSON gateway with a blocking client and a deadline on
//! every call. Knows nothing of leadership or tokens.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

/// Largest etcd answer read: the largest value etcd stores (1.5 MiB by
/// default), in base64 and JSON, with room to spare.
const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// The most of an answer's text an error message quotes.
const QUOTED_BYTES: usize = 200;

/// `text` cut short and with its control characters escaped, for a log line.
fn quoted(text: &str) -> String {
    let cut = text
        .char_indices()
        .nth(QUOTED_BYTES)
        .map_or(text, |(i, _)| &text[..i]);
    crate::rate_limit::escaped(cut.trim()).into_owned()
}

/// A call that failed: etcd unreachable, too slow, or an answer we cannot use.
#[derive(Debug, Clone)]
pub struct EtcdError(pub String);

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EtcdError {}

/// A key and what etcd knows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created it.
    pub create_revision: i64,
    /// The revision that last changed it.
    pub mod_revision: i64,
}

/// One condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key was created at this revision (0: it does not exist).
    Created(Vec<u8>, i64),
    /// The key was last changed at this revision (0: it does not exist).
    Modified(Vec<u8>, i64),
}

/// One operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    /// Writes the key, attached to a lease if one is given.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease, 0 for none.
        lease: i64,
    },
    /// Removes the key.
    Delete(Vec<u8>),
}

/// A lease as granted or renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: i64,
    /// Its time to live, in seconds, from the moment etcd answered.
    pub ttl_secs: i64,
}

/// A client of one etcd cluster.
pub struct Etcd {
    endpoints: Vec<String>,
    /// The endpoint tried first: the last one that answered.
    current: usize,
    agent: ureq::Agent,
    timeout: Duration,
    /// User and password, when etcd has auth enabled.
    credentials: Option<(String, String)>,
    /// The token etcd gave for them, until it refuses it.
    token: Option<String>,
}

impl Etcd {
    /// A client of `endpoints` (`host:port` of etcd's client URLs), where
    /// every call gives up after `timeout`.
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Etcd {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // Straight to etcd: an HTTP_PROXY meant for downloads must not
            // carry the election.
            .proxy(None)
            .build();
        Etcd {
            endpoints,
            current: 0,
            agent: ureq::Agent::new_with_config(config),
            timeout,
            credentials: None,
            token: None,
        }
    }

    /// Authenticates as `user` with `password` (etcd with auth enabled).
    pub fn with_credentials(mut self, user: String, password: String) -> Etcd {
        self.credentials = Some((user, password));
        self
    }

    /// Grants a lease of `ttl_secs` seconds.
    pub fn grant(&mut self, ttl_secs: i64) -> Result<Lease, EtcdError> {
        let answer = self.call("/v3/lease/grant", &json!({ "TTL": ttl_secs }))?;
        Ok(Lease {
            id: number(&answer, "ID")?,
            ttl_secs: number(&answer, "TTL")?,
        })
    }

    /// Renews a lease; `None` when it has expired (or was revoked).
    pub fn keep_alive(&mut self, id: i64) -> Result<Option<Lease>, EtcdError> {
        let answer = self.call("/v3/lease/keepalive", &json!({ "ID": id }))?;
        let result = answer.get("result").ok_or_else(|| {
            EtcdError(format!(
                "keepalive answer without a result: {}",
                quoted(&answer.to_string())
            ))
        })?;
        let ttl = optional_number(result, "TTL")?.unwrap_or(0);
        Ok((ttl > 0).then_some(Lease { id, ttl_secs: ttl }))
    }

    /// Revokes a lease, deleting the keys attached to it; a lease etcd
    /// no longer knows (expired) is as good as revoked.
    pub fn revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        match self.exchange("/v3/lease/revoke", &json!({ "ID": id }))? {
            (200..=299 | 404, _) => Ok(()),
            (status, text) => Err(EtcdError(format!(
                "/v3/lease/revoke answered {status}: {}",
                quoted(&text)
            ))),
        }
    }

    /// The key, if it exists.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let answer = self.call("/v3/kv/range", &json!({ "key": BASE64.encode(key) }))?;
        Ok(key_values(&answer)?.into_iter().next())
    }

    /// The key under `prefix` created first, if there is one.
    pub fn first_created(&mut self, prefix: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let answer = self.call(
            "/v3/kv/range",
            &json!({
                "key": BASE64.encode(prefix),
                "range_end": BASE64.encode(prefix_end(prefix)),
                "sort_order": "ASCEND",
                "sort_target": "CREATE",
                "limit": 1,
            }),
        )?;
        Ok(key_values(&answer)?.into_iter().next())
    }

    /// Runs `ops` if every comparison holds; returns whether they did, and
    /// the revision of the answer.
    pub fn txn(&mut self, compare: &[Compare], ops: &[Op]) -> Result<(bool, i64), EtcdError> {
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::Created(key, revision) => json!({
                    "key": BASE64.encode(key),
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": revision,
                }),
                Compare::Modified(key, revision) => json!({
                    "key": BASE64.encode(key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": revision,
                }),
            })
            .collect();
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => json!({ "request_put": {
                    "key": BASE64.encode(key),
                    "value": BASE64.encode(value),
                    "lease": lease,
                }}),
                Op::Delete(key) => json!({ "request_delete_range": { "key": BASE64.encode(key) }}),
            })
            .collect();
        let answer = self.call(
            "/v3/kv/txn",
            &json!({ "compare": compare, "success": success }),
        )?;
        let succeeded = answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let revision = answer
            .get("header")
            .map(|h| optional_number(h, "revision"))
            .transpose()?
            .flatten()
            .unwrap_or(0);
        Ok((succeeded, revision))
    }

    /// Posts `body` to the current endpoint and reads the answer; on
    /// failure the next call goes to the next endpoint.
    fn call(&mut self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let (status, text) = self.exchange(path, body)?;
        if !(200..300).contains(&status) {
            return Err(EtcdError(format!(
                "{path} answered {status}: {}",
                text.trim()
            )));
        }
        serde_json::from_str(&text).map_err(|e| EtcdError(format!("{path}: {e}")))
    }

    fn exchange(&mut self, path: &str, body: &Value) -> Result<(u16, String), EtcdError> {
        if self.credentials.is_some() && self.token.is_none() {
            self.authenticate()?;
        }
        let answer = self.exchange_once(path, body)?;
        // Tokens expire (and die with the etcd member that gave them).
        if self.credentials.is_some() && refuses_token(&answer) {
            self.token = None;
            self.authenticate()?;
            return self.exchange_once(path, body);
        }
        Ok(answer)
    }

    fn authenticate(&mut self) -> Result<(), EtcdError> {
        let Some((user, password)) = self.credentials.clone() else {
            return Ok(());
        };
        let body = json!({ "name": user, "password": password });
        let (status, text) = self.exchange_once("/v3/auth/authenticate", &body)?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match answer.get("token").and_then(Value::as_str) {
            Some(token) if (200..300).contains(&status) => {
                self.token = Some(token.to_string());
                Ok(())
            }
            _ => Err(EtcdError(format!(
                "etcd refused user {}: {}",
                quoted(&user),
                quoted(&text)
            ))),
        }
    }

    fn exchange_once(&mut self, path: &str, body: &Value) -> Result<(u16, String), EtcdError> {
        let endpoint = self
            .endpoints
            .get(self.current)
            .ok_or_else(|| EtcdError("no etcd endpoint configured".to_string()))?
            .clone();
        let result = self.post(&endpoint, path, body);
        if result.is_err() && !self.endpoints.is_empty() {
            self.current = (self.current + 1) % self.endpoints.len();
        }
        result
    }

    fn post(&self, endpoint: &str, path: &str, body: &Value) -> Result<(u16, String), EtcdError> {
        let url = format!("http://{endpoint}{path}");
        let fail = |e: &dyn fmt::Display| EtcdError(format!("etcd at {endpoint}: {e}"));
        let mut request = self
            .agent
            .post(&url)
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", token);
        }
        let mut response = request.send(body.to_string()).map_err(|e| match e {
            ureq::Error::Timeout(_) => {
                fail(&format!("no answer within {} ms", self.timeout.as_millis()))
            }
            e => fail(&e),
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| fail(&e))?;
        Ok((status, text))
    }
}

/// Whether etcd refused the request for its auth token (expired, or none).
fn refuses_token((status, text): &(u16, String)) -> bool {
    *status == 401
        || (!(200..300).contains(status)
            && (text.contains("invalid auth token") || text.contains("user name is empty")))
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: the range runs to the end of the key space.
    vec![0]
}

/// etcd's gateway writes 64-bit numbers as strings.
fn optional_number(object: &Value, field: &str) -> Result<Option<i64>, EtcdError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| EtcdError(format!("etcd's `{field}` is not a number: {}", quoted(s)))),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| EtcdError(format!("etcd's `{field}` is out of range: {n}"))),
        Some(other) => Err(EtcdError(format!(
            "etcd's `{field}` is not a number: {}",
            quoted(&other.to_string())
        ))),
    }
}

fn number(object: &Value, field: &str) -> Result<i64, EtcdError> {
    optional_number(object, field)?.ok_or_else(|| {
        EtcdError(format!(
            "etcd's answer has no `{field}`: {}",
            quoted(&object.to_string())
        ))
    })
}

fn bytes(object: &Value, field: &str) -> Result<Vec<u8>, EtcdError> {
    match object.get(field).and_then(Value::as_str) {
        None => Ok(Vec::new()),
        Some(text) => BASE64
            .decode(text)
            .map_err(|e| EtcdError(format!("etcd's `{field}` is not base64: {e}"))),
    }
}

fn key_values(answer: &Value) -> Result<Vec<KeyValue>, EtcdError> {
    let Some(kvs) = answer.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    kvs.iter()
        .map(|kv| {
            Ok(KeyValue {
                key: bytes(kv, "key")?,
                value: bytes(kv, "value")?,
                create_revision: optional_number(kv, "create_revision")?.unwrap_or(0),
                mod_revision: optional_number(kv, "mod_revision")?.unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_the_last_key_with_that_prefix() {
        assert_eq!(prefix_end(b"/pklock/leader/"), b"/pklock/leader0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn numbers_come_as_strings_or_numbers_and_anything_else_is_an_error() {
        let answer = json!({ "a": "12", "b": 7, "c": [1], "d": "x" });
        assert_eq!(optional_number(&answer, "a").ok().flatten(), Some(12));
        assert_eq!(optional_number(&answer, "b").ok().flatten(), Some(7));
        assert!(optional_number(&answer, "c").is_err());
        assert!(optional_number(&answer, "d").is_err());
        assert_eq!(optional_number(&answer, "e").ok().flatten(), None);
    }
}
