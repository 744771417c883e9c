//! The `pklock` command's subcommands, for ops scripts: `run` a command under
//! a lock, `lock` and hold, `status`, `stats`, `ping`, `release --force`;
//! and for the operator, `server` (the lock server itself), `completions`
//! and `man`; and `test_client`, the original's demonstration client. Exit
//! codes follow flock(1) and sysexits(3) where they apply; bin/pklock.rs
//! only parses arguments.

pub mod hold;
pub mod manual;
pub mod release;
pub mod report;
pub mod run;
pub mod server;
pub mod test_client;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::client::{
    AuthToken, Client, ClientCert, ClientOptions, Error, LockGuard, LockOptions, MultiGuard,
    Resumed, Roots, TLS_SCHEME, TlsOptions, TlsProblem, Within, longest_stop_time,
};
use crate::protocol::MAX_CLIENT_NAME_BYTES;

/// The default server address, as the original.
pub const DEFAULT_SERVER: &str = "127.0.0.1:20934";

/// Exit codes.
pub mod exit {
    /// The lock was not granted in time (flock -E's default).
    pub const CONFLICT: u8 = 1;
    /// Bad arguments (EX_USAGE, as flock).
    pub const USAGE: u8 = 64;
    /// The server cannot be reached or refused the request (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// The server refused the auth token, or denied a request outside this
    /// client's rights (EX_NOPERM).
    pub const NOPERM: u8 = 77;
    /// The server answered something unexpected (EX_SOFTWARE).
    pub const SOFTWARE: u8 = 70;
    /// The lock was lost while held: server gone, connection broken, lease
    /// expired (EX_TEMPFAIL: try again later).
    pub const LOST: u8 = 75;
    /// An output file could not be written (EX_CANTCREAT).
    pub const CANT_CREATE: u8 = 73;
    /// Waiting for the lock would have closed a cycle of connections
    /// waiting for each other (Linux's EDEADLK).
    pub const DEADLOCK: u8 = 35;
    /// The command was found but could not be run.
    pub const CANNOT_RUN: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// A subcommand that ends with a message on stderr and an exit code.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// How to speak to the servers beyond their addresses: TLS and the auth
/// token (`pklock`'s global flags).
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `--tls`: TLS for every address (a `tls://` address has it anyway).
    pub tls: bool,
    /// `--ca`: the CA certificates that sign the servers' certificates.
    pub ca: Option<PathBuf>,
    /// `--cert`: a client certificate for servers that require one.
    pub cert: Option<PathBuf>,
    /// `--key`: its private key.
    pub key: Option<PathBuf>,
    /// `--auth-file`: a file whose first line is the auth token.
    pub auth_file: Option<PathBuf>,
}

