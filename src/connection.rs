//! One peer: its socket, the bytes read but not yet cut into frames, the
//! replies not yet written (with the partial-write offset), the readiness it
//! wants, and whether it is closing. Knows no lock rules and no JSON.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustix::net::{RecvFlags, SendFlags};

use crate::keepalive::Keepalive;
use crate::lock_table::ClientId;

/// Buffers bigger than this are given back once empty, so that a burst does
/// not pin memory on an idle connection.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;
/// Written bytes are dropped from the front of the output once this many
/// pile up, so a peer that reads slowly but steadily cannot grow it.
const COMPACT_AFTER_BYTES: usize = 64 * 1024;

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
        })
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
        loop {
            match rustix::net::recv(&self.stream, &mut *buf, RecvFlags::empty()) {
                Ok((n, _)) => return Ok(n),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes as much pending output as the socket takes, until done or
    /// WouldBlock; returns how many bytes were written.
    pub fn flush(&mut self) -> io::Result<usize> {
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
        // The peer may already be gone; nothing to do about that here.
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Asks for WRITABLE only while output is pending; re-registers only on a change.
    pub fn update_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let wanted = if self.unsent() > 0 {
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
