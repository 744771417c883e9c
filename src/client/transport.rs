//! The client's byte stream to one server: plain TCP, or TLS (rustls) over
//! TCP. Owns the TLS settings (trust anchors, client certificate), the
//! handshake, and the naming of TLS failures in terms a user can act on.
//!
//! A connection is split as the session uses it: a reader (its thread
//! alone), a writer (behind the session's lock) and the raw socket for
//! shutting down. Over TLS the reader and the writer share the rustls
//! state under a mutex, but read and write the socket outside it, so a
//! blocked write never stops the reader from taking replies in.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore};

use crate::frame;

/// The scheme that asks for TLS for one address.
pub const TLS_SCHEME: &str = "tls://";

/// Raw bytes read from the socket at a time over TLS: one whole record.
const RAW_READ_BYTES: usize = 16 * 1024 + 256;

/// How a client speaks TLS ([`ClientOptions::tls`](super::ClientOptions::tls)).
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// Whose signature makes a server certificate trusted.
    pub roots: Roots,
    /// A certificate to show the server (one that requires them).
    pub client_cert: Option<ClientCert>,
    /// TLS for every address; otherwise only for those written `tls://HOST:PORT`.
    pub every_address: bool,
}

impl TlsOptions {
    /// TLS for every address, trusting the CA certificates in `ca_file`.
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> TlsOptions {
        TlsOptions {
            roots: Roots::CaFile(ca_file.into()),
            client_cert: None,
            every_address: true,
        }
    }
}

/// The trust anchors for server certificates.
#[derive(Clone, Debug)]
pub enum Roots {
    /// The CA certificates in a PEM file.
    CaFile(PathBuf),
    /// A root store built by the caller.
    Store(Arc<RootCertStore>),
}

/// A client certificate chain and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// The certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Why TLS with a server could not be set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsProblem {
    /// The server's certificate is not signed by a trusted CA.
    UnknownIssuer {
        /// Which CAs were trusted: `a CA in FILE`, or `a trusted CA`.
        trusted: String,
    },
    /// The server's certificate has expired, or is not valid yet.
    Expired(String),
    /// The server's certificate is not valid for the name dialed.
    NameMismatch {
        /// The name checked (the host part of the address).
        name: String,
        /// The names the certificate is valid for.
        presented: Vec<String>,
    },
    /// Something else is wrong with the server's certificate.
    BadCertificate(String),
    /// What answers does not speak TLS (most likely the plain port).
    NotTls(String),
    /// The server requires a client certificate and none was given.
    ClientCertRequired,
    /// The server refused the client certificate (the TLS alert it sent).
    ClientCertRefused(String),
    /// The handshake failed otherwise.
    Handshake(String),
}

impl fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsProblem::UnknownIssuer { trusted } => {
                write!(f, "its certificate is not signed by {trusted}")
            }
            TlsProblem::Expired(detail) => write!(f, "its certificate {detail}"),
            TlsProblem::NameMismatch { name, presented } => {
                write!(f, "its certificate is not valid for {name:?}")?;
                match presented.is_empty() {
                    true => Ok(()),
                    false => write!(f, " (it names {})", presented.join(", ")),
                }
            }
            TlsProblem::BadCertificate(detail) => write!(f, "its certificate is refused: {detail}"),
            TlsProblem::NotTls(detail) => {
                write!(f, "it does not speak TLS: is it the plain port? ({detail})")
            }
            TlsProblem::ClientCertRequired => f.write_str(
                "the server requires a client certificate, and none was given (--cert and --key)",
            ),
            TlsProblem::ClientCertRefused(alert) => {
                write!(f, "the server refused our client certificate ({alert})")
            }
            TlsProblem::Handshake(detail) => write!(f, "the TLS handshake failed: {detail}"),
        }
    }
}

/// TLS settings loaded once, for every dial of a client.
pub(crate) struct Tls {
    config: Arc<ClientConfig>,
    /// For messages: which CAs are trusted.
    trusted: String,
    has_client_cert: bool,
    every_address: bool,
}

