//! One peer: its socket (and TLS session, on a TLS listener), the bytes read
//! but not yet cut into frames, the replies not yet written (with the
//! partial-write offset), the readiness it wants, and whether it is closing.
//! Knows no lock rules and no JSON.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustix::net::{RecvFlags, SendFlags};
use rustls::{ServerConfig, ServerConnection};

use crate::keepalive::Keepalive;
use crate::lock_table::ClientId;

/// Buffers bigger than this are given back once empty, so that a burst does
/// not pin memory on an idle connection.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;
/// Written bytes are dropped from the front of the output once this many
/// pile up, so a peer that reads slowly but steadily cannot grow it.
const COMPACT_AFTER_BYTES: usize = 64 * 1024;
/// Replies are handed to TLS this much at a time, and only once it has sent
/// the last: what TLS holds unsent stays bounded and out of the output's
/// accounting only briefly.
const TLS_CHUNK_BYTES: usize = 16 * 1024;
/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// One read of a TLS connection takes at most about this much off the
/// socket while no plain text comes of it, so that a stream of records
/// carrying nothing cannot keep the loop decrypting.
const TLS_WIRE_PER_READ: usize = 64 * 1024;
/// What a byte of TLS framing (record headers and tags) costs against the
/// read budget, in bytes of plain text: a record costs about as much to open
/// whatever it carries, so a peer sending one byte per record must not get
/// twenty times the work of one sending full records.
const TLS_FRAMING_COST: usize = 32;
/// Bytes taken off the socket but not yet opened are not framing: rustls
/// reads ahead into the next record, so up to one whole record (16 KiB of
/// text, 256 bytes of expansion) is left uncharged until it is read.
const TLS_READ_AHEAD: usize = 16 * 1024 + 256;

/// A TLS session over a connection's socket.
#[derive(Debug)]
struct Tls {
    session: ServerConnection,
    /// The first byte was looked at (and was a TLS record).
    first_checked: bool,
    /// The handshake's end was reported by [`Connection::handshake_done`].
    told_done: bool,
    /// The last read of the socket returned less than it asked for: the
    /// socket was empty then.
    socket_drained: bool,
    /// Bytes taken off the socket that no plain text read has matched yet
    /// (at most [`TLS_READ_AHEAD`] once [`Connection::read_cost`] counted).
    unmatched: usize,
}

/// What a TLS read says when it took its share of the socket without a byte
/// of plain text: read again later (the socket may hold more).
#[derive(Debug)]
pub struct ReadAgainLater;

impl std::fmt::Display for ReadAgainLater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a share of TLS records read, no plain text yet")
    }
}

impl std::error::Error for ReadAgainLater {}

/// Whether `e` is a [`ReadAgainLater`].
pub fn is_read_again_later(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<ReadAgainLater>())
}

/// What a TLS listener got instead of TLS.
#[derive(Debug)]
pub struct PlainTextOnTls;

impl std::fmt::Display for PlainTextOnTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("plain text sent to a TLS port")
    }
}

impl std::error::Error for PlainTextOnTls {}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Requests are read and answered.
    Open,
    /// Its locks are gone; the last replies are written, then the write side
    /// is shut and input is discarded until the peer closes or `deadline`.
    Closing {
        /// When it is dropped whatever is left.
        deadline: Instant,
        /// Whether the write side is already shut.
        write_shut: bool,
        /// Whether the peer already closed its side.
        peer_closed: bool,
    },
}

