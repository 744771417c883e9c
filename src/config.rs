//! Server configuration: the TOML file's keys, their defaults and their checks.
//! A bad file is refused with the offending key and line named. No sockets here.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;
use serde::de::{self, Deserialize, Deserializer};

use crate::acl::AclRule;
use crate::allow_list::AllowList;
use crate::keepalive::Keepalive;
use crate::proof::ProofKey;

/// The default port, as the original pkLockServer.
pub const DEFAULT_PORT: u16 = 20934;

/// The default `max_lock_entries`: at the most an entry can cost (a held
/// lock of its own with a 1 KiB name, about 1.5 KiB; the arithmetic is in
/// config/settings.example.toml), a full table stays under about 750 MiB,
/// which leaves a default server under about 1 GiB.
pub const DEFAULT_MAX_LOCK_ENTRIES: usize = 500_000;

/// Everything the server can be told. Every field has a default, so an empty
/// file (or none) gives a working loopback-only server.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Addresses to listen on, IPv4 and IPv6, in plain TCP; empty for a
    /// server that speaks only TLS (on `[tls] listen`).
    #[serde(deserialize_with = "addresses")]
    pub listen: Vec<SocketAddr>,
    /// Peers that may connect; others are closed at accept.
    pub allowed: AllowList,
    /// Open connections at most; the next one is refused at once.
    #[serde(deserialize_with = "at_least_one")]
    pub max_connections: usize,
    /// The largest frame body a peer may send.
    #[serde(deserialize_with = "message_limit")]
    pub max_message_bytes: usize,
    /// Unsent replies a connection may have queued before it is closed.
    #[serde(deserialize_with = "output_limit")]
    pub max_output_bytes: usize,
    /// Locks one connection may hold plus wait for.
    #[serde(deserialize_with = "at_least_one")]
    pub max_locks_per_connection: usize,
    /// Connections from one IP address at most (loopback is exempt); the
    /// next one is refused at once.
    #[serde(deserialize_with = "at_least_one")]
    pub max_connections_per_ip: usize,
    /// A frame must arrive whole within this long of its first byte, and a
    /// new connection must send its first frame within this long; otherwise
    /// the connection is closed, unless it holds or waits for a lock.
    #[serde(deserialize_with = "frame_timeout")]
    pub frame_timeout_ms: u64,
    /// Locks all connections together may hold plus wait for: the lock
    /// table's memory ceiling.
    #[serde(deserialize_with = "at_least_one")]
    pub max_lock_entries: usize,
    /// Whether a lock request whose wait would close a cycle of waits is
    /// answered `deadlock` at once (true) or queued like any other.
    pub detect_deadlocks: bool,
    /// Where the fencing-token ceiling is kept; none keeps tokens clock-based
    /// only. As read from a file, `None` means the key is absent (the default
    /// place) and an empty path turns it off; [`crate::state_location::locate`]
    /// turns both into the file to use, after which `None` means none.
    pub state_file: Option<PathBuf>,
    /// After a start, grant nothing for this long, so that clients of a
    /// previous run that could not see it stop have given up their locks.
    /// Default: the earliest release time of `[keepalive]`.
    #[serde(default, deserialize_with = "grace_ms")]
    pub restart_grace_ms: Option<u64>,
    /// The log level for every line, overriding `RUST_LOG`; none leaves
    /// `RUST_LOG` in charge (see [`crate::log_level`]).
    #[serde(deserialize_with = "log_level")]
    pub log_level: Option<LevelFilter>,
    /// Dead-peer detection.
    pub keepalive: KeepaliveConfig,
    /// Several servers, one leader elected in etcd; absent: a single server.
    pub cluster: Option<ClusterConfig>,
    /// TLS listeners; absent: plain TCP only.
    pub tls: Option<TlsConfig>,
    /// Tokens that name principals.
    pub auth: AuthConfig,
    /// Who may do what; none: everyone may do everything, as without rules.
    #[serde(deserialize_with = "acl_rules")]
    pub acl: Vec<AclRule>,
    /// Where Prometheus scrapes `/metrics` (peers in `allowed` only); none:
    /// no metrics endpoint.
    #[serde(deserialize_with = "addresses")]
    pub metrics_listen: Vec<SocketAddr>,
    /// Locks under these prefixes get metrics series of their own (at most
    /// 1000 locks); the others are counted in the totals only.
    pub metrics_lock_prefixes: Vec<String>,
    /// How log lines are written: `text`, or `json` (one object per line).
    pub log_format: LogFormat,
}

