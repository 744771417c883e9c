//! One peer: its socket, the bytes read but not yet cut into frames, the
//! replies not yet written (with the partial-write offset), the readiness it
//! wants, and whether it is closing. Knows no lock rules and no JSON.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::lock_table::ClientId;

/// Buffers bigger than this are given back once empty, so that a burst does
/// not pin memory on an idle connection.
const KEEP_BUFFER_BYTES: usize = 16 * 1024;

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
    /// Already listed for writing this turn.
    pub flush_listed: bool,
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
    ) -> io::Result<Connection> {
        registry.register(&mut stream, token, Interest::READABLE)?;
        Ok(Connection {
            stream,
            client,
            peer,
            input: Vec::new(),
            state: State::Open,
            unread: false,
            flush_listed: false,
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
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Writes as much pending output as the socket takes, until done or
    /// WouldBlock.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.written = 0;
        if self.output.capacity() > KEEP_BUFFER_BYTES {
            self.output = Vec::new();
        } else {
            self.output.clear();
        }
        Ok(())
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