/// One peer's socket and buffers.
#[derive(Debug)]
pub struct Connection {
    /// The socket.
    pub stream: TcpStream,
    /// Who it is to the lock table.
    pub client: ClientId,
    /// Its address.
    pub peer: SocketAddr,
    /// Read but not yet cut into frames.
    pub input: Vec<u8>,
    /// Where it is in its life.
    pub state: State,
    /// Reading stopped before WouldBlock (turn budget, or output over the
    /// limit): the socket may hold more that no new event will announce.
    pub unread: bool,
    /// Requests are not handled while its unsent replies are over the limit;
    /// writing below it resumes them.
    pub paused: bool,
    /// Since when its unsent replies have been over the limit without any
    /// of them being written.
    pub stalled_since: Option<Instant>,
    /// Already listed for writing this turn.
    pub flush_listed: bool,
    /// Since when a frame it owes has been awaited: from the accept for the
    /// first one, from the first byte for a frame it started.
    pub frame_due_since: Option<Instant>,
    /// The loop turn `requests_this_turn` counts for.
    pub budget_turn: u64,
    /// Requests handled in that turn.
    pub requests_this_turn: usize,
    /// Listed as waiting for server-wide room for a `status` reply.
    pub waits_for_room: bool,
    /// The keepalive set on its socket at accept, which its `hello` reports:
    /// a reload changes it for later connections only.
    pub keepalive: Keepalive,
    output: Vec<u8>,
    written: usize,
    registered: Interest,
    tls: Option<Box<Tls>>,
}

impl Connection {
    /// Registers `stream` for reading and wraps it.
    pub fn register(
        mut stream: TcpStream,
        client: ClientId,
        peer: SocketAddr,
        registry: &Registry,
        token: Token,
        now: Instant,
        keepalive: Keepalive,
    ) -> io::Result<Connection> {
        registry.register(&mut stream, token, Interest::READABLE)?;
        Ok(Connection {
            stream,
            client,
            peer,
            input: Vec::new(),
            state: State::Open,
            unread: false,
            paused: false,
            stalled_since: None,
            flush_listed: false,
            frame_due_since: Some(now),
            budget_turn: 0,
            requests_this_turn: 0,
            waits_for_room: false,
            keepalive,
            output: Vec::new(),
            written: 0,
            registered: Interest::READABLE,
            tls: None,
        })
    }

    /// Speaks TLS from now on (before anything was read), with `config`.
    pub fn start_tls(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        let session = ServerConnection::new(config).map_err(io::Error::other)?;
        self.tls = Some(Box::new(Tls {
            session,
            first_checked: false,
            told_done: false,
            socket_drained: false,
            unmatched: 0,
        }));
        Ok(())
    }