/// How the server writes its log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// env_logger's text lines.
    #[default]
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `msg`.
    Json,
}

/// Listeners of their own that speak TLS (the plain `listen` stays).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses to listen on for TLS.
    #[serde(deserialize_with = "non_empty_addresses")]
    pub listen: Vec<SocketAddr>,
    /// The server's certificate chain, PEM, its own certificate first.
    pub cert_file: PathBuf,
    /// Its private key, PEM.
    pub key_file: PathBuf,
    /// Clients must present a certificate signed by a CA in this PEM file
    /// (mutual TLS); absent: no client certificates are asked for.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Authentication by secret token in `hello`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `principal = "<sha256 hex of its token>"` lines; absent: no tokens
    /// are accepted.
    pub tokens_file: Option<PathBuf>,
    /// Accept tokens over plain TCP from other hosts, where anyone on the
    /// path can read them (loopback and TLS are always fine).
    pub allow_plaintext_auth: bool,
}

/// The election in etcd that makes one of several servers the leader.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd's client URLs, `http://host:port`.
    #[serde(deserialize_with = "etcd_endpoints")]
    pub etcd_endpoints: Vec<String>,
    /// The election's name: the key prefix of the candidates, and the
    /// stem of the keys beside it (`<election>.tokens`, ...).
    #[serde(default = "default_election", deserialize_with = "election_name")]
    pub election: String,
    /// What clients are told to dial for this server; by default the first
    /// `listen` address, unless that is a wildcard.
    #[serde(default, deserialize_with = "advertise_address")]
    pub advertise: Option<String>,
    /// The etcd lease of the leadership: a leader that cannot renew it
    /// steps down within this long, and another takes over after it.
    #[serde(default = "default_lease_ttl", deserialize_with = "lease_ttl")]
    pub lease_ttl_ms: u64,
    /// The etcd user to authenticate as, when etcd has auth enabled.
    #[serde(default)]
    pub etcd_user: Option<String>,
    /// A file holding that user's password (never the password itself in
    /// the configuration).
    #[serde(default)]
    pub etcd_password_file: Option<PathBuf>,
}

/// The default `lease_ttl_ms`, the shortest etcd grants: after a crash the
/// next leader serves within about this plus a second, inside the default
/// client lease (5 s, of which at least 4 s are left since the last ping).
pub const DEFAULT_LEASE_TTL_MS: u64 = 2_000;

fn default_election() -> String {
    "/pklock/leader".to_string()
}

fn default_lease_ttl() -> u64 {
    DEFAULT_LEASE_TTL_MS
}

/// TCP keepalive and TCP_USER_TIMEOUT, as asked for (see
/// [`crate::keepalive`] for what the kernel really applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Silence before the first probe.
    #[serde(deserialize_with = "positive_ms")]
    pub idle_ms: u64,
    /// Time between probes.
    #[serde(deserialize_with = "positive_ms")]
    pub interval_ms: u64,
    /// Unanswered probes before the connection is dropped.
    #[serde(deserialize_with = "probe_count")]
    pub probes: u32,
    /// TCP_USER_TIMEOUT; 0 leaves the kernel's default.
    #[serde(deserialize_with = "user_timeout")]
    pub user_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))],
            allowed: AllowList::parse(&["127.0.0.1", "::1"])
                .unwrap_or_else(|e| unreachable!("built-in allow list: {e}")),
            max_connections: 10_000,
            max_message_bytes: 65_536,
            max_output_bytes: 1_048_576,
            max_locks_per_connection: 10_000,
            max_connections_per_ip: 1_000,
            frame_timeout_ms: 30_000,
            max_lock_entries: DEFAULT_MAX_LOCK_ENTRIES,
            detect_deadlocks: true,
            state_file: None,
            restart_grace_ms: None,
            log_level: None,
            keepalive: KeepaliveConfig::default(),
            cluster: None,
            tls: None,
            auth: AuthConfig::default(),
            acl: Vec::new(),
            metrics_listen: Vec::new(),
            metrics_lock_prefixes: Vec::new(),
            log_format: LogFormat::Text,
        }
    }
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            idle_ms: 5_000,
            interval_ms: 1_000,
            probes: 5,
            user_timeout_ms: 10_000,
        }
    }
}