impl Access {
    /// Sets `options`' TLS settings and token for `server` (the list); a
    /// usage failure when TLS is asked for without `--ca`, a certificate
    /// without TLS, or the token file cannot be read.
    pub fn apply(&self, server: &str, options: &mut ClientOptions) -> Result<(), Failure> {
        let wants_tls = self.tls || server.split(',').any(|a| a.starts_with(TLS_SCHEME));
        let client_cert = match (&self.cert, &self.key) {
            (Some(cert_file), Some(key_file)) => Some(ClientCert {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            (None, None) => None,
            _ => return Err(Failure::new(exit::USAGE, "--cert and --key go together")),
        };
        options.tls = match (wants_tls, &self.ca) {
            (false, _) if client_cert.is_some() => {
                return Err(Failure::new(
                    exit::USAGE,
                    "--cert and --key are for TLS: add --tls, or write the address tls://HOST:PORT",
                ));
            }
            (false, _) => None,
            (true, None) => {
                return Err(Failure::new(
                    exit::USAGE,
                    "TLS needs --ca FILE (or PKLOCK_CA): the CA certificate that signed the \
                     server's certificate",
                ));
            }
            (true, Some(ca)) => Some(TlsOptions {
                roots: Roots::CaFile(ca.clone()),
                client_cert,
                every_address: self.tls,
            }),
        };
        options.auth = match &self.auth_file {
            Some(path) => Some(
                AuthToken::from_file(path)
                    .map_err(|e| Failure::new(exit::USAGE, format!("--auth-file: {e}")))?,
            ),
            None => None,
        };
        Ok(())
    }

    /// `e`'s message, naming the flag behind a TLS setting where that helps.
    fn explain(&self, e: &Error) -> String {
        match (e, &self.ca) {
            (
                Error::Tls {
                    server,
                    problem: TlsProblem::UnknownIssuer { .. },
                },
                Some(ca),
            ) => format!(
                "TLS with {server} failed: its certificate is not signed by a CA in --ca {}",
                ca.display()
            ),
            _ => e.to_string(),
        }
    }
}

/// How to take the lock, for `run` and `lock`.
#[derive(Clone, Debug)]
pub struct Acquire {
    /// Server address.
    pub server: String,
    /// TLS and the auth token.
    pub access: Access,
    /// Lock names: one, or several taken together in one request (one
    /// token for all).
    pub names: Vec<String>,
    /// `None` waits for ever; zero tries once.
    pub wait: Option<Duration>,
    /// Shared instead of exclusive (every name).
    pub shared: bool,
    /// A semaphore of this many permits (one name only).
    pub permits: Option<u32>,
    /// How many of the semaphore's permits to take.
    pub take: u32,
    /// Exit code when the lock is not granted.
    pub conflict_code: u8,
    /// Exit code when the lock is lost while held.
    pub lost_code: u8,
}

impl Acquire {
    /// Refuses what cannot be asked (exit 64): no name, a name given twice,
    /// `--permits` with several names, `--take` past `--permits`, several
    /// names one of which holds a line break (PKLOCK_NAMES could not list it).
    pub fn check(&self) -> Result<(), Failure> {
        let usage = |message: String| Err(Failure::new(exit::USAGE, message));
        if self.names.is_empty() {
            return usage("no lock name given".to_string());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = self.names.iter().find(|name| !seen.insert(name.as_str())) {
            return usage(format!("lock {twice:?} is named twice"));
        }
        if let Some(permits) = self.permits {
            if self.names.len() > 1 {
                return usage(format!(
                    "--permits takes one lock name, not {}: a semaphore is taken on its own",
                    self.names.len()
                ));
            }
            if self.take > permits {
                return usage(format!(
                    "--take {} is more than the {permits} permits of the semaphore",
                    self.take
                ));
            }
        }
        if self.names.len() > 1 {
            if let Some(name) = self.names.iter().find(|name| name.contains('\n')) {
                return usage(format!(
                    "lock {name:?} has a line break in its name, so PKLOCK_NAMES could not list \
                     it among others: take it on its own"
                ));
            }
        }
        Ok(())
    }

    /// The locks, for messages: `lock "a"`, or `locks "a", "b"`.
    pub fn what(&self) -> String {
        let names: Vec<String> = self.names.iter().map(|name| format!("{name:?}")).collect();
        match names.len() {
            1 => format!("lock {}", names[0]),
            _ => format!("locks {}", names.join(", ")),
        }
    }

    /// Whether several locks are asked for.
    pub fn several(&self) -> bool {
        self.names.len() > 1
    }

    /// The names separated by blanks, for the client name `status` shows.
    fn listed(&self) -> String {
        self.names.join(" ")
    }
}

/// The lock, or the locks, `run` and `lock` hold: one grant, one token.
#[derive(Debug)]
pub enum Held {
    /// One name (or one semaphore's permits).
    One(LockGuard),
    /// Several names, taken together.
    All(MultiGuard),
}

impl Held {
    /// The grant's fencing token.
    pub fn token(&self) -> u64 {
        match self {
            Held::One(guard) => guard.token(),
            Held::All(guard) => guard.token(),
        }
    }

    /// Releases the lock (every name) and waits for the server to confirm.
    pub fn unlock(self) -> Result<(), Error> {
        match self {
            Held::One(guard) => guard.unlock(),
            Held::All(guard) => guard.unlock(),
        }
    }
}

/// How long `run` may take to stop its command after a loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopTime {
    /// Asked for: refused if the server's release time cannot cover it.
    Exactly(Duration),
    /// The default: this, or less if that is all the server allows.
    AtMost(Duration),
}

/// `HOST:PORT`, or several separated by commas, each with a port number
/// and perhaps `tls://` before it: `--server` and `PKLOCK_SERVER`. Returns
/// the list as the client library takes it (blanks around the commas removed).
pub fn server_list(text: &str) -> Result<String, String> {
    let mut addresses = Vec::new();
    for address in text.split(',').map(str::trim) {
        if address.is_empty() {
            return Err(match text.trim().is_empty() {
                true => {
                    "no server address given: HOST:PORT, or several separated by commas".to_string()
                }
                false => format!(
                    "`{text}` has an empty address in it: separate HOST:PORT addresses by \
                     single commas"
                ),
            });
        }
        let host_port = address.strip_prefix(TLS_SCHEME).unwrap_or(address);
        if let Some((scheme, _)) = host_port.split_once("://") {
            return Err(format!(
                "`{address}`: the scheme `{scheme}://` is unknown; write HOST:PORT, or \
                 tls://HOST:PORT for TLS"
            ));
        }
        match host_port.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                addresses.push(address);
            }
            _ => {
                let within = match address == text {
                    true => String::new(),
                    false => format!(" (in `{text}`)"),
                };
                return Err(format!(
                    "`{address}`{within} is not HOST:PORT, such as 127.0.0.1:20934 or \
                     locks.internal:20934"
                ));
            }
        }
    }
    Ok(addresses.join(","))
}