impl Tls {
    /// Reads the files `options` names and builds the rustls configuration.
    pub(crate) fn load(options: &TlsOptions) -> Result<Tls, String> {
        let (roots, trusted) = match &options.roots {
            Roots::Store(store) => (Arc::clone(store), "a trusted CA".to_string()),
            Roots::CaFile(path) => (
                Arc::new(crate::tls::read_roots(path)?),
                format!("a CA in {}", path.display()),
            ),
        };
        let builder = ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match &options.client_cert {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let chain = crate::tls::read_certificates(&client.cert_file)?;
                let key = PrivateKeyDer::from_pem_file(&client.key_file).map_err(|e| {
                    format!(
                        "cannot read a private key from {}: {e}",
                        client.key_file.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "the client certificate {} and key {} cannot be used together: {e}",
                        client.cert_file.display(),
                        client.key_file.display()
                    )
                })?
            }
        };
        Ok(Tls {
            config: Arc::new(config),
            trusted,
            has_client_cert: options.client_cert.is_some(),
            every_address: options.every_address,
        })
    }

    /// The TLS problem behind an error reading or writing a connection to
    /// `host_port` made with these settings, if that is what it is.
    pub(crate) fn problem(&self, e: &io::Error, host_port: &str) -> Option<TlsProblem> {
        let name = server_name(host_port).ok()?;
        tls_problem(e, self.has_client_cert, &self.trusted, &name)
    }

    /// Whether a client certificate is shown to servers.
    pub(crate) fn has_client_cert(&self) -> bool {
        self.has_client_cert
    }

    /// Whether every address is dialed with TLS.
    pub(crate) fn every_address(&self) -> bool {
        self.every_address
    }

    /// Whether `address` (as given, perhaps with `tls://`) is dialed with TLS.
    pub(crate) fn covers(&self, address: &str) -> bool {
        self.every_address || address.starts_with(TLS_SCHEME)
    }
}

/// `tls://host:port` -> (true, `host:port`); anything else is itself.
pub(crate) fn split_scheme(address: &str) -> (bool, &str) {
    match address.strip_prefix(TLS_SCHEME) {
        Some(rest) => (true, rest),
        None => (false, address),
    }
}

/// The name a server's certificate must be valid for: the host part of
/// `host:port` (a DNS name, or an IP address, IPv6 in brackets).
pub(crate) fn server_name(host_port: &str) -> Result<ServerName<'static>, String> {
    let host = match host_port.rsplit_once(':') {
        Some((host, _port)) => host,
        None => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is neither a DNS name nor an IP address"))
}

/// Why [`connect`] failed.
pub(crate) enum DialError {
    /// No TCP connection, or it broke during the handshake.
    Io(io::Error),
    /// TLS could not be agreed.
    Tls(TlsProblem),
    /// What answered the ClientHello was a pklock error frame in plain
    /// text (`denied`, `tooManyConnections`): the word and its detail.
    Refused(String, String),
}

/// A connection, before it is split.
pub(crate) struct Connection {
    socket: TcpStream,
    tls: Option<Arc<TlsShared>>,
}

/// The rustls state shared by the reader and the writer of a connection.
pub(crate) struct TlsShared {
    state: Mutex<TlsState>,
    /// The socket's write side; taken before `state` when both are held,
    /// so that records reach the socket in the order they were sealed.
    out: Mutex<TcpStream>,
}

struct TlsState {
    conn: ClientConnection,
    /// Records sealed and not yet written to the socket.
    outgoing: Vec<u8>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TlsShared {
    /// Writes every sealed record to the socket, in order; `out` is the
    /// socket's write side, locked by the caller.
    fn flush(&self, out: &mut TcpStream) -> io::Result<()> {
        loop {
            let bytes = std::mem::take(&mut locked(&self.state).outgoing);
            if bytes.is_empty() {
                return Ok(());
            }
            out.write_all(&bytes)?;
        }
    }
}

/// Connects to `host_port` (trying each address it resolves to) within
/// `timeout`, and with `tls`, completes the handshake for `host_port`'s host.
pub(crate) fn connect(
    host_port: &str,
    tls: Option<&Tls>,
    timeout: Duration,
) -> Result<Connection, DialError> {
    let socket = connect_tcp(host_port, timeout).map_err(DialError::Io)?;
    socket.set_nodelay(true).map_err(DialError::Io)?;
    let Some(tls) = tls else {
        return Ok(Connection { socket, tls: None });
    };
    let name = server_name(host_port).map_err(|e| DialError::Tls(TlsProblem::Handshake(e)))?;
    let mut conn = ClientConnection::new(Arc::clone(&tls.config), name.clone())
        .map_err(|e| DialError::Tls(TlsProblem::Handshake(e.to_string())))?;
    // Frames are sealed whole, however large; the session bounds them.
    conn.set_buffer_limit(None);
    let mut socket = socket;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(DialError::Io)?;
    socket
        .set_write_timeout(Some(timeout))
        .map_err(DialError::Io)?;
    let mut recording = Recording {
        socket: &mut socket,
        seen: Vec::new(),
    };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut recording) {
            return Err(handshake_error(e, &recording.seen, tls, &name));
        }
    }
    socket.set_read_timeout(None).map_err(DialError::Io)?;
    socket.set_write_timeout(None).map_err(DialError::Io)?;
    let out = socket.try_clone().map_err(DialError::Io)?;
    Ok(Connection {
        socket,
        tls: Some(Arc::new(TlsShared {
            state: Mutex::new(TlsState {
                conn,
                outgoing: Vec::new(),
            }),
            out: Mutex::new(out),
        })),
    })
}