/// A configuration file that could not be used.
#[derive(Debug)]
pub struct ConfigError {
    path: PathBuf,
    line: Option<usize>,
    key: Option<String>,
    message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config {}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The keepalive the kernel will apply.
    pub fn effective_keepalive(&self) -> Keepalive {
        Keepalive::effective(&self.keepalive)
    }

    /// The first address listened on: the first plain one, or for a
    /// server that speaks only TLS, the first TLS one.
    pub fn first_listen(&self) -> Option<SocketAddr> {
        self.listen
            .first()
            .or_else(|| self.tls.as_ref().and_then(|tls| tls.listen.first()))
            .copied()
    }

    /// How long grants are held back after a start (unless the previous run
    /// stopped holding nothing): `restart_grace_ms`, by default the earliest
    /// release time.
    pub fn restart_grace(&self) -> Duration {
        self.restart_grace_ms.map_or(
            self.effective_keepalive().earliest_release(),
            Duration::from_millis,
        )
    }

    /// The settings in effect, one line each, for the start-up log and
    /// `server --check-config`.
    pub fn summary(&self) -> Vec<String> {
        let k = self.effective_keepalive();
        let mut lines = vec![
            if self.listen.is_empty() {
                "listen: none in plain TCP (TLS only)".to_string()
            } else {
                format!(
                    "listen: {}",
                    self.listen
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            format!("allowed peers: {}", self.allowed),
            format!(
                "limits: max_connections {}, max_message_bytes {}, max_output_bytes {}, max_locks_per_connection {}, max_lock_entries {}",
                self.max_connections,
                self.max_message_bytes,
                self.max_output_bytes,
                self.max_locks_per_connection,
                self.max_lock_entries
            ),
            format!(
                "deadlocks: {}",
                if self.detect_deadlocks {
                    "a wait that would close a cycle is answered deadlock"
                } else {
                    "not checked (detect_deadlocks = false)"
                }
            ),
        ];
        let asked = &self.keepalive;
        if asked.idle_ms % 1000 != 0 || asked.interval_ms % 1000 != 0 {
            lines.push(format!(
                "keepalive idle {} ms and interval {} ms are rounded up to whole seconds, as Linux applies them",
                asked.idle_ms, asked.interval_ms
            ));
        }
        lines.push(format!(
            "keepalive in effect: idle {} s, interval {} s, probes {}, user timeout {}; a vanished \
             peer's locks are released after at most {} ms, at the earliest {} ms",
            k.idle.as_secs(),
            k.interval.as_secs(),
            k.probes,
            k.user_timeout
                .map_or("off".to_string(), |t| format!("{} ms", t.as_millis())),
            k.release_after().as_millis(),
            k.earliest_release().as_millis()
        ));
        lines.push(format!(
            "per peer: max_connections_per_ip {} (loopback exempt), frame_timeout_ms {}",
            self.max_connections_per_ip, self.frame_timeout_ms
        ));
        lines.push(match self.log_level {
            Some(level) => format!("log level: {} (log_level)", level.as_str().to_lowercase()),
            None => "log level: RUST_LOG's, info when it is not set (no log_level)".to_string(),
        });
        lines.push(format!(
            "restart grace: {} ms",
            self.restart_grace().as_millis()
        ));
        if let Some(tls) = &self.tls {
            lines.push(format!(
                "tls: listen {}, certificate {}, {}",
                tls.listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                tls.cert_file.display(),
                match &tls.client_ca_file {
                    Some(ca) => format!("client certificates required (CA {})", ca.display()),
                    None => "no client certificates".to_string(),
                }
            ));
        }
        lines.push(match &self.auth.tokens_file {
            Some(path) => format!(
                "auth: tokens from {}{}",
                path.display(),
                if self.auth.allow_plaintext_auth {
                    ", taken over plain TCP from other hosts too (allow_plaintext_auth)"
                } else {
                    ""
                }
            ),
            None if self
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_ca_file.is_some()) =>
            {
                "auth: no tokens file (principals only from client certificates)".to_string()
            }
            None => "auth: no tokens file and no client certificates: every connection is \
                     anonymous"
                .to_string(),
        });
        if !self.metrics_listen.is_empty() {
            lines.push(format!(
                "metrics: http://{}/metrics{}",
                self.metrics_listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", http://"),
                if self.metrics_lock_prefixes.is_empty() {
                    String::new()
                } else {
                    format!(", a series per lock under {:?}", self.metrics_lock_prefixes)
                }
            ));
        }
        lines.push(if self.acl.is_empty() {
            "acl: no rules, every connection may do everything".to_string()
        } else {
            format!(
                "acl: {} rule(s); what they do not give is denied",
                self.acl.len()
            )
        });
        match &self.cluster {
            Some(cluster) => lines.push(format!(
                "cluster: etcd at {}{}, election {}, advertised as {}, leadership lease {} ms \
                 (fencing tokens and grant proofs are kept in etcd; no state file)",
                cluster
                    .etcd_endpoints
                    .iter()
                    .map(|e| format!("http://{e}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                cluster
                    .etcd_user
                    .as_ref()
                    .map_or(String::new(), |user| format!(" as user {user}")),
                cluster.election,
                cluster.advertise.as_deref().unwrap_or("?"),
                cluster.lease_ttl_ms
            )),
            None => lines.push(match &self.state_file {
                Some(path) => format!("state file: {}", path.display()),
                None => "state file: none (fencing tokens are clock-based)".to_string(),
            }),
        }
        lines
    }

    /// Checks what the file names on disk, for `server --check-config`: the
    /// state file's directory must exist.
    pub fn check_paths(&self) -> Result<(), String> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "state_file {}: the directory {} does not exist",
                path.display(),
                dir.display()
            ));
        }
        ProofKey::check(&ProofKey::path_beside(path)).map_err(|e| e.to_string())
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read it: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.path = path.to_path_buf();
            e
        })
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let fail = |line, key, message| ConfigError {
            path: PathBuf::from("<text>"),
            line,
            key,
            message,
        };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| fail(line_of(text, &e), None, e.message().to_string()))?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != "." && !key.is_empty()).then_some(key);
            let inner = e.into_inner();
            fail(line_of(text, &inner), key, inner.message().to_string())
        })?;
        if let Some(cluster) = &config.cluster
            && cluster.etcd_user.is_some() != cluster.etcd_password_file.is_some()
        {
            return Err(fail(
                None,
                Some("cluster.etcd_password_file".to_string()),
                "etcd_user and etcd_password_file go together: set both, or neither".to_string(),
            ));
        }
        if config.listen.is_empty() && config.tls.is_none() {
            return Err(fail(
                None,
                Some("listen".to_string()),
                "at least one address is needed (an empty `listen` is for a server that speaks \
                 only TLS, on `[tls] listen`)"
                    .to_string(),
            ));
        }
        if let Some(tls) = &config.tls
            && let Some(both) = tls
                .listen
                .iter()
                .find(|addr| addr.port() != 0 && config.listen.contains(addr))
        {
            return Err(fail(
                None,
                Some("tls.listen".to_string()),
                format!("{both} is in `listen` too: one address serves plain TCP or TLS, not both"),
            ));
        }
        let first_listen = config.first_listen();
        if let Some(cluster) = &mut config.cluster
            && cluster.advertise.is_none()
        {
            match first_listen {
                Some(addr) if !addr.ip().is_unspecified() => {
                    cluster.advertise = Some(addr.to_string());
                }
                _ => {
                    return Err(fail(
                        None,
                        Some("cluster.advertise".to_string()),
                        "needed when the first `listen` address is a wildcard: the address \
                         clients are told to dial for this server, such as 10.0.0.5:20934"
                            .to_string(),
                    ));
                }
            }
        }
        Ok(config)
    }
}