/// Connects with a client name that says who is asking, from where, and
/// with `access`'s TLS and token; `stop_time` is `run`'s kill grace (zero
/// for the others).
pub fn connect(
    server: &str,
    access: &Access,
    what: &str,
    stop_time: StopTime,
) -> Result<Client, Failure> {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let (stop_time, fit_stop_time) = match stop_time {
        StopTime::Exactly(d) => (d, false),
        StopTime::AtMost(d) => (d, true),
    };
    let mut options = ClientOptions {
        stop_time,
        fit_stop_time,
        // Inside `pklock run`, the run's holder waits for what this waits
        // for: the server sees deadlocks between nested runs.
        within: Within::from_env(),
        ..ClientOptions::named(client_name(what, &host))
    };
    access.apply(server, &mut options)?;
    let connected = Client::connect(server, &options).inspect(|client| {
        client.on_resumed(|resumed| say(format_args!("{}", resumed_message(resumed))));
    });
    connected.map_err(|e| match e {
        // Nothing the user asked for can fit a server that says it may
        // release at once.
        Error::UnsafeLease {
            earliest_release, ..
        } if earliest_release.is_zero() => Failure::new(exit::SOFTWARE, e.to_string()),
        Error::UnsafeLease {
            earliest_release, ..
        } if !stop_time.is_zero() => Failure::new(
            exit::USAGE,
            format!(
                "--kill-grace {} is too long for this server, which may release a silent \
                 client's locks {} after it last heard from it; use at most {}",
                millis(stop_time),
                millis(earliest_release),
                millis(longest_stop_time(earliest_release))
            ),
        ),
        Error::UnsafeLease { .. } | Error::TlsConfig(_) => Failure::new(exit::USAGE, e.to_string()),
        Error::AuthFailed { .. } | Error::PermissionDenied { .. } => {
            Failure::new(exit::NOPERM, e.to_string())
        }
        Error::Connect { .. }
        | Error::Refused { .. }
        | Error::Denied(_)
        | Error::Tls { .. }
        | Error::TlsRequired { .. } => Failure::new(exit::UNAVAILABLE, access.explain(&e)),
        _ => Failure::new(exit::SOFTWARE, e.to_string()),
    })
}

/// What `pklock` says when it carried on over a new connection: naming the
/// new server when a cluster's leader changed.
fn resumed_message(resumed: &Resumed) -> String {
    let previous = &resumed.previous;
    let after = resumed.after.as_millis();
    let mut message = match resumed.server == *previous {
        true => {
            format!("the server at {previous} closed the connection; reconnected after {after} ms")
        }
        false => format!(
            "the connection to the server at {previous} ended; reconnected to {} after {after} ms",
            resumed.server
        ),
    };
    if !resumed.reclaimed.is_empty() {
        let locks: Vec<String> = resumed
            .reclaimed
            .iter()
            .map(|name| format!("{name:?}"))
            .collect();
        message += &format!(" and reclaimed {}", locks.join(", "));
    }
    message
}