fn connect_tcp(server: &str, timeout: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = server.to_socket_addrs()?.collect();
    let mut last_error = io::Error::new(ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// The socket during the handshake, keeping the first bytes the server
/// sent: if they are not TLS, they may be a pklock frame saying why.
struct Recording<'a> {
    socket: &'a mut TcpStream,
    seen: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.socket.read(buf)?;
        let room = 4096usize.saturating_sub(self.seen.len());
        self.seen.extend_from_slice(&buf[..n.min(room)]);
        Ok(n)
    }
}

impl Write for Recording<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

/// Names a failed handshake: the server's certificate, ours, or a peer
/// that does not speak TLS (whose plain-text answer, if it is a pklock
/// frame, says more).
fn handshake_error(e: io::Error, seen: &[u8], tls: &Tls, name: &ServerName<'_>) -> DialError {
    if let Some(problem) = tls_problem(&e, tls.has_client_cert, &tls.trusted, name) {
        if let TlsProblem::NotTls(_) = problem {
            if let Some((word, detail)) = plain_error_frame(seen) {
                return match word.as_str() {
                    // A plain port reads the ClientHello as a huge length.
                    "messageTooLarge" => DialError::Tls(TlsProblem::NotTls(
                        "it answered in plain text that our message was too large".to_string(),
                    )),
                    _ => DialError::Refused(word, detail),
                };
            }
        }
        return DialError::Tls(problem);
    }
    match e.kind() {
        ErrorKind::UnexpectedEof => DialError::Tls(TlsProblem::Handshake(
            "the server closed the connection during the handshake".to_string(),
        )),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => DialError::Tls(TlsProblem::Handshake(
            "no answer to the TLS handshake in time".to_string(),
        )),
        _ => DialError::Io(e),
    }
}

/// An error frame (`{"error": WORD, "detail": ...}`) at the start of `seen`.
fn plain_error_frame(seen: &[u8]) -> Option<(String, String)> {
    let frame = frame::decode(seen, seen.len()).ok()??;
    let value: serde_json::Value = serde_json::from_slice(frame.body).ok()?;
    let word = value.get("error")?.as_str()?.to_string();
    let detail = value
        .get("detail")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_string();
    Some((word, detail))
}

/// The TLS problem behind an IO error from rustls, if that is what it is.
fn tls_problem(
    e: &io::Error,
    has_client_cert: bool,
    trusted: &str,
    name: &ServerName<'_>,
) -> Option<TlsProblem> {
    let error = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(problem_of(error, has_client_cert, trusted, name))
}

fn problem_of(
    error: &rustls::Error,
    has_client_cert: bool,
    trusted: &str,
    name: &ServerName<'_>,
) -> TlsProblem {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => TlsProblem::UnknownIssuer {
                trusted: trusted.to_string(),
            },
            CertificateError::ExpiredContext { not_after, .. } => {
                TlsProblem::Expired(format!("expired on {}", date(not_after.as_secs())))
            }
            CertificateError::Expired => TlsProblem::Expired("has expired".to_string()),
            CertificateError::NotValidYetContext { not_before, .. } => TlsProblem::Expired(
                format!("is not valid before {}", date(not_before.as_secs())),
            ),
            CertificateError::NotValidYet => TlsProblem::Expired("is not valid yet".to_string()),
            CertificateError::NotValidForNameContext { presented, .. } => {
                TlsProblem::NameMismatch {
                    name: name.to_str().into_owned(),
                    presented: presented.iter().map(|n| bare_name(n)).collect(),
                }
            }
            CertificateError::NotValidForName => TlsProblem::NameMismatch {
                name: name.to_str().into_owned(),
                presented: Vec::new(),
            },
            other => TlsProblem::BadCertificate(format!("{other:?}")),
        },
        E::InvalidMessage(_) => TlsProblem::NotTls("its answer is not a TLS record".to_string()),
        E::AlertReceived(AlertDescription::CertificateRequired) => TlsProblem::ClientCertRequired,
        E::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied),
        ) => match has_client_cert {
            true => TlsProblem::ClientCertRefused(alert_name(*alert)),
            false => TlsProblem::ClientCertRequired,
        },
        E::AlertReceived(alert) => {
            TlsProblem::Handshake(format!("the server sent the alert {}", alert_name(*alert)))
        }
        other => TlsProblem::Handshake(other.to_string()),
    }
}