fn acl_rules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AclRule>, D::Error> {
    let rules = Vec::<AclRule>::deserialize(d)?;
    for rule in &rules {
        if rule.principal.is_empty() {
            return Err(de::Error::custom(
                "an [[acl]] rule needs a `principal`: a name from the tokens file or a client \
                 certificate, or `anonymous`",
            ));
        }
        if rule.prefixes.is_empty() || rule.rights.is_empty() {
            return Err(de::Error::custom(format!(
                "the [[acl]] rule for `{}` gives nothing: it needs `prefixes` (\"\" is every \
                 name) and `rights` (lock, status, admin)",
                rule.principal
            )));
        }
    }
    Ok(rules)
}

fn line_of(text: &str, error: &toml::de::Error) -> Option<usize> {
    let start = error.span()?.start;
    let before = text.get(..start)?;
    Some(before.bytes().filter(|&b| b == b'\n').count() + 1)
}

fn non_empty_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let entries = addresses(d)?;
    if entries.is_empty() {
        return Err(de::Error::custom("at least one address is needed"));
    }
    Ok(entries)
}

fn addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let entries = Vec::<String>::deserialize(d)?;
    entries
        .iter()
        .map(|entry| {
            entry.parse().map_err(|_| {
                de::Error::custom(format!(
                    "`{entry}` is not an IP address and port such as 127.0.0.1:20934 or [::1]:20934"
                ))
            })
        })
        .collect()
}