/// `what (host pid N)`, cut to the server's limit on client names.
fn client_name(what: &str, host: &str) -> String {
    let suffix = format!(" ({host} pid {})", std::process::id());
    let room = MAX_CLIENT_NAME_BYTES.saturating_sub(suffix.len() + 3);
    let mut what = what.to_string();
    if what.len() > room {
        let mut cut = room;
        while !what.is_char_boundary(cut) {
            cut -= 1;
        }
        what.truncate(cut);
        what.push_str("...");
    }
    what + &suffix
}

/// Takes the lock as `acquire` says, or fails with the conflict code.
pub fn take(client: &Client, acquire: &Acquire) -> Result<Held, Failure> {
    acquire.check()?;
    let mut options = match acquire.shared {
        true => LockOptions::shared(),
        false => LockOptions::exclusive(),
    };
    options.wait = acquire.wait;
    if let Some(permits) = acquire.permits {
        options = options.permits(permits).take(acquire.take);
    }
    let taken = match acquire.names.as_slice() {
        [name] => client.lock(name, &options).map(Held::One),
        names => client.lock_all(names, &options).map(Held::All),
    };
    taken.map_err(|e| not_taken(acquire, e, client.grants_resume_in()))
}

/// The failure for a lock not taken; `grace`: how long until the server
/// grants again after its restart.
fn not_taken(acquire: &Acquire, e: Error, grace: Duration) -> Failure {
    let what = acquire.what();
    match e {
        Error::NotGranted => {
            let how = match acquire.wait {
                _ if !grace.is_zero() => "not granted: the server is still in its restart \
                                          grace (restart_grace_ms)"
                    .to_string(),
                Some(wait) if wait.is_zero() && acquire.several() => {
                    "not all free now: some are held elsewhere".to_string()
                }
                Some(wait) if wait.is_zero() => "it is held elsewhere".to_string(),
                Some(wait) => format!("not granted within {}", human(wait)),
                None => "not granted".to_string(),
            };
            Failure::new(acquire.conflict_code, format!("{what}: {how}"))
        }
        Error::Deadlock { .. } => Failure::new(exit::DEADLOCK, e.to_string()),
        // Said from what the server sent, in the flags' words.
        Error::PermitsMismatch { lock, permits, .. } => {
            let asked = match acquire.permits {
                Some(asked) => format!(", not {asked}"),
                None => String::new(),
            };
            Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "lock {lock:?} is a semaphore of {permits} permits{asked}: use --permits \
                     {permits}"
                ),
            )
        }
        Error::Lost(reason) => Failure::new(exit::UNAVAILABLE, format!("{what}: {reason}")),
        Error::PermissionDenied { .. } => Failure::new(exit::NOPERM, e.to_string()),
        Error::Refused { .. } | Error::Denied(_) => {
            Failure::new(exit::UNAVAILABLE, format!("{what}: {e}"))
        }
        Error::InvalidRequest(_) => Failure::new(exit::USAGE, format!("{what}: {e}")),
        other => Failure::new(exit::SOFTWARE, format!("{what}: {other}")),
    }
}

/// Writes `pklock: MESSAGE` on stderr and never fails: stderr may be a
/// closed pipe, and a panic there would drop a lock while its work runs.
pub fn say(message: std::fmt::Arguments<'_>) {
    say_as("pklock", message);
}

