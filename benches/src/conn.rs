//! A load generator's non-blocking connection, shared by the backends that
//! drive their connections from one mio loop: buffered output with WRITABLE
//! interest only while some is left, and input read until WouldBlock. Over
//! TLS (pklock only), a rustls client session sits between the buffers and
//! the socket, driven by the same calls.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;

use super::BenchError;
use super::tls::TlsClient;

/// How long a batch of TLS handshakes may take before the bench gives up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection of a load generator.
pub struct LoadConn {
    stream: MioStream,
    /// Bytes read and not yet taken by the protocol's parser.
    pub input: Vec<u8>,
    output: Vec<u8>,
    writable_armed: bool,
    tls: Option<Box<ClientConnection>>,
}

impl LoadConn {
    fn connect(addr: SocketAddr) -> io::Result<LoadConn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(LoadConn {
            stream: MioStream::from_std(stream),
            input: Vec::new(),
            output: Vec::new(),
            writable_armed: false,
            tls: None,
        })
    }

    /// Connects to `addr`, over TLS when `tls` is given (the handshake
    /// starts with the first flush), and registers for reading as `token`.
    pub fn open(
        addr: SocketAddr,
        tls: Option<&TlsClient>,
        poll: &Poll,
        token: Token,
    ) -> Result<LoadConn, BenchError> {
        let mut conn = LoadConn::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
        if let Some(tls) = tls {
            conn.tls = Some(Box::new(tls.session()?));
        }
        poll.registry()
            .register(&mut conn.stream, token, Interest::READABLE)
            .map_err(|e| e.to_string())?;
        Ok(conn)
    }

    /// Whether it speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether its TLS handshake is still under way (false for plain text).
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.is_handshaking())
    }

    /// Queues `bytes` and writes what the socket takes.
    pub fn send(&mut self, bytes: &[u8], poll: &Poll, token: Token) -> io::Result<()> {
        self.output.extend_from_slice(bytes);
        self.flush(poll, token)
    }

    /// Writes what the socket takes; asks for WRITABLE while output is left.
    pub fn flush(&mut self, poll: &Poll, token: Token) -> io::Result<()> {
        if self.tls.is_some() {
            return self.flush_tls(poll, token);
        }
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let want_writable = !self.output.is_empty();
        self.arm(want_writable, poll, token)
    }

    /// Hands the output to TLS (which holds it while handshaking) and
    /// writes the records TLS has for the socket.
    fn flush_tls(&mut self, poll: &Poll, token: Token) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        if !self.output.is_empty() {
            let taken = tls.writer().write(&self.output)?;
            self.output.drain(..taken);
        }
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let want_writable = tls.wants_write();
        self.arm(want_writable, poll, token)
    }

    fn arm(&mut self, want_writable: bool, poll: &Poll, token: Token) -> io::Result<()> {
        if want_writable != self.writable_armed {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            poll.registry()
                .reregister(&mut self.stream, token, interest)?;
            self.writable_armed = want_writable;
        }
        Ok(())
    }

    /// Reads everything there is into `input`; a close is an error. Over
    /// TLS, what the records carry; the session may then have handshake
    /// records to send, which the next [`LoadConn::flush`] writes.
    pub fn fill(&mut self) -> io::Result<()> {
        if self.tls.is_some() {
            return self.fill_tls();
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn fill_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            match tls.read_tls(&mut self.stream) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
            tls.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => self.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Connects `n` connections registered on `poll` with tokens `0..n`.
pub fn connect_all(addr: SocketAddr, n: usize, poll: &Poll) -> Result<Vec<LoadConn>, BenchError> {
    (0..n)
        .map(|i| LoadConn::open(addr, None, poll, Token(i)))
        .collect()
}

/// Connects `n` connections registered on `poll` with tokens `0..n`, over
/// TLS when `tls` is given; returns once every TLS handshake is done, so
/// that what is timed afterwards is the requests alone.
pub fn connect_all_over(
    addr: SocketAddr,
    n: usize,
    tls: Option<&TlsClient>,
    poll: &mut Poll,
) -> Result<Vec<LoadConn>, BenchError> {
    let Some(tls) = tls else {
        return connect_all(addr, n, poll);
    };
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut conn = LoadConn::open(addr, Some(tls), poll, Token(i))?;
        conn.flush(poll, Token(i)).map_err(io_err)?;
        conns.push(conn);
    }
    let mut handshaking = conns.len();
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut events = Events::with_capacity(1024);
    while handshaking > 0 {
        if Instant::now() >= deadline {
            return Err(format!(
                "{handshaking} of {n} TLS handshakes not done after {HANDSHAKE_TIMEOUT:?}"
            ));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        for event in &events {
            let i = event.token().0;
            let Some(conn) = conns.get_mut(i) else {
                continue;
            };
            if !conn.is_handshaking() {
                continue;
            }
            if event.is_readable() {
                conn.fill().map_err(|e| format!("TLS handshake: {e}"))?;
            }
            conn.flush(poll, Token(i)).map_err(io_err)?;
            if !conn.is_handshaking() {
                handshaking -= 1;
            }
        }
    }
    Ok(conns)
}

/// A failed connection, in words.
pub fn io_err(e: io::Error) -> BenchError {
    format!("connection failed: {e}")
}