fn in_range<'de, D: Deserializer<'de>, N>(d: D, min: N, max: N, what: &str) -> Result<N, D::Error>
where
    N: Deserialize<'de> + PartialOrd + fmt::Display + Copy,
{
    let value = N::deserialize(d)?;
    if value < min || value > max {
        return Err(de::Error::custom(format!(
            "{value} is out of range: {what} must be from {min} to {max}"
        )));
    }
    Ok(value)
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 1, usize::MAX, "a count")
}

fn message_limit<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    // Room for a lock request with a 1024-byte name; at most what 4 bytes can say.
    in_range(d, 2048, u32::MAX as usize, "a message size")
}

fn output_limit<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 4096, usize::MAX, "an output size")
}

fn frame_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    // Under 100 ms a healthy client on a slow network would be cut off.
    in_range(d, 100, 3_600_000, "a frame timeout in ms")
}

/// The longest `restart_grace_ms` a configuration may set.
pub const MAX_RESTART_GRACE_MS: u64 = 3_600_000;

fn grace_ms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    in_range(d, 0, MAX_RESTART_GRACE_MS, "a restart grace in ms").map(Some)
}

fn etcd_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let urls = Vec::<String>::deserialize(d)?;
    if urls.is_empty() {
        return Err(de::Error::custom("at least one etcd URL is needed"));
    }
    urls.iter()
        .map(|url| {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                de::Error::custom(format!(
                    "`{url}`: only http:// etcd URLs are supported (put etcd's client port \
                     on loopback or a private network, or behind a TLS-terminating proxy)"
                ))
            })?;
            let host_port = rest.trim_end_matches('/');
            host_and_port(host_port)
                .map(|()| host_port.to_string())
                .map_err(|why| de::Error::custom(format!("`{url}`: {why}")))
        })
        .collect()
}

fn election_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(de::Error::custom(
            "an election name is 1 to 256 bytes of printable text, such as /pklock/leader",
        ));
    }
    Ok(name)
}

fn advertise_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let address = String::deserialize(d)?;
    host_and_port(&address).map_err(|why| de::Error::custom(format!("`{address}`: {why}")))?;
    Ok(Some(address))
}

/// Whether `text` is `host:port`, as `advertise` takes it.
pub fn is_host_and_port(text: &str) -> bool {
    host_and_port(text).is_ok()
}