/// `locks.example` out of `DnsName("locks.example")`, as webpki lists the
/// names a certificate presents; anything else as it is.
fn bare_name(presented: &str) -> String {
    match presented.split_once('(') {
        Some((_kind, rest)) => rest.trim_end_matches(')').trim_matches('"').to_string(),
        None => presented.to_string(),
    }
}

/// `bad_certificate`, as RFC 8446 spells alerts.
fn alert_name(alert: AlertDescription) -> String {
    let name = format!("{alert:?}");
    let mut out = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            out.push('_');
        }
        previous_lower = c.is_ascii_lowercase();
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// `YYYY-MM-DD` (UTC) for seconds since 1970 (Howard Hinnant's civil_from_days).
fn date(secs: u64) -> String {
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

impl Connection {
    /// The reader (for one thread), the writer, and the raw socket (for
    /// shutting it down, and for timeouts).
    pub(crate) fn split(self) -> io::Result<(Reader, Writer, TcpStream)> {
        let control = self.socket.try_clone()?;
        Ok(match self.tls {
            None => {
                let writer = self.socket.try_clone()?;
                (Reader::Plain(self.socket), Writer::Plain(writer), control)
            }
            Some(shared) => (
                Reader::Tls(Box::new(TlsReader {
                    shared: Arc::clone(&shared),
                    socket: self.socket,
                    raw: vec![0; RAW_READ_BYTES],
                    start: 0,
                    end: 0,
                    eof: false,
                })),
                Writer::Tls(shared),
                control,
            ),
        })
    }
}

/// The read side of a connection.
pub(crate) enum Reader {
    /// Plain TCP: the socket itself.
    Plain(TcpStream),
    /// TLS: raw reads outside the lock, decryption under it.
    Tls(Box<TlsReader>),
}

/// The read side of a TLS connection.
pub(crate) struct TlsReader {
    shared: Arc<TlsShared>,
    socket: TcpStream,
    /// Bytes read from the socket; `start..end` not given to rustls yet.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    /// The socket reached its end, and rustls has not been told yet.
    eof: bool,
}

impl Reader {
    /// Shuts the socket down both ways: the reader then sees the end.
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        let socket = match self {
            Reader::Plain(socket) => socket,
            Reader::Tls(tls) => &tls.socket,
        };
        socket.shutdown(std::net::Shutdown::Both)
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Plain(socket) => socket.read(buf),
            Reader::Tls(tls) => tls.read(buf),
        }
    }
}

impl TlsReader {
    /// Plaintext into `buf`: what rustls holds, else the next raw bytes fed
    /// to it. `Ok(0)` after the server's close_notify; `UnexpectedEof` for
    /// a close without one; `InvalidData` carrying the rustls error.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut state = locked(&self.shared.state);
            match state.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start < self.end || self.eof {
                // Feed what was read; rustls takes at most a record or so
                // at a time, which keeps its plaintext buffer in bounds.
                if self.start < self.end {
                    let mut slice = &self.raw[self.start..self.end];
                    self.start += state.conn.read_tls(&mut slice)?;
                } else {
                    // Tells rustls the stream ended.
                    self.eof = false;
                    state.conn.read_tls(&mut &[][..])?;
                }
                let processed = state.conn.process_new_packets();
                // A key update to answer, or an alert to send: sealed now,
                // written below with the socket's write side. That waits
                // for a writer blocked on a full socket, but only these rare
                // records come here; replies never wait behind requests.
                let TlsState { conn, outgoing } = &mut *state;
                let mut wrote = false;
                while conn.wants_write() {
                    conn.write_tls(outgoing)?;
                    wrote = true;
                }
                drop(state);
                if wrote {
                    let mut out = locked(&self.shared.out);
                    let flushed = self.shared.flush(&mut out);
                    if processed.is_ok() {
                        flushed?;
                    }
                }
                if let Err(e) = processed {
                    return Err(io::Error::new(ErrorKind::InvalidData, e));
                }
                continue;
            }
            drop(state);
            let n = loop {
                match self.socket.read(&mut self.raw) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            (self.start, self.end, self.eof) = (0, n, n == 0);
        }
    }
}