/// Writes `PROGRAM: MESSAGE` on stderr in one `write`. stderr is
/// unbuffered, and the command under `pklock run` shares it: a line written
/// piece by piece could come out with the command's own words inside it.
pub fn say_as(program: &str, message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let line = format!("{program}: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `1400 ms`, or `1400.5 ms` when whole milliseconds would blur the limit.
fn millis(d: Duration) -> String {
    match d.subsec_nanos() % 1_000_000 {
        0 => format!("{} ms", d.as_millis()),
        _ => {
            let ms = format!("{:.6}", d.as_secs_f64() * 1000.0);
            format!("{} ms", ms.trim_end_matches('0').trim_end_matches('.'))
        }
    }
}

/// `1.5s`, `250ms`, `2m3s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 if ms % 1000 == 0 => format!("{}s", ms / 1000),
        1000..60_000 => format!("{:.1}s", d.as_secs_f64()),
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_client_names_are_cut_to_the_server_limit() {
        let name = client_name(&format!("pklock run {}", "é".repeat(600)), "host");
        assert!(name.len() <= MAX_CLIENT_NAME_BYTES, "{} bytes", name.len());
        assert!(
            name.starts_with("pklock run é") && name.contains("...") && name.contains("(host pid")
        );
        assert_eq!(
            client_name("pklock run x", "h"),
            format!("pklock run x (h pid {})", std::process::id())
        );
    }

    #[test]
    fn server_lists_are_checked_address_by_address() {
        assert_eq!(server_list("a:1").as_deref(), Ok("a:1"));
        assert_eq!(server_list("a:1, b:2").as_deref(), Ok("a:1,b:2"));
        assert_eq!(server_list("[::1]:5,b:2").as_deref(), Ok("[::1]:5,b:2"));
        let error = |text| server_list(text).unwrap_err();
        assert_eq!(
            error("localhost"),
            "`localhost` is not HOST:PORT, such as 127.0.0.1:20934 or locks.internal:20934"
        );
        assert!(error("a:1,b").starts_with("`b` (in `a:1,b`) is not HOST:PORT"));
        assert!(error("a:1,:2").starts_with("`:2` (in `a:1,:2`) is not HOST:PORT"));
        assert!(error("a:1,b:99999").starts_with("`b:99999` (in"));
        assert!(error("a:1,,b:2").contains("`a:1,,b:2` has an empty address"));
        assert!(error("a:1,").contains("has an empty address"));
        assert!(error("").starts_with("no server address given"));
        assert_eq!(
            server_list("tls://a:1, b:2").as_deref(),
            Ok("tls://a:1,b:2")
        );
        assert!(error("tls://a").starts_with("`tls://a` is not HOST:PORT"));
        assert!(error("a:1,http://b:2").contains("the scheme `http://` is unknown"));
    }

    #[test]
    fn tls_needs_a_ca_and_certificates_need_tls() {
        let apply = |access: &Access, server: &str| {
            let mut options = ClientOptions::default();
            access.apply(server, &mut options).map(|()| options)
        };
        let none = Access::default();
        assert!(apply(&none, "a:1").unwrap().tls.is_none());
        let failure = apply(&none, "a:1,tls://b:2").unwrap_err();
        assert_eq!(failure.code, exit::USAGE);
        assert!(failure.message.starts_with("TLS needs --ca FILE"));
        let with_ca = Access {
            ca: Some("ca.pem".into()),
            ..Access::default()
        };
        let tls = apply(&with_ca, "tls://b:2").unwrap().tls.unwrap();
        assert!(!tls.every_address, "only the tls:// address");
        let everywhere = Access {
            tls: true,
            ..with_ca.clone()
        };
        assert!(
            apply(&everywhere, "a:1")
                .unwrap()
                .tls
                .unwrap()
                .every_address
        );
        let cert_only = Access {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..with_ca
        };
        assert!(
            apply(&cert_only, "a:1")
                .unwrap_err()
                .message
                .starts_with("--cert and --key are for TLS")
        );
    }

    #[test]
    fn the_resume_message_names_the_new_server_only_when_it_changed() {
        let mut resumed = Resumed {
            after: Duration::from_millis(40),
            reclaimed: vec!["a".into(), "b".into()],
            server: "x:1".into(),
            previous: "x:1".into(),
        };
        assert_eq!(
            resumed_message(&resumed),
            "the server at x:1 closed the connection; reconnected after 40 ms and reclaimed \
             \"a\", \"b\""
        );
        resumed.server = "y:2".into();
        resumed.reclaimed.clear();
        assert_eq!(
            resumed_message(&resumed),
            "the connection to the server at x:1 ended; reconnected to y:2 after 40 ms"
        );
    }

    fn acquire(names: &[&str]) -> Acquire {
        Acquire {
            server: DEFAULT_SERVER.to_string(),
            access: Access::default(),
            names: names.iter().map(|n| n.to_string()).collect(),
            wait: None,
            shared: false,
            permits: None,
            take: 1,
            conflict_code: exit::CONFLICT,
            lost_code: exit::LOST,
        }
    }

    #[test]
    fn what_cannot_be_asked_is_a_usage_error() {
        let refused = |acquire: Acquire| {
            let failure = acquire.check().unwrap_err();
            assert_eq!(failure.code, exit::USAGE, "{failure}");
            failure.message
        };
        assert!(acquire(&["a"]).check().is_ok());
        assert!(acquire(&["a", "b", "c"]).check().is_ok());
        let semaphore = Acquire {
            permits: Some(3),
            take: 3,
            ..acquire(&["api"])
        };
        assert!(semaphore.check().is_ok());
        assert_eq!(
            refused(Acquire {
                names: vec!["api".into(), "db".into()],
                ..semaphore.clone()
            }),
            "--permits takes one lock name, not 2: a semaphore is taken on its own"
        );
        assert_eq!(
            refused(Acquire {
                take: 4,
                ..semaphore
            }),
            "--take 4 is more than the 3 permits of the semaphore"
        );
        assert_eq!(
            refused(acquire(&["a", "b", "a"])),
            "lock \"a\" is named twice"
        );
        assert!(refused(acquire(&["a", "x\ny"])).contains("line break"));
        // Alone, its name is PKLOCK_NAME as it is.
        assert!(acquire(&["x\ny"]).check().is_ok());
        assert_eq!(refused(acquire(&[])), "no lock name given");
    }

    #[test]
    fn messages_name_the_lock_or_the_locks() {
        assert_eq!(acquire(&["a"]).what(), "lock \"a\"");
        assert_eq!(acquire(&["a", "b c"]).what(), "locks \"a\", \"b c\"");
        let no_wait = |names: &[&str]| Acquire {
            wait: Some(Duration::ZERO),
            ..acquire(names)
        };
        let failure = not_taken(&no_wait(&["a"]), Error::NotGranted, Duration::ZERO);
        assert_eq!(
            (failure.code, failure.message.as_str()),
            (exit::CONFLICT, "lock \"a\": it is held elsewhere")
        );
        let failure = not_taken(&no_wait(&["a", "b"]), Error::NotGranted, Duration::ZERO);
        assert_eq!(
            failure.message,
            "locks \"a\", \"b\": not all free now: some are held elsewhere"
        );
    }

    #[test]
    fn a_deadlock_exits_35_with_the_cycle_on_one_line() {
        let cycle = vec![
            crate::client::CycleStep {
                conn: 7,
                client: "A".into(),
                lock_name: "y".into(),
            },
            crate::client::CycleStep {
                conn: 9,
                client: "B".into(),
                lock_name: "x".into(),
            },
        ];
        let failure = not_taken(&acquire(&["y"]), Error::Deadlock { cycle }, Duration::ZERO);
        assert_eq!(failure.code, 35);
        assert_eq!(
            failure.message,
            "deadlock: this wait would close a cycle: conn 7 (A) waits for \"y\", held by conn \
             9 (B), which waits for \"x\", held by conn 7"
        );
    }

    #[test]
    fn a_semaphore_of_other_permits_says_which_to_use() {
        let error = || Error::PermitsMismatch {
            lock: "api".into(),
            permits: 5,
            error: "lock \"api\" is a semaphore of 5 permits, not 3".into(),
        };
        let asked = Acquire {
            permits: Some(3),
            ..acquire(&["api"])
        };
        let failure = not_taken(&asked, error(), Duration::ZERO);
        assert_eq!(failure.code, exit::UNAVAILABLE);
        assert_eq!(
            failure.message,
            "lock \"api\" is a semaphore of 5 permits, not 3: use --permits 5"
        );
        let failure = not_taken(&acquire(&["api"]), error(), Duration::ZERO);
        assert_eq!(
            failure.message,
            "lock \"api\" is a semaphore of 5 permits: use --permits 5"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(123)), "2m3s");
    }

    #[test]
    fn limits_in_milliseconds_never_round_onto_each_other() {
        assert_eq!(millis(Duration::from_millis(1400)), "1400 ms");
        assert_eq!(millis(Duration::from_micros(1_400_500)), "1400.5 ms");
        assert_eq!(
            millis(Duration::from_nanos(1_400_000_001)),
            "1400.000001 ms"
        );
    }
}