/// Checks `host:port` (a name, an IPv4 address, or `[IPv6]`, and a port).
fn host_and_port(text: &str) -> Result<(), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected host:port, such as 10.0.0.5:20934".to_string());
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && (host.starts_with('[') && host.ends_with(']') || !host.contains(['/', ' ', '[', ']']));
    if !port_ok || !host_ok {
        return Err("expected host:port, such as 10.0.0.5:20934".to_string());
    }
    Ok(())
}

fn lease_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    // etcd grants leases in whole seconds, and none under about 2 s.
    in_range(d, 2_000, 600_000, "a leadership lease in ms")
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LevelFilter>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(|_| {
        de::Error::custom(format!(
            "`{text}` is not a log level: use off, error, warn, info, debug or trace"
        ))
    })
}

fn positive_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    // Linux takes whole seconds up to 32767 for keepalive times.
    in_range(d, 1, 32_767_000, "a keepalive time in ms")
}

fn probe_count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 1, 127, "a probe count")
}

fn user_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, 0, i32::MAX as u64, "a user timeout in ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_needs_etcd_and_takes_the_rest_from_defaults_and_listen() {
        let c = Config::parse("[cluster]\netcd_endpoints = [\"http://10.0.0.9:2379/\"]\n").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.etcd_endpoints, vec!["10.0.0.9:2379"]);
        assert_eq!(cluster.election, "/pklock/leader");
        assert_eq!(cluster.advertise.as_deref(), Some("127.0.0.1:20934"));
        assert_eq!(cluster.lease_ttl_ms, DEFAULT_LEASE_TTL_MS);

        let error = |text: &str| Config::parse(text).unwrap_err().to_string();
        let wildcard = error(
            "listen = [\"0.0.0.0:20934\"]\n[cluster]\netcd_endpoints = [\"http://e:2379\"]\n",
        );
        assert!(wildcard.contains("cluster.advertise"), "{wildcard}");
        let missing = error("[cluster]\nelection = \"/x\"\n");
        assert!(missing.contains("etcd_endpoints"), "{missing}");
        let https = error("[cluster]\netcd_endpoints = [\"https://e:2379\"]\n");
        assert!(https.contains("only http://"), "{https}");
        let short = error("[cluster]\netcd_endpoints = [\"http://e:2379\"]\nlease_ttl_ms = 500\n");
        assert!(
            short.contains("lease_ttl_ms") && short.contains("2000"),
            "{short}"
        );
        let advertise =
            error("[cluster]\netcd_endpoints = [\"http://e:2379\"]\nadvertise = \"10.0.0.5\"\n");
        assert!(advertise.contains("host:port"), "{advertise}");
        let half = error("[cluster]\netcd_endpoints = [\"http://e:2379\"]\netcd_user = \"pk\"\n");
        assert!(half.contains("go together"), "{half}");
        let typo = error("[cluster]\netcd_endpoints = [\"http://e:2379\"]\nleader = 1\n");
        assert!(typo.contains("leader"), "{typo}");
    }

    #[test]
    fn tls_auth_and_acl_are_read_and_bad_ones_named() {
        let c = Config::parse(include_str!("../config/locked-down.example.toml")).unwrap();
        assert!(c.listen.is_empty());
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.listen, vec!["0.0.0.0:20935".parse().unwrap()]);
        assert!(tls.client_ca_file.is_some());
        assert_eq!(c.acl.len(), 4);
        assert_eq!(c.first_listen(), Some("0.0.0.0:20935".parse().unwrap()));

        let error = |text: &str| Config::parse(text).unwrap_err().to_string();
        let no_listener = error("listen = []\n");
        assert!(no_listener.contains("key `listen`"), "{no_listener}");
        let bad_right =
            error("[[acl]]\nprincipal = \"a\"\nprefixes = [\"x/\"]\nrights = [\"write\"]\n");
        assert!(
            bad_right.contains("line 4") && bad_right.contains("`lock`"),
            "{bad_right}"
        );
        let empty = error("[[acl]]\nprincipal = \"a\"\nprefixes = []\nrights = [\"lock\"]\n");
        assert!(empty.contains("gives nothing"), "{empty}");
        let both = error(
            "listen = [\"127.0.0.1:5\"]\n[tls]\nlisten = [\"127.0.0.1:5\"]\ncert_file = \"c\"\n\
             key_file = \"k\"\n",
        );
        assert!(both.contains("127.0.0.1:5 is in `listen` too"), "{both}");
        let no_key = error("[tls]\nlisten = [\"127.0.0.1:1\"]\ncert_file = \"c\"\n");
        assert!(no_key.contains("key_file"), "{no_key}");
    }

    #[test]
    fn empty_text_gives_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::default();
        assert_eq!(c.listen, vec!["127.0.0.1:20934".parse().unwrap()]);
        assert!(c.allowed.permits("::1".parse().unwrap()));
        assert!(!c.allowed.permits("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn every_key_is_read() {
        let c = Config::parse(
            r#"
            listen = ["0.0.0.0:1", "[::]:2"]
            allowed = ["10.0.0.0/8"]
            max_connections = 3
            max_message_bytes = 4096
            max_output_bytes = 8192
            max_locks_per_connection = 6
            max_lock_entries = 7
            state_file = "/tmp/tokens"
            restart_grace_ms = 0
            log_level = "debug"
            [keepalive]
            idle_ms = 7
            interval_ms = 8
            probes = 9
            user_timeout_ms = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.len(), 2);
        assert!(c.allowed.permits("10.9.9.9".parse().unwrap()));
        assert_eq!(
            (
                c.max_connections,
                c.max_message_bytes,
                c.max_output_bytes,
                c.max_locks_per_connection,
                c.max_lock_entries
            ),
            (3, 4096, 8192, 6, 7)
        );
        assert_eq!(c.state_file, Some(PathBuf::from("/tmp/tokens")));
        assert_eq!(c.restart_grace_ms, Some(0));
        assert_eq!(c.log_level, Some(LevelFilter::Debug));
        assert_eq!(
            c.keepalive,
            KeepaliveConfig {
                idle_ms: 7,
                interval_ms: 8,
                probes: 9,
                user_timeout_ms: 0
            }
        );
    }

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = error_of("listen = [\"127.0.0.1:1\"]\nmax_conections = 5\n");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("max_conections"), "{e}");
    }

    #[test]
    fn unknown_key_in_a_section_is_named() {
        let e = error_of("[keepalive]\nidle_ms = 5\nidel = 3\n");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("idel"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = error_of("\n\nmax_connections = \"many\"\n");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("key `max_connections`"), "{e}");
        let e = error_of("[keepalive]\nprobes = 1.5\n");
        assert!(
            e.contains("line 2") && e.contains("keepalive.probes"),
            "{e}"
        );
    }

    #[test]
    fn bad_addresses_are_named() {
        let e = error_of("listen = [\"127.0.0.1\"]\n");
        assert!(
            e.contains("line 1") && e.contains("key `listen`") && e.contains("`127.0.0.1`"),
            "{e}"
        );
        let e = error_of("\nallowed = [\"127.0.0.1\", \"10.0.0/8\"]\n");
        assert!(
            e.contains("line 2") && e.contains("key `allowed`") && e.contains("10.0.0/8"),
            "{e}"
        );
        let e = error_of("listen = []\n");
        assert!(e.contains("at least one"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for text in [
            "max_connections = 0",
            "max_message_bytes = 10",
            "max_message_bytes = 5000000000",
            "max_output_bytes = 100",
            "max_locks_per_connection = 0",
            "max_lock_entries = 0",
            "[keepalive]\nidle_ms = 0",
            "[keepalive]\nprobes = 128",
            "[keepalive]\nuser_timeout_ms = -1",
            "restart_grace_ms = 3600001",
            "log_level = \"verbose\"",
        ] {
            assert!(Config::parse(text).is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn syntax_errors_give_a_line() {
        let e = error_of("listen = [\n");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/pklock.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/pklock.toml") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn shipped_example_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/settings.example.toml");
        let example = Config::load(&path).unwrap();
        assert_eq!(
            example,
            Config {
                state_file: example.state_file.clone(),
                ..Config::default()
            }
        );
    }
}