    /// Whether a TLS handshake is under way.
    pub fn is_handshaking(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|tls| tls.session.is_handshaking())
    }

    /// Whether a read that gave `n` of `asked` bytes took everything there
    /// was: a short read of the socket, and on TLS also every record
    /// decrypted and read. Any later byte raises a new readiness event.
    pub fn drained_after(&self, n: usize, asked: usize) -> bool {
        n < asked && self.tls.as_ref().is_none_or(|tls| tls.socket_drained)
    }

    /// Whether the connection speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Once, when the TLS handshake has just completed: the client
    /// certificate it presented, if any (the server's verifier checked it).
    pub fn handshake_done(&mut self) -> Option<Option<rustls_pki_types::CertificateDer<'static>>> {
        let tls = self.tls.as_mut()?;
        if tls.told_done || tls.session.is_handshaking() {
            return None;
        }
        tls.told_done = true;
        Some(
            tls.session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.clone().into_owned()),
        )
    }

    /// Stops speaking TLS, to answer plain text that came to a TLS port in
    /// plain text.
    pub fn drop_tls(&mut self) {
        self.tls = None;
    }

    /// Whether anything is left to write: replies, or TLS records (the
    /// handshake's included).
    pub fn wants_write(&self) -> bool {
        self.unsent() > 0
            || self
                .tls
                .as_ref()
                .is_some_and(|tls| tls.session.wants_write())
    }

    /// The buffer replies are appended to.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.output
    }

    /// Reply bytes not yet accepted by the kernel.
    pub fn unsent(&self) -> usize {
        self.output.len() - self.written
    }

    /// Reads into `buf`, retrying on EINTR. `Ok(0)` is the peer's close.
    ///
    /// The socket calls are rustix's system calls rather than libc's
    /// wrappers: those are thread-cancellation points, which cost every
    /// call extra work once the process has a second thread (the cluster's
    /// election).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tls) = self.tls.as_mut() {
            return tls.read(&self.stream, buf);
        }
        recv(&self.stream, buf)
    }

    /// What a read that gave `plain` bytes cost, to count against a read
    /// budget: the bytes themselves, and on TLS the framing taken off the
    /// socket for them (each byte weighing `TLS_FRAMING_COST` plain ones):
    /// what was taken and matched by no plain text, beyond one record read
    /// ahead.
    pub fn read_cost(&mut self, plain: usize) -> usize {
        let Some(tls) = self.tls.as_mut() else {
            return plain;
        };
        let unmatched = tls.unmatched.saturating_sub(plain);
        let framing = unmatched.saturating_sub(TLS_READ_AHEAD);
        tls.unmatched = unmatched - framing;
        plain.saturating_add(framing.saturating_mul(TLS_FRAMING_COST))
    }

    /// Reads the socket's bytes and drops them: for a closing connection,
    /// whose input is no longer looked at, so nothing is decrypted, except
    /// while a TLS handshake is under way (its end lets the last replies
    /// out). `Ok(0)` is the peer's close.
    pub fn discard(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_mut() {
            Some(tls) if tls.session.is_handshaking() => tls.read(&self.stream, buf),
            _ => recv(&self.stream, buf),
        }
    }

    /// Writes as much pending output as the socket takes, until done or
    /// WouldBlock; returns how many bytes were written (handed to TLS, on a
    /// TLS connection).
    pub fn flush(&mut self) -> io::Result<usize> {
        if self.tls.is_some() {
            return self.flush_tls();
        }
        self.flush_plain()
    }

    fn flush_tls(&mut self) -> io::Result<usize> {
        let before = self.written;
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        loop {
            while tls.session.wants_write() {
                match tls.session.write_tls(&mut Socket(&self.stream)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(self.written - before);
                    }
                    Err(e) => return Err(e),
                }
            }
            let pending = self.output.get(self.written..).unwrap_or_default();
            if pending.is_empty() || tls.session.is_handshaking() {
                break;
            }
            let chunk = pending.get(..TLS_CHUNK_BYTES).unwrap_or(pending);
            let taken = tls.session.writer().write(chunk)?;
            if taken == 0 {
                break;
            }
            self.written += taken;
        }
        let progress = self.written - before;
        if self.written == self.output.len() {
            self.written = 0;
            if self.output.capacity() > KEEP_BUFFER_BYTES {
                self.output = Vec::new();
            } else {
                self.output.clear();
            }
        } else if self.written >= COMPACT_AFTER_BYTES {
            self.output.drain(..self.written);
            self.written = 0;
        }
        Ok(progress)
    }

    fn flush_plain(&mut self) -> io::Result<usize> {
        let before = self.written;
        while self.written < self.output.len() {
            let pending = self.output.get(self.written..).unwrap_or_default();
            match rustix::net::send(&self.stream, pending, SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
            {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let progress = self.written - before;
                    if self.written >= COMPACT_AFTER_BYTES {
                        self.output.drain(..self.written);
                        self.written = 0;
                    }
                    return Ok(progress);
                }
                Err(e) => return Err(e),
            }
        }
        let progress = self.written - before;
        self.written = 0;
        if self.output.capacity() > KEEP_BUFFER_BYTES {
            self.output = Vec::new();
        } else {
            self.output.clear();
        }
        Ok(progress)
    }

    /// Drops `consumed` bytes from the front of the input.
    pub fn consume_input(&mut self, consumed: usize) {
        self.input.drain(..consumed);
        if self.input.is_empty() && self.input.capacity() > KEEP_BUFFER_BYTES {
            self.input = Vec::new();
        }
    }

    /// Shuts the write side, so the peer reads to the end and then sees EOF.
    pub fn shut_write(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            // TLS's own end of stream first, sent if the socket takes it.
            tls.session.send_close_notify();
            while tls.session.wants_write() {
                if !matches!(tls.session.write_tls(&mut Socket(&self.stream)), Ok(n) if n > 0) {
                    break;
                }
            }
        }
        // The peer may already be gone; nothing to do about that here.
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Asks for WRITABLE only while output is pending; re-registers only on a change.
    pub fn update_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let wanted = if self.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if wanted != self.registered {
            registry.reregister(&mut self.stream, token, wanted)?;
            self.registered = wanted;
        }
        Ok(())
    }
}