/// The write side of a connection.
pub(crate) enum Writer {
    /// Plain TCP: the socket itself.
    Plain(TcpStream),
    /// TLS: sealed under the shared lock, written outside it.
    Tls(Arc<TlsShared>),
}

impl Writer {
    /// Sends one frame holding `body`.
    pub(crate) fn write_frame(&mut self, body: &[u8]) -> io::Result<()> {
        match self {
            Writer::Plain(socket) => frame::write_blocking(socket, body),
            Writer::Tls(shared) => {
                // One record per frame, not one for the prefix and one for
                // the body.
                let mut framed = Vec::with_capacity(frame::PREFIX_LEN + body.len());
                frame::encode(body, &mut framed)?;
                let mut out = locked(&shared.out);
                {
                    let mut state = locked(&shared.state);
                    let TlsState { conn, outgoing } = &mut *state;
                    conn.writer().write_all(&framed)?;
                    while conn.wants_write() {
                        conn.write_tls(outgoing)?;
                    }
                }
                shared.flush(&mut out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> ServerName<'static> {
        server_name(text).unwrap()
    }

    #[test]
    fn the_name_checked_is_the_host_part_of_the_address() {
        assert_eq!(name("localhost:1").to_str(), "localhost");
        assert_eq!(name("locks.internal:20934").to_str(), "locks.internal");
        assert!(matches!(name("127.0.0.1:1"), ServerName::IpAddress(_)));
        assert!(matches!(name("[::1]:1"), ServerName::IpAddress(_)));
        assert_eq!(name("[::1]:1").to_str(), "::1");
        assert!(server_name("bad_name!:1").is_err());
        assert_eq!(split_scheme("tls://a:1"), (true, "a:1"));
        assert_eq!(split_scheme("a:1"), (false, "a:1"));
    }

    #[test]
    fn rustls_errors_become_problems_a_user_can_act_on() {
        let localhost = name("localhost:1");
        let of = |e: rustls::Error, client_cert| {
            problem_of(&e, client_cert, "a CA in ca.pem", &localhost)
        };
        assert_eq!(
            of(
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                false
            )
            .to_string(),
            "its certificate is not signed by a CA in ca.pem"
        );
        let expired = CertificateError::ExpiredContext {
            time: rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(1_700_000_000)),
            not_after: rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                1_609_459_200,
            )),
        };
        assert_eq!(
            of(rustls::Error::InvalidCertificate(expired), false).to_string(),
            "its certificate expired on 2021-01-01"
        );
        let mismatch = CertificateError::NotValidForNameContext {
            expected: localhost.clone(),
            presented: vec!["other.example".into()],
        };
        assert_eq!(
            of(rustls::Error::InvalidCertificate(mismatch), false).to_string(),
            "its certificate is not valid for \"localhost\" (it names other.example)"
        );
        assert!(matches!(
            of(
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                false
            ),
            TlsProblem::NotTls(_)
        ));
        assert_eq!(
            of(
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                false
            ),
            TlsProblem::ClientCertRequired
        );
        assert_eq!(
            of(
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                true
            )
            .to_string(),
            "the server refused our client certificate (unknown_ca)"
        );
        assert_eq!(
            of(
                rustls::Error::AlertReceived(AlertDescription::BadCertificate),
                true
            ),
            TlsProblem::ClientCertRefused("bad_certificate".into())
        );
        assert_eq!(
            of(
                rustls::Error::AlertReceived(AlertDescription::BadCertificate),
                false
            ),
            TlsProblem::ClientCertRequired
        );
    }

    #[test]
    fn presented_names_are_shown_bare() {
        assert_eq!(bare_name("DnsName(\"locks.example\")"), "locks.example");
        assert_eq!(bare_name("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_609_459_199), "2020-12-31");
    }

    #[test]
    fn a_plain_error_frame_is_read_out_of_what_a_non_tls_peer_sent() {
        let mut seen = Vec::new();
        frame::encode(br#"{"error":"denied","detail":"not allowed"}"#, &mut seen).unwrap();
        assert_eq!(
            plain_error_frame(&seen),
            Some(("denied".to_string(), "not allowed".to_string()))
        );
        assert_eq!(plain_error_frame(b"\x16\x03\x01"), None);
        assert_eq!(plain_error_frame(b""), None);
    }
}
