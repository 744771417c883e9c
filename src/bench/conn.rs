//! A load generator's non-blocking connection, shared by the backends that
//! drive their connections from one mio loop: buffered output with WRITABLE
//! interest only while some is left, and input read until WouldBlock.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use mio::net::TcpStream as MioStream;
use mio::{Interest, Poll, Token};

use super::BenchError;

/// One connection of a load generator.
pub struct LoadConn {
    stream: MioStream,
    /// Bytes read and not yet taken by the protocol's parser.
    pub input: Vec<u8>,
    output: Vec<u8>,
    writable_armed: bool,
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
        })
    }

    /// Queues `bytes` and writes what the socket takes.
    pub fn send(&mut self, bytes: &[u8], poll: &Poll, token: Token) -> io::Result<()> {
        self.output.extend_from_slice(bytes);
        self.flush(poll, token)
    }

    /// Writes what the socket takes; asks for WRITABLE while output is left.
    pub fn flush(&mut self, poll: &Poll, token: Token) -> io::Result<()> {
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

    /// Reads everything there is into `input`; a close is an error.
    pub fn fill(&mut self) -> io::Result<()> {
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
}

/// Connects `n` connections registered on `poll` with tokens `0..n`.
pub fn connect_all(addr: SocketAddr, n: usize, poll: &Poll) -> Result<Vec<LoadConn>, BenchError> {
    (0..n)
        .map(|i| {
            let mut conn =
                LoadConn::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
            poll.registry()
                .register(&mut conn.stream, Token(i), Interest::READABLE)
                .map_err(|e| e.to_string())?;
            Ok(conn)
        })
        .collect()
}

/// A failed connection, in words.
pub fn io_err(e: io::Error) -> BenchError {
    format!("connection failed: {e}")
}