/// One `recv`, retrying on EINTR.
fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match rustix::net::recv(stream, &mut *buf, RecvFlags::empty()) {
            Ok((n, _)) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The socket as rustls reads and writes it, through the same system calls.
struct Socket<'a>(&'a TcpStream);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.0, buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match rustix::net::send(self.0, buf, SendFlags::NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket as rustls reads it, noting a read shorter than asked.
struct CountedRead<'a> {
    stream: &'a TcpStream,
    short: bool,
}

impl Read for CountedRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = recv(self.stream, buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

impl Tls {
    /// Plain text into `buf`, reading and decrypting records as needed.
    /// `Ok(0)` is the peer's close; an error of kind `InvalidData` wrapping
    /// [`PlainTextOnTls`] says the peer did not speak TLS at all; a
    /// [`ReadAgainLater`] that this read took its share of the socket.
    fn read(&mut self, stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        let mut taken_here = 0usize;
        loop {
            match self.session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: a close all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if !self.first_checked {
                let mut first = [0u8; 1];
                match rustix::net::recv(stream, &mut first, RecvFlags::PEEK) {
                    Ok((0, _)) => return Ok(0),
                    Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, PlainTextOnTls));
                    }
                    Ok(_) => self.first_checked = true,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let mut socket = CountedRead {
                stream,
                short: false,
            };
            if taken_here >= TLS_WIRE_PER_READ {
                return Err(io::Error::other(ReadAgainLater));
            }
            let read = self.session.read_tls(&mut socket)?;
            self.socket_drained = socket.short;
            if read == 0 {
                return Ok(0);
            }
            taken_here += read;
            self.unmatched = self.unmatched.saturating_add(read);
            if let Err(e) = self.session.process_new_packets() {
                // The alert saying why goes out if the socket takes it at
                // once: the peer learns what was wrong, not just a reset.
                while self.session.wants_write() {
                    if !matches!(self.session.write_tls(&mut Socket(stream)), Ok(n) if n > 0) {
                        break;
                    }
                }
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A connection whose peer is a blocking std socket the test reads from.
    fn pair() -> (Poll, Connection, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, addr) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let poll = Poll::new().unwrap();
        let conn = Connection::register(
            TcpStream::from_std(accepted),
            ClientId(1),
            addr,
            poll.registry(),
            Token(0),
            std::time::Instant::now(),
            Keepalive::effective(&crate::config::KeepaliveConfig::default()),
        )
        .unwrap();
        (poll, conn, peer)
    }

    use mio::Poll;

    #[test]
    fn a_slow_steady_reader_does_not_grow_the_output_buffer() {
        let (_poll, mut conn, mut peer) = pair();
        let chunk = vec![7u8; 256 * 1024];
        let mut sink = vec![0u8; 64 * 1024];
        let mut most_buffered = 0;
        for _ in 0..200 {
            conn.output().extend_from_slice(&chunk);
            conn.flush().unwrap();
            // The peer reads less than is sent each round, so output stays pending.
            for _ in 0..3 {
                let _ = peer.read(&mut sink).unwrap();
            }
            most_buffered = most_buffered.max(conn.output.len());
            // What is buffered is what is unsent, give or take one compaction step.
            assert!(conn.output.len() <= conn.unsent() + COMPACT_AFTER_BYTES + chunk.len());
        }
        assert!(conn.unsent() > 0, "the test must keep output pending");
        assert!(
            most_buffered < 200 * chunk.len() / 2,
            "buffer grew with traffic: {most_buffered}"
        );
    }

    #[test]
    fn a_full_flush_reports_progress_and_empties_the_buffer() {
        let (_poll, mut conn, mut peer) = pair();
        conn.output().extend_from_slice(b"hello");
        assert_eq!(conn.flush().unwrap(), 5);
        assert_eq!(conn.unsent(), 0);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(conn.flush().unwrap(), 0);
    }
}
